//! Failure attribution: which runner an instance's failure is blamed on, in
//! which phase, and why, as types. The instance actor feeds it what it saw;
//! nothing here does I/O or reads message text.
//!
//! Invariants (failure attribution):
//! * Every failure names one runner, the phase it was in, and a typed
//!   [`FailureCause`]; the message clients read is made from those, never
//!   the other way round.
//! * A runner's report that its data-plane link to a peer broke is, until
//!   shown otherwise, the echo of that peer failing: it is held for
//!   [`LINK_LOSS_GRACE`] ([`EchoHold`]), and a failure of any runner in that
//!   time (usually the peer's own exit) is blamed instead. Only the first
//!   echo is held; when the grace passes with nothing else, the reporter is
//!   blamed with a [`FailureCause::Link`].
//! * A runner that is only "ready" while the instance has tasks in flight
//!   is running (a stage driven over the data plane reports no task of its
//!   own): [`blamed_phase`].

use std::fmt;
use std::time::Duration;

use ipc::proto::Phase;
use serde::Serialize;
use tokio::time::Instant;

use crate::process::ExitCause;
use crate::runner_handle::ChannelEnd;

/// How long a lost-link report waits for the peer's own failure.
pub const LINK_LOSS_GRACE: Duration = Duration::from_millis(500);

/// Why a runner failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureCause {
    /// It could not be started.
    Spawn { error: String },
    /// It did not finish `phase` within its budget.
    Deadline { phase: Phase, budget_ms: u64 },
    /// It had `tasks` in flight and reported no progress on any of them.
    Stalled { tasks: usize, stall_ms: u64 },
    /// It refused a request of the node.
    Rejected { request: String, reason: String },
    /// It ended its control channel without being asked to.
    EndedUnasked { reason: String },
    /// It reported a failure of its own (a bad model file, a load error).
    Reported { cause: String },
    /// It reported that its data-plane link to a peer broke, and no other
    /// runner's failure explained it.
    Link { cause: String },
    /// The node could not send it a message: its control channel is stuck.
    Stuck { error: String },
    /// It stopped answering pings and was killed.
    Hung { silent_ms: u64, exit: ExitCause },
    /// The node hosting it was lost.
    NodeLost { node: String, detail: String },
    /// The process ended. `ended`: after ending its channel itself;
    /// `broke`: its channel broke first, as described.
    Exited {
        exit: ExitCause,
        ended: bool,
        broke: Option<String>,
    },
}

/// [`FailureCause`]'s variant, as `/state` shows it (`failure.kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CauseKind {
    Spawn,
    Deadline,
    Stalled,
    Rejected,
    EndedUnasked,
    Reported,
    Link,
    Stuck,
    Hung,
    NodeLost,
    Exited,
}

impl FailureCause {
    /// The cause of a runner's exit the node did not ask for.
    /// `hung`: how long it had been silent when it was killed for it.
    pub fn of_exit(
        exit: ExitCause,
        channel: &ChannelEnd,
        hung: Option<Duration>,
        node: Option<&str>,
    ) -> FailureCause {
        match (hung, channel) {
            (Some(silent), _) => FailureCause::Hung {
                silent_ms: silent.as_millis() as u64,
                exit,
            },
            (None, ChannelEnd::PeerLost { detail, .. }) if exit == ExitCause::NodeLost => {
                FailureCause::NodeLost {
                    node: node.unwrap_or("?").to_string(),
                    detail: detail.clone(),
                }
            }
            (None, ChannelEnd::PeerLost { detail, eof: false }) => FailureCause::Exited {
                exit,
                ended: false,
                broke: Some(detail.clone()),
            },
            (None, end) => FailureCause::Exited {
                exit,
                ended: matches!(end, ChannelEnd::End),
                broke: None,
            },
        }
    }

    pub fn kind(&self) -> CauseKind {
        match self {
            FailureCause::Spawn { .. } => CauseKind::Spawn,
            FailureCause::Deadline { .. } => CauseKind::Deadline,
            FailureCause::Stalled { .. } => CauseKind::Stalled,
            FailureCause::Rejected { .. } => CauseKind::Rejected,
            FailureCause::EndedUnasked { .. } => CauseKind::EndedUnasked,
            FailureCause::Reported { .. } => CauseKind::Reported,
            FailureCause::Link { .. } => CauseKind::Link,
            FailureCause::Stuck { .. } => CauseKind::Stuck,
            FailureCause::Hung { .. } => CauseKind::Hung,
            FailureCause::NodeLost { .. } => CauseKind::NodeLost,
            FailureCause::Exited { .. } => CauseKind::Exited,
        }
    }
}

