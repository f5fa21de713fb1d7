//! Q8_0 matrices multiplied in tiles of 16 rows with AVX-512 VNNI, their
//! activations quantized to Q8_0 the way llama.cpp's x86 build does it.
//!
//! Kept here because candle 0.11 lacks it: candle tiles Q8_0 only for rows
//! of whole 256-value superblocks, and then quantizes activations with one
//! scale per 256 values (Q8_K), which triples the error of a product on
//! real activations (BENCHMARKS.md, "What bounds decode"); any other row
//! length (SmolLM2's 576) goes through its row-at-a-time dot product, 62% of
//! a decode step. Here every row length that is whole 32-value blocks is
//! tiled, and each 32 activations keep their own scale, as in llama.cpp.
//!
//! Layout: tile `t` of block `b` holds rows `16t..16t+16` of weight block
//! `b` (32 columns): the 16 row scales as f32 and the quants offset by +128
//! (u8), arranged `[group of 4 columns][row][4]`, so that one `vpdpbusd`
//! multiplies 4 activations, broadcast, with 4 weights of each of the 16
//! rows. The +128 is taken out exactly with each activation block's sum.
//!
//! Activations (llama.cpp's `quantize_row_q8_0` for AVX2): per 32 values,
//! `amax` = the largest magnitude, the scale is `amax / 127` stored as f16,
//! and each quant is `x * (127 / amax)` rounded half to even.
//!
//! Invariants:
//! * `PackedQ8::forward` computes, for every output, Σ over blocks of
//!   `d_w · d_x · Σ q_w q_x`; the integer sums are exact (at most
//!   32 · 255 · 128 per block), so results differ from the scalar reference
//!   (`tests::reference`) only by f32 rounding of the block sums.
//! * A `PackedQ8` exists only where the CPU has AVX-512 F, BW and VNNI, the
//!   rows are a multiple of 16 and the width a multiple of 32
//!   ([`PackedQ8::from_q8_0`] returns `None` otherwise), so the kernels'
//!   `target_feature`s always hold when they run.
//! * `row(r)` returns exactly candle's dequantization of the stored row.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use half::f16;

use crate::pool::SharedOut;

const TILE: usize = 16;
const BLOCK: usize = 32;
/// Bytes of one GGML Q8_0 block: an f16 scale and 32 quants.
const Q8_0_BYTES: usize = 34;
/// Activation rows one kernel call handles (weights loaded once for all).
const ROWS: usize = 4;

/// 16 rows × 32 columns of Q8_0 weights.
#[derive(Clone)]
#[repr(C, align(64))]
struct Tile {
    qs: [u8; BLOCK * TILE],
    d: [f32; TILE],
}

/// One block of 32 quantized activations.
#[derive(Clone, Copy)]
struct ActBlock {
    /// The 32 quants as eight little-endian words of four: what one
    /// `vpdpbusd` broadcasts, loaded whole (building them byte by byte in
    /// the kernel cost more than the multiplies).
    quads: [i32; BLOCK / 4],
    d: f32,
    /// 128 · Σ qs: what the +128 offset of the weights adds.
    offset: i32,
}

/// An `[n, k]` Q8_0 matrix in VNNI tiles.
pub(crate) struct PackedQ8 {
    n: usize,
    k: usize,
    /// `tiles[t * blocks + b]`.
    tiles: Vec<Tile>,
}

impl std::fmt::Debug for PackedQ8 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedQ8 [{}, {}]", self.n, self.k)
    }
}

/// Whether this CPU runs the tiles; `SHARDVISOR_Q8_TILES=0` turns them off
/// (for side-by-side benchmarks).
pub(crate) fn available() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var("SHARDVISOR_Q8_TILES").as_deref() != Ok("0") && cpu_has_vnni512()
    })
}

#[cfg(target_arch = "x86_64")]
fn cpu_has_vnni512() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_has_vnni512() -> bool {
    false
}

