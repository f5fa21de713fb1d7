//! A pure, sans-IO restart policy for supervised runner processes.
//!
//! The policy never reads a clock: every call takes `now`, a [`Duration`]
//! offset from an epoch the caller chooses, which keeps it deterministic and
//! trivially testable.
//!
//! Invariants:
//! - At most `max_restarts` restarts are granted within any sliding `window`;
//!   a restart granted at time `t` counts while `t` lies in `(now - window, now]`.
//!   `max_restarts == 0` therefore means the policy always gives up.
//! - The n-th granted backoff (counting from 0 since the last reset) is
//!   `min(backoff_initial * 2^n, backoff_max)`.
//! - If the instance was continuously Ready for at least `window` before a
//!   failure, that failure first resets the restart count and the backoff,
//!   as if the policy were new.
//! - Giving up does not change state: asking again at the same `now` gives up
//!   again, and a later `now` may grant a restart once old ones age out.
//! - Callers are expected to pass non-decreasing `now` values.

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Tunables of a [`RestartPolicy`]; durations travel as whole milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RestartConfig {
    pub max_restarts: u32,
    #[serde(rename = "window_ms", with = "millis")]
    pub window: Duration,
    #[serde(rename = "backoff_initial_ms", with = "millis")]
    pub backoff_initial: Duration,
    #[serde(rename = "backoff_max_ms", with = "millis")]
    pub backoff_max: Duration,
}

impl Default for RestartConfig {
    fn default() -> Self {
        Self {
            max_restarts: 5,
            window: Duration::from_secs(60),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(10),
        }
    }
}

/// Serializes a `Duration` as a `u64` of milliseconds, which is what
/// configuration files write by hand.
mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        // Saturate rather than fail: no sane configuration reaches u64 millis.
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// What the supervisor should do after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartDecision {
    /// Restart after waiting this backoff.
    RestartAfter(Duration),
    /// Stop restarting: `restarts` restarts already happened within `window`.
    GiveUp { restarts: u32, window: Duration },
}

/// Decides whether and when to restart a failed instance.
#[derive(Debug, Clone)]
pub struct RestartPolicy {
    config: RestartConfig,
    /// Times of granted restarts, oldest first; pruned on each failure.
    restarts: VecDeque<Duration>,
    next_backoff: Duration,
    /// When the instance became Ready, if it has been Ready ever since.
    ready_since: Option<Duration>,
}

impl RestartPolicy {
    pub fn new(config: RestartConfig) -> Self {
        let next_backoff = first_backoff(&config);
        Self {
            config,
            restarts: VecDeque::new(),
            next_backoff,
            ready_since: None,
        }
    }

    pub fn config(&self) -> &RestartConfig {
        &self.config
    }

    /// Records that the instance became Ready; repeated calls keep the
    /// earliest time because readiness is only broken by a failure.
    pub fn on_ready(&mut self, now: Duration) {
        self.ready_since.get_or_insert(now);
    }

    /// Records a failure at `now` and decides what to do about it.
    pub fn on_failure(&mut self, now: Duration) -> RestartDecision {
        let window = self.config.window;
        // A failure ends readiness; a long enough Ready stretch forgives the past.
        if let Some(since) = self.ready_since.take() {
            if now.saturating_sub(since) >= window {
                self.restarts.clear();
                self.next_backoff = first_backoff(&self.config);
            }
        }
        // Restarts at or before `now - window` fall out of the sliding window.
        while let Some(&oldest) = self.restarts.front() {
            if now.saturating_sub(oldest) >= window {
                self.restarts.pop_front();
            } else {
                break;
            }
        }
        let restarts = self.restarts();
        if restarts >= self.config.max_restarts {
            // With restarts disabled, giving up is the configured behaviour,
            // not a degradation worth a warning.
            if self.config.max_restarts > 0 {
                tracing::warn!(restarts, ?window, "restart limit reached, giving up");
            }
            return RestartDecision::GiveUp { restarts, window };
        }
        let backoff = self.next_backoff;
        self.restarts.push_back(now);
        self.next_backoff = backoff
            .checked_mul(2)
            .unwrap_or(Duration::MAX)
            .min(self.config.backoff_max);
        tracing::debug!(?backoff, restarts = restarts + 1, "restart granted");
        RestartDecision::RestartAfter(backoff)
    }

    /// Restarts counted in the window as of the last failure.
    pub fn restarts(&self) -> u32 {
        // The count never exceeds `max_restarts: u32`, so this cannot saturate.
        u32::try_from(self.restarts.len()).unwrap_or(u32::MAX)
    }

    /// The backoff the next granted restart will use, ignoring a pending reset.
    pub fn next_backoff(&self) -> Duration {
        self.next_backoff
    }
}