impl fmt::Display for FailureCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailureCause::Spawn { error } => write!(f, "could not spawn: {error}"),
            FailureCause::Deadline { phase, budget_ms } => {
                write!(f, "did not finish {phase} within {budget_ms} ms")
            }
            FailureCause::Stalled { tasks, stall_ms } => {
                write!(
                    f,
                    "made no progress on its {tasks} task(s) for {stall_ms} ms"
                )
            }
            FailureCause::Rejected { request, reason } => write!(f, "rejected {request}: {reason}"),
            FailureCause::EndedUnasked { reason } => {
                write!(f, "ended its channel unasked ({reason})")
            }
            FailureCause::Reported { cause }
            | FailureCause::Link { cause }
            | FailureCause::Stuck { error: cause } => f.write_str(cause),
            FailureCause::Hung { silent_ms, exit } => {
                write!(f, "hung (no pong for {silent_ms} ms), killed: {exit}")
            }
            FailureCause::NodeLost { node, detail } => write!(f, "node {node} lost: {detail}"),
            FailureCause::Exited {
                exit, ended: true, ..
            } => write!(f, "exited with {exit} after ending its channel"),
            FailureCause::Exited {
                exit,
                broke: Some(detail),
                ..
            } => write!(f, "exited with {exit}; its channel broke: {detail}"),
            FailureCause::Exited { exit, .. } => write!(f, "exited with {exit}"),
        }
    }
}

/// The phase a failure is blamed in: a runner "ready" while the instance
/// has tasks in flight is running them.
pub fn blamed_phase(phase: Phase, tasks_in_flight: bool) -> Phase {
    if phase == Phase::Ready && tasks_in_flight {
        Phase::Running
    } else {
        phase
    }
}

/// A failure as blamed: the runner's rank, its phase, the cause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blame {
    pub rank: usize,
    pub phase: Phase,
    pub cause: FailureCause,
}

/// The first lost-link report, held for the grace in which a peer's own
/// failure takes the blame.
#[derive(Debug, Clone, Default)]
pub struct EchoHold {
    held: Option<(Blame, Instant)>,
}

impl EchoHold {
    /// `rank` reported at `now` that a link to a peer broke; only the
    /// first report is kept.
    pub fn hold(&mut self, rank: usize, phase: Phase, cause: String, now: Instant) {
        self.held.get_or_insert((
            Blame {
                rank,
                phase,
                cause: FailureCause::Link { cause },
            },
            now + LINK_LOSS_GRACE,
        ));
    }

    /// Another failure is being blamed: the echo is explained.
    pub fn clear(&mut self) {
        self.held = None;
    }

    /// When the held report is to be blamed on its reporter.
    pub fn deadline(&self) -> Option<Instant> {
        self.held.as_ref().map(|(_, t)| *t)
    }

    /// The held report, once its grace has passed with nothing else.
    pub fn due(&mut self, now: Instant) -> Option<Blame> {
        if self.deadline().is_some_and(|t| now >= t) {
            self.held.take().map(|(b, _)| b)
        } else {
            None
        }
    }
}

/// Why an instance failed, for clients and `/state`.
#[derive(Debug, Clone, Serialize)]
pub struct FailureReport {
    pub runner_id: String,
    pub rank: u32,
    pub phase: Phase,
    /// The cause in words, and its kind.
    pub cause: String,
    pub kind: CauseKind,
    /// Runners that were not Ready at the time, with their state.
    pub not_ready: Vec<String>,
    pub stderr_tail: Vec<String>,
    /// The runner said the same start would fail the same way (a bad or
    /// unsupported model file): the instance is not restarted.
    pub recurs: bool,
    /// The whole message as clients receive it.
    pub message: String,
}

