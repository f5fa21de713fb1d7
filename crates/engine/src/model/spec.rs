//! Which part of the model a process runs: layer ranges (pipeline) and
//! rank slices (tensor), validated against the model's config.

use std::ops::Range;

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};

/// Which part of the model a process runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardSpec {
    /// The decoder layers this shard runs, `start..end`.
    pub layers: Range<usize>,
    /// This shard's rank within its tensor-parallel group, `0..tp_degree`.
    pub tp_rank: usize,
    /// Tensor-parallel degree; 1 = no tensor split.
    pub tp_degree: usize,
}

impl ShardSpec {
    /// The whole model in one process.
    pub fn full(cfg: &ModelConfig) -> Self {
        ShardSpec {
            layers: 0..cfg.n_layers,
            tp_rank: 0,
            tp_degree: 1,
        }
    }

    /// `n` pipeline stages that together cover every layer, balanced by the
    /// parameters each stage holds rather than by layer count: the last stage
    /// also holds `lm_head` (vocab x hidden, often as large as several
    /// layers) and the first stage the embedding lookup table, which the
    /// loaders keep in the file's compact dtype, so it is counted at half of
    /// `lm_head`. For SmolLM2-135M and 2 stages this gives 17 + 13 layers.
    /// Every stage gets at least one layer when `n <= n_layers`; for larger
    /// `n` the extra stages are empty and `validate` rejects them.
    pub fn pipeline_stages(cfg: &ModelConfig, n: usize) -> Vec<ShardSpec> {
        if n == 0 {
            return Vec::new();
        }
        let n_layers = cfg.n_layers;
        let layer_cost = layer_params(cfg) as f64;
        let table = (cfg.vocab_size * cfg.hidden_size) as f64;
        let head_cost = table;
        let embed_cost = table / 2.0;
        let total = n_layers as f64 * layer_cost + head_cost + embed_cost;
        let target = total / n as f64;
        // Greedy boundaries: stage i ends at the layer where the running
        // cost is closest to (i+1) * target, keeping at least one layer for
        // each later stage.
        let mut stages = Vec::with_capacity(n);
        let mut start = 0usize;
        for stage_idx in 0..n {
            let end = if stage_idx + 1 == n {
                n_layers
            } else {
                let goal = target * (stage_idx + 1) as f64;
                let cost_at = |end: usize| embed_cost + end as f64 * layer_cost;
                let min_end = (start + 1).min(n_layers);
                let max_end = n_layers.saturating_sub(n - stage_idx - 1).max(min_end);
                (min_end..=max_end)
                    .min_by(|a, b| {
                        let da = (cost_at(*a) - goal).abs();
                        let db = (cost_at(*b) - goal).abs();
                        da.total_cmp(&db)
                    })
                    .unwrap_or(min_end)
            };
            stages.push(ShardSpec {
                layers: start..end,
                tp_rank: 0,
                tp_degree: 1,
            });
            start = end;
        }
        stages
    }

    /// The `degree` ranks of a tensor-parallel group over all layers.
    pub fn tensor_ranks(cfg: &ModelConfig, degree: usize) -> Vec<ShardSpec> {
        (0..degree)
            .map(|tp_rank| ShardSpec {
                layers: 0..cfg.n_layers,
                tp_rank,
                tp_degree: degree,
            })
            .collect()
    }

    /// Checks that this spec fits `cfg`; the error names what would be valid.
    pub fn validate(&self, cfg: &ModelConfig) -> Result<()> {
        if self.layers.start >= self.layers.end || self.layers.end > cfg.n_layers {
            return Err(EngineError::InvalidShard(format!(
                "layer range {}..{} is empty or outside the model's {} layers",
                self.layers.start, self.layers.end, cfg.n_layers
            )));
        }
        let valid = cfg.valid_tensor_degrees();
        if !valid.contains(&self.tp_degree) {
            let list = valid
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(EngineError::InvalidShard(format!(
                "tensor degree {} does not divide {} heads, {} kv heads and FFN width {}; valid degrees: {list}",
                self.tp_degree, cfg.n_heads, cfg.n_kv_heads, cfg.intermediate_size
            )));
        }
        if self.tp_rank >= self.tp_degree {
            return Err(EngineError::InvalidShard(format!(
                "tensor rank {} is not below degree {}",
                self.tp_rank, self.tp_degree
            )));
        }
        Ok(())
    }

