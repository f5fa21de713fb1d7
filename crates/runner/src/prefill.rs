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
//!   than [`MIN_CHUNK`] (or the ceiling, if lower), in whole attention
//!   blocks ([`whole_blocks`]) when it is at least one. Attention grows
//!   with the position, so a long prompt's chunks shrink as it goes.
//! * The policy only sizes steps; it never changes what is computed.

use std::time::Duration;

use engine::model::ATTENTION_BLOCK;

/// The compute a prefill step aims at: well inside the default 30 s stall
/// bound, and short enough that a chat arriving behind a long prompt waits
/// for about this long per turn.
pub const STEP_TARGET: Duration = Duration::from_secs(2);

/// Fewer tokens per step than this waste more in per-step overhead than
/// they gain in latency. One attention block, so chunks stay whole blocks.
pub const MIN_CHUNK: usize = ATTENTION_BLOCK;

/// `n` rounded down to whole attention blocks, at least one block: cuts
/// between a prompt's steps then fall on block boundaries, where they do
/// not change what attention computes (`engine::model`'s chunking
/// independence), so a prompt gets the same answer however the load cut
/// it.
pub fn whole_blocks(n: usize) -> usize {
    (n / ATTENTION_BLOCK).max(1) * ATTENTION_BLOCK
}

/// The chunk after a step of `tokens` tokens that took `took`, for a task
/// whose chunk may not exceed `ceiling`.
pub fn next_chunk(tokens: usize, took: Duration, ceiling: usize) -> usize {
    let ceiling = ceiling.max(1);
    let floor = MIN_CHUNK.min(ceiling);
    let took = took.as_secs_f64().max(1e-6);
    let scaled = tokens as f64 * STEP_TARGET.as_secs_f64() / took;
    // `as` saturates; the clamp keeps the result in [floor, ceiling].
    let chunk = (scaled.floor() as usize).clamp(floor, ceiling);
    if chunk >= ATTENTION_BLOCK {
        whole_blocks(chunk)
    } else {
        chunk
    }
}

/// How long a step that prefills beside decoding sequences aims to take,
/// in decode steps: each running stream then waits at most about this
/// many of its usual inter-token intervals for one token while a prompt is
/// admitted.
pub const MIXED_STEP_FACTOR: f64 = 1.5;

/// Prompt tokens a mixed step takes before anything is measured, and at
/// least: one attention block still moves a long prompt on.
pub const MIN_MIXED_TOKENS: usize = ATTENTION_BLOCK;

/// How many prompt tokens one batched step takes beside the sequences
/// that decode in it (a pure policy; the caller measures).
///
/// Invariants:
/// * With no sequence decoding, a step may take `max_tokens` prompt
///   tokens (each prompt's own chunk, [`next_chunk`], bounds it further).
/// * With `d` sequences decoding, it takes the tokens that keep the step
///   within [`MIXED_STEP_FACTOR`] decode steps, by the last measured
///   decode step and prompt-token cost; never more than `max_tokens - d`,
///   never fewer than [`MIN_MIXED_TOKENS`], so a prompt always moves on.
/// * Every answer is whole attention blocks ([`whole_blocks`]).
#[derive(Debug, Clone)]
pub struct StepBudget {
    max_tokens: usize,
    /// Seconds of a step that only decodes (moving average).
    decode_step: Option<f64>,
    /// Seconds per prompt token in a step (moving average).
    token_cost: Option<f64>,
}

/// Weight of the newest measurement in the moving averages.
const SMOOTHING: f64 = 0.25;

fn smooth(old: Option<f64>, new: f64) -> Option<f64> {
    Some(match old {
        Some(old) => old + SMOOTHING * (new - old),
        None => new,
    })
}

impl StepBudget {
    pub fn new(max_tokens: usize) -> Self {
        StepBudget {
            max_tokens: max_tokens.max(1),
            decode_step: None,
            token_cost: None,
        }
    }

    /// The prompt tokens the next step may take beside `decoding`
    /// sequences.
    pub fn prefill_tokens(&self, decoding: usize) -> usize {
        if decoding == 0 {
            return whole_blocks(self.max_tokens);
        }
        let room = self.max_tokens.saturating_sub(decoding);
        match (self.decode_step, self.token_cost) {
            (Some(step), Some(cost)) if cost > 0.0 => {
                let tokens = step * (MIXED_STEP_FACTOR - 1.0) / cost;
                whole_blocks((tokens.floor() as usize).min(room))
            }
            _ => MIN_MIXED_TOKENS,
        }
    }

