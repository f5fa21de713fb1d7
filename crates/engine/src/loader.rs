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
use std::sync::Arc;

use candle_core::quantized::{ggml_file, gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::arch::RopeScaling;
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::model::{Embedding, Layer, Linear, Shard, ShardParts, ShardSpec};

/// How weight matrices are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum WeightFormat {
    /// Every matrix dequantized / converted to f32.
    #[serde(rename = "f32")]
    F32,
    /// GGUF blocks kept as stored, as candle `QMatMul` (GGUF only; float
    /// files load as f32).
    #[serde(rename = "gguf")]
    Quantized,
    /// Every matrix (re)quantized to Q8_0 blocks, which candle multiplies
    /// with AVX2/NEON kernels; from any source format. Q8_0 holds a Q4_x
    /// or Q5_x block's 16 or 32 levels to within 1/254 of the block's range.
    #[serde(rename = "q8_0")]
    Q8_0,
}

impl WeightFormat {
    pub const ALL: [WeightFormat; 3] = [
        WeightFormat::F32,
        WeightFormat::Q8_0,
        WeightFormat::Quantized,
    ];

    /// The name used in requests and on the command line (its serde tag).
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::F32 => "f32",
            WeightFormat::Quantized => "gguf",
            WeightFormat::Q8_0 => "q8_0",
        }
    }
}

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
    let parts = load_parts(source.as_ref(), &cfg, spec, format, progress)?;
    Shard::from_parts(cfg, spec.clone(), parts)
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

/// How the elements of a tensor are stored in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Float(DType),
    Ggml(GgmlDType),
}

impl Encoding {
    fn block_size(self) -> usize {
        match self {
            Encoding::Float(_) => 1,
            Encoding::Ggml(t) => t.block_size(),
        }
    }

    fn type_size(self) -> usize {
        match self {
            Encoding::Float(t) => t.size_in_bytes(),
            Encoding::Ggml(t) => t.type_size(),
        }
    }

    /// GGML float types are plain arrays; treat them like safetensors ones.
    fn normalized(self) -> Self {
        match self {
            Encoding::Ggml(GgmlDType::F32) => Encoding::Float(DType::F32),
            Encoding::Ggml(GgmlDType::F16) => Encoding::Float(DType::F16),
            Encoding::Ggml(GgmlDType::BF16) => Encoding::Float(DType::BF16),
            other => other,
        }
    }
}

/// A tensor located in a file and checked to lie within it.
struct RawTensor<'a> {
    file: &'a File,
    /// The file, for errors.
    shown: &'a str,
    name: String,
    /// candle order: `[out, in]` for matrices.
    dims: Vec<usize>,
    /// Absolute offset of the first byte.
    start: u64,
    encoding: Encoding,
}

