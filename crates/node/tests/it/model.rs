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

/// `shardvisor run` as a newcomer types it: no `--model` and no
/// `--max-tokens`. It runs the model `scripts/fetch-model.sh` fetched (found
/// through `SHARDVISOR_MODELS`, from a directory without `./models`), and
/// the answer goes on past 16 tokens to the end of the model's turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_defaults_to_the_fetched_model_and_the_end_of_the_turn() {
    let Some(model) = smollm2() else { return };
    let models = model.parent().expect("models dir");
    let cwd = fresh_dir("run-defaults");
    let out = watchdog(
        "shardvisor run",
        LONG,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_shardvisor"))
            .args(["run", "Explain in two sentences why the sky is blue."])
            .env(
                "SHARDVISOR_MODELS",
                std::path::absolute(models).expect("absolute"),
            )
            .current_dir(&cwd)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("spawn shardvisor run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stderr}");
    let fetched = std::path::absolute(&model).expect("absolute");
    assert!(
        stderr.contains(&format!("of {} with 2 runners", fetched.display())),
        "run did not use the fetched model: {stderr}"
    );
    let tail = stderr
        .split("\n[")
        .nth(1)
        .and_then(|s| s.split(']').next())
        .unwrap_or_else(|| panic!("no summary line: {stderr}"));
    let (tokens, reason) = tail.split_once(" tokens, finish_reason=").expect("summary");
    let tokens: u32 = tokens.parse().expect("token count");
    assert_eq!(
        reason, "stop",
        "the answer should end at the end of the turn: {stderr}"
    );
    assert!(tokens > 16, "only {tokens} tokens: {stdout}");
    assert!(stdout.trim().len() > 40, "{stdout}");
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
    // A truncated weights file: the instance fails in loading, naming the
    // file, at once: under the default restart policy (5 restarts) it is
    // not restarted, since every restart would fail the same way.
    let cut = fresh_dir("cut").join("model");
    engine::testing::write_tiny_llama(&cut, 2).unwrap();
    let weights = cut.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let id = node.create(json!({"model": cut, "runners": 2})).await;
    let v = node.wait_state(&id, &["failed"], LONG).await;
    let message = v["failure"]["message"].as_str().unwrap();
    assert!(message.contains("phase loading"), "{message}");
    assert!(message.contains("model.safetensors"), "{message}");
    assert_eq!(v["failure"]["recurs"], true, "{v}");
    // It stays failed: no restart follows.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, v) = node.call("GET", &format!("/instance/{id}"), None).await;
    assert_eq!(v["state"]["state"], "failed", "{v}");
    assert_eq!(v["restarts"], 0, "{v}");
    let cause = v["state"]["cause"].as_str().unwrap_or_default();
    assert!(cause.contains("not restarted"), "{v}");
    // A tokenizer from another model: it has an id (an added token) past
    // the model's embedding rows. Loading fails at once, naming the file
    // and both counts, and is not restarted.
    let other_tok = fresh_dir("vocab").join("model");
    engine::testing::write_tiny_llama(&other_tok, 4).unwrap();
    let tok_path = other_tok.join("tokenizer.json");
    let mut tok: Value =
        serde_json::from_str(&std::fs::read_to_string(&tok_path).unwrap()).unwrap();
    let rows = engine::testing::TINY_VOCAB;
    tok["added_tokens"].as_array_mut().unwrap().push(json!({
        "id": rows, "content": "<|extra|>", "single_word": false, "lstrip": false,
        "rstrip": false, "normalized": false, "special": true
    }));
    std::fs::write(&tok_path, tok.to_string()).unwrap();
    let id = node.create(json!({"model": other_tok, "runners": 2})).await;
    let v = node.wait_state(&id, &["failed"], LONG).await;
    let message = v["failure"]["message"].as_str().unwrap();
    assert!(message.contains("phase loading"), "{message}");
    assert!(
        message.contains(&tok_path.display().to_string())
            && message.contains(&format!("ids up to {rows}"))
            && message.contains(&format!("{rows} token rows"))
            && message.contains("vocab_size in"),
        "{message}"
    );
    assert_eq!(v["failure"]["recurs"], true, "{v}");
    // A model without a chat template (a base model) loads and serves text
    // completions; a chat request to it is a 400 saying why.
    let base = fresh_dir("base").join("model");
    engine::testing::write_tiny_llama(&base, 3).unwrap();
    let config_path = base.join("tokenizer_config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let plain = create_ready(&node, json!({"model": base, "runners": 2})).await;
    let (status, v) = node
        .call(
            "POST",
            "/v1/completions",
            Some(json!({"model": plain, "prompt": "once upon", "max_tokens": 4})),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let n = v["usage"]["completion_tokens"].as_u64().unwrap_or(0);
    assert!((1..=4).contains(&n), "{v}");
    let (status, v) = node
        .call(
            "POST",
            "/v1/chat/completions",
            Some(json!({"model": plain, "messages": [{"role": "user", "content": "hi"}]})),
        )
        .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["code"], "no_chat_template", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/v1/completions"),
        "{v}"
    );
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
            prefix.iter().any(|p| answers[0].starts_with(p)),
            "{weights}: {:?} starts with none of {prefix:?}",
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
const GGUF_PREFIX: &[&str] = &["L'Étoile, la Marseillaise"];
/// The same with every matrix requantized to Q8_0 (the Q4_1 levels rounded
/// once more). The first token is the near-tie above, and Q8_0 lands on
/// either side of it depending on the machine: "L'Étoile, la Cité" was
/// recorded on one x86-64 machine, the f32 answer on an AMD EPYC with
/// AVX-512 (the same binary, built for x86-64-v3). Both are regression pins
/// of this engine's own output, not an oracle's.
const Q8_0_PREFIX: &[&str] = &["L'Étoile, la Cité", "The capital of France is Paris."];

/// A prompt fed in chunks of 4 tokens gives exactly the answer of the same
/// prompt fed in one step (f32: the same sums in the same order per
/// position), in every layout: single, pipeline (the last stage answers
/// `Prefilled` for all but the last chunk) and tensor. The reference is the
/// one-step single runner, a path that predates chunking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_prefill_matches_one_step_prefill_in_every_layout() {
    let model = tiny_model("chunked").to_string_lossy().to_string();
    let node = TestNode::start("chunked");
    let prompt = "the quick brown fox jumps over the lazy dog and keeps running \
                  through the field until the sun goes down behind the hills";
    let mut answers = Vec::new();
    for (runners, sharding, chunk) in [
        (1, "pipeline", 4096),
        (1, "pipeline", 4),
        (2, "pipeline", 4),
        (3, "pipeline", 5),
        (2, "tensor", 4),
    ] {
        let id = create_ready(
            &node,
            json!({"model": model, "runners": runners, "sharding": sharding,
                   "weights": "f32", "prefill_chunk": chunk}),
        )
        .await;
        let (status, v) = node
            .call(
                "POST",
                "/v1/chat/completions",
                Some(json!({"model": id, "max_tokens": 24,
                            "messages": [{"role": "user", "content": prompt}]})),
            )
            .await;
        assert_eq!(status, 200, "{v}");
        let prompt_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
        assert!(
            prompt_tokens > 3 * 4,
            "the prompt spans several chunks: {v}"
        );
        answers.push((
            format!("{sharding}-{runners} chunk {chunk}"),
            v["choices"][0]["message"]["content"].clone(),
        ));
        let report = node.delete(&id, "").await;
        assert_eq!(report["errors"], json!([]), "{report}");
    }
    for (name, text) in &answers[1..] {
        assert_eq!(
            text, &answers[0].1,
            "{name} differs from a one-step prefill"
        );
    }
    node.assert_quiet();
}

/// The typed refusals of a model instance reach the client as OpenAI's
/// codes, streamed or not, and the instance keeps serving: a prompt plus
/// `max_tokens` beyond the context (the tiny model's 1024) is
/// `context_length_exceeded`, a token id outside the vocabulary an
/// `invalid_value` naming the prompt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_prompts_are_400s_and_the_instance_keeps_serving() {
    let model = tiny_model("refused").to_string_lossy().to_string();
    let node = TestNode::start("refused");
    let id = create_ready(&node, json!({"model": model, "runners": 2})).await;
    let long = "word ".repeat(1100);
    for stream in [false, true] {
        let (status, v) = node
            .call(
                "POST",
                "/v1/chat/completions",
                Some(json!({"model": id, "stream": stream,
                            "messages": [{"role": "user", "content": long}]})),
            )
            .await;
        assert_eq!(status, 400, "stream={stream}: {v}");
        assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");
        assert_eq!(v["error"]["param"], "messages", "{v}");
        let (status, v) = node
            .call(
                "POST",
                "/v1/completions",
                Some(json!({"model": id, "stream": stream, "prompt": "hi", "max_tokens": 1024})),
            )
            .await;
        assert_eq!(status, 400, "{v}");
        assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");
        let (status, v) = node
            .call(
                "POST",
                "/v1/completions",
                Some(json!({"model": id, "stream": stream, "prompt": [1, 2, 999_999]})),
            )
            .await;
        assert_eq!(status, 400, "{v}");
        assert_eq!(v["error"]["code"], "invalid_value", "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap_or("")
                .contains("999999"),
            "{v}"
        );
    }
    // n choices with their logprobs (the legacy shape; SmolLM2's text is
    // checked against the tokens in the openai SDK test).
    let (status, v) = node
        .call(
            "POST",
            "/v1/completions",
            Some(
                json!({"model": id, "prompt": "hi there", "max_tokens": 5, "n": 2,
                        "temperature": 1.0, "seed": 3, "logprobs": 2}),
            ),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let choices = v["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 2, "{v}");
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i, "{v}");
        let lp = &c["logprobs"];
        let n = lp["tokens"].as_array().map_or(0, Vec::len);
        assert_eq!(n, 5, "one entry per generated token: {v}");
        for (k, top) in lp["top_logprobs"].as_array().unwrap().iter().enumerate() {
            let top = top.as_object().expect("a map");
            assert!(!top.is_empty() && top.len() <= 2, "{v}");
            let best = top
                .values()
                .filter_map(Value::as_f64)
                .fold(f64::MIN, f64::max);
            let chosen = lp["token_logprobs"][k].as_f64().expect("a logprob");
            assert!(chosen <= 0.0 && chosen <= best + 1e-6, "{v}");
        }
    }
    assert_eq!(v["usage"]["completion_tokens"], 10, "{v}");
    let report = node.delete(&id, "").await;
    assert_eq!(report["errors"], json!([]), "{report}");
    node.assert_quiet();
}

