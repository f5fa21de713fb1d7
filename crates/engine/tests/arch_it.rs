//! Every architecture against llama.cpp: `arch_oracle.py` beside this file
//! writes tiny random GGUF models of each one (`llama`, Llama 3.1's
//! per-frequency RoPE factors, `qwen2` with q/k/v biases, `qwen3` with q/k
//! norms), quantizes them with llama.cpp's own quantizer (Q8_0, Q4_K_M,
//! Q6_K; `llama` also to Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K_M, Q5_K_M, F16
//! and BF16, so every block type candle multiplies is covered) and records llama.cpp's logits of every prompt position and its 32
//! greedy tokens; it also writes the same weights as Hugging Face
//! directories (`qwen2`, `qwen3`, `mistral`, Llama 3.1's `rope_scaling`),
//! which must answer as llama.cpp does on the f32 GGUF. Here each file runs
//! single, as pipeline-2 and as tensor-2, and must agree.
//!
//! Skips, saying why, without the `gguf` and `llama-cpp-python` Python
//! packages; fails instead where `SHARDVISOR_REQUIRE_MODEL=1` (CI installs
//! them).

use std::path::{Path, PathBuf};
use std::sync::mpsc;

use candle_core::Tensor;
use engine::loader::{load_shard, read_config, WeightFormat};
use engine::model::{AllReduce, Logits, NoAllReduce, Shard, ShardSpec, StageInput, StageOutput};
use engine::testing::python_has;
use engine::EngineError;
use serde::Deserialize;

#[derive(Deserialize)]
struct Oracle {
    prompt: Vec<u32>,
    files: Vec<OracleFile>,
    unsupported: Vec<String>,
}

#[derive(Deserialize)]
struct OracleFile {
    arch: String,
    file: String,
    ftype: String,
    logits: Vec<Vec<f32>>,
    greedy: Vec<u32>,
    gaps: Vec<f32>,
}

/// Two tensor-parallel ranks on threads: each sends its partial to the
/// other and both add them in rank order, so they see the same sum.
struct PairAllReduce {
    rank: usize,
    tx: mpsc::Sender<Vec<f32>>,
    rx: mpsc::Receiver<Vec<f32>>,
}

impl AllReduce for PairAllReduce {
    fn all_reduce_sum(&mut self, partial: &Tensor) -> engine::Result<Tensor> {
        let mine = partial.flatten_all()?.to_vec1::<f32>()?;
        self.tx
            .send(mine.clone())
            .map_err(|_| engine::EngineError::Compute("the other rank is gone".into()))?;
        let theirs = self
            .rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .map_err(|_| engine::EngineError::Compute("no partial from the other rank".into()))?;
        let (a, b) = if self.rank == 0 {
            (&mine, &theirs)
        } else {
            (&theirs, &mine)
        };
        let sum: Vec<f32> = a.iter().zip(b).map(|(x, y)| x + y).collect();
        Ok(Tensor::from_vec(sum, partial.shape(), partial.device())?)
    }
}

/// What one layout computed: the prompt's logits and the greedy tokens.
type Run = (Vec<Vec<f32>>, Vec<u32>);

fn rows(out: StageOutput) -> Vec<Vec<f32>> {
    match out {
        StageOutput::Logits(t) if t.rank() == 2 => t.to_vec2().expect("logits"),
        StageOutput::Logits(t) => vec![t.to_vec1().expect("logits")],
        StageOutput::Hidden(_) => panic!("a model's last stage returned hidden states"),
    }
}

/// The largest difference between two runs' logits, in standard
/// deviations of `theirs` at that position.
fn sigma_diff(ours: &[Vec<f32>], theirs: &[Vec<f32>]) -> f32 {
    ours.iter()
        .zip(theirs)
        .map(|(ours, theirs)| {
            let n = theirs.len() as f32;
            let mean = theirs.iter().sum::<f32>() / n;
            let var = theirs.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / n;
            let diff = ours
                .iter()
                .zip(theirs)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            diff / var.sqrt()
        })
        .fold(0.0, f32::max)
}

fn argmax(v: &[f32]) -> u32 {
    (0..v.len()).fold(0, |best, i| if v[i] > v[best] { i } else { best }) as u32
}

