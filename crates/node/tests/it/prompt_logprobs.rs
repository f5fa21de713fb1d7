//! Prompt log-probabilities (a text completion's `echo` with `logprobs`,
//! what evaluation harnesses' loglikelihood requests are) against
//! llama.cpp: `prompt_logprobs.py` beside this file asks single,
//! pipeline-2 and tensor-3 SmolLM2 instances through the official `openai`
//! SDK and scores the same prompts with `llama-cpp-python` on the same GGUF
//! file (blocks as stored, as llama.cpp holds them).
//!
//! Skips, saying why, without the model, `openai` or `llama_cpp`; fails
//! instead where `SHARDVISOR_REQUIRE_MODEL=1` (CI installs all three).

use std::time::Duration;

use serde_json::json;

use engine::testing::python_has;

use crate::harness::{create_ready, python_checks, TestNode};
use crate::model::smollm2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_logprobs_match_llama_cpp_in_every_layout() {
    let Some(model) = smollm2() else { return };
    if !python_has("openai", "openai") || !python_has("llama_cpp", "llama-cpp-python") {
        return;
    }
    let model = model.to_string_lossy().to_string();
    let node = TestNode::start("prompt-logprobs");
    let mut ids = Vec::new();
    for (runners, sharding) in [(1, "pipeline"), (2, "pipeline"), (3, "tensor")] {
        let body =
            json!({"model": model, "runners": runners, "sharding": sharding, "weights": "gguf"});
        ids.push(create_ready(&node, body).await);
    }
    let mut args = vec![node.base.clone(), model.clone()];
    args.extend(ids.iter().cloned());
    python_checks("prompt_logprobs.py", &args, Duration::from_secs(240)).await;
    for id in &ids {
        let report = node.delete(id, "").await;
        assert_eq!(report["errors"], json!([]), "{report}");
    }
    node.assert_quiet();
}
