//! The node: its state dir, its spawner, and its instances. HTTP and CLI
//! call these operations; nothing here knows about HTTP.
//!
//! Invariants: the state dir is locked for the node's whole life (two nodes
//! never share one); stale runners of a crashed predecessor are swept before
//! anything is spawned; an instance id maps to one instance actor, which is
//! the only owner of its runners.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipc::ShutdownMode;
use serde::{Deserialize, Serialize};
use supervisor::instance::{
    self, InstanceHandle, InstanceSpec, InstanceState, InstanceView, SupervisorContext, Timeouts,
};
use supervisor::process::Spawner;
use supervisor::restart::RestartConfig;
use supervisor::shutdown::ShutdownReport;
use supervisor::statedir::{StateDir, SweepReport};

/// Most runners one instance may have on one node.
pub const MAX_RUNNERS: u32 = 64;
/// Deleted instances whose last view stays readable (`GET /instance/{id}`).
const KEEP_DELETED: usize = 64;

/// `POST /instance` body.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateInstance {
    pub model: String,
    #[serde(default = "one")]
    pub runners: u32,
    #[serde(default)]
    pub scripted: Option<runner::scripted::ScriptedConfig>,
    #[serde(default)]
    pub timeouts: Option<Timeouts>,
    #[serde(default)]
    pub restart: Option<RestartConfig>,
}

