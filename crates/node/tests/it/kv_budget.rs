//! The KV budget: an instance's running tasks hold at most `kv_cache_mb`
//! of keys and values. A task that does not fit beside the running ones
//! waits at rank 0 and starts when room frees, answering as it would
//! alone; a task that could never fit gets a 400 naming the numbers.
//!
//! Expected texts come from the same prompts run one at a time on an
//! instance with the default budget, in the same test.

use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::*;

const LONG: Duration = Duration::from_secs(120);

/// The tiny model holds 6 layers × 2 kv heads × 16 × 2 (keys, values) × 4
/// bytes = 1,536 bytes a position: 1 MiB is 682 positions. A chat of
/// about 25 prompt tokens and 400 completion tokens reserves ~425: one
/// fits, two do not.
const BUDGET_MB: u32 = 1;
const MAX_TOKENS: u32 = 400;
const PROMPTS: [&str; 3] = ["one", "two words", "three small words"];

fn runner_log_lines(node: &TestNode, id: &str, needle: &str) -> usize {
    let mut n = 0;
    for entry in std::fs::read_dir(node.state_dir.join("logs"))
        .unwrap()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with(id) {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            n += text.lines().filter(|l| l.contains(needle)).count();
        }
    }
    n
}

async fn three_at_once(node: &TestNode, id: &str) -> Vec<ChatResult> {
    let clients: Vec<_> = PROMPTS
        .iter()
        .map(|p| spawn_chat(node, id, p, MAX_TOKENS))
        .collect();
    let mut ends = Vec::new();
    for c in clients {
        ends.push(watchdog("chat", LONG, c).await.expect("client task"));
    }
    ends
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_beyond_the_kv_budget_wait_their_turn_and_a_task_that_never_fits_is_refused() {
    let model = tiny_model("kv-budget");
    let node = TestNode::start("kv-budget");
    let roomy = create_ready(&node, json!({"model": model, "weights": "f32"})).await;
    let mut alone = Vec::new();
    for p in PROMPTS {
        let end = read_chat(node.chat(&roomy, p, MAX_TOKENS, true).await).await;
        assert_eq!(end.terminal_outcomes(), 1, "{end:?}");
        assert!(end.errors.is_empty(), "{end:?}");
        alone.push(end.text);
    }
    // The default budget holds all three at once: nobody waits.
    let ends = three_at_once(&node, &roomy).await;
    for (end, want) in ends.iter().zip(&alone) {
        assert_eq!(&end.text, want, "{end:?}");
    }
    assert_eq!(
        runner_log_lines(&node, &roomy, "waits for KV cache room"),
        0
    );

    let tight = create_ready(
        &node,
        json!({"model": model, "weights": "f32", "kv_cache_mb": BUDGET_MB}),
    )
    .await;
    let ends = three_at_once(&node, &tight).await;
    for (end, want) in ends.iter().zip(&alone) {
        assert_eq!(end.status, 200, "{end:?}");
        assert_eq!(end.terminal_outcomes(), 1, "{end:?}");
        assert!(end.errors.is_empty(), "{end:?}");
        assert_eq!(&end.text, want, "a task that waited answers as alone");
    }
    let waited = runner_log_lines(&node, &tight, "waits for KV cache room");
    assert!(waited >= 1, "no task waited under a one-task budget");
    println!("{waited} of 3 tasks waited for KV room");

    // 700 completion tokens alone exceed the 682 positions: a 400.
    let body = json!({"model": tight, "messages": [{"role": "user", "content": "x"}],
                      "max_tokens": 700});
    let (status, v): (u16, Value) = node.call("POST", "/v1/chat/completions", Some(body)).await;
    assert_eq!(status, 400, "{v}");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("positions of KV cache") && message.contains("at most 682"),
        "{message}"
    );
    assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");
    // And the instance serves on.
    let end = read_chat(node.chat(&tight, "after", 8, true).await).await;
    assert!(end.errors.is_empty(), "{end:?}");
    for id in [&roomy, &tight] {
        let (status, report) = node.call("DELETE", &format!("/instance/{id}"), None).await;
        assert_eq!(status, 200, "{report}");
    }
    node.assert_quiet();
}

/// Polls `/state` until the instance has `running` tasks in its batch and
/// `awaiting` held by rank 0 for KV room.
async fn wait_kv_counts(node: &TestNode, id: &str, running: u64, awaiting: u64) -> Value {
    wait_view(
        node,
        id,
        &format!("{running} running and {awaiting} awaiting KV room"),
        |v| v["tasks_running"] == running && v["tasks_awaiting_kv"] == awaiting,
    )
    .await
}

/// A task held for KV room shows as `tasks_awaiting_kv` (not running, not
/// waiting at the node); when its client goes away it leaves rank 0's
/// queue without ever starting, the running task answers as alone, and
/// the next task is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_awaiting_kv_room_is_shown_and_leaves_when_its_client_goes() {
    let Some(model) = crate::model::smollm2() else {
        return;
    };
    let node = TestNode::start("kv-await");
    // SmolLM2 holds 30 layers × 3 kv heads × 64 × 2 × 4 bytes = 46,080
    // bytes a position: 10 MiB is 227 positions. The long chat (~35 prompt
    // tokens + 150) fits alone; the short one (+ 60) does not beside it.
    let id = create_ready(
        &node,
        json!({"model": model, "weights": "q8_0", "kv_cache_mb": 10}),
    )
    .await;
    const LONG_PROMPT: &str = "Write a long story about a dragon who learns to cook.";
    let alone = read_chat(node.chat(&id, LONG_PROMPT, 150, true).await).await;
    assert!(alone.errors.is_empty(), "{alone:?}");

    let long = spawn_chat(&node, &id, LONG_PROMPT, 150);
    wait_kv_counts(&node, &id, 1, 0).await;
    let held = spawn_chat(&node, &id, "hi", 60);
    let v = wait_kv_counts(&node, &id, 1, 1).await;
    assert_eq!(v["tasks_waiting"], 0, "it reached the runner: {v}");
    assert_eq!(v["tasks_in_flight"], 2, "{v}");
    held.abort();
    let _ = held.await;
    let v = wait_kv_counts(&node, &id, 1, 0).await;
    assert_eq!(v["tasks_in_flight"], 1, "the held task left the table: {v}");
    let end = watchdog("the long chat", LONG, long)
        .await
        .expect("client task");
    assert_eq!(end.terminal_outcomes(), 1, "{end:?}");
    assert_eq!(end.text, alone.text, "the running task is untouched");
    let v = wait_kv_counts(&node, &id, 0, 0).await;
    assert_eq!(v["tasks_in_flight"], 0, "{v}");
    // It was held at rank 0, not refused.
    assert!(runner_log_lines(&node, &id, "waits for KV cache room") >= 1);
    let next = read_chat(node.chat(&id, "hi", 20, true).await).await;
    assert!(next.errors.is_empty(), "{next:?}");
    assert_eq!(next.terminal_outcomes(), 1, "{next:?}");
    let (status, report) = node.call("DELETE", &format!("/instance/{id}"), None).await;
    assert_eq!(status, 200, "{report}");
    node.assert_quiet();
}
