//! Wire messages between a node and its runners: the one place that defines
//! them. Data-lane messages are [`ToRunner`] and [`FromRunner`]; the control
//! lane carries [`crate::Control`] (ping, pong, cancel, shutdown).
//!
//! Every message about a task carries its `task_id`; the runner's identity
//! (instance, runner, rank) is fixed per channel and carried by the
//! channel's name and the runner's log context, so logs of both processes
//! join on instance, runner and task ids.

use serde::{Deserialize, Serialize};

use crate::Blob;

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

/// How often at most a rank that reports no tokens says it is stepping
/// ([`FromRunner::Stepping`]): well inside any stall bound.
pub const STEPPING_EVERY_MS: u64 = 100;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRequest {
    pub task_id: String,
    /// Joins log lines of every process that touches the task.
    pub trace_id: String,
    /// What the model continues.
    pub input: TaskInput,
    /// Tokens to generate at most; 0 generates nothing (a text completion
    /// that only echoes its prompt). `None`: until the end of the turn,
    /// bounded by what the context leaves after the prompt.
    pub max_tokens: Option<u32>,
    pub sampling: Sampling,
    /// Generation stops before any of these strings.
    pub stop: Vec<String>,
    /// What the runner reports of the prompt before any token (a text
    /// completion's `echo`); `None`: nothing.
    pub report_prompt: Option<PromptReport>,
}

/// What a runner reports of a task's prompt, in one [`FromRunner::Prompt`]
/// sent before the task's first token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PromptReport {
    /// The prompt's tokens (sent before prefill).
    Tokens,
    /// The prompt's tokens, and each one's log-probability given those
    /// before it with the `n` most likely alternatives (sent once prefill
    /// has scored them all).
    Logprobs(u8),
}

/// The prompt of a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskInput {
    /// A conversation, rendered by the model's chat template on the runner.
    Chat {
        turns: Vec<ChatTurn>,
        /// Further template variables (OpenAI-compatible servers'
        /// `chat_template_kwargs`: `enable_thinking`, …) as the text of a
        /// JSON object; empty: none. Text, because the wire codec (postcard)
        /// cannot carry free-form JSON values.
        template_vars: String,
    },
    /// Raw text, tokenized as is (a text completion: no chat template).
    Text(String),
    /// Token ids, fed as they are.
    Tokens(Vec<u32>),
}

impl TaskInput {
    /// A conversation without further template variables.
    pub fn chat(turns: Vec<ChatTurn>) -> TaskInput {
        TaskInput::Chat {
            turns,
            template_vars: String::new(),
        }
    }
}

impl TaskRequest {
    /// A task of one user message with greedy decoding.
    pub fn user(task_id: &str, trace_id: &str, text: &str, max_tokens: u32) -> TaskRequest {
        TaskRequest {
            task_id: task_id.into(),
            trace_id: trace_id.into(),
            input: TaskInput::chat(vec![ChatTurn {
                role: "user".into(),
                content: text.into(),
            }]),
            max_tokens: Some(max_tokens),
            sampling: Sampling::default(),
            stop: Vec::new(),
            report_prompt: None,
        }
    }

    /// The last user message, or the text of a text completion (the whole
    /// prompt for engines without a chat template).
    pub fn last_user_text(&self) -> String {
        match &self.input {
            TaskInput::Chat {
                turns: messages, ..
            } => messages
                .iter()
                .rev()
                .find(|m| m.role == "user")
                .or(messages.last())
                .map(|m| m.content.clone())
                .unwrap_or_default(),
            TaskInput::Text(text) => text.clone(),
            TaskInput::Tokens(ids) => ids
                .iter()
                .map(|id| id.to_string())
                .collect::<Vec<_>>()
                .join(" "),
        }
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
    /// OpenAI's penalties, in `[-2, 2]`: a token's logit is lowered by
    /// `frequency_penalty × count + presence_penalty × (count > 0)`, where
    /// `count` is how often the task generated it so far.
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    /// Added to a token's logit before sampling (OpenAI's `logit_bias`).
    pub logit_bias: Vec<(u32, f32)>,
    /// Report each generated token's log-probability and the `n` most
    /// likely alternatives (`Some(0)`: the token's alone).
    pub logprobs: Option<u8>,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            logit_bias: Vec::new(),
            logprobs: None,
        }
    }
}

