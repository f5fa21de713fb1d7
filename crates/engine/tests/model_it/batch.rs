//! Batch invariance of `Shard::forward_batch`: a sequence decoded in a
//! batch with others (different prompts and lengths, joining at different
//! steps, prefilling while others decode) gets the logits it gets alone,
//! in every layout.
//!
//! "Alone" is the same function on a batch of one with the same prefill
//! chunks, so the two runs differ only in what else shares the step. The
//! expected values come from that run, never from a stored earlier output.

use crate::common::*;
use engine::model::{BatchOutput, KvCache, SeqStep, ATTENTION_BLOCK};

/// A sequence of the schedule: its prompt and the step it joins at.
struct Joining {
    prompt: Vec<u32>,
    joins: usize,
}

/// Decodes every sequence greedily through `stages`, batched: at each step
/// every joined, unfinished sequence contributes its next prefill chunk (at
/// most `chunk` prompt tokens) or its last token. Each sequence decodes
/// `steps` tokens after its prompt.
fn decode_batch(
    stages: &[Shard],
    ars: &mut [Box<dyn AllReduce>],
    seqs: &[Joining],
    steps: usize,
    chunk: usize,
) -> Vec<Decoded> {
    let mut caches: Vec<Vec<KvCache>> = seqs
        .iter()
        .map(|_| stages.iter().map(|s| s.new_cache()).collect())
        .collect();
    let mut pending: Vec<Vec<u32>> = seqs.iter().map(|s| s.prompt.clone()).collect();
    let mut out: Vec<Decoded> = seqs
        .iter()
        .map(|_| Decoded {
            tokens: Vec::new(),
            logits: Vec::new(),
        })
        .collect();
    let mut sampler = Sampler::new(SamplingParams::default());
    for step in 0.. {
        let active: Vec<usize> = (0..seqs.len())
            .filter(|&i| seqs[i].joins <= step && out[i].tokens.len() <= steps)
            .collect();
        if active.is_empty() {
            if seqs.iter().all(|s| s.joins <= step) {
                break;
            }
            continue;
        }
        let lens: Vec<usize> = active
            .iter()
            .map(|&i| pending[i].len().min(chunk))
            .collect();
        let tokens: Vec<u32> = active
            .iter()
            .zip(&lens)
            .flat_map(|(&i, &n)| pending[i].drain(..n).collect::<Vec<_>>())
            .collect();
        let mut x = StageInput::Tokens(tokens);
        let mut logits = None;
        for (s, (stage, ar)) in stages.iter().zip(ars.iter_mut()).enumerate() {
            let mut steps_of: Vec<SeqStep<'_>> = caches
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| active.contains(i))
                .zip(&lens)
                .map(|((_, c), &len)| SeqStep {
                    cache: &mut c[s],
                    len,
                    logits: Logits::Last,
                })
                .collect();
            match stage
                .forward_batch(x, &mut steps_of, ar.as_mut())
                .expect("forward_batch")
            {
                BatchOutput::Hidden(h) => {
                    let bytes = tensor_to_bytes(&h).expect("encode");
                    x = StageInput::Hidden(tensor_from_bytes(&bytes).expect("decode"));
                }
                BatchOutput::Logits(l) => {
                    logits = Some(l);
                    x = StageInput::Tokens(Vec::new());
                }
            }
        }
        let logits = logits.expect("the last stage gives logits");
        assert_eq!(logits.len(), active.len());
        for (&i, l) in active.iter().zip(logits) {
            if !pending[i].is_empty() {
                continue; // a prompt chunk that is not the prompt's last
            }
            let l = l.to_vec1::<f32>().expect("[vocab] logits");
            let token = sampler.sample_slice(&l).expect("sample");
            pending[i].push(token);
            out[i].tokens.push(token);
            out[i].logits.push(l);
        }
    }
    out
}

