//! Loads one shard of a model from a Hugging Face directory (`config.json` +
//! `model.safetensors`, or `model.safetensors.index.json` + its files;
//! f32/f16/bf16) or from a GGUF file (llama architecture; Q4_0, Q4_1, Q8_0,
//! F16, F32 and the other block types candle reads).
//!
//! Invariants:
//! * A shard reads only its own bytes. Headers (safetensors JSON, GGUF
//!   metadata and tensor infos) are parsed whole; tensor data is read with
//!   positioned reads (`pread`) of exactly the rows, or the column ranges of
//!   rows, this shard owns. Nothing is memory-mapped, so a file's pages never
//!   count towards the runner's RSS: peak RSS is this shard's weights plus
//!   one tensor slice in flight.
//! * Tensor parallelism reads only this rank's slice: q/k/v/gate/up by
//!   output rows, o/down by input columns (for GGUF blocks, the whole blocks
//!   covering the columns).
//! * Every tensor is checked against the config (shape), its dtype against
//!   what is supported, and its byte range against the file's length before
//!   it is read; failures are `EngineError::Tensor` naming the file and the
//!   tensor, and file-level failures `EngineError::Model` naming the file.
//! * GGUF q/k rows come back in Hugging Face order. llama.cpp's converter
//!   permutes the rows of `attn_q` / `attn_k` within each head; a GGML block
//!   runs along a row (the input dimension), so whole rows can be moved as
//!   bytes and the permutation is undone exactly, for F32 and for quantized
//!   blocks alike, before any dequantization. The model therefore uses
//!   rotate-half RoPE on every path.
//! * `WeightFormat::Quantized` keeps GGUF blocks as `QMatMul`; where a
//!   tensor-parallel column slice does not fall on block boundaries, or
//!   candle's kernel cannot take the row length (`qmatmul_supports`), that
//!   one matrix is dequantized (exact, just larger). `WeightFormat::Q8_0`
//!   requantizes every matrix whose rows are whole 32-element blocks (Q8_0
//!   blocks from the file are kept as they are). Float GGUF tensors
//!   (F32/F16/BF16) are always held as f32. The embedding lookup table stays
//!   in the file's compact dtype on every path.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul};
use candle_core::{DType, Device, Tensor};

use crate::arch::RopeScaling;
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::model::{Embedding, Layer, Linear, Shard, ShardParts, ShardSpec};

pub use crate::weights::{Kernels, WeightFormat};

mod gguf;
mod raw;
mod safetensors;

use crate::q8tiles::PackedQ8;
use gguf::{read_gguf_header, GgufSource};
use raw::{qmatmul_supports, Encoding, RawTensor};
use safetensors::HfSource;
use std::sync::Arc;

/// Reads the model's config: `config.json` of a Hugging Face directory, or
/// the metadata of a GGUF file.
pub fn read_config(path: &Path) -> Result<ModelConfig> {
    read_config_and_name(path).map(|(config, _)| config)
}

/// The config and the name users call the model by: GGUF `general.name`
/// when the file has one, else the file's stem or the directory's name.
pub fn read_config_and_name(path: &Path) -> Result<(ModelConfig, String)> {
    let fallback = || {
        let name = if path.is_dir() {
            path.file_name()
        } else {
            path.file_stem()
        };
        name.map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string())
    };
    match detect(path)? {
        ModelKind::HfDir => Ok((
            ModelConfig::from_hf_json(&path.join("config.json"))?,
            fallback(),
        )),
        ModelKind::Gguf => {
            let (content, _) = read_gguf_header(path)?;
            let config = ModelConfig::from_gguf(&content, path)?;
            let name = crate::gguf_meta::GgufMeta::new(&content.metadata)
                .opt_str("general.name")
                .ok()
                .flatten()
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(String::from)
                .unwrap_or_else(fallback);
            Ok((config, name))
        }
    }
}

