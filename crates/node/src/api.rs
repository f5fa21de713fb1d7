//! The HTTP API (OpenAI-compatible chat plus instance management). Handlers
//! only translate between HTTP and [`Node`] operations; every error leaves
//! in OpenAI's error shape with a message that says what was wrong.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream};
use ipc::proto::{ChatTurn, Sampling, TaskOutcome};
use ipc::ShutdownMode;
use serde::Deserialize;
use supervisor::instance::{SubmitError, TaskEvent, TaskStream, TaskSubmit};

use crate::node::{CreateInstance, Node, NodeError};
use crate::openai::{self, ChatRequest, ErrorBody, Usage};

/// Default completion length when the request names none.
const DEFAULT_MAX_TOKENS: u32 = 64;
/// Largest completion a request may ask for.
const MAX_TOKENS_LIMIT: u32 = 32_768;

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
        .route("/v1/chat/completions", post(chat))
        .route("/v1/cancel/{task_id}", post(cancel))
        .fallback(not_found)
        .with_state(node)
}

/// An API error: a status and an OpenAI-shaped body.
pub struct ApiError(StatusCode, ErrorBody);

impl ApiError {
    fn bad_request(message: impl Into<String>) -> Self {
        ApiError(
            StatusCode::BAD_REQUEST,
            ErrorBody::new("invalid_request_error", message),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> Self {
        let (status, kind) = match &e {
            NodeError::BadRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request_error"),
            NodeError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found_error"),
            NodeError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable_error"),
        };
        ApiError(status, ErrorBody::new(kind, e.to_string()))
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorBody::new("unavailable_error", e.to_string()),
        )
    }
}

/// Parses a JSON body with an error that names the problem and its place.
fn parse_json<T: serde::de::DeserializeOwned>(body: &Bytes, what: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "invalid {what} body: {e} (line {}, column {})",
            e.line(),
            e.column()
        ))
    })
}

async fn not_found() -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        ErrorBody::new("not_found_error", "no such endpoint"),
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
async fn stall(body: Bytes) -> Result<Response, ApiError> {
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

async fn create_instance(State(node): State<Arc<Node>>, body: Bytes) -> Result<Response, ApiError> {
    let req: CreateInstance = parse_json(&body, "POST /instance")?;
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
                        let body =
                            serde_json::to_string(&ErrorBody::new("unavailable_error", message))
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
                "unavailable_error",
                format!("the coordinating node at {api} did not answer: {e:#}"),
            ),
        )),
    }
}

async fn get_instance(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
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
    Path(id): Path<String>,
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

async fn models(State(node): State<Arc<Node>>) -> Json<serde_json::Value> {
    let data: Vec<_> = node
        .state()
        .instances
        .iter()
        .map(|i| serde_json::json!({"id": i.instance_id, "object": "model", "owned_by": i.model, "state": i.state.name()}))
        .collect();
    Json(serde_json::json!({"object": "list", "data": data}))
}

async fn cancel(
    State(node): State<Arc<Node>>,
    Path(task_id): Path<String>,
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

fn sampling_of(req: &ChatRequest) -> Result<Sampling, ApiError> {
    let temperature = req.temperature.unwrap_or(0.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad_request(format!(
            "temperature must be between 0 and 2, got {temperature}"
        )));
    }
    let top_p = req.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad_request(format!(
            "top_p must be in (0, 1], got {top_p}"
        )));
    }
    Ok(Sampling {
        temperature: temperature as f32,
        top_p: top_p as f32,
        top_k: req.top_k.unwrap_or(0),
        seed: req.seed.unwrap_or_else(|| fastrand::u64(..)),
    })
}

