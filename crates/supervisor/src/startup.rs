//! The startup barrier of one generation of an instance's runners, as a
//! sans-IO state machine: runner reports and the clock in, messages to send
//! and verdicts out. The instance actor does the sending and acts on the
//! verdicts; this type decides.
//!
//! Every rank passes Spawning → Idle (it says where it accepts data-plane
//! links) → Connecting → Loading → WarmingUp → Ready, each phase within its
//! budget.
//!
//! Invariants (the startup barrier):
//! * A rank in a startup phase has exactly one deadline: the budget of the
//!   phase it was asked to enter. Loading progress renews it; Ready clears
//!   it; so do the rank's exit and the start of a teardown.
//! * `Connect` goes to every rank once per generation, and only after every
//!   rank has reported Idle, so every rank gets every peer's address. The
//!   connect deadline covers waiting for the others too.
//! * Once a teardown has begun ([`Startup::stop`]) no rank is asked to enter
//!   another phase and the instance never becomes ready.
//! * [`StartAction::Ready`] comes once, when, and only when, every rank's
//!   latest report is Ready.
//! * A missed deadline names the rank, the phase and its budget
//!   ([`StartAction::Overdue`]), once.

use std::time::Duration;

use ipc::proto::{Phase, RunnerState, ToRunner};
use tokio::time::Instant;

/// Each startup phase's budget in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budgets {
    /// Spawn until the runner reports `Idle`.
    pub spawn_ms: u64,
    pub connect_ms: u64,
    /// Loading without any progress report.
    pub load_ms: u64,
    pub warmup_ms: u64,
}

/// A phase's deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    pub at: Instant,
    pub phase: Phase,
    pub budget_ms: u64,
}

impl Deadline {
    fn new(now: Instant, phase: Phase, budget_ms: u64) -> Deadline {
        Deadline {
            at: now + Duration::from_millis(budget_ms),
            phase,
            budget_ms,
        }
    }
}

/// What the actor must do.
#[derive(Debug, Clone, PartialEq)]
pub enum StartAction {
    /// Send `msg` to `rank`.
    Send { rank: usize, msg: ToRunner },
    /// `rank` did not finish `phase` within `budget_ms`: a failure.
    Overdue {
        rank: usize,
        phase: Phase,
        budget_ms: u64,
    },
    /// Every rank is ready: the instance is.
    Ready,
}

#[derive(Debug, Clone, Default)]
struct Rank {
    deadline: Option<Deadline>,
    /// Its latest report.
    latest: Option<RunnerState>,
    data_addr: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Startup {
    budgets: Budgets,
    ranks: Vec<Rank>,
    connect_sent: bool,
    ready_sent: bool,
    stopped: bool,
}

impl Startup {
    /// A generation of `n` ranks, all being spawned at `now`.
    pub fn new(n: usize, budgets: Budgets, now: Instant) -> Startup {
        let spawning = Deadline::new(now, Phase::Spawning, budgets.spawn_ms);
        let rank = Rank {
            deadline: Some(spawning),
            ..Rank::default()
        };
        Startup {
            budgets,
            ranks: vec![rank; n],
            connect_sent: false,
            ready_sent: false,
            stopped: false,
        }
    }

    /// `rank` could not be spawned: it has no deadline (its failure is
    /// already known) and never reports.
    pub fn spawn_failed(&mut self, rank: usize) {
        self.ranks[rank].deadline = None;
    }

    /// `rank` said where it accepts data-plane links.
    pub fn on_hello(&mut self, rank: usize, data_addr: Option<String>) {
        self.ranks[rank].data_addr = data_addr;
    }

    /// `rank` reported `state` at `now`.
    pub fn on_status(
        &mut self,
        rank: usize,
        state: &RunnerState,
        now: Instant,
    ) -> Vec<StartAction> {
        let b = self.budgets;
        let starting = !self.stopped;
        let r = &mut self.ranks[rank];
        r.latest = Some(state.clone());
        let mut actions = Vec::new();
        match state {
            RunnerState::Idle if starting => {
                r.deadline = Some(Deadline::new(now, Phase::Connecting, b.connect_ms));
            }
            RunnerState::Connected if starting => {
                r.deadline = Some(Deadline::new(now, Phase::Loading, b.load_ms));
                actions.push(StartAction::Send {
                    rank,
                    msg: ToRunner::Load,
                });
            }
            RunnerState::Loading { .. } if starting => {
                r.deadline = Some(Deadline::new(now, Phase::Loading, b.load_ms));
            }
            RunnerState::Loaded if starting => {
                r.deadline = Some(Deadline::new(now, Phase::WarmingUp, b.warmup_ms));
                actions.push(StartAction::Send {
                    rank,
                    msg: ToRunner::WarmUp,
                });
            }
            RunnerState::Ready => r.deadline = None,
            _ => {}
        }
        if starting && !self.connect_sent && self.all(|s| *s == RunnerState::Idle) {
            self.connect_sent = true;
            let peers: Vec<String> = self
                .ranks
                .iter()
                .map(|r| r.data_addr.clone().unwrap_or_default())
                .collect();
            actions.extend((0..self.ranks.len()).map(|rank| StartAction::Send {
                rank,
                msg: ToRunner::Connect {
                    peers: peers.clone(),
                    deadline_ms: b.connect_ms,
                },
            }));
        }
        if starting && !self.ready_sent && self.all(|s| *s == RunnerState::Ready) {
            self.ready_sent = true;
            actions.push(StartAction::Ready);
        }
        actions
    }

