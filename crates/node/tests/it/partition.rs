//! (e) A network partition: node A in this network namespace, node B in its
//! own, joined by a veth pair. Cutting the link makes both sides tear the
//! instance down within lease + 1 s; after healing the two see each other
//! again and a new instance spans them. Needs root (network namespaces):
//! without it the test says so and passes without running.

use std::time::{Duration, Instant};

use node::netns::Netns;
use serde_json::json;

use crate::harness::{
    fresh_dir, read_chat, runner_pids, state_name, tiny_model, wait_no_runners, watchdog, TestNode,
};

const LEASE_MS: u64 = 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_tears_down_both_sides_and_the_healed_cluster_serves_again() {
    let net = match Netns::create() {
        Ok(net) => net,
        Err(reason) => {
            engine::testing::skip(&format!("partition test: {reason}"));
            return;
        }
    };
    let model = tiny_model("partition");
    let lease = LEASE_MS.to_string();
    // A serves its API on every local address (the test reaches it over
    // loopback whatever the veth does); the cluster runs over the veth.
    let mut a = TestNode::start_wrapped(
        &[],
        "0.0.0.0:0",
        &fresh_dir("partition-a"),
        false,
        &[
            "--cluster-listen".into(),
            format!("tcp/{}:7447", net.host_ip),
            "--lease-ms".into(),
            lease.clone(),
        ],
    );
    a.base = a.base.replace("0.0.0.0", "127.0.0.1");
    let b = TestNode::start_wrapped(
        &["ip", "netns", "exec", &net.name],
        &format!("{}:0", net.ns_ip),
        &fresh_dir("partition-b"),
        false,
        &[
            "--cluster-listen".into(),
            format!("tcp/{}:7447", net.ns_ip),
            "--peer".into(),
            format!("tcp/{}:7447", net.host_ip),
            "--lease-ms".into(),
            lease,
        ],
    );
    a.wait_cluster(2).await;
    b.wait_cluster(2).await;
    let b_id = b.node_id().await;

    let body = json!({
        "model": model, "runners": 2, "nodes": 2, "weights": "f32",
        "restart": {"max_restarts": 0},
    });
    let id = a.create(body.clone()).await;
    let v = a
        .wait_state(&id, &["ready", "failed"], Duration::from_secs(60))
        .await;
    assert_eq!(state_name(&v["state"]), "ready", "{v}");
    assert_eq!(runner_pids(&id).len(), 2);

    let stream = a.streaming_chat(&id).await;
    let cut_at = Instant::now();
    net.set_link(false).expect("cut the link");
    let chat = watchdog(
        "the chat failing",
        Duration::from_secs(10),
        read_chat(stream),
    )
    .await;
    let client_error_after = cut_at.elapsed();
    let gone_after = wait_no_runners(&id, Duration::from_secs(10)).await + client_error_after;
    eprintln!(
        "partition: client error after {client_error_after:?}, runners gone after {gone_after:?}"
    );
    assert_eq!(chat.errors.len(), 1, "{chat:?}");
    assert!(
        chat.errors[0].contains(&format!("node {b_id} lost")),
        "{}",
        chat.errors[0]
    );
    let bound = Duration::from_millis(LEASE_MS + 1000);
    assert!(
        client_error_after <= bound,
        "client error after {client_error_after:?}"
    );
    assert!(
        gone_after <= bound,
        "runners on both sides gone after {gone_after:?}"
    );
    let failed = a
        .wait_state(&id, &["failed"], Duration::from_secs(10))
        .await;
    assert!(failed["failure"]["message"]
        .as_str()
        .unwrap_or("")
        .contains(&b_id));
    let b_log = std::fs::read_to_string(&b.log_path).unwrap_or_default();
    assert!(
        b_log.contains("coordinator lost: stopping the runner"),
        "node B stopped its runner itself"
    );

    net.set_link(true).expect("restore the link");
    watchdog("the cluster healing", Duration::from_secs(30), async {
        a.wait_cluster(2).await;
        b.wait_cluster(2).await;
    })
    .await;
    let id2 = a.create(body).await;
    let v = a
        .wait_state(&id2, &["ready", "failed"], Duration::from_secs(60))
        .await;
    assert_eq!(state_name(&v["state"]), "ready", "{v}");
    b.wait_knows(&id2).await;
    let chat = read_chat(b.chat(&id2, "healed", 8, true).await).await;
    assert!(chat.errors.is_empty(), "{chat:?}");
    assert_eq!(chat.finish_reasons.len(), 1, "{chat:?}");
    a.delete(&id2, "").await;
    wait_no_runners(&id2, Duration::from_secs(5)).await;
}