/// OpenAI's `stop`: a string or up to 4 strings.
fn stop_strings(stop: Option<&serde_json::Value>) -> Result<Vec<String>, ApiError> {
    let bad = || ApiError::bad_request("stop must be a string or an array of at most 4 strings");
    match stop {
        None | Some(serde_json::Value::Null) => Ok(Vec::new()),
        Some(serde_json::Value::String(s)) => Ok(vec![s.clone()]),
        Some(serde_json::Value::Array(items)) if items.len() <= 4 => items
            .iter()
            .map(|v| v.as_str().map(String::from).ok_or_else(bad))
            .collect(),
        Some(_) => Err(bad()),
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn chat(State(node): State<Arc<Node>>, body: Bytes) -> Result<Response, ApiError> {
    let req: ChatRequest = parse_json(&body, "chat completion")?;
    if req.messages.is_empty() {
        return Err(ApiError::bad_request(
            "messages must hold at least one message",
        ));
    }
    let max_tokens = req
        .max_completion_tokens
        .or(req.max_tokens)
        .unwrap_or(DEFAULT_MAX_TOKENS);
    if max_tokens == 0 || max_tokens > MAX_TOKENS_LIMIT {
        return Err(ApiError::bad_request(format!(
            "max_tokens must be between 1 and {MAX_TOKENS_LIMIT}, got {max_tokens}"
        )));
    }
    let handle = match node.resolve(&req.model) {
        Ok(handle) => handle,
        Err(NodeError::NotFound(e)) => {
            return match node.remote_api(&req.model) {
                Some(api) => {
                    let body = String::from_utf8_lossy(&body).into_owned();
                    proxy(&api, "POST", "/v1/chat/completions", Some(body)).await
                }
                None => Err(NodeError::NotFound(e).into()),
            }
        }
        Err(e) => return Err(e.into()),
    };
    let sampling = sampling_of(&req)?;
    let stop = stop_strings(req.stop.as_ref())?;
    let messages = req
        .messages
        .iter()
        .map(|m| ChatTurn {
            role: m.role.clone(),
            content: m.content.clone(),
        })
        .collect();
    let trace_id = format!("{:016x}", fastrand::u64(..));
    let task = handle
        .submit(TaskSubmit {
            messages,
            max_tokens,
            sampling,
            stop,
            trace_id,
        })
        .await?;
    let model = handle.instance_id.clone();
    if req.stream {
        Ok(stream_response(task, model).into_response())
    } else {
        collect_response(task, model).await
    }
}

async fn collect_response(mut task: TaskStream, model: String) -> Result<Response, ApiError> {
    let mut text = String::new();
    while let Some(event) = task.next().await {
        match event {
            TaskEvent::Token(t) => text.push_str(&t),
            TaskEvent::Done(outcome) => {
                let (finish, usage) = match outcome {
                    TaskOutcome::Completed {
                        prompt_tokens,
                        completion_tokens,
                        finish_reason,
                    } => (
                        finish_reason,
                        Usage {
                            prompt_tokens,
                            completion_tokens,
                            total_tokens: prompt_tokens + completion_tokens,
                        },
                    ),
                    TaskOutcome::Cancelled { .. } => (
                        "cancelled".to_string(),
                        Usage {
                            prompt_tokens: 0,
                            completion_tokens: 0,
                            total_tokens: 0,
                        },
                    ),
                    TaskOutcome::Failed { cause } => {
                        return Err(ApiError(
                            StatusCode::BAD_GATEWAY,
                            ErrorBody::new("runner_error", cause),
                        ))
                    }
                };
                let id = format!("chatcmpl-{}", task.task_id);
                let body = openai::completion_json(&id, &model, now_unix(), &text, &finish, usage);
                return Ok(Json(body).into_response());
            }
        }
    }
    Err(ApiError(
        StatusCode::BAD_GATEWAY,
        ErrorBody::new("runner_error", "task ended without an outcome"),
    ))
}

enum StreamState {
    Start(TaskStream),
    Streaming(TaskStream),
    Finished,
}

fn stream_response(
    task: TaskStream,
    model: String,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let created = now_unix();
    let id = format!("chatcmpl-{}", task.task_id);
    let events = stream::unfold(StreamState::Start(task), move |state| {
        let id = id.clone();
        let model = model.clone();
        async move {
            let data = |v: serde_json::Value| Event::default().data(v.to_string());
            match state {
                StreamState::Start(task) => {
                    let role = serde_json::json!({"role": "assistant", "content": ""});
                    let first = data(openai::chunk_json(&id, &model, created, role, None, None));
                    Some((vec![first], StreamState::Streaming(task)))
                }
                StreamState::Streaming(mut task) => match task.next().await {
                    Some(TaskEvent::Token(text)) => {
                        let delta = serde_json::json!({"content": text});
                        let chunk =
                            data(openai::chunk_json(&id, &model, created, delta, None, None));
                        Some((vec![chunk], StreamState::Streaming(task)))
                    }
                    Some(TaskEvent::Done(outcome)) => {
                        let events = match outcome {
                            TaskOutcome::Completed {
                                prompt_tokens,
                                completion_tokens,
                                finish_reason,
                            } => {
                                let usage = Usage {
                                    prompt_tokens,
                                    completion_tokens,
                                    total_tokens: prompt_tokens + completion_tokens,
                                };
                                let end = openai::chunk_json(
                                    &id,
                                    &model,
                                    created,
                                    serde_json::json!({}),
                                    Some(&finish_reason),
                                    Some(usage),
                                );
                                vec![data(end), Event::default().data("[DONE]")]
                            }
                            TaskOutcome::Cancelled { .. } => {
                                let end = openai::chunk_json(
                                    &id,
                                    &model,
                                    created,
                                    serde_json::json!({}),
                                    Some("cancelled"),
                                    None,
                                );
                                vec![data(end), Event::default().data("[DONE]")]
                            }
                            TaskOutcome::Failed { cause } => {
                                let body =
                                    serde_json::to_value(ErrorBody::new("runner_error", cause))
                                        .unwrap_or_default();
                                vec![data(body)]
                            }
                        };
                        Some((events, StreamState::Finished))
                    }
                    None => {
                        let body = ErrorBody::new("runner_error", "task ended without an outcome");
                        Some((
                            vec![data(serde_json::to_value(body).unwrap_or_default())],
                            StreamState::Finished,
                        ))
                    }
                },
                StreamState::Finished => None,
            }
        }
    });
    let flat =
        futures_util::StreamExt::flat_map(events, |batch| stream::iter(batch.into_iter().map(Ok)));
    Sse::new(flat)
}
