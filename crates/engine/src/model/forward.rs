//! One step of a shard over a batch of sequences.
//!
//! The rows of every sequence in the step are stacked into one
//! `[tokens, hidden]` input, so each weight matrix is read once per step
//! rather than once per sequence (the quantized matmuls tile over rows).
//! What is per sequence stays per sequence: RoPE at its own positions,
//! attention against its own KV cache with its own causal mask, and which
//! logits it wants.
//!
//! Invariants:
//! * Batch independence: a sequence's rows go through exactly the
//!   per-row operations (norms, projections) and the per-sequence
//!   attention they would alone; nothing mixes rows of two sequences. Any
//!   difference from running it alone comes from a matmul kernel whose
//!   per-row summation order depends on how many rows it is given, never
//!   from the batching itself. Quantized weights are multiplied row by row
//!   (each input row quantized on its own), so there is none.
//! * Chunking independence: queries attend in blocks cut at multiples of
//!   [`ATTENTION_BLOCK`] positions, so the attention matmuls have the same
//!   shapes however a prompt is cut into steps, as long as every cut falls
//!   on a multiple of the block.
//! * Every sequence's cache must be usable (same shard, not poisoned) and
//!   its positions within the context before anything is computed; a step
//!   that fails part-way poisons the caches of all its sequences.
//! * A batch of one is the single-sequence forward: `Shard::forward_logits`
//!   is this function on one sequence.

use candle_core::{Device, Tensor};

use super::cache::KvCache;
use super::{AllReduce, Layer, Logits, Shard, StageInput};
use crate::error::{EngineError, Result};
use crate::pool::SharedOut;

/// One sequence's part of a batched step: its next `len` rows of the input,
/// at the positions that follow what its cache holds.
pub struct SeqStep<'a> {
    pub cache: &'a mut KvCache,
    pub len: usize,
    pub logits: Logits,
}

/// What a batched step produces.
#[derive(Debug, Clone)]
pub enum BatchOutput {
    /// `[tokens, hidden]` f32 activations for the next stage, the
    /// sequences' rows in the order given.
    Hidden(Tensor),
    /// Per sequence, in the order given: `[vocab]` for [`Logits::Last`],
    /// `[len, vocab]` for [`Logits::All`].
    Logits(Vec<Tensor>),
}

/// Queries attend in blocks of this many positions, cut at multiples of it
/// from position 0, whatever the step holds: a prompt chunked as a
/// scheduler pleases gets the attention of any other chunking whose chunks
/// are multiples of it (see the batch-independence invariant).
pub const ATTENTION_BLOCK: usize = 16;

/// Where one sequence's rows sit in the batch, and its positions.
struct Segment {
    row: usize,
    len: usize,
    pos: usize,
    blocks: Vec<Block>,
}

/// Rows `start..start+len` of a segment that attend together; the causal
/// (and sliding-window) mask of a block of more than one position.
struct Block {
    start: usize,
    len: usize,
    mask: Option<Tensor>,
}

/// The blocks of positions `pos..pos+len`: cut at multiples of
/// [`ATTENTION_BLOCK`]; `(start, len)` relative to `pos`.
fn blocks_of(pos: usize, len: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut at = pos;
    while at < pos + len {
        let end = ((at / ATTENTION_BLOCK + 1) * ATTENTION_BLOCK).min(pos + len);
        out.push((at - pos, end - at));
        at = end;
    }
    out
}

