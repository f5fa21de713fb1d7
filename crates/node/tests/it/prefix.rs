//! Prefix reuse over real runner processes: a conversation's second turn
//! starts from the KV its first turn's prompt left, counted in `/state`
//! and in OpenAI's `usage.prompt_tokens_details.cached_tokens`, and answers
//! exactly what a cold instance (prefix reuse off) answers.
//!
//! The expected texts come from that cold instance, in the same test.

use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{create_ready, watchdog, TestNode};
use crate::model::smollm2;

const LONG: Duration = Duration::from_secs(300);

const SYSTEM: &str = "You are a helpful assistant. You answer questions about geography, \
history and science briefly and politely, in plain English, in one or two sentences.";

/// A greedy chat, not streamed: its text with every token's
/// log-probabilities, and its usage.
async fn chat(node: &TestNode, id: &str, messages: &Value, max_tokens: u32) -> (Answer, Value) {
    let body = json!({"model": id, "messages": messages, "max_tokens": max_tokens,
                      "logprobs": true, "top_logprobs": 3});
    let (status, v) = watchdog(
        "chat",
        LONG,
        node.call("POST", "/v1/chat/completions", Some(body)),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no content: {v}"))
        .to_string();
    let logprobs = v["choices"][0]["logprobs"].clone();
    (Answer { text, logprobs }, v["usage"].clone())
}

/// What a chat answered: the text, and the log-probabilities of each token
/// and its runners-up, which tell KV that differs even where the greedy
/// text does not.
#[derive(Debug, PartialEq)]
struct Answer {
    text: String,
    logprobs: Value,
}

/// Test (e): in single, pipeline-2 and tensor-3 layouts (Q8_0 blocks, whose
/// matmuls are bit for bit chunk invariant), the second request of a
/// multi-turn conversation takes its first turn's prompt from the kept
/// prefix (whole attention blocks, counted as a hit), and its answer equals
/// a cold run's, log-probabilities bit for bit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_turn_reuses_the_first_turns_prompt_and_answers_as_a_cold_run() {
    let Some(model) = smollm2() else { return };
    let model = model.to_string_lossy().to_string();
    let node = TestNode::start("prefix-reuse");
    for (runners, sharding) in [(1, "pipeline"), (2, "pipeline"), (3, "tensor")] {
        let layout = format!("{sharding}-{runners}");
        let spec =
            json!({"model": model, "runners": runners, "sharding": sharding, "weights": "q8_0"});
        let warm = create_ready(&node, spec.clone()).await;
        let mut cold_spec = spec.clone();
        cold_spec["prefix_cache_mb"] = json!(0);
        let cold = create_ready(&node, cold_spec).await;

        let mut messages = json!([
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "What is the capital of France?"},
        ]);
        let (first, usage) = chat(&node, &warm, &messages, 20).await;
        assert_eq!(
            usage["prompt_tokens_details"]["cached_tokens"], 0,
            "{layout}: the first turn is cold: {usage}"
        );
        let first_prompt = usage["prompt_tokens"].as_u64().unwrap();
        assert!(
            first_prompt >= 32,
            "{layout}: the first prompt spans whole blocks: {usage}"
        );
        let (cold_first, cold_usage) = chat(&node, &cold, &messages, 20).await;
        assert_eq!(first, cold_first, "{layout}: the first turn");
        assert!(
            cold_usage.get("prompt_tokens_details").is_none(),
            "{layout}: reuse off reports no cached tokens: {cold_usage}"
        );

        messages.as_array_mut().unwrap().extend([
            json!({"role": "assistant", "content": first.text}),
            json!({"role": "user", "content": "And what is the capital of Italy?"}),
        ]);
        let (second, usage) = chat(&node, &warm, &messages, 20).await;
        let cached = usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or_else(|| panic!("{layout}: no cached tokens: {usage}"));
        // The first prompt's whole blocks of 16 (the template renders the
        // second prompt as the first one continued).
        assert_eq!(cached, first_prompt / 16 * 16, "{layout}: {usage}");
        let (cold_second, cold_usage) = chat(&node, &cold, &messages, 20).await;
        assert_eq!(
            usage["prompt_tokens"], cold_usage["prompt_tokens"],
            "{layout}"
        );
        assert_eq!(
            second, cold_second,
            "{layout}: the second turn from the kept prefix answered differently from a cold run"
        );
        println!(
            "{layout}: second turn took {cached} of {} prompt tokens from the kept prefix; answer and logprobs equal the cold run's: {:?}",
            usage["prompt_tokens"], second.text
        );

        let v = node.instance(&warm).await;
        assert_eq!(
            v["prefix_cache"],
            json!({"hits": 1, "misses": 1, "cached_tokens": cached}),
            "{layout}: {v}"
        );
        let v = node.instance(&cold).await;
        assert_eq!(
            v["prefix_cache"],
            json!({"hits": 0, "misses": 0, "cached_tokens": 0}),
            "{layout}: {v}"
        );
        for id in [&warm, &cold] {
            let report = node.delete(id, "").await;
            assert_eq!(report["errors"], json!([]), "{report}");
        }
    }
    node.assert_quiet();
}
