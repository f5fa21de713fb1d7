//! Scripted faults: a named failure injected at a named phase, so tests can
//! drive a runner through every phase × fault combination with real
//! processes and real signals.

use ipc::proto::Phase;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultSpec {
    /// Rank of the runner that misbehaves.
    pub runner: u32,
    /// Where it misbehaves; every phase but `spawning` (the runner is not
    /// listening yet) can be chosen.
    pub phase: Phase,
    #[serde(flatten)]
    pub kind: FaultKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FaultKind {
    /// `panic!` on the runner's main thread (exit code 101).
    Panic,
    /// `exit(code)`.
    Exit {
        #[serde(default = "default_exit_code")]
        code: i32,
    },
    /// `abort()`: SIGABRT.
    Abort,
    /// SIGKILL to itself.
    Kill,
    /// The main loop blocks: no pong, no progress.
    Hang,
    /// Ignores SIGTERM and stops making progress while still answering pings,
    /// so only a deadline and SIGKILL end it.
    IgnoreSigterm,
    /// Writes a malformed frame straight onto the node channel.
    Garbage,
    /// Writes a frame header announcing 1 GiB onto the node channel.
    OversizeFrame,
    /// Shutdown's drain waits `delay_ms` before it starts, still answering pings.
    SlowDrain {
        #[serde(default = "default_slow_drain_ms")]
        delay_ms: u64,
    },
}

impl FaultKind {
    pub fn name(&self) -> &'static str {
        match self {
            FaultKind::Panic => "panic",
            FaultKind::Exit { .. } => "exit",
            FaultKind::Abort => "abort",
            FaultKind::Kill => "kill",
            FaultKind::Hang => "hang",
            FaultKind::IgnoreSigterm => "ignore_sigterm",
            FaultKind::Garbage => "garbage",
            FaultKind::OversizeFrame => "oversize_frame",
            FaultKind::SlowDrain { .. } => "slow_drain",
        }
    }
}

fn default_exit_code() -> i32 {
    3
}

fn default_slow_drain_ms() -> u64 {
    60_000
}
