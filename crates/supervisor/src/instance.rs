//! One instance: N runner processes started together, serving tasks, and
//! torn down together. A single task (the instance actor) owns every
//! runner handle, the task table and the instance state; the API talks to
//! it through [`InstanceHandle`] and reads snapshots ([`InstanceView`]).
//!
//! The decisions are pure types the actor drives: the startup barrier and
//! phase deadlines ([`crate::startup`]), the task table and admission
//! ([`crate::tasks`]), failure attribution ([`crate::blame`]), the shutdown
//! ([`crate::shutdown`]) and the restart policy ([`crate::restart`]).
//!
//! Invariants:
//! * Startup is all-or-nothing: the instance is `Ready` only when every
//!   runner is; any runner failing or missing a phase deadline fails the
//!   whole instance and every started runner is stopped.
//! * Tasks are admitted only in `Ready`, within the instance's bounds
//!   (running and waiting, [`crate::tasks`]); beyond them a task is refused
//!   ([`SubmitError::QueueFull`]). Every admitted task gets exactly one
//!   terminal [`TaskEvent::Done`], whatever happens to its runners: its
//!   entry is removed from the table when, and only when, it is delivered.
//! * A drain delete lets every admitted task finish, waiting ones included:
//!   it hands the runners the waiting tasks and tells them to stop only
//!   once each runner holds every task it was handed (a control frame
//!   overtakes data); a cancel delete cancels waiting tasks at the node.
//! * A runner stalls when it has tasks in flight and reports no progress on
//!   any of them (started, a prefilled chunk, a prompt report, a token, a
//!   step without a token, a task done) for `task_stall_ms`; a task waiting
//!   its turn behind others
//!   is not a stall, and neither is a long prompt, whose every chunk is
//!   progress.
//! * A failure of any runner (exit, lost channel, hang, deadline, stall) is
//!   fail-stop: in-flight tasks fail with the cause, siblings get a
//!   cancel-mode shutdown, and the restart policy decides what follows. The
//!   failure names one runner, its phase and a typed cause
//!   ([`FailureCause`]); a lost-link report first waits for the peer's own.
//! * Runner events come tagged with a generation; a restart starts a new
//!   generation only after every runner of the old one was reaped.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ipc::proto::{
    FromRunner, Phase, PromptReport, RunnerState, Sampling, TaskInput, TaskOutcome, TaskRequest,
    ToRunner, TokenLogprob,
};
use ipc::{Blob, ChannelStats, Control, ShutdownMode};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::blame::{blamed_phase, Blame, EchoHold, LINK_LOSS_GRACE};
pub use crate::blame::{CauseKind, FailureCause, FailureReport};
use crate::process::{ExitCause, Spawner, StopOutcome};
use crate::remote::{Link, RemoteSpawner};
use crate::restart::{RestartConfig, RestartDecision, RestartPolicy};
use crate::runner_handle::{
    ChannelEnd, Heartbeat, RunnerEvent, RunnerHandle, RunnerSpec, SendFailure,
};
use crate::shutdown::{
    Action, ShutdownCoordinator, ShutdownDeadlines, ShutdownPhase, ShutdownReport,
};
use crate::startup::{Budgets, StartAction, Startup};
use crate::statedir::StateDir;
use crate::tasks::{Done, Limits, TaskTable};

/// Phase deadlines and heartbeat settings, in milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    /// Spawn until the runner reports `Idle`.
    pub spawn_ms: u64,
    pub connect_ms: u64,
    /// Loading without any progress report.
    pub load_ms: u64,
    pub warmup_ms: u64,
    pub ping_interval_ms: u64,
    pub ping_timeout_ms: u64,
    /// A running task with no progress from some runner for this long fails
    /// that runner.
    pub task_stall_ms: u64,
    pub signal_ms: u64,
    pub drain_ms: u64,
    pub close_ms: u64,
    pub term_grace_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            spawn_ms: 10_000,
            connect_ms: 10_000,
            load_ms: 30_000,
            warmup_ms: 30_000,
            ping_interval_ms: 1_000,
            ping_timeout_ms: 3_000,
            task_stall_ms: 30_000,
            signal_ms: 2_000,
            drain_ms: 30_000,
            close_ms: 5_000,
            term_grace_ms: 2_000,
        }
    }
}

