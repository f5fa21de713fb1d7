//! How many prompt tokens one prefill step takes: a pure policy.
//!
//! A long prompt is fed in chunks, one per step; each step reports progress
//! (so the node's stall clock never takes a long prompt for a hang), lets
//! other tasks take their turn, and is where a cancel lands. A fixed chunk
//! cannot serve all of that on every machine and model: 512 tokens take
//! 0.1 s for a small model on a fast machine and a minute for an 8B one on
//! two cores, which would be taken for a stall and starve every other task.
//!
//! Invariants:
//! * An instance that names its `prefill_chunk` gets exactly that chunk.
//! * Otherwise a task's chunk adapts, step by step, towards
//!   [`STEP_TARGET`] of compute per step: after a step of `n` tokens that
//!   took `t`, the next takes `n * STEP_TARGET / t` tokens, never more than
//!   the ceiling (the default chunk, or the scoring chunk) and never fewer
//!   than [`MIN_CHUNK`] (or the ceiling, if lower). Attention grows with the
//!   position, so a long prompt's chunks shrink as it goes.
//! * The policy only sizes steps; it never changes what is computed.

use std::time::Duration;

/// The compute a prefill step aims at: well inside the default 30 s stall
/// bound, and short enough that a chat arriving behind a long prompt waits
/// for about this long per turn.
pub const STEP_TARGET: Duration = Duration::from_secs(2);

/// Fewer tokens per step than this waste more in per-step overhead than
/// they gain in latency.
pub const MIN_CHUNK: usize = 16;

/// The chunk after a step of `tokens` tokens that took `took`, for a task
/// whose chunk may not exceed `ceiling`.
pub fn next_chunk(tokens: usize, took: Duration, ceiling: usize) -> usize {
    let ceiling = ceiling.max(1);
    let floor = MIN_CHUNK.min(ceiling);
    let took = took.as_secs_f64().max(1e-6);
    let scaled = tokens as f64 * STEP_TARGET.as_secs_f64() / took;
    // `as` saturates; the clamp keeps the result in [floor, ceiling].
    (scaled.floor() as usize).clamp(floor, ceiling)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_fast_step_keeps_or_grows_to_the_ceiling() {
        assert_eq!(next_chunk(512, ms(100), 512), 512);
        assert_eq!(next_chunk(64, ms(100), 512), 512);
        assert_eq!(next_chunk(64, ms(1000), 512), 128);
    }

    #[test]
    fn a_slow_step_shrinks_towards_the_target() {
        assert_eq!(next_chunk(512, ms(4000), 512), 256);
        assert_eq!(next_chunk(512, ms(8000), 512), 128);
        assert_eq!(next_chunk(512, ms(2000), 512), 512);
    }

    #[test]
    fn the_chunk_stays_between_floor_and_ceiling() {
        assert_eq!(next_chunk(512, Duration::from_secs(3600), 512), MIN_CHUNK);
        assert_eq!(next_chunk(8, Duration::from_secs(60), 8), 8);
        assert_eq!(next_chunk(1, Duration::ZERO, 512), 512);
        assert_eq!(next_chunk(0, ms(10), 512), MIN_CHUNK);
        assert_eq!(next_chunk(5, ms(10), 0), 1);
    }

    #[test]
    fn a_step_that_took_exactly_the_target_is_repeated() {
        for n in [16, 100, 333, 512] {
            assert_eq!(next_chunk(n, STEP_TARGET, 512), n);
        }
    }
}
