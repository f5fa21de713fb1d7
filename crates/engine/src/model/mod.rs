//! The llama decoder, run as one shard: a range of layers (pipeline) and a
//! slice of every layer's heads and FFN columns (tensor parallelism).
//!
//! Invariants:
//! * A shard embeds iff `spec.layers.start == 0` and norms + projects to
//!   logits iff `spec.layers.end == cfg.n_layers`; everything else travels as
//!   `[seq, hidden]` f32 activations between stages.
//! * Tensor rank `r` of degree `d` owns heads `[r*H/d, (r+1)*H/d)`, kv heads
//!   `[r*KV/d, (r+1)*KV/d)` and FFN columns `[r*I/d, (r+1)*I/d)`. Because
//!   `H/d = (H/KV) * (KV/d)`, every local head's kv head is local too, so
//!   attention needs no communication; only the outputs of `o_proj` and
//!   `down_proj` are partial sums, completed by `AllReduce::all_reduce_sum`
//!   before the residual add (the residual stream is replicated on all ranks).
//! * RoPE is HF "rotate half" (`candle_nn::rotary_emb::rope`); loaders hand
//!   over q/k weights in HF row order (GGUF's permutation already undone).
//! * A `KvCache` holds exactly the positions `0..cache.seq_len()` of this
//!   shard's layers and kv heads, for one sequence; `forward` must be called
//!   with `pos == cache.seq_len()`, and a forward that fails part-way
//!   poisons the cache (later calls error) because some layers would hold
//!   one position more than others.
//! * Several sequences step together through `forward_batch` (module
//!   `forward`): their rows share every weight matmul, each keeps its own
//!   cache, positions and mask (batch independence, stated there).
//! * Nothing here panics on bad input: wrong stage input, out-of-vocabulary
//!   ids, positions past the context and mismatched caches are errors.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use crate::config::ModelConfig;
use crate::q8tiles::PackedQ8;

mod cache;
mod forward;
mod spec;

use crate::error::{EngineError, Result};
pub use cache::KvCache;
use cache::LayerCache;
pub use forward::{BatchOutput, SeqStep, ATTENTION_BLOCK};
pub use spec::ShardSpec;

/// Sums the partial results of the ranks of a tensor-parallel group. Every
/// rank calls it the same number of times in the same order (twice per
/// layer); the result must be bit-identical on all ranks so that their
/// replicated residual streams, and so their sampled tokens, never diverge.
pub trait AllReduce {
    fn all_reduce_sum(&mut self, partial: &Tensor) -> Result<Tensor>;
}

/// The all-reduce of a group of one: the identity. `Shard::forward` does not
/// call the all-reduce at all when `tp_degree` is 1, so this is what callers
/// pass then.
pub struct NoAllReduce;

impl AllReduce for NoAllReduce {
    fn all_reduce_sum(&mut self, partial: &Tensor) -> Result<Tensor> {
        Ok(partial.clone())
    }
}

/// What a stage consumes.
#[derive(Debug, Clone)]
pub enum StageInput {
    /// Token ids, for the first stage.
    Tokens(Vec<u32>),
    /// `[seq, hidden]` f32 activations from the previous stage.
    Hidden(Tensor),
}

/// What a stage produces.
#[derive(Debug, Clone)]
pub enum StageOutput {
    /// `[seq, hidden]` f32 activations for the next stage.
    Hidden(Tensor),
    /// f32 logits: `[vocab]` of the last input position for
    /// [`Logits::Last`], `[seq, vocab]` of every position for
    /// [`Logits::All`].
    Logits(Tensor),
}

/// Which positions a shard that ends the model computes logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// The last one: what the next token is sampled from.
    Last,
    /// Every one: to score each input token given those before it (the
    /// log-probabilities of a prompt).
    All,
}

