//! Wire messages between a node and its runners: the one place that defines
//! them. Data-lane messages are [`ToRunner`] and [`FromRunner`]; the control
//! lane carries [`crate::Control`] (ping, pong, cancel, shutdown).
//!
//! Every message about a task carries its `task_id`; the runner's identity
//! (instance, runner, rank) is fixed per channel and carried by the
//! channel's name and the runner's log context, so logs of both processes
//! join on instance, runner and task ids.

use serde::{Deserialize, Serialize};

// Wire enums are externally tagged: postcard cannot decode internally
// tagged (`#[serde(tag = ..)]`) enums, which need `deserialize_any`.

/// Node → runner, in order on the data lane.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToRunner {
    /// `Idle → Connecting → Connected`: set up links to peer runners, whose
    /// data-plane addresses are given by rank, within `deadline_ms`.
    Connect {
        peers: Vec<String>,
        deadline_ms: u64,
    },
    /// `Connected → Loading{..} → Loaded`.
    Load,
    /// `Loaded → WarmingUp → Ready`.
    WarmUp,
    /// Admitted only in `Ready`/`Running`.
    Task(TaskRequest),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRequest {
    pub task_id: String,
    /// Joins log lines of every process that touches the task.
    pub trace_id: String,
    /// The conversation, rendered by the model's chat template on the runner.
    pub messages: Vec<ChatTurn>,
    pub max_tokens: u32,
    pub sampling: Sampling,
    /// Generation stops before any of these strings.
    pub stop: Vec<String>,
}

impl TaskRequest {
    /// A task of one user message with greedy decoding.
    pub fn user(task_id: &str, trace_id: &str, text: &str, max_tokens: u32) -> TaskRequest {
        TaskRequest {
            task_id: task_id.into(),
            trace_id: trace_id.into(),
            messages: vec![ChatTurn {
                role: "user".into(),
                content: text.into(),
            }],
            max_tokens,
            sampling: Sampling::default(),
            stop: Vec::new(),
        }
    }

    /// The last user message (the whole prompt for engines without a chat
    /// template).
    pub fn last_user_text(&self) -> &str {
        self.messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .or(self.messages.last())
            .map(|m| m.content.as_str())
            .unwrap_or("")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatTurn {
    pub role: String,
    pub content: String,
}

/// Decoding parameters; `temperature` 0 is greedy (deterministic).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    pub temperature: f32,
    pub top_p: f32,
    /// 0 = no top-k cut.
    pub top_k: u32,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
        }
    }
}

/// Runner → node, in order on the data lane.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FromRunner {
    /// First message: where this runner accepts data-plane links, if its
    /// engine uses any.
    Hello {
        data_addr: Option<String>,
    },
    Status(RunnerState),
    Token {
        task_id: String,
        index: u32,
        text: String,
    },
    TaskDone {
        task_id: String,
        outcome: TaskOutcome,
    },
    /// A message that does not fit the current state, answered instead of
    /// acted on.
    Rejected {
        request: String,
        reason: String,
    },
    /// What the runner released while closing, in the order it did.
    Released(Vec<ReleasedResource>),
}

/// One resource a runner released on its way out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReleasedResource {
    pub name: String,
    pub duration_ms: f64,
    /// `None` when the release succeeded.
    pub error: Option<String>,
}

/// The runner state machine of DESIGN §3.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunnerState {
    Idle,
    Connecting,
    Connected,
    Loading { done: u32, total: u32 },
    Loaded,
    WarmingUp,
    Ready,
    Running { tasks: u32 },
    ShuttingDown,
    Shutdown,
    Failed { phase: Phase, cause: String },
}

