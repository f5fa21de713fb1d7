//! (a) full lifecycle and (b) deletes with tasks in flight.

use std::time::Duration;

use serde_json::json;

use crate::harness::{
    delete_and_assert_outcomes, first_chunk_task_id, read_chat, runner_pids, state_name, watchdog,
    TestNode,
};

const LONG: Duration = Duration::from_secs(30);

/// Runner history with repeated states merged (loading progress).
fn merged_history(runner: &serde_json::Value) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for state in runner["history"].as_array().expect("history") {
        let name = state_name(state).to_string();
        if names.last() != Some(&name) {
            names.push(name);
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_lifecycle_follows_the_state_machine() {
    let node = TestNode::start("lifecycle");
    let id = node
        .create(json!({"model": "scripted", "runners": 4, "scripted": {"token_delay_ms": 2}}))
        .await;
    let ready = node.wait_state(&id, &["ready"], LONG).await;
    assert_eq!(ready["runners"].as_array().unwrap().len(), 4);
    let chat = read_chat(node.chat(&id, "one two three", 5, true).await).await;
    assert_eq!(chat.text, "one two three one two ");
    assert_eq!(chat.finish_reasons, ["length"]);
    assert_eq!(chat.done_markers, 1);
    let report = node.delete(&id, "").await;
    assert_eq!(report["errors"], json!([]), "{report}");
    assert_eq!(report["escalations"], json!([]), "{report}");
    for runner in report["runners"].as_array().unwrap() {
        let released = runner["released"].as_array().expect("released");
        let names: Vec<&str> = released
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["engine"], "{report}");
        assert!(released.iter().all(|r| r["error"].is_null()), "{report}");
    }
    let done = node.wait_state(&id, &["deleted"], LONG).await;
    let expected = [
        "idle",
        "connecting",
        "connected",
        "loading",
        "loaded",
        "warming_up",
        "ready",
        "running",
        "ready",
        "shutting_down",
        "shutdown",
    ];
    for runner in done["runners"].as_array().unwrap() {
        assert_eq!(
            merged_history(runner),
            expected,
            "runner {}",
            runner["runner_id"]
        );
        assert_eq!(runner["exit"], "exitcode=0");
        // Loading reported its progress up to the total.
        let last_loading = runner["history"]
            .as_array()
            .unwrap()
            .iter()
            .rev()
            .find_map(|s| s.get("loading"))
            .cloned()
            .expect("loading state");
        assert_eq!(last_loading["done"], last_loading["total"]);
    }
    assert!(
        runner_pids(&id).is_empty(),
        "runners left: {:?}",
        runner_pids(&id)
    );
    node.assert_quiet();
}

async fn delete_with_tasks_in_flight(mode: &str) {
    let node = TestNode::start(&format!("inflight-{mode}"));
    let id = node
        .create(json!({"model": "scripted", "runners": 4, "scripted": {"token_delay_ms": 10}}))
        .await;
    node.wait_state(&id, &["ready"], LONG).await;
    let n = 6;
    let mut clients = Vec::new();
    for i in 0..n {
        let mut stream = node
            .chat(&id, &format!("task {i} words here"), 40, true)
            .await;
        assert_eq!(stream.status, 200);
        // Wait for the role chunk and a first token, so the task is in flight.
        let mut first = Vec::new();
        for _ in 0..2 {
            first.push(
                watchdog("first chunks", LONG, stream.next_data())
                    .await
                    .unwrap()
                    .unwrap(),
            );
        }
        clients.push(tokio::spawn(async move {
            let mut rest = read_chat(stream).await;
            for data in first {
                let v: serde_json::Value = serde_json::from_str(&data).unwrap();
                if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
                    rest.text.insert_str(0, t);
                }
            }
            rest
        }));
    }
    assert_eq!(clients.len(), n);
    delete_and_assert_outcomes(&node, &id, mode, clients).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_drain_with_tasks_in_flight() {
    delete_with_tasks_in_flight("drain").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_cancel_with_tasks_in_flight() {
    delete_with_tasks_in_flight("cancel").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_endpoint_and_client_disconnect_cancel_the_task() {
    let node = TestNode::start("cancel");
    let id = node
        .create(json!({"model": "scripted", "runners": 2, "scripted": {"token_delay_ms": 20}}))
        .await;
    node.wait_state(&id, &["ready"], LONG).await;
    // Explicit cancel.
    let mut stream = node.chat(&id, "a b c", 1000, true).await;
    let task_id = first_chunk_task_id(&mut stream).await;
    let (status, v) = node
        .call("POST", &format!("/v1/cancel/{task_id}"), None)
        .await;
    assert_eq!(status, 200, "{v}");
    let rest = watchdog("cancelled stream", LONG, read_chat(stream)).await;
    assert_eq!(rest.finish_reasons, ["cancelled"]);
    let (status, _) = node
        .call("POST", &format!("/v1/cancel/{task_id}"), None)
        .await;
    assert_eq!(status, 404, "a finished task cannot be cancelled");
    // A client that goes away: its task is cancelled and the instance idles.
    let mut stream = node.chat(&id, "x y", 1000, true).await;
    stream.next_data().await.unwrap();
    drop(stream);
    watchdog("task cancelled after disconnect", LONG, async {
        loop {
            let v = node.instance(&id).await;
            if v["tasks_in_flight"] == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let report = node.delete(&id, "").await;
    assert_eq!(report["errors"], json!([]), "{report}");
    node.assert_quiet();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_streaming_completion_has_usage() {
    let node = TestNode::start("json");
    let id = node
        .create(json!({"model": "scripted", "runners": 1}))
        .await;
    node.wait_state(&id, &["ready"], LONG).await;
    let mut stream = node.chat("scripted", "hello there", 3, false).await;
    assert_eq!(stream.status, 200);
    let mut body = String::new();
    while let Some(line) = stream.next_line().await.unwrap() {
        body.push_str(&line);
    }
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], "hello there hello ");
    assert_eq!(v["usage"]["completion_tokens"], 3);
    assert_eq!(v["usage"]["prompt_tokens"], 2);
    node.delete(&id, "").await;
    node.assert_quiet();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_shuts_every_instance_down_and_exits_zero() {
    let mut node = TestNode::start("sigterm");
    let a = node
        .create(json!({"model": "scripted", "runners": 2}))
        .await;
    let b = node
        .create(json!({"model": "scripted", "runners": 3}))
        .await;
    node.wait_state(&a, &["ready"], LONG).await;
    node.wait_state(&b, &["ready"], LONG).await;
    node.signal(libc::SIGTERM);
    let status = watchdog("node exit", LONG, async {
        loop {
            if let Some(status) = node.child.try_wait().unwrap() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(status.code(), Some(0));
    assert!(runner_pids(&a).is_empty() && runner_pids(&b).is_empty());
    node.assert_quiet();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_inspect_show_runners_and_channels() {
    let node = TestNode::start("status");
    let id = node
        .create(json!({"model": "scripted", "runners": 3}))
        .await;
    node.wait_state(&id, &["ready"], LONG).await;
    for command in ["status", "inspect"] {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_shardvisor"))
            .args([command, "--node", &node.base])
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{command}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        for rank in 0..3 {
            let runner = format!("{id}/{rank}");
            let row: Vec<&str> = text
                .lines()
                .find(|l| l.split_whitespace().next() == Some(runner.as_str()))
                .unwrap_or_else(|| panic!("{command} lacks runner {rank}:\n{text}"))
                .split_whitespace()
                .collect();
            // runner, node, pid, state[, channel, sent, recv, queued, bytes_in, idle_ms]
            assert_eq!(row[3], "ready", "{command}: {row:?}");
            assert!(
                row[2].parse::<u32>().is_ok_and(|p| p > 0),
                "{command}: {row:?}"
            );
            if command == "inspect" {
                assert_eq!(row.len(), 10, "{row:?}");
                assert_eq!(row[4], "open", "{row:?}");
                let count = |i: usize| row[i].parse::<u64>().unwrap_or(0);
                // Connect, Load and WarmUp went out; Hello and the states
                // up to Ready came back.
                assert!(count(5) >= 3 && count(6) >= 3, "{row:?}");
                assert_eq!(count(7), 0, "nothing queued on an idle runner: {row:?}");
            }
        }
    }
    node.delete(&id, "").await;
}
