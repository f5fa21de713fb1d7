//! Runners hosted by another node.
//!
//! An instance actor drives every rank through a [`Link`]: a local
//! [`RunnerHandle`] or a [`RemoteRunner`]. A remote runner is a runner
//! process on another node, owned there by that node's own watcher (process,
//! heartbeat, parent death signal); the coordinating node sees the same
//! [`RunnerEvent`]s as for a local one, relayed over the cluster, and its
//! operations ([`RemoteOp`]) travel the other way in the order it issued
//! them. The transport lives with the node (it implements
//! [`RemoteSpawner`]); this module only fixes the contract:
//!
//! * the events of one remote runner arrive in the order its watcher emitted
//!   them and end with exactly one `Exited`, the real one or, when its node
//!   is lost, one with [`ExitCause::NodeLost`] — never both;
//! * operations are applied on the hosting node in the order they were sent;
//!   once the link is gone they fail as `Closed`, like a local channel.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipc::proto::{FromRunner, ToRunner};
use ipc::{ChannelStats, Control};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::process::{ExitCause, StopOutcome};
use crate::runner_handle::{
    ChannelEnd, Heartbeat, RunnerEvent, RunnerHandle, RunnerSpec, SendFailure,
};

/// An operation on a remote runner, applied by its hosting node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RemoteOp {
    Send(ToRunner),
    Control(Control),
    Close(String),
    Terminate { term_first: bool, grace_ms: u64 },
}

/// [`ExitCause`] on the wire (its own serde form is its display string).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireExit {
    Code(i32),
    Signal(i32),
    Unknown,
    NodeLost,
}

impl From<ExitCause> for WireExit {
    fn from(c: ExitCause) -> Self {
        match c {
            ExitCause::Code(v) => WireExit::Code(v),
            ExitCause::Signal(v) => WireExit::Signal(v),
            ExitCause::Unknown => WireExit::Unknown,
            ExitCause::NodeLost => WireExit::NodeLost,
        }
    }
}

