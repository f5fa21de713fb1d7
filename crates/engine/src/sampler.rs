//! Picks the next token from a `[vocab]` logits vector.
//!
//! Invariants:
//! * `temperature == 0` is greedy: the arg-max, ties going to the lowest id.
//!   It never consumes randomness, so it is deterministic across runs,
//!   processes and shardings that produce the same logits.
//! * Otherwise: softmax(logits / temperature) restricted to the `top_k` most
//!   likely ids (0 = all), then to the smallest prefix of them whose mass
//!   reaches `top_p` (1.0 = all), renormalised and drawn with a PRNG seeded
//!   by `seed`. Candidates are ordered by probability then id, so the same
//!   seed and logits give the same token sequence on every machine.
//! * Invalid parameters (negative or NaN temperature, `top_p` outside
//!   `(0, 1]`) and NaN logits are errors, never panics.

use candle_core::{DType, Tensor};

use crate::error::{EngineError, Result};

/// How to sample. `temperature` 0 = greedy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    /// Greedy.
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
        }
    }
}

/// A sampler for one task: owns the PRNG state so successive draws differ.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: SplitMix64,
}

impl Sampler {
    pub fn new(p: SamplingParams) -> Self {
        Sampler {
            params: p,
            rng: SplitMix64(p.seed),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Samples one id from `[vocab]` (or `[1, vocab]`) logits.
    pub fn sample(&mut self, logits: &Tensor) -> Result<u32> {
        let logits = logits
            .flatten_all()
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.to_vec1::<f32>())?;
        self.sample_slice(&logits)
    }

    /// Samples one id from logits already on the host.
    pub fn sample_slice(&mut self, logits: &[f32]) -> Result<u32> {
        let p = self.params;
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
        if p.temperature == 0.0 {
            return Ok(argmax(logits));
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
                return Ok(id);
            }
            target -= x;
        }
        // Rounding can leave target a hair above the last mass.
        Ok(*order.last().unwrap_or(&0))
    }
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
}
