//! The shape of a llama-family model, read from a Hugging Face `config.json`
//! or from GGUF metadata.
//!
//! Invariants of a `ModelConfig` returned by `from_hf_json` / `from_gguf`:
//! every size is non-zero; `n_heads` is a multiple of `n_kv_heads` (grouped
//! query attention shares each kv head among `n_heads / n_kv_heads` heads);
//! `head_dim` is even (rotate-half RoPE pairs the two halves of a head).
//! Models the engine would compute wrongly (other architectures, RoPE
//! scaling, biases, activations other than SiLU) are refused here with
//! `EngineError::Unsupported` rather than run with silently wrong results.

use std::path::Path;

use candle_core::quantized::gguf_file;
use serde::Deserialize;

use crate::error::{EngineError, Result};

/// The shape of a llama-family decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rope_theta: f32,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
}

/// The subset of Hugging Face's `LlamaConfig` the engine reads; unknown keys
/// are ignored because real configs carry many unrelated ones.
#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    rope_theta: Option<f64>,
    rms_norm_eps: Option<f64>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    hidden_act: Option<String>,
    rope_scaling: Option<serde_json::Value>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
}

/// Architectures whose weights and maths are exactly the llama decoder the
/// engine implements (no biases, SiLU, rotate-half RoPE).
const HF_MODEL_TYPES: &[&str] = &["llama"];

