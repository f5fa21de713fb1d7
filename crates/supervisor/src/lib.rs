//! Supervision of runner processes: spawning them orphan-proof
//! ([`process`]), watching them ([`runner_handle`]), running an instance of
//! N runners through startup, service and the three-phase shutdown
//! ([`instance`], [`shutdown`]), restarting by policy ([`restart`]),
//! cleaning up resources in dependency order ([`resources`]), and the
//! node's state directory ([`statedir`]); the task table and admission
//! bound ([`tasks`]), the startup barrier ([`startup`]) and failure
//! attribution ([`blame`]), each a pure type the instance actor drives.
//!
//! The supervisor knows nothing about models, HTTP or other nodes.

pub mod blame;
pub mod instance;
pub mod logs;
pub mod process;
pub mod remote;
pub mod resources;
pub mod restart;
pub mod runner_handle;
pub mod shutdown;
pub mod startup;
pub mod statedir;
pub mod tasks;
