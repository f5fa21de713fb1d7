//! The engine thread: takes commands from the runner's loop and steps the
//! admitted tasks in batches, reporting every step as an event.
//!
//! Invariants:
//! * Every task admitted gets exactly one `TaskDone`: completed, cancelled,
//!   invalid or failed; `end_task` is called exactly once for every task
//!   that started.
//! * Sequences join and leave batches at step boundaries: a task started
//!   while others run joins the next launch (every command waiting is
//!   taken before the next step, so tasks that arrive together start
//!   together); a task that finishes leaves after its landing.
//! * A cancel takes effect within one step: the flag is read before every
//!   launch, and a task in a batch in flight leaves when that batch lands.
//! * At most `Engine::lanes()` batches are in flight, a task is in at most
//!   one of them, and they land in launch order; the active tasks are
//!   shared evenly between the lanes ([`launch_size`]).
//! * A launch that fails fails every task of its batch with the cause; a
//!   landing fails only the tasks whose results are errors.
//! * A task with no KV room yet ([`StartError::NoRoom`]) waits, in arrival
//!   order, and is tried again only when a task has left; a task that
//!   arrives while others wait queues behind them; a cancel reaches a
//!   waiting task too (it never started, so `end_task` is not called).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ipc::proto::{Phase, TaskOutcome, TaskRequest, TokenLogprob};
use ipc::Blob;
use tokio::sync::mpsc;

use crate::engine::{Engine, EngineError, StartError, Step};

/// Why a task's cancel flag was raised.
pub(crate) const CANCEL_NONE: u8 = 0;
pub(crate) const CANCEL_CLIENT: u8 = 1;
pub(crate) const CANCEL_SHUTDOWN: u8 = 2;
pub(crate) const CANCEL_DEADLINE: u8 = 3;

fn cancel_reason(code: u8) -> &'static str {
    match code {
        CANCEL_CLIENT => ipc::proto::CANCELLED_BY_CLIENT,
        CANCEL_SHUTDOWN => ipc::proto::CANCELLED_BY_SHUTDOWN,
        _ => "drain deadline reached",
    }
}

pub(crate) enum EngineCmd {
    Connect(Vec<String>, Duration),
    Load,
    WarmUp,
    Start(TaskRequest, Arc<AtomicU8>),
}

pub(crate) enum EngineEvent {
    /// The engine failed for good outside any task (a stage server).
    Fatal(EngineError),
    /// A stage server processed a step.
    StageStep,
    Progress {
        done: u32,
        total: u32,
    },
    PhaseDone {
        phase: Phase,
        result: Result<(), PhaseError>,
    },
    /// A task passed its checks and its prefill begins.
    Started {
        task_id: String,
        prompt_tokens: u32,
        cached_tokens: Option<u32>,
    },
    /// A task's prompt, as it asked to have it reported.
    Prompt {
        task_id: String,
        tokens: Vec<Blob>,
        logprobs: Vec<TokenLogprob>,
    },
    /// A task waits for KV room (`Engine::start` found none).
    AwaitsRoom {
        task_id: String,
    },
    /// A chunk of a task's prompt was prefilled.
    Prefilled {
        task_id: String,
        done: u32,
        total: u32,
    },
    Step {
        task_id: String,
        index: u32,
        text: Option<(String, Vec<TokenLogprob>)>,
    },
    TaskDone {
        task_id: String,
        outcome: TaskOutcome,
    },
}

/// Why a lifecycle phase failed, and whether trying again would fail the
/// same way (`EngineError::recurs`).
pub(crate) struct PhaseError {
    pub(crate) cause: String,
    pub(crate) recurs: bool,
    pub(crate) link: bool,
}

impl From<EngineError> for PhaseError {
    fn from(e: EngineError) -> Self {
        PhaseError {
            recurs: e.recurs(),
            link: e.is_link(),
            cause: e.to_string(),
        }
    }
}

struct Active<T> {
    task_id: String,
    task: T,
    cancel: Arc<AtomicU8>,
    prompt_tokens: u32,
    index: u32,
}

/// How many of `idle` tasks the next launch takes, with `lanes` lanes of
/// which `flying` batches hold `in_flight` tasks: an even share of all the
/// active tasks over the lanes (rounded up), so that batches stay the same
/// size and a pipeline's stages the same load; all that are idle when no
/// other batch is in flight; at most `max_batch`, at least one.
pub(crate) fn launch_size(
    idle: usize,
    in_flight: usize,
    flying: usize,
    lanes: usize,
    max_batch: usize,
) -> usize {
    if idle == 0 {
        return 0;
    }
    let lanes = lanes.max(1);
    let share = if flying == 0 {
        idle.div_ceil(lanes)
    } else {
        (idle + in_flight).div_ceil(lanes)
    };
    share.clamp(1, max_batch.max(1)).min(idle)
}

