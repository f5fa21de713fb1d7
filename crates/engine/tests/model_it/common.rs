//! The tiny model the tests write, and running it single, as pipeline
//! stages and as tensor-parallel ranks on threads.

pub(crate) use std::collections::HashMap;
pub(crate) use std::path::{Path, PathBuf};
pub(crate) use std::sync::{Arc, Condvar, Mutex};
pub(crate) use std::time::Duration;

pub(crate) use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
pub(crate) use candle_core::{Device, Tensor};
pub(crate) use engine::loader::{load_shard, read_config, Kernels, WeightFormat};
pub(crate) use engine::model::{
    AllReduce, Logits, NoAllReduce, Shard, ShardSpec, StageInput, StageOutput,
};
pub(crate) use engine::sampler::{Sampler, SamplingParams};
pub(crate) use engine::wire::{tensor_from_bytes, tensor_to_bytes};
pub(crate) use engine::{EngineError, Result};
pub(crate) use proptest::prelude::*;

// ------------------------------------------------------------ tiny model

pub(crate) const HIDDEN: usize = 64;
pub(crate) const FFN: usize = 128;
pub(crate) const LAYERS: usize = 4;
pub(crate) const HEADS: usize = 4;
pub(crate) const KV_HEADS: usize = 2;
pub(crate) const HEAD_DIM: usize = 16;
pub(crate) const VOCAB: usize = 97;
pub(crate) const THETA: f32 = 10_000.0;
pub(crate) const PROMPT: [u32; 5] = [3, 17, 42, 5, 88];
pub(crate) const DECODE_STEPS: usize = 32;

/// A temporary directory removed on drop.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> Self {
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

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The shared deterministic generator; its tensors cannot fail to build.
pub(crate) struct Rng(pub(crate) engine::testing::Rng);

impl Rng {
    pub(crate) fn next_f32(&mut self) -> f32 {
        self.0.next_f32()
    }

    /// Uniform in `[-scale, scale]`.
    pub(crate) fn tensor(&mut self, dims: &[usize], scale: f32, offset: f32) -> Tensor {
        self.0.tensor(dims, scale, offset).expect("random tensor")
    }
}

/// The tiny model's weights under their Hugging Face names. Linear weights
/// have variance 1/in so activations stay O(1); lm_head is larger so that
/// logits are well spread and greedy picks are not near-ties.
pub(crate) fn tiny_weights(seed: u64, tied: bool) -> Vec<(String, Tensor)> {
    tiny_weights_with_ffn(seed, tied, FFN)
}