impl From<&Timeouts> for Budgets {
    fn from(t: &Timeouts) -> Budgets {
        Budgets {
            spawn_ms: t.spawn_ms,
            connect_ms: t.connect_ms,
            load_ms: t.load_ms,
            warmup_ms: t.warmup_ms,
        }
    }
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

/// What it takes to start an instance.
#[derive(Clone)]
pub struct InstanceSpec {
    pub instance_id: String,
    /// What the instance was created from (`scripted`, a file or directory).
    pub model: String,
    /// The name clients call the model by (`/v1/models`).
    pub model_name: String,
    /// The model's context in tokens, when known.
    pub context_length: Option<u32>,
    pub runners: u32,
    /// Passed to every runner as its engine configuration.
    pub engine_config: String,
    pub timeouts: Timeouts,
    pub restart: RestartConfig,
    /// The binary runners re-execute.
    pub program: PathBuf,
    pub runner_env: Vec<(String, String)>,
    /// Whether every rank takes part in each task as a node-visible task
    /// (the scripted engine) or only rank 0 does and the other ranks are
    /// driven over the data plane (the model).
    pub tasks_to_all_ranks: bool,
    /// How many tasks run at once and wait at most.
    pub limits: Limits,
    /// The node of each rank: `None` (or a missing entry) runs it on this
    /// node, `Some(id)` on that node through [`SupervisorContext::remote`].
    pub placement: Vec<Option<String>>,
    /// Before a restart: the placement to use instead of the last one (the
    /// nodes that remain). `None` keeps the placement.
    pub replace: Option<Replace>,
}

/// Re-places an instance's ranks: takes the last placement, returns the new
/// one or why there is none.
pub type Replace =
    Arc<dyn Fn(&[Option<String>]) -> Result<Vec<Option<String>>, String> + Send + Sync>;

/// Shared by every instance of a node.
pub struct SupervisorContext {
    pub spawner: Spawner,
    pub state_dir: Arc<StateDir>,
    /// This node's cluster id, when it is part of a cluster.
    pub node_id: Option<String>,
    /// Starts ranks placed on other nodes.
    pub remote: Option<Arc<dyn RemoteSpawner>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum InstanceState {
    Starting,
    Ready,
    ShuttingDown { phase: ShutdownPhase },
    Restarting { attempt: u32, backoff_ms: u64 },
    Deleted,
    Failed { cause: String },
}

impl InstanceState {
    pub fn name(&self) -> &'static str {
        match self {
            InstanceState::Starting => "starting",
            InstanceState::Ready => "ready",
            InstanceState::ShuttingDown { .. } => "shutting_down",
            InstanceState::Restarting { .. } => "restarting",
            InstanceState::Deleted => "deleted",
            InstanceState::Failed { .. } => "failed",
        }
    }
}

/// How an instance's tasks found their prompts' prefixes kept: a hit took
/// `cached_tokens` positions from a kept prefix, a miss computed its whole
/// prompt (tasks of engines that keep no prefixes are neither).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PrefixCounts {
    pub hits: u64,
    pub misses: u64,
    pub cached_tokens: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunnerView {
    pub runner_id: String,
    pub rank: u32,
    /// The node hosting it (in a cluster).
    pub node: Option<String>,
    pub pid: Option<u32>,
    pub state: RunnerState,
    /// Every state the runner reported, in order (current generation).
    pub history: Vec<RunnerState>,
    pub exit: Option<String>,
    pub channel: Option<ChannelStats>,
}

#[derive(Debug, Clone, Serialize)]
pub struct InstanceView {
    pub instance_id: String,
    pub model: String,
    pub model_name: String,
    pub context_length: Option<u32>,
    pub state: InstanceState,
    pub runners: Vec<RunnerView>,
    /// Every admitted task without an outcome yet: running and waiting.
    pub tasks_in_flight: usize,
    /// Tasks in the runners' batch.
    pub tasks_running: usize,
    /// Tasks on the runners that rank 0 holds until its KV budget has room
    /// for them (counted against the running bound, not as running).
    pub tasks_awaiting_kv: usize,
    /// Tasks waiting at the node for a running one to leave.
    pub tasks_waiting: usize,
    pub limits: Limits,
    /// Prefix reuse of the instance's tasks so far.
    pub prefix_cache: PrefixCounts,
    pub restarts: u32,
    pub failure: Option<FailureReport>,
    pub last_shutdown: Option<ShutdownReport>,
}

/// A task's completion bound when it names none and the engine has no
/// context length to bound it (the scripted engine).
pub const DEFAULT_MAX_TOKENS: u32 = 64;

/// A task as the API submits it.
#[derive(Debug, Clone)]
pub struct TaskSubmit {
    pub input: TaskInput,
    /// `None`: to the end of the turn, bounded by the model's context (an
    /// engine without a context gets [`DEFAULT_MAX_TOKENS`]).
    pub max_tokens: Option<u32>,
    pub sampling: Sampling,
    pub stop: Vec<String>,
    pub trace_id: String,
    /// What the runner reports of the prompt before the first token.
    pub report_prompt: Option<PromptReport>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TaskEvent {
    /// The runner accepted the task (its prompt fits); always first unless
    /// the task ends without starting.
    Started {
        prompt_tokens: u32,
        /// Of them, taken from a kept prefix (`None`: the engine keeps
        /// none).
        cached_tokens: Option<u32>,
    },
    /// The prompt, when the task asked for it: every token's bytes and,
    /// scored, one entry per token after the first. Before any `Token`.
    Prompt {
        tokens: Vec<Blob>,
        logprobs: Vec<TokenLogprob>,
    },
    Token {
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
    /// Always the last event of a task.
    Done(TaskOutcome),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("instance {instance} is {state}: tasks are admitted only when it is ready")]
    NotReady {
        instance: String,
        state: &'static str,
    },
    #[error("instance {instance} has failed: {cause}")]
    Failed { instance: String, cause: String },
    #[error("instance {instance} is gone")]
    Gone { instance: String },
    #[error("instance {instance} is busy: {running} tasks running and {waiting} waiting, its limits (max_batch {}, max_waiting {}); retry later", limits.max_running, limits.max_waiting)]
    QueueFull {
        instance: String,
        running: usize,
        waiting: usize,
        limits: Limits,
    },
}

/// The events of one task. Dropping it before `Done` cancels the task.
pub struct TaskStream {
    pub task_id: String,
    events: mpsc::Receiver<TaskEvent>,
    cmds: mpsc::Sender<Cmd>,
    finished: bool,
}

impl TaskStream {
    pub async fn next(&mut self) -> Option<TaskEvent> {
        let event = self.events.recv().await;
        if matches!(event, Some(TaskEvent::Done(_)) | None) {
            self.finished = true;
        }
        event
    }
}

impl Drop for TaskStream {
    fn drop(&mut self) {
        if !self.finished {
            // The client went away: cancel. If the actor's queue is full the
            // next token for this task fails to deliver and cancels it then.
            let _ = self.cmds.try_send(Cmd::ClientGone {
                task_id: self.task_id.clone(),
            });
        }
    }
}

enum Cmd {
    Submit {
        task: TaskSubmit,
        reply: oneshot::Sender<Result<TaskStream, SubmitError>>,
    },
    Cancel {
        task_id: String,
        reply: oneshot::Sender<bool>,
    },
    ClientGone {
        task_id: String,
    },
    Shutdown {
        mode: ShutdownMode,
        drain: Option<Duration>,
        reply: oneshot::Sender<ShutdownReport>,
    },
}

/// The API's handle on an instance. Cheap to clone.
#[derive(Clone)]
pub struct InstanceHandle {
    pub instance_id: String,
    cmds: mpsc::Sender<Cmd>,
    view: watch::Receiver<InstanceView>,
}

impl InstanceHandle {
    pub fn view(&self) -> InstanceView {
        self.view.borrow().clone()
    }

    /// Resolves with the first view that satisfies `pred`; `None` if the
    /// instance ended without one.
    pub async fn wait_for(&self, pred: impl FnMut(&InstanceView) -> bool) -> Option<InstanceView> {
        let mut view = self.view.clone();
        let found = view.wait_for(pred).await.ok().map(|v| v.clone());
        found
    }

    /// Resolves when the instance is Ready (Ok) or failed or gone (Err).
    pub async fn wait_ready(&self) -> Result<(), String> {
        let mut view = self.view.clone();
        let result = view
            .wait_for(|v| {
                !matches!(
                    v.state,
                    InstanceState::Starting | InstanceState::Restarting { .. }
                )
            })
            .await;
        match result {
            Ok(v) if v.state == InstanceState::Ready => Ok(()),
            Ok(v) => Err(match &v.failure {
                Some(f) => f.message.clone(),
                None => format!("instance {} is {}", v.instance_id, v.state.name()),
            }),
            Err(_) => Err(format!("instance {} is gone", self.instance_id)),
        }
    }

    /// Resolves when the instance reached a final state (deleted, or failed
    /// with every runner reaped and no restart pending).
    pub async fn wait_settled(&self) -> InstanceView {
        let mut view = self.view.clone();
        let settled = |v: &InstanceView| {
            matches!(v.state, InstanceState::Deleted)
                || (matches!(v.state, InstanceState::Failed { .. })
                    && v.runners.iter().all(|r| r.exit.is_some()))
        };
        let result = view.wait_for(settled).await.map(|v| v.clone());
        result.unwrap_or_else(|_| self.view())
    }