/// The engine thread: takes commands, and steps the active tasks in
/// batches (see the module doc). When its command queue closes (the runner
/// is closing, with no task left) it lands what is in flight, releases the
/// engine's peer links and returns how that went.
fn engine_thread<E: Engine>(
    mut engine: E,
    cmds: std::sync::mpsc::Receiver<EngineCmd>,
    events: mpsc::Sender<EngineEvent>,
) -> Result<(), String> {
    // Idle tasks, in the order they take their turns.
    let mut idle: VecDeque<Active<E::Task>> = VecDeque::new();
    // Launched batches, oldest first.
    let mut flights: VecDeque<Vec<Active<E::Task>>> = VecDeque::new();
    // Tasks waiting for KV room, in arrival order, and how many tasks were
    // started when the first of them last found none.
    let mut waiting: VecDeque<(TaskRequest, Arc<AtomicU8>)> = VecDeque::new();
    let mut blocked_at = 0;
    let send = |ev: EngineEvent| events.blocking_send(ev).is_ok();
    loop {
        let cmd = if idle.is_empty() && flights.is_empty() && waiting.is_empty() {
            match cmds.recv() {
                Ok(cmd) => Some(cmd),
                Err(_) => return engine.release().map_err(|e| e.to_string()),
            }
        } else {
            match cmds.try_recv() {
                Ok(cmd) => Some(cmd),
                Err(std::sync::mpsc::TryRecvError::Empty) => None,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    while let Some(mut batch) = flights.pop_front() {
                        let mut refs: Vec<&mut E::Task> =
                            batch.iter_mut().map(|a| &mut a.task).collect();
                        let _ = engine.land(&mut refs);
                        idle.extend(batch);
                    }
                    for a in idle.drain(..) {
                        engine.end_task(a.task);
                    }
                    waiting.clear();
                    return engine.release().map_err(|e| e.to_string());
                }
            }
        };
        let had_cmd = cmd.is_some();
        let ok = match cmd {
            None => true,
            Some(EngineCmd::Connect(peers, deadline)) => send(EngineEvent::PhaseDone {
                phase: Phase::Connecting,
                result: engine.connect(&peers, deadline).map_err(PhaseError::from),
            }),
            Some(EngineCmd::Load) => {
                let progress_events = events.clone();
                let result = engine.load(&mut |done, total| {
                    let _ = progress_events.blocking_send(EngineEvent::Progress { done, total });
                });
                send(EngineEvent::PhaseDone {
                    phase: Phase::Loading,
                    result: result.map_err(PhaseError::from),
                })
            }
            Some(EngineCmd::WarmUp) => send(EngineEvent::PhaseDone {
                phase: Phase::WarmingUp,
                result: engine.warm_up().map_err(PhaseError::from),
            }),
            Some(EngineCmd::Start(request, cancel)) if !waiting.is_empty() => {
                tracing::info!(task = %request.task_id, waiting = waiting.len(), "task waits for KV cache room behind others");
                send(hold(&mut waiting, request, cancel))
            }
            Some(EngineCmd::Start(request, cancel)) => {
                match try_start(&mut engine, request, cancel) {
                    Tried::Started(active, started) => {
                        idle.push_back(*active);
                        send(started)
                    }
                    Tried::NoRoom(request, cancel) => {
                        tracing::info!(task = %request.task_id, "task waits for KV cache room");
                        blocked_at = started_now(&idle, &flights);
                        send(hold(&mut waiting, request, cancel))
                    }
                    Tried::Refused(done) => send(done),
                }
            }
        };
        if !ok {
            return Ok(());
        }
        if had_cmd {
            // Every task that arrived joins the next step, not one a step.
            continue;
        }
        // Waiting tasks: a cancel reaches them; once a task has left since
        // the first found no room, they start in order while room lasts.
        if !waiting.is_empty() {
            let mut still = VecDeque::with_capacity(waiting.len());
            for (request, cancel) in waiting.drain(..) {
                match cancel.load(Ordering::Acquire) {
                    CANCEL_NONE => still.push_back((request, cancel)),
                    code if !send(cancelled(request.task_id, code)) => return Ok(()),
                    _ => {}
                }
            }
            waiting = still;
        }
        let started = started_now(&idle, &flights);
        if started < blocked_at || (started == 0 && !waiting.is_empty()) {
            while let Some((request, cancel)) = waiting.pop_front() {
                match try_start(&mut engine, request, cancel) {
                    Tried::Started(active, event) => {
                        idle.push_back(*active);
                        if !send(event) {
                            return Ok(());
                        }
                    }
                    Tried::NoRoom(request, _) if started_now(&idle, &flights) == 0 => {
                        // Nothing runs to give room back: waiting cannot end.
                        let e = EngineError::Compute(
                            "the KV budget has no room though no task runs".into(),
                        );
                        let done = EngineEvent::TaskDone {
                            task_id: request.task_id,
                            outcome: failed(&e),
                        };
                        if !send(done) {
                            return Ok(());
                        }
                    }
                    Tried::NoRoom(request, cancel) => {
                        waiting.push_front((request, cancel));
                        break;
                    }
                    Tried::Refused(done) => {
                        if !send(done) {
                            return Ok(());
                        }
                    }
                }
            }
            blocked_at = started_now(&idle, &flights);
        }
        // Cancels land between steps.
        let mut kept = VecDeque::with_capacity(idle.len());
        for a in idle.drain(..) {
            let cancel = a.cancel.load(Ordering::Acquire);
            if cancel == CANCEL_NONE {
                kept.push_back(a);
                continue;
            }
            engine.end_task(a.task);
            if !send(cancelled(a.task_id, cancel)) {
                return Ok(());
            }
        }
        idle = kept;
        let lanes = engine.lanes().max(1);
        if !idle.is_empty() && flights.len() < lanes {
            let in_flight = flights.iter().map(Vec::len).sum();
            let n = launch_size(
                idle.len(),
                in_flight,
                flights.len(),
                lanes,
                engine.max_batch(),
            );
            let mut batch: Vec<Active<E::Task>> = idle.drain(..n).collect();
            let mut refs: Vec<&mut E::Task> = batch.iter_mut().map(|a| &mut a.task).collect();
            match engine.launch(&mut refs) {
                Ok(()) => flights.push_back(batch),
                Err(e) => {
                    for a in batch {
                        engine.end_task(a.task);
                        let done = EngineEvent::TaskDone {
                            task_id: a.task_id,
                            outcome: failed(&e),
                        };
                        if !send(done) {
                            return Ok(());
                        }
                    }
                }
            }
            continue;
        }
        let Some(mut batch) = flights.pop_front() else {
            continue;
        };
        let mut refs: Vec<&mut E::Task> = batch.iter_mut().map(|a| &mut a.task).collect();
        let mut results = engine.land(&mut refs).into_iter();
        for a in batch {
            let result = results.next().unwrap_or_else(|| {
                Err(EngineError::Compute(
                    "the engine landed fewer results than the batch had tasks".into(),
                ))
            });
            let (event, kept) = outcome(&mut engine, a, result);
            idle.extend(kept);
            if !send(event) {
                return Ok(());
            }
        }
    }
}