impl From<WireExit> for ExitCause {
    fn from(c: WireExit) -> Self {
        match c {
            WireExit::Code(v) => ExitCause::Code(v),
            WireExit::Signal(v) => ExitCause::Signal(v),
            WireExit::Unknown => ExitCause::Unknown,
            WireExit::NodeLost => ExitCause::NodeLost,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireStop {
    pub exit: WireExit,
    pub sent_sigterm: bool,
    pub sent_sigkill: bool,
    pub waited_ms: f64,
}

/// [`RunnerEvent`] on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WireEvent {
    Message(FromRunner),
    Ended {
        reason: String,
    },
    Hung {
        silent_ms: u64,
    },
    Exited {
        cause: WireExit,
        channel: WireChannelEnd,
        stop: Option<WireStop>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireChannelEnd {
    End,
    PeerLost { detail: String, eof: bool },
    Open,
}

impl From<RunnerEvent> for WireEvent {
    fn from(e: RunnerEvent) -> Self {
        match e {
            RunnerEvent::Message(m) => WireEvent::Message(m),
            RunnerEvent::Ended { reason } => WireEvent::Ended { reason },
            RunnerEvent::Hung { silent_for } => WireEvent::Hung {
                silent_ms: silent_for.as_millis() as u64,
            },
            RunnerEvent::Exited {
                cause,
                channel,
                stop,
            } => WireEvent::Exited {
                cause: cause.into(),
                channel: match channel {
                    ChannelEnd::End => WireChannelEnd::End,
                    ChannelEnd::PeerLost { detail, eof } => {
                        WireChannelEnd::PeerLost { detail, eof }
                    }
                    ChannelEnd::Open => WireChannelEnd::Open,
                },
                stop: stop.map(|s| WireStop {
                    exit: s.exit.into(),
                    sent_sigterm: s.sent_sigterm,
                    sent_sigkill: s.sent_sigkill,
                    waited_ms: s.waited_ms,
                }),
            },
        }
    }
}

impl From<WireEvent> for RunnerEvent {
    fn from(e: WireEvent) -> Self {
        match e {
            WireEvent::Message(m) => RunnerEvent::Message(m),
            WireEvent::Ended { reason } => RunnerEvent::Ended { reason },
            WireEvent::Hung { silent_ms } => RunnerEvent::Hung {
                silent_for: Duration::from_millis(silent_ms),
            },
            WireEvent::Exited {
                cause,
                channel,
                stop,
            } => RunnerEvent::Exited {
                cause: cause.into(),
                channel: match channel {
                    WireChannelEnd::End => ChannelEnd::End,
                    WireChannelEnd::PeerLost { detail, eof } => {
                        ChannelEnd::PeerLost { detail, eof }
                    }
                    WireChannelEnd::Open => ChannelEnd::Open,
                },
                stop: stop.map(|s| StopOutcome {
                    exit: s.exit.into(),
                    sent_sigterm: s.sent_sigterm,
                    sent_sigkill: s.sent_sigkill,
                    waited_ms: s.waited_ms,
                }),
            },
        }
    }
}

impl WireEvent {
    pub fn is_exit(&self) -> bool {
        matches!(self, WireEvent::Exited { .. })
    }
}

/// [`RunnerSpec`] on the wire: everything but the program, which is the
/// hosting node's own binary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireSpec {
    pub instance_id: String,
    pub runner_id: String,
    pub rank: u32,
    pub world_size: u32,
    pub engine_config: String,
    pub ping_interval_ms: u64,
    pub ping_timeout_ms: u64,
    pub extra_env: Vec<(String, String)>,
}

impl WireSpec {
    pub fn of(spec: &RunnerSpec) -> WireSpec {
        WireSpec {
            instance_id: spec.instance_id.clone(),
            runner_id: spec.runner_id.clone(),
            rank: spec.rank,
            world_size: spec.world_size,
            engine_config: spec.engine_config.clone(),
            ping_interval_ms: spec.heartbeat.interval.as_millis() as u64,
            ping_timeout_ms: spec.heartbeat.timeout.as_millis() as u64,
            extra_env: spec.extra_env.clone(),
        }
    }

    pub fn into_spec(self, program: std::path::PathBuf) -> RunnerSpec {
        RunnerSpec {
            instance_id: self.instance_id,
            runner_id: self.runner_id,
            rank: self.rank,
            world_size: self.world_size,
            engine_config: self.engine_config,
            program,
            heartbeat: Heartbeat {
                interval: Duration::from_millis(self.ping_interval_ms),
                timeout: Duration::from_millis(self.ping_timeout_ms),
            },
            extra_env: self.extra_env,
        }
    }
}

/// What the hosting node last reported about a remote runner.
#[derive(Debug, Default)]
pub struct RemoteShared {
    stats: Mutex<Option<ChannelStats>>,
    stderr: Mutex<Vec<String>>,
}

impl RemoteShared {
    pub fn update(&self, stats: ChannelStats, stderr_tail: Vec<String>) {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner()) = Some(stats);
        if !stderr_tail.is_empty() {
            *self.stderr.lock().unwrap_or_else(|p| p.into_inner()) = stderr_tail;
        }
    }
}

/// The coordinating node's side of a runner hosted by another node.
pub struct RemoteRunner {
    pub node: String,
    pub pid: u32,
    ops: mpsc::Sender<RemoteOp>,
    shared: Arc<RemoteShared>,
    send_timeout: Duration,
}

impl RemoteRunner {
    /// `ops` is consumed by the transport, which applies each operation on
    /// `node` in order and drops its receiver when the link is gone.
    pub fn new(
        node: String,
        pid: u32,
        ops: mpsc::Sender<RemoteOp>,
        shared: Arc<RemoteShared>,
        send_timeout: Duration,
    ) -> RemoteRunner {
        RemoteRunner {
            node,
            pid,
            ops,
            shared,
            send_timeout,
        }
    }

    async fn push(&self, op: RemoteOp) -> Result<(), SendFailure> {
        match tokio::time::timeout(self.send_timeout, self.ops.send(op)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(SendFailure::Closed(format!(
                "the link to node {} is gone",
                self.node
            ))),
            Err(_) => Err(SendFailure::Stuck(self.send_timeout)),
        }
    }
}

/// Starts runners on other nodes (implemented by the node's cluster layer).
pub trait RemoteSpawner: Send + Sync + 'static {
    /// Starts `spec` on `node`; its events arrive on `events` tagged with
    /// its rank, like a local runner's. The error says why it could not be
    /// started (the node is gone, refused, did not answer in time).
    fn spawn(
        &self,
        node: String,
        spec: RunnerSpec,
        events: mpsc::Sender<(u32, RunnerEvent)>,
        timeout: Duration,
    ) -> Pin<Box<dyn Future<Output = Result<RemoteRunner, String>> + Send>>;
}

/// One rank of an instance, local or remote.
pub enum Link {
    Local(RunnerHandle),
    Remote(RemoteRunner),
}

impl Link {
    pub fn pid(&self) -> u32 {
        match self {
            Link::Local(h) => h.pid,
            Link::Remote(r) => r.pid,
        }
    }

