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
use supervisor::tasks::Limits;

use crate::mesh::{Mesh, MeshConfig, DATA_HOST_ENV};

/// Most runners one instance may have on one node.
pub const MAX_RUNNERS: u32 = 64;

/// How model weights are held when a request names no format: per stored
/// type, the faster of its own blocks and Q8_0 on this CPU
/// (`engine::weights`; measured in BENCHMARKS.md).
pub const DEFAULT_WEIGHTS: WeightFormat = WeightFormat::Auto;
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
    /// How weight matrices are held: `auto` (the default,
    /// `DEFAULT_WEIGHTS`), `f32`, `gguf` (GGUF blocks as stored) or `q8_0`.
    #[serde(default)]
    pub weights: Option<WeightFormat>,
    /// Compute threads per runner (default: cores / runners).
    #[serde(default)]
    pub threads: Option<u32>,
    /// A scripted fault in a model instance (lifecycle tests).
    #[serde(default)]
    pub fault: Option<runner::fault::FaultSpec>,
    /// Spread the runners over this many cluster nodes (this one first,
    /// then the others by free memory).
    #[serde(default)]
    pub nodes: Option<u32>,
    /// Spread the runners over exactly these nodes, in this order.
    #[serde(default)]
    pub node_ids: Option<Vec<String>>,
    /// Prompt tokens per prefill step (model files; default 512).
    #[serde(default)]
    pub prefill_chunk: Option<u32>,
    /// Tasks running at once, stepped together in batches (default 16;
    /// the scripted engine steps its running tasks in turn).
    #[serde(default)]
    pub max_batch: Option<u32>,
    /// Tasks waiting at the node for a running one to leave (default 4 ×
    /// `max_batch`); a request beyond both bounds gets a 429.
    #[serde(default)]
    pub max_waiting: Option<u32>,
    /// Memory for kept prompt prefixes in MiB (model files; default 256,
    /// 0: no prefix reuse).
    #[serde(default)]
    pub prefix_cache_mb: Option<u32>,
    /// Memory the running tasks' keys and values may take in MiB, all
    /// ranks together (model files; default half the memory available at
    /// load, counted at twice each position for growing buffers). A task
    /// that does not fit beside the running ones waits; one that never
    /// fits gets a 400.
    #[serde(default)]
    pub kv_cache_mb: Option<u32>,
    /// Tokens one batched step takes at most, decoded and prompt tokens
    /// together (model files; default 512).
    #[serde(default)]
    pub max_step_tokens: Option<u32>,
}

fn one() -> u32 {
    1
}

/// Compute threads per runner when the request names none. Tensor ranks
/// compute at the same time, so they share the machine's cores; pipeline
/// stages serving one stream take turns (its token is in one stage at a
/// time), so each may use them all. Under load a pipeline keeps one batch
/// in flight per stage and its stages compute at once: stages that share a
/// machine then do better with `threads` = cores / stages (BENCHMARKS.md,
/// "Many users at once").
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
/// A model instance's engine arguments, its name and its context length.
fn model_config(req: &CreateInstance) -> Result<(ModelEngineArgs, String, u32), NodeError> {
    let path = std::path::PathBuf::from(&req.model);
    if !path.exists() {
        return Err(NodeError::BadRequest(format!(
            "unknown model {:?}: neither \"scripted\" nor an existing GGUF file or Hugging Face directory",
            req.model
        )));
    }
    check_fault(req.fault.as_ref(), req.runners)?;
    let (config, name) = engine::loader::read_config_and_name(&path)
        .map_err(|e| NodeError::BadRequest(e.to_string()))?;
    for (name, value, unit) in [
        ("prefill_chunk", req.prefill_chunk, "token"),
        ("max_batch", req.max_batch, "task"),
        ("max_step_tokens", req.max_step_tokens, "token"),
        ("kv_cache_mb", req.kv_cache_mb, "MiB"),
    ] {
        if value == Some(0) {
            return Err(NodeError::BadRequest(format!(
                "{name} must be at least 1 {unit}"
            )));
        }
    }
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
    let context = u32::try_from(config.max_position_embeddings).unwrap_or(u32::MAX);
    let args = ModelEngineArgs {
        path,
        sharding,
        layers,
        weights: req.weights.unwrap_or(DEFAULT_WEIGHTS),
        fault: req.fault.clone(),
        prefill_chunk: req.prefill_chunk,
        max_batch: req.max_batch,
        max_step_tokens: req.max_step_tokens,
        prefix_cache_mb: req.prefix_cache_mb,
        kv_cache_mb: req.kv_cache_mb,
    };
    Ok((args, name, context))
}

