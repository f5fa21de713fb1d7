//! A llama-family decoder on candle (CPU), written so one process runs one
//! shard of it: a range of layers (pipeline) and/or a slice of every layer's
//! heads and FFN columns (tensor). Knows nothing about processes or sockets:
//! the all-reduce of tensor parallelism is a trait the caller implements.

pub mod error;

pub use error::{EngineError, Result};
