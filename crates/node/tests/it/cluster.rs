//! Multi-node instances: three `shardvisor serve` processes on loopback,
//! each with its own ports and state dir, joined over zenoh; runners on
//! every node; nodes killed with SIGKILL.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{
    create_ready, fast_timeouts, read_chat, runner_pids, start_cluster, state_name, tiny_model,
    wait_no_runners, watchdog, TestNode,
};

const LONG: Duration = Duration::from_secs(60);
const LEASE_MS: u64 = 1000;

/// Greedy completion of one streamed chat through `node`.
async fn greedy(node: &TestNode, id: &str, prompt: &str, max_tokens: u32) -> String {
    let chat = watchdog("chat", LONG, async {
        read_chat(node.chat(id, prompt, max_tokens, true).await).await
    })
    .await;
    assert!(chat.errors.is_empty(), "{chat:?}");
    assert_eq!(chat.finish_reasons.len(), 1, "{chat:?}");
    chat.text
}

/// The node of each runner, as the coordinator reports it.
fn runner_nodes(view: &Value) -> Vec<String> {
    view["runners"]
        .as_array()
        .expect("runners")
        .iter()
        .map(|r| r["node"].as_str().unwrap_or("?").to_string())
        .collect()
}

/// (a) A pipeline over three nodes, a chat through node 2's API (proxied to
/// the coordinator), a delete through node 2: the same answer as one
/// process, and a shutdown that logs nothing wrong anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_over_three_nodes_serves_through_any_node_and_shuts_down_quietly() {
    let model = tiny_model("cluster-a");
    let nodes = start_cluster("cluster-a", 3, LEASE_MS).await;
    let ids: Vec<String> = futures_util::future::join_all(nodes.iter().map(|n| n.node_id())).await;

    let single = create_ready(&nodes[0], json!({"model": model, "runners": 1})).await;
    let expected = greedy(&nodes[0], &single, "hello cluster", 24).await;
    nodes[0].delete(&single, "").await;

    let id = create_ready(
        &nodes[0],
        json!({"model": model, "runners": 3, "nodes": 3, "weights": "f32"}),
    )
    .await;
    let view = nodes[0].instance(&id).await;
    let placed = runner_nodes(&view);
    assert_eq!(placed[0], ids[0], "rank 0 stays on the coordinator: {view}");
    let mut distinct = placed.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "one rank per node: {placed:?}");
    assert_eq!(runner_pids(&id).len(), 3);

    // `inspect` on node 2 shows the whole cluster: every node alive, the
    // instance its coordinator announced, and the runner node 2 hosts.
    // (announcements follow changes within about 100 ms).
    let text = watchdog(
        "inspect showing the instance ready",
        Duration::from_secs(5),
        async {
            loop {
                let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_shardvisor"))
                    .args(["inspect", "--node", &nodes[1].base])
                    .output()
                    .await
                    .expect("inspect");
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                assert!(out.status.success(), "{text}");
                if text.contains(&format!("{id} (ready)")) {
                    return text;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        },
    )
    .await;
    for node_id in &ids {
        assert!(
            text.lines()
                .any(|l| l.contains(node_id.as_str()) && l.contains("true")),
            "inspect lacks live node {node_id}:\n{text}"
        );
    }
    assert!(text.contains(&format!("{id} (ready)")), "{text}");
    assert!(text.contains(&format!("coordinator {}", ids[0])), "{text}");
    // Node 2 learns of the instance from node 1's announcement.
    let seen = nodes[1].wait_knows(&id).await;
    assert_eq!(state_name(&seen["state"]), "ready", "{seen}");
    let text = greedy(&nodes[1], &id, "hello cluster", 24).await;
    assert_eq!(text, expected, "three nodes answer as one process does");
    let (status, v) = nodes[1]
        .call(
            "POST",
            "/v1/chat/completions",
            Some(json!({"model": id, "messages": [{"role": "user", "content": "hello cluster"}], "max_tokens": 24})),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], expected.as_str());

    let report = nodes[1].delete(&id, "").await;
    assert_eq!(
        report["runners"].as_array().map(|r| r.len()),
        Some(3),
        "{report}"
    );
    assert!(
        report["escalations"]
            .as_array()
            .is_some_and(|e| e.is_empty()),
        "{report}"
    );
    assert!(
        report["errors"].as_array().is_some_and(|e| e.is_empty()),
        "{report}"
    );
    wait_no_runners(&id, Duration::from_secs(5)).await;
    // Give the relays a moment to finish their last lines, then check.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for node in &nodes {
        node.assert_quiet();
    }
}