impl Shard {
    /// Runs this shard's layers on `input`, the rows of `seqs` stacked in
    /// order, each sequence at the positions after what its cache holds;
    /// updates every cache.
    pub fn forward_batch(
        &self,
        input: StageInput,
        seqs: &mut [SeqStep<'_>],
        all_reduce: &mut dyn AllReduce,
    ) -> Result<BatchOutput> {
        if seqs.is_empty() {
            return Err(EngineError::Compute("forward on an empty batch".into()));
        }
        for s in seqs.iter() {
            self.check_cache(s.cache)?;
            if s.len == 0 {
                return Err(EngineError::Compute("forward on an empty input".into()));
            }
            let pos = s.cache.seq_len;
            if pos + s.len > self.cfg.max_position_embeddings {
                return Err(EngineError::Compute(format!(
                    "positions {pos}..{} exceed the model's context of {} positions",
                    pos + s.len,
                    self.cfg.max_position_embeddings
                )));
            }
        }
        let x = self.stage_input(input)?;
        let rows = x.dim(0)?;
        let total: usize = seqs.iter().map(|s| s.len).sum();
        if rows != total {
            return Err(EngineError::Compute(format!(
                "the batch input has {rows} rows but its sequences take {total}"
            )));
        }
        let mut segments = Vec::with_capacity(seqs.len());
        let mut row = 0;
        for s in seqs.iter() {
            let pos = s.cache.seq_len;
            let mut blocks = Vec::new();
            for (start, len) in blocks_of(pos, s.len) {
                // A one-position block goes to the decode kernel, which
                // applies the sliding window itself: it needs no mask.
                let mask = (len > 1)
                    .then(|| causal_mask(len, pos + start, self.cfg.sliding_window, &self.device))
                    .transpose()?;
                blocks.push(Block { start, len, mask });
            }
            segments.push(Segment {
                row,
                len: s.len,
                pos,
                blocks,
            });
            row += s.len;
        }
        for s in seqs.iter_mut() {
            s.cache.poisoned = true;
        }
        let positions: Vec<usize> = segments.iter().flat_map(|g| g.pos..g.pos + g.len).collect();
        let rope = self.rope_tables(&positions)?;
        let out = self.run_layers(x, &segments, &rope, seqs, all_reduce)?;
        for s in seqs.iter_mut() {
            s.cache.seq_len += s.len;
            s.cache.poisoned = false;
        }
        Ok(out)
    }

    fn check_cache(&self, cache: &KvCache) -> Result<()> {
        if cache.layers.len() != self.layers.len() {
            return Err(EngineError::Compute(format!(
                "kv cache has {} layers, shard has {}: it belongs to another shard",
                cache.layers.len(),
                self.layers.len()
            )));
        }
        if cache.poisoned {
            return Err(EngineError::Compute(
                "kv cache is unusable after a failed forward; clear it".into(),
            ));
        }
        Ok(())
    }

    fn run_layers(
        &self,
        mut x: Tensor,
        segments: &[Segment],
        rope: &(Tensor, Tensor),
        seqs: &mut [SeqStep<'_>],
        all_reduce: &mut dyn AllReduce,
    ) -> Result<BatchOutput> {
        let eps = self.cfg.rms_norm_eps as f32;
        let tp = self.spec.tp_degree > 1;
        for (l, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
            let mut attn = self.attention(l, layer, &h, segments, rope, seqs)?;
            if tp {
                attn = all_reduce.all_reduce_sum(&attn)?;
            }
            x = (x + attn)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, eps)?;
            let gate = layer.gate_proj.forward(&h)?.silu()?;
            let up = layer.up_proj.forward(&h)?;
            let mut mlp = layer.down_proj.forward(&(gate * up)?)?;
            if tp {
                mlp = all_reduce.all_reduce_sum(&mlp)?;
            }
            x = (x + mlp)?;
        }
        let (Some(norm), Some(lm_head)) = (&self.final_norm, &self.lm_head) else {
            return Ok(BatchOutput::Hidden(x));
        };
        // The rows whose logits are wanted, gathered so the lm_head (the
        // largest matrix) is read once.
        let picked: Vec<(usize, usize)> = segments
            .iter()
            .zip(seqs.iter())
            .map(|(g, s)| match s.logits {
                Logits::Last => (g.row + g.len - 1, 1),
                Logits::All => (g.row, g.len),
            })
            .collect();
        let mut parts = picked
            .iter()
            .map(|&(row, n)| x.narrow(0, row, n))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let rows = match parts.len() {
            1 => parts.pop().expect("one part"),
            _ => Tensor::cat(&parts, 0)?,
        };
        let rows = candle_nn::ops::rms_norm(&rows, norm, eps)?;
        let logits = lm_head.forward(&rows)?;
        let mut out = Vec::with_capacity(picked.len());
        let mut at = 0;
        for ((_, n), s) in picked.iter().zip(seqs.iter()) {
            let part = logits.narrow(0, at, *n)?;
            out.push(match s.logits {
                Logits::Last => part.squeeze(0)?,
                Logits::All => part,
            });
            at += n;
        }
        Ok(BatchOutput::Logits(out))
    }

    /// Grouped-query attention of this rank's heads, each sequence against
    /// its own cache of layer `l`; returns the `o_proj` output of the whole
    /// batch, a partial sum when tensor parallel.
    fn attention(
        &self,
        l: usize,
        layer: &Layer,
        h: &Tensor,
        segments: &[Segment],
        rope: &(Tensor, Tensor),
        seqs: &mut [SeqStep<'_>],
    ) -> Result<Tensor> {
        let rows = h.dim(0)?;
        let hd = self.cfg.head_dim;
        let (n_heads, n_kv) = (self.local_heads, self.local_kv_heads);
        let (mut q, mut k, mut v) = (
            layer.q_proj.forward(h)?,
            layer.k_proj.forward(h)?,
            layer.v_proj.forward(h)?,
        );
        if let Some([qb, kb, vb]) = &layer.qkv_bias {
            q = q.broadcast_add(qb)?;
            k = k.broadcast_add(kb)?;
            v = v.broadcast_add(vb)?;
        }
        if let Some([qn, kn]) = &layer.qk_norm {
            // RMSNorm over each head's own `head_dim` values.
            let eps = self.cfg.rms_norm_eps as f32;
            let per_head = |t: Tensor, heads: usize, w: &Tensor| -> candle_core::Result<Tensor> {
                candle_nn::ops::rms_norm(&t.reshape((rows * heads, hd))?, w, eps)?
                    .reshape((rows, heads * hd))
            };
            q = per_head(q, n_heads, qn)?;
            k = per_head(k, n_kv, kn)?;
        }
        // [rows, heads*hd] -> [heads, rows, hd], the layout rope and the
        // per-head matmuls want; RoPE of every row at its own position.
        let heads_first = |t: Tensor, heads: usize| -> candle_core::Result<Tensor> {
            t.reshape((rows, heads, hd))?.transpose(0, 1)?.contiguous()
        };
        let rope_all = |t: Tensor| -> candle_core::Result<Tensor> {
            candle_nn::rotary_emb::rope(&t.unsqueeze(0)?, &rope.0, &rope.1)?.squeeze(0)
        };
        let q = rope_all(heads_first(q, n_heads)?)?;
        let k = rope_all(heads_first(k, n_kv)?)?;
        let v = heads_first(v, n_kv)?;
        // Heads sharing a kv head are consecutive (head = kv * rep + r), so
        // grouping q as [kv, rep*rows, hd] multiplies each kv head once
        // instead of materialising repeated keys and values.
        let rep = n_heads / n_kv;
        let width = n_heads * hd;
        // The scale goes on q ([rep*rows, hd]) rather than on the scores
        // ([rep*rows, positions]): one pass over far fewer values.
        let scale = 1.0 / (hd as f64).sqrt();
        let mut out = vec![0f32; rows * width];
        // One-position blocks (decoded tokens), for the decode kernel.
        let mut singles: Vec<(usize, usize, usize)> = Vec::new();
        for (i, (g, s)) in segments.iter().zip(seqs.iter_mut()).enumerate() {
            let (k_all, v_all) = s.cache.layers[l]
                .append(&k.narrow(1, g.row, g.len)?, &v.narrow(1, g.row, g.len)?)?;
            debug_assert_eq!(k_all.dim(1)?, g.pos + g.len);
            for b in &g.blocks {
                let total = g.pos + b.start + b.len;
                if b.len == 1 {
                    singles.push((i, g.row + b.start, total));
                    continue;
                }
                let qb = q
                    .narrow(1, g.row + b.start, b.len)?
                    .contiguous()?
                    .reshape((n_kv, rep * b.len, hd))?;
                let kb = k_all.narrow(1, 0, total)?;
                let vb = v_all.narrow(1, 0, total)?;
                let mut scores = (qb * scale)?.matmul(&kb.t()?)?;
                if let Some(mask) = &b.mask {
                    scores = scores
                        .reshape((n_kv, rep, b.len, total))?
                        .broadcast_add(mask)?
                        .reshape((n_kv, rep * b.len, total))?;
                }
                let probs = candle_nn::ops::softmax_last_dim(&scores)?;
                let part = probs
                    .matmul(&vb)?
                    .reshape((n_heads, b.len, hd))?
                    .transpose(0, 1)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let at = (g.row + b.start) * width;
                out[at..at + part.len()].copy_from_slice(&part);
            }
        }
        if !singles.is_empty() {
            let q = q.flatten_all()?;
            let (q_store, q_layout) = q.storage_and_layout();
            let q_all = cpu_f32(&q_store, q_layout)?;
            // Read views of the caches' key and value buffers.
            let guards: Vec<_> = seqs
                .iter()
                .map(|s| {
                    let c = &s.cache.layers[l];
                    match (&c.k, &c.v) {
                        (Some(k), Some(v)) => {
                            Ok((k.storage_and_layout(), v.storage_and_layout(), k.dim(1)?))
                        }
                        _ => candle_core::bail!("kv cache buffer missing after append"),
                    }
                })
                .collect::<candle_core::Result<_>>()?;
            let mut items = Vec::with_capacity(singles.len());
            for &(i, row, total) in &singles {
                let ((ks, kl), (vs, vl), cap) = &guards[i];
                let from = self
                    .cfg
                    .sliding_window
                    .map_or(0, |w| total.saturating_sub(w));
                items.push(DecodeRow {
                    row,
                    k: cpu_f32(ks, kl)?,
                    v: cpu_f32(vs, vl)?,
                    cap: *cap,
                    from,
                    to: total,
                });
            }
            decode_attention(
                q_all,
                rows,
                n_heads,
                n_kv,
                hd,
                scale as f32,
                &items,
                &mut out,
            );
        }
        let out = Tensor::from_vec(out, (rows, width), &self.device)?;
        Ok(layer.o_proj.forward(&out)?)
    }

    /// cos and sin `[rows, head_dim/2]` for each row's position, computed
    /// in f32 like transformers' LlamaRotaryEmbedding.
    fn rope_tables(&self, positions: &[usize]) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let rows = positions.len();
        let mut cos = Vec::with_capacity(rows * half);
        let mut sin = Vec::with_capacity(rows * half);
        for &p in positions {
            for &f in &self.inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok((
            Tensor::from_vec(cos, (rows, half), &self.device)?,
            Tensor::from_vec(sin, (rows, half), &self.device)?,
        ))
    }
}

/// A contiguous f32 CPU tensor's values.
fn cpu_f32<'a>(
    storage: &'a candle_core::Storage,
    layout: &candle_core::Layout,
) -> candle_core::Result<&'a [f32]> {
    let candle_core::Storage::Cpu(cpu) = storage else {
        candle_core::bail!("attention runs on the CPU");
    };
    let all = cpu.as_slice::<f32>()?;
    if !layout.is_contiguous() {
        candle_core::bail!("attention needs contiguous buffers");
    }
    let start = layout.start_offset();
    Ok(&all[start..start + layout.shape().elem_count()])
}