/// Runs `stages` in order (a pipeline; one stage is a single process) over
/// the prompt, then `n` greedy steps.
fn run_stages(stages: &[Shard], all_reduce: &mut dyn AllReduce, prompt: &[u32], n: usize) -> Run {
    let mut caches: Vec<_> = stages.iter().map(Shard::new_cache).collect();
    let mut step = |input: Vec<u32>, pos: usize, logits: Logits| -> StageOutput {
        let mut x = StageInput::Tokens(input);
        for (i, (stage, cache)) in stages.iter().zip(caches.iter_mut()).enumerate() {
            let want = if i + 1 == stages.len() {
                logits
            } else {
                Logits::Last
            };
            match stage
                .forward_logits(x, pos, cache, all_reduce, want)
                .expect("forward")
            {
                StageOutput::Hidden(h) => x = StageInput::Hidden(h),
                out => return out,
            }
        }
        panic!("the last stage produced no logits")
    };
    let prompt_logits = rows(step(prompt.to_vec(), 0, Logits::All));
    let mut last = prompt_logits.last().cloned().expect("a prompt row");
    let mut greedy = Vec::new();
    for i in 0..n {
        let next = argmax(&last);
        greedy.push(next);
        last = rows(step(vec![next], prompt.len() + i, Logits::Last)).remove(0);
    }
    (prompt_logits, greedy)
}

fn load(path: &Path, spec: &ShardSpec, format: WeightFormat) -> Shard {
    load_shard(path, spec, format, &mut |_, _| {})
        .unwrap_or_else(|e| panic!("{} {spec:?}: {e}", path.display()))
}

