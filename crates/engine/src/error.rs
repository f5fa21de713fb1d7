//! The engine's error: what went wrong, naming the file and tensor where
//! there is one.

#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// A model file is missing, unreadable, corrupt, truncated or does not
    /// match what the config says.
    #[error("{path}: {detail}")]
    Model { path: String, detail: String },
    /// A tensor is missing, has the wrong shape or type, or cannot be sliced.
    #[error("{path}: tensor {tensor}: {detail}")]
    Tensor {
        path: String,
        tensor: String,
        detail: String,
    },
    /// The model or the requested sharding is not supported.
    #[error("{0}")]
    Unsupported(String),
    /// A shard spec does not fit the model (layer range out of bounds,
    /// tensor degree that does not divide heads, kv heads and FFN width).
    /// The message names what would be valid; callers map it to a 400.
    #[error("invalid shard: {0}")]
    InvalidShard(String),
    /// Tokenizer or chat template problems.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    /// A compute failure (shape mismatch at run time, candle error).
    #[error("compute: {0}")]
    Compute(String),
    /// A data-plane link to a peer runner broke or misbehaved: usually the
    /// echo of the peer's own failure.
    #[error("data plane: {0}")]
    Link(String),
}

impl EngineError {
    /// Whether the same attempt fails the same way again: everything about
    /// the model's files and their fit (missing, corrupt, unsupported, a
    /// shard that does not fit, a tokenizer or template that cannot be
    /// read). A compute failure or a data-plane link error may not recur.
    pub fn recurs(&self) -> bool {
        match self {
            EngineError::Model { .. }
            | EngineError::Tensor { .. }
            | EngineError::Unsupported(_)
            | EngineError::InvalidShard(_)
            | EngineError::Tokenizer(_)
            | EngineError::Template(_) => true,
            EngineError::Compute(_) | EngineError::Link(_) => false,
        }
    }

    /// Whether the cause is a broken data-plane link.
    pub fn is_link(&self) -> bool {
        matches!(self, EngineError::Link(_))
    }
}

impl From<candle_core::Error> for EngineError {
    fn from(e: candle_core::Error) -> Self {
        EngineError::Compute(e.to_string())
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