impl FailureReport {
    /// The report of `blame` on runner `runner_id`. `not_ready` is named
    /// only while the instance is starting.
    pub fn new(
        runner_id: &str,
        blame: &Blame,
        starting: bool,
        not_ready: Vec<String>,
        stderr_tail: Vec<String>,
        recurs: bool,
    ) -> FailureReport {
        let Blame { rank, phase, cause } = blame;
        let mut message =
            format!("runner {runner_id} (rank {rank}) failed in phase {phase}: {cause}");
        if starting && !not_ready.is_empty() {
            message.push_str(&format!("; not ready: {}", not_ready.join(", ")));
        }
        if !stderr_tail.is_empty() {
            message.push_str(&format!("; last stderr: {}", stderr_tail.join(" | ")));
        }
        FailureReport {
            runner_id: runner_id.to_string(),
            rank: *rank as u32,
            phase: *phase,
            cause: cause.to_string(),
            kind: cause.kind(),
            not_ready,
            stderr_tail,
            recurs,
            message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn an_echo_waits_out_the_grace_then_blames_its_reporter() {
        let t0 = Instant::now();
        let mut h = EchoHold::default();
        h.hold(2, Phase::Running, "link to rank 1 broke".into(), t0);
        assert_eq!(h.deadline(), Some(t0 + LINK_LOSS_GRACE));
        assert_eq!(h.due(t0 + LINK_LOSS_GRACE - ms(1)), None);
        let blame = h.due(t0 + LINK_LOSS_GRACE).expect("due");
        assert_eq!(blame.rank, 2);
        assert_eq!(blame.cause.kind(), CauseKind::Link);
        assert_eq!(h.due(t0 + ms(10_000)), None, "blamed once");
    }

    #[test]
    fn only_the_first_echo_is_held() {
        let t0 = Instant::now();
        let mut h = EchoHold::default();
        h.hold(2, Phase::Running, "first".into(), t0);
        h.hold(0, Phase::Running, "second".into(), t0 + ms(100));
        let blame = h.due(t0 + ms(10_000)).unwrap();
        assert_eq!(blame.rank, 2);
        assert_eq!(blame.cause.to_string(), "first");
        assert_eq!(h.deadline(), None);
    }

    #[test]
    fn the_peers_own_failure_explains_the_echo() {
        let t0 = Instant::now();
        let mut h = EchoHold::default();
        h.hold(2, Phase::Running, "link broke".into(), t0);
        // The actor blames the peer's exit and clears the echo.
        h.clear();
        assert_eq!(h.deadline(), None);
        assert_eq!(h.due(t0 + ms(10_000)), None);
    }

    #[test]
    fn exits_are_told_apart_by_how_the_channel_ended() {
        let killed = ExitCause::Signal(9);
        let hung = FailureCause::of_exit(killed, &ChannelEnd::Open, Some(ms(3_100)), None);
        assert_eq!(hung.kind(), CauseKind::Hung);
        assert_eq!(
            hung.to_string(),
            "hung (no pong for 3100 ms), killed: signal=9 (SIGKILL)"
        );
        let lost = ChannelEnd::PeerLost {
            detail: "lease expired".into(),
            eof: true,
        };
        let node = FailureCause::of_exit(ExitCause::NodeLost, &lost, None, Some("n2"));
        assert_eq!(node.kind(), CauseKind::NodeLost);
        assert_eq!(node.to_string(), "node n2 lost: lease expired");
        let broke = ChannelEnd::PeerLost {
            detail: "malformed frame".into(),
            eof: false,
        };
        let exited = FailureCause::of_exit(ExitCause::Code(3), &broke, None, None);
        assert_eq!(exited.kind(), CauseKind::Exited);
        assert_eq!(
            exited.to_string(),
            "exited with exitcode=3; its channel broke: malformed frame"
        );
        // A stream that just ended is the process going away, not a break.
        let eof = ChannelEnd::PeerLost {
            detail: "eof".into(),
            eof: true,
        };
        let plain = FailureCause::of_exit(ExitCause::Code(3), &eof, None, None);
        assert_eq!(plain.to_string(), "exited with exitcode=3");
        let ended = FailureCause::of_exit(ExitCause::Code(0), &ChannelEnd::End, None, None);
        assert_eq!(
            ended.to_string(),
            "exited with exitcode=0 after ending its channel"
        );
    }

    #[test]
    fn a_ready_runner_with_tasks_in_flight_fails_in_running() {
        assert_eq!(blamed_phase(Phase::Ready, true), Phase::Running);
        assert_eq!(blamed_phase(Phase::Ready, false), Phase::Ready);
        assert_eq!(blamed_phase(Phase::Loading, true), Phase::Loading);
    }

    #[test]
    fn the_report_names_runner_phase_cause_and_while_starting_the_others() {
        let blame = Blame {
            rank: 1,
            phase: Phase::Loading,
            cause: FailureCause::Deadline {
                phase: Phase::Loading,
                budget_ms: 300,
            },
        };
        let not_ready = vec!["i/0 (loaded)".to_string()];
        let r = FailureReport::new(
            "i/1",
            &blame,
            true,
            not_ready.clone(),
            vec!["boom".into()],
            false,
        );
        assert_eq!(
            r.message,
            "runner i/1 (rank 1) failed in phase loading: did not finish loading within 300 ms; \
             not ready: i/0 (loaded); last stderr: boom"
        );
        assert_eq!(r.kind, CauseKind::Deadline);
        assert_eq!(r.cause, "did not finish loading within 300 ms");
        // Serving, the others' states are not part of the message.
        let r = FailureReport::new("i/1", &blame, false, not_ready, vec![], false);
        assert_eq!(
            r.message,
            "runner i/1 (rank 1) failed in phase loading: did not finish loading within 300 ms"
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["kind"], "deadline");
    }
}