/// `(layout, run)` for single, pipeline-2 and tensor-2.
fn layouts(
    path: &Path,
    format: WeightFormat,
    prompt: &[u32],
    n: usize,
) -> Vec<(&'static str, Run)> {
    let cfg = read_config(path).expect("config");
    let single = load(path, &ShardSpec::full(&cfg), format);
    let mut out = vec![("single", run_stages(&[single], &mut NoAllReduce, prompt, n))];
    let stages: Vec<Shard> = ShardSpec::pipeline_stages(&cfg, 2)
        .iter()
        .map(|s| load(path, s, format))
        .collect();
    out.push((
        "pipeline-2",
        run_stages(&stages, &mut NoAllReduce, prompt, n),
    ));
    let ranks = ShardSpec::tensor_ranks(&cfg, 2);
    let (tx0, rx1) = mpsc::channel();
    let (tx1, rx0) = mpsc::channel();
    let ends = [(tx0, rx0), (tx1, rx1)];
    let runs: Vec<Run> = std::thread::scope(|scope| {
        let handles: Vec<_> = ranks
            .iter()
            .zip(ends)
            .enumerate()
            .map(|(rank, (spec, (tx, rx)))| {
                scope.spawn(move || {
                    let shard = load(path, spec, format);
                    let mut reduce = PairAllReduce { rank, tx, rx };
                    run_stages(&[shard], &mut reduce, prompt, n)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    });
    assert_eq!(
        runs[0],
        runs[1],
        "{}: tensor ranks disagree",
        path.display()
    );
    out.push(("tensor-2", runs.into_iter().next().expect("rank 0")));
    out
}

/// How far apart the two engines may be: the logits (in standard
/// deviations of llama.cpp's at that position), and the top-two gap of
/// llama.cpp's logits below which greedy picks may differ (logit units).
///
/// F32 files: the same sums in other orders, measured ≤ 2e-5 σ; greedy
/// tokens identical. Quantized files: both engines multiply the same blocks
/// by activations rounded to 8 bits per block, but rounding is not
/// continuous: a difference of one ulp upstream can move a value to the
/// next level, and these random models amplify it. Measured: when no value
/// lands on the other side, the two agree to ~1e-6 σ (most K-quant files);
/// when one does, by up to the size of the rounding itself (this engine's
/// blocks against its own dequantized weights, `rounding`). Q8_0 files
/// always differ so: candle rounds Q8_0 activations half away from zero
/// with a scale of 1/d, llama.cpp (AVX2) half to even with 127/max. So the
/// bound is twice `rounding`, and greedy picks may part where llama.cpp's
/// top two are within `rounding` of its spread (observed: ≤ 0.17 logits,
/// against bounds of 0.36–0.47).
fn bounds(rounding: f32, last_row: &[f32]) -> (f32, f32) {
    if rounding == 0.0 {
        return (1e-4, 0.0);
    }
    let n = last_row.len() as f32;
    let mean = last_row.iter().sum::<f32>() / n;
    let sd = (last_row.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / n).sqrt();
    (2.0 * rounding, rounding * sd)
}

#[test]
fn every_architecture_and_quantization_matches_llama_cpp() {
    if !python_has("gguf", "gguf") || !python_has("llama_cpp", "llama-cpp-python") {
        return;
    }
    // `ARCH_ORACLE_DIR` keeps the files for a look afterwards.
    let keep = std::env::var_os("ARCH_ORACLE_DIR").map(PathBuf::from);
    let dir = keep.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("engine-arch-it-{}", std::process::id()))
    });
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/arch_oracle.py");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(&dir)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "arch_oracle.py failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let oracle: Oracle =
        serde_json::from_slice(&std::fs::read(dir.join("oracle.json")).expect("oracle.json"))
            .expect("oracle.json parses");
    let mut report = Vec::new();
    let mut failures = Vec::new();
    // A type candle cannot multiply, written by llama.cpp's quantizer: a
    // clear error naming the tensor, the type and what to do.
    assert!(!oracle.unsupported.is_empty());
    for file in &oracle.unsupported {
        let path = dir.join(file);
        let err = read_config(&path).expect_err("IQ4_NL is not supported");
        let msg = err.to_string();
        assert!(
            matches!(err, EngineError::Tensor { .. })
                && msg.contains(&path.display().to_string())
                && msg.contains(".weight")
                && msg.contains("stored as IQ4_NL")
                && msg.contains("supported types: F32")
                && msg.contains("llama-quantize"),
            "{msg}"
        );
        report.push(format!("{file}: {msg}"));
    }
    for f in &oracle.files {
        let path: PathBuf = dir.join(&f.file);
        let format = match f.ftype.as_str() {
            "f32" | "hf" => WeightFormat::F32,
            _ => WeightFormat::Quantized,
        };
        // What rounding activations to 8 bits alone moves (in σ): this
        // engine with the same blocks dequantized to f32. 0 for f32 files.
        // F16 and BF16 files: this engine holds their weights as f32 and
        // multiplies exactly, while llama.cpp rounds activations to the
        // weights' type first (its CPU vec_dot type), a relative error of
        // u = 2⁻¹¹ (f16) or 2⁻⁸ (bf16) per element; the logits move by a
        // few u (measured 4.6u and 4.8u: the difference scales with u, so
        // it is that rounding), and 5u is taken as its size.
        let mut rounding = match f.ftype.as_str() {
            "f16" => 5.0 * 2f32.powi(-11),
            "bf16" => 5.0 * 2f32.powi(-8),
            _ => 0.0,
        };
        let float_file = rounding > 0.0;
        if format == WeightFormat::Quantized && !float_file {
            let cfg = read_config(&path).expect("config");
            let shards = |format| [load(&path, &ShardSpec::full(&cfg), format)];
            let (blocks, _) = run_stages(&shards(format), &mut NoAllReduce, &oracle.prompt, 0);
            let (dense, _) = run_stages(
                &shards(WeightFormat::F32),
                &mut NoAllReduce,
                &oracle.prompt,
                0,
            );
            rounding = sigma_diff(&blocks, &dense);
            report.push(format!(
                "{:<7} {:<20} this engine, blocks vs dequantized: max |Δ|/σ {rounding:.2e}; dequantized vs llama.cpp {:.2e}",
                f.arch,
                f.file,
                sigma_diff(&dense, &f.logits),
            ));
        }
        let (limit, gap_limit) = bounds(rounding, f.logits.last().expect("a prompt row"));
        for (layout, (logits, greedy)) in layouts(&path, format, &oracle.prompt, f.greedy.len()) {
            assert_eq!(logits.len(), f.logits.len(), "{} {layout}", f.file);
            let worst = sigma_diff(&logits, &f.logits);
            let same = greedy
                .iter()
                .zip(&f.greedy)
                .take_while(|(a, b)| a == b)
                .count();
            report.push(format!(
                "{:<7} {:<20} {layout:<10} max |Δ|/σ {worst:.2e}, greedy {same}/{} equal",
                f.arch,
                f.file,
                f.greedy.len()
            ));
            if worst > limit {
                failures.push(format!(
                    "{} {layout}: logits differ by {worst:.3e} σ (bound {limit:.3e})",
                    f.file
                ));
            }
            if same < f.greedy.len() {
                let gap = f.gaps[same];
                let line = format!(
                    "{} {layout}: greedy token {same} is {} where llama.cpp's is {}; llama.cpp's top-two gap there {gap:.4} (bound {gap_limit:.4})",
                    f.file, greedy[same], f.greedy[same]
                );
                if gap > gap_limit {
                    failures.push(line);
                } else {
                    report.push(format!("    a near tie: {line}"));
                }
            }
        }
    }
    println!("{}", report.join("\n"));
    if keep.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    assert!(
        failures.is_empty(),
        "{}\n\n{}",
        failures.join("\n"),
        report.join("\n")
    );
}
