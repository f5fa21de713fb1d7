//! Picks the next token from a `[vocab]` logits vector.
//!
//! Invariants:
//! * The logits are first adjusted: `logit_bias[id]` is added, then each id
//!   the sampler already produced `count` times loses
//!   `frequency_penalty × count + presence_penalty` (OpenAI's definition:
//!   only generated tokens count, not the prompt). With no bias and zero
//!   penalties the logits are used as they are.
//! * `temperature == 0` is greedy: the arg-max of the adjusted logits, ties
//!   going to the lowest id. It never consumes randomness, so it is
//!   deterministic across runs, processes and shardings that produce the
//!   same logits.
//! * Otherwise: softmax(adjusted / temperature) restricted to the `top_k`
//!   most likely ids (0 = all), then to the smallest prefix of them whose
//!   mass reaches `top_p` (1.0 = all), renormalised and drawn with a PRNG
//!   seeded by `seed`. Candidates are ordered by probability then id, so the
//!   same seed and logits give the same token sequence on every machine.
//! * Log-probabilities, when asked for, are the model's: log-softmax of the
//!   raw logits, before bias, penalties and temperature (what llama.cpp
//!   reports for a completion's `logprobs`), computed in f64.
//! * Invalid parameters (negative or NaN temperature, `top_p` outside
//!   `(0, 1]`) and NaN logits are errors, never panics.

use std::collections::HashMap;

use candle_core::{DType, Tensor};

use crate::error::{EngineError, Result};

/// How to sample. `temperature` 0 = greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub seed: u64,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    /// `(token id, bias)`: ids outside the vocabulary are ignored.
    pub logit_bias: Vec<(u32, f32)>,
    /// Report the sampled token's log-probability and this many of the
    /// most likely ids.
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    /// Greedy.
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            logit_bias: Vec::new(),
            logprobs: None,
        }
    }
}

/// One sampled token.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub id: u32,
    /// `(log-probability of id, the most likely ids with theirs)`, when
    /// asked for.
    pub logprobs: Option<Scored>,
}

/// A token's log-probability under the model and the most likely ids with
/// theirs, most likely first.
pub type Scored = (f32, Vec<(u32, f32)>);