impl PackedQ8 {
    /// Packs a Q8_0 `[n, k]` tensor; `None` where the tiles do not apply
    /// (another type, rows not a multiple of 16, or a CPU without
    /// AVX-512 VNNI).
    pub(crate) fn from_q8_0(q: &QTensor) -> Option<candle_core::Result<PackedQ8>> {
        let (n, k) = q.shape().dims2().ok()?;
        let applies = available()
            && q.dtype() == GgmlDType::Q8_0
            && n > 0
            && n.is_multiple_of(TILE)
            && k > 0
            && k.is_multiple_of(BLOCK);
        applies.then(|| q.data().and_then(|data| Self::from_blocks(&data, n, k)))
    }

    fn from_blocks(data: &[u8], n: usize, k: usize) -> candle_core::Result<PackedQ8> {
        let blocks = k / BLOCK;
        if data.len() != n * blocks * Q8_0_BYTES {
            candle_core::bail!(
                "Q8_0 [{n}, {k}] needs {} bytes, got {}",
                n * blocks * Q8_0_BYTES,
                data.len()
            );
        }
        let empty = Tile {
            qs: [0; BLOCK * TILE],
            d: [0.0; TILE],
        };
        let mut tiles = vec![empty; n / TILE * blocks];
        for (row, row_bytes) in data.chunks_exact(blocks * Q8_0_BYTES).enumerate() {
            let (t, r) = (row / TILE, row % TILE);
            for (b, block) in row_bytes.chunks_exact(Q8_0_BYTES).enumerate() {
                let tile = &mut tiles[t * blocks + b];
                tile.d[r] = f16::from_le_bytes([block[0], block[1]]).to_f32();
                for (c, &q) in block[2..].iter().enumerate() {
                    let (group, j) = (c / 4, c % 4);
                    tile.qs[(group * TILE + r) * 4 + j] = (q as i8 as i16 + 128) as u8;
                }
            }
        }
        Ok(PackedQ8 { n, k, tiles })
    }

    /// `[n, k]`.
    pub(crate) fn dims(&self) -> [usize; 2] {
        [self.n, self.k]
    }

    /// Row `r` dequantized (an embedding lookup); empty past the end.
    pub(crate) fn row(&self, r: usize) -> Vec<f32> {
        if r >= self.n {
            return Vec::new();
        }
        let blocks = self.k / BLOCK;
        let (t, i) = (r / TILE, r % TILE);
        let mut out = Vec::with_capacity(self.k);
        for b in 0..blocks {
            let tile = &self.tiles[t * blocks + b];
            for c in 0..BLOCK {
                let q = i32::from(tile.qs[(c / 4 * TILE + i) * 4 + c % 4]) - 128;
                out.push(q as f32 * tile.d[i]);
            }
        }
        out
    }

    /// `x @ Wᵀ` for `x` of shape `[.., k]` (f32).
    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let Some((&k, lead)) = dims.split_last() else {
            candle_core::bail!("q8 tiles: a scalar input");
        };
        if k != self.k {
            candle_core::bail!("q8 tiles: input width {k}, matrix [{}, {}]", self.n, self.k);
        }
        let m: usize = lead.iter().product();
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let acts = quantize(&xs, k);
        let mut out = vec![0f32; m * self.n];
        self.matmul(&acts, m, &mut out);
        let mut shape = lead.to_vec();
        shape.push(self.n);
        Tensor::from_vec(out, shape, &Device::Cpu)
    }

    /// `out[m, n]` from `m` rows of quantized activations, the row tiles
    /// shared out over candle's worker pool.
    fn matmul(&self, acts: &[ActBlock], m: usize, out: &mut [f32]) {
        let blocks = self.k / BLOCK;
        let n = self.n;
        let out_ptr = SharedOut(out.as_mut_ptr());
        let work = |tiles: std::ops::Range<usize>| {
            for t in tiles {
                let w = &self.tiles[t * blocks..(t + 1) * blocks];
                for m0 in (0..m).step_by(ROWS) {
                    let rows = (m - m0).min(ROWS);
                    let a = &acts[m0 * blocks..(m0 + rows) * blocks];
                    // SAFETY: `available()` held when this matrix was
                    // packed (module invariant), so the CPU has the
                    // kernel's features; each (row, tile) slot of `out` is
                    // written by exactly one call, and `out` outlives the
                    // pool's execution (it returns when every worker is
                    // done).
                    unsafe { tile_kernel(w, a, blocks, rows, out_ptr.at(m0 * n + t * TILE), n) };
                }
            }
        };
        candle_core::utils::barrier_pool().execute_chunked(n / TILE, work);
    }
}