/// A weight matrix `[out, in]` applied as `x @ W^T`.
#[derive(Debug, Clone)]
pub(crate) enum Linear {
    /// f32 `[out, in]`.
    Dense(Tensor),
    /// GGUF blocks, multiplied without dequantizing.
    Quantized(QMatMul),
    /// Q8_0 blocks in VNNI tiles (`q8tiles`), where the CPU has them.
    Tiled(Arc<PackedQ8>),
}

impl Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Linear::Dense(w) => x.matmul(&w.t()?),
            // QMatMul reads its input as one flat slice.
            Linear::Quantized(q) => q.forward(&x.contiguous()?),
            Linear::Tiled(p) => p.forward(x),
        }
    }

    /// `[out, in]`, for checks.
    pub(crate) fn dims(&self) -> Vec<usize> {
        match self {
            Linear::Dense(w) => w.dims().to_vec(),
            Linear::Tiled(p) => p.dims().to_vec(),
            Linear::Quantized(QMatMul::QTensor(q)) => q.shape().dims().to_vec(),
            Linear::Quantized(QMatMul::Tensor(w) | QMatMul::TensorF16(w)) => w.dims().to_vec(),
        }
    }
}

/// The token embedding lookup table, kept compact: rows are converted to
/// f32 only when looked up.
#[derive(Debug, Clone)]
pub(crate) enum Embedding {
    /// `[vocab, hidden]` in f32, f16 or bf16.
    Dense(Tensor),
    /// `[vocab, hidden]` GGUF blocks.
    Quantized(Arc<QTensor>),
    /// `[vocab, hidden]` Q8_0 blocks in VNNI tiles, shared with a tied
    /// `Linear::Tiled` lm_head.
    Tiled(Arc<PackedQ8>),
}

impl Embedding {
    fn lookup(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Embedding::Dense(t) => t.index_select(ids, 0)?.to_dtype(DType::F32),
            Embedding::Quantized(q) => q.embedding(ids),
            Embedding::Tiled(p) => {
                let ids = ids.flatten_all()?.to_vec1::<u32>()?;
                let [vocab, hidden] = p.dims();
                let mut rows = Vec::with_capacity(ids.len() * hidden);
                for &id in &ids {
                    if id as usize >= vocab {
                        candle_core::bail!("token id {id} is outside the vocabulary of {vocab}");
                    }
                    rows.extend(p.row(id as usize));
                }
                Tensor::from_vec(rows, (ids.len(), hidden), &Device::Cpu)
            }
        }
    }

    pub(crate) fn dims(&self) -> Vec<usize> {
        match self {
            Embedding::Dense(t) => t.dims().to_vec(),
            Embedding::Quantized(q) => q.shape().dims().to_vec(),
            Embedding::Tiled(p) => p.dims().to_vec(),
        }
    }
}

/// One decoder layer's weights, already sliced to this rank.
#[derive(Debug, Clone)]
pub(crate) struct Layer {
    pub(crate) attn_norm: Tensor,
    pub(crate) q_proj: Linear,
    pub(crate) k_proj: Linear,
    pub(crate) v_proj: Linear,
    /// `[rows]` biases of q, k and v, sliced like their rows (`Arch::qkv_bias`).
    pub(crate) qkv_bias: Option<[Tensor; 3]>,
    /// `[head_dim]` RMSNorm weights of every q and k head (`Arch::qk_norm`).
    pub(crate) qk_norm: Option<[Tensor; 2]>,
    pub(crate) o_proj: Linear,
    pub(crate) ffn_norm: Tensor,
    pub(crate) gate_proj: Linear,
    pub(crate) up_proj: Linear,
    pub(crate) down_proj: Linear,
}

/// Everything `Shard::from_parts` needs; built by the loaders.
pub(crate) struct ShardParts {
    pub(crate) embedding: Option<Embedding>,
    pub(crate) layers: Vec<Layer>,
    pub(crate) final_norm: Option<Tensor>,
    pub(crate) lm_head: Option<Linear>,
    /// Per-frequency RoPE factors (`RopeScaling::FreqFactors`).
    pub(crate) rope_factors: Option<Vec<f32>>,
}

