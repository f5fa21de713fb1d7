//! (g) Many create → chat → delete cycles: zero error lines, zero leftover
//! processes, and the node's open fd count unchanged.

use std::time::Duration;

use serde_json::json;

use crate::harness::{open_fds, read_chat, runner_pids, TestNode};

async fn cycles(node: &TestNode, n: usize) {
    for i in 0..n {
        let id = node.create(json!({"model": "scripted", "runners": 4, "scripted": {"token_delay_ms": 0, "load_step_ms": 0, "warmup_ms": 0}})).await;
        node.wait_state(&id, &["ready"], Duration::from_secs(30))
            .await;
        let chat = read_chat(node.chat(&id, "cycle", 3, true).await).await;
        assert_eq!(chat.finish_reasons, ["length"], "cycle {i}: {chat:?}");
        let report = node.delete(&id, "").await;
        assert_eq!(report["errors"], json!([]), "cycle {i}: {report}");
        assert_eq!(report["escalations"], json!([]), "cycle {i}: {report}");
        assert!(runner_pids(&id).is_empty(), "cycle {i}: runners left");
    }
}

/// The node's open fd count once it is steady. The server closes an HTTP
/// connection a moment after its client dropped it, so a single reading can
/// include the last one: wait for the same count 10 times in a row, 20 ms
/// apart (bounded by 5 s).
async fn settled_fds(pid: u32) -> usize {
    let mut last = open_fds(pid);
    let mut same = 0;
    let started = std::time::Instant::now();
    while same < 10 && started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = open_fds(pid);
        same = if now == last { same + 1 } else { 0 };
        last = now;
    }
    last
}

fn fd_listing(pid: u32) -> String {
    let links: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .map(|e| format!("{:?}", std::fs::read_link(e.path())))
                .collect()
        })
        .unwrap_or_default();
    links.join(" ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_cycles_leave_nothing_behind() {
    let node = TestNode::start("stress");
    // Warm up lazily created resources (runtime threads, spawner) first.
    cycles(&node, 3).await;
    let fds_before = settled_fds(node.pid()).await;
    cycles(&node, 200).await;
    let fds_after = settled_fds(node.pid()).await;
    assert_eq!(
        fds_before,
        fds_after,
        "node fd count changed over 200 cycles: {}",
        fd_listing(node.pid())
    );
    node.assert_quiet();
}

/// The long soak, for manual runs: `SHARDVISOR_SOAK_CYCLES=5000 cargo nextest run soak --run-ignored all`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long soak; run by hand"]
async fn soak() {
    let n = std::env::var("SHARDVISOR_SOAK_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let node = TestNode::start("soak");
    cycles(&node, 3).await;
    let fds_before = settled_fds(node.pid()).await;
    cycles(&node, n).await;
    let fds_after = settled_fds(node.pid()).await;
    assert_eq!(
        fds_before,
        fds_after,
        "node fd count changed: {}",
        fd_listing(node.pid())
    );
    node.assert_quiet();
}
