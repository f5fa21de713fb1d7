//! Many users at once on one instance, over real runner processes: tasks
//! step in batches, and each task's answer is the one it gets alone; a
//! cancel takes one stream out and leaves the others as they were.
//!
//! The expected texts come from the same instance serving each prompt
//! alone, one after another, in the same test.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{
    create_ready, first_chunk_task_id, read_chat, watchdog, ChatResult, TestNode,
};
use crate::model::smollm2;

const LONG: Duration = Duration::from_secs(300);

/// Eight prompts of different lengths, with different token budgets.
const PROMPTS: [(&str, u32); 8] = [
    ("What is the capital of France?", 16),
    ("Name three colours.", 12),
    (
        "Write one sentence about the sea, the wind and the sky above a small boat.",
        20,
    ),
    ("hi", 8),
    ("Count from one to ten in words.", 24),
    ("What do bees make?", 10),
    (
        "Give me a short tip for sleeping well at night after a long day of work.",
        18,
    ),
    ("Say something kind.", 14),
];

/// One streamed chat: what the client saw, and when it started and ended.
struct Timed {
    chat: ChatResult,
    start: Instant,
    end: Instant,
}

async fn stream_chat(base: String, id: String, prompt: &str, max_tokens: u32) -> Timed {
    let body = json!({"model": id, "messages": [{"role": "user", "content": prompt}],
                      "max_tokens": max_tokens, "stream": true});
    let start = Instant::now();
    let stream = node::client::stream(
        "POST",
        &format!("{base}/v1/chat/completions"),
        Some(body.to_string()),
    )
    .await
    .expect("chat request");
    let chat = read_chat(stream).await;
    Timed {
        chat,
        start,
        end: Instant::now(),
    }
}

/// The most chats whose [start, end) intervals overlap at one instant.
fn peak_overlap(runs: &[Timed]) -> usize {
    runs.iter()
        .map(|r| {
            runs.iter()
                .filter(|o| o.start <= r.start && r.start < o.end)
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// Each prompt alone, in order: the expected texts.
async fn alone(node: &TestNode, id: &str) -> Vec<String> {
    let mut texts = Vec::new();
    for (prompt, max_tokens) in PROMPTS {
        let run = stream_chat(node.base.clone(), id.to_string(), prompt, max_tokens).await;
        assert!(run.chat.errors.is_empty(), "{:?}", run.chat);
        assert_eq!(run.chat.finish_reasons.len(), 1, "{:?}", run.chat);
        texts.push(run.chat.text);
    }
    texts
}

/// All eight at once, the i-th joining 40 ms × i after the first (so they
/// join a batch that is already stepping, some while others prefill).
async fn together(node: &TestNode, id: &str) -> Vec<Timed> {
    let handles: Vec<_> = PROMPTS
        .iter()
        .enumerate()
        .map(|(i, &(prompt, max_tokens))| {
            let (base, id) = (node.base.clone(), id.to_string());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(40 * i as u64)).await;
                stream_chat(base, id, prompt, max_tokens).await
            })
        })
        .collect();
    let mut runs = Vec::new();
    for h in handles {
        runs.push(
            watchdog("a concurrent chat", LONG, h)
                .await
                .expect("chat task"),
        );
    }
    runs
}