/// The first backoff is capped too, so `backoff_max` is a hard ceiling even
/// when the configuration sets it below `backoff_initial`.
fn first_backoff(config: &RestartConfig) -> Duration {
    config.backoff_initial.min(config.backoff_max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::value::{Error as DeError, MapDeserializer};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn restart_after(d: RestartDecision) -> Duration {
        match d {
            RestartDecision::RestartAfter(b) => b,
            other => panic!("expected a restart, got {other:?}"),
        }
    }

    #[test]
    fn backoff_sequence_doubles_up_to_max() {
        let mut p = RestartPolicy::new(RestartConfig {
            max_restarts: 100,
            ..RestartConfig::default()
        });
        let got: Vec<_> = (0..8)
            .map(|i| restart_after(p.on_failure(secs(i))))
            .collect();
        let want = [500, 1000, 2000, 4000, 8000, 10_000, 10_000, 10_000].map(ms);
        assert_eq!(got, want);
        assert_eq!(p.restarts(), 8);
        assert_eq!(p.next_backoff(), secs(10));
    }

    #[test]
    fn gives_up_past_limit_within_window() {
        let mut p = RestartPolicy::new(RestartConfig::default());
        for i in 0..5 {
            restart_after(p.on_failure(secs(i * 10)));
        }
        let give_up = RestartDecision::GiveUp {
            restarts: 5,
            window: secs(60),
        };
        assert_eq!(p.on_failure(ms(59_999)), give_up);
        // Giving up leaves the state alone, so it is stable.
        assert_eq!(p.on_failure(ms(59_999)), give_up);
        assert_eq!(p.restarts(), 5);
    }

    #[test]
    fn window_is_half_open_so_old_restarts_age_out() {
        let mut p = RestartPolicy::new(RestartConfig::default());
        for i in 0..5 {
            restart_after(p.on_failure(secs(i * 10)));
        }
        // The restart at t=0 is exactly `window` old at t=60 and no longer counts.
        assert_eq!(restart_after(p.on_failure(secs(60))), secs(10));
        assert_eq!(p.restarts(), 5);
    }

    #[test]
    fn failures_wider_than_window_keep_restarting() {
        let mut p = RestartPolicy::new(RestartConfig::default());
        for i in 0..20 {
            restart_after(p.on_failure(secs(i * 61)));
            assert_eq!(p.restarts(), 1);
        }
        // Without a stable Ready period the backoff stays at its ceiling.
        assert_eq!(p.next_backoff(), secs(10));
    }

    #[test]
    fn stable_ready_window_resets_count_and_backoff() {
        let mut p = RestartPolicy::new(RestartConfig::default());
        for i in 0..4 {
            restart_after(p.on_failure(secs(i)));
        }
        assert_eq!(p.next_backoff(), secs(8));
        p.on_ready(secs(10));
        p.on_ready(secs(30));
        assert_eq!(restart_after(p.on_failure(secs(70))), ms(500));
        assert_eq!(p.restarts(), 1);
        assert_eq!(p.next_backoff(), secs(1));
    }

    #[test]
    fn short_ready_period_does_not_reset() {
        let mut p = RestartPolicy::new(RestartConfig::default());
        for i in 0..4 {
            restart_after(p.on_failure(secs(i)));
        }
        p.on_ready(secs(10));
        // Ready for 59 s is short of the window, so the backoff keeps growing
        // even though the earlier restarts have aged out of the count.
        assert_eq!(restart_after(p.on_failure(secs(69))), secs(8));
        assert_eq!(p.restarts(), 1);
        assert_eq!(p.next_backoff(), secs(10));
    }

    #[test]
    fn zero_max_restarts_never_restarts() {
        let mut p = RestartPolicy::new(RestartConfig {
            max_restarts: 0,
            ..RestartConfig::default()
        });
        p.on_ready(secs(0));
        let want = RestartDecision::GiveUp {
            restarts: 0,
            window: secs(60),
        };
        assert_eq!(p.on_failure(secs(1000)), want);
        assert_eq!(p.restarts(), 0);
    }

    #[test]
    fn backoff_initial_is_capped_by_max() {
        let mut p = RestartPolicy::new(RestartConfig {
            backoff_initial: secs(30),
            ..RestartConfig::default()
        });
        assert_eq!(restart_after(p.on_failure(secs(0))), secs(10));
    }

    #[test]
    fn config_deserializes_millis_with_defaults() {
        let fields = [("max_restarts", 3u64), ("window_ms", 30_000)];
        let de = MapDeserializer::<_, DeError>::new(fields.into_iter());
        let cfg = RestartConfig::deserialize(de).unwrap();
        assert_eq!(
            cfg,
            RestartConfig {
                max_restarts: 3,
                window: secs(30),
                ..RestartConfig::default()
            }
        );
    }
}