/// Eight sequences with prompts of 1 to 23 tokens, joining at steps 0 to 9,
/// so prefills (in chunks of 4) overlap other sequences' decoding.
fn schedule(vocab: u32) -> Vec<Joining> {
    (0..8u32)
        .map(|i| Joining {
            prompt: (0..1 + 3 * i)
                .map(|j| (7 * i + 13 * j + 1) % vocab)
                .collect(),
            joins: [0, 0, 1, 3, 4, 4, 7, 9][i as usize],
        })
        .collect()
}

/// Runs the schedule batched and each sequence alone under `setup`;
/// returns, per sequence, (batched, alone), the ranks having agreed.
fn batched_and_alone(
    path: &Path,
    format: WeightFormat,
    setup: &Setup,
    steps: usize,
) -> Vec<(Decoded, Decoded)> {
    let vocab = read_config(path).expect("config").vocab_size as u32;
    let per_rank = on_setup(path, format, setup, |stages, ars| {
        let seqs = schedule(vocab);
        let batched = decode_batch(stages, ars, &seqs, steps, 4);
        let alone: Vec<Decoded> = seqs
            .iter()
            .map(|s| {
                let one = Joining {
                    prompt: s.prompt.clone(),
                    joins: 0,
                };
                decode_batch(stages, ars, &[one], steps, 4).remove(0)
            })
            .collect();
        batched.into_iter().zip(alone).collect::<Vec<_>>()
    });
    for (rank, r) in per_rank.iter().enumerate().skip(1) {
        for (i, ((b, _), (b0, _))) in r.iter().zip(&per_rank[0]).enumerate() {
            assert_eq!(b.logits, b0.logits, "rank {rank}, sequence {i}");
        }
    }
    per_rank.into_iter().next().expect("rank 0")
}

fn assert_invariant(name: &str, pairs: &[(Decoded, Decoded)], steps: usize, tolerance: f32) {
    let mut worst = 0f32;
    for (i, (batched, alone)) in pairs.iter().enumerate() {
        assert_eq!(batched.tokens.len(), steps + 1, "{name}: sequence {i}");
        assert_eq!(
            batched.tokens, alone.tokens,
            "{name}: sequence {i}'s greedy tokens differ in the batch"
        );
        worst = worst.max(max_abs_diff(&batched.logits, &alone.logits));
    }
    println!("{name}: max |logit diff| batched vs alone = {worst:e}");
    assert!(
        worst <= tolerance,
        "{name}: logits differ by {worst} in the batch"
    );
}

/// f32 weights: the logits under batching equal those alone up to the
/// matmul's summation order (the tolerance of the layout agreement tests).
#[test]
fn f32_batched_decoding_equals_each_sequence_alone_in_every_layout() {
    let model = tiny_model(false);
    for setup in [
        Setup::Single,
        Setup::Pipeline(2),
        Setup::Tensor(2),
        Setup::PipelineOfTensor(2),
    ] {
        let pairs = batched_and_alone(&model.hf, WeightFormat::F32, &setup, 12);
        assert_invariant(&format!("tiny f32 {setup:?}"), &pairs, 12, 1e-4);
    }
}

/// Q8_0 blocks (candle's `QMatMul`, and the VNNI tiles where the CPU has
/// them) quantize each input row on its own and sum each row's integer
/// products in the same order whatever else is in the batch: equal bit for
/// bit.
#[test]
fn q8_0_batched_decoding_equals_each_sequence_alone() {
    let model = tiny_model(false);
    for (format, setup) in [
        (WeightFormat::Quantized, Setup::Single),
        (WeightFormat::Q8_0, Setup::Single),
        (WeightFormat::Q8_0, Setup::Pipeline(2)),
        (WeightFormat::Q8_0, Setup::Tensor(2)),
    ] {
        let pairs = batched_and_alone(&model.gguf_q8, format, &setup, 12);
        assert_invariant(
            &format!("tiny q8_0 file as {format:?} {setup:?}"),
            &pairs,
            12,
            0.0,
        );
    }
}

