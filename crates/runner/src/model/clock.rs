//! Where a rank's time goes: computing, waiting for its peers, turning
//! tensors into bytes and back, and sending them. Counted over the rank's
//! life with a clock read around each part (tens of nanoseconds, against
//! steps of milliseconds) and logged once as the rank closes (`rank
//! profile`), so that a benchmark can say why a layout runs as fast as it
//! does (`shardvisor bench load`'s profile table).
//!
//! Invariants:
//! * `forward` is the wall time of the rank's forward passes; the
//!   all-reduce's parts (`reduce_*`) happen inside it, so its compute is
//!   `forward - reduce_wait - reduce_codec - reduce_send`.
//! * `link_*` are the data plane outside the forward pass: a pipeline's
//!   activations and results, and (ranks > 0) the wait for the next step.

use std::time::{Duration, Instant};

#[derive(Debug, Default)]
pub struct RankClock {
    pub steps: u64,
    pub forward: Duration,
    /// All-reduces taken part in and the bytes this rank sent for them.
    pub reduces: u64,
    pub reduce_bytes: u64,
    /// Blocked on a peer's partial or reduced sum.
    pub reduce_wait: Duration,
    /// Tensors to bytes and back, and the sums of partials.
    pub reduce_codec: Duration,
    pub reduce_send: Duration,
    /// Blocked on the next message of the data plane outside a forward pass.
    pub link_wait: Duration,
    pub link_codec: Duration,
    pub link_send: Duration,
}

/// Runs `f`, adding its wall time to `slot`.
pub fn timed<T>(slot: &mut Duration, f: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let out = f();
    *slot += started.elapsed();
    out
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl RankClock {
    /// The forward passes' time less the all-reduce's parts.
    pub fn compute(&self) -> Duration {
        self.forward
            .saturating_sub(self.reduce_wait + self.reduce_codec + self.reduce_send)
    }

    /// Logs the profile once (a rank that ran no step has nothing to say).
    pub fn log(&self, rank: u32, layers: &std::ops::Range<usize>) {
        if self.steps == 0 {
            return;
        }
        tracing::info!(
            rank,
            layers = %format!("{}..{}", layers.start, layers.end),
            steps = self.steps,
            forward_ms = ms(self.forward),
            compute_ms = ms(self.compute()),
            reduces = self.reduces,
            reduce_bytes = self.reduce_bytes,
            reduce_wait_ms = ms(self.reduce_wait),
            reduce_codec_ms = ms(self.reduce_codec),
            reduce_send_ms = ms(self.reduce_send),
            link_wait_ms = ms(self.link_wait),
            link_codec_ms = ms(self.link_codec),
            link_send_ms = ms(self.link_send),
            "rank profile"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compute_is_the_forward_time_less_the_all_reduce() {
        let mut c = RankClock {
            forward: Duration::from_millis(100),
            reduce_wait: Duration::from_millis(30),
            reduce_codec: Duration::from_millis(5),
            reduce_send: Duration::from_millis(5),
            ..RankClock::default()
        };
        assert_eq!(c.compute(), Duration::from_millis(60));
        c.reduce_wait = Duration::from_millis(200);
        assert_eq!(c.compute(), Duration::ZERO, "never below zero");
        let mut slot = Duration::ZERO;
        let v = timed(&mut slot, || {
            std::thread::sleep(Duration::from_millis(2));
            7
        });
        assert_eq!(v, 7);
        assert!(slot >= Duration::from_millis(2), "{slot:?}");
    }
}
