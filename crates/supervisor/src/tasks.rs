//! An instance's task table: every task it admitted, running on its
//! runners or waiting its turn, and the rule that admits or refuses the
//! next one. Sans-IO like [`crate::shutdown`]: the instance actor feeds it
//! submissions, runners' reports and failures, and does what it answers
//! (dispatch a request, deliver an outcome).
//!
//! Invariants:
//! * **Bounded admission.** At most `max_running` tasks are on the runners
//!   at once, and at most `max_waiting` wait at the node; a task that finds
//!   both full is refused ([`QueueFull`]), never queued. Every running task
//!   holds runner memory (its KV cache); a waiting one holds only its
//!   request.
//! * **First come, first served.** Waiting tasks go to the runners in the
//!   order they were admitted, each as soon as a running one leaves.
//! * **Exactly one outcome.** A task leaves the table only through
//!   [`TaskTable::finish`], which hands back its sink for the terminal
//!   event; every path that ends a task (done on every rank, cancel while
//!   waiting, failure, shutdown) goes through it.
//! * **A waiting task never reached a runner**: cancelling or failing it
//!   needs no runner, and a runner's stall clock does not count it.
//! * **A running task that awaits KV room** (rank 0 said so and has not
//!   started it) is on the runners and counts against `max_running`, but
//!   is shown apart ([`TaskTable::awaiting_room`]) so that `running` means
//!   in the batch.
//! * **The decisive outcome** of a running task is rank 0's, unless another
//!   rank failed or cancelled it; a failure is never overwritten.

use std::collections::{HashMap, VecDeque};

use ipc::proto::{TaskOutcome, TaskRequest};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// How many tasks an instance runs and queues at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Tasks on the runners at once (a model's batch limit).
    pub max_running: usize,
    /// Tasks waiting at the node for a running one to leave.
    pub max_waiting: usize,
}

impl Limits {
    /// The waiting bound when none is given: this many times `max_running`.
    pub const DEFAULT_WAITING_FACTOR: usize = 4;

    /// `max_running` (at least 1) and `max_waiting`, by default
    /// [`Limits::DEFAULT_WAITING_FACTOR`] × `max_running`.
    pub fn new(max_running: usize, max_waiting: Option<usize>) -> Limits {
        let max_running = max_running.max(1);
        Limits {
            max_running,
            max_waiting: max_waiting.unwrap_or(max_running * Self::DEFAULT_WAITING_FACTOR),
        }
    }
}

/// A task refused because the instance runs and queues all it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull {
    pub running: usize,
    pub waiting: usize,
    pub limits: Limits,
}

/// A task on the runners.
#[derive(Debug)]
pub struct Running<S> {
    pub sink: S,
    /// Ranks that reported this task done (ranks that never see tasks count
    /// as done from the start).
    pub done: Vec<bool>,
    /// Ranks known to hold the task (they reported it started or done;
    /// ranks that never see tasks count from the start).
    pub held: Vec<bool>,
    pub outcome: Option<TaskOutcome>,
    /// A failure caused by a broken data-plane link is held until then for
    /// the primary failure (the peer's death), whose message names the
    /// runner, phase and cause; it is delivered as is if none comes.
    pub held_until: Option<Instant>,
    /// Rank 0 holds it until the KV budget has room; cleared when it starts.
    pub awaits_room: bool,
}

#[derive(Debug)]
struct Waiting<S> {
    task_id: String,
    request: TaskRequest,
    sink: S,
}

/// What a rank's report of a running task's end leaves to do.
#[derive(Debug, PartialEq)]
pub enum Done {
    /// Other ranks have yet to report it (or the task is unknown).
    Pending,
    /// The outcome echoes a broken link: hold it for the primary failure.
    Hold,
    /// Every rank is done: deliver this outcome ([`TaskTable::finish`]).
    Finished(TaskOutcome),
}

/// The task table of one instance; `S` is where a task's events go.
#[derive(Debug)]
pub struct TaskTable<S> {
    limits: Limits,
    /// Which ranks see each task (rank 0 always; every rank for engines
    /// whose ranks each take the task).
    takes: Vec<bool>,
    running: HashMap<String, Running<S>>,
    waiting: VecDeque<Waiting<S>>,
}