/// The real SmolLM2 file (Q4_1) in single, pipeline-2 and tensor-3 (its 9
/// heads and 3 kv heads allow degree 3): dequantized to f32, as stored and
/// requantized to Q8_0.
#[test]
fn smollm2_batched_decoding_equals_each_sequence_alone() {
    let Some(path) = engine::testing::smollm2_gguf() else {
        return;
    };
    for (format, setup) in [
        (WeightFormat::F32, Setup::Single),
        (WeightFormat::F32, Setup::Pipeline(2)),
        (WeightFormat::F32, Setup::Tensor(3)),
        (WeightFormat::Quantized, Setup::Single),
        (WeightFormat::Q8_0, Setup::Single),
        (WeightFormat::Q8_0, Setup::Pipeline(2)),
        (WeightFormat::Q8_0, Setup::Tensor(3)),
    ] {
        // f32: gemm's summation order depends on the number of rows (up
        // to 8.3e-5 seen); blocks: bit for bit, as above.
        let tolerance = match format {
            WeightFormat::F32 => 1e-3,
            _ => 0.0,
        };
        let pairs = batched_and_alone(&path, format, &setup, 8);
        assert_invariant(
            &format!("SmolLM2 as {format:?} {setup:?}"),
            &pairs,
            8,
            tolerance,
        );
    }
}

/// A prompt cut into steps at multiples of `ATTENTION_BLOCK` (as the
/// runner's scheduler cuts prompts beside decoding sequences) gets the
/// logits it gets in one step: bit for bit on Q8_0 and GGUF blocks, within
/// the f32 bound on f32 weights. The tiny model and the real SmolLM2 file;
/// only the real file tells blocked from unblocked attention (with one
/// block per step, its Q8_0 greedy tokens change at a 16-token cut; the
/// tiny model's head_dim of 16 agrees either way).
#[test]
fn prompts_cut_at_attention_blocks_equal_one_step_prefill() {
    let model = tiny_model(false);
    let tiny = [
        (model.gguf_q8.clone(), WeightFormat::Q8_0, 0.0),
        (model.gguf_q8.clone(), WeightFormat::Quantized, 0.0),
        (model.hf.clone(), WeightFormat::F32, 1e-4),
    ];
    let real = engine::testing::smollm2_gguf()
        .map(|p| {
            vec![
                (p.clone(), WeightFormat::Q8_0, 0.0),
                (p.clone(), WeightFormat::Quantized, 0.0),
                (p, WeightFormat::F32, 1e-3),
            ]
        })
        .unwrap_or_default();
    for (path, format, tolerance) in tiny.into_iter().chain(real) {
        let vocab = read_config(&path).expect("config").vocab_size as u32;
        let prompt: Vec<u32> = (0..3 * ATTENTION_BLOCK as u32 + 5)
            .map(|j| (11 * j + 3) % vocab)
            .collect();
        let runs = on_setup(&path, format, &Setup::Single, |stages, ars| {
            [usize::MAX, ATTENTION_BLOCK, 2 * ATTENTION_BLOCK]
                .map(|chunk| {
                    let one = Joining {
                        prompt: prompt.clone(),
                        joins: 0,
                    };
                    decode_batch(stages, ars, &[one], 6, chunk).remove(0)
                })
                .into_iter()
                .collect::<Vec<_>>()
        })
        .remove(0);
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        for (cut, run) in runs.iter().enumerate().skip(1) {
            assert_eq!(run.tokens, runs[0].tokens, "{name} {format:?}, cut {cut}");
            let diff = max_abs_diff(&run.logits, &runs[0].logits);
            println!(
                "{name} {format:?}: prompt cut {cut} vs one step: max |logit diff| = {diff:e}"
            );
            assert!(diff <= tolerance, "{name} {format:?}, cut {cut}: {diff}");
        }
    }
}
