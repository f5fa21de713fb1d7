//! Cluster membership and control plane for shardvisor node daemons, over zenoh (peer mode,
//! TCP only).
//!
//! A node daemon calls [`Cluster::join`] with a [`ClusterConfig`], its persistent
//! [`NodeIdentity`] and a [`CommandHandler`]. It then:
//! * sees every node (itself included) in [`Cluster::members`], alive or lost, with the
//!   [`NodeInfo`] each publishes via [`Cluster::publish_info`], and gets [`MemberEvent`]s;
//! * sends commands to other nodes with [`Cluster::command`] / [`Cluster::command_typed`];
//! * can open byte streams with [`Cluster::publisher`] / [`Cluster::subscribe`];
//! * exits with [`Cluster::leave`].
//!
//! The key layout is in [`keys`].
//!
//! # Topology
//!
//! zenoh peers do not relay for each other, so every node must be connected to every other
//! node. Listing one existing node in [`ClusterConfig::peers`] is enough: gossip introduces the
//! rest and zenoh connects them. The lease must be the same on every node (zenoh #2806).
//!
//! # Runtime
//!
//! zenoh blocks the calling thread in `open` and `close`, which requires a multi-threaded tokio
//! runtime (`#[tokio::main(flavor = "multi_thread")]`); [`Cluster::join`] refuses to run
//! elsewhere.
//!
//! # Logging
//!
//! This crate logs with `tracing` under the `cluster` target: `debug!`/`info!` on normal
//! paths (joins, leaves, reconnects, failed commands), `warn!` only for real faults (a stream
//! reader too slow, a handler panic, a duplicate node id, a session that does not close).
//!
//! zenoh itself logs WARN/ERROR in situations that are normal for a supervisor (a peer
//! vanishing during a gossip connect, a query racing a closing peer, a late reply). A binary
//! that asserts "no WARN/ERROR on graceful paths" should therefore filter zenoh's targets, e.g.
//! `EnvFilter::new("info,zenoh=off")` for that check (or `zenoh=error` if zenoh's errors should
//! still be seen), or send `zenoh*` targets to a separate layer. `EnvFilter` matches targets by
//! prefix, so `zenoh` also covers `zenoh_transport`, `zenoh_link_tcp`, `zenoh_config`, etc.
//! Do not call `zenoh::init_log_from_env_or`: it installs its own global subscriber.

pub mod command;
pub mod config;
pub mod error;
pub mod identity;
pub mod info;
pub mod keys;
pub mod membership;
pub mod stream;

mod cluster;

pub use cluster::Cluster;
pub use command::{typed_handler, CommandHandler, HandlerFuture};
pub use config::ClusterConfig;
pub use error::{ClusterError, CommandError};
pub use identity::NodeIdentity;
pub use info::{InstanceBrief, NodeInfo};
pub use membership::{Member, MemberEvent, Membership};
pub use stream::{ClusterPublisher, DEFAULT_STREAM_CAPACITY};

#[cfg(test)]
mod tests {
    fn send_sync<T: Send + Sync>() {}

    #[test]
    fn handles_are_send_and_sync() {
        send_sync::<crate::Cluster>();
        send_sync::<crate::ClusterPublisher>();
    }
}