    /// A step with `decoding` decoding sequences and `prefill` prompt
    /// tokens took `took`.
    pub fn observe(&mut self, decoding: usize, prefill: usize, took: Duration) {
        let took = took.as_secs_f64();
        if prefill == 0 {
            if decoding > 0 {
                self.decode_step = smooth(self.decode_step, took);
            }
            return;
        }
        let decode_part = if decoding > 0 {
            self.decode_step.unwrap_or(0.0)
        } else {
            0.0
        };
        let cost = (took - decode_part).max(0.0) / prefill as f64;
        self.token_cost = smooth(self.token_cost, cost);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_step_without_decoding_takes_the_whole_budget_in_whole_blocks() {
        assert_eq!(StepBudget::new(512).prefill_tokens(0), 512);
        assert_eq!(StepBudget::new(100).prefill_tokens(0), 96);
        assert_eq!(StepBudget::new(5).prefill_tokens(0), ATTENTION_BLOCK);
    }

    #[test]
    fn before_measuring_a_mixed_step_takes_one_block() {
        let b = StepBudget::new(512);
        assert_eq!(b.prefill_tokens(3), MIN_MIXED_TOKENS);
        // Even where the decoding sequences fill the step.
        assert_eq!(StepBudget::new(4).prefill_tokens(8), MIN_MIXED_TOKENS);
    }

    #[test]
    fn whole_blocks_round_down_to_at_least_one_block() {
        let b = ATTENTION_BLOCK;
        assert_eq!(whole_blocks(0), b);
        assert_eq!(whole_blocks(b - 1), b);
        assert_eq!(whole_blocks(3 * b + 7), 3 * b);
    }

    #[test]
    fn a_mixed_step_aims_at_the_factor_of_a_decode_step() {
        let mut b = StepBudget::new(512);
        // Decode steps of 10 ms; 64 prompt tokens alone cost 64 ms.
        b.observe(4, 0, ms(10));
        b.observe(0, 64, ms(64));
        // (1.5 - 1) * 10 ms / 1 ms a token = 5, under the floor.
        assert_eq!(b.prefill_tokens(4), MIN_MIXED_TOKENS);
        let mut slow_decode = b.clone();
        for _ in 0..40 {
            slow_decode.observe(4, 0, ms(100));
        }
        // 100 ms decode steps leave room for about 50 tokens: 48.
        assert_eq!(slow_decode.prefill_tokens(4), 48);
        // Never more than the step's room.
        for _ in 0..40 {
            slow_decode.observe(4, 0, Duration::from_secs(10));
        }
        // 508 tokens of room: 496 in whole blocks.
        assert_eq!(slow_decode.prefill_tokens(4), 496);
    }

    #[test]
    fn a_mixed_step_charges_its_prompt_tokens_what_decoding_did_not_take() {
        let mut b = StepBudget::new(512);
        b.observe(2, 0, ms(20));
        // A mixed step of 52 ms with 32 prompt tokens: 1 ms a token, so
        // the 20 ms decode step leaves room for 10: one block.
        b.observe(2, 32, ms(52));
        assert_eq!(b.prefill_tokens(2), 16);
        // 80 ms decode steps and 1 ms a token: room for 40, two blocks.
        let mut d = StepBudget::new(512);
        d.observe(2, 0, ms(80));
        d.observe(2, 32, ms(112));
        assert_eq!(d.prefill_tokens(2), 32);
        // A step faster than its decode part costs nothing, not less.
        let mut c = StepBudget::new(512);
        c.observe(2, 0, ms(20));
        c.observe(2, 20, ms(5));
        assert_eq!(c.prefill_tokens(2), MIN_MIXED_TOKENS);
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
    fn a_step_that_took_exactly_the_target_is_repeated_in_whole_blocks() {
        for n in [16, 96, 336, 512] {
            assert_eq!(next_chunk(n, STEP_TARGET, 512), n);
        }
        assert_eq!(next_chunk(100, STEP_TARGET, 512), 96);
        assert_eq!(next_chunk(333, STEP_TARGET, 512), 320);
    }
}
