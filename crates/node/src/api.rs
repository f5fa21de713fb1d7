//! The HTTP API (OpenAI-compatible chat and text completions plus instance
//! management). Handlers only translate between HTTP and [`Node`]
//! operations; every error leaves in OpenAI's error shape with a message
//! that says what was wrong.
//!
//! Invariants:
//! * Every answer with a status of 400 or more is a JSON body in OpenAI's
//!   error shape, including the framework's own rejections (bad path
//!   parameters, oversize bodies, wrong methods): `openai_errors` rewrites
//!   any other error body on its way out.
//! * Request bodies are bounded by [`MAX_BODY_BYTES`] before they are read.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ipc::ShutdownMode;
use serde::Deserialize;
use supervisor::instance::SubmitError;

use crate::generate::{self, Kind};
use crate::node::{Node, NodeError};
use crate::openai::{ApiFailure, ChatRequest, CompletionRequest, ErrorBody, OpenAiRequest};

/// Largest request body read (a full 8k-token context is ~40 KB of text).
pub const MAX_BODY_BYTES: usize = 8 << 20;

/// `fault_injection` adds `POST /fault/stall` (tests of a wedged node).
pub fn router(node: Arc<Node>, fault_injection: bool) -> Router {
    let router = Router::new();
    let router = if fault_injection {
        router.route("/fault/stall", post(stall))
    } else {
        router
    };
    router
        .route("/health", get(health))
        .route("/state", get(state))
        .route("/instance", post(create_instance))
        .route("/instance/{id}", get(get_instance).delete(delete_instance))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/cancel/{task_id}", post(cancel))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::map_response(openai_errors))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(node)
}

/// An API error: a status and an OpenAI-shaped body.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub ErrorBody);

impl ApiError {
    fn bad_request(message: impl Into<String>) -> Self {
        ApiError(
            StatusCode::BAD_REQUEST,
            ErrorBody::new("invalid_request_error", message),
        )
    }

    /// A runner failed the task: a server error.
    pub fn runner(cause: impl Into<String>) -> Self {
        ApiError(
            StatusCode::BAD_GATEWAY,
            ErrorBody::new("server_error", cause).with_code("runner_failed"),
        )
    }
}

/// What a 429 tells the client to wait before it tries again, in seconds
/// (`Retry-After`): about how long a running task takes to make room on
/// this hardware; the official SDKs honour it when they retry.
pub const RETRY_AFTER_S: u32 = 1;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.0, Json(self.1)).into_response();
        if self.0 == StatusCode::TOO_MANY_REQUESTS {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                header::HeaderValue::from(RETRY_AFTER_S),
            );
        }
        response
    }
}

impl From<ApiFailure> for ApiError {
    fn from(f: ApiFailure) -> Self {
        let status = StatusCode::from_u16(f.status).unwrap_or(StatusCode::BAD_REQUEST);
        ApiError(status, f.body)
    }
}

impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> Self {
        let (status, kind, code) = match &e {
            NodeError::BadRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request_error", None),
            NodeError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found_error", Some("not_found")),
            NodeError::ModelNotFound(_) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("model_not_found"),
            ),
            NodeError::Unavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable_error",
                Some("model_not_ready"),
            ),
        };
        let mut body = ErrorBody::new(kind, e.to_string());
        body.error.code = code.map(String::from);
        if matches!(e, NodeError::ModelNotFound(_)) {
            body.error.param = Some("model".into());
        }
        ApiError(status, body)
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            // OpenAI's shape for a request over a rate limit.
            SubmitError::QueueFull { .. } => ApiError(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorBody::new("requests", e.to_string()).with_code("rate_limit_exceeded"),
            ),
            _ => ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorBody::new("unavailable_error", e.to_string()).with_code("model_not_ready"),
            ),
        }
    }
}

