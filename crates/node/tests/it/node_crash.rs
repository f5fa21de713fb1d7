//! (d) A node SIGKILLed with a running instance leaves no runner behind, and
//! a new node on the same state dir starts cleanly and reports its sweep.

use std::time::Duration;

use serde_json::json;

use crate::harness::{fresh_dir, runner_pids, watchdog, TestNode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_node_leaves_no_runner_and_the_next_node_sweeps() {
    let dir = fresh_dir("crash");
    let mut node = TestNode::start_in(&dir, true);
    let id = node
        .create(json!({"model": "scripted", "runners": 4, "scripted": {"token_delay_ms": 50}}))
        .await;
    node.wait_state(&id, &["ready"], Duration::from_secs(30))
        .await;
    // A task in flight while the node dies.
    let _stream = node.chat(&id, "busy busy", 1000, true).await;
    assert_eq!(runner_pids(&id).len(), 4);
    node.signal(libc::SIGKILL);
    let _ = node.child.wait();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        runner_pids(&id),
        Vec::<u32>::new(),
        "runners outlived their node"
    );
    drop(node);

    // The pid and lock files of the dead runners are still there.
    let leftovers = std::fs::read_dir(dir.join("runners")).unwrap().count();
    assert!(
        leftovers > 0,
        "expected runner files left by the killed node"
    );
    let next = TestNode::start_in(&dir, false);
    let (status, state) = next.call("GET", "/state", None).await;
    assert_eq!(status, 200);
    let sweep = &state["node"]["sweep"];
    assert_eq!(
        sweep["killed"],
        json!([]),
        "PDEATHSIG already took the runners: {sweep}"
    );
    assert!(
        !sweep["stale_files_removed"].as_array().unwrap().is_empty(),
        "{sweep}"
    );
    assert_eq!(sweep["errors"], json!([]));
    assert_eq!(std::fs::read_dir(dir.join("runners")).unwrap().count(), 0);
    // And it serves.
    let id = next
        .create(json!({"model": "scripted", "runners": 2}))
        .await;
    next.wait_state(&id, &["ready"], Duration::from_secs(30))
        .await;
    watchdog("delete", Duration::from_secs(30), next.delete(&id, "")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_cannot_share_a_state_dir() {
    let dir = fresh_dir("lock");
    let _first = TestNode::start_in(&dir, true);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shardvisor"))
        .args(["serve", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is in use by another node (pid"),
        "{stderr}"
    );
}