pub(crate) fn tiny_weights_with_ffn(seed: u64, tied: bool, ffn: usize) -> Vec<(String, Tensor)> {
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

pub(crate) fn config_json(tied: bool) -> String {
    config_json_with_ffn(tied, FFN)
}

pub(crate) fn config_json_with_ffn(tied: bool, ffn: usize) -> String {
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
pub(crate) fn write_hf(dir: &Path, weights: &[(String, Tensor)], tied: bool) {
    let config = config_json_with_ffn(tied, ffn_of(weights));
    std::fs::write(dir.join("config.json"), config).expect("write config");
    let map: HashMap<String, Tensor> = weights.iter().cloned().collect();
    candle_core::safetensors::save(&map, dir.join("model.safetensors")).expect("save safetensors");
}

/// The FFN width of tiny weights.
pub(crate) fn ffn_of(weights: &[(String, Tensor)]) -> usize {
    weights
        .iter()
        .find(|(n, _)| n == "model.layers.0.mlp.gate_proj.weight")
        .map(|(_, t)| t.dims()[0])
        .expect("gate_proj")
}

/// The GGUF name of a Hugging Face tensor.
pub(crate) fn gguf_name(hf: &str) -> String {
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
pub(crate) fn llama_cpp_permute(w: &Tensor, heads: usize) -> Tensor {
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
pub(crate) fn write_gguf(
    path: &Path,
    weights: &[(String, Tensor)],
    matrix_dtype: GgmlDType,
    arch: &str,
) {
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
pub(crate) struct TinyModel {
    pub(crate) _dir: TempDir,
    pub(crate) hf: PathBuf,
    pub(crate) gguf_f32: PathBuf,
    pub(crate) gguf_q8: PathBuf,
}

pub(crate) fn tiny_model(tied: bool) -> TinyModel {
    let weights = tiny_weights(if tied { 7 } else { 1 }, tied);
    tiny_model_from(&weights, tied, if tied { "tied" } else { "untied" })
}

pub(crate) fn tiny_model_from(weights: &[(String, Tensor)], tied: bool, tag: &str) -> TinyModel {
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
pub(crate) fn successor(t: usize) -> usize {
    (5 * t + 3) % VOCAB
}

/// Random weights are maximally uncertain: their greedy picks come within
/// a few hundredths of a tie, closer than 8-bit rounding moves logits, so
/// f32 and Q8_0 runs legitimately part ways. Trained models are confident;
/// this variant imitates that: lm_head row `successor(t)` is the embedding
/// of `t` (scaled), so the residual stream's token identity decides the
/// pick by a wide margin, while the layers (their outputs halved) still
/// shape the logits and are still rounded to 8 bits.
pub(crate) fn peaked_weights(seed: u64) -> Vec<(String, Tensor)> {
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
pub(crate) struct Group {
    pub(crate) degree: usize,
    pub(crate) state: Mutex<GroupState>,
    pub(crate) cv: Condvar,
}

pub(crate) struct GroupState {
    pub(crate) generation: u64,
    pub(crate) slots: Vec<Option<Tensor>>,
    pub(crate) arrived: usize,
    pub(crate) result: Option<Tensor>,
}

pub(crate) struct ThreadAllReduce {
    pub(crate) rank: usize,
    pub(crate) group: Arc<Group>,
}

pub(crate) const ALL_REDUCE_DEADLINE: Duration = Duration::from_secs(60);

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

pub(crate) fn thread_group(degree: usize) -> Vec<ThreadAllReduce> {
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
pub(crate) enum Setup {
    Single,
    Pipeline(usize),
    Tensor(usize),
    /// Tensor parallelism inside each of two pipeline stages.
    PipelineOfTensor(usize),
}

/// Greedy decoding: logits of the prompt's last position, then of each
/// decoded token.
pub(crate) struct Decoded {
    pub(crate) tokens: Vec<u32>,
    pub(crate) logits: Vec<Vec<f32>>,
}

pub(crate) fn logits_of(out: StageOutput) -> Vec<f32> {
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
pub(crate) fn decode_pipeline(
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

pub(crate) fn load(path: &Path, spec: &ShardSpec, format: WeightFormat) -> Shard {
    load_shard(path, spec, format, &mut |_, _| {}).expect("load shard")
}

/// Decodes greedily under `setup`; for tensor parallelism every rank runs
/// the same loop on its own thread and all ranks must agree.
pub(crate) fn decode(
    path: &Path,
    format: WeightFormat,
    setup: &Setup,
    prompt: &[u32],
    steps: usize,
) -> Decoded {
    let results = on_setup(path, format, setup, |stages, ars| {
        decode_pipeline(stages, ars, prompt, steps)
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

/// Loads the stages of `setup` and calls `run` with them and their
/// all-reduces: once, or once per tensor rank, each rank on its own thread
/// (the ranks' results in rank order).
pub(crate) fn on_setup<R: Send>(
    path: &Path,
    format: WeightFormat,
    setup: &Setup,
    run: impl Fn(&[Shard], &mut [Box<dyn AllReduce>]) -> R + Sync,
) -> Vec<R> {
    let cfg = read_config(path).expect("config");
    match setup {
        Setup::Single => {
            let shard = load(path, &ShardSpec::full(&cfg), format);
            vec![run(&[shard], &mut [Box::new(NoAllReduce)])]
        }
        Setup::Pipeline(n) => {
            let stages: Vec<Shard> = ShardSpec::pipeline_stages(&cfg, *n)
                .iter()
                .map(|spec| load(path, spec, format))
                .collect();
            let mut ars: Vec<Box<dyn AllReduce>> = (0..*n)
                .map(|_| Box::new(NoAllReduce) as Box<dyn AllReduce>)
                .collect();
            vec![run(&stages, &mut ars)]
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
            let run = &run;
            std::thread::scope(|scope| {
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
                            run(&stages, &mut ars)
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("rank thread"))
                    .collect()
            })
        }
    }
}

pub(crate) fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
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
pub(crate) fn min_top2_gap(d: &Decoded) -> f32 {
    d.logits
        .iter()
        .map(|l| {
            let mut v = l.clone();
            v.sort_by(|a, b| b.total_cmp(a));
            v[0] - v[1]
        })
        .fold(f32::INFINITY, f32::min)
}
