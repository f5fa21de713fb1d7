//! The shape of a llama-family model, read from a Hugging Face `config.json`
//! or from GGUF metadata.
//!
//! Invariants of a `ModelConfig` returned by `from_hf_json` / `from_gguf`:
//! every size is non-zero; `n_heads` is a multiple of `n_kv_heads` (grouped
//! query attention shares each kv head among `n_heads / n_kv_heads` heads);
//! `head_dim` is even (rotate-half RoPE pairs the two halves of a head).
//! Models the engine would compute wrongly (architectures outside
//! [`crate::arch::ARCHITECTURES`], RoPE scaling other than linear and
//! Llama 3's, biases the architecture does not have, activations other than
//! SiLU) are refused here with `EngineError::Unsupported` rather than run
//! with silently wrong results.

use std::path::Path;

use candle_core::quantized::gguf_file;
use serde::Deserialize;

use crate::arch::{gguf_arch, hf_arch, Arch, RopeScaling};
use crate::error::{EngineError, Result};

/// The shape of a llama-family decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// What this architecture changes in the decoder.
    pub arch: Arch,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Each position attends to at most this many positions, itself
    /// included (Mistral's sliding window); `None`: to all before it.
    pub sliding_window: Option<usize>,
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
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
}

/// Hugging Face's `rope_scaling` object (`rope_type`, or `type` in older
/// configs).
#[derive(Deserialize)]
struct HfRopeScaling {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    factor: Option<f32>,
    low_freq_factor: Option<f32>,
    high_freq_factor: Option<f32>,
    original_max_position_embeddings: Option<f32>,
}

