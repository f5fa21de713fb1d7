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

    /// A copy of the first `len` positions, sharing no storage with this
    /// cache: a prompt prefix kept for reuse, or a new task's start from
    /// one. Appending to either never changes the other.
    pub fn prefix(&self, len: usize) -> candle_core::Result<KvCache> {
        if self.poisoned {
            candle_core::bail!("a cache whose last step failed cannot be copied");
        }
        if len > self.seq_len {
            candle_core::bail!(
                "a prefix of {len} positions from a cache of {}",
                self.seq_len
            );
        }
        let copy = |t: &Option<Tensor>| -> candle_core::Result<Option<Tensor>> {
            match t {
                Some(t) if len > 0 => {
                    let (heads, _, head_dim) = t.dims3()?;
                    let out = Tensor::zeros((heads, len, head_dim), DType::F32, t.device())?;
                    out.slice_set(&t.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
                    Ok(Some(out))
                }
                _ => Ok(None),
            }
        };
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(LayerCache {
                    k: copy(&l.k)?,
                    v: copy(&l.v)?,
                    len: len.min(l.len),
                })
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(KvCache {
            layers,
            seq_len: len,
            poisoned: false,
        })
    }

    /// Bytes its valid positions take.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| [&l.k, &l.v])
            .flatten()
            .map(|t| t.elem_count() * 4)
            .sum()
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn cache_of(positions: usize) -> KvCache {
        let mut layer = LayerCache::default();
        let k = Tensor::arange(0f32, (2 * positions * 4) as f32, &Device::Cpu)
            .unwrap()
            .reshape((2, positions, 4))
            .unwrap();
        layer.append(&k, &(k.clone() * 10.0).unwrap()).unwrap();
        KvCache {
            layers: vec![layer],
            seq_len: positions,
            poisoned: false,
        }
    }

    #[test]
    fn a_prefix_is_a_copy_that_appends_never_reach() {
        let mut cache = cache_of(40);
        let prefix = cache.prefix(32).unwrap();
        assert_eq!(prefix.seq_len(), 32);
        let k = |c: &KvCache, n: usize| {
            c.layers[0]
                .k
                .as_ref()
                .unwrap()
                .narrow(1, 0, n)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(k(&prefix, 32), k(&cache, 32), "the same first 32 positions");
        assert_eq!(
            prefix.bytes(),
            2 * 2 * 32 * 4 * 4,
            "exactly 32 positions of k and v"
        );
        // The cache's buffer has room beyond 40 positions: appending writes
        // into it in place, and must not show in the prefix.
        let mut forked = prefix.prefix(32).unwrap();
        let new = Tensor::ones((2, 1, 4), DType::F32, &Device::Cpu).unwrap();
        forked.layers[0].append(&new, &new).unwrap();
        cache.layers[0].append(&new, &new).unwrap();
        assert_eq!(
            k(&prefix, 32),
            k(&cache_of(40), 32),
            "the kept prefix did not change"
        );
        assert!(cache_of(8).prefix(9).is_err(), "longer than the cache");
    }
}
