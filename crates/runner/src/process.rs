//! The runner's main loop: one task owns the node channel and the runner
//! state; the engine runs on its own thread and reports through a bounded
//! queue; faults fire at phase boundaries.
//!
//! Invariants:
//! * Every status change is sent to the node in order, so the node sees the
//!   exact state sequence (`lifecycle`).
//! * Every task admitted gets exactly one `TaskDone`, from the engine thread
//!   (completed, cancelled or failed); a message that does not fit the
//!   state gets a `Rejected` reply (a task gets a failed `TaskDone`).
//! * The runner exits 0 only after `Status(Shutdown)` and its `End` were
//!   flushed and the node's `End` arrived (or the close deadline passed);
//!   on `PeerLost` from the node it exits 2 at once.

use std::collections::HashMap;
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ipc::proto::{FromRunner, Phase, ReleasedResource, RunnerState, TaskOutcome, ToRunner};
use ipc::{ChannelConfig, Control, Incoming, ShutdownMode};
use supervisor::resources::{CleanupReport, CleanupResult, ResourceRegistry};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::engine_thread::{
    spawn_engine, EngineCmd, EngineEvent, EngineThread, PhaseError, CANCEL_CLIENT, CANCEL_DEADLINE,
    CANCEL_NONE, CANCEL_SHUTDOWN,
};
use crate::fault::{FaultKind, FaultSpec};
use crate::lifecycle;
use crate::model::{EngineNotice, ModelEngine, ModelEngineArgs};
use crate::scripted::{ScriptedConfig, ScriptedEngine};

/// The node channel, inherited as this fd.
pub const IPC_FD: i32 = 3;
/// The runner's lock file (held for the runner's life), inherited as this fd.
pub const LOCK_FD: i32 = 4;

/// How long the runner waits for the node's `End` after sending its own.
const CLOSE_WAIT: Duration = Duration::from_secs(5);
/// How long releasing one resource may take before it is abandoned.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct RunnerArgs {
    pub instance_id: String,
    pub runner_id: String,
    pub rank: u32,
    pub world_size: u32,
    /// Engine configuration as JSON (the scripted engine's for now).
    pub engine_config: String,
}

/// Which engine a runner runs, as the node sends it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EngineConfig {
    Scripted(ScriptedConfig),
    Model(ModelEngineArgs),
}

/// Runs the runner process to its end; returns the exit code.
pub fn run(args: RunnerArgs) -> i32 {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runner {}: cannot start its runtime: {e}", args.runner_id);
            return 1;
        }
    };
    let span = tracing::info_span!(
        "runner",
        instance = %args.instance_id,
        runner = %args.runner_id,
        rank = args.rank
    );
    let _entered = span.enter();
    runtime.block_on(main_loop(args))
}

/// Cancels of not-yet-seen tasks remembered at most.
const EARLY_CANCELS: usize = 64;

struct Runner {
    args: RunnerArgs,
    tx: ipc::Sender<FromRunner>,
    state: RunnerState,
    engine: Option<std::sync::mpsc::Sender<EngineCmd>>,
    engine_thread: Option<EngineThread>,
    tasks: HashMap<String, Arc<AtomicU8>>,
    /// Cancels that arrived before their task: control frames overtake
    /// data, so a cancel sent right after its task can be read first. The
    /// most recent [`EARLY_CANCELS`] are kept and applied when the task
    /// arrives.
    early_cancels: std::collections::VecDeque<String>,
    fault: Option<FaultSpec>,
    /// Set by `ignore_sigterm`: only pings are answered from then on.
    stalled: bool,
    slow_drain: Option<Duration>,
    shutdown: Option<ShutdownPlan>,
    /// When the last `Stepping` went out.
    stepping_said: Instant,
}

