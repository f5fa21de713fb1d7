//! Integration tests of the engine's model part: a tiny random llama that
//! the tests write themselves (Hugging Face safetensors, GGUF F32 with
//! llama.cpp's q/k permutation, GGUF Q8_0), run single-process, as pipeline
//! stages and as tensor-parallel ranks on threads; corrupt files; the wire
//! format; and a smoke check on the real SmolLM2 GGUF when it is present.
//!
//! Invariants the tests rely on: weights come from a seeded PRNG, so every
//! run sees the same model; tensor-parallel ranks sum their partials in
//! rank order, so all ranks see bit-identical sums; every wait in the
//! in-memory all-reduce has a deadline, so a failing rank fails the test
//! instead of hanging it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use engine::loader::{load_shard, read_config, Kernels, WeightFormat};
use engine::model::{AllReduce, Logits, NoAllReduce, Shard, ShardSpec, StageInput, StageOutput};
use engine::sampler::{Sampler, SamplingParams};
use engine::wire::{tensor_from_bytes, tensor_to_bytes};
use engine::{EngineError, Result};
use proptest::prelude::*;

// ------------------------------------------------------------ tiny model

const HIDDEN: usize = 64;
const FFN: usize = 128;
const LAYERS: usize = 4;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 16;
const VOCAB: usize = 97;
const THETA: f32 = 10_000.0;
const PROMPT: [u32; 5] = [3, 17, 42, 5, 88];
const DECODE_STEPS: usize = 32;

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "engine-model-it-{}-{tag}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The shared deterministic generator; its tensors cannot fail to build.
struct Rng(engine::testing::Rng);

impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0.next_f32()
    }

    /// Uniform in `[-scale, scale]`.
    fn tensor(&mut self, dims: &[usize], scale: f32, offset: f32) -> Tensor {
        self.0.tensor(dims, scale, offset).expect("random tensor")
    }
}

/// The tiny model's weights under their Hugging Face names. Linear weights
/// have variance 1/in so activations stay O(1); lm_head is larger so that
/// logits are well spread and greedy picks are not near-ties.
fn tiny_weights(seed: u64, tied: bool) -> Vec<(String, Tensor)> {
    tiny_weights_with_ffn(seed, tied, FFN)
}

fn tiny_weights_with_ffn(seed: u64, tied: bool, ffn: usize) -> Vec<(String, Tensor)> {
    let mut rng = Rng(engine::testing::Rng(seed));
    let lin = |rng: &mut Rng, out: usize, inp: usize| {
        rng.tensor(&[out, inp], 3f32.sqrt() / (inp as f32).sqrt(), 0.0)
    };
    let mut w = vec![(
        "model.embed_tokens.weight".to_string(),
        rng.tensor(&[VOCAB, HIDDEN], 1.0, 0.0),
    )];
    for i in 0..LAYERS {
        let p = format!("model.layers.{i}");
        w.push((
            format!("{p}.input_layernorm.weight"),
            rng.tensor(&[HIDDEN], 0.2, 1.0),
        ));
        w.push((
            format!("{p}.self_attn.q_proj.weight"),
            lin(&mut rng, HEADS * HEAD_DIM, HIDDEN),
        ));
        w.push((
            format!("{p}.self_attn.k_proj.weight"),
            lin(&mut rng, KV_HEADS * HEAD_DIM, HIDDEN),
        ));
        w.push((
            format!("{p}.self_attn.v_proj.weight"),
            lin(&mut rng, KV_HEADS * HEAD_DIM, HIDDEN),
        ));
        w.push((
            format!("{p}.self_attn.o_proj.weight"),
            lin(&mut rng, HIDDEN, HEADS * HEAD_DIM),
        ));
        w.push((
            format!("{p}.post_attention_layernorm.weight"),
            rng.tensor(&[HIDDEN], 0.2, 1.0),
        ));
        w.push((
            format!("{p}.mlp.gate_proj.weight"),
            lin(&mut rng, ffn, HIDDEN),
        ));
        w.push((
            format!("{p}.mlp.up_proj.weight"),
            lin(&mut rng, ffn, HIDDEN),
        ));
        w.push((
            format!("{p}.mlp.down_proj.weight"),
            lin(&mut rng, HIDDEN, ffn),
        ));
    }
    w.push(("model.norm.weight".into(), rng.tensor(&[HIDDEN], 0.2, 1.0)));
    if tied {
        // Make the shared table big enough to spread logits too.
        w[0].1 = (&w[0].1 * 2.0).expect("scale embeddings");
    } else {
        w.push((
            "lm_head.weight".into(),
            rng.tensor(&[VOCAB, HIDDEN], 0.6, 0.0),
        ));
    }
    w
}

fn config_json(tied: bool) -> String {
    config_json_with_ffn(tied, FFN)
}

fn config_json_with_ffn(tied: bool, ffn: usize) -> String {
    format!(
        r#"{{"model_type": "llama", "architectures": ["LlamaForCausalLM"],
            "hidden_size": {HIDDEN}, "intermediate_size": {ffn},
            "num_hidden_layers": {LAYERS}, "num_attention_heads": {HEADS},
            "num_key_value_heads": {KV_HEADS}, "head_dim": {HEAD_DIM},
            "vocab_size": {VOCAB}, "rope_theta": {THETA}, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 256, "tie_word_embeddings": {tied},
            "hidden_act": "silu", "rope_scaling": null, "torch_dtype": "float32"}}"#
    )
}

/// Writes `config.json` + `model.safetensors` into `dir`.
fn write_hf(dir: &Path, weights: &[(String, Tensor)], tied: bool) {
    let config = config_json_with_ffn(tied, ffn_of(weights));
    std::fs::write(dir.join("config.json"), config).expect("write config");
    let map: HashMap<String, Tensor> = weights.iter().cloned().collect();
    candle_core::safetensors::save(&map, dir.join("model.safetensors")).expect("save safetensors");
}

/// The FFN width of tiny weights.
fn ffn_of(weights: &[(String, Tensor)]) -> usize {
    weights
        .iter()
        .find(|(n, _)| n == "model.layers.0.mlp.gate_proj.weight")
        .map(|(_, t)| t.dims()[0])
        .expect("gate_proj")
}

/// The GGUF name of a Hugging Face tensor.
fn gguf_name(hf: &str) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.").expect("layer tensor");
    let (idx, suffix) = rest.split_once('.').expect("layer index");
    let short = match suffix {
        "input_layernorm.weight" => "attn_norm",
        "self_attn.q_proj.weight" => "attn_q",
        "self_attn.k_proj.weight" => "attn_k",
        "self_attn.v_proj.weight" => "attn_v",
        "self_attn.o_proj.weight" => "attn_output",
        "post_attention_layernorm.weight" => "ffn_norm",
        "mlp.gate_proj.weight" => "ffn_gate",
        "mlp.up_proj.weight" => "ffn_up",
        "mlp.down_proj.weight" => "ffn_down",
        other => panic!("unexpected tensor {other}"),
    };
    format!("blk.{idx}.{short}.weight")
}

/// llama.cpp's `permute`: `w.reshape(heads, 2, hd/2, in).swapaxes(1, 2)`.
fn llama_cpp_permute(w: &Tensor, heads: usize) -> Tensor {
    let (out, inp) = w.dims2().expect("matrix");
    w.reshape((heads, 2, out / heads / 2, inp))
        .and_then(|t| t.transpose(1, 2))
        .and_then(|t| t.contiguous())
        .and_then(|t| t.reshape((out, inp)))
        .expect("permute")
}