/// Loads the part of the model that `spec` describes. `progress(done, total)`
/// is called once per decoder layer loaded, `total` being the shard's layer
/// count.
pub fn load_shard(
    path: &Path,
    spec: &ShardSpec,
    format: WeightFormat,
    progress: &mut dyn FnMut(u32, u32),
) -> Result<Shard> {
    let (cfg, source): (ModelConfig, Box<dyn WeightSource>) = match detect(path)? {
        ModelKind::HfDir => {
            if format == WeightFormat::Quantized {
                return Err(EngineError::Unsupported(format!(
                    "{}: quantized weights need a GGUF file; load this directory as f32",
                    path.display()
                )));
            }
            let cfg = ModelConfig::from_hf_json(&path.join("config.json"))?;
            (cfg, Box::new(HfSource::open(path)?))
        }
        ModelKind::Gguf => {
            let source = GgufSource::open(path)?;
            let cfg = ModelConfig::from_gguf(&source.content, path)?;
            (cfg, Box::new(source))
        }
    };
    spec.validate(&cfg)?;
    tracing::debug!(path = %path.display(), ?spec, ?format, "loading shard");
    let tally = std::cell::RefCell::new(HeldTally::default());
    let parts = load_parts(source.as_ref(), &cfg, spec, format, &tally, progress)?;
    let mut shard = Shard::from_parts(cfg, spec.clone(), parts)?;
    shard.held = tally.into_inner().to_string();
    tracing::info!(
        path = %path.display(),
        weights = format.name(),
        kernels = ?Kernels::detect(),
        held = %shard.held,
        "shard weights loaded"
    );
    Ok(shard)
}

enum ModelKind {
    HfDir,
    Gguf,
}

fn detect(path: &Path) -> Result<ModelKind> {
    let shown = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|e| EngineError::Model {
        path: shown.clone(),
        detail: format!("cannot open model: {e}"),
    })?;
    if meta.is_dir() {
        return Ok(ModelKind::HfDir);
    }
    let mut magic = [0u8; 4];
    let read = File::open(path).and_then(|mut f| f.read_exact(&mut magic));
    match read {
        Ok(()) if &magic == b"GGUF" => Ok(ModelKind::Gguf),
        Ok(()) => Err(EngineError::Model {
            path: shown,
            detail: "neither a Hugging Face model directory nor a GGUF file (bad magic)".into(),
        }),
        Err(e) => Err(EngineError::Model {
            path: shown,
            detail: format!("cannot read model file: {e}"),
        }),
    }
}

/// The tensors of a llama-family model, named per format by
/// `WeightSource::name`.
#[derive(Debug, Clone, Copy)]
enum TensorKind {
    Embed,
    FinalNorm,
    LmHead,
    /// Per-frequency RoPE factors (GGUF only).
    RopeFreqs,
    AttnNorm(usize),
    Q(usize),
    K(usize),
    V(usize),
    QBias(usize),
    KBias(usize),
    VBias(usize),
    QNorm(usize),
    KNorm(usize),
    O(usize),
    FfnNorm(usize),
    Gate(usize),
    Up(usize),
    Down(usize),
}

/// Where a format keeps its tensors.
trait WeightSource {
    fn name(&self, kind: TensorKind) -> String;
    /// Locates `name`, checking that its bytes lie within the file.
    fn raw(&self, name: &str) -> Result<RawTensor<'_>>;
    /// Whether this format stores q/k rows in llama.cpp's permuted order
    /// for architectures that say so (`Arch::gguf_permuted_qk`).
    fn permutes_qk(&self) -> bool;
}