struct ShutdownPlan {
    drain_deadline: Instant,
    /// Draining may finish only from this instant (slow_drain).
    drain_from: Instant,
    /// Set once our `End` is queued.
    close_deadline: Option<Instant>,
    deadline_passed: bool,
    /// Resources are being released.
    releasing: bool,
}

impl Runner {
    async fn send(&self, msg: FromRunner) {
        if let Err(e) = self.tx.send(msg).await {
            // Only possible once the node is gone; the receive side reports
            // that as PeerLost and the runner exits there.
            tracing::debug!(error = %e, "message to node not sent");
        }
    }

    async fn set_state(&mut self, state: RunnerState) {
        tracing::debug!(state = state.name(), "state");
        self.state = state.clone();
        self.send(FromRunner::Status(state)).await;
    }

    fn engine(&self, cmd: EngineCmd) {
        if let Some(engine) = &self.engine {
            // The engine thread only stops when this sender is dropped.
            let _ = engine.send(cmd);
        }
    }

    /// Fires the scripted fault if it is for this runner and this phase.
    /// What the runner already said is flushed first, so the node has seen
    /// the phase the fault is injected in.
    async fn maybe_fault(&mut self, phase: Phase) {
        let Some(fault) = &self.fault else { return };
        if fault.runner != self.args.rank || fault.phase != phase {
            return;
        }
        let kind = fault.kind.clone();
        self.fault = None;
        let _ = tokio::time::timeout(Duration::from_secs(1), self.tx.flushed()).await;
        let at = phase;
        eprintln!("scripted fault: {} at {at}", kind.name());
        match kind {
            FaultKind::Panic => panic!("scripted fault: panic at {at}"),
            FaultKind::Exit { code } => std::process::exit(code),
            FaultKind::Abort => std::process::abort(),
            FaultKind::Kill => {
                // SAFETY: kill(2) with our own pid and a valid signal number.
                unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            }
            FaultKind::Hang => loop {
                std::thread::sleep(Duration::from_secs(3600));
            },
            FaultKind::IgnoreSigterm => {
                // SAFETY: installing SIG_IGN for SIGTERM has no preconditions.
                unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) };
                self.stalled = true;
            }
            FaultKind::Garbage => write_raw(&[5, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff]),
            FaultKind::OversizeFrame => write_raw(&(1u32 << 30).to_le_bytes()),
            FaultKind::SlowDrain { delay_ms } => {
                self.slow_drain = Some(Duration::from_millis(delay_ms))
            }
        }
    }

    async fn on_data(&mut self, msg: ToRunner) {
        if let Err(reason) = lifecycle::admit(&self.state, &msg) {
            tracing::debug!(%reason, "rejected");
            match msg {
                ToRunner::Task(request) => {
                    self.send(FromRunner::TaskDone {
                        task_id: request.task_id,
                        outcome: TaskOutcome::failed(format!(
                            "runner {}: {reason}",
                            self.args.runner_id
                        )),
                    })
                    .await
                }
                other => {
                    let request = lifecycle::request_name(&other).to_string();
                    self.send(FromRunner::Rejected { request, reason }).await
                }
            }
            return;
        }
        match msg {
            ToRunner::Connect { peers, deadline_ms } => {
                self.set_state(RunnerState::Connecting).await;
                self.maybe_fault(Phase::Connecting).await;
                self.engine(EngineCmd::Connect(
                    peers,
                    Duration::from_millis(deadline_ms),
                ));
            }
            ToRunner::Load => {
                self.set_state(RunnerState::Loading { done: 0, total: 0 })
                    .await;
                self.maybe_fault(Phase::Loading).await;
                self.engine(EngineCmd::Load);
            }
            ToRunner::WarmUp => {
                self.set_state(RunnerState::WarmingUp).await;
                self.maybe_fault(Phase::WarmingUp).await;
                self.engine(EngineCmd::WarmUp);
            }
            ToRunner::Task(request) => {
                tracing::debug!(task = %request.task_id, trace = %request.trace_id, "task admitted");
                let early = self
                    .early_cancels
                    .iter()
                    .position(|t| *t == request.task_id);
                let flag = match early.and_then(|i| self.early_cancels.remove(i)) {
                    Some(_) => CANCEL_CLIENT,
                    None => CANCEL_NONE,
                };
                let cancel = Arc::new(AtomicU8::new(flag));
                self.tasks.insert(request.task_id.clone(), cancel.clone());
                let n = self.tasks.len() as u32;
                self.set_state(RunnerState::Running { tasks: n }).await;
                self.engine(EngineCmd::Start(request, cancel));
            }
        }
    }

    async fn on_engine(&mut self, event: EngineEvent) {
        match event {
            EngineEvent::StageStep => self.maybe_fault(Phase::Running).await,
            EngineEvent::Fatal(e) => {
                let phase = self.state.phase();
                tracing::error!(%phase, cause = %e, "engine failed");
                let failed = RunnerState::Failed {
                    phase,
                    cause: e.to_string(),
                    recurs: false,
                    link: e.is_link(),
                };
                self.set_state(failed).await;
            }
            EngineEvent::Progress { done, total } => {
                if matches!(self.state, RunnerState::Loading { .. }) {
                    self.set_state(RunnerState::Loading { done, total }).await;
                }
            }
            EngineEvent::PhaseDone {
                phase,
                result:
                    Err(PhaseError {
                        cause,
                        recurs,
                        link,
                    }),
            } => {
                tracing::error!(%phase, %cause, recurs, "phase failed");
                let failed = RunnerState::Failed {
                    phase,
                    cause,
                    recurs,
                    link,
                };
                self.set_state(failed).await;
            }
            EngineEvent::PhaseDone {
                phase,
                result: Ok(()),
            } => match phase {
                Phase::Connecting => self.set_state(RunnerState::Connected).await,
                Phase::Loading => self.set_state(RunnerState::Loaded).await,
                Phase::WarmingUp => {
                    self.set_state(RunnerState::Ready).await;
                    self.maybe_fault(Phase::Ready).await;
                }
                _ => {}
            },
            EngineEvent::AwaitsRoom { task_id } => {
                self.send(FromRunner::TaskAwaitsRoom { task_id }).await
            }
            EngineEvent::Started {
                task_id,
                prompt_tokens,
                cached_tokens,
            } => {
                self.send(FromRunner::TaskStarted {
                    task_id,
                    prompt_tokens,
                    cached_tokens,
                })
                .await
            }
            EngineEvent::Prompt {
                task_id,
                tokens,
                logprobs,
            } => {
                self.send(FromRunner::Prompt {
                    task_id,
                    tokens,
                    logprobs,
                })
                .await
            }
            EngineEvent::Prefilled {
                task_id,
                done,
                total,
            } => {
                self.maybe_fault(Phase::Running).await;
                self.send(FromRunner::TaskProgress {
                    task_id,
                    prompt_done: done,
                    prompt_total: total,
                })
                .await
            }
            EngineEvent::Step {
                task_id,
                index,
                text,
            } => {
                self.maybe_fault(Phase::Running).await;
                if let Some((text, logprobs)) = text {
                    self.send(FromRunner::Token {
                        task_id,
                        index,
                        text,
                        logprobs,
                    })
                    .await;
                } else if self.stepping_said.elapsed()
                    >= Duration::from_millis(ipc::proto::STEPPING_EVERY_MS)
                {
                    // No token to show for the step: say it happened, or
                    // the node takes a long task for a stall.
                    self.stepping_said = Instant::now();
                    let tasks = self.tasks.len() as u32;
                    self.send(FromRunner::Stepping { tasks }).await;
                }
            }
            EngineEvent::TaskDone { task_id, outcome } => {
                self.tasks.remove(&task_id);
                tracing::debug!(task = %task_id, ?outcome, "task done");
                self.send(FromRunner::TaskDone { task_id, outcome }).await;
                if self.shutdown.is_none() {
                    let state = match self.tasks.len() as u32 {
                        0 => RunnerState::Ready,
                        n => RunnerState::Running { tasks: n },
                    };
                    self.set_state(state).await;
                }
            }
        }
    }

    /// The next instant the shutdown plan needs the loop to wake up at.
    fn next_wake(&self) -> Option<Instant> {
        let plan = self.shutdown.as_ref()?;
        if let Some(close) = plan.close_deadline {
            return Some(close);
        }
        let drain_deadline = (!plan.deadline_passed).then_some(plan.drain_deadline);
        let drain_from = (Instant::now() < plan.drain_from).then_some(plan.drain_from);
        match (drain_deadline, drain_from) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn cancel_all(&self, code: u8) {
        for flag in self.tasks.values() {
            let _ = flag.compare_exchange(CANCEL_NONE, code, Ordering::AcqRel, Ordering::Acquire);
        }
    }

    async fn begin_shutdown(&mut self, mode: ShutdownMode, deadline: Duration) {
        if let Some(_plan) = &self.shutdown {
            if mode == ShutdownMode::Cancel {
                self.cancel_all(CANCEL_SHUTDOWN);
            }
            return;
        }
        self.maybe_fault(Phase::ShuttingDown).await;
        if self.stalled {
            return;
        }
        let now = Instant::now();
        self.shutdown = Some(ShutdownPlan {
            drain_deadline: now + deadline,
            drain_from: now + self.slow_drain.unwrap_or_default(),
            close_deadline: None,
            deadline_passed: false,
            releasing: false,
        });
        tracing::debug!(
            ?mode,
            deadline_ms = deadline.as_millis() as u64,
            tasks = self.tasks.len(),
            "shutting down"
        );
        self.set_state(RunnerState::ShuttingDown).await;
        if mode == ShutdownMode::Cancel {
            self.cancel_all(CANCEL_SHUTDOWN);
        }
    }

    /// Finishes the drain once every task has its outcome: the last status,
    /// then `End`. Returns true when `End` was queued now.
    /// Once every task has its outcome, starts releasing the runner's
    /// resources in a task of its own, so the loop keeps answering pings
    /// while peers finish ending their links; returns where the report will
    /// arrive.
    fn maybe_start_release(&mut self) -> Option<oneshot::Receiver<CleanupReport>> {
        let ready = match &self.shutdown {
            Some(plan) => {
                !plan.releasing
                    && plan.close_deadline.is_none()
                    && self.tasks.is_empty()
                    && Instant::now() >= plan.drain_from
            }
            None => false,
        };
        if !ready {
            return None;
        }
        if let Some(plan) = &mut self.shutdown {
            plan.releasing = true;
        }
        // Release in reverse dependency order (invariant 8, reverse-dependency cleanup). Today the
        // engine (its thread and model) is the one resource besides the
        // node channel, which closes last, after the report went out on it.
        let mut registry = ResourceRegistry::new();
        let engine = self.engine.take();
        let thread = self.engine_thread.take();
        // A stage's engine waits for its upstream to end, which takes as
        // long as rank 0's drain: allow the rest of the drain deadline.
        let drain_left = self
            .shutdown
            .as_ref()
            .map(|p| p.drain_deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_default();
        let registered =
            registry.register("engine", &[], drain_left + RELEASE_TIMEOUT, move || {
                Box::pin(async move {
                    // The engine thread ends when its command queue closes; it is
                    // idle (no tasks), so joining it is immediate.
                    drop(engine);
                    match thread {
                        Some(thread) => {
                            match tokio::task::spawn_blocking(move || thread.join()).await {
                                Ok(Ok(Ok(()))) => Ok(()),
                                Ok(Ok(Err(e))) => Err(e),
                                Ok(Err(_)) => Err("engine thread panicked".to_string()),
                                Err(e) => Err(format!("cannot join the engine thread: {e}")),
                            }
                        }
                        None => Ok(()),
                    }
                })
            });
        if let Err(e) = registered {
            tracing::error!(error = %e, "cannot register the engine for release");
        }
        let (report_tx, report_rx) = oneshot::channel();
        tokio::spawn(async move {
            let _ = report_tx.send(registry.cleanup_all().await);
        });
        Some(report_rx)
    }

    /// The release finished: report it, say `Shutdown`, and end the stream.
    async fn finish_close(&mut self, report: CleanupReport) {
        let released = report
            .entries
            .into_iter()
            .map(|entry| ReleasedResource {
                name: entry.name,
                duration_ms: entry.duration.as_secs_f64() * 1000.0,
                error: match entry.result {
                    CleanupResult::Ok => None,
                    CleanupResult::Failed(e) => Some(e),
                    CleanupResult::TimedOut(t) => {
                        Some(format!("not released within {} ms", t.as_millis()))
                    }
                },
            })
            .collect();
        self.send(FromRunner::Released(released)).await;
        self.set_state(RunnerState::Shutdown).await;
        let _ = self.tx.close("shutdown").await;
        if let Some(plan) = &mut self.shutdown {
            plan.close_deadline = Some(Instant::now() + CLOSE_WAIT);
        }
    }
}

async fn main_loop(args: RunnerArgs) -> i32 {
    // SAFETY: the node passes the channel socket as fd 3 and nothing else in
    // this process owns that fd.
    let std_stream = unsafe { std::os::unix::net::UnixStream::from_raw_fd(IPC_FD) };
    let stream = match std_stream
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixStream::from_std(std_stream))
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "runner {}: fd {IPC_FD} is not the node's channel: {e}",
                args.runner_id
            );
            return 1;
        }
    };
    let (tx, mut rx) = ipc::channel::<FromRunner, ToRunner, _>(
        stream,
        ChannelConfig::named(format!("runner:{}->node", args.runner_id)),
    );
    let config: Result<EngineConfig, _> = serde_json::from_str(&args.engine_config);
    let (events_tx, mut events) = mpsc::channel::<EngineEvent>(256);
    let (cmd_tx, cmd_rx) = std::sync::mpsc::channel::<EngineCmd>();
    let mut runner = Runner {
        args: args.clone(),
        tx,
        state: RunnerState::Idle,
        engine: Some(cmd_tx),
        engine_thread: None,
        tasks: HashMap::new(),
        early_cancels: std::collections::VecDeque::new(),
        fault: None,
        stalled: false,
        slow_drain: None,
        stepping_said: Instant::now(),
        shutdown: None,
    };
    let notice_events = events_tx.clone();
    let notify: Arc<dyn Fn(EngineNotice) + Send + Sync> = Arc::new(move |notice| {
        let event = match notice {
            EngineNotice::Fatal(cause) => EngineEvent::Fatal(cause),
            EngineNotice::StageStep => EngineEvent::StageStep,
        };
        // A stage step is frequent: never wait for room to say it.
        let _ = match event {
            EngineEvent::StageStep => notice_events.try_send(event).map_err(|_| ()),
            event => notice_events.blocking_send(event).map_err(|_| ()),
        };
    });
    let started = match config.map_err(|e| format!("invalid engine config: {e}")) {
        Ok(EngineConfig::Scripted(config)) => {
            runner.fault = config.fault.clone();
            spawn_engine(ScriptedEngine::new(config, args.rank), cmd_rx, events_tx)
        }
        Ok(EngineConfig::Model(model)) => {
            runner.fault = model.fault.clone();
            let handle = tokio::runtime::Handle::current();
            ModelEngine::new(model, args.rank, args.world_size, handle, notify)
                .map_err(|e| e.to_string())
                .and_then(|engine| spawn_engine(engine, cmd_rx, events_tx))
        }
        Err(cause) => Err(cause),
    };
    match started {
        Ok((thread, data_addr)) => {
            runner.engine_thread = Some(thread);
            runner.send(FromRunner::Hello { data_addr }).await;
            runner.set_state(RunnerState::Idle).await;
        }
        Err(cause) => {
            let failed = RunnerState::Failed {
                phase: Phase::Spawning,
                cause,
                recurs: false,
                link: false,
            };
            runner.set_state(failed).await;
        }
    }

    let mut release: Option<oneshot::Receiver<CleanupReport>> = None;
    loop {
        let wake = runner.next_wake();
        tokio::select! {
            biased;
            report = wait_release(&mut release) => {
                release = None;
                runner.finish_close(report).await;
            }
            incoming = rx.recv() => match incoming {
                Incoming::Control(Control::Ping { seq }) => {
                    let _ = runner.tx.send_control(Control::Pong { seq }).await;
                }
                Incoming::Control(_) | Incoming::Data(_) if runner.stalled => {}
                Incoming::Control(Control::Cancel { task_id }) => match runner.tasks.get(&task_id) {
                    Some(flag) => {
                        let _ = flag.compare_exchange(CANCEL_NONE, CANCEL_CLIENT, Ordering::AcqRel, Ordering::Acquire);
                    }
                    None => {
                        if runner.early_cancels.len() == EARLY_CANCELS {
                            runner.early_cancels.pop_front();
                        }
                        runner.early_cancels.push_back(task_id);
                    }
                },
                Incoming::Control(Control::Shutdown { mode, deadline_ms }) => {
                    runner.begin_shutdown(mode, Duration::from_millis(deadline_ms)).await;
                }
                Incoming::Control(Control::Pong { .. }) => {}
                Incoming::Data(msg) => runner.on_data(msg).await,
                Incoming::End { reason } => {
                    if runner.shutdown.as_ref().is_some_and(|p| p.close_deadline.is_some()) {
                        break;
                    }
                    if runner.stalled {
                        continue;
                    }
                    // The node ended its stream without asking for a
                    // shutdown first: treat it as a cancel-mode shutdown.
                    tracing::debug!(%reason, "node ended the channel");
                    runner.begin_shutdown(ShutdownMode::Cancel, Duration::from_secs(1)).await;
                }
                Incoming::PeerLost(lost) => {
                    eprintln!("runner {}: node lost ({lost}); exiting", runner.args.runner_id);
                    std::process::exit(2);
                }
            },
            Some(event) = events.recv(), if !runner.stalled => runner.on_engine(event).await,
            _ = sleep_until_opt(wake) => {
                if let Some(plan) = &mut runner.shutdown {
                    if plan.close_deadline.is_some_and(|d| Instant::now() >= d) {
                        tracing::warn!("node did not end the channel within {CLOSE_WAIT:?}; exiting");
                        break;
                    }
                    if !plan.deadline_passed && Instant::now() >= plan.drain_deadline {
                        plan.deadline_passed = true;
                        runner.cancel_all(CANCEL_DEADLINE);
                    }
                }
            }
        }
        if !runner.stalled {
            if let Some(report) = runner.maybe_start_release() {
                release = Some(report);
            }
        }
    }
    runner.tx.finished().await;
    0
}

async fn wait_release(release: &mut Option<oneshot::Receiver<CleanupReport>>) -> CleanupReport {
    match release {
        // The release task always sends; if it died, report nothing released.
        Some(rx) => rx.await.unwrap_or_default(),
        None => std::future::pending().await,
    }
}

/// Writes bytes onto the node channel behind the channel's back (faults only).
fn write_raw(bytes: &[u8]) {
    // SAFETY: fd 3 is the open channel socket and `bytes` is a valid buffer.
    let _ = unsafe { libc::write(IPC_FD, bytes.as_ptr().cast(), bytes.len()) };
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