/// A prompt of `tokens` SmolLM2 tokens (counted with the model's own
/// tokenizer, before the chat template adds its few).
fn prompt_of(model: &std::path::Path, tokens: usize) -> String {
    let mut file = std::fs::File::open(model).expect("open model");
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).expect("gguf");
    let tokenizer = engine::tokenizer::Tokenizer::from_gguf(&content).expect("tokenizer");
    let sentence = "The river ran past the old mill, and the miller counted sacks of grain \
                    while his daughter read about ships, stars and distant cities. ";
    let mut text = String::new();
    while tokenizer.encode(&text, false).expect("encode").len() < tokens {
        text.push_str(sentence);
    }
    text
}

/// (b) Long prompts are work, not hangs: with default timeouts (a 30 s
/// stall bound), a chat whose prompt fills 7/8 of SmolLM2's 8,192-token
/// context completes on single and pipeline-2 instances, the instance never
/// fails or restarts, and a short chat sent meanwhile completes too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_prompt_completes_and_a_short_chat_meanwhile_too() {
    let Some(model) = smollm2() else { return };
    let long = prompt_of(&model, 7 * 8192 / 8 - 64);
    let node = TestNode::start("long-prompt");
    for runners in [1, 2] {
        let id = create_ready(
            &node,
            json!({"model": model, "runners": runners, "weights": "f32"}),
        )
        .await;
        let started = std::time::Instant::now();
        let long_chat = {
            let base = node.base.clone();
            let body = json!({"model": id, "max_tokens": 4,
                              "messages": [{"role": "user", "content": long}]});
            tokio::spawn(async move {
                let url = format!("{base}/v1/chat/completions");
                let response = node::client::request("POST", &url, Some(body.to_string()))
                    .await
                    .expect("long chat");
                (
                    response.0,
                    serde_json::from_str::<Value>(&response.1).expect("json"),
                )
            })
        };
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (status, short) = node
            .call(
                "POST",
                "/v1/chat/completions",
                Some(json!({"model": id, "max_tokens": 4,
                            "messages": [{"role": "user", "content": "Say hi."}]})),
            )
            .await;
        assert_eq!(status, 200, "the short chat: {short}");
        let short_done = started.elapsed();
        let (status, v) = watchdog("the long chat", Duration::from_secs(540), long_chat)
            .await
            .expect("join");
        let long_done = started.elapsed();
        assert_eq!(status, 200, "runners={runners}: {v}");
        let prompt_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
        assert!(
            (7000..=7200).contains(&prompt_tokens),
            "the prompt fills 7/8 of the context: {prompt_tokens}"
        );
        assert!(
            v["choices"][0]["finish_reason"] == "length"
                || v["choices"][0]["finish_reason"] == "stop",
            "{v}"
        );
        let view = node.instance(&id).await;
        assert_eq!(view["state"]["state"], "ready", "{view}");
        assert_eq!(view["restarts"], 0, "{view}");
        eprintln!(
            "runners={runners}: {prompt_tokens}-token prompt done in {long_done:?}, short chat in {short_done:?}"
        );
        node.delete(&id, "").await;
    }
    node.assert_quiet();
}