/// `x` (rows of `k`) as Q8_0 blocks, as llama.cpp's AVX2 `quantize_row_q8_0`.
fn quantize(x: &[f32], k: usize) -> Vec<ActBlock> {
    let mut out = Vec::with_capacity(x.len() / BLOCK);
    for row in x.chunks_exact(k) {
        for block in row.chunks_exact(BLOCK) {
            let block: &[f32; BLOCK] = block.try_into().expect("32 values");
            out.push(quantize_block(block));
        }
    }
    out
}

/// One block: with AVX-512 where the tiles run (they only exist where it
/// is, module invariant), else in scalar code; both round the same
/// products half to even, so they agree bit for bit
/// (`tests::vector_and_scalar_quantization_agree`).
fn quantize_block(block: &[f32; BLOCK]) -> ActBlock {
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: `available()` means the CPU has AVX-512 F and BW.
        return unsafe { quantize_block_avx512(block) };
    }
    quantize_block_scalar(block)
}

fn quantize_block_scalar(block: &[f32; BLOCK]) -> ActBlock {
    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = f16::from_f32(amax / 127.0).to_f32();
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut qs = [0i8; BLOCK];
    let mut sum = 0i32;
    for (q, &v) in qs.iter_mut().zip(block) {
        *q = (v * id).round_ties_even() as i8;
        sum += i32::from(*q);
    }
    ActBlock {
        quads: quads_of(&qs),
        d,
        offset: 128 * sum,
    }
}

impl ActBlock {
    /// The quants, one by one (the scalar reference's view).
    #[cfg(test)]
    fn qs(&self) -> [i8; BLOCK] {
        std::array::from_fn(|i| self.quads[i / 4].to_le_bytes()[i % 4] as i8)
    }
}

fn quads_of(qs: &[i8; BLOCK]) -> [i32; BLOCK / 4] {
    std::array::from_fn(|g| {
        i32::from_le_bytes([
            qs[4 * g] as u8,
            qs[4 * g + 1] as u8,
            qs[4 * g + 2] as u8,
            qs[4 * g + 3] as u8,
        ])
    })
}

/// # Safety
/// The CPU has AVX-512 F and BW.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_block_avx512(block: &[f32; BLOCK]) -> ActBlock {
    use std::arch::x86_64::*;
    // SAFETY: `block` holds 32 floats.
    let (a, b) = unsafe {
        (
            _mm512_loadu_ps(block.as_ptr()),
            _mm512_loadu_ps(block.as_ptr().add(16)),
        )
    };
    let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    let d = f16::from_f32(amax / 127.0).to_f32();
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let scale = _mm512_set1_ps(id);
    // The default rounding (MXCSR) is to nearest, ties to even.
    let qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, scale));
    let qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, scale));
    let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
    let mut qs = [0i8; BLOCK];
    // SAFETY: `qs` holds 32 bytes; each store writes 16. The quants lie in
    // [-127, 127], so narrowing keeps them.
    unsafe {
        _mm_storeu_si128(qs.as_mut_ptr().cast(), _mm512_cvtepi32_epi8(qa));
        _mm_storeu_si128(qs.as_mut_ptr().add(16).cast(), _mm512_cvtepi32_epi8(qb));
    }
    ActBlock {
        quads: quads_of(&qs),
        d,
        offset: 128 * sum,
    }
}