impl<S> TaskTable<S> {
    pub fn new(limits: Limits, takes: Vec<bool>) -> TaskTable<S> {
        TaskTable {
            limits,
            takes,
            running: HashMap::new(),
            waiting: VecDeque::new(),
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Tasks in the batch (on the runners, not awaiting KV room).
    pub fn running(&self) -> usize {
        self.running.len() - self.awaiting_room()
    }

    /// Tasks rank 0 holds until the KV budget has room for them.
    pub fn awaiting_room(&self) -> usize {
        self.running.values().filter(|t| t.awaits_room).count()
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn len(&self) -> usize {
        self.running.len() + self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, task_id: &str) -> bool {
        self.running.contains_key(task_id) || self.is_waiting(task_id)
    }

    pub fn is_waiting(&self, task_id: &str) -> bool {
        self.waiting.iter().any(|w| w.task_id == task_id)
    }

    /// Every task's id, running ones first, then waiting ones in order.
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.running.keys().cloned().collect();
        ids.extend(self.waiting.iter().map(|w| w.task_id.clone()));
        ids
    }

    /// Admits a task to the end of the queue, or refuses it when the
    /// runners and the queue are both full. [`TaskTable::next_to_run`] says when
    /// it runs.
    pub fn admit(&mut self, request: TaskRequest, sink: S) -> Result<(), (QueueFull, S)> {
        if self.running.len() >= self.limits.max_running
            && self.waiting.len() >= self.limits.max_waiting
        {
            let full = QueueFull {
                running: self.running.len(),
                waiting: self.waiting.len(),
                limits: self.limits,
            };
            return Err((full, sink));
        }
        self.waiting.push_back(Waiting {
            task_id: request.task_id.clone(),
            request,
            sink,
        });
        Ok(())
    }

    /// The next waiting task to send to the runners, now running; `None`
    /// when the runners are full or nobody waits.
    pub fn next_to_run(&mut self) -> Option<TaskRequest> {
        if self.running.len() >= self.limits.max_running {
            return None;
        }
        self.start_next()
    }

    /// Every waiting task, now running, whatever the bound: a drain hands
    /// the runners everything admitted before it tells them to stop.
    pub fn start_all(&mut self) -> Vec<TaskRequest> {
        std::iter::from_fn(|| self.start_next()).collect()
    }

    fn start_next(&mut self) -> Option<TaskRequest> {
        let w = self.waiting.pop_front()?;
        let entry = Running {
            sink: w.sink,
            done: self.takes.iter().map(|t| !t).collect(),
            held: self.takes.iter().map(|t| !t).collect(),
            outcome: None,
            held_until: None,
            awaits_room: false,
        };
        self.running.insert(w.task_id, entry);
        Some(w.request)
    }

    pub fn running_task(&self, task_id: &str) -> Option<&Running<S>> {
        self.running.get(task_id)
    }

    /// Whether `rank` has a running task it has not reported done.
    pub fn busy(&self, rank: usize) -> bool {
        self.running
            .values()
            .any(|t| !t.done.get(rank).copied().unwrap_or(true))
    }

    /// Rank `rank` reports `task_id` ended with `outcome`; `exited` says
    /// which ranks are gone (they will report nothing more); `hold_echo`
    /// whether a failure that echoes a broken link waits, and until when.
    pub fn on_done(
        &mut self,
        task_id: &str,
        rank: usize,
        outcome: TaskOutcome,
        exited: &[bool],
        hold_echo: Option<Instant>,
    ) -> Done {
        let Some(entry) = self.running.get_mut(task_id) else {
            return Done::Pending;
        };
        if let Some(done) = entry.done.get_mut(rank) {
            *done = true;
        }
        if let Some(held) = entry.held.get_mut(rank) {
            *held = true;
        }
        let decisive = rank == 0 || !matches!(outcome, TaskOutcome::Completed { .. });
        if decisive && !matches!(entry.outcome, Some(TaskOutcome::Failed { .. })) {
            entry.outcome = Some(outcome);
        }
        let all_done = entry
            .done
            .iter()
            .enumerate()
            .all(|(r, d)| *d || exited.get(r).copied().unwrap_or(true));
        let echo = entry.outcome.as_ref().is_some_and(is_link_echo);
        match hold_echo {
            Some(until) if echo => {
                entry.held_until = Some(until);
                Done::Hold
            }
            _ if all_done => Done::Finished(
                entry
                    .outcome
                    .clone()
                    .unwrap_or(TaskOutcome::failed("no outcome from rank 0")),
            ),
            _ => Done::Pending,
        }
    }

    /// Rank `rank` reports it started `task_id`: it holds the task.
    pub fn on_started(&mut self, task_id: &str, rank: usize) {
        if let Some(task) = self.running.get_mut(task_id) {
            if let Some(held) = task.held.get_mut(rank) {
                *held = true;
            }
            if rank == 0 {
                task.awaits_room = false;
            }
        }
    }

    /// Rank 0 holds `task_id` until the KV budget has room for it (it holds
    /// the task: a report of waiting is a report of holding).
    pub fn on_awaits_room(&mut self, task_id: &str) {
        if let Some(task) = self.running.get_mut(task_id) {
            if let Some(held) = task.held.get_mut(0) {
                *held = true;
            }
            task.awaits_room = true;
        }
    }

    /// Whether every running task is held by every rank that takes it, or
    /// by ranks that are gone (`exited`): nothing handed to a runner can
    /// still be on its way.
    pub fn all_held(&self, exited: &[bool]) -> bool {
        self.running.values().all(|t| {
            t.held
                .iter()
                .enumerate()
                .all(|(r, h)| *h || exited.get(r).copied().unwrap_or(true))
        })
    }

    /// Running tasks that no rank still alive owes a report (every rank
    /// reported or is gone), with the outcome they have, if any.
    pub fn decided(&self, exited: &[bool]) -> Vec<(String, Option<TaskOutcome>)> {
        self.running
            .iter()
            .filter(|(_, t)| {
                t.done
                    .iter()
                    .enumerate()
                    .all(|(r, d)| *d || exited.get(r).copied().unwrap_or(true))
            })
            .map(|(id, t)| (id.clone(), t.outcome.clone()))
            .collect()
    }

    /// How many running tasks `rank` has not reported done.
    pub fn owed_by(&self, rank: usize) -> usize {
        self.running
            .values()
            .filter(|t| !t.done.get(rank).copied().unwrap_or(true))
            .count()
    }

    /// Held outcomes whose wait ended by `now`: (task, outcome) to finish.
    pub fn held_due(&self, now: Instant) -> Vec<(String, TaskOutcome)> {
        self.running
            .iter()
            .filter(|(_, t)| t.held_until.is_some_and(|at| at <= now))
            .map(|(id, t)| {
                let outcome = t
                    .outcome
                    .clone()
                    .unwrap_or(TaskOutcome::failed("no outcome from rank 0"));
                (id.clone(), outcome)
            })
            .collect()
    }

    /// The earliest time a held outcome is due.
    pub fn next_held(&self) -> Option<Instant> {
        self.running.values().filter_map(|t| t.held_until).min()
    }

    /// Removes a task, running or waiting, and hands back its sink for the
    /// terminal event; `None` if the table does not hold it.
    pub fn finish(&mut self, task_id: &str) -> Option<S> {
        if let Some(entry) = self.running.remove(task_id) {
            return Some(entry.sink);
        }
        let at = self.waiting.iter().position(|w| w.task_id == task_id)?;
        self.waiting.remove(at).map(|w| w.sink)
    }
}

/// Whether a failure only echoes a broken data-plane link (a peer that
/// died), rather than saying what broke.
pub fn is_link_echo(outcome: &TaskOutcome) -> bool {
    matches!(outcome, TaskOutcome::Failed { link: true, .. })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn req(id: &str) -> TaskRequest {
        TaskRequest::user(id, "trace", "hi", 4)
    }

    fn completed() -> TaskOutcome {
        TaskOutcome::Completed {
            prompt_tokens: 1,
            completion_tokens: 4,
            finish_reason: "length".into(),
        }
    }

    fn table(running: usize, waiting: usize, ranks: usize) -> TaskTable<&'static str> {
        TaskTable::new(
            Limits {
                max_running: running,
                max_waiting: waiting,
            },
            vec![true; ranks],
        )
    }

    fn ids(reqs: Vec<TaskRequest>) -> Vec<String> {
        reqs.into_iter().map(|r| r.task_id).collect()
    }

    #[test]
    fn default_waiting_bound_is_a_multiple_of_the_running_bound() {
        assert_eq!(
            Limits::new(16, None),
            Limits {
                max_running: 16,
                max_waiting: 64
            }
        );
        assert_eq!(Limits::new(0, Some(3)).max_running, 1);
        assert_eq!(Limits::new(2, Some(0)).max_waiting, 0);
    }

    #[test]
    fn the_task_after_both_bounds_is_refused_and_the_next_after_a_finish_is_taken() {
        // The node test's case: batch 2, queue 4: six are taken, the 7th
        // is refused.
        let mut t = table(2, 4, 1);
        for i in 0..6 {
            t.admit(req(&format!("t{i}")), "sink").unwrap();
            t.next_to_run();
        }
        assert_eq!((t.running(), t.waiting()), (2, 4));
        let (full, sink) = t.admit(req("t6"), "seventh").unwrap_err();
        assert_eq!(sink, "seventh", "a refused task's sink comes back");
        assert_eq!((full.running, full.waiting), (2, 4));
        assert_eq!(t.len(), 6, "a refused task is not queued");
        // A running one finishes: the first waiting one runs, and there is
        // room for one more.
        assert_eq!(t.finish("t0"), Some("sink"));
        assert_eq!(t.next_to_run().map(|r| r.task_id), Some("t2".into()));
        assert!(t.next_to_run().is_none(), "the runners are full again");
        t.admit(req("t7"), "sink").unwrap();
        assert_eq!((t.running(), t.waiting()), (2, 4));
    }

    #[test]
    fn a_task_awaiting_kv_room_counts_against_the_bound_but_not_as_running() {
        let mut t = table(2, 1, 2);
        for i in 0..3 {
            t.admit(req(&format!("t{i}")), "s").unwrap();
            t.next_to_run();
        }
        t.on_started("t0", 0);
        t.on_awaits_room("t1");
        assert_eq!((t.running(), t.awaiting_room(), t.waiting()), (1, 1, 1));
        assert!(
            t.admit(req("t3"), "s").is_err(),
            "awaiting room holds a slot"
        );
        assert!(!t.all_held(&[false; 2]), "rank 1 has not seen t0 or t1");
        t.on_started("t0", 1);
        t.on_started("t1", 1);
        assert!(
            t.all_held(&[false; 2]),
            "rank 0 holds the task it awaits room for"
        );
        // Another rank's start does not end the wait; rank 0's does.
        assert_eq!(t.awaiting_room(), 1);
        t.on_started("t1", 0);
        assert_eq!((t.running(), t.awaiting_room()), (2, 0));
    }

    #[test]
    fn waiting_tasks_run_in_the_order_they_came() {
        let mut t = table(1, 8, 1);
        for i in 0..5 {
            t.admit(req(&format!("t{i}")), "s").unwrap();
        }
        let mut order = Vec::new();
        while let Some(r) = t.next_to_run() {
            order.push(r.task_id.clone());
            t.finish(&r.task_id);
        }
        assert_eq!(order, ["t0", "t1", "t2", "t3", "t4"]);
    }

    #[test]
    fn a_waiting_task_leaves_without_a_runner() {
        let mut t = table(1, 4, 1);
        t.admit(req("a"), "a").unwrap();
        t.admit(req("b"), "b").unwrap();
        t.admit(req("c"), "c").unwrap();
        assert_eq!(t.next_to_run().map(|r| r.task_id), Some("a".into()));
        assert!(t.is_waiting("b"));
        assert!(t.busy(0), "a runs");
        assert_eq!(t.finish("b"), Some("b"), "an abandoned waiting task leaves");
        assert!(!t.contains("b"));
        assert_eq!(t.finish("b"), None, "and only once");
        t.finish("a");
        assert_eq!(t.next_to_run().map(|r| r.task_id), Some("c".into()));
    }

    #[test]
    fn only_running_tasks_keep_a_rank_busy() {
        let mut t: TaskTable<()> = TaskTable::new(Limits::new(1, Some(4)), vec![true, false]);
        t.admit(req("a"), ()).unwrap();
        assert!(!t.busy(0), "a waiting task is not on the runner");
        t.next_to_run();
        assert!(t.busy(0));
        assert!(!t.busy(1), "rank 1 never sees tasks");
        t.admit(req("b"), ()).unwrap();
        assert_eq!(
            t.on_done("a", 0, completed(), &[false, false], None),
            Done::Finished(completed())
        );
    }

    #[test]
    fn a_drain_starts_every_waiting_task() {
        let mut t = table(1, 4, 1);
        for i in 0..4 {
            t.admit(req(&format!("t{i}")), "s").unwrap();
        }
        assert_eq!(ids(vec![t.next_to_run().unwrap()]), ["t0"]);
        assert_eq!(ids(t.start_all()), ["t1", "t2", "t3"]);
        assert_eq!((t.running(), t.waiting()), (4, 0));
    }

    #[test]
    fn every_rank_reports_before_the_outcome_and_rank_0_decides() {
        let mut t = table(4, 0, 3);
        t.admit(req("a"), "s").unwrap();
        t.next_to_run();
        let alive = [false; 3];
        assert_eq!(t.on_done("a", 0, completed(), &alive, None), Done::Pending);
        let other = TaskOutcome::Completed {
            prompt_tokens: 9,
            completion_tokens: 9,
            finish_reason: "stop".into(),
        };
        assert_eq!(t.on_done("a", 2, other, &alive, None), Done::Pending);
        // Rank 1 died: it will report nothing.
        assert_eq!(
            t.on_done("a", 1, completed(), &[false, true, false], None),
            Done::Finished(completed())
        );
    }

    #[test]
    fn a_failure_is_never_overwritten_and_an_echo_is_held() {
        let mut t = table(4, 0, 2);
        t.admit(req("a"), "s").unwrap();
        t.next_to_run();
        let alive = [false; 2];
        let failed = TaskOutcome::failed("out of memory");
        assert_eq!(
            t.on_done("a", 1, failed.clone(), &alive, None),
            Done::Pending
        );
        assert_eq!(
            t.on_done("a", 0, completed(), &alive, None),
            Done::Finished(failed),
            "rank 1's failure stands"
        );
        t.admit(req("b"), "s").unwrap();
        t.next_to_run();
        let echo = TaskOutcome::Failed {
            cause: "data plane: link to rank 1 lost".into(),
            link: true,
        };
        let at = Instant::now() + Duration::from_millis(500);
        assert_eq!(
            t.on_done("b", 0, echo.clone(), &alive, Some(at)),
            Done::Hold
        );
        assert_eq!(t.next_held(), Some(at));
        assert!(t.held_due(at - Duration::from_millis(1)).is_empty());
        assert_eq!(t.held_due(at), vec![("b".to_string(), echo)]);
    }

    #[test]
    fn a_task_is_held_once_every_rank_that_takes_it_said_so() {
        let mut t: TaskTable<()> = TaskTable::new(Limits::new(4, None), vec![true, true, false]);
        assert!(
            t.all_held(&[false; 3]),
            "nothing running, nothing on its way"
        );
        t.admit(req("a"), ()).unwrap();
        t.admit(req("b"), ()).unwrap();
        assert!(t.all_held(&[false; 3]), "waiting tasks were not handed out");
        t.next_to_run();
        t.next_to_run();
        assert!(!t.all_held(&[false; 3]));
        t.on_started("a", 0);
        t.on_started("a", 1);
        t.on_started("b", 0);
        assert!(!t.all_held(&[false; 3]), "rank 1 has not said it holds b");
        assert!(t.all_held(&[false, true, false]), "unless rank 1 is gone");
        t.on_done("b", 1, completed(), &[false; 3], None);
        assert!(
            t.all_held(&[false; 3]),
            "a report of done is a report of holding"
        );
        assert_eq!(t.owed_by(0), 2);
        assert_eq!(t.owed_by(1), 1);
        assert_eq!(t.owed_by(2), 0);
        assert_eq!(t.decided(&[false; 3]), vec![]);
        let mut decided = t.decided(&[true, false, false]);
        decided.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            decided,
            vec![("b".to_string(), None)],
            "b waits only for the dead rank 0"
        );
    }

    #[test]
    fn unknown_tasks_change_nothing() {
        let mut t = table(1, 1, 1);
        assert_eq!(
            t.on_done("x", 0, completed(), &[false], None),
            Done::Pending
        );
        assert_eq!(t.finish("x"), None);
        assert!(t.is_empty());
    }
}
