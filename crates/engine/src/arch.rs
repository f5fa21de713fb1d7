//! The llama-family architectures the engine runs, as data: one decoder
//! (`model.rs`) whose differences per architecture are the options of an
//! [`Arch`], found by name in [`ARCHITECTURES`], plus the RoPE frequency
//! scaling a model declares ([`RopeScaling`]).
//!
//! Adding an architecture is a table entry (and a test in `arch_it`) when
//! its decoder is the llama one with these options; anything else is
//! refused by name, listing what is supported.

use crate::error::{EngineError, Result};

/// What one architecture changes in the llama decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arch {
    /// The GGUF `general.architecture`, also the prefix of its metadata
    /// keys (`qwen2.embedding_length`).
    pub name: &'static str,
    /// Hugging Face `model_type`s with this decoder.
    pub hf_model_types: &'static [&'static str],
    /// The q, k and v projections add a bias (Qwen2).
    pub qkv_bias: bool,
    /// q and k get an RMSNorm per head, before RoPE (Qwen3).
    pub qk_norm: bool,
    /// llama.cpp's converter permutes the q and k rows of this
    /// architecture's GGUF files (for its interleaved RoPE); the loader
    /// undoes it so that one rotate-half RoPE serves every file. It does so
    /// only for `llama`.
    pub gguf_permuted_qk: bool,
}

/// Every architecture the engine runs. Mistral's GGUF files say `llama`;
/// its Hugging Face configs say `mistral` (and may set a sliding window,
/// which the decoder honours).
pub const ARCHITECTURES: &[Arch] = &[
    Arch {
        name: "llama",
        hf_model_types: &["llama", "mistral"],
        qkv_bias: false,
        qk_norm: false,
        gguf_permuted_qk: true,
    },
    Arch {
        name: "qwen2",
        hf_model_types: &["qwen2"],
        qkv_bias: true,
        qk_norm: false,
        gguf_permuted_qk: false,
    },
    Arch {
        name: "qwen3",
        hf_model_types: &["qwen3"],
        qkv_bias: false,
        qk_norm: true,
        gguf_permuted_qk: false,
    },
];

/// The architecture a GGUF file names; `shown` names the file in the error.
pub fn gguf_arch(name: &str, shown: &str) -> Result<Arch> {
    ARCHITECTURES
        .iter()
        .find(|a| a.name == name)
        .copied()
        .ok_or_else(|| {
            let names: Vec<&str> = ARCHITECTURES.iter().map(|a| a.name).collect();
            EngineError::Unsupported(format!(
                "{shown}: unsupported architecture {name:?}: the engine runs {names:?}"
            ))
        })
}

/// The architecture of a Hugging Face `model_type`.
pub fn hf_arch(model_type: Option<&str>, shown: &str) -> Result<Arch> {
    let found = model_type.and_then(|t| {
        ARCHITECTURES
            .iter()
            .find(|a| a.hf_model_types.contains(&t))
            .copied()
    });
    found.ok_or_else(|| {
        let types: Vec<&str> = ARCHITECTURES
            .iter()
            .flat_map(|a| a.hf_model_types.iter().copied())
            .collect();
        EngineError::Unsupported(format!(
            "{shown}: unsupported architecture {:?}: the engine runs model types {types:?}",
            model_type.unwrap_or("<missing model_type>")
        ))
    })
}

/// How a model scales RoPE's frequencies (for contexts beyond those it was
/// trained on).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Every frequency divided by `factor` (positions interpolated).
    Linear {
        factor: f32,
    },
    /// Llama 3.1's: low frequencies divided by `factor`, high ones kept,
    /// a smooth blend between (Hugging Face's `rope_type: llama3`).
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_context: f32,
    },
    /// One factor per frequency, stored as the GGUF tensor
    /// `rope_freqs.weight` (how llama.cpp's converter stores Llama 3.1's
    /// scaling): frequency `i` is divided by factor `i`. The loader reads
    /// them.
    FreqFactors,
}