/// One row tile (`w`: its `blocks` tiles) against `rows` ≤ 4 activation
/// rows (`a`: `rows × blocks`), into `out + r * stride` for each row `r`.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VNNI; `out + r * stride + 0..16` is valid
/// for writes for every `r < rows`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile_kernel(
    w: &[Tile],
    a: &[ActBlock],
    blocks: usize,
    rows: usize,
    out: *mut f32,
    stride: usize,
) {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); ROWS];
    for (b, tile) in w.iter().enumerate() {
        // SAFETY: `d` holds 16 floats.
        let dw = unsafe { _mm512_loadu_ps(tile.d.as_ptr()) };
        // Two integer accumulators per row: even and odd column groups,
        // so a single row does not wait on one dependency chain.
        let mut even = [_mm512_setzero_si512(); ROWS];
        let mut odd = [_mm512_setzero_si512(); ROWS];
        for g in (0..BLOCK / 4).step_by(2) {
            // SAFETY: `qs` holds 8 groups of 64 bytes; g + 1 < 8.
            let (w0, w1) = unsafe {
                (
                    _mm512_loadu_si512(tile.qs.as_ptr().add(g * 64).cast()),
                    _mm512_loadu_si512(tile.qs.as_ptr().add((g + 1) * 64).cast()),
                )
            };
            for r in 0..rows {
                let quads = &a[r * blocks + b].quads;
                let (x0, x1) = (quads[g], quads[g + 1]);
                even[r] = _mm512_dpbusd_epi32(even[r], w0, _mm512_set1_epi32(x0));
                odd[r] = _mm512_dpbusd_epi32(odd[r], w1, _mm512_set1_epi32(x1));
            }
        }
        for r in 0..rows {
            let act = &a[r * blocks + b];
            let sum = _mm512_sub_epi32(
                _mm512_add_epi32(even[r], odd[r]),
                _mm512_set1_epi32(act.offset),
            );
            acc[r] = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(sum),
                _mm512_mul_ps(dw, _mm512_set1_ps(act.d)),
                acc[r],
            );
        }
    }
    for (r, row) in acc.iter().enumerate().take(rows) {
        // SAFETY: the caller guarantees 16 writable floats per row.
        unsafe { _mm512_storeu_ps(out.add(r * stride), *row) };
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile_kernel(
    _w: &[Tile],
    _a: &[ActBlock],
    _blocks: usize,
    _rows: usize,
    _out: *mut f32,
    _stride: usize,
) {
    unreachable!("PackedQ8 is only built on x86_64 (available() is false elsewhere)")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector quantization of activations is the scalar one, bit for
    /// bit, on values with ties, zeros, large channels and both signs.
    #[test]
    fn vector_and_scalar_quantization_agree() {
        if !available() {
            // Hardware, not a package CI could install: like the other
            // tile tests, a skip with its reason.
            eprintln!("skipped: this CPU lacks AVX-512 VNNI, so only the scalar path runs here");
            return;
        }
        let mut rng = crate::testing::Rng(11);
        let mut cases: Vec<[f32; BLOCK]> = (0..200)
            .map(|i| {
                std::array::from_fn(|j| {
                    let v = rng.next_f32();
                    if j == i % BLOCK {
                        v * 40.0
                    } else {
                        v
                    }
                })
            })
            .collect();
        cases.push([0.0; BLOCK]);
        // Halves after scaling: 127 / amax = 1 when amax = 127.
        cases.push(std::array::from_fn(|j| {
            if j == 0 {
                127.0
            } else {
                j as f32 - 15.5
            }
        }));
        for c in &cases {
            let (v, s) = (quantize_block(c), quantize_block_scalar(c));
            assert_eq!(
                (v.qs(), v.quads, v.d.to_bits(), v.offset),
                (s.qs(), s.quads, s.d.to_bits(), s.offset),
                "{c:?}"
            );
        }
    }

    /// Σ_b d_w d_x Σ q_w q_x in f64, from the Q8_0 bytes and the
    /// activation blocks: what the kernel must compute.
    fn reference(data: &[u8], n: usize, k: usize, acts: &[ActBlock], m: usize) -> Vec<f32> {
        let blocks = k / BLOCK;
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for r in 0..n {
                let mut s = 0f64;
                for b in 0..blocks {
                    let blk = &data[(r * blocks + b) * Q8_0_BYTES..][..Q8_0_BYTES];
                    let dw = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                    let act = &acts[i * blocks + b];
                    let dot: i32 = blk[2..]
                        .iter()
                        .zip(act.qs())
                        .map(|(&w, x)| i32::from(w as i8) * i32::from(x))
                        .sum();
                    s += f64::from(dw) * f64::from(act.d) * f64::from(dot);
                }
                out[i * n + r] = s as f32;
            }
        }
        out
    }

    fn q8_0(n: usize, k: usize, seed: u64) -> QTensor {
        let mut rng = crate::testing::Rng(seed);
        let w = rng.tensor(&[n, k], 0.05, 0.0).expect("weights");
        QTensor::quantize(&w, GgmlDType::Q8_0).expect("quantize")
    }

    #[test]
    fn tiles_compute_the_quantized_product_for_every_shape() {
        if !available() {
            eprintln!("skipped: this CPU lacks AVX-512 VNNI, so the tiles are never used here");
            return;
        }
        for (n, k, m) in [
            (16, 32, 1),
            (48, 576, 1),
            (32, 96, 3),
            (64, 1536, 5),
            (16, 256, 9),
        ] {
            let q = q8_0(n, k, (n * k + m) as u64);
            let packed = PackedQ8::from_q8_0(&q).expect("applies").expect("packs");
            let mut rng = crate::testing::Rng(7 + m as u64);
            let x = rng.tensor(&[m, k], 2.0, 0.0).expect("x");
            let y = packed.forward(&x).expect("forward");
            assert_eq!(y.dims(), [m, n]);
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let want = reference(&q.data().unwrap(), n, k, &quantize(&xs, k), m);
            let got = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let scale = want.iter().fold(0f32, |s, v| s.max(v.abs()));
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-5 * scale,
                    "[{n}, {k}] m {m}: {g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn rows_are_candles_dequantization() {
        if !available() {
            eprintln!("skipped: this CPU lacks AVX-512 VNNI, so the tiles are never used here");
            return;
        }
        let q = q8_0(32, 64, 3);
        let packed = PackedQ8::from_q8_0(&q).expect("applies").expect("packs");
        let dense = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (r, want) in dense.iter().enumerate() {
            assert_eq!(&packed.row(r), want, "row {r}");
        }
        assert!(packed.row(32).is_empty());
    }

    #[test]
    fn activations_quantize_like_llama_cpp() {
        // Half-way values round to even (llama.cpp's x86 `_mm256_round_ps`,
        // unlike candle's and the C reference's half away from zero): with
        // amax 127, x = 2.5 · (127/127) → 2, 3.5 → 4, -0.5 → 0.
        let mut x = vec![0f32; 32];
        x[0] = 127.0;
        x[1] = 2.5;
        x[2] = 3.5;
        x[3] = -0.5;
        x[4] = -1.5;
        let a = quantize(&x, 32);
        assert_eq!(&a[0].qs()[..5], &[127, 2, 4, 0, -2]);
        assert_eq!(a[0].d, 1.0);
        assert_eq!(a[0].offset, 128 * (127 + 2 + 4 - 2));
        // An all-zero block: scale 0, quants 0.
        let z = quantize(&[0f32; 32], 32);
        assert_eq!((z[0].d, z[0].qs(), z[0].offset), (0.0, [0i8; 32], 0));
    }

    #[test]
    fn shapes_the_tiles_cannot_take_are_left_to_candle() {
        for (n, k) in [(15, 32), (16, 48)] {
            let w = Tensor::zeros((n, k), candle_core::DType::F32, &Device::Cpu).unwrap();
            let q = QTensor::quantize(&w, GgmlDType::Q8_0);
            if let Ok(q) = q {
                assert!(PackedQ8::from_q8_0(&q).is_none(), "[{n}, {k}]");
            }
        }
        let w = Tensor::zeros((16, 256), candle_core::DType::F32, &Device::Cpu).unwrap();
        let q4 = QTensor::quantize(&w, GgmlDType::Q4K).unwrap();
        assert!(PackedQ8::from_q8_0(&q4).is_none());
    }
}