fn load_parts(
    src: &dyn WeightSource,
    cfg: &ModelConfig,
    spec: &ShardSpec,
    format: WeightFormat,
    tally: &std::cell::RefCell<HeldTally>,
    progress: &mut dyn FnMut(u32, u32),
) -> Result<ShardParts> {
    let (h, hd, ffn_width) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    let heads = spec.heads(cfg);
    let kv_heads = spec.kv_heads(cfg);
    let q_rows = heads.start * hd..heads.end * hd;
    let kv_rows = kv_heads.start * hd..kv_heads.end * hd;
    let ffn = spec.ffn_columns(cfg);
    let rope_head_dim = (src.permutes_qk() && cfg.arch.gguf_permuted_qk).then_some(hd);

    let matrix = |kind: TensorKind,
                  full: [usize; 2],
                  rows: Range<usize>,
                  cols: Range<usize>,
                  rope: Option<usize>|
     -> Result<Linear> {
        let raw = src.raw(&src.name(kind))?;
        raw.expect_dims(&full)?;
        let linear = raw.matrix(rows, cols, rope, format)?;
        tally.borrow_mut().note(&raw, format, &linear);
        Ok(linear)
    };
    let vector = |kind: TensorKind, len: usize| -> Result<Tensor> {
        let raw = src.raw(&src.name(kind))?;
        raw.expect_dims(&[len])?;
        raw.vector()
    };
    // This rank's rows of a bias.
    let bias = |kind: TensorKind, len: usize, rows: &Range<usize>| -> Result<Tensor> {
        let raw = src.raw(&src.name(kind))?;
        raw.expect_dims(&[len])?;
        raw.vector()?
            .narrow(0, rows.start, rows.len())
            .map_err(|e| raw.err(e.to_string()))
    };
    let rope_factors = match cfg.rope_scaling {
        RopeScaling::FreqFactors => {
            let t = vector(TensorKind::RopeFreqs, hd / 2)?;
            Some(
                t.to_vec1::<f32>()
                    .map_err(|e| EngineError::Compute(format!("rope_freqs.weight: {e}")))?,
            )
        }
        _ => None,
    };

    let has_head = spec.has_lm_head(cfg);
    let embed_name = src.name(TensorKind::Embed);
    // HF configs say whether embeddings are tied; GGUF files say it by
    // leaving out output.weight (from_gguf already set the flag from that).
    let tied = cfg.tie_word_embeddings;

    let mut embedding = None;
    let mut lm_head = None;
    let mut final_norm = None;
    if has_head {
        final_norm = Some(vector(TensorKind::FinalNorm, h)?);
        let head_kind = if tied {
            TensorKind::Embed
        } else {
            TensorKind::LmHead
        };
        let vocab = cfg.vocab_size;
        let share_blocks = tied && {
            let raw = src.raw(&embed_name)?;
            match format.for_stored(raw.encoding.stored(), Kernels::detect()) {
                WeightFormat::Quantized => true,
                WeightFormat::Q8_0 => raw.is_ggml(GgmlDType::Q8_0),
                WeightFormat::F32 | WeightFormat::Auto => false,
            }
        };
        if share_blocks {
            // One copy of the blocks serves both the lookup and lm_head.
            let raw = src.raw(&embed_name)?;
            raw.expect_dims(&[vocab, h])?;
            let mut table = raw.embedding()?;
            if let Embedding::Quantized(q) = &table {
                if let Some(packed) = PackedQ8::from_q8_0(q) {
                    table = Embedding::Tiled(Arc::new(packed.map_err(|e| raw.err(e.to_string()))?));
                }
            }
            lm_head = Some(match &table {
                Embedding::Tiled(p) => Linear::Tiled(p.clone()),
                Embedding::Quantized(q) if qmatmul_supports(q.dtype(), h) => Linear::Quantized(
                    QMatMul::from_arc(q.clone()).map_err(|e| raw.err(e.to_string()))?,
                ),
                Embedding::Quantized(q) => Linear::Dense(
                    q.dequantize(&Device::Cpu)
                        .map_err(|e| raw.err(e.to_string()))?,
                ),
                Embedding::Dense(t) => {
                    Linear::Dense(t.to_dtype(DType::F32).map_err(|e| raw.err(e.to_string()))?)
                }
            });
            if spec.has_embedding() {
                embedding = Some(table);
            }
        } else {
            let head = matrix(head_kind, [vocab, h], 0..vocab, 0..h, None)?;
            if tied && spec.has_embedding() {
                // The f32 lm_head already holds every embedding row.
                if let Linear::Dense(t) = &head {
                    embedding = Some(Embedding::Dense(t.clone()));
                }
            }
            lm_head = Some(head);
        }
    }
    if spec.has_embedding() && embedding.is_none() {
        let raw = src.raw(&embed_name)?;
        raw.expect_dims(&[cfg.vocab_size, h])?;
        embedding = Some(raw.embedding()?);
    }

    let total = spec.layers.len() as u32;
    let mut layers = Vec::with_capacity(spec.layers.len());
    for (done, i) in spec.layers.clone().enumerate() {
        let (qw, kvw) = (cfg.q_width(), cfg.kv_width());
        layers.push(Layer {
            attn_norm: vector(TensorKind::AttnNorm(i), h)?,
            q_proj: matrix(
                TensorKind::Q(i),
                [qw, h],
                q_rows.clone(),
                0..h,
                rope_head_dim,
            )?,
            k_proj: matrix(
                TensorKind::K(i),
                [kvw, h],
                kv_rows.clone(),
                0..h,
                rope_head_dim,
            )?,
            v_proj: matrix(TensorKind::V(i), [kvw, h], kv_rows.clone(), 0..h, None)?,
            qkv_bias: match cfg.arch.qkv_bias {
                false => None,
                true => Some([
                    bias(TensorKind::QBias(i), qw, &q_rows)?,
                    bias(TensorKind::KBias(i), kvw, &kv_rows)?,
                    bias(TensorKind::VBias(i), kvw, &kv_rows)?,
                ]),
            },
            qk_norm: match cfg.arch.qk_norm {
                false => None,
                true => Some([
                    vector(TensorKind::QNorm(i), hd)?,
                    vector(TensorKind::KNorm(i), hd)?,
                ]),
            },
            o_proj: matrix(TensorKind::O(i), [h, qw], 0..h, q_rows.clone(), None)?,
            ffn_norm: vector(TensorKind::FfnNorm(i), h)?,
            gate_proj: matrix(TensorKind::Gate(i), [ffn_width, h], ffn.clone(), 0..h, None)?,
            up_proj: matrix(TensorKind::Up(i), [ffn_width, h], ffn.clone(), 0..h, None)?,
            down_proj: matrix(TensorKind::Down(i), [h, ffn_width], 0..h, ffn.clone(), None)?,
        });
        progress(done as u32 + 1, total);
    }
    Ok(ShardParts {
        embedding,
        layers,
        final_norm,
        lm_head,
        rope_factors,
    })
}

