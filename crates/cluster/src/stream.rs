//! Generic byte streams between nodes (publisher -> subscribers), for later relay use.
//!
//! # Why the subscriber forwards with `try_send` and ends the stream on overflow
//!
//! zenoh runs subscriber callbacks on its own RX threads (tokio workers of zenoh's runtime),
//! one RX task per link, and that task also carries every other message from the same peer
//! (liveliness, commands, other streams). So the callback must never wait for our consumer:
//! * `blocking_send` panics on a tokio worker thread, and even made to block (e.g. via
//!   `block_in_place`) it would stall the whole link behind one slow reader; with `Block`
//!   congestion control the *sender* then closes the link after 5 s (logging ERROR), and the
//!   peer looks dead to everybody.
//! * Dropping single messages when the queue is full would silently corrupt ordered streams.
//!
//! Hence: `try_send` into a bounded channel; when it is full the stream is **cut** (the
//! receiver drains what is buffered, then sees `None`), a WARN is logged, and the zenoh
//! subscriber is undeclared. A stream therefore never has gaps: it is complete or ends early.
//! When the receiver is dropped the subscriber is undeclared quietly (our callback ignores the
//! closed channel, so zenoh never logs a send error).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, Notify};
use tracing::{debug, warn};
use zenoh::pubsub::{Publisher, Subscriber};
use zenoh::sample::Sample;

use crate::ClusterError;

/// Default capacity of a [`crate::Cluster::subscribe`] channel, in messages.
pub const DEFAULT_STREAM_CAPACITY: usize = 4096;

/// Publishes byte messages on one key, reliably and in order (`CongestionControl::Block`).
///
/// Messages published while no subscriber is connected are lost (zenoh does not buffer):
/// use [`ClusterPublisher::wait_for_subscribers`] when that matters.
pub struct ClusterPublisher {
    pub(crate) key: String,
    pub(crate) publisher: Publisher<'static>,
}

impl std::fmt::Debug for ClusterPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterPublisher")
            .field("key", &self.key)
            .finish()
    }
}

impl ClusterPublisher {
    /// The key this publisher publishes on.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Sends one message. With `Block` congestion control this waits (blocking the current
    /// thread, zenoh's put is synchronous) while the link's TX queue is full; zenoh closes a link
    /// that stays stuck for 5 s.
    pub async fn send(&self, bytes: Vec<u8>) -> Result<(), ClusterError> {
        self.publisher
            .put(bytes)
            .await
            .map_err(|e| ClusterError::zenoh(format!("publish on {}", self.key), e))
    }

    /// Whether at least one subscriber (local or remote) currently matches the key.
    pub async fn has_subscribers(&self) -> Result<bool, ClusterError> {
        self.publisher
            .matching_status()
            .await
            .map(|s| s.matching())
            .map_err(|e| ClusterError::zenoh(format!("get matching status of {}", self.key), e))
    }

    /// Waits until a subscriber matches (polling every 20 ms); false if none did within `timeout`.
    pub async fn wait_for_subscribers(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.has_subscribers().await.unwrap_or(false) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

type Item = (String, Vec<u8>);

/// Shared between the zenoh callback and the watcher task of one subscription.
pub(crate) struct Forward {
    key_expr: String,
    capacity: usize,
    /// `None` once the stream is cut or the receiver is gone.
    tx: Mutex<Option<mpsc::Sender<Item>>>,
    /// Signalled when the callback gives up the sender.
    cut: Notify,
}

impl Forward {
    pub fn new(key_expr: &str, tx: mpsc::Sender<Item>, capacity: usize) -> Arc<Self> {
        Arc::new(Forward {
            key_expr: key_expr.to_owned(),
            capacity,
            tx: Mutex::new(Some(tx)),
            cut: Notify::new(),
        })
    }

    /// Called on zenoh's RX thread: never blocks beyond an uncontended mutex.
    pub fn push(&self, sample: Sample) {
        let mut guard = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        let Some(tx) = guard.as_ref() else { return };
        let item = (
            sample.key_expr().as_str().to_owned(),
            sample.payload().to_bytes().into_owned(),
        );
        match tx.try_send(item) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                warn!(
                    key_expr = %self.key_expr,
                    capacity = self.capacity,
                    "stream subscriber is not keeping up; ending the stream"
                );
                *guard = None;
                self.cut.notify_one();
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                debug!(key_expr = %self.key_expr, "stream receiver dropped");
                *guard = None;
                self.cut.notify_one();
            }
        }
    }
}

/// Owns the zenoh subscriber of one stream; undeclares it when the receiver is dropped, the
/// stream is cut, or the cluster shuts down, and then lets the channel close.
pub(crate) async fn watch_subscription(
    forward: Arc<Forward>,
    subscriber: Subscriber<()>,
    tx: mpsc::Sender<Item>,
    mut shutdown: watch::Receiver<bool>,
) {
    tokio::select! {
        _ = tx.closed() => {}
        _ = forward.cut.notified() => {}
        _ = shutdown.changed() => {}
    }
    drop(tx);
    forward.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Err(e) = subscriber.undeclare().await {
        debug!(key_expr = %forward.key_expr, error = %e, "undeclaring stream subscriber failed");
    }
}