/// Writes the weights as a llama GGUF: matrices as `matrix_dtype`, norms as
/// F32, q/k permuted the way llama.cpp's converter does, and no
/// `output.weight` when the weights have no lm_head (tied).
fn write_gguf(path: &Path, weights: &[(String, Tensor)], matrix_dtype: GgmlDType, arch: &str) {
    use gguf_file::Value;
    let meta: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String(arch.into())),
        ("llama.embedding_length", Value::U32(HIDDEN as u32)),
        (
            "llama.feed_forward_length",
            Value::U32(ffn_of(weights) as u32),
        ),
        ("llama.block_count", Value::U32(LAYERS as u32)),
        ("llama.attention.head_count", Value::U32(HEADS as u32)),
        ("llama.attention.head_count_kv", Value::U32(KV_HEADS as u32)),
        ("llama.rope.freq_base", Value::F32(THETA)),
        ("llama.rope.dimension_count", Value::U32(HEAD_DIM as u32)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.context_length", Value::U32(256)),
    ];
    let tensors: Vec<(String, QTensor)> = weights
        .iter()
        .map(|(name, t)| {
            let t = if name.ends_with("q_proj.weight") {
                llama_cpp_permute(t, HEADS)
            } else if name.ends_with("k_proj.weight") {
                llama_cpp_permute(t, KV_HEADS)
            } else {
                t.clone()
            };
            let dtype = if t.rank() == 1 {
                GgmlDType::F32
            } else {
                matrix_dtype
            };
            (
                gguf_name(name),
                QTensor::quantize(&t, dtype).expect("quantize"),
            )
        })
        .collect();
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(path).expect("create gguf");
    gguf_file::write(&mut file, &meta_refs, &tensor_refs).expect("write gguf");
}

/// One tiny model in every format, in one temp dir.
struct TinyModel {
    _dir: TempDir,
    hf: PathBuf,
    gguf_f32: PathBuf,
    gguf_q8: PathBuf,
}

fn tiny_model(tied: bool) -> TinyModel {
    let weights = tiny_weights(if tied { 7 } else { 1 }, tied);
    tiny_model_from(&weights, tied, if tied { "tied" } else { "untied" })
}

fn tiny_model_from(weights: &[(String, Tensor)], tied: bool, tag: &str) -> TinyModel {
    let dir = TempDir::new(tag);
    let hf = dir.path().join("hf");
    std::fs::create_dir_all(&hf).expect("hf dir");
    write_hf(&hf, weights, tied);
    let gguf_f32 = dir.path().join("tiny-f32.gguf");
    write_gguf(&gguf_f32, weights, GgmlDType::F32, "llama");
    let gguf_q8 = dir.path().join("tiny-q8_0.gguf");
    write_gguf(&gguf_q8, weights, GgmlDType::Q8_0, "llama");
    TinyModel {
        _dir: dir,
        hf,
        gguf_f32,
        gguf_q8,
    }
}

/// The next token the peaked model predicts after `t`.
fn successor(t: usize) -> usize {
    (5 * t + 3) % VOCAB
}

/// Random weights are maximally uncertain: their greedy picks come within
/// a few hundredths of a tie, closer than 8-bit rounding moves logits, so
/// f32 and Q8_0 runs legitimately part ways. Trained models are confident;
/// this variant imitates that: lm_head row `successor(t)` is the embedding
/// of `t` (scaled), so the residual stream's token identity decides the
/// pick by a wide margin, while the layers (their outputs halved) still
/// shape the logits and are still rounded to 8 bits.
fn peaked_weights(seed: u64) -> Vec<(String, Tensor)> {
    let mut w = tiny_weights(seed, false);
    let embed = w[0].1.to_vec2::<f32>().expect("embeddings");
    let mut head = vec![vec![0f32; HIDDEN]; VOCAB];
    for (t, row) in embed.iter().enumerate() {
        head[successor(t)] = row.iter().map(|x| x * 0.5).collect();
    }
    for (name, t) in w.iter_mut() {
        if name == "lm_head.weight" {
            *t = Tensor::new(head.clone(), &Device::Cpu).expect("head");
        } else if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") {
            *t = (&*t * 0.5).expect("halve");
        }
    }
    w
}

// ------------------------------------------------------------ running shardings

/// An in-memory all-reduce for ranks on threads: each rank deposits its
/// partial; the last to arrive sums them in rank order (so every rank gets
/// bit-identical sums) and wakes the others. Waits time out rather than hang.
struct Group {
    degree: usize,
    state: Mutex<GroupState>,
    cv: Condvar,
}

struct GroupState {
    generation: u64,
    slots: Vec<Option<Tensor>>,
    arrived: usize,
    result: Option<Tensor>,
}

struct ThreadAllReduce {
    rank: usize,
    group: Arc<Group>,
}

const ALL_REDUCE_DEADLINE: Duration = Duration::from_secs(60);

impl AllReduce for ThreadAllReduce {
    fn all_reduce_sum(&mut self, partial: &Tensor) -> Result<Tensor> {
        let fail = |what: &str| EngineError::Compute(format!("test all-reduce: {what}"));
        let mut st = self.group.state.lock().map_err(|_| fail("poisoned"))?;
        st.slots[self.rank] = Some(partial.clone());
        st.arrived += 1;
        if st.arrived == self.group.degree {
            let mut sum: Option<Tensor> = None;
            for slot in st.slots.iter_mut() {
                let t = slot.take().ok_or_else(|| fail("missing partial"))?;
                sum = Some(match sum {
                    None => t,
                    Some(s) => (s + t)?,
                });
            }
            st.result = sum;
            st.arrived = 0;
            st.generation += 1;
            self.group.cv.notify_all();
        } else {
            let generation = st.generation;
            while st.generation == generation {
                let (next, timeout) = self
                    .group
                    .cv
                    .wait_timeout(st, ALL_REDUCE_DEADLINE)
                    .map_err(|_| fail("poisoned"))?;
                st = next;
                if timeout.timed_out() && st.generation == generation {
                    return Err(fail("a peer rank never arrived"));
                }
            }
        }
        st.result.clone().ok_or_else(|| fail("no result"))
    }
}

fn thread_group(degree: usize) -> Vec<ThreadAllReduce> {
    let group = Arc::new(Group {
        degree,
        state: Mutex::new(GroupState {
            generation: 0,
            slots: vec![None; degree],
            arrived: 0,
            result: None,
        }),
        cv: Condvar::new(),
    });
    (0..degree)
        .map(|rank| ThreadAllReduce {
            rank,
            group: group.clone(),
        })
        .collect()
}

#[derive(Debug, Clone)]
enum Setup {
    Single,
    Pipeline(usize),
    Tensor(usize),
    /// Tensor parallelism inside each of two pipeline stages.
    PipelineOfTensor(usize),
}

/// Greedy decoding: logits of the prompt's last position, then of each
/// decoded token.
struct Decoded {
    tokens: Vec<u32>,
    logits: Vec<Vec<f32>>,
}

fn logits_of(out: StageOutput) -> Vec<f32> {
    match out {
        StageOutput::Logits(t) => {
            assert_eq!(t.rank(), 1, "logits are [vocab]");
            t.to_vec1::<f32>().expect("logits")
        }
        StageOutput::Hidden(_) => panic!("last stage returned hidden states"),
    }
}

/// Runs stages of one pipeline in order for every step (each stage could be
/// a process; here they share a thread). `all_reduces[i]` serves stage `i`.
fn decode_pipeline(
    stages: &[Shard],
    all_reduces: &mut [Box<dyn AllReduce>],
    prompt: &[u32],
    steps: usize,
) -> Decoded {
    let mut caches: Vec<_> = stages.iter().map(|s| s.new_cache()).collect();
    let mut sampler = Sampler::new(SamplingParams::default());
    let mut input = prompt.to_vec();
    let mut pos = 0;
    let mut out = Decoded {
        tokens: Vec::new(),
        logits: Vec::new(),
    };
    for _ in 0..=steps {
        let mut x = StageInput::Tokens(input.clone());
        let mut last = None;
        for ((stage, cache), ar) in stages
            .iter()
            .zip(caches.iter_mut())
            .zip(all_reduces.iter_mut())
        {
            match stage.forward(x, pos, cache, ar.as_mut()).expect("forward") {
                StageOutput::Hidden(h) => {
                    // Cross the wire format, as between processes.
                    let bytes = tensor_to_bytes(&h).expect("encode");
                    x = StageInput::Hidden(tensor_from_bytes(&bytes).expect("decode"));
                }
                logits => {
                    last = Some(logits);
                    x = StageInput::Tokens(Vec::new());
                }
            }
        }
        let logits = logits_of(last.expect("last stage gives logits"));
        let token = sampler.sample_slice(&logits).expect("sample");
        pos += input.len();
        input = vec![token];
        out.tokens.push(token);
        out.logits.push(logits);
    }
    out
}