/// What the matrices of one shard were stored as and are held as, for the
/// load log: counts per (stored, held) pair, and the matrices that stayed
/// f32 although the format asked for blocks (a tensor-parallel slice off
/// block boundaries, or a row length candle's kernel cannot take).
#[derive(Debug, Default)]
pub(crate) struct HeldTally {
    pairs: std::collections::BTreeMap<(String, String), usize>,
    dense_fallbacks: Vec<String>,
}

impl HeldTally {
    fn note(&mut self, raw: &RawTensor<'_>, format: WeightFormat, linear: &Linear) {
        let stored = format!("{:?}", raw.encoding.stored());
        let held = match linear {
            Linear::Dense(_) => "f32".to_string(),
            Linear::Quantized(QMatMul::QTensor(q)) => format!("{:?}", q.dtype()),
            Linear::Tiled(_) => "Q8_0".to_string(),
            Linear::Quantized(_) => "f32".to_string(),
        };
        let wanted = format.for_stored(raw.encoding.stored(), Kernels::detect());
        let is_float = matches!(raw.encoding.normalized(), Encoding::Float(_));
        if held == "f32" && wanted != WeightFormat::F32 && !is_float {
            self.dense_fallbacks.push(raw.name.clone());
        }
        *self.pairs.entry((stored, held)).or_default() += 1;
    }
}

impl std::fmt::Display for HeldTally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut first = true;
        for ((stored, held), n) in &self.pairs {
            let sep = if first { "" } else { ", " };
            first = false;
            if stored == held {
                write!(f, "{sep}{n} {stored} as stored")?;
            } else {
                write!(f, "{sep}{n} {stored} as {held}")?;
            }
        }
        if !self.dense_fallbacks.is_empty() {
            let shown: Vec<&str> = self
                .dense_fallbacks
                .iter()
                .take(4)
                .map(String::as_str)
                .collect();
            let more = self.dense_fallbacks.len().saturating_sub(shown.len());
            write!(
                f,
                "; {} held as f32 because the slice is off block boundaries or the row length does not suit the kernel: {}{}",
                self.dense_fallbacks.len(),
                shown.join(", "),
                if more > 0 { format!(" and {more} more") } else { String::new() }
            )?;
        }
        Ok(())
    }
}
