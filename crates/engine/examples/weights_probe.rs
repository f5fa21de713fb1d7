//! Which way to hold a weight matrix of each GGUF stored type, measured:
//! one 2048×2048 matrix (rows a multiple of 256, so every block type
//! applies) multiplied by 1 row (a decode step) and by 128 rows (a prefill
//! chunk), four ways side by side in one run:
//!
//! * `kept`: the stored blocks as candle `QMatMul` (its SIMD dot product
//!   where it has one, portable code otherwise);
//! * `q8_0`: the same weights dequantized and requantized to Q8_0 at load;
//! * `f32`: dequantized to an f32 matrix (batched gemm);
//! * `f16`: dequantized to an f16 matrix (gemm in f16; float files only).
//!
//! Prints a markdown table of medians; `loader::WeightFormat::Auto` follows
//! it (see BENCHMARKS.md).
//!
//! A second table is about rows whose length is not a multiple of 256
//! (SmolLM2's 576): candle tiles Q8_0 only for whole 256-column rows, so it
//! times such a matrix as it is and padded with zero columns to the next
//! 256, and gives each one's error against the exact f32 product for
//! activations with a few large channels, as real models have.
//!
//!     cargo run --release -p engine --example weights_probe

use std::time::{Duration, Instant};

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

const N: usize = 2048;
const K: usize = 2048;

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn time(m: usize, f: &dyn Fn() -> candle_core::Result<Tensor>) -> candle_core::Result<Duration> {
    let runs = if m == 1 { 201 } else { 11 };
    f()?; // warm-up: thread pool, scratch buffers
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        let out = f()?;
        out.sum_all()?.to_scalar::<f32>()?;
        samples.push(started.elapsed());
    }
    Ok(median(samples))
}

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 0.02, (N, K), &dev)?;
    let types = [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
        GgmlDType::Q2K,
        GgmlDType::Q3K,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
        GgmlDType::F16,
        GgmlDType::BF16,
    ];
    println!(
        "| stored | rows | kept µs | q8_0 µs | f32 µs | f16 µs | kept vs q8_0 |\n|---|---|---|---|---|---|---|"
    );
    for dtype in types {
        let stored = QTensor::quantize(&w, dtype)?;
        let dense = stored.dequantize(&dev)?;
        let float = matches!(dtype, GgmlDType::F16 | GgmlDType::BF16);
        let kept = (!float)
            .then(|| QMatMul::from_qtensor(stored))
            .transpose()?;
        let q8 = QMatMul::from_qtensor(QTensor::quantize(&dense, GgmlDType::Q8_0)?)?;
        let dense_t = dense.t()?;
        let half_t = dense.to_dtype(DType::F16)?.t()?;
        for m in [1, 128] {
            let x = Tensor::randn(0f32, 1.0, (m, K), &dev)?;
            let us = |d: Duration| format!("{:.0}", d.as_secs_f64() * 1e6);
            let t_q8 = time(m, &|| q8.forward(&x))?;
            let t_f32 = time(m, &|| x.matmul(&dense_t))?;
            let (kept_us, ratio) = match &kept {
                Some(kept) => {
                    let t = time(m, &|| kept.forward(&x))?;
                    (
                        us(t),
                        format!("{:.2}×", t.as_secs_f64() / t_q8.as_secs_f64()),
                    )
                }
                None => ("–".into(), "–".into()),
            };
            let half = if float {
                us(time(m, &|| {
                    x.to_dtype(DType::F16)?
                        .matmul(&half_t)?
                        .to_dtype(DType::F32)
                })?)
            } else {
                "–".into()
            };
            println!(
                "| {dtype:?} | {m} | {kept_us} | {} | {} | {half} | {ratio} |",
                us(t_q8),
                us(t_f32)
            );
        }
    }
    padded_rows(&dev)?;
    Ok(())
}

/// Max |error| against the exact product, relative to its max |value|.
fn rel_err(y: &Tensor, exact: &Tensor) -> candle_core::Result<f32> {
    let e = (y - exact)?.abs()?.max_all()?.to_scalar::<f32>()?;
    Ok(e / exact.abs()?.max_all()?.to_scalar::<f32>()?)
}

fn padded_rows(dev: &Device) -> candle_core::Result<()> {
    println!(
        "\n| rows × width | x rows | as is µs | padded to 256s µs | as is error | padded error |\n|---|---|---|---|---|---|"
    );
    for (n, k) in [(1536usize, 576usize), (576, 576), (49152, 576)] {
        let padded_k = k.next_multiple_of(256);
        let w = Tensor::randn(0f32, 0.02, (n, k), dev)?;
        let plain = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q8_0)?)?;
        let padded = QMatMul::from_qtensor(QTensor::quantize(
            &w.pad_with_zeros(1, 0, padded_k - k)?,
            GgmlDType::Q8_0,
        )?)?;
        let w_q = QTensor::quantize(&w, GgmlDType::Q8_0)?.dequantize(dev)?;
        for m in [1, 32] {
            // A few channels 50× larger than the rest (the outlier
            // channels of trained transformers).
            let spikes = Tensor::from_vec(
                (0..k)
                    .map(|i| if i % 97 == 5 { 50f32 } else { 1.0 })
                    .collect::<Vec<_>>(),
                k,
                dev,
            )?;
            let x = Tensor::randn(0f32, 1.0, (m, k), dev)?.broadcast_mul(&spikes)?;
            let x_padded = x.pad_with_zeros(1, 0, padded_k - k)?;
            let exact = x.matmul(&w_q.t()?)?;
            let t_plain = time(m, &|| plain.forward(&x))?;
            let t_padded = time(m, &|| {
                padded.forward(&x.pad_with_zeros(1, 0, padded_k - k)?)
            })?;
            println!(
                "| {n} × {k} | {m} | {:.0} | {:.0} | {:.1e} | {:.1e} |",
                t_plain.as_secs_f64() * 1e6,
                t_padded.as_secs_f64() * 1e6,
                rel_err(&plain.forward(&x)?, &exact)?,
                rel_err(&padded.forward(&x_padded)?, &exact)?,
            );
        }
    }
    Ok(())
}
