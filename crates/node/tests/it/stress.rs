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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_cycles_leave_nothing_behind() {
    let node = TestNode::start("stress");
    // Warm up lazily created resources (runtime threads, spawner) first.
    cycles(&node, 3).await;
    let fds_before = open_fds(node.pid());
    cycles(&node, 200).await;
    // The server closes the last HTTP connection a moment after the client
    // dropped it: give the count a bounded time to settle back.
    let settled = crate::harness::watchdog_ok(Duration::from_secs(5), async {
        while open_fds(node.pid()) != fds_before {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let listing = std::fs::read_dir(format!("/proc/{}/fd", node.pid()))
        .map(|d| {
            d.flatten()
                .map(|e| format!("{:?}", std::fs::read_link(e.path())))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    assert!(
        settled,
        "node fd count went from {fds_before} to {} over 200 cycles: {listing:?}",
        open_fds(node.pid())
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
    let fds_before = open_fds(node.pid());
    cycles(&node, n).await;
    let settled = crate::harness::watchdog_ok(Duration::from_secs(5), async {
        while open_fds(node.pid()) != fds_before {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        settled,
        "node fd count went from {fds_before} to {}",
        open_fds(node.pid())
    );
    node.assert_quiet();
}
