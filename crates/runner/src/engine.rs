//! The engine interface a runner drives: load with progress, warm up,
//! generate token by token, and let go of a task at any step (cancel).
//!
//! An engine is synchronous and runs on the runner's engine thread: model
//! compute blocks, and must never block the loop that answers pings.
//! Cancellation needs no engine support: the engine thread checks a task's
//! cancel flag between steps, so a cancel takes effect within one step (a
//! token, or one chunk of a long prompt).
//!
//! Tasks step together in batches (`launch`, then `land`): sequences join
//! and leave at step boundaries, and an engine with several lanes keeps
//! that many batches in flight (pipelined micro-batches).

use ipc::proto::{InvalidTask, TaskRequest, TokenLogprob};
use ipc::Blob;

pub use ::engine::EngineError;

/// What one step produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// A piece of output text for the client (the rank that samples), and
    /// the log-probabilities of the tokens it covers when the task asked.
    Token {
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
    /// The prompt, as the task's `report_prompt` asked: every token's bytes
    /// and, when scored, one entry per token after the first. At most once
    /// per task, before its first `Token`.
    Prompt {
        tokens: Vec<Blob>,
        logprobs: Vec<TokenLogprob>,
    },
    /// A chunk of the prompt was prefilled: `done` of `total` tokens.
    Prefilled { done: u32, total: u32 },
    /// A step done with nothing to emit (text held back, e.g. a character
    /// split across tokens or a possible stop string).
    Progress,
    /// The task is complete.
    Finished {
        finish_reason: String,
        completion_tokens: u32,
    },
}

/// Why a task could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The request is the client's problem (typed for the API's answer).
    #[error("{1}")]
    Invalid(InvalidTask, String),
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The task fits the instance's KV budget, but not beside the tasks
    /// running now: it waits for their room (`crate::kv_budget`).
    #[error("no KV room now")]
    NoRoom,
}

pub trait Engine: Send + 'static {
    /// Per-task state (KV cache, sampler, position).
    type Task: Send;

    /// Where this engine accepts data-plane links from peer runners, if it
    /// uses any; sent to the node before `Idle`.
    fn data_addr(&self) -> Option<String> {
        None
    }
    /// Sets up links to peer runners (their addresses by rank) within
    /// `deadline`.
    fn connect(
        &mut self,
        peers: &[String],
        deadline: std::time::Duration,
    ) -> Result<(), EngineError>;
    /// Loads weights, calling `progress(done, total)` as it goes.
    fn load(&mut self, progress: &mut dyn FnMut(u32, u32)) -> Result<(), EngineError>;
    /// Runs a real forward pass so the first request is not the slow one.
    fn warm_up(&mut self) -> Result<(), EngineError>;
    /// Starts a task; returns its state and its prompt length in tokens.
    fn start(&mut self, request: &TaskRequest) -> Result<(Self::Task, u32), StartError>;
    /// One step of `task`: a chunk of its prompt, or one token.
    fn step(&mut self, task: &mut Self::Task) -> Result<Step, EngineError>;
    /// Prompt tokens a started task took from a kept prefix instead of
    /// computing them; `None` when the engine keeps no prefixes.
    fn cached_tokens(&self, _task: &Self::Task) -> Option<u32> {
        None
    }
    /// How many tasks one batched step takes at most (1: one task a step,
    /// round robin).
    fn max_batch(&self) -> usize {
        1
    }
    /// How many batches may be in flight at once: launched and not yet
    /// landed (a pipeline of S stages keeps S in flight so that every
    /// stage computes at once).
    fn lanes(&self) -> usize {
        1
    }
    /// Starts one step of every task in `batch` together; its results come
    /// from [`Engine::land`]. Batches land in the order they were launched,
    /// and a task is in at most one batch in flight. An error fails every
    /// task of the batch, and the batch is not landed.
    fn launch(&mut self, _batch: &mut [&mut Self::Task]) -> Result<(), EngineError> {
        Ok(())
    }
    /// Completes the oldest batch in flight (the same tasks, in the same
    /// order, as launched): one result per task. The default steps each
    /// task on its own.
    fn land(&mut self, batch: &mut [&mut Self::Task]) -> Vec<Result<Step, EngineError>> {
        batch.iter_mut().map(|task| self.step(task)).collect()
    }
    /// The task left (finished, cancelled or failed): release what peers
    /// hold for it.
    fn end_task(&mut self, _task: Self::Task) {}
    /// Closing: release peer links (front to back) before the engine is
    /// dropped. Called once, on the engine thread, with no task left.
    fn release(&mut self) -> Result<(), EngineError> {
        Ok(())
    }
}