/// A request body, read once its declared type was checked and within
/// [`MAX_BODY_BYTES`]; any failure is an OpenAI-shaped error. JSON is read
/// whatever the declared type (curl's `-d` says
/// `application/x-www-form-urlencoded`), except types that cannot hold JSON.
struct Body(Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        if let Some(value) = req.headers().get(header::CONTENT_TYPE) {
            let value = value.to_str().unwrap_or("").to_ascii_lowercase();
            let mime = value.split(';').next().unwrap_or("").trim();
            let json_like = mime.is_empty()
                || mime == "application/json"
                || mime.ends_with("+json")
                || mime == "application/x-www-form-urlencoded"
                || mime == "text/plain"
                || mime == "*/*";
            if !json_like {
                return Err(ApiError(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    ErrorBody::new(
                        "invalid_request_error",
                        format!("content type {mime:?} is not supported: send the body as application/json"),
                    )
                    .with_code("unsupported_media_type"),
                ));
            }
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            let too_large = e.status() == StatusCode::PAYLOAD_TOO_LARGE;
            let (message, code) = if too_large {
                (
                    format!("the request body exceeds the limit of {MAX_BODY_BYTES} bytes"),
                    "request_too_large",
                )
            } else {
                (
                    format!("cannot read the request body: {}", e.body_text()),
                    "invalid_body",
                )
            };
            ApiError(
                e.status(),
                ErrorBody::new("invalid_request_error", message).with_code(code),
            )
        })?;
        Ok(Body(bytes))
    }
}

/// The one path parameter of a route, or a 400 saying what was wrong with
/// it (e.g. percent-encoded bytes that are not UTF-8).
struct Param(String);

impl<S: Send + Sync> FromRequestParts<S> for Param {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(p) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| {
                ApiError(
                    StatusCode::BAD_REQUEST,
                    ErrorBody::new(
                        "invalid_request_error",
                        format!("invalid path parameter: {}", e.body_text()),
                    )
                    .with_code("invalid_path"),
                )
            })?;
        Ok(Param(p))
    }
}

/// Parses a JSON body with an error that names the field (`param`) and
/// the place of the problem.
fn parse_json<T: serde::de::DeserializeOwned>(body: &Bytes, what: &str) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = serde_path_to_error::deserialize(&mut de)
        .map_err(|e| (e.path().to_string(), e.into_inner()))
        .and_then(|v: T| de.end().map(|()| v).map_err(|e| (String::new(), e)));
    parsed.map_err(|(path, inner)| {
        let mut body = ErrorBody::new(
            "invalid_request_error",
            format!(
                "invalid {what} body: {inner} (line {}, column {})",
                inner.line(),
                inner.column()
            ),
        );
        if path != "." && !path.is_empty() {
            body.error.param = Some(path);
        }
        body.error.code = Some(
            if inner.is_syntax() || inner.is_eof() {
                "invalid_json"
            } else {
                "invalid_type"
            }
            .into(),
        );
        ApiError(StatusCode::BAD_REQUEST, body)
    })
}

/// Rewrites an error response whose body is not JSON (the framework's
/// plain-text rejections) into OpenAI's shape, keeping its status and text.
async fn openai_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if status.as_u16() < 400 || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = match axum::body::to_bytes(body, 64 << 10).await {
        Ok(bytes) if !bytes.is_empty() => String::from_utf8_lossy(&bytes).into_owned(),
        _ => status
            .canonical_reason()
            .unwrap_or("request failed")
            .to_lowercase(),
    };
    let kind = if status.is_server_error() {
        "server_error"
    } else {
        "invalid_request_error"
    };
    let mut response = (status, Json(ErrorBody::new(kind, text))).into_response();
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            response.headers_mut().insert(name, value.clone());
        }
    }
    response
}

async fn method_not_allowed() -> ApiError {
    ApiError(
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorBody::new(
            "invalid_request_error",
            "this method is not allowed on this endpoint",
        )
        .with_code("method_not_allowed"),
    )
}

async fn not_found() -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        ErrorBody::new("not_found_error", "no such endpoint").with_code("unknown_url"),
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stall {
    ms: u64,
}

/// Fault injection: blocks every worker thread of the node's runtime for
/// `ms` (at most a minute), as a wedged supervisor would be. zenoh runs on
/// its own threads, so the node's cluster token stays alive meanwhile: only
/// the pings find out.
async fn stall(Body(body): Body) -> Result<Response, ApiError> {
    let req: Stall = parse_json(&body, "POST /fault/stall")?;
    let stall = Duration::from_millis(req.ms.min(60_000));
    tracing::info!(
        ms = stall.as_millis() as u64,
        "fault injection: stalling the runtime"
    );
    for _ in 0..crate::cli::RUNTIME_WORKERS {
        tokio::spawn(async move { std::thread::sleep(stall) });
    }
    Ok(Json(serde_json::json!({"stalled_ms": stall.as_millis() as u64})).into_response())
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

async fn state(State(node): State<Arc<Node>>) -> Json<crate::node::NodeState> {
    Json(node.state())
}

async fn create_instance(
    State(node): State<Arc<Node>>,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let req: crate::node::CreateInstance = parse_json(&body, "POST /instance")?;
    let handle = node.create_instance(req)?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({"instance_id": handle.instance_id})),
    )
        .into_response())
}