impl HfRopeScaling {
    fn read(v: &serde_json::Value, shown: &str) -> Result<RopeScaling> {
        let unsupported = |what: String| EngineError::Unsupported(format!("{shown}: {what}"));
        let hf: HfRopeScaling = serde_json::from_value(v.clone())
            .map_err(|e| unsupported(format!("rope_scaling {v} is not readable: {e}")))?;
        let kind = hf.rope_type.or(hf.kind).unwrap_or_else(|| "default".into());
        let need = |key: &str, x: Option<f32>| {
            x.filter(|x| x.is_finite() && *x > 0.0).ok_or_else(|| {
                unsupported(format!("rope_scaling {kind:?} needs a positive {key}: {v}"))
            })
        };
        match kind.as_str() {
            "default" => Ok(RopeScaling::None),
            "linear" => Ok(RopeScaling::Linear {
                factor: need("factor", hf.factor)?,
            }),
            "llama3" => {
                let scaling = RopeScaling::Llama3 {
                    factor: need("factor", hf.factor)?,
                    low_freq_factor: need("low_freq_factor", hf.low_freq_factor)?,
                    high_freq_factor: need("high_freq_factor", hf.high_freq_factor)?,
                    original_context: need(
                        "original_max_position_embeddings",
                        hf.original_max_position_embeddings,
                    )?,
                };
                match &scaling {
                    RopeScaling::Llama3 {
                        low_freq_factor,
                        high_freq_factor,
                        ..
                    } if high_freq_factor > low_freq_factor => Ok(scaling),
                    _ => Err(unsupported(format!(
                        "rope_scaling llama3 needs high_freq_factor > low_freq_factor: {v}"
                    ))),
                }
            }
            other => Err(unsupported(format!(
                "rope_scaling {other:?} is not supported (default, linear and llama3 are)"
            ))),
        }
    }
}

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
        let arch = hf_arch(hf.model_type.as_deref(), &shown)?;
        if let Some(act) = hf.hidden_act.as_deref() {
            if act != "silu" {
                return Err(EngineError::Unsupported(format!(
                    "{shown}: hidden_act {act:?} is not supported (only silu)"
                )));
            }
        }
        let rope_scaling = match hf.rope_scaling.as_ref().filter(|v| !v.is_null()) {
            Some(v) => HfRopeScaling::read(v, &shown)?,
            None => RopeScaling::None,
        };
        // Qwen2's q/k/v biases come with its architecture; a llama config
        // asking for biases also wants one on o_proj, which the decoder
        // does not have.
        if (hf.attention_bias == Some(true) && !arch.qkv_bias) || hf.mlp_bias == Some(true) {
            return Err(EngineError::Unsupported(format!(
                "{shown}: attention or MLP biases are not supported for {:?}",
                arch.name
            )));
        }
        // Qwen2 configs carry a window they do not use unless
        // `use_sliding_window` says so (and then only on some layers).
        let sliding_window = match (hf.sliding_window, hf.use_sliding_window) {
            (Some(_), Some(false)) | (None, _) => None,
            (Some(_), Some(true)) if arch.name != "llama" => {
                return Err(EngineError::Unsupported(format!(
                    "{shown}: a sliding window on some layers (use_sliding_window) is not supported"
                )))
            }
            (Some(w), _) => Some(w),
        };
        let n_heads = hf.num_attention_heads;
        let cfg = ModelConfig {
            arch,
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
            rope_scaling,
            rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-6),
            max_position_embeddings: hf.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
            sliding_window,
        };
        cfg.check(&shown)?;
        Ok(cfg)
    }

    /// Reads the `{arch}.*` metadata of a GGUF file. `path` only names the
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
        let arch = gguf_arch(&arch, &shown)?;
        // Metadata keys are prefixed by the architecture's name.
        let key = |k: &str| format!("{}.{k}", arch.name);
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
        let mut rope_scaling = match md.get(&key("rope.scaling.type")) {
            None => RopeScaling::None,
            Some(gguf_file::Value::String(kind)) if kind == "none" => RopeScaling::None,
            Some(gguf_file::Value::String(kind)) if kind == "linear" => {
                let factor = get_f64(&key("rope.scaling.factor"))?
                    .filter(|f| f.is_finite() && *f > 0.0)
                    .ok_or_else(|| EngineError::Model {
                        path: shown.clone(),
                        detail: "linear rope scaling without a positive rope.scaling.factor"
                            .into(),
                    })?;
                RopeScaling::Linear {
                    factor: factor as f32,
                }
            }
            Some(other) => {
                return Err(EngineError::Unsupported(format!(
                    "{shown}: rope scaling {other:?} is not supported (none, linear and per-frequency factors are)"
                )))
            }
        };
        if content.tensor_infos.contains_key("rope_freqs.weight") {
            if rope_scaling != RopeScaling::None {
                return Err(EngineError::Unsupported(format!(
                    "{shown}: rope_freqs.weight together with {rope_scaling:?} is not supported"
                )));
            }
            rope_scaling = RopeScaling::FreqFactors;
        }
        let hidden_size = need_usize(&key("embedding_length"))?;
        let n_heads = need_usize(&key("attention.head_count"))?;
        let n_kv_heads = get_usize(&key("attention.head_count_kv"))?.unwrap_or(n_heads);
        let head_dim = match get_usize(&key("attention.key_length"))? {
            Some(d) => d,
            None => hidden_size / n_heads.max(1),
        };
        if let Some(v_dim) = get_usize(&key("attention.value_length"))? {
            if v_dim != head_dim {
                return Err(EngineError::Unsupported(format!(
                    "{shown}: value heads of {v_dim} beside key heads of {head_dim} are not supported"
                )));
            }
        }
        if let Some(rope_dim) = get_usize(&key("rope.dimension_count"))? {
            if rope_dim != head_dim {
                return Err(EngineError::Unsupported(format!(
                    "{shown}: partial rotary embeddings (rope dimension {rope_dim}, head dim {head_dim}) are not supported"
                )));
            }
        }
        // The vocabulary size key is optional in GGUF; the embedding matrix
        // always knows it (candle shape is (vocab, hidden)).
        let vocab_size = match get_usize(&key("vocab_size"))? {
            Some(v) => v,
            None => match content.tensor_infos.get("token_embd.weight") {
                Some(info) => info.shape.dims().first().copied().unwrap_or(0),
                None => {
                    return Err(EngineError::Tensor {
                        path: shown,
                        tensor: "token_embd.weight".into(),
                        detail: format!("missing (and no {} metadata)", key("vocab_size")),
                    })
                }
            },
        };
        let cfg = ModelConfig {
            arch,
            hidden_size,
            intermediate_size: need_usize(&key("feed_forward_length"))?,
            n_layers: need_usize(&key("block_count"))?,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab_size,
            rope_theta: get_f64(&key("rope.freq_base"))?.unwrap_or(10_000.0) as f32,
            rope_scaling,
            rms_norm_eps: get_f64(&key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5),
            max_position_embeddings: get_usize(&key("context_length"))?.unwrap_or(2048),
            tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
            // llama.cpp's GGUF keeps no sliding window for these
            // architectures (it attends to every position).
            sliding_window: None,
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
        if self.sliding_window == Some(0) {
            return Err(EngineError::Model {
                path: shown.into(),
                detail: "sliding_window is 0".into(),
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
    use crate::arch::ARCHITECTURES;

    fn cfg(n_heads: usize, n_kv_heads: usize, ffn: usize) -> ModelConfig {
        ModelConfig {
            arch: ARCHITECTURES[0],
            hidden_size: 64,
            intermediate_size: ffn,
            n_layers: 2,
            n_heads,
            n_kv_heads,
            head_dim: 16,
            vocab_size: 10,
            rope_theta: 10_000.0,
            rope_scaling: RopeScaling::None,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 128,
            tie_word_embeddings: false,
            sliding_window: None,
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
