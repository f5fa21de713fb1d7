//! Error types.

use std::time::Duration;

/// Errors from setting up or using the cluster session.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The [`crate::ClusterConfig`] is invalid; the message says which field and why.
    #[error("invalid cluster config: {0}")]
    Config(String),
    /// The node id cannot be used as a key chunk.
    #[error("invalid node id {0:?}: use only letters, digits, '.', '_' and '-'")]
    InvalidNodeId(String),
    /// zenoh blocks the calling thread in `open`/`close`, which needs a multi-threaded runtime.
    #[error(
        "the cluster needs to run inside a multi-threaded tokio runtime \
         (e.g. #[tokio::main(flavor = \"multi_thread\")])"
    )]
    Runtime,
    /// A zenoh operation failed.
    #[error("zenoh failed to {what}: {message}")]
    Zenoh {
        /// What we were doing.
        what: String,
        /// zenoh's error text.
        message: String,
    },
    /// A value could not be serialized.
    #[error("cannot encode {what}: {source}")]
    Encode {
        /// What we were encoding.
        what: &'static str,
        /// The postcard error.
        source: postcard::Error,
    },
}

impl ClusterError {
    pub(crate) fn zenoh(what: impl Into<String>, err: impl std::fmt::Display) -> Self {
        ClusterError::Zenoh {
            what: what.into(),
            message: err.to_string(),
        }
    }
}

/// Why [`crate::Cluster::command`] did not return a response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// Nothing answered at all: the node id is unknown, the node is down, or it is not (yet)
    /// connected to this node.
    #[error("node {0} is not reachable: no command handler answered (unknown id, node down, or not connected to us)")]
    NoSuchNode(String),
    /// The node did not answer within the timeout (its handler may still be running, or was
    /// cancelled at the deadline).
    #[error("command to node {node} timed out after {after:?}")]
    Timeout {
        /// The target node.
        node: String,
        /// The timeout that expired.
        after: Duration,
    },
    /// The node's handler returned an error.
    #[error("node {node} failed the command: {message}")]
    Remote {
        /// The target node.
        node: String,
        /// The handler's error message.
        message: String,
    },
    /// Encoding the request or decoding the response (typed helpers) failed.
    #[error("command to node {node}: {message}")]
    Codec {
        /// The target node.
        node: String,
        /// What could not be encoded or decoded.
        message: String,
    },
    /// zenoh failed to send the query or returned something unexpected; the message names the
    /// node.
    #[error("{0}")]
    Transport(String),
}