/// `runners` ranks over `chosen` nodes in contiguous blocks (neighbouring
/// pipeline stages share a node); `None` for this node (`me`).
fn spread(chosen: &[String], runners: usize, me: &str) -> Vec<Option<String>> {
    let (base, extra) = (runners / chosen.len(), runners % chosen.len());
    let mut placement = Vec::with_capacity(runners);
    for (i, node) in chosen.iter().enumerate() {
        let at = (node != me).then(|| node.clone());
        placement.extend(std::iter::repeat_n(at, base + usize::from(i < extra)));
    }
    placement
}

/// The live members not in `skip`, most free memory first, then most cores.
fn by_capacity(members: &cluster::Membership, skip: &[String]) -> Vec<String> {
    let capacity = |m: &cluster::Member| {
        m.info
            .as_ref()
            .map_or((0, 0), |i| (i.mem_free_bytes, i.cores))
    };
    let mut live: Vec<&cluster::Member> = members
        .values()
        .filter(|m| m.alive && !skip.contains(&m.id))
        .collect();
    live.sort_by(|a, b| capacity(b).cmp(&capacity(a)).then(a.id.cmp(&b.id)));
    live.into_iter().map(|m| m.id.clone()).collect()
}

/// Re-placement for restarts: the same number of nodes, keeping those still
/// alive and replacing lost ones with other live nodes (most free memory
/// first); fewer nodes when not enough remain.
fn replacer(mesh: &Arc<Mesh>) -> supervisor::instance::Replace {
    let mesh = Arc::downgrade(mesh);
    Arc::new(move |last: &[Option<String>]| {
        let mesh = mesh.upgrade().ok_or("the node is stopping")?;
        let me = mesh.id().to_string();
        let members = mesh.cluster().members().borrow().clone();
        let mut chosen: Vec<String> = Vec::new();
        for node in last {
            let id = node.clone().unwrap_or_else(|| me.clone());
            if !chosen.contains(&id) {
                chosen.push(id);
            }
        }
        let want = chosen.len();
        chosen.retain(|id| members.get(id).is_some_and(|m| m.alive));
        let missing = want - chosen.len();
        let others = by_capacity(&members, &chosen);
        chosen.extend(others.into_iter().take(missing));
        Ok(spread(&chosen, last.len(), &me))
    })
}

