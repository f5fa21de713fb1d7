//! Real model inference split across runner processes (issue: pipeline and
//! tensor parallelism): a tiny random llama the test writes itself, and the
//! real SmolLM2-135M GGUF when it is present (`scripts/fetch-model.sh`).

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{
    create_ready, first_chunk_task_id, fresh_dir, read_chat, runner_pids, tiny_model, watchdog,
    TestNode,
};

const LONG: Duration = Duration::from_secs(120);

/// The SmolLM2 GGUF, or `None` with a printed reason.
pub fn smollm2() -> Option<PathBuf> {
    engine::testing::smollm2_gguf()
}

/// Greedy completion text and finish reason of one chat.
async fn greedy(node: &TestNode, id: &str, prompt: &str, max_tokens: u32) -> (String, String) {
    let chat = watchdog("chat", LONG, async {
        read_chat(node.chat(id, prompt, max_tokens, true).await).await
    })
    .await;
    assert!(chat.errors.is_empty(), "{chat:?}");
    assert_eq!(chat.finish_reasons.len(), 1, "{chat:?}");
    (chat.text, chat.finish_reasons[0].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_answers_paris_identically_single_pipeline_and_tensor() {
    let Some(model) = smollm2() else { return };
    let model = model.to_string_lossy().to_string();
    let node = TestNode::start("paris");
    let mut answers = Vec::new();
    for (runners, sharding) in [(1, "pipeline"), (2, "pipeline"), (3, "tensor")] {
        let id = create_ready(
            &node,
            json!({"model": model, "runners": runners, "sharding": sharding, "weights": "f32"}),
        )
        .await;
        let (text, finish) = greedy(&node, &id, "What is the capital of France?", 24).await;
        println!("{sharding}-{runners}: {text:?} ({finish})");
        assert!(
            text.contains("Paris"),
            "{sharding}-{runners} answered {text:?}"
        );
        answers.push(text);
        let report = node.delete(&id, "").await;
        assert_eq!(report["errors"], json!([]), "{report}");
        assert_eq!(report["escalations"], json!([]), "{report}");
    }
    assert_eq!(answers[0], answers[1], "pipeline-2 differs from single");
    assert_eq!(answers[0], answers[2], "tensor-3 differs from single");
    node.assert_quiet();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_model_single_pipeline_and_tensor_agree_over_processes() {
    let model = tiny_model("tiny-agree");
    let model = model.to_string_lossy().to_string();
    let node = TestNode::start("tiny-agree");
    let mut answers = Vec::new();
    for (runners, sharding) in [
        (1, "pipeline"),
        (2, "pipeline"),
        (3, "pipeline"),
        (2, "tensor"),
    ] {
        let id = create_ready(
            &node,
            json!({"model": model, "runners": runners, "sharding": sharding}),
        )
        .await;
        let (text, _) = greedy(&node, &id, "hello tiny model", 32).await;
        answers.push((format!("{sharding}-{runners}"), text));
        let report = node.delete(&id, "").await;
        assert_eq!(report["errors"], json!([]), "{report}");
    }
    for (name, text) in &answers[1..] {
        assert_eq!(text, &answers[0].1, "{name} differs from single");
    }
    node.assert_quiet();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_models_get_clear_errors_and_the_node_keeps_serving() {
    let node = TestNode::start("bad-model");
    let tiny = tiny_model("bad-model");
    // Wrong path, indivisible tensor degree, bad layer ranges: refused at once.
    let cases = [
        (
            json!({"model": "/nonexistent/model.gguf", "runners": 1}),
            "neither \"scripted\" nor an existing",
        ),
        (
            json!({"model": tiny, "runners": 3, "sharding": "tensor"}),
            "valid degrees",
        ),
        (
            json!({"model": tiny, "runners": 2, "layers": [[0, 1], [2, 4]]}),
            "contiguous ranges",
        ),
    ];
    for (body, needle) in cases {
        let (status, v) = node.call("POST", "/instance", Some(body.clone())).await;
        assert_eq!(status, 400, "{body}: {v}");
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "{body}: {msg:?} lacks {needle:?}");
    }
    // An unsupported architecture in config.json.
    let other = fresh_dir("arch").join("model");
    engine::testing::write_tiny_llama(&other, 1).unwrap();
    let config_path = other.join("config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["architectures"] = json!(["MambaForCausalLM"]);
    config["model_type"] = json!("mamba");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let (status, v) = node
        .call(
            "POST",
            "/instance",
            Some(json!({"model": other, "runners": 1})),
        )
        .await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("mamba"),
        "{v}"
    );
    // A truncated weights file: the instance fails in loading, naming the file.
    let cut = fresh_dir("cut").join("model");
    engine::testing::write_tiny_llama(&cut, 2).unwrap();
    let weights = cut.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let id = node
        .create(json!({"model": cut, "runners": 2, "restart": {"max_restarts": 0}}))
        .await;
    let v = node.wait_state(&id, &["failed"], LONG).await;
    let message = v["failure"]["message"].as_str().unwrap();
    assert!(message.contains("phase loading"), "{message}");
    assert!(message.contains("model.safetensors"), "{message}");
    // The node still serves a good model.
    let good = create_ready(&node, json!({"model": tiny, "runners": 2})).await;
    let (text, _) = greedy(&node, &good, "still fine", 4).await;
    assert!(!text.is_empty());
}

async fn cancel_mid_generation(sharding: &str, runners: u32) {
    let model = tiny_model(&format!("cancel-{sharding}"));
    let node = TestNode::start(&format!("cancel-{sharding}"));
    let id = create_ready(
        &node,
        json!({"model": model, "runners": runners, "sharding": sharding}),
    )
    .await;
    // A long generation, cancelled after its first chunks; another task runs beside it.
    let mut long = node.chat(&id, "go on and on", 900, true).await;
    let task_id = first_chunk_task_id(&mut long).await;
    let other = tokio::spawn({
        let base = node.base.clone();
        let id = id.clone();
        async move {
            let body = json!({"model": id, "messages": [{"role": "user", "content": "short"}], "max_tokens": 8, "stream": true});
            let stream = node::client::stream(
                "POST",
                &format!("{base}/v1/chat/completions"),
                Some(body.to_string()),
            )
            .await
            .unwrap();
            read_chat(stream).await
        }
    });
    let (status, v) = node
        .call("POST", &format!("/v1/cancel/{task_id}"), None)
        .await;
    assert_eq!(status, 200, "{v}");
    let rest = watchdog("cancelled", LONG, read_chat(long)).await;
    assert_eq!(rest.finish_reasons, ["cancelled"], "{rest:?}");
    let other = watchdog("other task", LONG, other).await.unwrap();
    assert_eq!(other.finish_reasons.len(), 1, "{other:?}");
    assert!(other.errors.is_empty(), "{other:?}");
    let report = node.delete(&id, "").await;
    assert_eq!(report["errors"], json!([]), "{report}");
    node.assert_quiet();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_mid_generation_pipeline() {
    cancel_mid_generation("pipeline", 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_mid_generation_tensor() {
    cancel_mid_generation("tensor", 2).await;
}

async fn kill_rank_mid_generation(sharding: &str, runners: u32, victim: usize) {
    let model = tiny_model(&format!("kill-{sharding}"));
    let node = TestNode::start(&format!("kill-{sharding}"));
    let body = json!({"model": model, "runners": runners, "sharding": sharding, "restart": {"max_restarts": 0}, "timeouts": {"ping_interval_ms": 100, "ping_timeout_ms": 500}});
    let id = create_ready(&node, body).await;
    let v = node.instance(&id).await;
    let pid = v["runners"][victim]["pid"].as_u64().unwrap() as i32;
    let mut stream = node.chat(&id, "keep talking", 200, true).await;
    stream.next_data().await.unwrap();
    // SAFETY: kill(2) on a runner pid this test's node spawned.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let rest = watchdog(
        "error after the kill",
        Duration::from_secs(10),
        read_chat(stream),
    )
    .await;
    assert_eq!(rest.errors.len(), 1, "{rest:?}");
    assert!(
        rest.errors[0].contains(&format!("rank {victim}")),
        "{rest:?}"
    );
    let v = node.wait_state(&id, &["failed"], LONG).await;
    assert!(
        v["failure"]["message"]
            .as_str()
            .unwrap()
            .contains(&format!("{id}/{victim}")),
        "{v}"
    );
    watchdog("runners gone", Duration::from_secs(10), async {
        while !runner_pids(&id).is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_a_pipeline_rank_mid_generation() {
    kill_rank_mid_generation("pipeline", 3, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_a_tensor_rank_mid_generation() {
    kill_rank_mid_generation("tensor", 2, 1).await;
}

/// Peak resident memory of a process, from `/proc/<pid>/status`.
fn peak_rss_kb(pid: u64) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM for pid {pid}"))
}

async fn runner_peaks(node: &TestNode, id: &str) -> Vec<u64> {
    let v = node.instance(id).await;
    v["runners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| peak_rss_kb(r["pid"].as_u64().unwrap()))
        .collect()
}

/// (f) Each runner of a 2-stage pipeline peaks at ≤ 60% of a single-process
/// runner of the same model (f32, after loading and warm-up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_runners_hold_a_share_of_the_model_memory() {
    let Some(model) = smollm2() else { return };
    let node = TestNode::start("rss");
    let single = create_ready(
        &node,
        json!({"model": model, "runners": 1, "weights": "f32"}),
    )
    .await;
    let single_peak = runner_peaks(&node, &single).await[0];
    node.delete(&single, "").await;
    let pipe = create_ready(
        &node,
        json!({"model": model, "runners": 2, "sharding": "pipeline", "weights": "f32"}),
    )
    .await;
    let peaks = runner_peaks(&node, &pipe).await;
    println!("peak RSS: single {single_peak} kB, pipeline-2 {peaks:?} kB");
    for (rank, peak) in peaks.iter().enumerate() {
        let share = *peak as f64 / single_peak as f64;
        assert!(
            share <= 0.60,
            "rank {rank} peaks at {peak} kB = {:.1}% of single ({single_peak} kB)",
            share * 100.0
        );
    }
    node.delete(&pipe, "").await;
}

/// (c) The quantized paths (GGUF blocks as stored, and requantized to Q8_0,
/// the default): single and pipeline-2 give the same greedy answer, and it
/// starts with a fixed prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_quantized_single_and_pipeline_agree_on_a_fixed_prefix() {
    let Some(model) = smollm2() else { return };
    let node = TestNode::start("quantized");
    for (weights, prefix) in [("gguf", GGUF_PREFIX), ("q8_0", Q8_0_PREFIX)] {
        let mut answers = Vec::new();
        for runners in [1, 2] {
            let id = create_ready(
                &node,
                json!({"model": model, "runners": runners, "weights": weights}),
            )
            .await;
            let (text, _) = greedy(&node, &id, "What is the capital of France?", 12).await;
            println!("{weights} runners={runners}: {text:?}");
            answers.push(text);
            node.delete(&id, "").await;
        }
        assert_eq!(
            answers[0], answers[1],
            "pipeline-2 differs from single with {weights} weights"
        );
        assert!(
            answers[0].starts_with(prefix),
            "{weights}: {:?} does not start with {prefix:?}",
            answers[0]
        );
    }
    node.assert_quiet();
}

/// The greedy start of SmolLM2 Q4_1 (blocks kept as stored) for the Paris
/// prompt, recorded from a run of this test on the x86-64 development
/// machine. llama.cpp (llama-cpp-python 0.3.36, same file, greedy) answers
/// the same 24 tokens: "L'Étoile, la Marseillaise, la femme, la femme au
/// martyre, la". It differs from the f32 answer ("The capital of France is
/// Paris."): the first token is a near-tie in f32 ("The" 25.33 vs "L" 25.24)
/// and quantized matmuls round activations to 8 bits, which moves logits by
/// ~1.
const GGUF_PREFIX: &str = "L'Étoile, la Marseillaise";
/// The same with every matrix requantized to Q8_0 (the Q4_1 levels rounded
/// once more): the same first tokens, then it drifts.
const Q8_0_PREFIX: &str = "L'Étoile, la Cité";