    pub async fn submit(&self, task: TaskSubmit) -> Result<TaskStream, SubmitError> {
        let (reply, rx) = oneshot::channel();
        let gone = || SubmitError::Gone {
            instance: self.instance_id.clone(),
        };
        self.cmds
            .send(Cmd::Submit { task, reply })
            .await
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// Cancels a task; false if the instance has no such task.
    pub async fn cancel(&self, task_id: &str) -> bool {
        let (reply, rx) = oneshot::channel();
        let cmd = Cmd::Cancel {
            task_id: task_id.to_string(),
            reply,
        };
        if self.cmds.send(cmd).await.is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// Three-phase shutdown; returns its report. `drain` overrides the
    /// drain deadline. A second call waits for the same shutdown.
    pub async fn shutdown(
        &self,
        mode: ShutdownMode,
        drain: Option<Duration>,
    ) -> Option<ShutdownReport> {
        let (reply, rx) = oneshot::channel();
        if self
            .cmds
            .send(Cmd::Shutdown { mode, drain, reply })
            .await
            .is_err()
        {
            return self.view().last_shutdown;
        }
        match rx.await {
            Ok(report) => Some(report),
            Err(_) => self.view().last_shutdown,
        }
    }
}

/// Starts an instance; it begins spawning its runners at once.
pub fn start(ctx: Arc<SupervisorContext>, spec: InstanceSpec) -> InstanceHandle {
    let (cmds, cmd_rx) = mpsc::channel(256);
    let view = InstanceView {
        instance_id: spec.instance_id.clone(),
        model: spec.model.clone(),
        model_name: spec.model_name.clone(),
        context_length: spec.context_length,
        state: InstanceState::Starting,
        runners: Vec::new(),
        tasks_in_flight: 0,
        tasks_running: 0,
        tasks_awaiting_kv: 0,
        tasks_waiting: 0,
        limits: spec.limits,
        prefix_cache: PrefixCounts::default(),
        restarts: 0,
        failure: None,
        last_shutdown: None,
    };
    let (view_tx, view_rx) = watch::channel(view);
    let handle = InstanceHandle {
        instance_id: spec.instance_id.clone(),
        cmds: cmds.clone(),
        view: view_rx,
    };
    let restart = RestartPolicy::new(spec.restart.clone());
    let takes = (0..spec.runners as usize)
        .map(|rank| rank == 0 || spec.tasks_to_all_ranks)
        .collect();
    let tasks = TaskTable::new(spec.limits, takes);
    let actor = Actor {
        ctx,
        spec,
        cmds,
        view: view_tx,
        state: InstanceState::Starting,
        slots: Vec::new(),
        events: None,
        tasks,
        task_seq: 0,
        pending_drain: None,
        prefix_cache: PrefixCounts::default(),
        teardown: None,
        failure: None,
        restart,
        epoch: Instant::now(),
        restart_at: None,
        last_shutdown: None,
        delete_requested: false,
        // Each generation starts its own (`spawn_generation`).
        startup: Startup::new(0, Budgets::from(&Timeouts::default()), Instant::now()),
        echo: EchoHold::default(),
        recurs: false,
    };
    tokio::spawn(actor.run(cmd_rx));
    handle
}

struct Slot {
    runner_id: String,
    /// The hosting node, when it is not this one.
    node: Option<String>,
    handle: Option<Link>,
    state: RunnerState,
    history: Vec<RunnerState>,
    hung: Option<Duration>,
    exit: Option<ExitCause>,
    channel: Option<ChannelStats>,
    /// The last progress this runner reported on any task (or when it was
    /// last handed a task while idle): the stall clock.
    progress_at: Instant,
}

impl Slot {
    fn exited(&self) -> bool {
        self.exit.is_some()
    }
}

/// A drain delete waiting for the runners to hold every task they were
/// handed before they are told to stop.
struct PendingDrain {
    drain: Option<Duration>,
    replies: Vec<oneshot::Sender<ShutdownReport>>,
    /// When it stops waiting and signals anyway (the signal deadline).
    until: Instant,
    /// Outcomes delivered meanwhile, for the shutdown report.
    counts: Tally,
}

/// Task outcomes by kind, as the shutdown report counts them.
#[derive(Debug, Clone, Copy, Default)]
struct Tally {
    drained: u32,
    cancelled: u32,
    failed: u32,
}

impl Tally {
    fn of(outcome: &TaskOutcome) -> Tally {
        let mut tally = Tally::default();
        tally.count(outcome);
        tally
    }

    fn count(&mut self, outcome: &TaskOutcome) {
        match outcome {
            TaskOutcome::Completed { .. } => self.drained += 1,
            TaskOutcome::Cancelled { .. } => self.cancelled += 1,
            TaskOutcome::Failed { .. } | TaskOutcome::Invalid { .. } => self.failed += 1,
        }
    }

    fn add_to(self, report: &mut ShutdownReport) {
        report.tasks_drained += self.drained;
        report.tasks_cancelled += self.cancelled;
        report.tasks_failed += self.failed;
    }
}

struct Teardown {
    coordinator: ShutdownCoordinator,
    replies: Vec<oneshot::Sender<ShutdownReport>>,
    /// Set when the teardown follows a failure rather than a request.
    after_failure: bool,
}

struct Actor {
    ctx: Arc<SupervisorContext>,
    spec: InstanceSpec,
    cmds: mpsc::Sender<Cmd>,
    view: watch::Sender<InstanceView>,
    state: InstanceState,
    slots: Vec<Slot>,
    /// Runner events of the current generation.
    events: Option<mpsc::Receiver<(u32, RunnerEvent)>>,
    tasks: TaskTable<mpsc::Sender<TaskEvent>>,
    task_seq: u64,
    pending_drain: Option<PendingDrain>,
    prefix_cache: PrefixCounts,
    teardown: Option<Teardown>,
    failure: Option<FailureReport>,
    restart: RestartPolicy,
    epoch: Instant,
    restart_at: Option<Instant>,
    last_shutdown: Option<ShutdownReport>,
    /// A delete arrived during a failure's teardown: delete, do not restart.
    delete_requested: bool,
    /// This generation's startup barrier and phase deadlines.
    startup: Startup,
    /// A runner's report that its link to a peer broke: usually the echo of
    /// that peer dying, whose own exit names the real cause.
    echo: EchoHold,
    /// A runner of the failed generation reported a failure that recurs:
    /// the teardown ends in `Failed`, without asking the restart policy.
    recurs: bool,
}

impl Actor {
    async fn run(mut self, mut cmd_rx: mpsc::Receiver<Cmd>) {
        self.spawn_generation().await;
        loop {
            self.publish();
            if self.state == InstanceState::Deleted {
                break;
            }
            let wake = self.next_wake();
            tokio::select! {
                biased;
                event = recv_event(&mut self.events) => match event {
                    Some((rank, event)) => self.on_runner_event(rank as usize, event).await,
                    None => self.events = None,
                },
                Some(cmd) = cmd_rx.recv() => self.on_cmd(cmd).await,
                _ = sleep_until_opt(wake) => self.on_clock().await,
            }
            self.pump().await;
            self.check_pending_drain().await;
        }
        // Answer whatever is still queued so no caller waits forever.
        cmd_rx.close();
        while let Ok(cmd) = cmd_rx.try_recv() {
            self.on_cmd(cmd).await;
        }
    }

    fn publish(&self) {
        let runners = self
            .slots
            .iter()
            .enumerate()
            .map(|(rank, s)| RunnerView {
                runner_id: s.runner_id.clone(),
                rank: rank as u32,
                node: s.node.clone().or_else(|| self.ctx.node_id.clone()),
                pid: s.handle.as_ref().map(|h| h.pid()),
                state: s.state.clone(),
                history: s.history.clone(),
                exit: s.exit.map(|e| e.to_string()),
                channel: s
                    .handle
                    .as_ref()
                    .and_then(|h| h.channel_stats())
                    .or_else(|| s.channel.clone()),
            })
            .collect();
        let view = InstanceView {
            instance_id: self.spec.instance_id.clone(),
            model: self.spec.model.clone(),
            model_name: self.spec.model_name.clone(),
            context_length: self.spec.context_length,
            state: self.state.clone(),
            runners,
            tasks_in_flight: self.tasks.len(),
            tasks_running: self.tasks.running(),
            tasks_awaiting_kv: self.tasks.awaiting_room(),
            tasks_waiting: self.tasks.waiting(),
            limits: self.tasks.limits(),
            prefix_cache: self.prefix_cache,
            restarts: self.restart.restarts(),
            failure: self.failure.clone(),
            last_shutdown: self.last_shutdown.clone(),
        };
        self.view.send_replace(view);
    }

    fn takes_tasks(&self, rank: usize) -> bool {
        rank == 0 || self.spec.tasks_to_all_ranks
    }

    /// Whether `rank` has a task in flight it has not finished.
    fn busy(&self, rank: usize) -> bool {
        self.tasks.busy(rank)
    }

    fn exited(&self) -> Vec<bool> {
        self.slots.iter().map(Slot::exited).collect()
    }

    fn heartbeat(&self) -> Heartbeat {
        Heartbeat {
            interval: ms(self.spec.timeouts.ping_interval_ms),
            timeout: ms(self.spec.timeouts.ping_timeout_ms),
        }
    }

    async fn spawn_generation(&mut self) {
        let n = self.spec.runners;
        let (events_tx, events_rx) = mpsc::channel(1024);
        self.events = Some(events_rx);
        self.slots.clear();
        self.state = InstanceState::Starting;
        let now = Instant::now();
        self.startup = Startup::new(n as usize, Budgets::from(&self.spec.timeouts), now);
        let specs: Vec<RunnerSpec> = (0..n)
            .map(|rank| RunnerSpec {
                instance_id: self.spec.instance_id.clone(),
                runner_id: format!("{}/{rank}", self.spec.instance_id),
                rank,
                world_size: n,
                engine_config: self.spec.engine_config.clone(),
                program: self.spec.program.clone(),
                heartbeat: self.heartbeat(),
                extra_env: self.spec.runner_env.clone(),
            })
            .collect();
        let nodes: Vec<Option<String>> = (0..n as usize)
            .map(|rank| self.spec.placement.get(rank).cloned().flatten())
            .collect();
        // Ranks on other nodes start at once, all together (each costs a
        // command round trip); local ones one after another.
        let mut remote: Vec<Option<tokio::task::JoinHandle<Result<_, String>>>> = specs
            .iter()
            .zip(&nodes)
            .map(|(spec, node)| {
                let node = node.clone()?;
                let spawner = self.ctx.remote.as_ref()?;
                let timeout = ms(self.spec.timeouts.spawn_ms);
                Some(tokio::spawn(spawner.spawn(
                    node,
                    spec.clone(),
                    events_tx.clone(),
                    timeout,
                )))
            })
            .collect();
        // Every rank gets its slot before the first failure is acted on, so
        // the teardown stops whatever did start.
        let mut first_failure = None;
        for ((rank, spec), node) in specs.into_iter().enumerate().zip(nodes) {
            let runner_id = spec.runner_id.clone();
            let spawned = match (remote[rank].take(), &node) {
                (Some(join), _) => match join.await {
                    Ok(result) => result.map(Link::Remote),
                    Err(e) => Err(format!("the spawn task failed: {e}")),
                },
                (None, None) => RunnerHandle::spawn(
                    &self.ctx.spawner,
                    &self.ctx.state_dir,
                    spec,
                    events_tx.clone(),
                )
                .await
                .map(Link::Local)
                .map_err(|e| e.to_string()),
                (None, Some(node)) => Err(format!(
                    "placed on node {node}, but this node is not part of a cluster"
                )),
            };
            match spawned {
                Ok(handle) => {
                    tracing::debug!(instance = %self.spec.instance_id, runner = %runner_id, pid = handle.pid(), node = ?node, "runner spawned");
                    self.slots.push(Slot {
                        runner_id,
                        node,
                        handle: Some(handle),
                        state: RunnerState::Idle,
                        history: Vec::new(),
                        hung: None,
                        exit: None,
                        channel: None,
                        progress_at: Instant::now(),
                    });
                }
                Err(error) => {
                    self.startup.spawn_failed(rank);
                    let cause = FailureCause::Spawn { error };
                    self.slots.push(Slot {
                        runner_id,
                        node,
                        handle: None,
                        state: RunnerState::Failed {
                            phase: Phase::Spawning,
                            cause: cause.to_string(),
                            recurs: false,
                            link: false,
                        },
                        history: Vec::new(),
                        hung: None,
                        exit: Some(ExitCause::Code(-1)),
                        channel: None,
                        progress_at: Instant::now(),
                    });
                    first_failure.get_or_insert((rank, cause));
                }
            }
        }
        if let Some((rank, cause)) = first_failure {
            self.fail(rank, Phase::Spawning, cause).await;
        }
    }

    fn next_wake(&self) -> Option<Instant> {
        let mut wake: Option<Instant> = None;
        let mut consider = |t: Instant| wake = Some(wake.map_or(t, |w: Instant| w.min(t)));
        if let Some(t) = self.startup.next_deadline() {
            consider(t);
        }
        if self.state == InstanceState::Ready {
            let stall = ms(self.spec.timeouts.task_stall_ms);
            if let Some(oldest) = (0..self.slots.len())
                .filter(|&r| self.busy(r))
                .map(|r| self.slots[r].progress_at)
                .min()
            {
                consider(oldest + stall);
            }
        }
        if let Some(t) = self
            .teardown
            .as_ref()
            .and_then(|t| t.coordinator.deadline())
        {
            consider(t);
        }
        if let Some(t) = self.restart_at {
            consider(t);
        }
        if let Some(t) = self.echo.deadline() {
            consider(t);
        }
        if let Some(t) = self.tasks.next_held() {
            consider(t);
        }
        if let Some(p) = &self.pending_drain {
            consider(p.until);
        }
        wake
    }

    async fn on_clock(&mut self) {
        let now = Instant::now();
        for (task_id, outcome) in self.tasks.held_due(now) {
            self.finish_task(&task_id, outcome);
        }
        if let Some(blame) = self.echo.due(now) {
            self.fail(blame.rank, blame.phase, blame.cause).await;
        }
        if let Some(teardown) = &mut self.teardown {
            if teardown.coordinator.deadline().is_some_and(|d| now >= d) {
                let actions = teardown.coordinator.on_timeout(now);
                self.perform(actions).await;
            }
        }
        for action in self.startup.on_clock(now) {
            if let StartAction::Overdue {
                rank,
                phase,
                budget_ms,
            } = action
            {
                let cause = FailureCause::Deadline { phase, budget_ms };
                self.fail(rank, phase, cause).await;
            }
        }
        if self.state == InstanceState::Ready {
            let stall = ms(self.spec.timeouts.task_stall_ms);
            let stalled = (0..self.slots.len())
                .find(|&r| self.busy(r) && now >= self.slots[r].progress_at + stall);
            if let Some(rank) = stalled {
                let cause = FailureCause::Stalled {
                    tasks: self.tasks.owed_by(rank),
                    stall_ms: self.spec.timeouts.task_stall_ms,
                };
                self.fail(rank, Phase::Running, cause).await;
            }
        }
        if self.restart_at.is_some_and(|t| now >= t) {
            self.restart_at = None;
            tracing::info!(instance = %self.spec.instance_id, restarts = self.restart.restarts(), "restarting instance");
            self.failure = None;
            if let Some(replace) = &self.spec.replace {
                match replace(&self.spec.placement) {
                    Ok(placement) => {
                        if placement != self.spec.placement {
                            tracing::info!(instance = %self.spec.instance_id, ?placement, "re-placed");
                        }
                        self.spec.placement = placement;
                    }
                    // The spawn on the missing node fails and says why.
                    Err(e) => {
                        tracing::info!(instance = %self.spec.instance_id, error = %e, "cannot re-place")
                    }
                }
            }
            self.spawn_generation().await;
        }
    }

    async fn on_cmd(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Submit { task, reply } => {
                let _ = reply.send(self.admit(task).await);
            }
            Cmd::Cancel { task_id, reply } => {
                let known = self.tasks.contains(&task_id);
                if known {
                    self.cancel_task(&task_id).await;
                }
                let _ = reply.send(known);
            }
            Cmd::ClientGone { task_id } => {
                if self.tasks.contains(&task_id) {
                    tracing::debug!(instance = %self.spec.instance_id, task = %task_id, "client gone: cancelling");
                    self.cancel_task(&task_id).await;
                }
            }
            Cmd::Shutdown { mode, drain, reply } => self.request_shutdown(mode, drain, reply).await,
        }
    }

    async fn admit(&mut self, task: TaskSubmit) -> Result<TaskStream, SubmitError> {
        let instance = self.spec.instance_id.clone();
        match &self.state {
            InstanceState::Ready => {}
            InstanceState::Failed { cause } => {
                return Err(SubmitError::Failed {
                    instance,
                    cause: cause.clone(),
                })
            }
            other => {
                return Err(SubmitError::NotReady {
                    instance,
                    state: other.name(),
                })
            }
        }
        self.task_seq += 1;
        let task_id = format!("{}-t{}", self.spec.instance_id, self.task_seq);
        // Room for every token the task can produce plus its start and
        // outcome: the actor never waits on a slow client, and nothing is
        // dropped.
        // Without a bound, the runner bounds the task by the context; an
        // engine without a context gets the default here.
        let max_tokens = match (task.max_tokens, self.spec.context_length) {
            (None, None) => Some(DEFAULT_MAX_TOKENS),
            (m, _) => m,
        };
        let bound = max_tokens
            .or(self.spec.context_length)
            .unwrap_or(DEFAULT_MAX_TOKENS);
        // Every token, and Started, Prompt, Done and one to spare.
        let (tx, events) = mpsc::channel(bound as usize + 4);
        let request = TaskRequest {
            task_id: task_id.clone(),
            trace_id: task.trace_id.clone(),
            input: task.input,
            max_tokens,
            sampling: task.sampling,
            stop: task.stop,
            report_prompt: task.report_prompt,
        };
        if let Err((full, _)) = self.tasks.admit(request, tx) {
            tracing::debug!(instance = %instance, trace = %task.trace_id, running = full.running, waiting = full.waiting, "task refused: queue full");
            return Err(SubmitError::QueueFull {
                instance,
                running: full.running,
                waiting: full.waiting,
                limits: full.limits,
            });
        }
        tracing::debug!(instance = %instance, task = %task_id, trace = %task.trace_id, waiting = self.tasks.waiting(), "task admitted");
        Ok(TaskStream {
            task_id,
            events,
            cmds: self.cmds.clone(),
            finished: false,
        })
    }

    /// Hands waiting tasks to the runners while they have room (only in
    /// `Ready`; a drain hands them all at once).
    async fn pump(&mut self) {
        while self.state == InstanceState::Ready {
            let Some(request) = self.tasks.next_to_run() else {
                return;
            };
            self.dispatch(request).await;
        }
    }

    /// Sends a task the table moved to running to every rank that takes
    /// tasks.
    async fn dispatch(&mut self, request: TaskRequest) {
        let instance = &self.spec.instance_id;
        let task_id = request.task_id.clone();
        tracing::debug!(instance = %instance, task = %task_id, trace = %request.trace_id, "task dispatched");
        // A runner that was idle starts its stall clock now (the table
        // already counts this task as running on it).
        let now = Instant::now();
        for rank in 0..self.slots.len() {
            if self.takes_tasks(rank) && self.tasks.owed_by(rank) == 1 {
                self.slots[rank].progress_at = now;
            }
        }
        let mut stuck = None;
        for rank in 0..self.slots.len() {
            if !self.takes_tasks(rank) {
                continue;
            }
            let Some(handle) = &self.slots[rank].handle else {
                continue;
            };
            match handle.send(ToRunner::Task(request.clone())).await {
                Ok(()) => {}
                // The runner is going away; its exit event fails the task.
                Err(SendFailure::Closed(e)) => {
                    tracing::debug!(instance = %instance, task = %task_id, error = %e, "task not delivered")
                }
                Err(e @ SendFailure::Stuck(_)) => stuck = stuck.or(Some((rank, e.to_string()))),
            }
        }
        if let Some((rank, error)) = stuck {
            // Fails this task too, through the task table.
            self.fail(rank, Phase::Running, FailureCause::Stuck { error })
                .await;
        }
    }

    async fn cancel_task(&mut self, task_id: &str) {
        if self.tasks.is_waiting(task_id) {
            // It never reached a runner.
            self.finish_task(
                task_id,
                TaskOutcome::Cancelled {
                    reason: ipc::proto::CANCELLED_BY_CLIENT.into(),
                },
            );
            return;
        }
        for slot in &self.slots {
            if let Some(handle) = &slot.handle {
                handle
                    .control(Control::Cancel {
                        task_id: task_id.to_string(),
                    })
                    .await;
            }
        }
    }

    /// Delivers a task's outcome and forgets the task.
    fn finish_task(&mut self, task_id: &str, outcome: TaskOutcome) {
        let Some(tx) = self.tasks.finish(task_id) else {
            return;
        };
        if let Some(teardown) = &mut self.teardown {
            Tally::of(&outcome).add_to(teardown.coordinator.report_mut());
        } else if let Some(pending) = &mut self.pending_drain {
            pending.counts.count(&outcome);
        }
        tracing::debug!(instance = %self.spec.instance_id, task = %task_id, ?outcome, "task finished");
        // The client may be gone; the outcome then has nobody to reach.
        let _ = tx.try_send(TaskEvent::Done(outcome));
    }

    /// Hands a task event to the task's stream; a stream that cannot take
    /// it (the client went away, or stopped reading) cancels the task.
    async fn deliver(&mut self, task_id: &str, event: TaskEvent) {
        let Some(entry) = self.tasks.running_task(task_id) else {
            return;
        };
        if entry.sink.try_send(event).is_err() {
            self.cancel_task(task_id).await;
        }
    }

    async fn on_runner_event(&mut self, rank: usize, event: RunnerEvent) {
        let now = Instant::now();
        if let RunnerEvent::Message(
            FromRunner::TaskStarted { .. }
            | FromRunner::TaskAwaitsRoom { .. }
            | FromRunner::TaskProgress { .. }
            | FromRunner::Stepping { .. }
            | FromRunner::Prompt { .. }
            | FromRunner::Token { .. }
            | FromRunner::TaskDone { .. },
        ) = &event
        {
            // Any word about any task is progress: the stall clock.
            self.slots[rank].progress_at = now;
        }
        if let RunnerEvent::Message(FromRunner::TaskStarted { task_id, .. }) = &event {
            self.tasks.on_started(task_id, rank);
        }
        if let RunnerEvent::Message(FromRunner::TaskAwaitsRoom { task_id }) = &event {
            if rank == 0 {
                self.tasks.on_awaits_room(task_id);
            }
        }
        match event {
            RunnerEvent::Message(FromRunner::Hello { data_addr }) => {
                self.startup.on_hello(rank, data_addr)
            }
            RunnerEvent::Message(FromRunner::Status(state)) => self.on_status(rank, state).await,
            // Rank 0 starts each task once; other ranks' starts (scripted
            // instances) are progress only.
            RunnerEvent::Message(FromRunner::TaskStarted {
                task_id,
                prompt_tokens,
                cached_tokens,
            }) if rank == 0 => {
                if let Some(cached) = cached_tokens {
                    let counts = &mut self.prefix_cache;
                    if cached > 0 {
                        counts.hits += 1;
                        counts.cached_tokens += u64::from(cached);
                    } else {
                        counts.misses += 1;
                    }
                }
                let started = TaskEvent::Started {
                    prompt_tokens,
                    cached_tokens,
                };
                self.deliver(&task_id, started).await
            }
            RunnerEvent::Message(FromRunner::Prompt {
                task_id,
                tokens,
                logprobs,
            }) if rank == 0 => {
                self.deliver(&task_id, TaskEvent::Prompt { tokens, logprobs })
                    .await
            }
            // Progress only (the stall clock, above); a wait for KV room
            // is in the task table (above).
            RunnerEvent::Message(
                FromRunner::TaskAwaitsRoom { .. }
                | FromRunner::TaskStarted { .. }
                | FromRunner::TaskProgress { .. }
                | FromRunner::Stepping { .. }
                | FromRunner::Prompt { .. },
            ) => {}
            RunnerEvent::Message(FromRunner::Token {
                task_id,
                text,
                logprobs,
                ..
            }) => {
                self.deliver(&task_id, TaskEvent::Token { text, logprobs })
                    .await
            }
            RunnerEvent::Message(FromRunner::TaskDone { task_id, outcome }) => {
                // An echo of a broken link waits for the peer's own exit,
                // unless a teardown is already under way.
                let hold = self.teardown.is_none().then_some(now + LINK_LOSS_GRACE);
                let exited = self.exited();
                if let Done::Finished(outcome) =
                    self.tasks.on_done(&task_id, rank, outcome, &exited, hold)
                {
                    self.finish_task(&task_id, outcome);
                }
            }
            RunnerEvent::Message(FromRunner::Released(released)) => {
                if let Some(teardown) = &mut self.teardown {
                    teardown.coordinator.on_released(rank, released);
                }
            }
            RunnerEvent::Message(FromRunner::Rejected { request, reason }) => {
                let phase = self.phase_of(rank);
                self.fail(rank, phase, FailureCause::Rejected { request, reason })
                    .await;
            }
            RunnerEvent::Ended { reason } => {
                if let Some(teardown) = &mut self.teardown {
                    let actions = teardown.coordinator.on_ended(rank, now);
                    self.perform(actions).await;
                } else {
                    let phase = self.slots[rank].state.phase();
                    self.fail(rank, phase, FailureCause::EndedUnasked { reason })
                        .await;
                }
            }
            RunnerEvent::Hung { silent_for } => {
                self.slots[rank].hung = Some(silent_for);
            }
            RunnerEvent::Exited {
                cause,
                channel,
                stop,
            } => self.on_exited(rank, cause, channel, stop).await,
        }
    }

    async fn on_status(&mut self, rank: usize, state: RunnerState) {
        let now = Instant::now();
        let slot = &mut self.slots[rank];
        slot.history.push(state.clone());
        slot.state = state.clone();
        for action in self.startup.on_status(rank, &state, now) {
            match action {
                StartAction::Send { rank, msg } => {
                    let Some(handle) = &self.slots[rank].handle else {
                        continue;
                    };
                    if let Err(e @ SendFailure::Stuck(_)) = handle.send(msg).await {
                        let phase = self.phase_of(rank);
                        let cause = FailureCause::Stuck {
                            error: e.to_string(),
                        };
                        self.fail(rank, phase, cause).await;
                        return;
                    }
                }
                StartAction::Ready if self.state == InstanceState::Starting => {
                    tracing::info!(instance = %self.spec.instance_id, runners = self.slots.len(), "instance ready");
                    self.state = InstanceState::Ready;
                    self.restart.on_ready(now - self.epoch);
                }
                StartAction::Ready | StartAction::Overdue { .. } => {}
            }
        }
        match state {
            RunnerState::ShuttingDown => {
                if let Some(teardown) = &mut self.teardown {
                    let actions = teardown.coordinator.on_ack(rank, now);
                    self.perform(actions).await;
                }
            }
            // The first lost-link report is held for the peer's own exit;
            // during a teardown such an echo changes nothing.
            RunnerState::Failed {
                phase,
                cause,
                link: true,
                ..
            } if self.teardown.is_none() => self.echo.hold(rank, phase, cause, now),
            RunnerState::Failed {
                phase,
                cause,
                recurs,
                link: false,
            } => {
                // Restarting cannot help a start that fails the same way.
                self.recurs |= recurs;
                self.fail(rank, phase, FailureCause::Reported { cause })
                    .await
            }
            _ => {}
        }
    }

    async fn on_exited(
        &mut self,
        rank: usize,
        cause: ExitCause,
        channel: ChannelEnd,
        stop: Option<StopOutcome>,
    ) {
        let now = Instant::now();
        let phase = self.phase_of(rank);
        self.startup.on_exited(rank);
        let slot = &mut self.slots[rank];
        slot.exit = Some(cause);
        slot.channel = slot.handle.as_ref().and_then(|h| h.channel_stats());
        let what = FailureCause::of_exit(cause, &channel, slot.hung, slot.node.as_deref());
        if self.teardown.is_none() {
            // A runner ended while the instance was starting or serving.
            self.fail(rank, phase, what.clone()).await;
        }

        // Tasks that were waiting only for this runner are now decided.
        for (task_id, outcome) in self.tasks.decided(&self.exited()) {
            let outcome = outcome.unwrap_or(TaskOutcome::failed(format!(
                "runner {} exited with {cause}",
                self.slots[rank].runner_id
            )));
            self.finish_task(&task_id, outcome);
        }
        if let Some(teardown) = &mut self.teardown {
            let detail = format!("failed in phase {phase}: {what}");
            let mut actions = teardown
                .coordinator
                .on_exited(rank, cause, stop, Some(detail), now);
            if cause == ExitCause::NodeLost {
                // The other runners' data-plane links to the lost node may
                // be silent (a partition, not a crash): they cannot finish
                // anything and would only sit out the drain deadline.
                actions.extend(teardown.coordinator.stop_all(&what.to_string(), now));
            }
            self.perform(actions).await;
        }
        self.slots[rank].handle = None;
        self.check_teardown_done().await;
    }

    /// The phase `rank` is in as far as the node knows: the one it was
    /// asked to enter (its deadline) even if it died before confirming.
    fn phase_of(&self, rank: usize) -> Phase {
        self.startup
            .pending_phase(rank)
            .unwrap_or_else(|| self.slots[rank].state.phase())
    }

    /// Fail-stop: the instance fails because of runner `rank`.
    async fn fail(&mut self, rank: usize, phase: Phase, cause: FailureCause) {
        let now = Instant::now();
        self.echo.clear();
        let phase = blamed_phase(phase, !self.tasks.is_empty());
        let slot = &self.slots[rank];
        let runner_id = slot.runner_id.clone();
        if let Some(teardown) = &mut self.teardown {
            // Already tearing down: stop this runner without waiting.
            let why = format!("runner {runner_id} failed in phase {phase}: {cause}");
            let actions = teardown.coordinator.on_failed(rank, why, now);
            self.perform(actions).await;
            return;
        }
        let stderr_tail = slot
            .handle
            .as_ref()
            .map(|h| h.stderr_tail(5))
            .unwrap_or_default();
        let not_ready: Vec<String> = self
            .slots
            .iter()
            .filter(|s| {
                s.state != RunnerState::Ready && !matches!(s.state, RunnerState::Running { .. })
            })
            .map(|s| format!("{} ({})", s.runner_id, s.state.name()))
            .collect();
        let starting = self.state == InstanceState::Starting;
        let blame = Blame { rank, phase, cause };
        let report = FailureReport::new(
            &runner_id,
            &blame,
            starting,
            not_ready,
            stderr_tail,
            self.recurs,
        );
        let message = report.message.clone();
        let cause = blame.cause;
        tracing::error!(instance = %self.spec.instance_id, runner = %runner_id, %phase, kind = ?report.kind, "{message}");
        self.failure = Some(report);
        self.state = InstanceState::Failed {
            cause: message.clone(),
        };
        for task_id in self.tasks.ids() {
            self.finish_task(&task_id, TaskOutcome::failed(message.clone()));
        }
        self.begin_teardown(
            ShutdownMode::Cancel,
            None,
            format!("failure: {message}"),
            true,
        )
        .await;
        if let Some(pending) = self.pending_drain.take() {
            // A delete was under way: the failure's teardown ends it.
            self.delete_requested = true;
            self.add_counts(pending.replies, pending.counts);
        }
        if !self.slots[rank].exited() {
            if let Some(teardown) = &mut self.teardown {
                // The failed runner is stopped at once, without waiting
                // for the phase deadlines.
                let actions = teardown.coordinator.on_failed(
                    rank,
                    format!("runner {runner_id} failed: {cause}"),
                    now,
                );
                self.perform(actions).await;
            }
        }
    }

    async fn request_shutdown(
        &mut self,
        mode: ShutdownMode,
        drain: Option<Duration>,
        reply: oneshot::Sender<ShutdownReport>,
    ) {
        if let Some(teardown) = &mut self.teardown {
            // Wait for the running teardown; one that follows a failure then
            // deletes the instance instead of restarting it.
            teardown.replies.push(reply);
            self.delete_requested |= teardown.after_failure;
            return;
        }
        if let Some(pending) = &mut self.pending_drain {
            pending.replies.push(reply);
            if mode == ShutdownMode::Cancel {
                // A cancel overrides the drain that was getting ready.
                let pending = self.pending_drain.take().expect("checked above");
                self.begin_cancel(pending.replies, pending.counts).await;
            }
            return;
        }
        match self.state {
            InstanceState::Failed { .. }
            | InstanceState::Restarting { .. }
            | InstanceState::Deleted => {
                self.restart_at = None;
                self.state = InstanceState::Deleted;
                let report = self
                    .last_shutdown
                    .clone()
                    .unwrap_or_else(|| self.empty_report(mode));
                let _ = reply.send(report);
            }
            _ if mode == ShutdownMode::Drain && !self.tasks.is_empty() => {
                // Every admitted task finishes: the waiting ones go to the
                // runners now, and the runners are told to stop once they
                // hold them all (check_pending_drain).
                self.state = InstanceState::ShuttingDown {
                    phase: ShutdownPhase::Signaling,
                };
                self.pending_drain = Some(PendingDrain {
                    drain,
                    replies: vec![reply],
                    until: Instant::now() + ms(self.spec.timeouts.signal_ms),
                    counts: Tally::default(),
                });
                for request in self.tasks.start_all() {
                    self.dispatch(request).await;
                }
                self.check_pending_drain().await;
            }
            _ if mode == ShutdownMode::Cancel => {
                self.begin_cancel(vec![reply], Tally::default()).await
            }
            _ => {
                self.begin_teardown(mode, drain, "requested".into(), false)
                    .await;
                if let Some(teardown) = &mut self.teardown {
                    teardown.replies.push(reply);
                }
                self.check_teardown_done().await;
            }
        }
    }

    /// A cancel delete: the runners cancel what they run, the node what
    /// waits.
    async fn begin_cancel(&mut self, replies: Vec<oneshot::Sender<ShutdownReport>>, counts: Tally) {
        self.begin_teardown(ShutdownMode::Cancel, None, "requested".into(), false)
            .await;
        self.add_counts(replies, counts);
        for task_id in self.tasks.ids() {
            if self.tasks.is_waiting(&task_id) {
                self.finish_task(
                    &task_id,
                    TaskOutcome::Cancelled {
                        reason: ipc::proto::CANCELLED_BY_SHUTDOWN.into(),
                    },
                );
            }
        }
        self.check_teardown_done().await;
    }

    /// Hands a pending drain's callers and counts to the teardown that
    /// began.
    fn add_counts(&mut self, replies: Vec<oneshot::Sender<ShutdownReport>>, counts: Tally) {
        if let Some(teardown) = &mut self.teardown {
            teardown.replies.extend(replies);
            counts.add_to(teardown.coordinator.report_mut());
        }
    }

    /// A drain delete tells the runners to stop once each holds every task
    /// it was handed, or at the signal deadline whatever they hold.
    async fn check_pending_drain(&mut self) {
        let Some(pending) = &self.pending_drain else {
            return;
        };
        let all_held = self.tasks.all_held(&self.exited());
        if !all_held && Instant::now() < pending.until {
            return;
        }
        let pending = self.pending_drain.take().expect("checked above");
        self.begin_teardown(
            ShutdownMode::Drain,
            pending.drain,
            "requested".into(),
            false,
        )
        .await;
        self.add_counts(pending.replies, pending.counts);
        self.check_teardown_done().await;
    }

    fn empty_report(&self, mode: ShutdownMode) -> ShutdownReport {
        let mut coordinator = ShutdownCoordinator::new(
            &self.spec.instance_id,
            Vec::new(),
            &[],
            mode,
            "nothing running".into(),
            self.deadlines(None),
            Instant::now(),
        );
        coordinator.report_mut().clone()
    }

    fn deadlines(&self, drain: Option<Duration>) -> ShutdownDeadlines {
        let t = &self.spec.timeouts;
        ShutdownDeadlines {
            signal: ms(t.signal_ms),
            // The runner enforces the drain deadline itself (cancelling what
            // is left); the node allows a margin for that to arrive.
            drain: drain.unwrap_or(ms(t.drain_ms)) + ms(t.signal_ms),
            close: ms(t.close_ms),
        }
    }

    async fn begin_teardown(
        &mut self,
        mode: ShutdownMode,
        drain: Option<Duration>,
        reason: String,
        after_failure: bool,
    ) {
        let now = Instant::now();
        let deadlines = self.deadlines(drain);
        let runner_drain = drain.unwrap_or(ms(self.spec.timeouts.drain_ms));
        let exited: Vec<bool> = self.slots.iter().map(|s| s.exited()).collect();
        let ids = self.slots.iter().map(|s| s.runner_id.clone()).collect();
        let coordinator = ShutdownCoordinator::new(
            &self.spec.instance_id,
            ids,
            &exited,
            mode,
            reason.clone(),
            deadlines,
            now,
        );
        if !after_failure {
            tracing::info!(instance = %self.spec.instance_id, ?mode, "shutting down");
            self.state = InstanceState::ShuttingDown {
                phase: ShutdownPhase::Signaling,
            };
        }
        self.teardown = Some(Teardown {
            coordinator,
            replies: Vec::new(),
            after_failure,
        });
        self.startup.stop();
        for slot in &self.slots {
            if let Some(handle) = &slot.handle {
                let shutdown = Control::Shutdown {
                    mode,
                    deadline_ms: runner_drain.as_millis() as u64,
                };
                handle.control(shutdown).await;
            }
        }
    }

    async fn perform(&mut self, actions: Vec<Action>) {
        let grace = ms(self.spec.timeouts.term_grace_ms);
        for action in actions {
            match action {
                Action::Close(rank) => {
                    if let Some(handle) = &self.slots[rank].handle {
                        handle.close("shutdown").await;
                    }
                }
                Action::Terminate { rank, term_first } => {
                    if let Some(handle) = &self.slots[rank].handle {
                        handle.request_terminate(term_first, grace);
                    }
                }
            }
        }
        if let Some(teardown) = &self.teardown {
            if !teardown.after_failure && !teardown.coordinator.is_done() {
                self.state = InstanceState::ShuttingDown {
                    phase: teardown.coordinator.phase(),
                };
            }
        }
    }

    async fn check_teardown_done(&mut self) {
        let done = self
            .teardown
            .as_ref()
            .is_some_and(|t| t.coordinator.is_done());
        if !done {
            return;
        }
        let Some(mut teardown) = self.teardown.take() else {
            return;
        };
        // Any task still open has no runner left to finish it.
        for task_id in self.tasks.ids() {
            self.finish_task(&task_id, TaskOutcome::failed("instance shut down"));
        }
        let report = teardown.coordinator.report_mut().clone();
        if report.is_clean() || teardown.after_failure {
            tracing::info!(instance = %self.spec.instance_id, total_ms = report.total_ms, "shutdown complete");
        } else {
            tracing::warn!(instance = %self.spec.instance_id, escalations = ?report.escalations, errors = ?report.errors, "shutdown completed with escalations or errors");
        }
        self.last_shutdown = Some(report.clone());
        for reply in teardown.replies.drain(..) {
            let _ = reply.send(report.clone());
        }
        if !teardown.after_failure || self.delete_requested {
            self.state = InstanceState::Deleted;
            return;
        }
        if std::mem::take(&mut self.recurs) {
            if let InstanceState::Failed { cause } = &mut self.state {
                cause.push_str("; not restarted: the same start would fail the same way (fix or replace the model, then create the instance again)");
            }
            return;
        }
        let now = Instant::now();
        match self.restart.on_failure(now - self.epoch) {
            RestartDecision::RestartAfter(backoff) => {
                self.state = InstanceState::Restarting {
                    attempt: self.restart.restarts(),
                    backoff_ms: backoff.as_millis() as u64,
                };
                self.restart_at = Some(now + backoff);
            }
            RestartDecision::GiveUp { restarts, window } => {
                if let InstanceState::Failed { cause } = &mut self.state {
                    if self.spec.restart.max_restarts > 0 {
                        cause.push_str(&format!(
                            "; gave up after {restarts} restarts within {} s",
                            window.as_secs()
                        ));
                    }
                }
            }
        }
    }
}

async fn recv_event(
    events: &mut Option<mpsc::Receiver<(u32, RunnerEvent)>>,
) -> Option<(u32, RunnerEvent)> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