/// One shard of a llama-family model, ready to run.
#[derive(Debug)]
pub struct Shard {
    cfg: ModelConfig,
    spec: ShardSpec,
    /// Present iff `spec.has_embedding()`.
    embedding: Option<Embedding>,
    layers: Vec<Layer>,
    /// Both present iff `spec.has_lm_head(cfg)`.
    final_norm: Option<Tensor>,
    lm_head: Option<Linear>,
    /// `1 / theta^(2i / head_dim)` for `i < head_dim / 2`, scaled as the
    /// model says (`arch::rope_inv_freq`).
    inv_freq: Vec<f32>,
    local_heads: usize,
    local_kv_heads: usize,
    device: Device,
    /// What the matrices were stored as and are held as (the load log's
    /// summary); empty for a shard not made by the loader.
    pub(crate) held: String,
}

impl Shard {
    /// What this shard's matrices were stored as and are held as, and which
    /// stayed f32 although the weight format asked for blocks, and why.
    pub fn held(&self) -> &str {
        &self.held
    }

    /// Assembles a shard from loaded weights, checking that they are exactly
    /// what `spec` calls for (a loader bug would otherwise surface as a
    /// shape error in the middle of a task).
    pub(crate) fn from_parts(cfg: ModelConfig, spec: ShardSpec, parts: ShardParts) -> Result<Self> {
        spec.validate(&cfg)?;
        let local_heads = spec.heads(&cfg).len();
        let local_kv_heads = spec.kv_heads(&cfg).len();
        let ffn = spec.ffn_columns(&cfg).len();
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let bad = |what: &str| EngineError::Compute(format!("shard assembly: {what}"));
        if parts.embedding.is_some() != spec.has_embedding()
            || parts.final_norm.is_some() != spec.has_lm_head(&cfg)
            || parts.lm_head.is_some() != spec.has_lm_head(&cfg)
            || parts.layers.len() != spec.layers.len()
        {
            return Err(bad("parts do not match the shard spec"));
        }
        if let Some(e) = &parts.embedding {
            if e.dims() != [cfg.vocab_size, h] {
                return Err(bad(&format!("embedding has shape {:?}", e.dims())));
            }
        }
        if let Some(l) = &parts.lm_head {
            if l.dims() != [cfg.vocab_size, h] {
                return Err(bad(&format!("lm_head has shape {:?}", l.dims())));
            }
        }
        for (i, layer) in parts.layers.iter().enumerate() {
            let expect = [
                (&layer.q_proj, [local_heads * hd, h]),
                (&layer.k_proj, [local_kv_heads * hd, h]),
                (&layer.v_proj, [local_kv_heads * hd, h]),
                (&layer.o_proj, [h, local_heads * hd]),
                (&layer.gate_proj, [ffn, h]),
                (&layer.up_proj, [ffn, h]),
                (&layer.down_proj, [h, ffn]),
            ];
            for (linear, dims) in expect {
                if linear.dims() != dims {
                    return Err(bad(&format!(
                        "layer {} has a projection of shape {:?}, expected {dims:?}",
                        spec.layers.start + i,
                        linear.dims()
                    )));
                }
            }
            let vectors = layer
                .qkv_bias
                .iter()
                .flat_map(|[q, k, v]| {
                    [
                        (q, local_heads * hd),
                        (k, local_kv_heads * hd),
                        (v, local_kv_heads * hd),
                    ]
                })
                .chain(layer.qk_norm.iter().flat_map(|[q, k]| [(q, hd), (k, hd)]));
            for (t, len) in vectors {
                if t.dims() != [len] {
                    return Err(bad(&format!(
                        "layer {} has a bias or norm of shape {:?}, expected [{len}]",
                        spec.layers.start + i,
                        t.dims()
                    )));
                }
            }
            if layer.qkv_bias.is_some() != cfg.arch.qkv_bias
                || layer.qk_norm.is_some() != cfg.arch.qk_norm
            {
                return Err(bad("biases or q/k norms do not match the architecture"));
            }
        }
        let inv_freq = crate::arch::rope_inv_freq(
            cfg.rope_theta,
            hd,
            &cfg.rope_scaling,
            parts.rope_factors.as_deref(),
        )?;
        Ok(Shard {
            embedding: parts.embedding,
            layers: parts.layers,
            final_norm: parts.final_norm,
            lm_head: parts.lm_head,
            inv_freq,
            local_heads,
            local_kv_heads,
            device: Device::Cpu,
            held: String::new(),
            cfg,
            spec,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn spec(&self) -> &ShardSpec {
        &self.spec
    }

    /// An empty cache for one task on this shard.
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: vec![LayerCache::default(); self.layers.len()],
            seq_len: 0,
            poisoned: false,
        }
    }

    /// Runs this shard's layers on `input` at positions `pos..pos+seq`
    /// (prefill when seq > 1, decode when 1), updating `cache`; a shard that
    /// ends the model returns the last position's logits.
    pub fn forward(
        &self,
        input: StageInput,
        pos: usize,
        cache: &mut KvCache,
        all_reduce: &mut dyn AllReduce,
    ) -> Result<StageOutput> {
        self.forward_logits(input, pos, cache, all_reduce, Logits::Last)
    }

    /// [`Shard::forward`], with the logits of the positions `logits` names:
    /// a batch of one sequence ([`Shard::forward_batch`]).
    pub fn forward_logits(
        &self,
        input: StageInput,
        pos: usize,
        cache: &mut KvCache,
        all_reduce: &mut dyn AllReduce,
        logits: Logits,
    ) -> Result<StageOutput> {
        if pos != cache.seq_len {
            return Err(EngineError::Compute(format!(
                "forward at position {pos} but the kv cache holds {} positions",
                cache.seq_len
            )));
        }
        let len = match &input {
            StageInput::Tokens(ids) => ids.len(),
            StageInput::Hidden(t) => t.dims().first().copied().unwrap_or(0),
        };
        let mut seqs = [SeqStep { cache, len, logits }];
        Ok(match self.forward_batch(input, &mut seqs, all_reduce)? {
            BatchOutput::Hidden(h) => StageOutput::Hidden(h),
            BatchOutput::Logits(mut l) => StageOutput::Logits(
                l.pop()
                    .ok_or_else(|| EngineError::Compute("a batch of one gave no logits".into()))?,
            ),
        })
    }

    /// Turns the stage input into `[seq, hidden]` f32, checking that it is
    /// the kind of input this stage takes.
    fn stage_input(&self, input: StageInput) -> Result<Tensor> {
        match (input, &self.embedding) {
            (StageInput::Tokens(ids), Some(embedding)) => {
                if let Some(bad) = ids.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
                    return Err(EngineError::Compute(format!(
                        "token id {bad} is outside the vocabulary of {}",
                        self.cfg.vocab_size
                    )));
                }
                let n = ids.len();
                let ids = Tensor::from_vec(ids, n, &self.device)?;
                Ok(embedding.lookup(&ids)?)
            }
            (StageInput::Tokens(_), None) => Err(EngineError::Compute(format!(
                "stage with layers {:?} takes hidden states, got token ids",
                self.spec.layers
            ))),
            (StageInput::Hidden(_), Some(_)) => Err(EngineError::Compute(
                "the first stage takes token ids, got hidden states".into(),
            )),
            (StageInput::Hidden(t), None) => {
                let ok = t.dtype() == DType::F32
                    && t.rank() == 2
                    && t.dim(1).ok() == Some(self.cfg.hidden_size);
                if !ok {
                    return Err(EngineError::Compute(format!(
                        "hidden states must be [seq, {}] f32, got {:?} {:?}",
                        self.cfg.hidden_size,
                        t.dims(),
                        t.dtype()
                    )));
                }
                Ok(t)
            }
        }
    }
}
