//! The three-phase shutdown of an instance as a pure state
//! machine: events in (acks, ends, exits, the clock), actions out (close a
//! channel, escalate a stop). The instance task performs the actions.
//!
//! Phases: **signaling** (every runner was sent `Shutdown` and acks with
//! `ShuttingDown`), **draining** (each runner finishes or cancels its tasks
//! and ends its stream with `End`; the node answers with its own `End` at
//! once), **closing** (each runner exits; at the phase deadline the stop
//! escalates SIGTERM → grace → SIGKILL). Each phase has a deadline; when it
//! passes the coordinator moves on and says so in the report.
//!
//! Invariants: each runner is escalated at most once; a runner that already
//! exited is never escalated; the coordinator is done exactly when every
//! runner has exited; the report lists every runner.

use std::time::Duration;

use ipc::ShutdownMode;
use serde::Serialize;
use tokio::time::Instant;

use crate::process::{ExitCause, StopOutcome};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ShutdownPhase {
    Signaling,
    Draining,
    Closing,
    Done,
}

#[derive(Debug, Clone, Copy)]
pub struct ShutdownDeadlines {
    pub signal: Duration,
    pub drain: Duration,
    pub close: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send our `End` to this runner.
    Close(usize),
    /// Stop this runner's process group.
    Terminate { rank: usize, term_first: bool },
}