impl RawTensor<'_> {
    fn err(&self, detail: impl Into<String>) -> EngineError {
        EngineError::Tensor {
            path: self.shown.to_string(),
            tensor: self.name.clone(),
            detail: detail.into(),
        }
    }

    fn expect_dims(&self, expect: &[usize]) -> Result<()> {
        if self.dims != expect {
            return Err(self.err(format!(
                "has shape {:?}, the config implies {expect:?}",
                self.dims
            )));
        }
        Ok(())
    }

    /// Reads rows `rows` and the blocks covering columns `cols` of a matrix;
    /// returns the bytes and the first column they start at.
    fn read_block(
        &self,
        rows: &Range<usize>,
        cols: &Range<usize>,
    ) -> Result<(AlignedBytes, Range<usize>)> {
        let in_dim = self.dims[1];
        let bs = self.encoding.block_size();
        let ts = self.encoding.type_size();
        let row_bytes = in_dim / bs * ts;
        let first_block = cols.start / bs;
        let end_block = cols.end.div_ceil(bs);
        let slice_bytes = (end_block - first_block) * ts;
        let mut buf = AlignedBytes::zeroed(rows.len() * slice_bytes);
        let io_err = |e: std::io::Error| self.err(format!("cannot read: {e}"));
        if first_block == 0 && end_block * bs == in_dim {
            // Whole rows are contiguous: one read.
            let offset = self.start + (rows.start * row_bytes) as u64;
            self.file
                .read_exact_at(buf.as_mut_slice(), offset)
                .map_err(io_err)?;
        } else {
            let out = buf.as_mut_slice();
            for (i, row) in rows.clone().enumerate() {
                let offset = self.start + (row * row_bytes + first_block * ts) as u64;
                self.file
                    .read_exact_at(&mut out[i * slice_bytes..(i + 1) * slice_bytes], offset)
                    .map_err(io_err)?;
            }
        }
        Ok((buf, first_block * bs..end_block * bs))
    }

    fn is_ggml(&self, dtype: GgmlDType) -> bool {
        self.encoding == Encoding::Ggml(dtype)
    }

    /// Rows `rows`, columns `cols` as a weight matrix. `rope_head_dim` marks
    /// GGUF q/k rows to put back into HF order (heads of that size).
    fn matrix(
        &self,
        rows: Range<usize>,
        cols: Range<usize>,
        rope_head_dim: Option<usize>,
        format: WeightFormat,
    ) -> Result<Linear> {
        let (mut bytes, covered) = self.read_block(&rows, &cols)?;
        let n_rows = rows.len();
        let row_len = bytes.len() / n_rows.max(1);
        if let Some(head_dim) = rope_head_dim {
            if !rows.start.is_multiple_of(head_dim) || !n_rows.is_multiple_of(head_dim) {
                return Err(self.err("q/k rows are not whole heads"));
            }
            bytes = unpermute_rope_rows(&bytes, row_len, head_dim);
        }
        let dims = [n_rows, covered.len()];
        let aligned = covered == cols;
        match self.encoding.normalized() {
            Encoding::Float(dtype) => {
                let t = Tensor::from_raw_buffer(bytes.as_slice(), dtype, &dims, &Device::Cpu)
                    .and_then(|t| t.to_dtype(DType::F32))
                    .map_err(|e| self.err(e.to_string()))?;
                drop(bytes);
                self.finish_dense(t, format)
            }
            Encoding::Ggml(GgmlDType::Q8_0) if format == WeightFormat::Q8_0 && aligned => {
                let q = ggml_file::qtensor_from_ggml(
                    GgmlDType::Q8_0,
                    bytes.as_slice(),
                    dims.to_vec(),
                    &Device::Cpu,
                )
                .and_then(QMatMul::from_qtensor)
                .map_err(|e| self.err(e.to_string()))?;
                Ok(Linear::Quantized(q))
            }
            Encoding::Ggml(ggml) => {
                let q = ggml_file::qtensor_from_ggml(
                    ggml,
                    bytes.as_slice(),
                    dims.to_vec(),
                    &Device::Cpu,
                )
                .map_err(|e| self.err(e.to_string()))?;
                drop(bytes);
                let kernel_ok = qmatmul_supports(ggml, covered.len());
                if format == WeightFormat::Quantized && aligned && kernel_ok {
                    let q = QMatMul::from_qtensor(q).map_err(|e| self.err(e.to_string()))?;
                    return Ok(Linear::Quantized(q));
                }
                if format == WeightFormat::Quantized {
                    tracing::debug!(
                        tensor = %self.name,
                        aligned,
                        kernel_ok,
                        "slice cannot stay quantized; dequantizing this matrix"
                    );
                }
                let t = q
                    .dequantize(&Device::Cpu)
                    .and_then(|t| t.narrow(1, cols.start - covered.start, cols.len()))
                    .and_then(|t| t.contiguous())
                    .map_err(|e| self.err(e.to_string()))?;
                self.finish_dense(t, format)
            }
        }
    }

    /// An f32 matrix in the requested format: as is, or requantized to
    /// Q8_0 when its rows are whole blocks (otherwise it stays f32).
    fn finish_dense(&self, t: Tensor, format: WeightFormat) -> Result<Linear> {
        let row_len = t.dims().last().copied().unwrap_or(0);
        if format != WeightFormat::Q8_0 || !row_len.is_multiple_of(GgmlDType::Q8_0.block_size()) {
            return Ok(Linear::Dense(t));
        }
        QTensor::quantize(&t, GgmlDType::Q8_0)
            .and_then(QMatMul::from_qtensor)
            .map(Linear::Quantized)
            .map_err(|e| self.err(e.to_string()))
    }

    /// A 1-D tensor (norm weights) as f32.
    fn vector(&self) -> Result<Tensor> {
        let len = self.dims.iter().product::<usize>();
        let as_matrix = RawTensor {
            file: self.file,
            shown: self.shown,
            name: self.name.clone(),
            dims: vec![1, len],
            start: self.start,
            encoding: self.encoding,
        };
        match as_matrix.matrix(0..1, 0..len, None, WeightFormat::F32)? {
            Linear::Dense(t) => t.reshape(len).map_err(|e| self.err(e.to_string())),
            Linear::Quantized(_) => Err(self.err("unexpected quantized vector")),
        }
    }

    /// The whole matrix as an embedding table in its compact stored form.
    fn embedding(&self) -> Result<Embedding> {
        let (bytes, _) = self.read_block(&(0..self.dims[0]), &(0..self.dims[1]))?;
        match self.encoding.normalized() {
            Encoding::Float(dtype) => {
                Tensor::from_raw_buffer(bytes.as_slice(), dtype, &self.dims, &Device::Cpu)
                    .map(Embedding::Dense)
                    .map_err(|e| self.err(e.to_string()))
            }
            Encoding::Ggml(ggml) => ggml_file::qtensor_from_ggml(
                ggml,
                bytes.as_slice(),
                self.dims.clone(),
                &Device::Cpu,
            )
            .map(|q| Embedding::Quantized(Arc::new(q)))
            .map_err(|e| self.err(e.to_string())),
        }
    }
}