    fn all(&self, pred: impl Fn(&RunnerState) -> bool) -> bool {
        self.ranks
            .iter()
            .all(|r| r.latest.as_ref().is_some_and(&pred))
    }

    /// `rank` exited: it has no phase to finish.
    pub fn on_exited(&mut self, rank: usize) {
        self.ranks[rank].deadline = None;
    }

    /// A teardown began: no phase deadline applies any more.
    pub fn stop(&mut self) {
        self.stopped = true;
        for r in &mut self.ranks {
            r.deadline = None;
        }
    }

    /// Every deadline passed by `now`, each reported once.
    pub fn on_clock(&mut self, now: Instant) -> Vec<StartAction> {
        let mut actions = Vec::new();
        for (rank, r) in self.ranks.iter_mut().enumerate() {
            if let Some(d) = r.deadline.filter(|d| now >= d.at) {
                r.deadline = None;
                actions.push(StartAction::Overdue {
                    rank,
                    phase: d.phase,
                    budget_ms: d.budget_ms,
                });
            }
        }
        actions
    }

    /// The earliest deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.ranks
            .iter()
            .filter_map(|r| r.deadline)
            .map(|d| d.at)
            .min()
    }

    /// The phase `rank` was asked to enter and has not finished, if any.
    pub fn pending_phase(&self, rank: usize) -> Option<Phase> {
        self.ranks[rank].deadline.map(|d| d.phase)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Budgets = Budgets {
        spawn_ms: 100,
        connect_ms: 200,
        load_ms: 300,
        warmup_ms: 400,
    };

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn sends(actions: &[StartAction]) -> Vec<(usize, String)> {
        actions
            .iter()
            .filter_map(|a| match a {
                StartAction::Send { rank, msg } => Some((*rank, format!("{msg:?}"))),
                _ => None,
            })
            .collect()
    }

    /// Every rank reports Idle with an address.
    fn all_idle(s: &mut Startup, n: usize, t0: Instant) -> Vec<StartAction> {
        let mut last = Vec::new();
        for rank in 0..n {
            s.on_hello(rank, Some(format!("127.0.0.1:{}", 9000 + rank)));
            last = s.on_status(rank, &RunnerState::Idle, t0);
        }
        last
    }

    #[test]
    fn every_rank_starts_with_the_spawn_deadline() {
        let t0 = Instant::now();
        let s = Startup::new(3, B, t0);
        assert_eq!(s.next_deadline(), Some(t0 + ms(100)));
        assert!((0..3).all(|r| s.pending_phase(r) == Some(Phase::Spawning)));
    }

    #[test]
    fn connect_waits_for_every_rank_and_carries_every_address() {
        let t0 = Instant::now();
        let mut s = Startup::new(3, B, t0);
        s.on_hello(0, Some("a:1".into()));
        assert!(s.on_status(0, &RunnerState::Idle, t0).is_empty());
        s.on_hello(2, Some("c:3".into()));
        assert!(s.on_status(2, &RunnerState::Idle, t0).is_empty());
        s.on_hello(1, Some("b:2".into()));
        let actions = s.on_status(1, &RunnerState::Idle, t0);
        let peers = vec!["a:1".to_string(), "b:2".into(), "c:3".into()];
        let want: Vec<StartAction> = (0..3)
            .map(|rank| StartAction::Send {
                rank,
                msg: ToRunner::Connect {
                    peers: peers.clone(),
                    deadline_ms: 200,
                },
            })
            .collect();
        assert_eq!(actions, want);
        // Each rank is now in Connecting with its own deadline.
        assert!((0..3).all(|r| s.pending_phase(r) == Some(Phase::Connecting)));
    }

    #[test]
    fn connect_is_sent_once_per_generation() {
        let t0 = Instant::now();
        let mut s = Startup::new(2, B, t0);
        assert_eq!(sends(&all_idle(&mut s, 2, t0)).len(), 2);
        // A repeated Idle report does not send Connect again.
        assert!(sends(&s.on_status(0, &RunnerState::Idle, t0)).is_empty());
    }

    #[test]
    fn a_rank_that_never_reports_holds_the_barrier_and_misses_its_deadline() {
        let t0 = Instant::now();
        let mut s = Startup::new(2, B, t0);
        assert!(s.on_status(0, &RunnerState::Idle, t0 + ms(10)).is_empty());
        assert!(s.on_clock(t0 + ms(99)).is_empty());
        let overdue = s.on_clock(t0 + ms(100));
        assert_eq!(
            overdue,
            vec![StartAction::Overdue {
                rank: 1,
                phase: Phase::Spawning,
                budget_ms: 100
            }]
        );
        // Reported once.
        assert!(s.on_clock(t0 + ms(150)).is_empty());
        // Rank 0's connect deadline (from its Idle at +10) is still running.
        assert_eq!(s.next_deadline(), Some(t0 + ms(210)));
    }

    #[test]
    fn phases_follow_one_another_with_their_budgets() {
        let t0 = Instant::now();
        let mut s = Startup::new(1, B, t0);
        all_idle(&mut s, 1, t0);
        let t1 = t0 + ms(50);
        let a = s.on_status(0, &RunnerState::Connected, t1);
        assert_eq!(sends(&a), vec![(0, "Load".to_string())]);
        assert_eq!(s.pending_phase(0), Some(Phase::Loading));
        assert_eq!(s.next_deadline(), Some(t1 + ms(300)));
        let t2 = t1 + ms(250);
        let a = s.on_status(0, &RunnerState::Loaded, t2);
        assert_eq!(sends(&a), vec![(0, "WarmUp".to_string())]);
        assert_eq!(s.pending_phase(0), Some(Phase::WarmingUp));
        assert_eq!(s.next_deadline(), Some(t2 + ms(400)));
    }

    #[test]
    fn loading_progress_renews_the_load_deadline() {
        let t0 = Instant::now();
        let mut s = Startup::new(1, B, t0);
        all_idle(&mut s, 1, t0);
        s.on_status(0, &RunnerState::Connected, t0);
        let progress = RunnerState::Loading { done: 1, total: 10 };
        s.on_status(0, &progress, t0 + ms(290));
        assert!(s.on_clock(t0 + ms(300)).is_empty(), "progress renewed it");
        assert_eq!(s.next_deadline(), Some(t0 + ms(590)));
        let overdue = s.on_clock(t0 + ms(590));
        assert_eq!(
            overdue,
            vec![StartAction::Overdue {
                rank: 0,
                phase: Phase::Loading,
                budget_ms: 300
            }]
        );
    }

    #[test]
    fn ready_once_every_rank_is_ready_and_only_then() {
        let t0 = Instant::now();
        let mut s = Startup::new(2, B, t0);
        all_idle(&mut s, 2, t0);
        let a = s.on_status(0, &RunnerState::Ready, t0);
        assert!(!a.contains(&StartAction::Ready));
        assert_eq!(s.pending_phase(0), None, "Ready clears the deadline");
        let a = s.on_status(1, &RunnerState::Ready, t0);
        assert_eq!(a, vec![StartAction::Ready]);
        assert_eq!(s.next_deadline(), None);
        // A later Ready (after a task) does not announce it again.
        assert!(s.on_status(1, &RunnerState::Ready, t0).is_empty());
    }

    #[test]
    fn a_teardown_stops_every_phase_and_readiness() {
        let t0 = Instant::now();
        let mut s = Startup::new(2, B, t0);
        s.on_status(0, &RunnerState::Idle, t0);
        s.stop();
        assert_eq!(s.next_deadline(), None);
        assert!(s.on_clock(t0 + ms(10_000)).is_empty());
        // Late reports start nothing: no Connect, no Load, no Ready.
        assert!(s.on_status(1, &RunnerState::Idle, t0).is_empty());
        assert!(s.on_status(0, &RunnerState::Connected, t0).is_empty());
        assert!(s.on_status(0, &RunnerState::Ready, t0).is_empty());
        assert!(s.on_status(1, &RunnerState::Ready, t0).is_empty());
        assert_eq!(s.next_deadline(), None);
    }

    #[test]
    fn an_exit_or_a_failed_spawn_clears_that_ranks_deadline_only() {
        let t0 = Instant::now();
        let mut s = Startup::new(3, B, t0);
        s.spawn_failed(1);
        s.on_exited(2);
        assert_eq!(s.pending_phase(0), Some(Phase::Spawning));
        assert_eq!(s.pending_phase(1), None);
        assert_eq!(s.pending_phase(2), None);
        let overdue = s.on_clock(t0 + ms(100));
        assert_eq!(overdue.len(), 1);
    }

    #[test]
    fn a_failed_rank_never_lets_the_barrier_pass() {
        let t0 = Instant::now();
        let mut s = Startup::new(2, B, t0);
        s.on_status(0, &RunnerState::Idle, t0);
        let failed = RunnerState::Failed {
            phase: Phase::Spawning,
            cause: "x".into(),
            recurs: false,
            link: false,
        };
        assert!(s.on_status(1, &failed, t0).is_empty());
        assert!(s.on_status(0, &RunnerState::Idle, t0).is_empty());
    }
}