/// Forwards a request about an instance another node coordinates to that
/// node's API, streaming its answer back as is.
async fn proxy(
    api: &str,
    method: &str,
    path: &str,
    body: Option<String>,
) -> Result<Response, ApiError> {
    let url = format!("http://{api}{path}");
    match crate::client::send(method, &url, body).await {
        Ok(response) => {
            let (parts, body) = response.into_parts();
            let sse = parts
                .headers
                .get(axum::http::header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
            if !sse {
                return Ok(Response::from_parts(parts, axum::body::Body::new(body)));
            }
            // A stream cut by the coordinator's loss ends with an error
            // event, as a runner failure does, not with a silent stop.
            let api = api.to_string();
            let data = http_body_util::BodyExt::into_data_stream(body);
            let events = futures_util::StreamExt::scan(data, false, move |failed, chunk| {
                let item = match (*failed, chunk) {
                    (true, _) => None,
                    (false, Ok(bytes)) => Some(Ok::<_, Infallible>(bytes)),
                    (false, Err(e)) => {
                        *failed = true;
                        let message = format!(
                            "the coordinating node at {api} stopped answering mid-stream: {e}"
                        );
                        let body = serde_json::to_string(
                            &ErrorBody::new("server_error", message).with_code("node_lost"),
                        )
                        .unwrap_or_default();
                        Some(Ok(Bytes::from(format!("data: {body}\n\n"))))
                    }
                };
                std::future::ready(item)
            });
            Ok(Response::from_parts(
                parts,
                axum::body::Body::from_stream(events),
            ))
        }
        Err(e) => Err(ApiError(
            StatusCode::BAD_GATEWAY,
            ErrorBody::new(
                "server_error",
                format!("the coordinating node at {api} did not answer: {e:#}"),
            )
            .with_code("node_unreachable"),
        )),
    }
}

async fn get_instance(
    State(node): State<Arc<Node>>,
    Param(id): Param,
) -> Result<Response, ApiError> {
    match node.instance_view(&id) {
        Ok(view) => Ok(Json(view).into_response()),
        Err(NodeError::NotFound(e)) => match node.remote_api(&id) {
            Some(api) => proxy(&api, "GET", &format!("/instance/{id}"), None).await,
            None => Err(NodeError::NotFound(e).into()),
        },
        Err(e) => Err(e.into()),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteParams {
    mode: Option<String>,
    timeout_ms: Option<u64>,
}

async fn delete_instance(
    State(node): State<Arc<Node>>,
    Param(id): Param,
    params: Result<Query<DeleteParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::bad_request(format!("invalid query: {e}")))?;
    if node.instance(&id).is_err() {
        if let Some(api) = node.remote_api(&id) {
            let mut query = Vec::new();
            if let Some(mode) = &params.mode {
                query.push(format!("mode={mode}"));
            }
            if let Some(t) = params.timeout_ms {
                query.push(format!("timeout_ms={t}"));
            }
            let path = format!("/instance/{id}?{}", query.join("&"));
            return proxy(&api, "DELETE", &path, None).await;
        }
    }
    let mode = match params.mode.as_deref() {
        None | Some("drain") => ShutdownMode::Drain,
        Some("cancel") => ShutdownMode::Cancel,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "mode must be drain or cancel, got {other:?}"
            )))
        }
    };
    let report = node
        .delete_instance(&id, mode, params.timeout_ms.map(Duration::from_millis))
        .await?;
    Ok(Json(report).into_response())
}

