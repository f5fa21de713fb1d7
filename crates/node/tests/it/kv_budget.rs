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