/// Test (a): on f32 weights, each of 8 concurrent tasks gets the greedy
/// answer it gets alone, in single, pipeline-2 and tensor-3 (SmolLM2's 9
/// heads and 3 kv heads); on Q8_0 blocks too (their matmuls are bit for bit
/// batch invariant, see the engine's `batch` tests).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_tasks_get_the_answers_they_get_alone() {
    let Some(model) = smollm2() else { return };
    let model = model.to_string_lossy().to_string();
    let node = TestNode::start("batch-invariance");
    for (runners, sharding, weights) in [
        (1, "pipeline", "f32"),
        (2, "pipeline", "f32"),
        (3, "tensor", "f32"),
        (1, "pipeline", "q8_0"),
        (2, "pipeline", "q8_0"),
    ] {
        let layout = format!("{sharding}-{runners} {weights}");
        let id = create_ready(
            &node,
            json!({"model": model, "runners": runners, "sharding": sharding, "weights": weights}),
        )
        .await;
        let expected = alone(&node, &id).await;
        let runs = together(&node, &id).await;
        for (i, (run, want)) in runs.iter().zip(&expected).enumerate() {
            assert!(
                run.chat.errors.is_empty(),
                "{layout}: chat {i}: {:?}",
                run.chat
            );
            assert_eq!(
                run.chat.finish_reasons.len(),
                1,
                "{layout}: chat {i}: {:?}",
                run.chat
            );
            assert_eq!(
                &run.chat.text, want,
                "{layout}: chat {i} ({:?}) answered differently beside the others",
                PROMPTS[i].0
            );
        }
        let overlap = peak_overlap(&runs);
        println!("{layout}: all 8 answers equal their lone answers; up to {overlap} ran at once");
        assert!(overlap >= 4, "{layout}: only {overlap} chats overlapped");
        let report = node.delete(&id, "").await;
        assert_eq!(report["errors"], json!([]), "{report}");
    }
    node.assert_quiet();
}

/// Test (b): one of 8 concurrent streams is cancelled mid-generation: it
/// ends `cancelled`, having received at most a step's worth more text, and
/// the other 7 complete with the texts they get alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_one_of_eight_streams_leaves_the_others_untouched() {
    let Some(model) = smollm2() else { return };
    let model = model.to_string_lossy().to_string();
    let node = TestNode::start("batch-cancel");
    for (runners, sharding) in [(1, "pipeline"), (2, "pipeline"), (3, "tensor")] {
        let layout = format!("{sharding}-{runners}");
        let id = create_ready(
            &node,
            json!({"model": model, "runners": runners, "sharding": sharding, "weights": "q8_0"}),
        )
        .await;
        let expected = alone(&node, &id).await;
        const VICTIM: usize = 4;
        // The victim asks for far more than it will get; the others join
        // it once it streams.
        let mut victim = node.chat(&id, PROMPTS[VICTIM].0, 400, true).await;
        let task_id = first_chunk_task_id(&mut victim).await;
        let others: Vec<_> = PROMPTS
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != VICTIM)
            .map(|(i, &(prompt, max_tokens))| {
                let (base, id) = (node.base.clone(), id.clone());
                (
                    i,
                    tokio::spawn(async move { stream_chat(base, id, prompt, max_tokens).await }),
                )
            })
            .collect();
        // A few tokens into the others' answers.
        tokio::time::sleep(Duration::from_millis(300)).await;
        victim.next_data().await.expect("sse").expect("a chunk");
        let (status, v) = node
            .call("POST", &format!("/v1/cancel/{task_id}"), None)
            .await;
        assert_eq!(status, 200, "{v}");
        let rest = watchdog("the cancelled stream", LONG, read_chat(victim)).await;
        assert_eq!(rest.finish_reasons, ["cancelled"], "{layout}: {rest:?}");
        assert!(rest.errors.is_empty(), "{layout}: {rest:?}");
        // What was already on its way, at most one step per stage in
        // flight: a few characters, not the rest of a 400-token answer.
        let words = rest.text.split_whitespace().count();
        assert!(
            words <= 4,
            "{layout}: {words} more words after the cancel: {:?}",
            rest.text
        );
        for (i, h) in others {
            let run = watchdog("another chat", LONG, h).await.expect("chat task");
            assert!(
                run.chat.errors.is_empty(),
                "{layout}: chat {i}: {:?}",
                run.chat
            );
            assert_eq!(run.chat.text, expected[i], "{layout}: chat {i} changed");
        }
        let report = node.delete(&id, "").await;
        assert_eq!(report["errors"], json!([]), "{report}");
    }
    node.assert_quiet();
}
