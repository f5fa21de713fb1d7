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

use engine::loader::WeightFormat;
use engine::model::ShardSpec;
use ipc::ShutdownMode;
use runner::model::{ModelEngineArgs, Sharding};
use runner::scripted::ScriptedConfig;
use runner::EngineConfig;
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

/// How model weights are held when a request names no format (chosen by
/// `shardvisor bench model`; see BENCHMARKS.md).
pub const DEFAULT_WEIGHTS: WeightFormat = WeightFormat::Q8_0;
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
    /// Model files: `pipeline` (default) or `tensor`.
    #[serde(default)]
    pub sharding: Option<Sharding>,
    /// Pipeline: each stage's `[start, end)` layer range.
    #[serde(default)]
    pub layers: Option<Vec<[usize; 2]>>,
    /// How weight matrices are held: `f32`, `gguf` (GGUF blocks as stored)
    /// or `q8_0` (default: `DEFAULT_WEIGHTS`).
    #[serde(default)]
    pub weights: Option<WeightFormat>,
    /// Compute threads per runner (default: cores / runners).
    #[serde(default)]
    pub threads: Option<u32>,
    /// A scripted fault in a model instance (lifecycle tests).
    #[serde(default)]
    pub fault: Option<runner::fault::FaultSpec>,
}

fn one() -> u32 {
    1
}

/// Compute threads per runner when the request names none. Tensor ranks
/// compute at the same time, so they share the machine's cores; pipeline
/// stages take turns (one token is in one stage at a time), so each may use
/// them all.
fn default_threads(runners: u32, sharding: Sharding) -> u32 {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    match sharding {
        Sharding::Tensor => (cores / runners).max(1),
        Sharding::Pipeline => cores,
    }
}

/// candle's CPU worker pool spins this many times waiting for the next
/// operation before it parks. candle's default (25 000, about a millisecond)
/// keeps an idle pipeline stage's workers busy while the next stage computes
/// on the same cores: pipeline-2 then decodes at ~70% of a single process.
/// 2 000 still bridges the gaps between one forward pass's operations
/// (BENCHMARKS.md: single and pipeline-2 with 25 000, 4 000, 1 000, 100).
/// An operator's own `CANDLE_BARRIER_POOL_SPIN_LIMIT` wins.
const SPIN_LIMIT: u32 = 2000;
const SPIN_LIMIT_VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";

fn scripted_config(
    scripted: Option<ScriptedConfig>,
    runners: u32,
) -> Result<ScriptedConfig, NodeError> {
    let scripted = scripted.unwrap_or_default();
    check_fault(scripted.fault.as_ref(), runners)?;
    Ok(scripted)
}

fn check_fault(fault: Option<&runner::fault::FaultSpec>, runners: u32) -> Result<(), NodeError> {
    let Some(fault) = fault else { return Ok(()) };
    if fault.phase == ipc::proto::Phase::Spawning {
        return Err(NodeError::BadRequest(
            "fault.phase spawning cannot be injected (the runner is not running yet); \
             use connecting, loading, warming_up, ready, running or shutting_down"
                .into(),
        ));
    }
    if fault.runner >= runners {
        return Err(NodeError::BadRequest(format!(
            "fault.runner is {} but the instance has runners 0..{}",
            fault.runner,
            runners - 1
        )));
    }
    Ok(())
}

