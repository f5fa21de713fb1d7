//! The shardvisor node: the daemon that owns a machine's runners
//! ([`node::Node`]), its HTTP API ([`api`]), and the command line
//! ([`cli`]). The binary in `main.rs` only parses arguments and calls in.

pub mod api;
pub mod bench;
pub mod cli;
pub mod client;
pub mod generate;
pub mod logging;
pub mod mesh;
pub mod netns;
pub mod node;
pub mod openai;
