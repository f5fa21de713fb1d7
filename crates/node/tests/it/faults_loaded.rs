//! The lifecycle fault matrix under load: every phase × every fault kind
//! with eight tasks in flight (or, before the instance is ready, when no
//! task can be in flight, eight requests at once). Every task gets exactly
//! one terminal outcome, a failure names the runner and the cause, and
//! nothing is left running.

use std::time::Duration;

use serde_json::{json, Value};

use crate::faults::{
    assert_no_runners_left, expected_cause, expected_kind, instance_body, model_body, KINDS,
};
use crate::harness::{spawn_chat, wait_counts, watchdog, ChatResult, TestNode};

const LONG: Duration = Duration::from_secs(60);
const TASKS: usize = 8;

/// Eight concurrent streamed chats of `max_tokens` each.
fn spawn_eight(
    node: &TestNode,
    id: &str,
    max_tokens: u32,
) -> Vec<tokio::task::JoinHandle<ChatResult>> {
    (0..TASKS)
        .map(|i| spawn_chat(node, id, &format!("task {i} of eight"), max_tokens))
        .collect()
}

/// The clients' ends, in order.
async fn ends(clients: Vec<tokio::task::JoinHandle<ChatResult>>) -> Vec<ChatResult> {
    let mut ends = Vec::new();
    for client in clients {
        ends.push(
            watchdog("a client's end", LONG, client)
                .await
                .expect("client"),
        );
    }
    ends
}

/// Eight concurrent streamed chats; their ends.
async fn eight(node: &TestNode, id: &str, max_tokens: u32) -> Vec<ChatResult> {
    ends(spawn_eight(node, id, max_tokens)).await
}

/// Exactly one outcome each; a failure (a 503 refusal, a 502 before the
/// stream began, or an error in the stream) names runner 1 and the fault's
/// cause; a finish is one of `allowed`.
fn assert_outcomes(ends: &[ChatResult], id: &str, phase: &str, kind: &str, allowed: &[&str]) {
    let runner = format!("{id}/1");
    for (i, end) in ends.iter().enumerate() {
        let case = format!("[{phase}/{kind}] task {i}");
        let failed = end.status != 200 || !end.errors.is_empty();
        assert!(
            !failed || kind != "slow_drain",
            "{case}: a slowed drain failed a task: {end:?}"
        );
        if end.status != 200 {
            // 503: refused, the instance had failed; 502: failed before its
            // stream began.
            assert!(matches!(end.status, 502 | 503), "{case}: {end:?}");
            let body = end.errors.concat();
            assert!(
                body.contains(&runner),
                "{case}: refused without the runner: {body}"
            );
            assert!(
                body.contains(expected_cause(kind, phase)),
                "{case}: refused without the cause: {body}"
            );
            continue;
        }
        assert_eq!(end.terminal_outcomes(), 1, "{case}: {end:?}");
        // A stream that ends in an error event has no `[DONE]` after it.
        let done = usize::from(end.errors.is_empty());
        assert_eq!(end.done_markers as usize, done, "{case}: {end:?}");
        if let Some(error) = end.errors.first() {
            assert!(error.contains(&runner), "{case}: no runner in: {error}");
            assert!(
                error.contains(expected_cause(kind, phase)),
                "{case}: no {:?} in: {error}",
                expected_cause(kind, phase)
            );
        } else {
            let finish = end.finish_reasons[0].as_str();
            assert!(
                allowed.contains(&finish),
                "{case}: finished {finish:?}: {end:?}"
            );
        }
    }
}