/// (b) A tensor-parallel instance over two nodes answers exactly as one
/// process does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensor_over_two_nodes_matches_one_process() {
    let model = tiny_model("cluster-b");
    let nodes = start_cluster("cluster-b", 2, LEASE_MS).await;
    let ids: Vec<String> = futures_util::future::join_all(nodes.iter().map(|n| n.node_id())).await;
    let single = create_ready(
        &nodes[0],
        json!({"model": model, "runners": 1, "weights": "f32"}),
    )
    .await;
    let expected = greedy(&nodes[0], &single, "tensor across machines", 32).await;
    let id = create_ready(
        &nodes[0],
        json!({"model": model, "runners": 2, "sharding": "tensor", "node_ids": ids, "weights": "f32"}),
    )
    .await;
    assert_eq!(runner_nodes(&nodes[0].instance(&id).await), ids);
    assert_eq!(
        greedy(&nodes[0], &id, "tensor across machines", 32).await,
        expected
    );
    nodes[0].delete(&id, "").await;
    nodes[0].delete(&single, "").await;
    wait_no_runners(&id, Duration::from_secs(5)).await;
    for node in &nodes {
        node.assert_quiet();
    }
}

/// (c) SIGKILL of a node hosting a pipeline stage in the middle of a
/// streamed chat: the client's error names the node within lease + 1 s, no
/// runner of the instance is left anywhere, and the surviving nodes agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_node_mid_stream_fails_the_chat_naming_it() {
    let model = tiny_model("cluster-c");
    let mut nodes = start_cluster("cluster-c", 3, LEASE_MS).await;
    let ids: Vec<String> = futures_util::future::join_all(nodes.iter().map(|n| n.node_id())).await;
    let mut body = json!({
        "model": model, "runners": 3, "node_ids": ids, "weights": "f32",
        "restart": {"max_restarts": 0},
    });
    body["timeouts"] = fast_timeouts();
    let id = create_ready(&nodes[0], body).await;
    nodes[1].wait_knows(&id).await;

    // Tokens are flowing through all three nodes.
    let stream = nodes[1].streaming_chat(&id).await;

    let killed_at = Instant::now();
    nodes[2].signal(libc::SIGKILL);
    let _ = nodes[2].child.wait();
    let chat = watchdog(
        "the chat failing",
        Duration::from_secs(10),
        read_chat(stream),
    )
    .await;
    let detected = killed_at.elapsed();
    eprintln!("node killed: client error after {detected:?}");
    assert_eq!(chat.errors.len(), 1, "{chat:?}");
    assert!(chat.finish_reasons.is_empty(), "{chat:?}");
    let error = &chat.errors[0];
    assert!(
        error.contains(&format!("node {} lost", ids[2])),
        "the error names the lost node: {error}"
    );
    assert!(
        detected <= Duration::from_millis(LEASE_MS + 1000),
        "error after {detected:?}, lease is {LEASE_MS} ms"
    );

    wait_no_runners(&id, Duration::from_secs(5)).await;
    let failed = nodes[0].wait_state(&id, &["failed"], LONG).await;
    assert!(
        failed["failure"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(&ids[2])),
        "{failed}"
    );
    // Nodes 1 and 2 agree: node 3 is lost, the instance failed.
    watchdog("nodes 1 and 2 agreeing", Duration::from_secs(10), async {
        loop {
            let views = [nodes[0].cluster().await, nodes[1].cluster().await];
            let agree = views.iter().all(|c| {
                let nodes = c["nodes"].as_array().cloned().unwrap_or_default();
                let lost = nodes
                    .iter()
                    .any(|m| m["id"] == ids[2].as_str() && m["alive"] == false);
                let alive = nodes.iter().filter(|m| m["alive"] == true).count() == 2;
                let instance_failed = nodes.iter().any(|m| {
                    m["id"] == ids[0].as_str()
                        && m["instances"].as_array().is_some_and(|i| {
                            i.iter()
                                .any(|b| b["instance_id"] == id.as_str() && b["state"] == "failed")
                        })
                });
                lost && alive && instance_failed
            });
            if agree {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // Node 2 hosts nothing for the failed instance any more.
    assert_eq!(nodes[1].cluster().await["hosted"], json!([]));
    nodes.truncate(2);
}

/// (d) SIGKILL of the coordinating node: the runners it had placed on the
/// other nodes are gone within lease + 1 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_coordinator_stops_its_runners_on_every_node() {
    let model = tiny_model("cluster-d");
    let nodes = start_cluster("cluster-d", 3, LEASE_MS).await;
    let id = create_ready(
        &nodes[0],
        json!({"model": model, "runners": 3, "nodes": 3, "weights": "f32"}),
    )
    .await;
    assert_eq!(runner_pids(&id).len(), 3);
    // A client streaming through node 2 when the coordinator dies.
    nodes[1].wait_knows(&id).await;
    let stream = nodes[1].streaming_chat(&id).await;
    nodes[0].signal(libc::SIGKILL);
    let took = wait_no_runners(&id, Duration::from_secs(10)).await;
    let chat = watchdog(
        "the chat ending",
        Duration::from_secs(10),
        read_chat(stream),
    )
    .await;
    assert!(chat.finish_reasons.is_empty(), "{chat:?}");
    assert_eq!(chat.errors.len(), 1, "{chat:?}");
    assert!(
        chat.errors[0].contains("coordinating node") && chat.errors[0].contains("mid-stream"),
        "{}",
        chat.errors[0]
    );
    eprintln!("coordinator killed: remote runners gone after {took:?}");
    assert!(
        took <= Duration::from_millis(LEASE_MS + 1000),
        "runners outlived their coordinator by {took:?}"
    );
    for node in &nodes[1..] {
        watchdog("hosted runners forgotten", Duration::from_secs(5), async {
            while node.cluster().await["hosted"] != json!([]) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    }
}

/// The restart policy re-places an instance that lost a node on the nodes
/// that remain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_re_places_the_instance_on_the_remaining_nodes() {
    let model = tiny_model("cluster-replace");
    let mut nodes = start_cluster("cluster-replace", 3, LEASE_MS).await;
    let ids: Vec<String> = futures_util::future::join_all(nodes.iter().map(|n| n.node_id())).await;
    let mut body = json!({
        "model": model, "runners": 3, "node_ids": ids, "weights": "f32",
        "restart": {"max_restarts": 3, "backoff_initial_ms": 50},
    });
    body["timeouts"] = fast_timeouts();
    let id = create_ready(&nodes[0], body).await;
    nodes[2].signal(libc::SIGKILL);
    let _ = nodes[2].child.wait();
    let view = watchdog("the instance ready again", LONG, async {
        loop {
            let v = nodes[0].instance(&id).await;
            if state_name(&v["state"]) == "ready" && v["restarts"] == 1 {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let placed = runner_nodes(&view);
    assert_eq!(placed.len(), 3);
    assert!(!placed.contains(&ids[2]), "{placed:?}");
    assert!(placed.contains(&ids[1]), "{placed:?}");
    nodes.truncate(2);
    let text = greedy(&nodes[1], &id, "still here", 8).await;
    assert!(!text.is_empty());
    nodes[0].delete(&id, "").await;
    wait_no_runners(&id, Duration::from_secs(5)).await;
}

/// (f) The startup barrier spans nodes: a runner failing in `Loading` on
/// node 3 fails the whole instance, the error names it, nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_failing_to_load_on_another_node_fails_the_whole_instance() {
    let model = tiny_model("cluster-f");
    let nodes = start_cluster("cluster-f", 3, LEASE_MS).await;
    let mut body = json!({
        "model": model, "runners": 3, "nodes": 3,
        "fault": {"runner": 2, "phase": "loading", "kind": "exit", "code": 3},
    });
    body["timeouts"] = fast_timeouts();
    let id = nodes[0].create(body).await;
    nodes[1].wait_knows(&id).await;
    let v = nodes[0].wait_state(&id, &["ready", "failed"], LONG).await;
    assert_eq!(state_name(&v["state"]), "failed", "{v}");
    let message = v["failure"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!("runner {id}/2")) && message.contains("loading"),
        "{message}"
    );
    assert!(message.contains("exitcode=3"), "{message}");
    wait_no_runners(&id, Duration::from_secs(10)).await;
    let (status, v) = nodes[1]
        .call(
            "POST",
            "/v1/chat/completions",
            Some(json!({"model": id, "messages": [{"role": "user", "content": "hi"}]})),
        )
        .await;
    assert_eq!(status, 503, "{v}");
}

/// Placement that cannot be honoured is refused with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impossible_placements_are_refused_with_the_reason() {
    let model = tiny_model("cluster-place");
    let nodes = start_cluster("cluster-place", 2, LEASE_MS).await;
    let cases = [
        (
            json!({"model": model, "runners": 3, "nodes": 3}),
            "nodes must be between 1 and the 2 live nodes",
        ),
        (
            json!({"model": model, "runners": 1, "nodes": 2}),
            "1 runners cannot span 2 nodes",
        ),
        (
            json!({"model": model, "runners": 2, "node_ids": ["n-00000000"]}),
            "is not a live member",
        ),
        (
            json!({"model": model, "runners": 2, "nodes": 2, "node_ids": []}),
            "not both",
        ),
    ];
    for (body, expected) in cases {
        let (status, v) = nodes[0].call("POST", "/instance", Some(body.clone())).await;
        assert_eq!(status, 400, "{body}: {v}");
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(expected), "{body}: {message}");
    }
    let single = TestNode::start("cluster-place-single");
    let (status, v) = single
        .call(
            "POST",
            "/instance",
            Some(json!({"model": model, "runners": 2, "nodes": 2})),
        )
        .await;
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .contains("--cluster-listen"));
}

/// (g) Twenty create → chat → delete cycles across three nodes, each chat
/// through another node's API: every one answers, nothing is left, and no
/// node or runner logs anything wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_cycles_across_three_nodes_are_quiet() {
    let model = tiny_model("cluster-g");
    let nodes = start_cluster("cluster-g", 3, LEASE_MS).await;
    for cycle in 0..20 {
        let coordinator = &nodes[cycle % 3];
        let client = &nodes[(cycle + 1) % 3];
        let id = create_ready(
            coordinator,
            json!({"model": model, "runners": 3, "nodes": 3, "weights": "f32"}),
        )
        .await;
        client.wait_knows(&id).await;
        let text = greedy(client, &id, &format!("cycle {cycle}"), 8).await;
        assert!(!text.is_empty(), "cycle {cycle}");
        let report = client.delete(&id, "").await;
        assert!(
            report["escalations"]
                .as_array()
                .is_some_and(|e| e.is_empty()),
            "cycle {cycle}: {report}"
        );
        wait_no_runners(&id, Duration::from_secs(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for node in &nodes {
        node.assert_quiet();
        assert_eq!(node.cluster().await["hosted"], json!([]));
    }
}

/// A liveliness token proves a connection, not a working node: a node whose
/// runtime is wedged (its zenoh threads keep its token alive) stops
/// answering pings and is treated as lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_stops_answering_pings_is_lost_though_its_token_lives() {
    let model = tiny_model("cluster-ping");
    let mut first_port = crate::harness::free_port();
    let first =
        crate::harness::start_cluster_node("cluster-ping-0", &mut first_port, None, LEASE_MS, &[]);
    let wedged = crate::harness::start_cluster_node(
        "cluster-ping-1",
        &mut crate::harness::free_port(),
        Some(first_port),
        LEASE_MS,
        &["--fault-injection".to_string()],
    );
    first.wait_cluster(2).await;
    wedged.wait_cluster(2).await;
    let ids = [first.node_id().await, wedged.node_id().await];
    let mut body = json!({
        "model": model, "runners": 2, "node_ids": ids, "weights": "f32",
        "restart": {"max_restarts": 0},
    });
    body["timeouts"] = fast_timeouts();
    let id = create_ready(&first, body).await;

    // The stall request itself is answered only after the stall.
    let base = wedged.base.clone();
    let stall = tokio::spawn(async move {
        node::client::request(
            "POST",
            &format!("{base}/fault/stall"),
            Some(r#"{"ms": 6000}"#.into()),
        )
        .await
    });
    let failed = first
        .wait_state(&id, &["failed"], Duration::from_secs(10))
        .await;
    let message = failed["failure"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        message.contains(&format!("node {} lost: its ping failed", ids[1])),
        "{message}"
    );
    assert_eq!(failed["failure"]["kind"], "node_lost", "{failed}");
    // ... while node 1 still sees node 2's token.
    let cluster = first.cluster().await;
    let member = cluster["nodes"]
        .as_array()
        .and_then(|n| n.iter().find(|m| m["id"] == ids[1].as_str()).cloned())
        .expect("node 2 listed");
    assert_eq!(member["alive"], true, "{cluster}");
    // Once it runs again, node 2 learns that its runner's coordinator no
    // longer knows it, and stops it.
    let _ = stall.await;
    wait_no_runners(&id, Duration::from_secs(10)).await;
}

/// A rank that cannot be started on its node (here: that node's state dir
/// cannot hold runner files) fails the instance in `spawning`, naming the
/// node's reason, and the ranks that did start on the other nodes are
/// stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rank_that_cannot_start_on_its_node_fails_the_instance_and_stops_the_rest() {
    let model = tiny_model("cluster-spawn");
    let nodes = start_cluster("cluster-spawn", 3, LEASE_MS).await;
    let ids: Vec<String> = futures_util::future::join_all(nodes.iter().map(|n| n.node_id())).await;
    let runners_dir = nodes[2].state_dir.join("runners");
    std::fs::remove_dir_all(&runners_dir).expect("remove runners dir");
    std::fs::write(&runners_dir, b"not a directory").expect("block runners dir");
    let mut body =
        json!({"model": model, "runners": 3, "node_ids": ids, "restart": {"max_restarts": 0}});
    body["timeouts"] = fast_timeouts();
    let id = nodes[0].create(body).await;
    let v = nodes[0].wait_state(&id, &["ready", "failed"], LONG).await;
    assert_eq!(state_name(&v["state"]), "failed", "{v}");
    let message = v["failure"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!(
            "runner {id}/2 (rank 2) failed in phase spawning: could not spawn: node {}",
            ids[2]
        )),
        "{message}"
    );
    assert_eq!(v["failure"]["kind"], "spawn", "{v}");
    wait_no_runners(&id, Duration::from_secs(10)).await;
    // Every rank's end is recorded: the two that started were stopped.
    watchdog("every rank ended", Duration::from_secs(10), async {
        loop {
            let v = nodes[0].instance(&id).await;
            let runners = v["runners"].as_array().cloned().unwrap_or_default();
            if runners.len() == 3 && runners.iter().all(|r| r["exit"].is_string()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// The harness's own retry: a cluster port that another process takes
/// between `free_port` and the node's bind is replaced by a new one, and
/// the node starts there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_port_taken_before_the_node_binds_it_is_replaced() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_port = taken.local_addr().expect("addr").port();
    let mut port = taken_port;
    let node =
        crate::harness::start_cluster_node("cluster-port-taken", &mut port, None, LEASE_MS, &[]);
    assert_ne!(port, taken_port);
    node.wait_cluster(1).await;
    drop(taken);
}
