//! One attention layer of SmolLM2's shape (9 query heads, 3 kv heads, head
//! dim 64) at a long context, two ways, side by side in one run: candle's
//! CPU flash attention (`candle_nn::attention::flash_attn`, blockwise with an
//! online softmax) and the materialized path the engine uses (q·kᵀ, softmax,
//! p·v as batched gemm). Prints the median of each.
//!
//!     cargo run --release -p engine --example attention_probe

use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use candle_nn::attention::{flash_attn, AttnMask};

const HEADS: usize = 9;
const KV_HEADS: usize = 3;
const HEAD_DIM: usize = 64;

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let scale = 1.0 / (HEAD_DIM as f64).sqrt();
    for (seq, total) in [(512, 7000), (512, 2048), (1, 7000), (1, 512)] {
        let q = Tensor::randn(0f32, 1.0, (1, seq, HEADS, HEAD_DIM), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (1, total, KV_HEADS, HEAD_DIM), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (1, total, KV_HEADS, HEAD_DIM), &dev)?;
        // The engine's layout: [kv heads, positions, head dim].
        let k_heads = k.squeeze(0)?.transpose(0, 1)?.contiguous()?;
        let v_heads = v.squeeze(0)?.transpose(0, 1)?.contiguous()?;
        let rep = HEADS / KV_HEADS;
        let runs = if seq == 1 { 101 } else { 5 };
        let (mut flash, mut gemm) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let started = Instant::now();
            let out = flash_attn::<f32>(
                &q,
                &k,
                &v,
                scale as f32,
                AttnMask::causal_with_offset(total - seq),
                None,
                None,
            )?;
            out.sum_all()?.to_scalar::<f32>()?;
            flash.push(started.elapsed());

            let started = Instant::now();
            let q_heads = q.squeeze(0)?.transpose(0, 1)?.contiguous()?.reshape((
                KV_HEADS,
                rep * seq,
                HEAD_DIM,
            ))?;
            let scores = (q_heads * scale)?.matmul(&k_heads.t()?)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let out = probs.matmul(&v_heads)?;
            out.sum_all()?.to_scalar::<f32>()?;
            gemm.push(started.elapsed());
        }
        let (flash, gemm) = (median(flash), median(gemm));
        println!(
            "| {seq} | {total} | {flash:.2?} | {gemm:.2?} | {:.1}× |",
            flash.as_secs_f64() / gemm.as_secs_f64()
        );
    }
    Ok(())
}
