//! Commands: request/response between nodes over a zenoh queryable.
//!
//! Wire format (postcard), private to this crate:
//! * request payload: [`Envelope`] `{ version, from, deadline_ms, body }`;
//! * success: a reply whose payload is the handler's bytes;
//! * failure: an error reply whose payload is a [`Fault`].
//!
//! The serving side runs the handler in its own tokio task (never on zenoh's threads), and
//! cancels it shortly before the caller's deadline, answering [`Fault::Deadline`]. Answering
//! in time means the caller gets a clean `Timeout` and zenoh never sees a late reply (late
//! replies make zenoh log WARNs on both sides).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};
use zenoh::query::Query;

use crate::CommandError;

/// The boxed future a [`CommandHandler`] returns.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<Vec<u8>, String>> + Send>>;

/// Serves the commands sent to this node.
///
/// Each command runs in its own tokio task; the future is dropped (cancelled) if it is still
/// running shortly before the caller's timeout. `from` is the calling node's id when the caller
/// identified itself (always, for callers using this crate). `Err(message)` reaches the caller
/// as [`CommandError::Remote`]. A panic reaches the caller as `Remote` too.
///
/// Closures `Fn(Option<String>, Vec<u8>) -> impl Future<Output = Result<Vec<u8>, String>>`
/// implement this trait; see also [`typed_handler`].
pub trait CommandHandler: Send + Sync + 'static {
    /// Handles one command.
    fn handle(&self, from: Option<String>, request: Vec<u8>) -> HandlerFuture;
}

impl<F, Fut> CommandHandler for F
where
    F: Fn(Option<String>, Vec<u8>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<u8>, String>> + Send + 'static,
{
    fn handle(&self, from: Option<String>, request: Vec<u8>) -> HandlerFuture {
        Box::pin(self(from, request))
    }
}

/// Wraps a handler taking and returning postcard-encoded values; the counterpart of
/// [`crate::Cluster::command_typed`]. A request that does not decode is answered with an error.
pub fn typed_handler<Req, Resp, F, Fut>(f: F) -> impl CommandHandler
where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
    F: Fn(Option<String>, Req) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Resp, String>> + Send + 'static,
{
    let f = Arc::new(f);
    move |from: Option<String>, request: Vec<u8>| {
        let f = Arc::clone(&f);
        async move {
            let req: Req =
                postcard::from_bytes(&request).map_err(|e| format!("malformed request: {e}"))?;
            let resp = f(from, req).await?;
            postcard::to_stdvec(&resp).map_err(|e| format!("cannot encode response: {e}"))
        }
    }
}

const ENVELOPE_VERSION: u8 = 1;

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Envelope {
    pub version: u8,
    pub from: Option<String>,
    /// The caller's timeout in ms (0 = none); the server gives up a little before it.
    pub deadline_ms: u64,
    pub body: Vec<u8>,
}

impl Envelope {
    pub fn new(from: &str, timeout: Duration, body: Vec<u8>) -> Self {
        Envelope {
            version: ENVELOPE_VERSION,
            from: Some(from.to_owned()),
            deadline_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            body,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Fault {
    /// The handler returned `Err`.
    Handler(String),
    /// The handler did not finish before the caller's deadline.
    Deadline,
    /// The request could not be decoded.
    Malformed(String),
}

/// Time the server allows the handler: the caller's timeout minus a margin for the reply to
/// travel back (10%, at least 20 ms, at most 250 ms; half the timeout for tiny timeouts).
fn handler_budget(timeout: Duration) -> Duration {
    let margin = (timeout / 10).clamp(Duration::from_millis(20), Duration::from_millis(250));
    if margin >= timeout {
        timeout / 2
    } else {
        timeout - margin
    }
}

/// Answers one query. Runs as its own task on the cluster's runtime.
pub(crate) async fn serve(query: Query, handler: Arc<dyn CommandHandler>) {
    let payload = query
        .payload()
        .map(|p| p.to_bytes().into_owned())
        .unwrap_or_default();
    let outcome = run_handler(&payload, handler).await;
    let sent = match outcome {
        Ok(body) => query.reply(query.key_expr().clone(), body).await,
        Err(fault) => {
            debug!(?fault, key = %query.key_expr(), "command failed");
            match postcard::to_stdvec(&fault) {
                Ok(bytes) => query.reply_err(bytes).await,
                Err(e) => Err(e.to_string().into()),
            }
        }
    };
    if let Err(e) = sent {
        // The caller is gone or our session is closing: nothing to do.
        debug!(error = %e, key = %query.key_expr(), "could not send command reply");
    }
    // Dropping `query` sends the final response.
}

async fn run_handler(payload: &[u8], handler: Arc<dyn CommandHandler>) -> Result<Vec<u8>, Fault> {
    let env: Envelope = postcard::from_bytes(payload)
        .map_err(|e| Fault::Malformed(format!("malformed command envelope: {e}")))?;
    if env.version != ENVELOPE_VERSION {
        return Err(Fault::Malformed(format!(
            "unsupported command envelope version {} (expected {ENVELOPE_VERSION})",
            env.version
        )));
    }
    // A separate task, so a panicking handler is reported instead of silently dropping the query.
    let task = tokio::spawn(handler.handle(env.from, env.body));
    let abort = task.abort_handle();
    let joined = if env.deadline_ms == 0 {
        task.await
    } else {
        let budget = handler_budget(Duration::from_millis(env.deadline_ms));
        match tokio::time::timeout(budget, task).await {
            Ok(joined) => joined,
            Err(_) => {
                abort.abort();
                return Err(Fault::Deadline);
            }
        }
    };
    match joined {
        Ok(result) => result.map_err(Fault::Handler),
        Err(e) if e.is_panic() => {
            warn!("command handler panicked");
            Err(Fault::Handler("the command handler panicked".into()))
        }
        Err(e) => Err(Fault::Handler(format!(
            "the command handler was cancelled: {e}"
        ))),
    }
}

/// Turns an error reply into a [`CommandError`].
pub(crate) fn error_from_reply(
    node: &str,
    timeout: Duration,
    err: &zenoh::query::ReplyError,
) -> CommandError {
    let bytes = err.payload().to_bytes();
    match postcard::from_bytes::<Fault>(&bytes) {
        Ok(Fault::Handler(message)) => CommandError::Remote {
            node: node.to_owned(),
            message,
        },
        Ok(Fault::Deadline) => CommandError::Timeout {
            node: node.to_owned(),
            after: timeout,
        },
        Ok(Fault::Malformed(message)) => CommandError::Transport(format!(
            "node {node} could not decode our command: {message}"
        )),
        // zenoh's own deadline: a ZENOH_STRING "Timeout" reply.
        Err(_) if bytes.as_ref() == b"Timeout" => CommandError::Timeout {
            node: node.to_owned(),
            after: timeout,
        },
        Err(_) => CommandError::Transport(format!(
            "node {node} sent an unexpected error reply: {}",
            String::from_utf8_lossy(&bytes)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget() {
        assert_eq!(
            handler_budget(Duration::from_secs(1)),
            Duration::from_millis(900)
        );
        assert_eq!(
            handler_budget(Duration::from_secs(10)),
            Duration::from_millis(9750)
        );
        assert_eq!(
            handler_budget(Duration::from_millis(100)),
            Duration::from_millis(80)
        );
        assert_eq!(
            handler_budget(Duration::from_millis(10)),
            Duration::from_millis(5)
        );
    }

    #[test]
    fn timeout_text_is_not_a_fault() {
        assert!(postcard::from_bytes::<Fault>(b"Timeout").is_err());
    }
}
