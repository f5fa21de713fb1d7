//! Integration tests of the node with real processes: a `shardvisor serve`
//! daemon, real runner processes, real sockets and real signals.

mod admission;
mod bad_input;
mod batching;
mod cluster;
mod faults;
mod faults_loaded;
mod harness;
mod kv_budget;
mod lifecycle;
mod model;
mod node_crash;
mod openai_sdk;
mod partition;
mod prefix;
mod prompt_logprobs;
mod runner_protocol;
mod stress;
mod template_vars;