fn load(path: &Path, spec: &ShardSpec, format: WeightFormat) -> Shard {
    load_shard(path, spec, format, &mut |_, _| {}).expect("load shard")
}

/// Decodes greedily under `setup`; for tensor parallelism every rank runs
/// the same loop on its own thread and all ranks must agree.
fn decode(
    path: &Path,
    format: WeightFormat,
    setup: &Setup,
    prompt: &[u32],
    steps: usize,
) -> Decoded {
    let cfg = read_config(path).expect("config");
    match setup {
        Setup::Single => {
            let shard = load(path, &ShardSpec::full(&cfg), format);
            decode_pipeline(&[shard], &mut [Box::new(NoAllReduce)], prompt, steps)
        }
        Setup::Pipeline(n) => {
            let stages: Vec<Shard> = ShardSpec::pipeline_stages(&cfg, *n)
                .iter()
                .map(|spec| load(path, spec, format))
                .collect();
            let mut ars: Vec<Box<dyn AllReduce>> = (0..*n)
                .map(|_| Box::new(NoAllReduce) as Box<dyn AllReduce>)
                .collect();
            decode_pipeline(&stages, &mut ars, prompt, steps)
        }
        Setup::Tensor(degree) | Setup::PipelineOfTensor(degree) => {
            let n_stages = match setup {
                Setup::Tensor(_) => 1,
                _ => 2,
            };
            let stage_ranges: Vec<_> = ShardSpec::pipeline_stages(&cfg, n_stages)
                .into_iter()
                .map(|s| s.layers)
                .collect();
            // One all-reduce group per stage; rank r of every stage runs on
            // thread r.
            let mut groups: Vec<Vec<ThreadAllReduce>> =
                stage_ranges.iter().map(|_| thread_group(*degree)).collect();
            let mut per_rank: Vec<Vec<Box<dyn AllReduce + Send>>> =
                (0..*degree).map(|_| Vec::new()).collect();
            for group in groups.iter_mut() {
                for (rank, ar) in group.drain(..).enumerate() {
                    per_rank[rank].push(Box::new(ar));
                }
            }
            let results: Vec<Decoded> = std::thread::scope(|scope| {
                let handles: Vec<_> = per_rank
                    .into_iter()
                    .enumerate()
                    .map(|(rank, ars)| {
                        let stage_ranges = stage_ranges.clone();
                        scope.spawn(move || {
                            let stages: Vec<Shard> = stage_ranges
                                .iter()
                                .map(|layers| {
                                    let spec = ShardSpec {
                                        layers: layers.clone(),
                                        tp_rank: rank,
                                        tp_degree: *degree,
                                    };
                                    load(path, &spec, format)
                                })
                                .collect();
                            let mut ars: Vec<Box<dyn AllReduce>> =
                                ars.into_iter().map(|a| a as Box<dyn AllReduce>).collect();
                            decode_pipeline(&stages, &mut ars, prompt, steps)
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("rank thread"))
                    .collect()
            });
            for (rank, r) in results.iter().enumerate().skip(1) {
                assert_eq!(
                    r.tokens, results[0].tokens,
                    "rank {rank} decoded differently"
                );
                assert_eq!(r.logits, results[0].logits, "rank {rank} saw other logits");
            }
            results.into_iter().next().expect("rank 0")
        }
    }
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

/// Smallest gap between the two best logits over all steps: how close the
/// greedy picks came to a tie.
fn min_top2_gap(d: &Decoded) -> f32 {
    d.logits
        .iter()
        .map(|l| {
            let mut v = l.clone();
            v.sort_by(|a, b| b.total_cmp(a));
            v[0] - v[1]
        })
        .fold(f32::INFINITY, f32::min)
}

// ------------------------------------------------------------ agreement tests

#[test]
fn shardings_agree_with_single_process_on_logits_and_greedy_tokens() {
    let model = tiny_model(false);
    let single = decode(
        &model.hf,
        WeightFormat::F32,
        &Setup::Single,
        &PROMPT,
        DECODE_STEPS,
    );
    assert_eq!(single.tokens.len(), DECODE_STEPS + 1);
    assert!(single.logits.iter().all(|l| l.len() == VOCAB));
    assert!(single.logits.iter().flatten().all(|x| x.is_finite()));
    for setup in [
        Setup::Pipeline(2),
        Setup::Pipeline(3),
        Setup::Tensor(2),
        Setup::PipelineOfTensor(2),
    ] {
        let other = decode(&model.hf, WeightFormat::F32, &setup, &PROMPT, DECODE_STEPS);
        assert_eq!(
            other.tokens, single.tokens,
            "{setup:?}: greedy tokens differ"
        );
        let diff = max_abs_diff(&other.logits, &single.logits);
        println!(
            "{setup:?}: max |logit diff| = {diff:e} over {} steps",
            single.logits.len()
        );
        assert!(diff <= 1e-4, "{setup:?}: logits differ by {diff}");
    }
}

/// `Logits::All` gives, in row `i`, the logits of position `i`: the same
/// as `Logits::Last` on the prompt cut after `i` (a fresh cache; f32, equal
/// up to the order of summation), in one step or in chunks.
#[test]
fn every_position_logits_are_each_prefix_last_logits() {
    let model = tiny_model(false);
    let cfg = read_config(&model.hf).expect("config");
    let shard = load(&model.hf, &ShardSpec::full(&cfg), WeightFormat::F32);
    let prefix_last: Vec<Vec<f32>> = (1..=PROMPT.len())
        .map(|n| {
            let mut cache = shard.new_cache();
            let out = shard
                .forward(
                    StageInput::Tokens(PROMPT[..n].to_vec()),
                    0,
                    &mut cache,
                    &mut NoAllReduce,
                )
                .expect("forward");
            logits_of(out)
        })
        .collect();
    let rows = |out: StageOutput| -> Vec<Vec<f32>> {
        match out {
            StageOutput::Logits(t) => t.to_vec2::<f32>().expect("[seq, vocab] logits"),
            StageOutput::Hidden(_) => panic!("the full model returned hidden states"),
        }
    };
    let mut cache = shard.new_cache();
    let all = rows(
        shard
            .forward_logits(
                StageInput::Tokens(PROMPT.to_vec()),
                0,
                &mut cache,
                &mut NoAllReduce,
                Logits::All,
            )
            .expect("forward all"),
    );
    assert_eq!(all.len(), PROMPT.len());
    assert_eq!(all[0].len(), VOCAB);
    let diff = max_abs_diff(&all, &prefix_last);
    assert!(diff < 1e-4, "one step: rows differ from prefixes by {diff}");
    // In chunks of 2, 2 and 1 over one cache.
    let mut cache = shard.new_cache();
    let mut chunked = Vec::new();
    for (start, end) in [(0, 2), (2, 4), (4, 5)] {
        let out = shard
            .forward_logits(
                StageInput::Tokens(PROMPT[start..end].to_vec()),
                start,
                &mut cache,
                &mut NoAllReduce,
                Logits::All,
            )
            .expect("forward a chunk");
        chunked.extend(rows(out));
    }
    let diff = max_abs_diff(&chunked, &prefix_last);
    assert!(diff < 1e-4, "chunked: rows differ from prefixes by {diff}");
}

#[test]
fn pipeline_stages_cover_the_tiny_model() {
    let model = tiny_model(false);
    let cfg = read_config(&model.hf).expect("config");
    for n in 1..=LAYERS {
        let stages = ShardSpec::pipeline_stages(&cfg, n);
        assert_eq!(stages.len(), n);
        assert_eq!(stages[0].layers.start, 0);
        assert_eq!(stages[n - 1].layers.end, LAYERS);
        for s in &stages {
            s.validate(&cfg).expect("valid stage");
        }
    }
}

#[test]
fn hf_directory_and_gguf_f32_agree() {
    let model = tiny_model(false);
    let hf = decode(&model.hf, WeightFormat::F32, &Setup::Single, &PROMPT, 8);
    let gguf = decode(
        &model.gguf_f32,
        WeightFormat::F32,
        &Setup::Single,
        &PROMPT,
        8,
    );
    assert_eq!(gguf.tokens, hf.tokens);
    let diff = max_abs_diff(&gguf.logits, &hf.logits);
    println!("HF vs GGUF F32: max |logit diff| = {diff:e}");
    assert!(diff <= 1e-4, "HF and GGUF logits differ by {diff}");
    // The F32 GGUF read as "quantized" keeps float matrices dense: same maths.
    let gguf_q = decode(
        &model.gguf_f32,
        WeightFormat::Quantized,
        &Setup::Single,
        &PROMPT,
        8,
    );
    assert!(max_abs_diff(&gguf_q.logits, &hf.logits) <= 1e-4);
}

#[test]
fn gguf_tensor_parallel_undoes_the_qk_permutation_per_rank() {
    let model = tiny_model(false);
    let hf = decode(&model.hf, WeightFormat::F32, &Setup::Single, &PROMPT, 8);
    let tp = decode(
        &model.gguf_f32,
        WeightFormat::F32,
        &Setup::Tensor(2),
        &PROMPT,
        8,
    );
    assert_eq!(tp.tokens, hf.tokens);
    assert!(max_abs_diff(&tp.logits, &hf.logits) <= 1e-4);
}

#[test]
fn q8_0_gguf_quantized_path_tracks_f32() {
    let model = tiny_model_from(&peaked_weights(11), false, "peaked");
    let f32_ref = decode(
        &model.hf,
        WeightFormat::F32,
        &Setup::Single,
        &PROMPT,
        DECODE_STEPS,
    );
    // Same Q8_0 blocks, dequantized: differs from the reference by weight
    // rounding only.
    let dequant = decode(
        &model.gguf_q8,
        WeightFormat::F32,
        &Setup::Single,
        &PROMPT,
        DECODE_STEPS,
    );
    // Q8_0 blocks multiplied as blocks: also rounds the activations to 8 bits.
    let quant = decode(
        &model.gguf_q8,
        WeightFormat::Quantized,
        &Setup::Single,
        &PROMPT,
        DECODE_STEPS,
    );
    // 8-bit rounding of weights (and, on the QMatMul path, of activations)
    // moves this model's logits (range about ±10) by about 0.05-0.15.
    const TOLERANCE: f32 = 0.3;
    let deq_diff = max_abs_diff(&dequant.logits, &f32_ref.logits);
    let quant_diff = max_abs_diff(&quant.logits, &f32_ref.logits);
    let gap = min_top2_gap(&f32_ref);
    println!(
        "Q8_0 over {} steps: dequantized vs f32 {deq_diff:.4}, quantized vs f32 {quant_diff:.4}; \
         smallest top-2 gap of the f32 run {gap:.3}",
        f32_ref.logits.len()
    );
    // The premise of comparing greedy tokens: no pick is a near-tie.
    assert!(
        gap > 2.0 * TOLERANCE,
        "the peaked model has a near-tie ({gap})"
    );
    assert_eq!(
        dequant.tokens, f32_ref.tokens,
        "dequantized Q8_0 decodes differently"
    );
    assert_eq!(
        quant.tokens, f32_ref.tokens,
        "quantized Q8_0 decodes differently"
    );
    assert!(
        deq_diff <= TOLERANCE,
        "dequantized Q8_0 is off by {deq_diff}"
    );
    assert!(
        quant_diff <= TOLERANCE,
        "quantized Q8_0 is off by {quant_diff}"
    );
    // The f32 safetensors requantized to Q8_0 at load: the same rounding.
    let requant = decode(
        &model.hf,
        WeightFormat::Q8_0,
        &Setup::Single,
        &PROMPT,
        DECODE_STEPS,
    );
    let requant_diff = max_abs_diff(&requant.logits, &f32_ref.logits);
    println!("HF f32 requantized to Q8_0 vs f32 {requant_diff:.4}");
    assert_eq!(
        requant.tokens, f32_ref.tokens,
        "requantized decodes differently"
    );
    assert!(
        requant_diff <= TOLERANCE,
        "requantized Q8_0 is off by {requant_diff}"
    );
}

#[test]
fn quantized_shardings_agree_with_quantized_single() {
    let model = tiny_model(false);
    let single = decode(
        &model.gguf_q8,
        WeightFormat::Quantized,
        &Setup::Single,
        &PROMPT,
        16,
    );
    let requant_single = decode(&model.hf, WeightFormat::Q8_0, &Setup::Single, &PROMPT, 16);
    for setup in [Setup::Pipeline(2), Setup::Tensor(2)] {
        let other = decode(&model.gguf_q8, WeightFormat::Quantized, &setup, &PROMPT, 16);
        let requant = decode(&model.hf, WeightFormat::Q8_0, &setup, &PROMPT, 16);
        assert_eq!(other.tokens, single.tokens, "{setup:?}");
        assert_eq!(
            requant.tokens, requant_single.tokens,
            "{setup:?} requantized"
        );
        let diff = max_abs_diff(&other.logits, &single.logits);
        let requant_diff = max_abs_diff(&requant.logits, &requant_single.logits);
        println!(
            "quantized {setup:?}: max |logit diff| = {diff:e}, requantized at load {requant_diff:e}"
        );
        // Column slices fall on block boundaries, so each rank quantizes the
        // same activation blocks as the single process: only the order of
        // the final sums differs.
        assert!(diff <= 1e-4, "{setup:?}: {diff}");
        assert!(
            requant_diff <= 1e-4,
            "{setup:?} requantized: {requant_diff}"
        );
    }
}

#[test]
fn every_supported_gguf_dtype_loads_in_every_format() {
    // The peaked model, so that greedy picks are no near-ties and tokens can
    // be compared across formats despite 4-bit rounding.
    let weights = peaked_weights(11);
    let reference = tiny_model_from(&weights, false, "dtype-ref");
    let f32_ref = decode(&reference.hf, WeightFormat::F32, &Setup::Single, &PROMPT, 8);
    let dir = TempDir::new("dtypes");
    for dtype in [
        GgmlDType::F32,
        GgmlDType::F16,
        GgmlDType::Q8_0,
        GgmlDType::Q4_1,
        GgmlDType::Q4_0,
    ] {
        let path = dir.path().join(format!("tiny-{dtype:?}.gguf"));
        write_gguf(&path, &weights, dtype, "llama");
        let dequant = decode(&path, WeightFormat::F32, &Setup::Single, &PROMPT, 8);
        let quant = decode(&path, WeightFormat::Quantized, &Setup::Single, &PROMPT, 8);
        let quant_tp = decode(
            &path,
            WeightFormat::Quantized,
            &Setup::Tensor(2),
            &PROMPT,
            8,
        );
        let requant = decode(&path, WeightFormat::Q8_0, &Setup::Single, &PROMPT, 8);
        let requant_tp = decode(&path, WeightFormat::Q8_0, &Setup::Tensor(2), &PROMPT, 8);
        let range = f32_ref.logits[0].iter().fold(0f32, |m, x| m.max(x.abs()));
        let d_requant = max_abs_diff(&requant.logits, &dequant.logits);
        let d_requant_tp = max_abs_diff(&requant_tp.logits, &requant.logits);
        let d_dequant = max_abs_diff(&dequant.logits, &f32_ref.logits);
        let d_quant = max_abs_diff(&quant.logits, &dequant.logits);
        let d_tp = max_abs_diff(&quant_tp.logits, &quant.logits);
        println!(
            "{dtype:?}: dequantized vs f32 {d_dequant:.4}, quantized vs dequantized {d_quant:.4}, \
             quantized tp2 vs single {d_tp:.4}, requantized to Q8_0 vs dequantized \
             {d_requant:.4} (tp2 vs single {d_requant_tp:.4}) (max |logit| {range:.1})"
        );
        // Weight rounding against the f32 original: none for F32, tiny for
        // F16, about one percent of the logit range for 8 bits, and for 4
        // bits on random weights (no structure to preserve) over ten
        // percent, enough to change picks, so 4-bit tokens are compared
        // with the dequantized run of the same file instead.
        let (weight_tolerance, same_tokens_as_f32) = match dtype {
            GgmlDType::F32 => (0.0, true),
            GgmlDType::F16 => (2e-3 * range, true),
            GgmlDType::Q8_0 => (0.03 * range, true),
            _ => (0.3 * range, false),
        };
        assert!(d_dequant <= weight_tolerance, "{dtype:?}: {d_dequant}");
        if same_tokens_as_f32 {
            assert_eq!(dequant.tokens, f32_ref.tokens, "{dtype:?} dequantized");
        }
        // Same weights, 8-bit activation rounding on the QMatMul path:
        // about one percent; the tensor split changes nothing visible.
        assert!(d_quant <= 0.05 * range, "{dtype:?}: {d_quant}");
        assert!(d_tp <= 0.05 * range, "{dtype:?}: {d_tp}");
        assert_eq!(quant.tokens, dequant.tokens, "{dtype:?} quantized");
        assert_eq!(quant_tp.tokens, quant.tokens, "{dtype:?} quantized tp2");
        // Requantizing to Q8_0 rounds each block to 255 levels (plus the
        // 8-bit activation rounding): within the same bound.
        assert!(d_requant <= 0.05 * range, "{dtype:?}: {d_requant}");
        assert!(d_requant_tp <= 0.05 * range, "{dtype:?}: {d_requant_tp}");
        assert_eq!(requant.tokens, dequant.tokens, "{dtype:?} requantized");
        assert_eq!(
            requant_tp.tokens, requant.tokens,
            "{dtype:?} requantized tp2"
        );
        // The default resolves per stored type to one of the two, exactly.
        let auto = decode(&path, WeightFormat::Auto, &Setup::Single, &PROMPT, 8);
        let (name, expect) = match WeightFormat::Auto.for_stored(dtype, Kernels::detect()) {
            WeightFormat::Quantized => ("as stored", &quant),
            _ => ("requantized", &requant),
        };
        assert_eq!(auto.logits, expect.logits, "{dtype:?} auto: {name}");
    }
}

#[test]
fn quantized_column_slices_off_block_boundaries_fall_back_to_f32() {
    // FFN 96 split in two gives down_proj 48 input columns per rank, which
    // is not a whole number of 32-element blocks: that matrix is
    // dequantized for the rank, the rest stays quantized. The ranks'
    // down_proj then skips the 8-bit activation rounding the single
    // process applies, hence a loose comparison.
    let weights = tiny_weights_with_ffn(3, false, 96);
    let model = tiny_model_from(&weights, false, "ffn96");
    let cfg = read_config(&model.gguf_q8).expect("config");
    assert_eq!(cfg.intermediate_size, 96);
    let single = decode(
        &model.gguf_q8,
        WeightFormat::Quantized,
        &Setup::Single,
        &PROMPT,
        0,
    );
    let tp = decode(
        &model.gguf_q8,
        WeightFormat::Quantized,
        &Setup::Tensor(2),
        &PROMPT,
        0,
    );
    let dequant = decode(
        &model.gguf_q8,
        WeightFormat::F32,
        &Setup::Tensor(2),
        &PROMPT,
        0,
    );
    let range = single.logits[0].iter().fold(0f32, |m, x| m.max(x.abs()));
    let d_tp = max_abs_diff(&tp.logits, &single.logits);
    let d_deq = max_abs_diff(&tp.logits, &dequant.logits);
    println!("ffn 96 Q8_0: quantized tp2 vs single {d_tp:.4}, vs dequantized tp2 {d_deq:.4} (max |logit| {range:.1})");
    assert!(d_tp <= 0.05 * range, "{d_tp}");
    assert!(d_deq <= 0.05 * range, "{d_deq}");
    // The load says so, naming the matrices: each rank holds its 4
    // down_proj slices (one per layer) as f32, the other 24 matrices and
    // lm_head as Q8_0 blocks.
    for spec in ShardSpec::tensor_ranks(&cfg, 2) {
        let shard = load_shard(
            &model.gguf_q8,
            &spec,
            WeightFormat::Quantized,
            &mut |_, _| {},
        )
        .expect("rank loads");
        assert_eq!(
            shard.held(),
            "25 Q8_0 as stored, 4 Q8_0 as f32; 4 held as f32 because the slice is off \
             block boundaries or the row length does not suit the kernel: \
             blk.0.ffn_down.weight, blk.1.ffn_down.weight, blk.2.ffn_down.weight, \
             blk.3.ffn_down.weight"
        );
    }
    let whole = load_shard(
        &model.gguf_q8,
        &ShardSpec::full(&cfg),
        WeightFormat::Quantized,
        &mut |_, _| {},
    )
    .expect("single loads");
    assert_eq!(whole.held(), "29 Q8_0 as stored");
}

#[test]
fn tied_embeddings_load_from_hf_and_gguf_without_output_weight() {
    let model = tiny_model(true);
    let cfg = read_config(&model.gguf_f32).expect("config");
    assert!(
        cfg.tie_word_embeddings,
        "GGUF without output.weight is tied"
    );
    let hf = decode(&model.hf, WeightFormat::F32, &Setup::Single, &PROMPT, 8);
    for (path, format, setup) in [
        (&model.gguf_f32, WeightFormat::F32, Setup::Single),
        (&model.hf, WeightFormat::F32, Setup::Pipeline(2)),
        (&model.gguf_f32, WeightFormat::F32, Setup::Tensor(2)),
    ] {
        let other = decode(path, format, &setup, &PROMPT, 8);
        assert_eq!(other.tokens, hf.tokens, "{path:?} {setup:?}");
        assert!(
            max_abs_diff(&other.logits, &hf.logits) <= 1e-4,
            "{path:?} {setup:?}"
        );
    }
    // Quantized and tied: one copy of the blocks serves lookup and lm_head.
    let q_single = decode(
        &model.gguf_q8,
        WeightFormat::Quantized,
        &Setup::Single,
        &PROMPT,
        8,
    );
    let q_pipe = decode(
        &model.gguf_q8,
        WeightFormat::Quantized,
        &Setup::Pipeline(2),
        &PROMPT,
        8,
    );
    assert_eq!(q_single.tokens, q_pipe.tokens);
    assert!(max_abs_diff(&q_single.logits, &q_pipe.logits) <= 1e-4);
    // Q8_0 rounding on random weights: loose, relative to the logit range.
    let range = hf.logits[0].iter().fold(0f32, |m, x| m.max(x.abs()));
    let q_diff = max_abs_diff(&q_single.logits[..1], &hf.logits[..1]);
    println!("tied Q8_0 vs f32 prompt logits: {q_diff:.4} (max |logit| {range:.2})");
    assert!(q_diff <= 0.03 * range, "{q_diff} of {range}");
}

#[test]
fn sharded_safetensors_with_index_load_like_one_file() {
    let model = tiny_model(false);
    let dir = TempDir::new("index");
    let weights = tiny_weights(1, false);
    std::fs::write(dir.path().join("config.json"), config_json(false)).expect("config");
    let (first, second): (Vec<_>, Vec<_>) =
        weights.iter().enumerate().partition(|(i, _)| i % 2 == 0);
    let mut weight_map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", first),
        ("model-00002-of-00002.safetensors", second),
    ] {
        let map: HashMap<String, Tensor> = part
            .iter()
            .map(|(_, (n, t))| (n.clone(), t.clone()))
            .collect();
        for name in map.keys() {
            weight_map.insert(name.clone(), serde_json::Value::String(file.into()));
        }
        candle_core::safetensors::save(&map, dir.path().join(file)).expect("save part");
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .expect("index");
    let one = decode(&model.hf, WeightFormat::F32, &Setup::Single, &PROMPT, 4);
    let split = decode(
        dir.path(),
        WeightFormat::F32,
        &Setup::Pipeline(2),
        &PROMPT,
        4,
    );
    assert_eq!(split.tokens, one.tokens);
    assert!(max_abs_diff(&split.logits, &one.logits) <= 1e-4);
}

#[test]
fn f16_and_bf16_safetensors_load_as_f32() {
    for dtype in [candle_core::DType::F16, candle_core::DType::BF16] {
        let dir = TempDir::new("half");
        let weights: Vec<(String, Tensor)> = tiny_weights(1, false)
            .into_iter()
            .map(|(n, t)| (n, t.to_dtype(dtype).expect("to half")))
            .collect();
        write_hf(dir.path(), &weights, false);
        let d = decode(dir.path(), WeightFormat::F32, &Setup::Tensor(2), &PROMPT, 2);
        assert!(
            d.logits.iter().flatten().all(|x| x.is_finite()),
            "{dtype:?}"
        );
        // Same weights rounded to half precision, then widened exactly.
        let widened: Vec<(String, Tensor)> = weights
            .iter()
            .map(|(n, t)| {
                (
                    n.clone(),
                    t.to_dtype(candle_core::DType::F32).expect("widen"),
                )
            })
            .collect();
        let dir32 = TempDir::new("widened");
        write_hf(dir32.path(), &widened, false);
        let d32 = decode(dir32.path(), WeightFormat::F32, &Setup::Single, &PROMPT, 2);
        assert_eq!(d.tokens, d32.tokens, "{dtype:?}");
        assert!(max_abs_diff(&d.logits, &d32.logits) <= 1e-4, "{dtype:?}");
    }
}

#[test]
fn a_stage_reads_only_its_own_tensors() {
    // A file that lacks layer 3 entirely still serves the stages before it,
    // and the full model fails naming the first missing tensor.
    let dir = TempDir::new("partial");
    let weights: Vec<(String, Tensor)> = tiny_weights(1, false)
        .into_iter()
        .filter(|(n, _)| {
            !n.starts_with("model.layers.3.") && n != "lm_head.weight" && n != "model.norm.weight"
        })
        .collect();
    write_hf(dir.path(), &weights, false);
    let cfg = read_config(dir.path()).expect("config");
    let spec = ShardSpec {
        layers: 0..3,
        tp_rank: 0,
        tp_degree: 1,
    };
    let mut calls = Vec::new();
    let shard = load_shard(dir.path(), &spec, WeightFormat::F32, &mut |done, total| {
        calls.push((done, total))
    })
    .expect("stage 0..3 loads without layer 3");
    assert_eq!(
        calls,
        vec![(1, 3), (2, 3), (3, 3)],
        "progress once per layer"
    );
    let mut cache = shard.new_cache();
    let out = shard
        .forward(
            StageInput::Tokens(PROMPT.to_vec()),
            0,
            &mut cache,
            &mut NoAllReduce,
        )
        .expect("forward");
    assert!(matches!(out, StageOutput::Hidden(ref h) if h.dims() == [PROMPT.len(), HIDDEN]));
    let err = load_shard(
        dir.path(),
        &ShardSpec::full(&cfg),
        WeightFormat::F32,
        &mut |_, _| {},
    )
    .expect_err("the full model needs the missing tensors");
    let msg = err.to_string();
    assert!(
        msg.contains("model.safetensors") && msg.contains("model.norm.weight"),
        "{msg}"
    );
}

// ------------------------------------------------------------ errors

fn load_err(path: &Path, spec: Option<ShardSpec>, format: WeightFormat) -> String {
    let spec = spec.unwrap_or(ShardSpec {
        layers: 0..LAYERS,
        tp_rank: 0,
        tp_degree: 1,
    });
    match load_shard(path, &spec, format, &mut |_, _| {}) {
        Ok(_) => panic!("{path:?} loaded but should not"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn truncated_safetensors_fails_naming_file_and_tensor() {
    let model = tiny_model(false);
    let file = model.hf.join("model.safetensors");
    let len = std::fs::metadata(&file).expect("stat").len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .expect("open");
    f.set_len(len - 1000).expect("truncate");
    let msg = load_err(&model.hf, None, WeightFormat::F32);
    println!("{msg}");
    assert!(msg.contains("model.safetensors"), "{msg}");
    assert!(
        msg.contains("tensor ") && msg.contains("truncated"),
        "{msg}"
    );
}

#[test]
fn corrupt_safetensors_header_fails_naming_file() {
    let model = tiny_model(false);
    let file = model.hf.join("model.safetensors");
    let mut bytes = std::fs::read(&file).expect("read");
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&file, &bytes).expect("write");
    let msg = load_err(&model.hf, None, WeightFormat::F32);
    assert!(
        msg.contains("model.safetensors") && msg.contains("header"),
        "{msg}"
    );
    // Garbage JSON in an otherwise plausible header.
    let mut garbage = 16u64.to_le_bytes().to_vec();
    garbage.extend_from_slice(b"{not json at all");
    std::fs::write(&file, &garbage).expect("write");
    let msg = load_err(&model.hf, None, WeightFormat::F32);
    assert!(
        msg.contains("model.safetensors") && msg.contains("corrupt"),
        "{msg}"
    );
}

#[test]
fn mismatched_config_fails_naming_the_tensor() {
    let model = tiny_model(false);
    let text = config_json(false).replace(
        &format!("\"intermediate_size\": {FFN}"),
        "\"intermediate_size\": 96",
    );
    std::fs::write(model.hf.join("config.json"), text).expect("config");
    let msg = load_err(&model.hf, None, WeightFormat::F32);
    assert!(
        msg.contains("model.safetensors")
            && msg.contains("mlp.gate_proj.weight")
            && msg.contains("shape"),
        "{msg}"
    );
}

#[test]
fn truncated_gguf_fails_naming_file_and_tensor() {
    let model = tiny_model(false);
    let len = std::fs::metadata(&model.gguf_q8).expect("stat").len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&model.gguf_q8)
        .expect("open");
    f.set_len(len - 500).expect("truncate");
    for format in [WeightFormat::F32, WeightFormat::Quantized] {
        let msg = load_err(&model.gguf_q8, None, format);
        println!("{msg}");
        assert!(
            msg.contains("tiny-q8_0.gguf") && msg.contains("tensor ") && msg.contains("truncated"),
            "{msg}"
        );
    }
    // Cut inside the header: the file is named, there is no tensor yet.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&model.gguf_f32)
        .expect("open");
    f.set_len(200).expect("truncate");
    let msg = load_err(&model.gguf_f32, None, WeightFormat::F32);
    assert!(
        msg.contains("tiny-f32.gguf") && msg.contains("GGUF header"),
        "{msg}"
    );
}

#[test]
fn garbage_files_and_missing_paths_fail_naming_the_path() {
    let dir = TempDir::new("garbage");
    let garbage = dir.path().join("model.gguf");
    let mut rng = Rng(engine::testing::Rng(99));
    let bytes: Vec<u8> = (0..4096)
        .map(|_| (rng.next_f32() * 127.0) as i8 as u8)
        .collect();
    std::fs::write(&garbage, &bytes).expect("write");
    let msg = load_err(&garbage, None, WeightFormat::F32);
    assert!(msg.contains("model.gguf"), "{msg}");
    // GGUF magic followed by garbage.
    let mut gguf_garbage = b"GGUF".to_vec();
    gguf_garbage.extend_from_slice(&bytes);
    std::fs::write(&garbage, &gguf_garbage).expect("write");
    let msg = load_err(&garbage, None, WeightFormat::F32);
    assert!(msg.contains("model.gguf") && msg.contains("GGUF"), "{msg}");
    let missing = dir.path().join("nope.gguf");
    let msg = load_err(&missing, None, WeightFormat::F32);
    assert!(msg.contains("nope.gguf"), "{msg}");
    assert!(read_config(&missing).is_err());
    let empty_dir = dir.path().join("empty");
    std::fs::create_dir_all(&empty_dir).expect("dir");
    std::fs::write(empty_dir.join("config.json"), config_json(false)).expect("config");
    let msg = load_err(&empty_dir, None, WeightFormat::F32);
    assert!(msg.contains("model.safetensors"), "{msg}");
}

#[test]
fn unsupported_architecture_and_format_are_clear_errors() {
    let dir = TempDir::new("arch");
    let weights = tiny_weights(1, false);
    let gpt2 = dir.path().join("gpt2.gguf");
    write_gguf(&gpt2, &weights, GgmlDType::F32, "gpt2");
    let err = read_config(&gpt2).expect_err("gpt2 is not llama");
    assert!(matches!(err, EngineError::Unsupported(_)), "{err}");
    assert!(err.to_string().contains("gpt2"), "{err}");
    std::fs::write(
        dir.path().join("config.json"),
        config_json(false).replace("\"llama\"", "\"gpt2\""),
    )
    .expect("config");
    let err = read_config(dir.path()).expect_err("gpt2 config");
    assert!(
        err.to_string().contains("unsupported architecture"),
        "{err}"
    );
    let model = tiny_model(false);
    let msg = load_err(&model.hf, None, WeightFormat::Quantized);
    assert!(msg.contains("GGUF"), "{msg}");
}

#[test]
fn indivisible_tensor_degree_names_the_valid_degrees() {
    let model = tiny_model(false);
    let cfg = read_config(&model.gguf_f32).expect("config");
    assert_eq!(cfg.valid_tensor_degrees(), vec![1, 2]);
    for degree in [3, 4] {
        let spec = ShardSpec {
            layers: 0..LAYERS,
            tp_rank: 0,
            tp_degree: degree,
        };
        let msg = load_err(&model.gguf_f32, Some(spec), WeightFormat::F32);
        assert!(
            msg.contains(&format!("tensor degree {degree}")) && msg.contains("valid degrees: 1, 2"),
            "{msg}"
        );
    }
    let bad_range = ShardSpec {
        layers: 2..9,
        tp_rank: 0,
        tp_degree: 1,
    };
    let msg = load_err(&model.hf, Some(bad_range), WeightFormat::F32);
    assert!(msg.contains("layer range 2..9"), "{msg}");
}

#[test]
fn misuse_of_forward_is_an_error_not_a_panic() {
    let model = tiny_model(false);
    let cfg = read_config(&model.hf).expect("config");
    let stages: Vec<Shard> = ShardSpec::pipeline_stages(&cfg, 2)
        .iter()
        .map(|s| load(&model.hf, s, WeightFormat::F32))
        .collect();
    let (first, second) = (&stages[0], &stages[1]);
    let mut cache = first.new_cache();
    let ar = &mut NoAllReduce;
    // Out-of-vocabulary id, empty input, wrong position.
    assert!(first
        .forward(StageInput::Tokens(vec![VOCAB as u32]), 0, &mut cache, ar)
        .is_err());
    assert!(first
        .forward(StageInput::Tokens(vec![]), 0, &mut cache, ar)
        .is_err());
    assert!(first
        .forward(StageInput::Tokens(vec![1]), 5, &mut cache, ar)
        .is_err());
    // Wrong kind of input for the stage, wrong hidden width.
    let hidden = Tensor::zeros((2, HIDDEN), candle_core::DType::F32, &Device::Cpu).expect("zeros");
    assert!(first
        .forward(StageInput::Hidden(hidden.clone()), 0, &mut cache, ar)
        .is_err());
    let mut cache2 = second.new_cache();
    assert!(second
        .forward(StageInput::Tokens(vec![1]), 0, &mut cache2, ar)
        .is_err());
    let narrow =
        Tensor::zeros((2, HIDDEN - 1), candle_core::DType::F32, &Device::Cpu).expect("zeros");
    assert!(second
        .forward(StageInput::Hidden(narrow), 0, &mut cache2, ar)
        .is_err());
    // A cache of another shard.
    let full = load(&model.hf, &ShardSpec::full(&cfg), WeightFormat::F32);
    let mut wrong_cache = full.new_cache();
    assert!(first
        .forward(StageInput::Tokens(vec![1]), 0, &mut wrong_cache, ar)
        .is_err());
    // Past the context length.
    let long = vec![1u32; 257];
    assert!(first
        .forward(StageInput::Tokens(long), 0, &mut cache, ar)
        .is_err());
    // The cache is still usable after rejected calls; positions continue.
    assert!(matches!(
        first.forward(StageInput::Tokens(vec![1, 2]), 0, &mut cache, ar),
        Ok(StageOutput::Hidden(_))
    ));
    assert_eq!(cache.seq_len(), 2);
    assert!(second
        .forward(StageInput::Hidden(hidden), 0, &mut cache2, ar)
        .is_ok());
}

#[test]
fn prefill_in_pieces_equals_prefill_at_once() {
    // Chunked prefill exercises the causal mask with a cache offset.
    let model = tiny_model(false);
    let cfg = read_config(&model.hf).expect("config");
    let shard = load(&model.hf, &ShardSpec::full(&cfg), WeightFormat::F32);
    let run = |chunks: &[&[u32]]| {
        let mut cache = shard.new_cache();
        let mut pos = 0;
        let mut last = None;
        for chunk in chunks {
            last = Some(
                shard
                    .forward(
                        StageInput::Tokens(chunk.to_vec()),
                        pos,
                        &mut cache,
                        &mut NoAllReduce,
                    )
                    .expect("forward"),
            );
            pos += chunk.len();
        }
        logits_of(last.expect("ran"))
    };
    let once = run(&[&PROMPT]);
    let pieces = run(&[&PROMPT[..2], &PROMPT[2..3], &PROMPT[3..]]);
    let diff = max_abs_diff(&[once], &[pieces]);
    assert!(diff <= 1e-4, "{diff}");
}

#[test]
fn shard_and_cache_can_move_between_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Shard>();
    assert_send_sync::<engine::model::KvCache>();
}

// ------------------------------------------------------------ wire format

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn wire_never_panics_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        // Random input either decodes to a tensor whose encoding is exactly
        // the input, or is an error.
        if let Ok(t) = tensor_from_bytes(&bytes) {
            prop_assert_eq!(tensor_to_bytes(&t).expect("re-encode"), bytes);
        }
    }

    #[test]
    fn wire_round_trips_and_rejects_every_truncation(
        rows in 0usize..5,
        cols in 0usize..7,
        seed in any::<u64>(),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut rng = Rng(engine::testing::Rng(seed));
        let t = rng.tensor(&[rows, cols], 100.0, 0.0);
        let bytes = tensor_to_bytes(&t).expect("encode");
        let back = tensor_from_bytes(&bytes).expect("decode");
        prop_assert_eq!(back.dims(), t.dims());
        prop_assert_eq!(back.to_vec2::<f32>().expect("rows"), t.to_vec2::<f32>().expect("rows"));
        let cut = cut.index(bytes.len());
        prop_assert!(tensor_from_bytes(&bytes[..cut]).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        prop_assert!(tensor_from_bytes(&longer).is_err());
    }
}

// ------------------------------------------------------------ SmolLM2

/// The real model, when `scripts/fetch-model.sh` has fetched it.
fn smollm2() -> Option<PathBuf> {
    engine::testing::smollm2_gguf()
}

#[test]
fn smollm2_single_pipeline_and_tensor_agree() {
    let Some(path) = smollm2() else { return };
    let cfg = read_config(&path).expect("config");
    assert_eq!(
        (
            cfg.n_layers,
            cfg.n_heads,
            cfg.n_kv_heads,
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.vocab_size
        ),
        (30, 9, 3, 576, 1536, 49152)
    );
    assert_eq!(cfg.rope_theta, 100_000.0);
    assert!(cfg.tie_word_embeddings);
    assert_eq!(cfg.valid_tensor_degrees(), vec![1, 3]);

    // Finite logits of the right shape for ids [1, 2, 3].
    {
        let shard = load(&path, &ShardSpec::full(&cfg), WeightFormat::F32);
        let mut cache = shard.new_cache();
        let out = shard
            .forward(
                StageInput::Tokens(vec![1, 2, 3]),
                0,
                &mut cache,
                &mut NoAllReduce,
            )
            .expect("forward");
        let StageOutput::Logits(logits) = out else {
            panic!("single shard gives logits")
        };
        assert_eq!(logits.dims(), &[49152]);
        let v = logits.to_vec1::<f32>().expect("logits");
        assert!(v.iter().all(|x| x.is_finite()));
    }

    let prompt = [28u32, 1234, 9843];
    let steps = 6;
    let single = decode(&path, WeightFormat::F32, &Setup::Single, &prompt, steps);
    assert!(single.logits.iter().all(|l| l.len() == 49152));
    println!("SmolLM2 f32 greedy after {prompt:?}: {:?}", single.tokens);
    for setup in [Setup::Pipeline(2), Setup::Tensor(3)] {
        let other = decode(&path, WeightFormat::F32, &setup, &prompt, steps);
        let diff = max_abs_diff(&other.logits[..1], &single.logits[..1]);
        println!(
            "SmolLM2 f32 {setup:?}: prompt logits max |diff| = {diff:e}, tokens {:?}",
            other.tokens
        );
        assert!(diff <= 1e-3, "{setup:?}: {diff}");
        assert_eq!(other.tokens, single.tokens, "{setup:?}");
    }

    // The quantized path. Pipeline stages run the very same operations, so
    // they agree bit for bit. Tensor ranks sum partials in another order;
    // QMatMul rounds every activation to 8 bits, which usually absorbs that
    // (bit-identical logits) until one activation lands on the other side
    // of a rounding boundary, and then the logits move by a few tenths on
    // a range of ±30. Greedy tokens stay the same.
    let q_single = decode(
        &path,
        WeightFormat::Quantized,
        &Setup::Single,
        &prompt,
        steps,
    );
    println!(
        "SmolLM2 quantized greedy after {prompt:?}: {:?}",
        q_single.tokens
    );
    let range = q_single
        .logits
        .iter()
        .flatten()
        .fold(0f32, |m, x| m.max(x.abs()));
    for (setup, tolerance) in [(Setup::Pipeline(2), 0.0), (Setup::Tensor(3), 0.05 * range)] {
        let q_other = decode(&path, WeightFormat::Quantized, &setup, &prompt, steps);
        assert_eq!(q_other.tokens, q_single.tokens, "quantized {setup:?}");
        let diff = max_abs_diff(&q_other.logits, &q_single.logits);
        println!("SmolLM2 quantized {setup:?}: max |diff| = {diff:e} (max |logit| {range:.1})");
        assert!(diff <= tolerance, "quantized {setup:?}: {diff}");
    }
    let q_vs_f32 = max_abs_diff(&q_single.logits[..1], &single.logits[..1]);
    println!("SmolLM2 quantized vs f32 prompt logits: max |diff| = {q_vs_f32:e}");
    // Q4_1 is far coarser than f32, but this short continuation is not a
    // close call for the model.
    assert_eq!(
        q_single.tokens, single.tokens,
        "quantized and f32 greedy prefixes"
    );
}

/// A sliding window of `w` positions, checked from first principles: in a
/// one-layer model, position `i` sees only the keys and values of tokens
/// `i-w+1..=i`, and RoPE scores depend only on relative positions, so its
/// logits are the last-position logits of those `w` tokens alone fed to the
/// same model without a window. Fed whole, in chunks and one token at a time
/// (the windowed mask on every path of the attention kernel).
#[test]
fn sliding_window_sees_exactly_the_last_w_positions() {
    const W: usize = 4;
    let weights: Vec<(String, Tensor)> = tiny_weights(11, false)
        .into_iter()
        .filter(|(name, _)| {
            !name.starts_with("model.layers.") || name.starts_with("model.layers.0.")
        })
        .collect();
    let dir = TempDir::new("window");
    let write = |name: &str, window: Option<usize>| -> std::path::PathBuf {
        let path = dir.path().join(name);
        std::fs::create_dir_all(&path).expect("dir");
        let mut config: serde_json::Value =
            serde_json::from_str(&config_json(false)).expect("config json");
        config["model_type"] = "mistral".into();
        config["architectures"] = serde_json::json!(["MistralForCausalLM"]);
        config["num_hidden_layers"] = 1.into();
        config["sliding_window"] = window.map_or(serde_json::Value::Null, Into::into);
        std::fs::write(path.join("config.json"), config.to_string()).expect("write config");
        let map: HashMap<String, Tensor> = weights.iter().cloned().collect();
        candle_core::safetensors::save(&map, path.join("model.safetensors")).expect("save");
        path
    };
    let windowed = write("windowed", Some(W));
    let plain = write("plain", None);
    let tokens: Vec<u32> = (0..12).map(|i| (i * 7 + 3) % VOCAB as u32).collect();
    let load_full = |path: &Path| {
        let cfg = read_config(path).expect("config");
        load(path, &ShardSpec::full(&cfg), WeightFormat::F32)
    };
    let (windowed, plain) = (load_full(&windowed), load_full(&plain));
    let expected: Vec<Vec<f32>> = (0..tokens.len())
        .map(|i| {
            let mut cache = plain.new_cache();
            let seen = tokens[(i + 1).saturating_sub(W)..=i].to_vec();
            logits_of(
                plain
                    .forward(StageInput::Tokens(seen), 0, &mut cache, &mut NoAllReduce)
                    .expect("forward"),
            )
        })
        .collect();
    for chunks in [vec![12], vec![5, 3, 4], vec![1; 12]] {
        let mut cache = windowed.new_cache();
        let mut rows = Vec::new();
        let mut start = 0;
        for n in &chunks {
            let out = windowed
                .forward_logits(
                    StageInput::Tokens(tokens[start..start + n].to_vec()),
                    start,
                    &mut cache,
                    &mut NoAllReduce,
                    Logits::All,
                )
                .expect("forward a chunk");
            match out {
                StageOutput::Logits(t) => rows.extend(t.to_vec2::<f32>().expect("rows")),
                StageOutput::Hidden(_) => panic!("the full model returned hidden states"),
            }
            start += n;
        }
        let diff = max_abs_diff(&rows, &expected);
        assert!(diff < 1e-4, "chunks {chunks:?}: rows differ by {diff}");
    }
    // And the window matters: without it, the last position sees all 12.
    let mut cache = plain.new_cache();
    let all = logits_of(
        plain
            .forward(
                StageInput::Tokens(tokens.clone()),
                0,
                &mut cache,
                &mut NoAllReduce,
            )
            .expect("forward"),
    );
    let moved = max_abs_diff(&[all], &expected[11..]);
    assert!(
        moved > 1e-2,
        "the window changed nothing ({moved}): the test proves nothing"
    );
}