/// One query row that attends alone (a decoded token): its row of the
/// batch and its cache's keys and values `[kv_heads, cap, head_dim]`, of
/// which it sees positions `from..to`.
struct DecodeRow<'a> {
    row: usize,
    k: &'a [f32],
    v: &'a [f32],
    cap: usize,
    from: usize,
    to: usize,
}

/// Attention of one-position queries against their caches, in plain
/// loops: every decoded token of a batch in one call, where the candle ops
/// of the block path would cost more in per-op overhead than in compute
/// (about thirty small ops per sequence and layer). `q` is `[heads, rows,
/// hd]`; each row's output goes to `out[row * heads * hd..]`. Every
/// one-position block takes this path, alone or batched, so the batch
/// never changes its numbers.
#[allow(clippy::too_many_arguments)]
fn decode_attention(
    q: &[f32],
    rows: usize,
    n_heads: usize,
    n_kv: usize,
    hd: usize,
    scale: f32,
    items: &[DecodeRow<'_>],
    out: &mut [f32],
) {
    let rep = n_heads / n_kv;
    let width = n_heads * hd;
    let out_ptr = SharedOut(out.as_mut_ptr());
    let work = |range: std::ops::Range<usize>| {
        let mut scores = Vec::new();
        let mut acc = vec![0f32; hd];
        for job in range {
            let (item, kv) = (&items[job / n_kv], job % n_kv);
            let keys = &item.k[kv * item.cap * hd..];
            let values = &item.v[kv * item.cap * hd..];
            for r in 0..rep {
                let h = kv * rep + r;
                let qv = &q[(h * rows + item.row) * hd..][..hd];
                scores.clear();
                let mut max = f32::NEG_INFINITY;
                for j in item.from..item.to {
                    let s = dot(qv, &keys[j * hd..][..hd]) * scale;
                    max = max.max(s);
                    scores.push(s);
                }
                let mut sum = 0f32;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                acc.fill(0.0);
                for (p, j) in scores.iter().zip(item.from..item.to) {
                    for (a, &x) in acc.iter_mut().zip(&values[j * hd..][..hd]) {
                        *a += p * x;
                    }
                }
                let at = item.row * width + h * hd;
                for (d, a) in acc.iter().enumerate() {
                    // SAFETY: each (row, head) slot of `out` is written by
                    // exactly one job, and `out` outlives the pool's
                    // execution (it returns when every worker is done).
                    unsafe { *out_ptr.at(at + d) = a / sum };
                }
            }
        }
    };
    candle_core::utils::barrier_pool().execute_chunked(items.len() * n_kv, work);
}

/// A dot product in eight lanes, which the compiler keeps in one vector
/// register.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `[seq, pos+seq]`: 0 where query `i` (at position `pos+i`) may attend to
/// key `j`, minus infinity where `j` lies in its future or, with a sliding
/// `window`, `window` or more positions back.
fn causal_mask(seq: usize, pos: usize, window: Option<usize>, device: &Device) -> Result<Tensor> {
    let total = pos + seq;
    let window = window.unwrap_or(usize::MAX);
    let mask: Vec<f32> = (0..seq)
        .flat_map(|i| {
            (0..total).map(move |j| {
                let q = pos + i;
                if j > q || q - j >= window {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (seq, total), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_cut_at_multiples_of_the_block() {
        let b = ATTENTION_BLOCK;
        assert_eq!(blocks_of(0, 1), [(0, 1)]);
        assert_eq!(blocks_of(0, b), [(0, b)]);
        assert_eq!(blocks_of(0, 2 * b + 3), [(0, b), (b, b), (2 * b, 3)]);
        // A step that starts inside a block finishes that block first.
        assert_eq!(blocks_of(b + 5, b), [(0, b - 5), (b - 5, 5)]);
        // A decoded token is a block of its own.
        assert_eq!(blocks_of(37, 1), [(0, 1)]);
        assert!(blocks_of(9, 0).is_empty());
    }

    #[test]
    fn causal_mask_with_offset() {
        let m = causal_mask(2, 3, None, &Device::Cpu).expect("mask");
        let rows = m.to_vec2::<f32>().expect("rows");
        assert_eq!(rows[0][..4], [0.0; 4]);
        assert!(rows[0][4].is_infinite());
        assert_eq!(rows[1][..5], [0.0; 5]);
    }

    /// A window of 3: position 4 sees positions 2, 3 and 4 only.
    #[test]
    fn sliding_window_mask_hides_positions_a_window_back() {
        let m = causal_mask(2, 3, Some(3), &Device::Cpu).expect("mask");
        let open =
            |row: &[f32]| -> Vec<usize> { (0..row.len()).filter(|&j| row[j] == 0.0).collect() };
        let rows = m.to_vec2::<f32>().expect("rows");
        assert_eq!(open(&rows[0]), [1, 2, 3], "position 3");
        assert_eq!(open(&rows[1]), [2, 3, 4], "position 4");
        let one = causal_mask(1, 5, Some(3), &Device::Cpu).expect("decode mask");
        assert_eq!(open(&one.to_vec2::<f32>().unwrap()[0]), [3, 4, 5]);
    }
}