/// RoPE's inverse frequencies `1 / theta^(2i / head_dim)`, `i < head_dim/2`,
/// scaled as `scaling` says; `factors` are the per-frequency ones of
/// [`RopeScaling::FreqFactors`].
pub fn rope_inv_freq(
    theta: f32,
    head_dim: usize,
    scaling: &RopeScaling,
    factors: Option<&[f32]>,
) -> Result<Vec<f32>> {
    let base = (0..head_dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32));
    Ok(match scaling {
        RopeScaling::None => base.collect(),
        RopeScaling::Linear { factor } => base.map(|f| f / factor).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_context,
        } => {
            // transformers' `_compute_llama3_parameters`, in f32.
            let low_wavelen = original_context / low_freq_factor;
            let high_wavelen = original_context / high_freq_factor;
            base.map(|f| {
                let wavelen = 2.0 * std::f32::consts::PI / f;
                if wavelen > low_wavelen {
                    f / factor
                } else if wavelen < high_wavelen {
                    f
                } else {
                    let smooth = (original_context / wavelen - low_freq_factor)
                        / (high_freq_factor - low_freq_factor);
                    (1.0 - smooth) * f / factor + smooth * f
                }
            })
            .collect()
        }
        RopeScaling::FreqFactors => {
            let factors = factors.ok_or_else(|| {
                EngineError::Compute("per-frequency rope factors were not loaded".into())
            })?;
            if factors.len() != head_dim / 2 {
                return Err(EngineError::Compute(format!(
                    "{} rope factors for {} frequencies",
                    factors.len(),
                    head_dim / 2
                )));
            }
            base.zip(factors).map(|(f, k)| f / k).collect()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn architectures_are_found_by_gguf_and_hf_names_and_others_listed() {
        assert!(gguf_arch("qwen2", "f").unwrap().qkv_bias);
        assert!(gguf_arch("qwen3", "f").unwrap().qk_norm);
        assert!(gguf_arch("llama", "f").unwrap().gguf_permuted_qk);
        assert_eq!(hf_arch(Some("mistral"), "f").unwrap().name, "llama");
        let err = gguf_arch("gemma2", "m.gguf").unwrap_err().to_string();
        assert!(err.contains("gemma2") && err.contains("qwen3"), "{err}");
        let err = hf_arch(None, "config.json").unwrap_err().to_string();
        assert!(
            err.contains("missing model_type") && err.contains("mistral"),
            "{err}"
        );
    }

    /// Expected values from transformers' `_compute_llama3_parameters`
    /// (`transformers/modeling_rope_utils.py`, Llama 3.1's config: factor 8,
    /// low 1, high 4, original context 8192, theta 500000, head_dim 128),
    /// worked in Python: frequency 0 (wavelength 2π) is kept, the lowest
    /// (i = 63) is divided by 8, and i = 32 (wavelength ≈ 4,442.9, between
    /// 2,048 and 8,192) is blended with smooth = (8192 / 4442.88 − 1) / 3
    /// ≈ 0.28128.
    #[test]
    fn llama3_scaling_keeps_high_divides_low_and_blends_between() {
        let scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_context: 8192.0,
        };
        let plain = rope_inv_freq(500_000.0, 128, &RopeScaling::None, None).unwrap();
        let scaled = rope_inv_freq(500_000.0, 128, &scaling, None).unwrap();
        assert_eq!(scaled[0], plain[0]);
        assert!((scaled[63] - plain[63] / 8.0).abs() <= 1e-6 * plain[63]);
        let smooth = 0.281_282_6_f32;
        let want = (1.0 - smooth) * plain[32] / 8.0 + smooth * plain[32];
        assert!(
            (scaled[32] - want).abs() <= 1e-5 * want,
            "{} vs {want}",
            scaled[32]
        );
        let close = |got: &[f32], want: &[f32]| {
            got.len() == want.len()
                && got
                    .iter()
                    .zip(want)
                    .all(|(a, b)| (a - b).abs() <= 1e-6 * b.abs())
        };
        let linear =
            rope_inv_freq(10_000.0, 8, &RopeScaling::Linear { factor: 2.0 }, None).unwrap();
        assert!(close(&linear, &[0.5, 0.05, 0.005, 0.0005]), "{linear:?}");
        let factors =
            rope_inv_freq(10_000.0, 4, &RopeScaling::FreqFactors, Some(&[1.0, 4.0])).unwrap();
        assert!(close(&factors, &[1.0, 0.0025]), "{factors:?}");
        assert!(rope_inv_freq(10_000.0, 4, &RopeScaling::FreqFactors, None).is_err());
        assert!(rope_inv_freq(10_000.0, 4, &RopeScaling::FreqFactors, Some(&[1.0])).is_err());
    }
}
