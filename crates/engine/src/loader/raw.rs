//! One tensor's bytes in a file and how they become a matrix, a vector or
//! an embedding table: block-aligned slices, llama.cpp's q/k row order, and
//! the held form the weight format asks for.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use candle_core::quantized::{ggml_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Tensor};

use super::{Kernels, WeightFormat};
use crate::error::{EngineError, Result};
use crate::model::{Embedding, Linear};
use crate::q8tiles::PackedQ8;

/// How the elements of a tensor are stored in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Encoding {
    Float(DType),
    Ggml(GgmlDType),
}

impl Encoding {
    pub(super) fn block_size(self) -> usize {
        match self {
            Encoding::Float(_) => 1,
            Encoding::Ggml(t) => t.block_size(),
        }
    }

    pub(super) fn type_size(self) -> usize {
        match self {
            Encoding::Float(t) => t.size_in_bytes(),
            Encoding::Ggml(t) => t.type_size(),
        }
    }

    /// The stored type as GGUF names it (safetensors floats as their GGML
    /// float type), for [`WeightFormat::for_stored`].
    pub(super) fn stored(self) -> GgmlDType {
        match self {
            Encoding::Ggml(t) => t,
            Encoding::Float(DType::F16) => GgmlDType::F16,
            Encoding::Float(DType::BF16) => GgmlDType::BF16,
            Encoding::Float(_) => GgmlDType::F32,
        }
    }

    /// GGML float types are plain arrays; treat them like safetensors ones.
    pub(super) fn normalized(self) -> Self {
        match self {
            Encoding::Ggml(GgmlDType::F32) => Encoding::Float(DType::F32),
            Encoding::Ggml(GgmlDType::F16) => Encoding::Float(DType::F16),
            Encoding::Ggml(GgmlDType::BF16) => Encoding::Float(DType::BF16),
            other => other,
        }
    }
}

/// A tensor located in a file and checked to lie within it.
pub(super) struct RawTensor<'a> {
    pub(super) file: &'a File,
    /// The file, for errors.
    pub(super) shown: &'a str,
    pub(super) name: String,
    /// candle order: `[out, in]` for matrices.
    pub(super) dims: Vec<usize>,
    /// Absolute offset of the first byte.
    pub(super) start: u64,
    pub(super) encoding: Encoding,
}

impl RawTensor<'_> {
    pub(super) fn err(&self, detail: impl Into<String>) -> EngineError {
        EngineError::Tensor {
            path: self.shown.to_string(),
            tensor: self.name.clone(),
            detail: detail.into(),
        }
    }

    pub(super) fn expect_dims(&self, expect: &[usize]) -> Result<()> {
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
    pub(super) fn read_block(
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

    pub(super) fn is_ggml(&self, dtype: GgmlDType) -> bool {
        self.encoding == Encoding::Ggml(dtype)
    }

    /// Rows `rows`, columns `cols` as a weight matrix. `rope_head_dim` marks
    /// GGUF q/k rows to put back into HF order (heads of that size).
    pub(super) fn matrix(
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
        let format = format.for_stored(self.encoding.stored(), Kernels::detect());
        match self.encoding.normalized() {
            Encoding::Float(dtype) => {
                let t = Tensor::from_raw_buffer(bytes.as_slice(), dtype, &dims, &Device::Cpu)
                    .and_then(|t| t.to_dtype(DType::F32))
                    .map_err(|e| self.err(e.to_string()))?;
                drop(bytes);
                self.finish_dense(t, format)
            }
            Encoding::Ggml(GgmlDType::Q8_0) if format == WeightFormat::Q8_0 && aligned => {
                ggml_file::qtensor_from_ggml(
                    GgmlDType::Q8_0,
                    bytes.as_slice(),
                    dims.to_vec(),
                    &Device::Cpu,
                )
                .and_then(blocks_linear)
                .map_err(|e| self.err(e.to_string()))
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
                    return blocks_linear(q).map_err(|e| self.err(e.to_string()));
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
    pub(super) fn finish_dense(&self, t: Tensor, format: WeightFormat) -> Result<Linear> {
        let row_len = t.dims().last().copied().unwrap_or(0);
        if format != WeightFormat::Q8_0 || !row_len.is_multiple_of(GgmlDType::Q8_0.block_size()) {
            return Ok(Linear::Dense(t));
        }
        QTensor::quantize(&t, GgmlDType::Q8_0)
            .and_then(blocks_linear)
            .map_err(|e| self.err(e.to_string()))
    }

    /// A 1-D tensor (norm weights) as f32.
    pub(super) fn vector(&self) -> Result<Tensor> {
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
            Linear::Quantized(_) | Linear::Tiled(_) => Err(self.err("unexpected quantized vector")),
        }
    }

    /// The whole matrix as an embedding table in its compact stored form.
    pub(super) fn embedding(&self) -> Result<Embedding> {
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

/// Blocks as a `Linear`: Q8_0 in VNNI tiles where the CPU has them
/// (`q8tiles`), otherwise candle's `QMatMul`.
pub(super) fn blocks_linear(q: QTensor) -> candle_core::Result<Linear> {
    match PackedQ8::from_q8_0(&q) {
        Some(packed) => Ok(Linear::Tiled(Arc::new(packed?))),
        None => QMatMul::from_qtensor(q).map(Linear::Quantized),
    }
}

/// Whether candle's CPU `QMatMul` can multiply rows of `k` elements of
/// `dtype`. Its Q4_1, Q5_0 and Q5_1 dot products `debug_assert!` an even
/// number of blocks per row (a ggml SIMD heritage; the portable code is
/// correct either way), so a debug build would panic inside candle's thread
/// pool on, e.g., a tensor-parallel slice of one block. Such matrices are
/// dequantized instead: exact, only larger.
pub(super) fn qmatmul_supports(dtype: GgmlDType, k: usize) -> bool {
    let blocks = k / dtype.block_size().max(1);
    match dtype {
        GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 => blocks.is_multiple_of(2),
        _ => true,
    }
}

/// Undoes llama.cpp's q/k permutation. Within each head the converter did
/// `w.reshape(2, hd/2, in).swapaxes(0, 1)`, so HF row `j` of a head sits at
/// GGUF row `2 * (j % (hd/2)) + j / (hd/2)`.
pub(super) fn unpermute_rope_rows(
    bytes: &AlignedBytes,
    row_len: usize,
    head_dim: usize,
) -> AlignedBytes {
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
pub(super) struct AlignedBytes {
    pub(super) words: Vec<u64>,
    pub(super) len: usize,
}

impl AlignedBytes {
    pub(super) fn zeroed(len: usize) -> Self {
        AlignedBytes {
            words: vec![0; len.div_ceil(8)],
            len,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn as_slice(&self) -> &[u8] {
        // SAFETY: `words` holds `len.div_ceil(8) * 8 >= len` initialised
        // bytes; u8 has no alignment or validity requirements; the slice
        // borrows `self`, so the vector cannot be freed or moved meanwhile.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), self.len) }
    }

    pub(super) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and the exclusive borrow of `self`
        // makes this the only reference to the bytes.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast::<u8>(), self.len) }
    }
}
#[cfg(test)]
mod tests {
    use super::*;

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