impl ModelConfig {
    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| EngineError::Model {
            path: shown.clone(),
            detail: format!("cannot read config: {e}"),
        })?;
        let hf: HfConfig = serde_json::from_str(&text).map_err(|e| EngineError::Model {
            path: shown.clone(),
            detail: format!("not a llama config.json: {e}"),
        })?;
        match hf.model_type.as_deref() {
            Some(t) if HF_MODEL_TYPES.contains(&t) => {}
            other => {
                return Err(EngineError::Unsupported(format!(
                    "{shown}: unsupported architecture {:?}: the engine runs {HF_MODEL_TYPES:?}",
                    other.unwrap_or("<missing model_type>")
                )))
            }
        }
        if let Some(act) = hf.hidden_act.as_deref() {
            if act != "silu" {
                return Err(EngineError::Unsupported(format!(
                    "{shown}: hidden_act {act:?} is not supported (only silu)"
                )));
            }
        }
        if let Some(scaling) = hf.rope_scaling.as_ref().filter(|v| !v.is_null()) {
            return Err(EngineError::Unsupported(format!(
                "{shown}: rope_scaling {scaling} is not supported"
            )));
        }
        if hf.attention_bias == Some(true) || hf.mlp_bias == Some(true) {
            return Err(EngineError::Unsupported(format!(
                "{shown}: attention or MLP biases are not supported"
            )));
        }
        let n_heads = hf.num_attention_heads;
        let cfg = ModelConfig {
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            n_layers: hf.num_hidden_layers,
            n_heads,
            // Absent in older configs, which then use plain multi-head attention.
            n_kv_heads: hf.num_key_value_heads.unwrap_or(n_heads),
            head_dim: hf.head_dim.unwrap_or(hf.hidden_size / n_heads.max(1)),
            vocab_size: hf.vocab_size,
            // Defaults are those of transformers' LlamaConfig.
            rope_theta: hf.rope_theta.unwrap_or(10_000.0) as f32,
            rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-6),
            max_position_embeddings: hf.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
        };
        cfg.check(&shown)?;
        Ok(cfg)
    }

    /// Reads the `llama.*` metadata of a GGUF file. `path` only names the
    /// file in errors. The embeddings are tied when `output.weight` is absent,
    /// which is how llama.cpp's converter stores tied models.
    pub fn from_gguf(content: &gguf_file::Content, path: &Path) -> Result<Self> {
        let shown = path.display().to_string();
        let md = &content.metadata;
        let arch = match md.get("general.architecture") {
            Some(gguf_file::Value::String(s)) => s.clone(),
            _ => {
                return Err(EngineError::Model {
                    path: shown,
                    detail: "GGUF metadata has no general.architecture".into(),
                })
            }
        };
        if arch != "llama" {
            return Err(EngineError::Unsupported(format!(
                "{shown}: unsupported architecture {arch:?}: the engine runs \"llama\""
            )));
        }
        let get_usize = |key: &str| -> Result<Option<usize>> {
            md.get(key)
                .map(|v| {
                    metadata_usize(v).ok_or_else(|| EngineError::Model {
                        path: shown.clone(),
                        detail: format!("metadata {key} is not a non-negative integer: {v:?}"),
                    })
                })
                .transpose()
        };
        let need_usize = |key: &str| -> Result<usize> {
            get_usize(key)?.ok_or_else(|| EngineError::Model {
                path: shown.clone(),
                detail: format!("GGUF metadata has no {key}"),
            })
        };
        let get_f64 = |key: &str| -> Result<Option<f64>> {
            md.get(key)
                .map(|v| match v {
                    gguf_file::Value::F32(x) => Ok(f64::from(*x)),
                    gguf_file::Value::F64(x) => Ok(*x),
                    other => Err(EngineError::Model {
                        path: shown.clone(),
                        detail: format!("metadata {key} is not a float: {other:?}"),
                    }),
                })
                .transpose()
        };
        if let Some(gguf_file::Value::String(kind)) = md.get("llama.rope.scaling.type") {
            if kind != "none" {
                return Err(EngineError::Unsupported(format!(
                    "{shown}: rope scaling {kind:?} is not supported"
                )));
            }
        }
        if content.tensor_infos.contains_key("rope_freqs.weight") {
            return Err(EngineError::Unsupported(format!(
                "{shown}: per-frequency rope factors (rope_freqs.weight, Llama 3.1 scaling) are not supported"
            )));
        }
        let hidden_size = need_usize("llama.embedding_length")?;
        let n_heads = need_usize("llama.attention.head_count")?;
        let n_kv_heads = get_usize("llama.attention.head_count_kv")?.unwrap_or(n_heads);
        let head_dim = match get_usize("llama.attention.key_length")? {
            Some(d) => d,
            None => hidden_size / n_heads.max(1),
        };
        if let Some(rope_dim) = get_usize("llama.rope.dimension_count")? {
            if rope_dim != head_dim {
                return Err(EngineError::Unsupported(format!(
                    "{shown}: partial rotary embeddings (rope dimension {rope_dim}, head dim {head_dim}) are not supported"
                )));
            }
        }
        // The vocabulary size key is optional in GGUF; the embedding matrix
        // always knows it (candle shape is (vocab, hidden)).
        let vocab_size = match get_usize("llama.vocab_size")? {
            Some(v) => v,
            None => match content.tensor_infos.get("token_embd.weight") {
                Some(info) => info.shape.dims().first().copied().unwrap_or(0),
                None => {
                    return Err(EngineError::Tensor {
                        path: shown,
                        tensor: "token_embd.weight".into(),
                        detail: "missing (and no llama.vocab_size metadata)".into(),
                    })
                }
            },
        };
        let cfg = ModelConfig {
            hidden_size,
            intermediate_size: need_usize("llama.feed_forward_length")?,
            n_layers: need_usize("llama.block_count")?,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab_size,
            rope_theta: get_f64("llama.rope.freq_base")?.unwrap_or(10_000.0) as f32,
            rms_norm_eps: get_f64("llama.attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5),
            max_position_embeddings: get_usize("llama.context_length")?.unwrap_or(2048),
            tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        };
        cfg.check(&shown)?;
        Ok(cfg)
    }

    /// Tensor-parallel degrees that divide heads, kv heads and intermediate size
    /// (ascending; always contains 1).
    pub fn valid_tensor_degrees(&self) -> Vec<usize> {
        (1..=self.n_kv_heads.max(1))
            .filter(|d| {
                self.n_heads.is_multiple_of(*d)
                    && self.n_kv_heads.is_multiple_of(*d)
                    && self.intermediate_size.is_multiple_of(*d)
            })
            .collect()
    }

    /// Width of the attention output (`n_heads * head_dim`), which is not
    /// always `hidden_size` (some models set `head_dim` explicitly).
    pub fn q_width(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Width of the key and value projections.
    pub fn kv_width(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Checks the module invariants; `shown` names the source file.
    fn check(&self, shown: &str) -> Result<()> {
        let sizes = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return Err(EngineError::Model {
                path: shown.into(),
                detail: format!("config has {name} = 0"),
            });
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(EngineError::Model {
                path: shown.into(),
                detail: format!(
                    "{} heads are not a multiple of {} kv heads",
                    self.n_heads, self.n_kv_heads
                ),
            });
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(EngineError::Model {
                path: shown.into(),
                detail: format!("head_dim {} is odd; RoPE needs pairs", self.head_dim),
            });
        }
        let theta_ok = self.rope_theta.is_finite() && self.rope_theta > 0.0;
        let eps_ok = self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0;
        if !(theta_ok && eps_ok) {
            return Err(EngineError::Model {
                path: shown.into(),
                detail: format!(
                    "invalid rope_theta {} or rms_norm_eps {}",
                    self.rope_theta, self.rms_norm_eps
                ),
            });
        }
        Ok(())
    }
}

/// GGUF writers pick different integer widths for the same key.
fn metadata_usize(v: &gguf_file::Value) -> Option<usize> {
    use gguf_file::Value as V;
    let n: u64 = match *v {
        V::U8(x) => x.into(),
        V::U16(x) => x.into(),
        V::U32(x) => x.into(),
        V::U64(x) => x,
        V::I8(x) => u64::try_from(x).ok()?,
        V::I16(x) => u64::try_from(x).ok()?,
        V::I32(x) => u64::try_from(x).ok()?,
        V::I64(x) => u64::try_from(x).ok()?,
        _ => return None,
    };
    usize::try_from(n).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(n_heads: usize, n_kv_heads: usize, ffn: usize) -> ModelConfig {
        ModelConfig {
            hidden_size: 64,
            intermediate_size: ffn,
            n_layers: 2,
            n_heads,
            n_kv_heads,
            head_dim: 16,
            vocab_size: 10,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 128,
            tie_word_embeddings: false,
        }
    }

    #[test]
    fn valid_degrees_divide_heads_kv_heads_and_ffn() {
        assert_eq!(cfg(9, 3, 1536).valid_tensor_degrees(), vec![1, 3]);
        assert_eq!(cfg(4, 2, 128).valid_tensor_degrees(), vec![1, 2]);
        assert_eq!(cfg(32, 8, 14336).valid_tensor_degrees(), vec![1, 2, 4, 8]);
        assert_eq!(cfg(4, 4, 6).valid_tensor_degrees(), vec![1, 2]);
    }
}
