//! The attention keys and values of one task on one shard.

use candle_core::{DType, Tensor};

/// The keys and values of one layer: buffers `[kv_heads, capacity, head_dim]`
/// of which the first `len` positions are valid.
#[derive(Debug, Clone, Default)]
pub(super) struct LayerCache {
    pub(super) k: Option<Tensor>,
    pub(super) v: Option<Tensor>,
    pub(super) len: usize,
}

/// The smallest buffer a layer cache starts with, in positions; it doubles
/// when full so decoding copies O(n) in total instead of O(n^2) with `cat`.
pub(super) const MIN_CACHE_CAPACITY: usize = 64;

impl LayerCache {
    /// Appends `[kv_heads, seq, head_dim]` keys and values; returns views of
    /// all valid positions.
    pub(super) fn append(
        &mut self,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let seq = k.dim(1)?;
        let needed = self.len + seq;
        self.k = Some(grow_and_set(self.k.take(), k, self.len, needed)?);
        self.v = Some(grow_and_set(self.v.take(), v, self.len, needed)?);
        self.len = needed;
        match (&self.k, &self.v) {
            (Some(k_all), Some(v_all)) => {
                Ok((k_all.narrow(1, 0, needed)?, v_all.narrow(1, 0, needed)?))
            }
            _ => candle_core::bail!("kv cache buffer missing after append"),
        }
    }
}

/// Writes `new` at position `len` of `buf` (dim 1), growing `buf` first when
/// it cannot hold `needed` positions.
pub(super) fn grow_and_set(
    buf: Option<Tensor>,
    new: &Tensor,
    len: usize,
    needed: usize,
) -> candle_core::Result<Tensor> {
    let (heads, _, head_dim) = new.dims3()?;
    let capacity = buf.as_ref().map(|b| b.dim(1)).transpose()?.unwrap_or(0);
    let buf = match buf {
        Some(b) if capacity >= needed => b,
        old => {
            let new_capacity = needed.max(2 * capacity).max(MIN_CACHE_CAPACITY);
            let grown = Tensor::zeros((heads, new_capacity, head_dim), DType::F32, new.device())?;
            if let Some(old) = old {
                if len > 0 {
                    grown.slice_set(&old.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
                }
            }
            grown
        }
    };
    buf.slice_set(&new.contiguous()?, 1, len)?;
    Ok(buf)
}

/// The attention keys and values of one task on one shard: only this
/// shard's layers and kv heads.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub(super) layers: Vec<LayerCache>,
    pub(super) seq_len: usize,
    pub(super) poisoned: bool,
}

impl KvCache {
    /// Positions held (the next forward must start at this position).
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Forgets every position, so the cache can serve a new task.
    pub fn clear(&mut self) {
        for layer in &mut self.layers {
            *layer = LayerCache::default();
        }
        self.seq_len = 0;
        self.poisoned = false;
    }
}