/// Whether candle's CPU `QMatMul` can multiply rows of `k` elements of
/// `dtype`. Its Q4_1, Q5_0 and Q5_1 dot products `debug_assert!` an even
/// number of blocks per row (a ggml SIMD heritage; the portable code is
/// correct either way), so a debug build would panic inside candle's thread
/// pool on, e.g., a tensor-parallel slice of one block. Such matrices are
/// dequantized instead: exact, only larger.
fn qmatmul_supports(dtype: GgmlDType, k: usize) -> bool {
    let blocks = k / dtype.block_size().max(1);
    match dtype {
        GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 => blocks.is_multiple_of(2),
        _ => true,
    }
}

/// Undoes llama.cpp's q/k permutation. Within each head the converter did
/// `w.reshape(2, hd/2, in).swapaxes(0, 1)`, so HF row `j` of a head sits at
/// GGUF row `2 * (j % (hd/2)) + j / (hd/2)`.
fn unpermute_rope_rows(bytes: &AlignedBytes, row_len: usize, head_dim: usize) -> AlignedBytes {
    let mut out = AlignedBytes::zeroed(bytes.len());
    let half = head_dim / 2;
    let src = bytes.as_slice();
    let dst = out.as_mut_slice();
    let n_rows = src.len() / row_len.max(1);
    for row in 0..n_rows {
        let head = row / head_dim;
        let j = row % head_dim;
        let from = head * head_dim + 2 * (j % half) + j / half;
        dst[row * row_len..(row + 1) * row_len]
            .copy_from_slice(&src[from * row_len..(from + 1) * row_len]);
    }
    out
}

/// Bytes stored in `u64` words, so that candle can reinterpret them in
/// place as GGML blocks (which hold f16/f32 fields and need their
/// alignment); a `Vec<u8>` guarantees only byte alignment.
struct AlignedBytes {
    words: Vec<u64>,
    len: usize,
}