fn one() -> u32 {
    1
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unavailable(String),
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeInfo {
    pub pid: u32,
    pub state_dir: PathBuf,
    pub sweep: SweepReport,
    pub uptime_ms: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeState {
    pub node: NodeInfo,
    pub instances: Vec<InstanceView>,
    pub channels: Vec<ipc::ChannelStats>,
}

pub struct Node {
    ctx: Arc<SupervisorContext>,
    program: PathBuf,
    sweep: SweepReport,
    started: std::time::Instant,
    instances: Mutex<BTreeMap<String, InstanceHandle>>,
    /// The last views of recently deleted instances, oldest first.
    deleted: Mutex<std::collections::VecDeque<InstanceView>>,
    runner_env: Vec<(String, String)>,
}

impl Node {
    /// Opens (and locks) the state dir, sweeps stale runners, starts the
    /// spawner. Must run inside a tokio runtime.
    pub fn start(state_dir: &Path, program: PathBuf) -> anyhow::Result<Arc<Node>> {
        let state_dir = StateDir::open(state_dir)?;
        let sweep = state_dir.sweep_stale_runners(Duration::from_secs(5));
        if !sweep.killed.is_empty() || !sweep.stale_files_removed.is_empty() {
            tracing::info!(
                killed = ?sweep.killed.iter().map(|r| format!("{} (pid {})", r.key, r.pid)).collect::<Vec<_>>(),
                stale_files = sweep.stale_files_removed.len(),
                "swept runners left by a previous node"
            );
        }
        for error in &sweep.errors {
            tracing::warn!(%error, "sweep");
        }
        let spawner = Spawner::start(tokio::runtime::Handle::current())?;
        let ctx = Arc::new(SupervisorContext {
            spawner,
            state_dir: Arc::new(state_dir),
        });
        let mut runner_env = Vec::new();
        if let Ok(level) = std::env::var(crate::logging::RUNNER_LOG_ENV) {
            runner_env.push((crate::logging::RUNNER_LOG_ENV.to_string(), level));
        }
        Ok(Arc::new(Node {
            ctx,
            program,
            sweep,
            started: std::time::Instant::now(),
            instances: Mutex::new(BTreeMap::new()),
            deleted: Mutex::new(std::collections::VecDeque::new()),
            runner_env,
        }))
    }

    fn instances(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, InstanceHandle>> {
        self.instances.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn create_instance(&self, req: CreateInstance) -> Result<InstanceHandle, NodeError> {
        if req.model != "scripted" {
            return Err(NodeError::BadRequest(format!(
                "unknown model {:?}: this node serves \"scripted\"",
                req.model
            )));
        }
        if req.runners == 0 || req.runners > MAX_RUNNERS {
            return Err(NodeError::BadRequest(format!(
                "runners must be between 1 and {MAX_RUNNERS}, got {}",
                req.runners
            )));
        }
        let scripted = req.scripted.unwrap_or_default();
        if let Some(fault) = &scripted.fault {
            if fault.phase == ipc::proto::Phase::Spawning {
                return Err(NodeError::BadRequest(
                    "scripted.fault.phase spawning cannot be injected (the runner is not running yet); \
                     use connecting, loading, warming_up, ready, running or shutting_down"
                        .into(),
                ));
            }
            if fault.runner >= req.runners {
                return Err(NodeError::BadRequest(format!(
                    "scripted.fault.runner is {} but the instance has runners 0..{}",
                    fault.runner,
                    req.runners - 1
                )));
            }
        }
        let engine_config = serde_json::to_string(&scripted)
            .map_err(|e| NodeError::BadRequest(format!("scripted config: {e}")))?;
        let instance_id = format!("i-{:08x}", fastrand::u32(..));
        let spec = InstanceSpec {
            instance_id: instance_id.clone(),
            model: req.model,
            runners: req.runners,
            engine_config,
            timeouts: req.timeouts.unwrap_or_default(),
            restart: req.restart.unwrap_or_default(),
            program: self.program.clone(),
            runner_env: self.runner_env.clone(),
        };
        tracing::info!(instance = %instance_id, runners = spec.runners, model = %spec.model, "creating instance");
        let handle = instance::start(self.ctx.clone(), spec);
        self.instances().insert(instance_id, handle.clone());
        Ok(handle)
    }

    /// The current view of a live or recently deleted instance.
    pub fn instance_view(&self, id: &str) -> Result<InstanceView, NodeError> {
        if let Ok(handle) = self.instance(id) {
            return Ok(handle.view());
        }
        let deleted = self.deleted.lock().unwrap_or_else(|p| p.into_inner());
        deleted
            .iter()
            .find(|v| v.instance_id == id)
            .cloned()
            .ok_or_else(|| NodeError::NotFound(format!("no instance {id:?} on this node")))
    }

    pub fn instance(&self, id: &str) -> Result<InstanceHandle, NodeError> {
        self.instances()
            .get(id)
            .cloned()
            .ok_or_else(|| NodeError::NotFound(format!("no instance {id:?} on this node")))
    }

    /// An instance by id, or the first ready one serving `model`.
    pub fn resolve(&self, model: &str) -> Result<InstanceHandle, NodeError> {
        let instances = self.instances();
        if let Some(handle) = instances.get(model) {
            return Ok(handle.clone());
        }
        let mut serving = instances
            .values()
            .filter(|h| h.view().model == model)
            .peekable();
        if serving.peek().is_none() {
            return Err(NodeError::NotFound(format!(
                "model {model:?} is neither an instance id nor served by any instance: create one with POST /instance"
            )));
        }
        serving
            .find(|h| h.view().state == InstanceState::Ready)
            .cloned()
            .ok_or_else(|| {
                NodeError::Unavailable(format!("no instance serving {model:?} is ready"))
            })
    }

    /// The instance that owns `task_id` (task ids start with their instance id).
    pub fn instance_of_task(&self, task_id: &str) -> Option<InstanceHandle> {
        let instance_id = task_id.rsplit_once("-t").map(|(i, _)| i)?;
        self.instances().get(instance_id).cloned()
    }

    /// Shuts an instance down and forgets it.
    pub async fn delete_instance(
        &self,
        id: &str,
        mode: ShutdownMode,
        drain: Option<Duration>,
    ) -> Result<ShutdownReport, NodeError> {
        let handle = self.instance(id)?;
        let report = handle.shutdown(mode, drain).await;
        let view = handle.wait_settled().await;
        if self.instances().remove(id).is_some() {
            let mut deleted = self.deleted.lock().unwrap_or_else(|p| p.into_inner());
            if deleted.len() == KEEP_DELETED {
                deleted.pop_front();
            }
            deleted.push_back(view);
        }
        report.ok_or_else(|| {
            NodeError::Unavailable(format!("instance {id} ended without a shutdown report"))
        })
    }

    /// Shuts every instance down, concurrently.
    pub async fn shutdown_all(&self, mode: ShutdownMode) -> Vec<ShutdownReport> {
        let ids: Vec<String> = self.instances().keys().cloned().collect();
        let deletes = ids.iter().map(|id| self.delete_instance(id, mode, None));
        futures_util::future::join_all(deletes)
            .await
            .into_iter()
            .filter_map(Result::ok)
            .collect()
    }

    pub fn state(&self) -> NodeState {
        NodeState {
            node: NodeInfo {
                pid: std::process::id(),
                state_dir: self.ctx.state_dir.path().to_path_buf(),
                sweep: self.sweep.clone(),
                uptime_ms: self.started.elapsed().as_millis() as u64,
            },
            instances: self.instances().values().map(|h| h.view()).collect(),
            channels: ipc::stats::snapshot(),
        }
    }

    pub fn sweep_report(&self) -> &SweepReport {
        &self.sweep
    }
}
