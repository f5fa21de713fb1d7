//! A llama-family decoder on candle (CPU), written so one process runs one
//! shard of it: a range of layers (pipeline) and/or a slice of every layer's
//! heads and FFN columns (tensor). Knows nothing about processes or sockets:
//! the all-reduce of tensor parallelism is a trait the caller implements.

pub mod chat;

/// The file `scripts/fetch-model.sh` fetches (SmolLM2-135M-Instruct, Q4_1):
/// the demo model and the tests' real one.
pub const FETCHED_MODEL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

pub mod arch;
pub mod config;
pub mod error;
pub mod gguf_meta;
mod gguf_types;
pub mod loader;
pub mod model;
mod pool;
mod q8tiles;
pub mod sampler;
pub mod testing;
pub mod tokenizer;
pub mod weights;
pub mod wire;

pub use error::{EngineError, Result};