    /// The hosting node, for a remote runner.
    pub fn node(&self) -> Option<&str> {
        match self {
            Link::Local(_) => None,
            Link::Remote(r) => Some(&r.node),
        }
    }

    pub async fn send(&self, msg: ToRunner) -> Result<(), SendFailure> {
        match self {
            Link::Local(h) => h.send(msg).await,
            Link::Remote(r) => r.push(RemoteOp::Send(msg)).await,
        }
    }

    pub async fn control(&self, control: Control) -> bool {
        match self {
            Link::Local(h) => h.control(control).await,
            Link::Remote(r) => r.push(RemoteOp::Control(control)).await.is_ok(),
        }
    }

    pub async fn close(&self, reason: &str) {
        match self {
            Link::Local(h) => h.close(reason).await,
            Link::Remote(r) => {
                let _ = r.push(RemoteOp::Close(reason.to_string())).await;
            }
        }
    }

    pub fn request_terminate(&self, term_first: bool, grace: Duration) {
        match self {
            Link::Local(h) => h.request_terminate(term_first, grace),
            Link::Remote(r) => {
                let op = RemoteOp::Terminate {
                    term_first,
                    grace_ms: grace.as_millis() as u64,
                };
                if let Err(mpsc::error::TrySendError::Full(op)) = r.ops.try_send(op) {
                    let ops = r.ops.clone();
                    tokio::spawn(async move {
                        let _ = ops.send(op).await;
                    });
                }
            }
        }
    }

    pub fn stderr_tail(&self, n: usize) -> Vec<String> {
        match self {
            Link::Local(h) => h.stderr_tail(n),
            Link::Remote(r) => {
                let tail = r.shared.stderr.lock().unwrap_or_else(|p| p.into_inner());
                tail[tail.len().saturating_sub(n)..].to_vec()
            }
        }
    }

    pub fn channel_stats(&self) -> Option<ChannelStats> {
        match self {
            Link::Local(h) => Some(h.channel_stats()),
            Link::Remote(r) => r
                .shared
                .stats
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipc::proto::RunnerState;

    #[test]
    fn events_survive_the_wire() {
        let events = vec![
            RunnerEvent::Message(FromRunner::Status(RunnerState::Ready)),
            RunnerEvent::Ended {
                reason: "shutdown".into(),
            },
            RunnerEvent::Hung {
                silent_for: Duration::from_millis(3000),
            },
            RunnerEvent::Exited {
                cause: ExitCause::Signal(9),
                channel: ChannelEnd::PeerLost {
                    detail: "eof".into(),
                    eof: true,
                },
                stop: Some(StopOutcome {
                    exit: ExitCause::Signal(9),
                    sent_sigterm: true,
                    sent_sigkill: true,
                    waited_ms: 12.5,
                }),
            },
        ];
        for event in events {
            let before = format!("{event:?}");
            let wire = WireEvent::from(event);
            let bytes = json_roundtrip(&wire);
            let back = RunnerEvent::from(bytes);
            assert_eq!(format!("{back:?}"), before);
        }
    }

    fn json_roundtrip(e: &WireEvent) -> WireEvent {
        let json = serde_json::to_string(e).unwrap();
        serde_json::from_str(&json).unwrap()
    }
}