/// The size of a model file, or of a model directory's files.
fn model_bytes(path: &Path) -> u64 {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => m.len(),
        Ok(m) if m.is_dir() => std::fs::read_dir(path)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter_map(|e| e.metadata().ok())
                    .filter(|m| m.is_file())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0),
        _ => 0,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    /// A request's `model` names no instance and no model served here.
    #[error("{0}")]
    ModelNotFound(String),
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
    /// The cluster as this node sees it, when it is part of one.
    pub cluster: Option<ClusterView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClusterView {
    pub node_id: String,
    pub incarnation: u64,
    pub lease_ms: u64,
    pub nodes: Vec<MemberView>,
    /// Runners this node hosts for instances other nodes coordinate.
    pub hosted: Vec<HostedView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MemberView {
    pub id: String,
    pub incarnation: u64,
    pub alive: bool,
    /// Since the node was last seen joining (alive) or leaving (lost).
    pub for_ms: u64,
    pub api_addr: Option<String>,
    pub cores: Option<u32>,
    pub mem_free_bytes: Option<u64>,
    pub runners: Option<u32>,
    pub instances: Vec<cluster::InstanceBrief>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostedView {
    pub link: String,
    pub pid: u32,
    pub coordinator: String,
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
    mesh: Option<Arc<Mesh>>,
}

impl Node {
    /// Opens (and locks) the state dir, sweeps stale runners, starts the
    /// spawner. Must run inside a tokio runtime.
    pub fn start(state_dir: &Path, program: PathBuf) -> anyhow::Result<Arc<Node>> {
        let (state_dir, sweep) = Self::open(state_dir)?;
        Self::build(state_dir, sweep, program, None)
    }

    /// [`Node::start`], then joins the cluster with the node identity kept
    /// in the state dir (a new incarnation each time).
    pub async fn start_clustered(
        state_dir: &Path,
        program: PathBuf,
        config: MeshConfig,
    ) -> anyhow::Result<Arc<Node>> {
        let (state_dir, sweep) = Self::open(state_dir)?;
        let identity = cluster::NodeIdentity::load_or_create(state_dir.path())?;
        let mesh = Mesh::join(&config, identity, program.clone()).await?;
        Self::build(state_dir, sweep, program, Some(mesh))
    }

    fn open(state_dir: &Path) -> anyhow::Result<(StateDir, SweepReport)> {
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
        Ok((state_dir, sweep))
    }

    fn build(
        state_dir: StateDir,
        sweep: SweepReport,
        program: PathBuf,
        mesh: Option<Arc<Mesh>>,
    ) -> anyhow::Result<Arc<Node>> {
        let spawner = Spawner::start(tokio::runtime::Handle::current())?;
        let ctx = Arc::new(SupervisorContext {
            spawner,
            state_dir: Arc::new(state_dir),
            node_id: mesh.as_ref().map(|m| m.id().to_string()),
            remote: mesh
                .clone()
                .map(|m| m as Arc<dyn supervisor::remote::RemoteSpawner>),
        });
        let mut runner_env = Vec::new();
        if let Ok(level) = std::env::var(crate::logging::RUNNER_LOG_ENV) {
            runner_env.push((crate::logging::RUNNER_LOG_ENV.to_string(), level));
        }
        if let Some(mesh) = &mesh {
            mesh.attach(&ctx);
            runner_env.push((DATA_HOST_ENV.into(), mesh.advertise_host().to_string()));
        }
        Ok(Arc::new(Node {
            mesh,
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
        let placement = self.place(&req)?;
        let mut runner_env = self.runner_env.clone();
        let (engine, tasks_to_all_ranks, model_name, context_length) = if req.model == "scripted" {
            if req.sharding.is_some()
                || req.layers.is_some()
                || req.weights.is_some()
                || req.prefill_chunk.is_some()
                || req.max_step_tokens.is_some()
                || req.prefix_cache_mb.is_some()
                || req.kv_cache_mb.is_some()
            {
                return Err(NodeError::BadRequest(
                    "sharding, layers, weights, prefill_chunk, max_step_tokens, prefix_cache_mb and kv_cache_mb apply to model files, not to \"scripted\"".into(),
                ));
            }
            (
                EngineConfig::Scripted(scripted_config(req.scripted, req.runners)?),
                true,
                "scripted".to_string(),
                None,
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
            let (args, name, context) = model_config(&req)?;
            (EngineConfig::Model(args), false, name, Some(context))
        };
        if req.max_batch == Some(0) {
            return Err(NodeError::BadRequest(
                "max_batch must be at least 1 task".into(),
            ));
        }
        let limits = Limits::new(
            req.max_batch.unwrap_or(runner::model::DEFAULT_MAX_BATCH) as usize,
            req.max_waiting.map(|w| w as usize),
        );
        let engine_config = serde_json::to_string(&engine)
            .map_err(|e| NodeError::BadRequest(format!("engine config: {e}")))?;
        let instance_id = format!("i-{:08x}", fastrand::u32(..));
        let replace = match (&self.mesh, placement.is_empty()) {
            (Some(mesh), false) => Some(replacer(mesh)),
            _ => None,
        };
        let spec = InstanceSpec {
            placement,
            replace,
            instance_id: instance_id.clone(),
            model: req.model,
            model_name,
            context_length,
            runners: req.runners,
            engine_config,
            timeouts: req.timeouts.unwrap_or_default(),
            restart: req.restart.unwrap_or_default(),
            program: self.program.clone(),
            runner_env,
            tasks_to_all_ranks,
            limits,
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
            .filter(|h| {
                let v = h.view();
                v.model_name == model || v.model == model
            })
            .peekable();
        if serving.peek().is_none() {
            return Err(NodeError::ModelNotFound(format!(
                "the model {model:?} does not exist: it is neither an instance id nor the name of a model an instance serves (GET /v1/models lists them; POST /instance creates one)"
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

    /// Where the runners' log files are.
    pub fn logs_dir(&self) -> PathBuf {
        self.ctx.state_dir.logs_dir()
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
            cluster: self.cluster_view(),
        }
    }

    fn cluster_view(&self) -> Option<ClusterView> {
        let mesh = self.mesh.as_ref()?;
        let identity = mesh.cluster().identity().clone();
        let members = mesh.cluster().members().borrow().clone();
        let nodes = members
            .values()
            .map(|m| MemberView {
                id: m.id.clone(),
                incarnation: m.incarnation,
                alive: m.alive,
                for_ms: m.since.elapsed().as_millis() as u64,
                api_addr: m.info.as_ref().map(|i| i.api_addr.clone()),
                cores: m.info.as_ref().map(|i| i.cores),
                mem_free_bytes: m.info.as_ref().map(|i| i.mem_free_bytes),
                runners: m.info.as_ref().map(|i| i.runners),
                instances: m
                    .info
                    .as_ref()
                    .map(|i| i.instances.clone())
                    .unwrap_or_default(),
            })
            .collect();
        Some(ClusterView {
            node_id: identity.id,
            incarnation: identity.incarnation,
            lease_ms: mesh.lease().as_millis() as u64,
            nodes,
            hosted: mesh
                .hosted()
                .into_iter()
                .map(|(link, pid, coordinator)| HostedView {
                    link,
                    pid,
                    coordinator,
                })
                .collect(),
        })
    }

    pub fn mesh(&self) -> Option<&Arc<Mesh>> {
        self.mesh.as_ref()
    }

    /// Which node each rank runs on (empty: all on this node).
    fn place(&self, req: &CreateInstance) -> Result<Vec<Option<String>>, NodeError> {
        let bad = |m: String| Err(NodeError::BadRequest(m));
        enum Wanted<'a> {
            Count(u32),
            Ids(&'a [String]),
        }
        let wanted = match (req.nodes, &req.node_ids) {
            (None, None) => return Ok(Vec::new()),
            (Some(_), Some(_)) => return bad("give nodes or node_ids, not both".into()),
            (Some(n), None) => Wanted::Count(n),
            (None, Some(ids)) => Wanted::Ids(ids),
        };
        let Some(mesh) = &self.mesh else {
            return bad("nodes and node_ids need a cluster: start the node with --cluster-listen (and --peer to join others)".into());
        };
        let me = mesh.id().to_string();
        let members = mesh.cluster().members().borrow().clone();
        let alive: Vec<&cluster::Member> = members.values().filter(|m| m.alive).collect();
        let alive_ids = || {
            alive
                .iter()
                .map(|m| m.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let chosen: Vec<String> = match wanted {
            Wanted::Count(n) => {
                if n == 0 || n as usize > alive.len() {
                    return bad(format!(
                        "nodes must be between 1 and the {} live nodes ({}), got {n}",
                        alive.len(),
                        alive_ids()
                    ));
                }
                // This node first (it streams rank 0's tokens), then the
                // others with the most free memory, then the most cores.
                let mut chosen = vec![me.clone()];
                chosen.extend(by_capacity(&members, &chosen));
                chosen.truncate(n as usize);
                chosen
            }
            Wanted::Ids(ids) => {
                if ids.is_empty() {
                    return bad("node_ids must name at least one node".into());
                }
                for (i, id) in ids.iter().enumerate() {
                    if ids[..i].contains(id) {
                        return bad(format!("node_ids names node {id} twice"));
                    }
                    if !alive.iter().any(|m| &m.id == id) {
                        return bad(format!(
                            "node {id:?} is not a live member of the cluster; live nodes: {}",
                            alive_ids()
                        ));
                    }
                }
                ids.to_vec()
            }
        };
        let runners = req.runners as usize;
        if runners < chosen.len() {
            return bad(format!(
                "{runners} runners cannot span {} nodes: every node needs at least one runner",
                chosen.len()
            ));
        }
        let model_bytes = model_bytes(Path::new(&req.model));
        let placement = spread(&chosen, runners, &me);
        for node in &chosen {
            let count = placement
                .iter()
                .filter(|p| p.as_deref().unwrap_or(&me) == node)
                .count();
            let need = model_bytes / runners as u64 * count as u64;
            let free = members
                .get(node)
                .and_then(|m| m.info.as_ref())
                .map(|i| i.mem_free_bytes);
            if let Some(free) = free.filter(|f| *f < need) {
                return bad(format!(
                    "node {node} has {} MiB of memory free but its {count} runner(s) need about {} MiB (the model is {} MiB over {runners} runners)",
                    free >> 20,
                    need >> 20,
                    model_bytes >> 20
                ));
            }
        }
        Ok(placement)
    }

    /// Publishes this node's info to the cluster (its API address is
    /// `api_addr`) now and whenever it changes.
    pub fn announce(self: &Arc<Self>, api_addr: String) {
        let Some(mesh) = self.mesh.clone() else {
            return;
        };
        let node = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut last: Option<(Vec<cluster::InstanceBrief>, u32)> = None;
            let mut last_at = std::time::Instant::now();
            loop {
                let Some(node) = node.upgrade() else { return };
                let (briefs, runners) = node.announcement(mesh.id());
                let changed = last.as_ref() != Some(&(briefs.clone(), runners));
                if changed || last_at.elapsed() >= Duration::from_secs(5) {
                    let mut info = mesh.cluster().local_node_info(api_addr.clone(), runners);
                    info.instances = briefs.clone();
                    if let Err(e) = mesh.cluster().publish_info(&info).await {
                        tracing::debug!(error = %e, "publishing node info failed");
                    }
                    last = Some((briefs, runners));
                    last_at = std::time::Instant::now();
                }
                drop(node);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }

    /// What this node announces: the instances it coordinates, and how
    /// many runner processes it runs (its own ranks and those it hosts).
    fn announcement(&self, me: &str) -> (Vec<cluster::InstanceBrief>, u32) {
        let mut runners = self.mesh.as_ref().map_or(0, |m| m.hosted_count());
        let briefs = self
            .instances()
            .values()
            .map(|h| {
                let v = h.view();
                let nodes: Vec<String> = v
                    .runners
                    .iter()
                    .map(|r| r.node.clone().unwrap_or_else(|| me.to_string()))
                    .collect();
                runners += v
                    .runners
                    .iter()
                    .zip(&nodes)
                    .filter(|(r, node)| r.exit.is_none() && *node == me)
                    .count();
                cluster::InstanceBrief {
                    instance_id: v.instance_id,
                    model: v.model,
                    model_name: v.model_name,
                    state: v.state.name().to_string(),
                    nodes,
                }
            })
            .collect();
        (briefs, runners as u32)
    }

    /// The API address of the node coordinating instance (or serving model)
    /// `model`, when that is another node.
    /// What the other live nodes announce (their instances, API address).
    fn other_nodes(&self) -> Vec<cluster::NodeInfo> {
        let Some(mesh) = self.mesh.as_ref() else {
            return Vec::new();
        };
        let members = mesh.cluster().members().borrow().clone();
        members
            .into_values()
            .filter(|m| m.alive && m.id != mesh.id())
            .filter_map(|m| m.info)
            .collect()
    }

    /// The instances other live nodes coordinate, as they announce them.
    pub fn remote_instances(&self) -> Vec<cluster::InstanceBrief> {
        self.other_nodes()
            .into_iter()
            .flat_map(|i| i.instances)
            .collect()
    }

    /// The API of the node that coordinates `model` (an instance id, or a
    /// model a ready instance there serves).
    pub fn remote_api(&self, model: &str) -> Option<String> {
        let others = self.other_nodes();
        others
            .iter()
            .find(|i| i.instances.iter().any(|b| b.instance_id == model))
            .or_else(|| {
                others.iter().find(|i| {
                    i.instances
                        .iter()
                        .any(|b| (b.model_name == model || b.model == model) && b.state == "ready")
                })
            })
            .map(|i| i.api_addr.clone())
    }

    /// Leaves the cluster: stops the runners hosted for other nodes first.
    pub async fn leave_cluster(&self) {
        let Some(mesh) = &self.mesh else { return };
        mesh.stop_hosted();
        mesh.wait_hosted_gone(Duration::from_secs(5)).await;
        mesh.leave().await;
    }

    pub fn sweep_report(&self) -> &SweepReport {
        &self.sweep
    }
}