    /// Whether this shard turns token ids into embeddings.
    pub fn has_embedding(&self) -> bool {
        self.layers.start == 0
    }

    /// Whether this shard ends with the final norm and `lm_head`.
    pub fn has_lm_head(&self, cfg: &ModelConfig) -> bool {
        self.layers.end == cfg.n_layers
    }

    /// This rank's attention heads.
    pub fn heads(&self, cfg: &ModelConfig) -> Range<usize> {
        rank_range(cfg.n_heads, self.tp_rank, self.tp_degree)
    }

    /// This rank's kv heads.
    pub fn kv_heads(&self, cfg: &ModelConfig) -> Range<usize> {
        rank_range(cfg.n_kv_heads, self.tp_rank, self.tp_degree)
    }

    /// This rank's FFN columns (rows of gate/up, columns of down).
    pub fn ffn_columns(&self, cfg: &ModelConfig) -> Range<usize> {
        rank_range(cfg.intermediate_size, self.tp_rank, self.tp_degree)
    }
}

/// The `rank`-th of `degree` equal parts of `0..n` (callers validated that
/// `degree` divides `n`).
pub(super) fn rank_range(n: usize, rank: usize, degree: usize) -> Range<usize> {
    let part = n / degree.max(1);
    rank * part..(rank + 1) * part
}

/// Parameters of one decoder layer (weights only; norms are negligible).
pub(super) fn layer_params(cfg: &ModelConfig) -> usize {
    let h = cfg.hidden_size;
    2 * h * cfg.q_width() + 2 * h * cfg.kv_width() + 3 * h * cfg.intermediate_size
}
#[cfg(test)]
mod tests {
    use super::*;

    fn smollm() -> ModelConfig {
        ModelConfig {
            arch: crate::arch::ARCHITECTURES[0],
            hidden_size: 576,
            intermediate_size: 1536,
            n_layers: 30,
            n_heads: 9,
            n_kv_heads: 3,
            head_dim: 64,
            vocab_size: 49152,
            rope_theta: 100_000.0,
            rope_scaling: crate::arch::RopeScaling::None,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 8192,
            tie_word_embeddings: true,
            sliding_window: None,
        }
    }

    #[test]
    fn pipeline_stages_cover_all_layers_and_lighten_the_last_stage() {
        let cfg = smollm();
        for n in 1..=6 {
            let stages = ShardSpec::pipeline_stages(&cfg, n);
            assert_eq!(stages.len(), n);
            assert_eq!(stages[0].layers.start, 0);
            assert_eq!(stages[n - 1].layers.end, 30);
            for w in stages.windows(2) {
                assert_eq!(w[0].layers.end, w[1].layers.start);
            }
            for s in &stages {
                s.validate(&cfg).expect("every stage is valid");
            }
        }
        let two = ShardSpec::pipeline_stages(&cfg, 2);
        assert_eq!(two[0].layers, 0..17);
        assert_eq!(two[1].layers, 17..30);
    }

    #[test]
    fn too_many_stages_are_rejected_by_validate() {
        let mut cfg = smollm();
        cfg.n_layers = 2;
        let stages = ShardSpec::pipeline_stages(&cfg, 3);
        assert_eq!(stages.len(), 3);
        assert!(stages.iter().any(|s| s.validate(&cfg).is_err()));
    }

    #[test]
    fn indivisible_degree_names_the_valid_ones() {
        let cfg = smollm();
        let spec = ShardSpec {
            layers: 0..30,
            tp_rank: 0,
            tp_degree: 2,
        };
        let err = spec.validate(&cfg).expect_err("9 heads do not split in 2");
        assert!(err.to_string().contains("valid degrees: 1, 3"), "{err}");
    }
}