/// A sampler for one task: owns the PRNG state so successive draws differ,
/// and counts what it produced for the penalties.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: SplitMix64,
    counts: HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(p: SamplingParams) -> Self {
        Sampler {
            rng: SplitMix64(p.seed),
            params: p,
            counts: HashMap::new(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Samples one id from `[vocab]` (or `[1, vocab]`) logits.
    pub fn sample(&mut self, logits: &Tensor) -> Result<u32> {
        Ok(self.next(logits)?.id)
    }

    /// Samples one id, with its log-probabilities when the params ask.
    pub fn next(&mut self, logits: &Tensor) -> Result<Sampled> {
        let logits = logits
            .flatten_all()
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.to_vec1::<f32>())?;
        self.next_slice(&logits)
    }

    /// Samples one id from logits already on the host.
    pub fn sample_slice(&mut self, logits: &[f32]) -> Result<u32> {
        Ok(self.next_slice(logits)?.id)
    }

    /// [`Sampler::next`] on logits already on the host.
    pub fn next_slice(&mut self, logits: &[f32]) -> Result<Sampled> {
        self.validate(logits)?;
        let adjusted = self.adjusted(logits);
        let id = self.draw(adjusted.as_deref().unwrap_or(logits));
        *self.counts.entry(id).or_insert(0) += 1;
        let logprobs = self.params.logprobs.map(|k| score(logits, id, k));
        Ok(Sampled { id, logprobs })
    }

    fn validate(&self, logits: &[f32]) -> Result<()> {
        let p = &self.params;
        if logits.is_empty() {
            return Err(EngineError::Compute("sampler: empty logits".into()));
        }
        if logits.iter().any(|x| x.is_nan()) {
            return Err(EngineError::Compute("sampler: logits contain NaN".into()));
        }
        if !(p.temperature >= 0.0 && p.temperature.is_finite()) {
            return Err(EngineError::Compute(format!(
                "sampler: temperature {} must be finite and >= 0",
                p.temperature
            )));
        }
        if !(p.top_p > 0.0 && p.top_p <= 1.0) {
            return Err(EngineError::Compute(format!(
                "sampler: top_p {} must be in (0, 1]",
                p.top_p
            )));
        }
        Ok(())
    }

    /// The logits after bias and penalties; `None` when nothing changes them.
    fn adjusted(&self, logits: &[f32]) -> Option<Vec<f32>> {
        let p = &self.params;
        let penalised =
            (p.frequency_penalty != 0.0 || p.presence_penalty != 0.0) && !self.counts.is_empty();
        if p.logit_bias.is_empty() && !penalised {
            return None;
        }
        let mut out = logits.to_vec();
        for &(id, bias) in &p.logit_bias {
            if let Some(x) = out.get_mut(id as usize) {
                *x += bias;
            }
        }
        if penalised {
            for (&id, &count) in &self.counts {
                if let Some(x) = out.get_mut(id as usize) {
                    *x -= p.frequency_penalty * count as f32 + p.presence_penalty;
                }
            }
        }
        Some(out)
    }

    fn draw(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature == 0.0 {
            return argmax(logits);
        }
        // Candidates by descending logit, ties by ascending id.
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        order.sort_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        if p.top_k > 0 && p.top_k < order.len() {
            order.truncate(p.top_k);
        }
        // Softmax in f64 over the kept candidates, shifted by the max so
        // that exp never overflows.
        let max = f64::from(logits[order[0] as usize]);
        let temperature = f64::from(p.temperature);
        let mut probs: Vec<f64> = order
            .iter()
            .map(|&id| ((f64::from(logits[id as usize]) - max) / temperature).exp())
            .collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        if p.top_p < 1.0 {
            let mut mass = 0.0;
            let mut keep = probs.len();
            for (i, x) in probs.iter().enumerate() {
                mass += x;
                if mass >= f64::from(p.top_p) {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            order.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut target = self.rng.next_f64() * total;
        for (&id, &x) in order.iter().zip(&probs) {
            if target < x {
                return id;
            }
            target -= x;
        }
        // Rounding can leave target a hair above the last mass.
        *order.last().unwrap_or(&0)
    }
}

/// Scores `id` under `logits` (raw: no temperature, penalty or bias) with
/// the `n` most likely alternatives.
pub fn score(logits: &[f32], id: u32, n: usize) -> Scored {
    let lp = log_softmax(logits);
    let own = lp.get(id as usize).copied().unwrap_or(f32::NEG_INFINITY);
    (own, top_n(&lp, n))
}

/// Scores a sequence: row `i` of `logits` (`[rows, vocab]`, the model's
/// prediction after position `i`) scores `targets[i]`, the token that
/// followed. `targets` may be shorter than the rows (the last row of a
/// prompt predicts a token not yet known).
pub fn score_rows(logits: &Tensor, targets: &[u32], n: usize) -> Result<Vec<Scored>> {
    let rows = logits
        .to_dtype(DType::F32)
        .and_then(|t| t.to_vec2::<f32>())
        .map_err(|e| EngineError::Compute(format!("scoring: {e}")))?;
    if targets.len() > rows.len() {
        return Err(EngineError::Compute(format!(
            "scoring {} tokens needs as many rows of logits, got {}",
            targets.len(),
            rows.len()
        )));
    }
    if let Some(bad) = targets
        .iter()
        .find(|&&id| rows.first().is_some_and(|r| id as usize >= r.len()))
    {
        return Err(EngineError::Compute(format!(
            "scoring: token id {bad} is outside the vocabulary"
        )));
    }
    Ok(rows
        .iter()
        .zip(targets)
        .map(|(row, &id)| score(row, id, n))
        .collect())
}

/// Log-softmax in f64, returned as f32. A `-inf` logit gets `-inf`.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
        .max(f32::MIN);
    let max = f64::from(max);
    let sum: f64 = logits.iter().map(|&x| (f64::from(x) - max).exp()).sum();
    let log_sum = sum.ln() + max;
    logits
        .iter()
        .map(|&x| (f64::from(x) - log_sum) as f32)
        .collect()
}

/// The `n` largest entries as `(id, value)`, largest first, ties by id.
pub fn top_n(values: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
    if n == 0 {
        return top;
    }
    for (i, &x) in values.iter().enumerate() {
        if top.len() == n && x <= top[n - 1].1 {
            continue;
        }
        let at = top.partition_point(|&(_, y)| y >= x);
        top.insert(at, (i as u32, x));
        top.truncate(n);
    }
    top
}

/// Index of the largest logit; the lowest id among equals.
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &x) in logits.iter().enumerate().skip(1) {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// A tiny, well-mixed PRNG (Vigna's SplitMix64): reproducible from a seed
/// without pulling in a crate whose stream could change between versions.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 53 bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_p: f32, top_k: usize, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p,
            top_k,
            seed,
            ..SamplingParams::default()
        }
    }

    #[test]
    fn greedy_takes_the_lowest_id_among_ties() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample_slice(&[1.0, 3.0, 3.0, 2.0]).expect("greedy"), 1);
        let t = Tensor::new(&[0.5f32, -1.0, 7.0], &candle_core::Device::Cpu).expect("tensor");
        assert_eq!(s.sample(&t).expect("greedy"), 2);
    }

    #[test]
    fn same_seed_same_draws_and_top_k_one_is_greedy() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let draw = |seed| {
            let mut s = Sampler::new(params(1.0, 0.9, 0, seed));
            (0..20)
                .map(|_| s.sample_slice(&logits).expect("sample"))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        let mut k1 = Sampler::new(params(1.5, 1.0, 1, 3));
        let best = argmax(&logits);
        for _ in 0..10 {
            assert_eq!(k1.sample_slice(&logits).expect("sample"), best);
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Probabilities ~ [0.7, 0.2, 0.1]: top_p 0.6 keeps only id 0.
        let logits = [0.7f32.ln(), 0.2f32.ln(), 0.1f32.ln()];
        let mut s = Sampler::new(params(1.0, 0.6, 0, 42));
        for _ in 0..50 {
            assert_eq!(s.sample_slice(&logits).expect("sample"), 0);
        }
        let mut s = Sampler::new(params(1.0, 0.85, 0, 42));
        for _ in 0..50 {
            assert!(s.sample_slice(&logits).expect("sample") < 2);
        }
    }

    #[test]
    fn invalid_parameters_and_nan_are_errors() {
        assert!(Sampler::new(params(-1.0, 1.0, 0, 0))
            .sample_slice(&[1.0])
            .is_err());
        assert!(Sampler::new(params(1.0, 0.0, 0, 0))
            .sample_slice(&[1.0])
            .is_err());
        assert!(Sampler::new(params(1.0, 1.0, 0, 0))
            .sample_slice(&[f32::NAN])
            .is_err());
        assert!(Sampler::new(params(0.0, 1.0, 0, 0))
            .sample_slice(&[])
            .is_err());
    }

    /// OpenAI's documented penalty: `mu[j] - c[j] * frequency - (c[j] > 0) * presence`,
    /// with `c[j]` the number of times `j` was generated so far. Expected
    /// values below are that formula worked by hand.
    #[test]
    fn penalties_follow_openais_formula() {
        // Greedy over [2.0, 1.9, 1.0]: id 0 first. After one 0, id 0's
        // logit is 2.0 - 0.3 - 0.0 = 1.7 < 1.9, so id 1; after one 0 and
        // one 1: 0 → 1.7, 1 → 1.6, 2 → 1.0, so id 0 again; then 0 has
        // count 2: 2.0 - 0.6 = 1.4 < 1.6, so id 1.
        let logits = [2.0f32, 1.9, 1.0];
        let mut s = Sampler::new(SamplingParams {
            frequency_penalty: 0.3,
            ..SamplingParams::default()
        });
        let ids: Vec<u32> = (0..4).map(|_| s.sample_slice(&logits).unwrap()).collect();
        assert_eq!(ids, [0, 1, 0, 1]);
        // Presence only: each id drops by 0.95 once, whatever its count:
        // 0 (2.0), then 1 (1.9 vs 1.05), then 0 (1.05 vs 0.95 vs 1.0), then 0.
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: 0.95,
            ..SamplingParams::default()
        });
        let ids: Vec<u32> = (0..4).map(|_| s.sample_slice(&logits).unwrap()).collect();
        assert_eq!(ids, [0, 1, 0, 0]);
        // A negative penalty favours repeats.
        let mut s = Sampler::new(SamplingParams {
            frequency_penalty: -1.0,
            ..SamplingParams::default()
        });
        let ids: Vec<u32> = (0..3)
            .map(|_| s.sample_slice(&[1.0, 1.5]).unwrap())
            .collect();
        assert_eq!(ids, [1, 1, 1]);
    }

    #[test]
    fn logit_bias_moves_and_bans_tokens() {
        let logits = [2.0f32, 1.0, 0.5];
        let mut s = Sampler::new(SamplingParams {
            logit_bias: vec![(0, -100.0), (2, 0.6), (99, 50.0)],
            ..SamplingParams::default()
        });
        // 0 → -98, 1 → 1.0, 2 → 1.1; id 99 is outside and ignored.
        assert_eq!(s.sample_slice(&logits).unwrap(), 2);
        // With sampling, a -100 bias makes a token unreachable.
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            seed: 5,
            logit_bias: vec![(0, -100.0)],
            ..SamplingParams::default()
        });
        for _ in 0..200 {
            assert_ne!(s.sample_slice(&logits).unwrap(), 0);
        }
    }

    /// Expected values from Python: `math.log(0.25)`, `math.log(0.75)`,
    /// `math.log(0.5)` (row 0 is softmax [1/4, 3/4], row 1 a tie).
    #[test]
    fn score_rows_scores_each_next_token_and_leaves_the_last_row() {
        let logits = Tensor::new(
            &[[0.0f32, 3f32.ln()], [2.0, 2.0], [9.0, 0.0]],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let scored = score_rows(&logits, &[0, 1], 1).unwrap();
        assert_eq!(scored.len(), 2, "the third row predicts an unknown token");
        assert!((scored[0].0 - -1.3862944).abs() < 1e-6, "{scored:?}");
        assert_eq!(scored[0].1.len(), 1);
        assert_eq!(scored[0].1[0].0, 1);
        assert!((scored[0].1[0].1 - -0.2876821).abs() < 1e-6, "{scored:?}");
        assert!(
            (scored[1].0 + std::f32::consts::LN_2).abs() < 1e-6,
            "{scored:?}"
        );
        assert_eq!(scored[1].1[0].0, 0, "a tie goes to the lower id");
        assert!(
            score_rows(&logits, &[0, 1, 0, 1], 1).is_err(),
            "more targets than rows"
        );
        assert!(
            score_rows(&logits, &[7], 1).is_err(),
            "a target outside the vocabulary"
        );
    }

    /// Expected values: `math.log(math.exp(x) / sum(math.exp(v) for v in l))`
    /// in Python for `l = [1.0, 3.0, 2.0, 3.0]`.
    #[test]
    fn logprobs_are_the_models_log_softmax_before_adjustments() {
        let logits = [1.0f32, 3.0, 2.0, 3.0];
        let mut s = Sampler::new(SamplingParams {
            logprobs: Some(3),
            logit_bias: vec![(0, 10.0)],
            ..SamplingParams::default()
        });
        let sampled = s.next_slice(&logits).unwrap();
        assert_eq!(sampled.id, 0, "the bias makes id 0 the greedy pick");
        let (lp, top) = sampled.logprobs.expect("asked for");
        assert!((lp - (-2.9175758)).abs() < 1e-5, "{lp}");
        let ids: Vec<u32> = top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 3, 2], "largest first, ties by id");
        assert!((top[0].1 - (-0.9175758)).abs() < 1e-5);
        assert!((top[2].1 - (-1.9175758)).abs() < 1e-5);
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.next_slice(&logits).unwrap().logprobs, None);
        assert_eq!(top_n(&logits, 0), vec![]);
        assert_eq!(top_n(&logits, 9).len(), 4);
    }
}