/// The outcome of a task whose cancel flag says `code`.
fn cancelled(task_id: String, code: u8) -> EngineEvent {
    EngineEvent::TaskDone {
        task_id,
        outcome: TaskOutcome::Cancelled {
            reason: cancel_reason(code).into(),
        },
    }
}

/// Queues a task that found no KV room; the event that tells the node.
fn hold(
    waiting: &mut VecDeque<(TaskRequest, Arc<AtomicU8>)>,
    request: TaskRequest,
    cancel: Arc<AtomicU8>,
) -> EngineEvent {
    let awaits = EngineEvent::AwaitsRoom {
        task_id: request.task_id.clone(),
    };
    waiting.push_back((request, cancel));
    awaits
}

/// Tasks started and not yet ended: idle or in a batch in flight.
fn started_now<T>(idle: &VecDeque<Active<T>>, flights: &VecDeque<Vec<Active<T>>>) -> usize {
    idle.len() + flights.iter().map(Vec::len).sum::<usize>()
}

enum Tried<T> {
    Started(Box<Active<T>>, EngineEvent),
    NoRoom(TaskRequest, Arc<AtomicU8>),
    /// It cannot start: its one outcome.
    Refused(EngineEvent),
}

fn try_start<E: Engine>(
    engine: &mut E,
    request: TaskRequest,
    cancel: Arc<AtomicU8>,
) -> Tried<E::Task> {
    match engine.start(&request) {
        Ok((task, prompt_tokens)) => {
            let started = EngineEvent::Started {
                task_id: request.task_id.clone(),
                prompt_tokens,
                cached_tokens: engine.cached_tokens(&task),
            };
            let active = Active {
                task_id: request.task_id,
                task,
                cancel,
                prompt_tokens,
                index: 0,
            };
            Tried::Started(Box::new(active), started)
        }
        Err(StartError::NoRoom) => Tried::NoRoom(request, cancel),
        Err(StartError::Invalid(code, message)) => Tried::Refused(EngineEvent::TaskDone {
            task_id: request.task_id,
            outcome: TaskOutcome::Invalid { code, message },
        }),
        Err(StartError::Engine(e)) => Tried::Refused(EngineEvent::TaskDone {
            task_id: request.task_id,
            outcome: failed(&e),
        }),
    }
}