async fn loaded_case(node: &TestNode, phase: &str, kind: &str, body: Value, tokens: u32) {
    let id = node.create(body).await;
    match (phase, kind) {
        ("shutting_down", _) => {
            node.wait_state(&id, &["ready"], LONG).await;
            // Eight long tasks (8 × 400 tokens take the scripted runners
            // about 16 s), then a drain delete: the fault fires as runner 1
            // begins its shutdown, and the drain deadline (1 s) ends what
            // is left.
            let clients = spawn_eight(node, &id, 400);
            wait_counts(node, &id, TASKS as u64, 0).await;
            let report = node.delete(&id, "?mode=drain").await;
            let ends = ends(clients).await;
            assert_outcomes(&ends, &id, phase, kind, &["length", "cancelled"]);
            let finished = |f: &str| ends.iter().filter(|e| e.finish_reasons == [f]).count();
            println!(
                "[{phase}/{kind}] of {TASKS}: {} completed, {} cancelled at the drain deadline, {} failed",
                finished("length"),
                finished("cancelled"),
                ends.iter().filter(|e| !e.errors.is_empty()).count()
            );
            assert_eq!(
                report["tasks_drained"].as_u64().unwrap()
                    + report["tasks_cancelled"].as_u64().unwrap()
                    + report["tasks_failed"].as_u64().unwrap(),
                TASKS as u64,
                "[{phase}/{kind}] every task counted once: {report}"
            );
        }
        (_, "slow_drain") => {
            // It only slows a drain: the tasks complete, and the delete
            // escalates.
            node.wait_state(&id, &["ready"], LONG).await;
            let ends = eight(node, &id, tokens).await;
            assert_outcomes(&ends, &id, phase, kind, &["length"]);
            let report = node.delete(&id, "?mode=drain").await;
            assert!(
                report.to_string().contains("SIGTERM, then SIGKILL"),
                "{report}"
            );
        }
        _ => {
            // Before it is ready no task is admitted: once the instance
            // failed, eight requests at once are each refused with the
            // cause. A fault that lets it reach ready (a stall, a hang, a
            // fault armed by the first task) meets eight tasks in flight.
            let v = node.wait_state(&id, &["ready", "failed"], LONG).await;
            let ready = v["state"]["state"] == "ready";
            let ends = eight(node, &id, if ready { tokens } else { 5 }).await;
            assert_outcomes(&ends, &id, phase, kind, &[]);
            let streamed = ends.iter().filter(|e| e.status == 200).count();
            let refused = ends.iter().filter(|e| e.status == 503).count();
            println!(
                "[{phase}/{kind}] of {TASKS}: {streamed} failed mid-stream, {} before their stream began, {refused} refused",
                TASKS - streamed - refused
            );
            if matches!(phase, "connecting" | "loading" | "warming_up") {
                assert_eq!(refused, TASKS, "[{phase}/{kind}] no task before ready");
            }
            let v = node.wait_state(&id, &["failed"], LONG).await;
            // Blamed on rank 1 with the fault's kind of cause (the phase
            // may be running: tasks were in flight).
            let failure = &v["failure"];
            assert_eq!(failure["rank"], 1, "[{phase}/{kind}] {failure}");
            let want = expected_kind(kind, phase);
            assert_eq!(failure["kind"], want, "[{phase}/{kind}] {failure}");
            let (status, report) = node.call("DELETE", &format!("/instance/{id}"), None).await;
            assert_eq!(status, 200, "{report}");
        }
    }
    assert_no_runners_left(&id).await;
}

async fn loaded_matrix_for(phase: &str) {
    let node = TestNode::start(&format!("loaded-{phase}"));
    for kind in KINDS {
        loaded_case(&node, phase, kind, instance_body(phase, kind), 200).await;
    }
    // The node keeps serving after all of that.
    let id = node
        .create(json!({"model": "scripted", "runners": 2}))
        .await;
    node.wait_state(&id, &["ready"], LONG).await;
    let ends = eight(&node, &id, 4).await;
    assert!(
        ends.iter().all(|e| e.finish_reasons == ["length"]),
        "{ends:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loaded_fault_matrix_before_ready() {
    for phase in ["connecting", "loading", "warming_up"] {
        loaded_matrix_for(phase).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loaded_fault_matrix_ready() {
    loaded_matrix_for("ready").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loaded_fault_matrix_running() {
    loaded_matrix_for("running").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loaded_fault_matrix_shutting_down() {
    loaded_matrix_for("shutting_down").await;
}

/// Faults while eight tasks step in batches through a real model's
/// pipeline (the tiny model, two stages). `ignore_sigterm` is left out as
/// in the model matrix (a stage serves its links from its own thread), and
/// `slow_drain` (no failure) is covered above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loaded_fault_matrix_running_on_a_tiny_real_model() {
    let model = crate::harness::fresh_dir("loaded-model").join("tiny");
    engine::testing::write_tiny_llama(&model, 11).unwrap();
    let node = TestNode::start("loaded-model");
    for kind in KINDS {
        if matches!(kind, "ignore_sigterm" | "slow_drain") {
            continue;
        }
        let body = model_body(&model, "running", kind);
        loaded_case(&node, "running", kind, body, 24).await;
    }
}