/// A generated token's log-probability under the model (log-softmax of its
/// logits, before temperature, penalties and bias), with its most likely
/// alternatives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    /// The token's bytes (a piece of UTF-8 text, or part of a character).
    pub bytes: Blob,
    pub logprob: f32,
    /// Most likely first, as many as asked.
    pub top: Vec<(Blob, f32)>,
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
    /// The runner took the task: its prompt is tokenized, fits the
    /// context, and prefill begins.
    TaskStarted {
        task_id: String,
        prompt_tokens: u32,
        /// Of them, the positions taken from a kept prefix instead of
        /// computed; `None` when the engine keeps no prefixes.
        cached_tokens: Option<u32>,
    },
    /// Rank 0 holds the task until the instance's KV budget has room for
    /// it beside the running ones (`runner::kv_budget`); `TaskStarted`
    /// follows when it starts, or `TaskDone` when it is cancelled first.
    TaskAwaitsRoom {
        task_id: String,
    },
    /// A chunk of the prompt was processed (long prompts are prefilled in
    /// chunks, each reported, so that a long prompt is never taken for a
    /// stall).
    TaskProgress {
        task_id: String,
        prompt_done: u32,
        prompt_total: u32,
    },
    /// A rank that takes part in tasks but reports no tokens (a scripted
    /// rank > 0) steps them: progress for the node's stall clock, at most
    /// every [`STEPPING_EVERY_MS`].
    Stepping {
        tasks: u32,
    },
    /// The task's prompt as [`TaskRequest::report_prompt`] asked, before
    /// its first token: every prompt token's bytes, and with
    /// [`PromptReport::Logprobs`] one entry per token after the first (the
    /// first has nothing before it to be scored on).
    Prompt {
        task_id: String,
        tokens: Vec<Blob>,
        logprobs: Vec<TokenLogprob>,
    },
    Token {
        task_id: String,
        index: u32,
        text: String,
        /// One per token the text covers, when the task asked for them.
        logprobs: Vec<TokenLogprob>,
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

/// The runner state machine (`runner::lifecycle`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunnerState {
    Idle,
    Connecting,
    Connected,
    Loading {
        done: u32,
        total: u32,
    },
    Loaded,
    WarmingUp,
    Ready,
    Running {
        tasks: u32,
    },
    ShuttingDown,
    Shutdown,
    /// `recurs`: the same start would fail the same way (the model file is
    /// missing, corrupt or unsupported, or the shard does not fit it), so
    /// restarting is pointless.
    Failed {
        phase: Phase,
        cause: String,
        recurs: bool,
        /// The cause is a broken data-plane link to a peer: usually the
        /// echo of that peer's own failure, which names the real cause.
        link: bool,
    },
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
        /// As [`RunnerState::Failed::link`]: a broken data-plane link.
        link: bool,
    },
    /// The request cannot be served as asked (the client's fault, not the
    /// runner's): nothing was generated.
    Invalid {
        code: InvalidTask,
        message: String,
    },
}

/// Why a task was cancelled, as runners and the node both say it.
pub const CANCELLED_BY_CLIENT: &str = "cancelled by the client";
pub const CANCELLED_BY_SHUTDOWN: &str = "instance shutting down (cancel mode)";

impl TaskOutcome {
    /// A failure of the runner itself (not a broken link).
    pub fn failed(cause: impl Into<String>) -> TaskOutcome {
        TaskOutcome::Failed {
            cause: cause.into(),
            link: false,
        }
    }
}

/// Why a task was refused, typed so the API can answer with the right
/// status and code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InvalidTask {
    /// Prompt plus `max_tokens` exceed the model's context.
    ContextLengthExceeded,
    /// The prompt is empty, holds token ids outside the vocabulary, or the
    /// chat template refused the conversation.
    InvalidPrompt,
    /// A chat request to a model without a chat template (a base model).
    NoChatTemplate,
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
                recurs: true,
                link: false,
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
            logprobs: vec![TokenLogprob {
                bytes: Blob(b"hi".to_vec()),
                logprob: -0.5,
                top: vec![(Blob(b"ho".to_vec()), -1.5)],
            }],
        });
        msgs.push(FromRunner::Prompt {
            task_id: "t".into(),
            tokens: vec![Blob(b"A".to_vec()), Blob(b" cat".to_vec())],
            logprobs: vec![TokenLogprob {
                bytes: Blob(b" cat".to_vec()),
                logprob: -3.0,
                top: vec![(Blob(b" dog".to_vec()), -1.0)],
            }],
        });
        msgs.push(FromRunner::TaskStarted {
            task_id: "t".into(),
            prompt_tokens: 7,
            cached_tokens: Some(4),
        });
        msgs.push(FromRunner::TaskAwaitsRoom {
            task_id: "t".into(),
        });
        msgs.push(FromRunner::Stepping { tasks: 3 });
        msgs.push(FromRunner::TaskProgress {
            task_id: "t".into(),
            prompt_done: 512,
            prompt_total: 900,
        });
        for outcome in [
            TaskOutcome::Completed {
                prompt_tokens: 1,
                completion_tokens: 2,
                finish_reason: "stop".into(),
            },
            TaskOutcome::Cancelled { reason: "r".into() },
            TaskOutcome::failed("c"),
            TaskOutcome::Failed {
                cause: "l".into(),
                link: true,
            },
            TaskOutcome::Invalid {
                code: InvalidTask::ContextLengthExceeded,
                message: "m".into(),
            },
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
            ToRunner::Task(TaskRequest {
                input: TaskInput::Tokens(vec![1, 2]),
                sampling: Sampling {
                    logit_bias: vec![(3, -100.0)],
                    logprobs: Some(2),
                    ..Sampling::default()
                },
                ..TaskRequest::user("t", "x", "p", 0)
            }),
            ToRunner::Task(TaskRequest {
                input: TaskInput::Text("once".into()),
                report_prompt: Some(PromptReport::Logprobs(5)),
                ..TaskRequest::user("t", "x", "p", 0)
            }),
            ToRunner::Task(TaskRequest {
                report_prompt: Some(PromptReport::Tokens),
                ..TaskRequest::user("t", "x", "p", 0)
            }),
        ];
        for msg in to {
            let bytes = encode_data(&msg, 1 << 20).unwrap();
            let (frame, _) = decode::<ToRunner>(&bytes, 1 << 20).unwrap().unwrap();
            assert_eq!(frame, Frame::Data(msg));
        }
    }
}
