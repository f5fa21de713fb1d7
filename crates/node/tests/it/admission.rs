//! Bounded admission: an instance runs `max_batch` tasks and queues
//! `max_waiting` more; beyond that a request gets a 429 in OpenAI's shape
//! with `Retry-After`. Queued tasks that their clients abandon leave the
//! queue, and deletes answer every running and queued client exactly once.

use std::time::Duration;

use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use crate::harness::*;

const LONG: Duration = Duration::from_secs(60);

/// Sends a chat and, once the node has read it, closes the connection
/// without waiting for an answer: a client that gives up while queued.
async fn abandoned_chat(node: &TestNode, id: &str) -> tokio::net::TcpStream {
    let authority = node.base.strip_prefix("http://").unwrap().to_string();
    let body = json!({
        "model": id,
        "messages": [{"role": "user", "content": "given up"}],
        "max_tokens": 30,
        "stream": true,
    })
    .to_string();
    let mut tcp = tokio::net::TcpStream::connect(&authority).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {authority}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(body.as_bytes()).await.unwrap();
    tcp
}

fn assert_served(r: &ChatResult) {
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.terminal_outcomes(), 1, "{r:?}");
    assert_eq!(r.finish_reasons, ["length"], "{r:?}");
    assert_eq!(r.done_markers, 1, "{r:?}");
    assert!(!r.text.is_empty(), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_and_the_next_request_is_served_once_it_drains() {
    let node = TestNode::start("admission");
    // Batch 2 and queue 4 (test d of the issue): the 7th concurrent
    // request is one too many.
    let id = node
        .create(json!({
            "model": "scripted",
            "runners": 1,
            "max_batch": 2,
            "max_waiting": 4,
            "scripted": {"token_delay_ms": 50},
        }))
        .await;
    node.wait_state(&id, &["ready"], LONG).await;
    let v = node.instance(&id).await;
    assert_eq!(
        v["limits"],
        json!({"max_running": 2, "max_waiting": 4}),
        "{v}"
    );

    // One at a time, so that which ones run and which wait is known: the
    // first two run, the next four wait (first come, first served).
    let mut clients = Vec::new();
    for i in 0..6u64 {
        clients.push(spawn_chat(&node, &id, &format!("client {i} says"), 30));
        wait_counts(&node, &id, (i + 1).min(2), i.saturating_sub(1)).await;
    }
    let v = wait_counts(&node, &id, 2, 4).await;
    assert_eq!(v["tasks_in_flight"], 6, "{v}");

    // The 7th: 429, OpenAI's error shape, Retry-After.
    let response = node::client::send(
        "POST",
        &format!("{}/v1/chat/completions", node.base),
        Some(
            json!({"model": id, "messages": [{"role": "user", "content": "seventh"}], "max_tokens": 4})
                .to_string(),
        ),
    )
    .await
    .unwrap();
    assert_eq!(response.status().as_u16(), 429);
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|h| h.to_str().unwrap().to_string());
    assert_eq!(retry_after.as_deref(), Some("1"));
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let error: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(error["error"]["type"], "requests", "{error}");
    assert_eq!(error["error"]["code"], "rate_limit_exceeded", "{error}");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("2 tasks running and 4 waiting") && message.contains("max_waiting 4"),
        "{message}"
    );
    let v = node.instance(&id).await;
    assert_eq!(
        v["tasks_in_flight"], 6,
        "a refused request is not queued: {v}"
    );

    // A queued client that goes away leaves the queue, and its place is
    // taken by the next request.
    let last = clients.pop().unwrap();
    last.abort();
    let _ = last.await;
    wait_counts(&node, &id, 2, 3).await;
    let tcp = abandoned_chat(&node, &id).await;
    wait_counts(&node, &id, 2, 4).await;
    drop(tcp);
    wait_counts(&node, &id, 2, 3).await;
    clients.push(spawn_chat(&node, &id, "took the place", 30));
    wait_counts(&node, &id, 2, 4).await;

    for client in clients {
        assert_served(&watchdog("a queued client", LONG, client).await.unwrap());
    }
    let v = wait_counts(&node, &id, 0, 0).await;
    assert_eq!(v["tasks_in_flight"], 0, "{v}");
    // The queue drained: the next one is served.
    let next = watchdog(
        "after the queue drained",
        LONG,
        spawn_chat(&node, &id, "next", 8),
    )
    .await
    .unwrap();
    assert_served(&next);
    let report = node.delete(&id, "").await;
    assert_eq!(report["errors"], json!([]), "{report}");
    node.assert_quiet();
}

/// Test f of the issue: a drain delete lets the running and the queued
/// tasks finish; a cancel delete cancels both. Every client gets exactly
/// one outcome and the logs stay quiet.
async fn delete_with_running_and_queued_tasks(mode: &str) {
    let node = TestNode::start(&format!("queued-{mode}"));
    let id = node
        .create(json!({
            "model": "scripted",
            "runners": 2,
            "max_batch": 2,
            "max_waiting": 4,
            "scripted": {"token_delay_ms": 10},
        }))
        .await;
    node.wait_state(&id, &["ready"], LONG).await;
    let n = 6;
    let clients: Vec<_> = (0..n)
        .map(|i| spawn_chat(&node, &id, &format!("task {i} words here"), 30))
        .collect();
    wait_counts(&node, &id, 2, 4).await;
    assert_eq!(clients.len(), n);
    delete_and_assert_outcomes(&node, &id, mode, clients).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_delete_finishes_running_and_queued_tasks() {
    delete_with_running_and_queued_tasks("drain").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_delete_cancels_running_and_queued_tasks() {
    delete_with_running_and_queued_tasks("cancel").await;
}

/// A request with more choices than the instance runs and queues together
/// could never be admitted: a 400 naming `n` and the limits, not a 429 that
/// every retry gets again; one that fits is served whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_larger_than_batch_and_queue_together_is_a_400() {
    let node = TestNode::start("admission-n");
    let id = node
        .create(json!({
            "model": "scripted",
            "runners": 1,
            "max_batch": 2,
            "max_waiting": 1,
        }))
        .await;
    node.wait_state(&id, &["ready"], LONG).await;
    let chat = |n: u32| {
        json!({"model": id, "messages": [{"role": "user", "content": "hi"}],
               "max_tokens": 4, "n": n})
    };
    let (status, v) = node
        .call("POST", "/v1/chat/completions", Some(chat(4)))
        .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["param"], "n", "{v}");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("needs 4 tasks") && message.contains("at most 2 (max_batch) and queues 1"),
        "{message}"
    );
    let v = node.instance(&id).await;
    assert_eq!(v["tasks_in_flight"], 0, "nothing of it was admitted: {v}");
    // Three choices: two run, one waits, all answer.
    let (status, v) = node
        .call("POST", "/v1/chat/completions", Some(chat(3)))
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"].as_array().map(Vec::len), Some(3), "{v}");
    node.delete(&id, "").await;
    node.assert_quiet();
}