/// A task failed by an engine error, typed as the error is.
fn failed(e: &EngineError) -> TaskOutcome {
    TaskOutcome::Failed {
        cause: e.to_string(),
        link: e.is_link(),
    }
}

/// The event a task's step result makes, and the task itself while it
/// goes on.
fn outcome<E: Engine>(
    engine: &mut E,
    mut a: Active<E::Task>,
    result: Result<Step, EngineError>,
) -> (EngineEvent, Option<Active<E::Task>>) {
    match result {
        Ok(Step::Prefilled { done, total }) => {
            let ev = EngineEvent::Prefilled {
                task_id: a.task_id.clone(),
                done,
                total,
            };
            (ev, Some(a))
        }
        Ok(Step::Prompt { tokens, logprobs }) => {
            let ev = EngineEvent::Prompt {
                task_id: a.task_id.clone(),
                tokens,
                logprobs,
            };
            (ev, Some(a))
        }
        Ok(step @ (Step::Token { .. } | Step::Progress)) => {
            let text = match step {
                Step::Token { text, logprobs } => Some((text, logprobs)),
                _ => None,
            };
            let ev = EngineEvent::Step {
                task_id: a.task_id.clone(),
                index: a.index,
                text,
            };
            a.index += 1;
            (ev, Some(a))
        }
        Ok(Step::Finished {
            finish_reason,
            completion_tokens,
        }) => {
            engine.end_task(a.task);
            let ev = EngineEvent::TaskDone {
                task_id: a.task_id,
                outcome: TaskOutcome::Completed {
                    prompt_tokens: a.prompt_tokens,
                    completion_tokens,
                    finish_reason,
                },
            };
            (ev, None)
        }
        Err(e) => {
            engine.end_task(a.task);
            let ev = EngineEvent::TaskDone {
                task_id: a.task_id,
                outcome: failed(&e),
            };
            (ev, None)
        }
    }
}

/// The engine thread; it returns how releasing the engine went.
pub(crate) type EngineThread = std::thread::JoinHandle<Result<(), String>>;

/// Starts the engine thread; returns it and the engine's data-plane address.
pub(crate) fn spawn_engine<E: Engine>(
    engine: E,
    cmds: std::sync::mpsc::Receiver<EngineCmd>,
    events: mpsc::Sender<EngineEvent>,
) -> Result<(EngineThread, Option<String>), String> {
    let data_addr = engine.data_addr();
    let thread = std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || engine_thread(engine, cmds, events))
        .map_err(|e| format!("cannot start the engine thread: {e}"))?;
    Ok((thread, data_addr))
}

#[cfg(test)]
mod tests {
    use super::launch_size;

    #[test]
    fn one_lane_takes_every_idle_task_up_to_the_batch_limit() {
        assert_eq!(launch_size(5, 0, 0, 1, 16), 5);
        assert_eq!(launch_size(20, 0, 0, 1, 16), 16);
        assert_eq!(launch_size(3, 0, 0, 1, 1), 1);
    }

    #[test]
    fn lanes_share_the_active_tasks_evenly() {
        // Four tasks, two lanes, none in flight: two each.
        assert_eq!(launch_size(4, 0, 0, 2, 16), 2);
        assert_eq!(launch_size(2, 2, 1, 2, 16), 2);
        // Three: two, then one.
        assert_eq!(launch_size(3, 0, 0, 2, 16), 2);
        assert_eq!(launch_size(1, 2, 1, 2, 16), 1);
        // One task and three lanes: it goes alone.
        assert_eq!(launch_size(1, 0, 0, 3, 16), 1);
        // Tasks that arrived while both lanes were in flight: a lane of one
        // lands beside three idle, and takes two, not all three, so the
        // lanes stay two and two.
        assert_eq!(launch_size(3, 1, 1, 2, 16), 2);
        assert_eq!(launch_size(2, 2, 1, 2, 16), 2);
    }

    #[test]
    fn nothing_idle_launches_nothing_and_zero_limits_still_launch_one() {
        assert_eq!(launch_size(0, 4, 2, 2, 16), 0);
        assert_eq!(launch_size(3, 0, 0, 0, 16), 3);
        assert_eq!(launch_size(3, 0, 0, 1, 0), 1);
    }
}