#[derive(Debug, Clone, Serialize)]
pub struct PhaseReport {
    pub phase: ShutdownPhase,
    pub duration_ms: f64,
    /// The phase ended at its deadline rather than by every runner.
    pub timed_out: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunnerShutdown {
    pub runner_id: String,
    pub acked: bool,
    /// The runner ended its stream with `End`.
    pub ended: bool,
    pub exit: Option<ExitCause>,
    pub escalation: Option<StopOutcome>,
    /// What the runner released while closing, in order.
    pub released: Vec<ipc::proto::ReleasedResource>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ShutdownReport {
    pub instance_id: String,
    pub mode: ShutdownMode,
    pub reason: String,
    pub phases: Vec<PhaseReport>,
    pub tasks_drained: u32,
    pub tasks_cancelled: u32,
    pub tasks_failed: u32,
    pub runners: Vec<RunnerShutdown>,
    /// One line per escalation, e.g. `runner i-1/2: SIGTERM, then SIGKILL (closing deadline)`.
    pub escalations: Vec<String>,
    /// Anything that went wrong; empty on a clean shutdown.
    pub errors: Vec<String>,
    pub total_ms: f64,
}

impl ShutdownReport {
    /// No escalation and no error.
    pub fn is_clean(&self) -> bool {
        self.escalations.is_empty() && self.errors.is_empty()
    }
}

#[derive(Debug, Clone)]
struct Progress {
    acked: bool,
    ended: bool,
    exited: bool,
    escalated: bool,
}

pub struct ShutdownCoordinator {
    phase: ShutdownPhase,
    deadlines: ShutdownDeadlines,
    started: Instant,
    phase_started: Instant,
    runners: Vec<Progress>,
    report: ShutdownReport,
}

impl ShutdownCoordinator {
    /// Starts in `Signaling`. `exited[r]` marks runners already gone.
    pub fn new(
        instance_id: &str,
        runner_ids: Vec<String>,
        exited: &[bool],
        mode: ShutdownMode,
        reason: String,
        deadlines: ShutdownDeadlines,
        now: Instant,
    ) -> Self {
        let runners = exited
            .iter()
            .map(|&exited| Progress {
                acked: exited,
                ended: exited,
                exited,
                escalated: false,
            })
            .collect();
        let report = ShutdownReport {
            instance_id: instance_id.to_string(),
            mode,
            reason,
            phases: Vec::new(),
            tasks_drained: 0,
            tasks_cancelled: 0,
            tasks_failed: 0,
            runners: runner_ids
                .into_iter()
                .map(|runner_id| RunnerShutdown {
                    runner_id,
                    acked: false,
                    ended: false,
                    exit: None,
                    escalation: None,
                    released: Vec::new(),
                })
                .collect(),
            escalations: Vec::new(),
            errors: Vec::new(),
            total_ms: 0.0,
        };
        ShutdownCoordinator {
            phase: ShutdownPhase::Signaling,
            deadlines,
            started: now,
            phase_started: now,
            runners,
            report,
        }
    }

    pub fn phase(&self) -> ShutdownPhase {
        self.phase
    }

    pub fn is_done(&self) -> bool {
        self.phase == ShutdownPhase::Done
    }

    pub fn report_mut(&mut self) -> &mut ShutdownReport {
        &mut self.report
    }

    /// When the current phase times out.
    pub fn deadline(&self) -> Option<Instant> {
        let budget = match self.phase {
            ShutdownPhase::Signaling => self.deadlines.signal,
            ShutdownPhase::Draining => self.deadlines.drain,
            ShutdownPhase::Closing => self.deadlines.close,
            ShutdownPhase::Done => return None,
        };
        Some(self.phase_started + budget)
    }

    pub fn on_ack(&mut self, rank: usize, now: Instant) -> Vec<Action> {
        self.runners[rank].acked = true;
        self.report.runners[rank].acked = true;
        self.advance(now, false)
    }

    pub fn on_ended(&mut self, rank: usize, now: Instant) -> Vec<Action> {
        let runner = &mut self.runners[rank];
        runner.acked = true;
        runner.ended = true;
        self.report.runners[rank].ended = true;
        let mut actions = vec![Action::Close(rank)];
        actions.extend(self.advance(now, false));
        actions
    }

    /// A runner reported what it released; a failed release is an error.
    pub fn on_released(&mut self, rank: usize, released: Vec<ipc::proto::ReleasedResource>) {
        let entry = &mut self.report.runners[rank];
        for resource in &released {
            if let Some(error) = &resource.error {
                self.report.errors.push(format!(
                    "runner {}: releasing {}: {error}",
                    entry.runner_id, resource.name
                ));
            }
        }
        entry.released = released;
    }

    /// A runner failed during the shutdown: stop it now, without waiting for
    /// the phase deadlines.
    pub fn on_failed(&mut self, rank: usize, why: String, now: Instant) -> Vec<Action> {
        self.report.errors.push(why);
        let mut actions = self.escalate(rank, true, "failed during shutdown");
        actions.extend(self.advance(now, false));
        actions
    }

    /// The runners cannot finish (a node of the instance was lost: their
    /// data-plane links to it may be silent): stop every runner still alive
    /// now, without waiting for the phase deadlines.
    pub fn stop_all(&mut self, why: &str, now: Instant) -> Vec<Action> {
        let mut actions: Vec<Action> = (0..self.runners.len())
            .flat_map(|rank| self.escalate(rank, true, why))
            .collect();
        actions.extend(self.advance(now, false));
        actions
    }

    /// A runner's process was reaped. `detail` says what went wrong when
    /// it did not stop by itself after ending its stream (hung, crashed).
    pub fn on_exited(
        &mut self,
        rank: usize,
        exit: ExitCause,
        stop: Option<StopOutcome>,
        detail: Option<String>,
        now: Instant,
    ) -> Vec<Action> {
        let runner = &mut self.runners[rank];
        if runner.exited {
            // Gone before the shutdown began: the reason for it, not news.
            self.report.runners[rank].exit.get_or_insert(exit);
            return self.advance(now, false);
        }
        runner.exited = true;
        runner.acked = true;
        let clean = runner.ended && exit.is_success();
        runner.ended = true;
        let escalated = runner.escalated;
        let entry = &mut self.report.runners[rank];
        entry.exit = Some(exit);
        if stop
            .as_ref()
            .is_some_and(|s| s.sent_sigterm || s.sent_sigkill)
        {
            entry.escalation = stop;
        }
        // A stop this coordinator escalated is already in `escalations`.
        if !clean && !escalated {
            let what =
                detail.unwrap_or_else(|| format!("exited with {exit} before ending its stream"));
            self.report
                .errors
                .push(format!("runner {}: {what}", entry.runner_id));
        }
        self.advance(now, false)
    }

    /// The clock passed [`Self::deadline`].
    pub fn on_timeout(&mut self, now: Instant) -> Vec<Action> {
        self.advance(now, true)
    }

    fn escalate(&mut self, rank: usize, term_first: bool, why: &str) -> Vec<Action> {
        let runner = &mut self.runners[rank];
        if runner.exited || runner.escalated {
            return Vec::new();
        }
        runner.escalated = true;
        let id = &self.report.runners[rank].runner_id;
        let how = if term_first {
            "SIGTERM, then SIGKILL after the grace period"
        } else {
            "SIGKILL"
        };
        self.report
            .escalations
            .push(format!("runner {id}: {how} ({why})"));
        vec![Action::Terminate { rank, term_first }]
    }

    fn enter(&mut self, next: ShutdownPhase, now: Instant, timed_out: bool) {
        self.report.phases.push(PhaseReport {
            phase: self.phase,
            duration_ms: ms(now - self.phase_started),
            timed_out,
        });
        self.phase = next;
        self.phase_started = now;
        if next == ShutdownPhase::Done {
            self.report.total_ms = ms(now - self.started);
        }
    }

    fn advance(&mut self, now: Instant, timed_out: bool) -> Vec<Action> {
        let mut actions = Vec::new();
        loop {
            let all = |f: fn(&Progress) -> bool| self.runners.iter().all(f);
            match self.phase {
                ShutdownPhase::Signaling if all(|r| r.acked) => {
                    self.enter(ShutdownPhase::Draining, now, false)
                }
                ShutdownPhase::Signaling
                    if timed_out && self.deadline().is_some_and(|d| now >= d) =>
                {
                    self.enter(ShutdownPhase::Draining, now, true)
                }
                ShutdownPhase::Draining if all(|r| r.ended) => {
                    self.enter(ShutdownPhase::Closing, now, false)
                }
                ShutdownPhase::Draining
                    if timed_out && self.deadline().is_some_and(|d| now >= d) =>
                {
                    self.enter(ShutdownPhase::Closing, now, true);
                    // Whoever did not end its stream in time is stopped.
                    for rank in 0..self.runners.len() {
                        if !self.runners[rank].ended {
                            actions.extend(self.escalate(rank, true, "drain deadline"));
                        }
                    }
                }
                ShutdownPhase::Closing if all(|r| r.exited) => {
                    self.enter(ShutdownPhase::Done, now, false)
                }
                ShutdownPhase::Closing
                    if timed_out && self.deadline().is_some_and(|d| now >= d) =>
                {
                    for rank in 0..self.runners.len() {
                        actions.extend(self.escalate(rank, true, "closing deadline"));
                    }
                    // Escalation always reaps; the phase ends with the exits.
                    self.phase_started = now;
                    return actions;
                }
                _ => return actions,
            }
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deadlines() -> ShutdownDeadlines {
        ShutdownDeadlines {
            signal: Duration::from_secs(1),
            drain: Duration::from_secs(10),
            close: Duration::from_secs(2),
        }
    }

    fn coordinator(n: usize, now: Instant) -> ShutdownCoordinator {
        let ids = (0..n).map(|r| format!("i/{r}")).collect();
        ShutdownCoordinator::new(
            "i",
            ids,
            &vec![false; n],
            ShutdownMode::Drain,
            "requested".into(),
            deadlines(),
            now,
        )
    }

    #[test]
    fn graceful_path_is_clean() {
        let t = Instant::now();
        let mut c = coordinator(2, t);
        assert!(c.on_ack(0, t).is_empty());
        assert!(c.on_ack(1, t).is_empty());
        assert_eq!(c.phase(), ShutdownPhase::Draining);
        assert_eq!(c.on_ended(1, t), vec![Action::Close(1)]);
        assert_eq!(c.on_ended(0, t), vec![Action::Close(0)]);
        assert_eq!(c.phase(), ShutdownPhase::Closing);
        c.on_exited(0, ExitCause::Code(0), None, None, t);
        c.on_exited(1, ExitCause::Code(0), None, None, t);
        assert!(c.is_done());
        let report = c.report_mut().clone();
        assert!(report.is_clean(), "{report:?}");
        let phases: Vec<_> = report
            .phases
            .iter()
            .map(|p| (p.phase, p.timed_out))
            .collect();
        assert_eq!(
            phases,
            [
                (ShutdownPhase::Signaling, false),
                (ShutdownPhase::Draining, false),
                (ShutdownPhase::Closing, false)
            ]
        );
    }

    #[test]
    fn silent_runner_escalates_once_at_the_deadlines() {
        let t = Instant::now();
        let mut c = coordinator(2, t);
        c.on_ack(0, t);
        c.on_ended(0, t);
        // Runner 1 never acks: signaling times out.
        let t1 = t + Duration::from_secs(1);
        assert!(c.on_timeout(t1).is_empty());
        assert_eq!(c.phase(), ShutdownPhase::Draining);
        let t2 = t1 + Duration::from_secs(10);
        assert_eq!(
            c.on_timeout(t2),
            vec![Action::Terminate {
                rank: 1,
                term_first: true
            }]
        );
        assert_eq!(c.phase(), ShutdownPhase::Closing);
        c.on_exited(0, ExitCause::Code(0), None, None, t2);
        // A second timeout does not escalate again.
        assert!(c.on_timeout(t2 + Duration::from_secs(2)).is_empty());
        let stop = StopOutcome {
            exit: ExitCause::Signal(9),
            sent_sigterm: true,
            sent_sigkill: true,
            waited_ms: 1000.0,
        };
        c.on_exited(1, ExitCause::Signal(9), Some(stop), None, t2);
        assert!(c.is_done());
        let r = c.report_mut();
        assert_eq!(
            r.escalations,
            ["runner i/1: SIGTERM, then SIGKILL after the grace period (drain deadline)"]
        );
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert!(r.phases[0].timed_out && r.phases[1].timed_out);
    }

    #[test]
    fn stop_all_escalates_every_live_runner_once() {
        let t = Instant::now();
        let mut c = coordinator(3, t);
        c.on_exited(1, ExitCause::NodeLost, None, None, t);
        let term = |rank| Action::Terminate {
            rank,
            term_first: true,
        };
        assert_eq!(c.stop_all("node n-1 lost", t), vec![term(0), term(2)]);
        assert!(c.stop_all("node n-1 lost", t).is_empty());
        assert!(c.on_timeout(t + Duration::from_secs(60)).is_empty());
        assert_eq!(
            c.report_mut().escalations,
            [
                "runner i/0: SIGTERM, then SIGKILL after the grace period (node n-1 lost)",
                "runner i/2: SIGTERM, then SIGKILL after the grace period (node n-1 lost)"
            ]
        );
    }

    #[test]
    fn crash_during_shutdown_is_an_error() {
        let t = Instant::now();
        let mut c = coordinator(1, t);
        c.on_ack(0, t);
        c.on_exited(0, ExitCause::Signal(9), None, None, t);
        assert!(c.is_done());
        assert_eq!(
            c.report_mut().errors,
            ["runner i/0: exited with signal=9 (SIGKILL) before ending its stream"]
        );
    }

    #[test]
    fn already_exited_runners_are_never_escalated() {
        let t = Instant::now();
        let ids = vec!["i/0".to_string(), "i/1".to_string()];
        let mut c = ShutdownCoordinator::new(
            "i",
            ids,
            &[true, false],
            ShutdownMode::Cancel,
            "failure".into(),
            deadlines(),
            t,
        );
        let actions = c.on_failed(1, "runner i/1 hung".into(), t);
        assert_eq!(
            actions,
            vec![Action::Terminate {
                rank: 1,
                term_first: true
            }]
        );
        assert!(c.on_failed(0, "again".into(), t).is_empty());
    }
}