/// Checks a model instance against the model's own config: the path, the
/// architecture, tensor degrees and layer ranges; picks balanced layer
/// ranges when none are given.
fn model_config(req: &CreateInstance) -> Result<ModelEngineArgs, NodeError> {
    let path = std::path::PathBuf::from(&req.model);
    if !path.exists() {
        return Err(NodeError::BadRequest(format!(
            "unknown model {:?}: neither \"scripted\" nor an existing GGUF file or Hugging Face directory",
            req.model
        )));
    }
    check_fault(req.fault.as_ref(), req.runners)?;
    let config =
        engine::loader::read_config(&path).map_err(|e| NodeError::BadRequest(e.to_string()))?;
    let sharding = req.sharding.unwrap_or(Sharding::Pipeline);
    let runners = req.runners as usize;
    let mut layers = Vec::new();
    match sharding {
        Sharding::Tensor => {
            if req.layers.is_some() {
                return Err(NodeError::BadRequest(
                    "layers applies to pipeline sharding only".into(),
                ));
            }
            let valid = config.valid_tensor_degrees();
            if !valid.contains(&runners) {
                return Err(NodeError::BadRequest(format!(
                    "tensor degree {runners} does not divide the model's {} heads, {} kv heads and {} FFN columns; valid degrees: {valid:?}",
                    config.n_heads, config.n_kv_heads, config.intermediate_size
                )));
            }
        }
        Sharding::Pipeline => {
            let n = config.n_layers;
            if runners > n {
                return Err(NodeError::BadRequest(format!(
                    "{runners} pipeline stages for a model of {n} layers: at most {n}"
                )));
            }
            layers = match &req.layers {
                Some(given) => {
                    let ranges: Vec<(usize, usize)> = given.iter().map(|r| (r[0], r[1])).collect();
                    let contiguous = ranges.len() == runners
                        && ranges.first().map(|r| r.0) == Some(0)
                        && ranges.last().map(|r| r.1) == Some(n)
                        && ranges.iter().all(|r| r.0 < r.1)
                        && ranges.windows(2).all(|w| w[0].1 == w[1].0);
                    if !contiguous {
                        return Err(NodeError::BadRequest(format!(
                            "layers must be {runners} non-empty, contiguous ranges [start, end) covering 0..{n}, got {given:?}"
                        )));
                    }
                    ranges
                }
                None => ShardSpec::pipeline_stages(&config, runners)
                    .into_iter()
                    .map(|s| (s.layers.start, s.layers.end))
                    .collect(),
            };
        }
    }
    Ok(ModelEngineArgs {
        path,
        sharding,
        layers,
        weights: req.weights.unwrap_or(DEFAULT_WEIGHTS),
        fault: req.fault.clone(),
    })
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
        if req.runners == 0 || req.runners > MAX_RUNNERS {
            return Err(NodeError::BadRequest(format!(
                "runners must be between 1 and {MAX_RUNNERS}, got {}",
                req.runners
            )));
        }
        let mut runner_env = self.runner_env.clone();
        let (engine, tasks_to_all_ranks) = if req.model == "scripted" {
            if req.sharding.is_some() || req.layers.is_some() || req.weights.is_some() {
                return Err(NodeError::BadRequest(
                    "sharding, layers and weights apply to model files, not to \"scripted\"".into(),
                ));
            }
            (
                EngineConfig::Scripted(scripted_config(req.scripted, req.runners)?),
                true,
            )
        } else {
            if req.scripted.is_some() {
                return Err(NodeError::BadRequest(
                    "scripted applies only to model \"scripted\"".into(),
                ));
            }
            let sharding = req.sharding.unwrap_or(Sharding::Pipeline);
            let threads = req
                .threads
                .unwrap_or_else(|| default_threads(req.runners, sharding));
            runner_env.push(("RAYON_NUM_THREADS".into(), threads.to_string()));
            if std::env::var_os(SPIN_LIMIT_VAR).is_none() {
                runner_env.push((SPIN_LIMIT_VAR.into(), SPIN_LIMIT.to_string()));
            }
            (EngineConfig::Model(model_config(&req)?), false)
        };
        let engine_config = serde_json::to_string(&engine)
            .map_err(|e| NodeError::BadRequest(format!("engine config: {e}")))?;
        let instance_id = format!("i-{:08x}", fastrand::u32(..));
        let spec = InstanceSpec {
            instance_id: instance_id.clone(),
            model: req.model,
            runners: req.runners,
            engine_config,
            timeouts: req.timeouts.unwrap_or_default(),
            restart: req.restart.unwrap_or_default(),
            program: self.program.clone(),
            runner_env,
            tasks_to_all_ranks,
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
