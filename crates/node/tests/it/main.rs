//! Integration tests of the node with real processes: a `shardvisor serve`
//! daemon, real runner processes, real sockets and real signals.

mod bad_input;
mod faults;
mod harness;
mod lifecycle;
mod model;
mod node_crash;
mod runner_protocol;
mod stress;
