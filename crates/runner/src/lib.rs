//! The runner process: one shard of an instance, re-executed from the
//! `shardvisor` binary as `shardvisor runner …`.
//!
//! It talks to its node over the inherited fd 3 (an `ipc` channel), follows
//! the runner state machine ([`lifecycle`]), runs an [`Engine`]
//! on a dedicated thread so the control lane stays responsive while the
//! engine computes, and ends in one of two ways only: an announced shutdown
//! (`Shutdown` → drain → `End` → exit 0), or an exit of its own when the node
//! vanishes (`PeerLost` → exit 2), so a runner never outlives its node.
//!
//! The runner knows nothing of HTTP or of other nodes.

pub mod engine;
mod engine_thread;
pub mod fault;
pub mod kv_budget;
pub mod lifecycle;
mod links;
pub use links::DATA_HOST_ENV;
pub mod model;
pub mod prefill;
pub mod prefix;
mod process;
pub mod scripted;

pub use engine::{Engine, EngineError, Step};
pub use process::{run, EngineConfig, RunnerArgs, IPC_FD, LOCK_FD};