/// The phase a runner is in, used to name where a failure happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Spawning,
    Connecting,
    Loading,
    WarmingUp,
    Ready,
    Running,
    ShuttingDown,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Spawning => "spawning",
            Phase::Connecting => "connecting",
            Phase::Loading => "loading",
            Phase::WarmingUp => "warming_up",
            Phase::Ready => "ready",
            Phase::Running => "running",
            Phase::ShuttingDown => "shutting_down",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl RunnerState {
    /// The phase this state belongs to.
    pub fn phase(&self) -> Phase {
        match self {
            RunnerState::Idle => Phase::Spawning,
            RunnerState::Connecting | RunnerState::Connected => Phase::Connecting,
            RunnerState::Loading { .. } | RunnerState::Loaded => Phase::Loading,
            RunnerState::WarmingUp => Phase::WarmingUp,
            RunnerState::Ready => Phase::Ready,
            RunnerState::Running { .. } => Phase::Running,
            RunnerState::ShuttingDown | RunnerState::Shutdown => Phase::ShuttingDown,
            RunnerState::Failed { phase, .. } => *phase,
        }
    }

    /// A short name, e.g. `loading` for `Loading { .. }`.
    pub fn name(&self) -> &'static str {
        match self {
            RunnerState::Idle => "idle",
            RunnerState::Connecting => "connecting",
            RunnerState::Connected => "connected",
            RunnerState::Loading { .. } => "loading",
            RunnerState::Loaded => "loaded",
            RunnerState::WarmingUp => "warming_up",
            RunnerState::Ready => "ready",
            RunnerState::Running { .. } => "running",
            RunnerState::ShuttingDown => "shutting_down",
            RunnerState::Shutdown => "shutdown",
            RunnerState::Failed { .. } => "failed",
        }
    }
}

/// How a task ended. Every accepted task gets exactly one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskOutcome {
    Completed {
        prompt_tokens: u32,
        completion_tokens: u32,
        finish_reason: String,
    },
    Cancelled {
        reason: String,
    },
    Failed {
        cause: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{decode, encode_data, Frame};

    /// Every wire type survives the real codec (postcard rejects some serde
    /// shapes only when decoding).
    #[test]
    fn every_message_round_trips_through_the_codec() {
        let states = [
            RunnerState::Idle,
            RunnerState::Loading { done: 1, total: 4 },
            RunnerState::Running { tasks: 2 },
            RunnerState::Failed {
                phase: Phase::Loading,
                cause: "x".into(),
            },
        ];
        let mut msgs: Vec<FromRunner> = states.into_iter().map(FromRunner::Status).collect();
        msgs.push(FromRunner::Hello {
            data_addr: Some("127.0.0.1:9".into()),
        });
        msgs.push(FromRunner::Token {
            task_id: "t".into(),
            index: 3,
            text: "hi ".into(),
        });
        for outcome in [
            TaskOutcome::Completed {
                prompt_tokens: 1,
                completion_tokens: 2,
                finish_reason: "stop".into(),
            },
            TaskOutcome::Cancelled { reason: "r".into() },
            TaskOutcome::Failed { cause: "c".into() },
        ] {
            msgs.push(FromRunner::TaskDone {
                task_id: "t".into(),
                outcome,
            });
        }
        msgs.push(FromRunner::Rejected {
            request: "load".into(),
            reason: "r".into(),
        });
        msgs.push(FromRunner::Released(vec![ReleasedResource {
            name: "engine".into(),
            duration_ms: 0.5,
            error: Some("x".into()),
        }]));
        for msg in msgs {
            let bytes = encode_data(&msg, 1 << 20).unwrap();
            let (frame, _) = decode::<FromRunner>(&bytes, 1 << 20).unwrap().unwrap();
            assert_eq!(frame, Frame::Data(msg));
        }
        let to = [
            ToRunner::Connect {
                peers: vec!["a".into()],
                deadline_ms: 5,
            },
            ToRunner::Load,
            ToRunner::WarmUp,
            ToRunner::Task(TaskRequest::user("t", "x", "p", 4)),
        ];
        for msg in to {
            let bytes = encode_data(&msg, 1 << 20).unwrap();
            let (frame, _) = decode::<ToRunner>(&bytes, 1 << 20).unwrap().unwrap();
            assert_eq!(frame, Frame::Data(msg));
        }
    }
}