impl AlignedBytes {
    fn zeroed(len: usize) -> Self {
        AlignedBytes {
            words: vec![0; len.div_ceil(8)],
            len,
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: `words` holds `len.div_ceil(8) * 8 >= len` initialised
        // bytes; u8 has no alignment or validity requirements; the slice
        // borrows `self`, so the vector cannot be freed or moved meanwhile.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and the exclusive borrow of `self`
        // makes this the only reference to the bytes.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast::<u8>(), self.len) }
    }
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
        raw.matrix(rows, cols, rope, format)
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
        let share_blocks = tied
            && match format {
                WeightFormat::F32 => false,
                WeightFormat::Quantized => true,
                WeightFormat::Q8_0 => src.raw(&embed_name)?.is_ggml(GgmlDType::Q8_0),
            };
        if share_blocks {
            // One copy of the blocks serves both the lookup and lm_head.
            let raw = src.raw(&embed_name)?;
            raw.expect_dims(&[vocab, h])?;
            let table = raw.embedding()?;
            lm_head = Some(match &table {
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

// ---------------------------------------------------------------- GGUF

/// Parses a GGUF file's header (metadata and tensor infos, not the data).
fn read_gguf_header(path: &Path) -> Result<(gguf_file::Content, File)> {
    let shown = path.display().to_string();
    let file = File::open(path).map_err(|e| EngineError::Model {
        path: shown.clone(),
        detail: format!("cannot open: {e}"),
    })?;
    let mut reader = BufReader::new(file);
    let content = gguf_file::Content::read(&mut reader).map_err(|e| EngineError::Model {
        path: shown,
        detail: format!("corrupt or truncated GGUF header: {e}"),
    })?;
    Ok((content, reader.into_inner()))
}

struct GgufSource {
    shown: String,
    file: File,
    file_len: u64,
    content: gguf_file::Content,
}

impl GgufSource {
    fn open(path: &Path) -> Result<Self> {
        let (content, file) = read_gguf_header(path)?;
        let shown = path.display().to_string();
        let file_len = file
            .metadata()
            .map_err(|e| EngineError::Model {
                path: shown.clone(),
                detail: format!("cannot stat: {e}"),
            })?
            .len();
        Ok(GgufSource {
            shown,
            file,
            file_len,
            content,
        })
    }
}

impl WeightSource for GgufSource {
    fn name(&self, kind: TensorKind) -> String {
        match kind {
            TensorKind::Embed => "token_embd.weight".into(),
            TensorKind::FinalNorm => "output_norm.weight".into(),
            TensorKind::LmHead => "output.weight".into(),
            TensorKind::RopeFreqs => "rope_freqs.weight".into(),
            TensorKind::AttnNorm(i) => format!("blk.{i}.attn_norm.weight"),
            TensorKind::Q(i) => format!("blk.{i}.attn_q.weight"),
            TensorKind::K(i) => format!("blk.{i}.attn_k.weight"),
            TensorKind::V(i) => format!("blk.{i}.attn_v.weight"),
            TensorKind::QBias(i) => format!("blk.{i}.attn_q.bias"),
            TensorKind::KBias(i) => format!("blk.{i}.attn_k.bias"),
            TensorKind::VBias(i) => format!("blk.{i}.attn_v.bias"),
            TensorKind::QNorm(i) => format!("blk.{i}.attn_q_norm.weight"),
            TensorKind::KNorm(i) => format!("blk.{i}.attn_k_norm.weight"),
            TensorKind::O(i) => format!("blk.{i}.attn_output.weight"),
            TensorKind::FfnNorm(i) => format!("blk.{i}.ffn_norm.weight"),
            TensorKind::Gate(i) => format!("blk.{i}.ffn_gate.weight"),
            TensorKind::Up(i) => format!("blk.{i}.ffn_up.weight"),
            TensorKind::Down(i) => format!("blk.{i}.ffn_down.weight"),
        }
    }

    fn raw(&self, name: &str) -> Result<RawTensor<'_>> {
        let err = |detail: String| EngineError::Tensor {
            path: self.shown.clone(),
            tensor: name.to_string(),
            detail,
        };
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| err("missing".into()))?;
        let dims = info.shape.dims().to_vec();
        let encoding = Encoding::Ggml(info.ggml_dtype);
        let (bs, ts) = (encoding.block_size(), encoding.type_size());
        let inner = dims.last().copied().unwrap_or(1);
        if inner % bs != 0 {
            return Err(err(format!(
                "rows of {inner} elements are not whole {:?} blocks of {bs}",
                info.ggml_dtype
            )));
        }
        let elems = dims.iter().try_fold(1usize, |acc, d| acc.checked_mul(*d));
        let bytes = elems
            .map(|n| n / bs)
            .and_then(|blocks| blocks.checked_mul(ts))
            .ok_or_else(|| err(format!("shape {dims:?} overflows")))?;
        let start = self.content.tensor_data_offset.checked_add(info.offset);
        match start.and_then(|s| s.checked_add(bytes as u64)) {
            Some(end) if end <= self.file_len => {}
            _ => {
                return Err(err(format!(
                    "truncated: needs {bytes} bytes at offset {}, the file has {} bytes",
                    self.content.tensor_data_offset.saturating_add(info.offset),
                    self.file_len
                )))
            }
        }
        Ok(RawTensor {
            file: &self.file,
            shown: &self.shown,
            name: name.to_string(),
            dims,
            start: start.unwrap_or_default(),
            encoding,
        })
    }

    fn permutes_qk(&self) -> bool {
        true
    }
}

// ---------------------------------------------------------------- safetensors

/// One `*.safetensors` file: its header, parsed and bounds-checked lazily
/// per tensor.
struct SafetensorsFile {
    shown: String,
    file: File,
    file_len: u64,
    /// Offset of the data section (8 + header length).
    data_start: u64,
    tensors: HashMap<String, SafetensorsEntry>,
}

#[derive(serde::Deserialize)]
struct SafetensorsEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

/// Safetensors headers are a few hundred kB even for large models; a
/// bigger length prefix means the file is not safetensors.
const MAX_SAFETENSORS_HEADER: u64 = 100 << 20;

impl SafetensorsFile {
    fn open(path: &Path) -> Result<Self> {
        let shown = path.display().to_string();
        let model_err = |detail: String| EngineError::Model {
            path: shown.clone(),
            detail,
        };
        let file = File::open(path).map_err(|e| model_err(format!("cannot open: {e}")))?;
        let file_len = file
            .metadata()
            .map_err(|e| model_err(format!("cannot stat: {e}")))?
            .len();
        let mut len_bytes = [0u8; 8];
        file.read_exact_at(&mut len_bytes, 0)
            .map_err(|e| model_err(format!("corrupt or truncated safetensors header: {e}")))?;
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > MAX_SAFETENSORS_HEADER || header_len > file_len.saturating_sub(8) {
            return Err(model_err(format!(
                "corrupt or truncated safetensors header: declares {header_len} header bytes, the file has {file_len} bytes"
            )));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact_at(&mut header, 8)
            .map_err(|e| model_err(format!("cannot read safetensors header: {e}")))?;
        let json: HashMap<String, serde_json::Value> = serde_json::from_slice(&header)
            .map_err(|e| model_err(format!("corrupt safetensors header: {e}")))?;
        let mut tensors = HashMap::with_capacity(json.len());
        for (name, value) in json {
            if name == "__metadata__" {
                continue;
            }
            let entry: SafetensorsEntry =
                serde_json::from_value(value).map_err(|e| EngineError::Tensor {
                    path: shown.clone(),
                    tensor: name.clone(),
                    detail: format!("corrupt header entry: {e}"),
                })?;
            tensors.insert(name, entry);
        }
        Ok(SafetensorsFile {
            shown,
            file,
            file_len,
            data_start: 8 + header_len,
            tensors,
        })
    }

    fn raw(&self, name: &str) -> Result<RawTensor<'_>> {
        let err = |detail: String| EngineError::Tensor {
            path: self.shown.clone(),
            tensor: name.to_string(),
            detail,
        };
        let entry = self
            .tensors
            .get(name)
            .ok_or_else(|| err("missing".into()))?;
        let dtype = match entry.dtype.as_str() {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            other => {
                return Err(err(format!(
                    "dtype {other} is not supported (F32, F16, BF16)"
                )))
            }
        };
        let [begin, end] = entry.data_offsets;
        let expected = entry
            .shape
            .iter()
            .try_fold(dtype.size_in_bytes(), |acc, d| acc.checked_mul(*d))
            .ok_or_else(|| err(format!("shape {:?} overflows", entry.shape)))?;
        if end < begin || end - begin != expected as u64 {
            return Err(err(format!(
                "data_offsets {begin}..{end} do not hold a {:?} {} tensor ({expected} bytes)",
                entry.shape, entry.dtype
            )));
        }
        if self.data_start.saturating_add(end) > self.file_len {
            return Err(err(format!(
                "truncated: data ends at byte {}, the file has {} bytes",
                self.data_start.saturating_add(end),
                self.file_len
            )));
        }
        Ok(RawTensor {
            file: &self.file,
            shown: &self.shown,
            name: name.to_string(),
            dims: entry.shape.clone(),
            start: self.data_start + begin,
            encoding: Encoding::Float(dtype),
        })
    }
}

/// A Hugging Face directory: one safetensors file, or an index mapping each
/// tensor to one of several files.
struct HfSource {
    files: Vec<SafetensorsFile>,
    /// Tensor name -> index into `files`.
    index: HashMap<String, usize>,
}

#[derive(serde::Deserialize)]
struct SafetensorsIndex {
    weight_map: HashMap<String, String>,
}

impl HfSource {
    fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        if single.exists() {
            let file = SafetensorsFile::open(&single)?;
            let index = file.tensors.keys().map(|k| (k.clone(), 0)).collect();
            return Ok(HfSource {
                files: vec![file],
                index,
            });
        }
        if !index_path.exists() {
            return Err(EngineError::Model {
                path: dir.display().to_string(),
                detail: "no model.safetensors or model.safetensors.index.json".into(),
            });
        }
        let shown = index_path.display().to_string();
        let text = std::fs::read_to_string(&index_path).map_err(|e| EngineError::Model {
            path: shown.clone(),
            detail: format!("cannot read: {e}"),
        })?;
        let parsed: SafetensorsIndex =
            serde_json::from_str(&text).map_err(|e| EngineError::Model {
                path: shown.clone(),
                detail: format!("corrupt index: {e}"),
            })?;
        let mut file_names: Vec<&String> = parsed.weight_map.values().collect();
        file_names.sort();
        file_names.dedup();
        let mut files = Vec::with_capacity(file_names.len());
        let mut file_idx: HashMap<&String, usize> = HashMap::new();
        for name in file_names {
            // The index names files relative to the directory; refuse
            // anything that would escape it.
            let rel = PathBuf::from(name);
            if rel.components().count() != 1 {
                return Err(EngineError::Model {
                    path: shown.clone(),
                    detail: format!("index names a file outside the directory: {name}"),
                });
            }
            file_idx.insert(name, files.len());
            files.push(SafetensorsFile::open(&dir.join(rel))?);
        }
        let index = parsed
            .weight_map
            .iter()
            .filter_map(|(tensor, file)| file_idx.get(file).map(|&i| (tensor.clone(), i)))
            .collect();
        Ok(HfSource { files, index })
    }
}

impl WeightSource for HfSource {
    fn name(&self, kind: TensorKind) -> String {
        match kind {
            TensorKind::Embed => "model.embed_tokens.weight".into(),
            TensorKind::FinalNorm => "model.norm.weight".into(),
            TensorKind::LmHead => "lm_head.weight".into(),
            // Hugging Face configs give the scaling as parameters instead.
            TensorKind::RopeFreqs => "rope_freqs.weight".into(),
            TensorKind::AttnNorm(i) => format!("model.layers.{i}.input_layernorm.weight"),
            TensorKind::Q(i) => format!("model.layers.{i}.self_attn.q_proj.weight"),
            TensorKind::K(i) => format!("model.layers.{i}.self_attn.k_proj.weight"),
            TensorKind::V(i) => format!("model.layers.{i}.self_attn.v_proj.weight"),
            TensorKind::QBias(i) => format!("model.layers.{i}.self_attn.q_proj.bias"),
            TensorKind::KBias(i) => format!("model.layers.{i}.self_attn.k_proj.bias"),
            TensorKind::VBias(i) => format!("model.layers.{i}.self_attn.v_proj.bias"),
            TensorKind::QNorm(i) => format!("model.layers.{i}.self_attn.q_norm.weight"),
            TensorKind::KNorm(i) => format!("model.layers.{i}.self_attn.k_norm.weight"),
            TensorKind::O(i) => format!("model.layers.{i}.self_attn.o_proj.weight"),
            TensorKind::FfnNorm(i) => format!("model.layers.{i}.post_attention_layernorm.weight"),
            TensorKind::Gate(i) => format!("model.layers.{i}.mlp.gate_proj.weight"),
            TensorKind::Up(i) => format!("model.layers.{i}.mlp.up_proj.weight"),
            TensorKind::Down(i) => format!("model.layers.{i}.mlp.down_proj.weight"),
        }
    }

    fn raw(&self, name: &str) -> Result<RawTensor<'_>> {
        match self.index.get(name).and_then(|&i| self.files.get(i)) {
            Some(file) => file.raw(name),
            None => Err(EngineError::Tensor {
                path: self
                    .files
                    .first()
                    .map(|f| f.shown.clone())
                    .unwrap_or_default(),
                tensor: name.to_string(),
                detail: "missing".into(),
            }),
        }
    }

    fn permutes_qk(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_format_names_are_their_serde_tags() {
        for format in WeightFormat::ALL {
            let tag = serde_json::to_string(&format).unwrap();
            assert_eq!(tag, format!("\"{}\"", format.name()));
        }
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // Two heads of head_dim 4, one byte per row: HF rows 0..8.
        let head_dim = 4;
        let hf: Vec<u8> = (0..8).collect();
        // llama.cpp: per head reshape (2, hd/2) -> swap -> (hd/2, 2).
        let mut gguf = vec![0u8; 8];
        for head in 0..2 {
            for a in 0..head_dim / 2 {
                for b in 0..2 {
                    gguf[head * head_dim + a * 2 + b] =
                        hf[head * head_dim + b * (head_dim / 2) + a];
                }
            }
        }
        let mut bytes = AlignedBytes::zeroed(8);
        bytes.as_mut_slice().copy_from_slice(&gguf);
        let back = unpermute_rope_rows(&bytes, 1, head_dim);
        assert_eq!(back.as_slice(), hf.as_slice());
    }

    #[test]
    fn aligned_bytes_are_word_aligned() {
        let b = AlignedBytes::zeroed(13);
        assert_eq!(b.as_slice().len(), 13);
        assert_eq!(b.as_slice().as_ptr() as usize % 8, 0);
    }
}