/// `/v1/models`: every ready instance under its model's name and under its
/// id (a request's `model` may be either), this node's and, in a cluster,
/// those other nodes coordinate. A name served twice is listed once.
fn model_entries(node: &Node) -> Vec<serde_json::Value> {
    let mut entries: Vec<serde_json::Value> = Vec::new();
    let mut push = |id: &str, instance: &str, name: &str, context: Option<u32>| {
        if entries.iter().any(|e| e["id"] == id) {
            return;
        }
        entries.push(serde_json::json!({
            "id": id,
            "object": "model",
            "created": 0,
            "owned_by": "shardvisor",
            "root": name,
            "instance_id": instance,
            "max_model_len": context,
        }));
    };
    let mut ready: Vec<_> = node
        .state()
        .instances
        .into_iter()
        .filter(|i| i.state == supervisor::instance::InstanceState::Ready)
        .collect();
    ready.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
    for i in &ready {
        push(
            &i.model_name,
            &i.instance_id,
            &i.model_name,
            i.context_length,
        );
        push(
            &i.instance_id,
            &i.instance_id,
            &i.model_name,
            i.context_length,
        );
    }
    for b in node.remote_instances() {
        if b.state == "ready" {
            push(&b.model_name, &b.instance_id, &b.model_name, None);
            push(&b.instance_id, &b.instance_id, &b.model_name, None);
        }
    }
    entries
}

async fn models(State(node): State<Arc<Node>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({"object": "list", "data": model_entries(&node)}))
}

async fn model(State(node): State<Arc<Node>>, Param(id): Param) -> Result<Response, ApiError> {
    model_entries(&node)
        .into_iter()
        .find(|e| e["id"] == id.as_str())
        .map(|e| Json(e).into_response())
        .ok_or_else(|| {
            NodeError::ModelNotFound(format!(
                "the model {id:?} does not exist: GET /v1/models lists the models served"
            ))
            .into()
        })
}

async fn cancel(
    State(node): State<Arc<Node>>,
    Param(task_id): Param,
) -> Result<Response, ApiError> {
    let not_found = || NodeError::NotFound(format!("no task {task_id:?} in flight on this node"));
    let Some(handle) = node.instance_of_task(&task_id) else {
        let instance = task_id.rsplit_once("-t").map(|(i, _)| i).unwrap_or("");
        return match node.remote_api(instance) {
            Some(api) => proxy(&api, "POST", &format!("/v1/cancel/{task_id}"), None).await,
            None => Err(not_found().into()),
        };
    };
    if !handle.cancel(&task_id).await {
        return Err(not_found().into());
    }
    Ok(Json(serde_json::json!({"task_id": task_id, "cancelled": true})).into_response())
}

/// Resolves the request's model here, or forwards the raw request to the
/// node that coordinates it; `Ok(Err(response))` is the forwarded answer.
async fn resolve_or_proxy(
    node: &Node,
    model: &str,
    path: &str,
    body: &Bytes,
) -> Result<Result<(supervisor::instance::InstanceHandle, String), Response>, ApiError> {
    match node.resolve(model) {
        Ok(handle) => {
            let name = handle.view().model_name;
            Ok(Ok((handle, name)))
        }
        Err(NodeError::ModelNotFound(e)) => match node.remote_api(model) {
            Some(api) => {
                let body = String::from_utf8_lossy(body).into_owned();
                Ok(Err(proxy(&api, "POST", path, Some(body)).await?))
            }
            None => Err(NodeError::ModelNotFound(e).into()),
        },
        Err(e) => Err(e.into()),
    }
}

/// `POST /v1/chat/completions` and `POST /v1/completions`: checks the
/// request into a plan, then serves it here or forwards it to the node that
/// coordinates its model.
async fn openai_endpoint<R: OpenAiRequest>(
    node: &Node,
    body: Bytes,
    kind: Kind,
    path: &str,
) -> Result<Response, ApiError> {
    let req: R = parse_json(&body, R::WHAT)?;
    let plan = req.plan()?;
    let (handle, name) = match resolve_or_proxy(node, req.model(), path, &body).await? {
        Ok(found) => found,
        Err(forwarded) => return Ok(forwarded),
    };
    generate::respond(&handle, plan, name, kind).await
}

async fn chat(State(node): State<Arc<Node>>, Body(body): Body) -> Result<Response, ApiError> {
    openai_endpoint::<ChatRequest>(&node, body, Kind::Chat, "/v1/chat/completions").await
}

async fn completions(
    State(node): State<Arc<Node>>,
    Body(body): Body,
) -> Result<Response, ApiError> {
    openai_endpoint::<CompletionRequest>(&node, body, Kind::Completion, "/v1/completions").await
}
