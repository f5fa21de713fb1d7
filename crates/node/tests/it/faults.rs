//! (c) the fault matrix — every phase × every fault kind — plus (e) SIGTERM
//! escalation, (f) the restart policy with real processes, and runners that
//! write garbage on their channel.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{fast_timeouts, read_chat, runner_pids, state_name, watchdog, TestNode};

const LONG: Duration = Duration::from_secs(30);

pub const KINDS: [&str; 9] = [
    "panic",
    "exit",
    "abort",
    "kill",
    "hang",
    "ignore_sigterm",
    "slow_drain",
    "garbage",
    "oversize_frame",
];

/// The words a failure report must contain for a fault kind.
pub fn expected_cause(kind: &str, phase: &str) -> &'static str {
    match kind {
        "panic" => "exitcode=101",
        "exit" => "exitcode=3",
        "abort" => "signal=6 (SIGABRT)",
        "kill" => "signal=9 (SIGKILL)",
        "hang" => "hung (no pong",
        "garbage" => "malformed frame",
        "oversize_frame" => "exceeds the limit",
        "ignore_sigterm" if matches!(phase, "ready" | "running") => "made no progress",
        "ignore_sigterm" => "did not finish",
        _ => unreachable!("{kind} has no failure cause"),
    }
}

/// The kind of cause (`failure.kind` in `/state`) a fault of `kind` in
/// `phase` is attributed to.
pub fn expected_kind(kind: &str, phase: &str) -> &'static str {
    match kind {
        "panic" | "exit" | "abort" | "kill" | "garbage" | "oversize_frame" => "exited",
        "hang" => "hung",
        "ignore_sigterm" if matches!(phase, "ready" | "running") => "stalled",
        "ignore_sigterm" => "deadline",
        _ => unreachable!("{kind} has no failure cause"),
    }
}

/// `/state`'s failure of an instance failed by a fault of `kind` in
/// `phase` on rank 1: its message names runner, phase and cause, and its
/// typed fields agree.
pub fn assert_failure(failure: &Value, id: &str, phase: &str, kind: &str) {
    assert_names(failure["message"].as_str().unwrap(), id, phase, kind);
    assert_eq!(failure["rank"], 1, "[{phase}/{kind}] {failure}");
    assert_eq!(
        failure["kind"],
        expected_kind(kind, phase),
        "[{phase}/{kind}] {failure}"
    );
}

pub fn instance_body(phase: &str, kind: &str) -> Value {
    let mut fault = json!({"runner": 1, "phase": phase, "kind": kind});
    if kind == "slow_drain" {
        fault["delay_ms"] = json!(60_000);
    }
    json!({
        "model": "scripted",
        "runners": 2,
        "scripted": {"token_delay_ms": 5, "fault": fault},
        "timeouts": fast_timeouts(),
        "restart": {"max_restarts": 0},
    })
}

pub async fn assert_no_runners_left(id: &str) {
    watchdog(
        &format!("runners of {id} gone"),
        Duration::from_secs(10),
        async {
            while !runner_pids(id).is_empty() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        },
    )
    .await;
}

/// Checks a client-facing failure message.
pub fn assert_names(message: &str, id: &str, phase: &str, kind: &str) {
    let runner = format!("{id}/1 (rank 1)");
    assert!(
        message.contains(&runner),
        "[{phase}/{kind}] no runner in: {message}"
    );
    // A runner that stalls while ready is caught by the first task it
    // leaves without progress: the failure is in phase running.
    let seen_in = if (phase, kind) == ("ready", "ignore_sigterm") {
        "running"
    } else {
        phase
    };
    assert!(
        message.contains(&format!("phase {seen_in}")),
        "[{phase}/{kind}] no phase in: {message}"
    );
    let cause = expected_cause(kind, phase);
    assert!(
        message.contains(cause),
        "[{phase}/{kind}] no {cause:?} in: {message}"
    );
}

async fn run_case(node: &TestNode, phase: &str, kind: &str) -> Duration {
    run_case_with(node, phase, kind, instance_body(phase, kind)).await
}

/// The same fault as a model instance: 2-stage pipeline of `model`.
pub fn model_body(model: &std::path::Path, phase: &str, kind: &str) -> Value {
    let mut body = instance_body(phase, kind);
    let fault = body["scripted"]["fault"].take();
    json!({
        "model": model, "runners": 2, "sharding": "pipeline", "fault": fault,
        "timeouts": fast_timeouts(), "restart": {"max_restarts": 0},
    })
}

async fn run_case_with(node: &TestNode, phase: &str, kind: &str, body: Value) -> Duration {
    let id = node.create(body).await;
    let started = Instant::now();
    let detected;
    match (phase, kind) {
        ("shutting_down", _) | (_, "slow_drain") => {
            node.wait_state(&id, &["ready"], LONG).await;
            if phase == "running" {
                // The fault is armed by the first task step.
                let chat = read_chat(node.chat(&id, "arm it", 3, true).await).await;
                assert_eq!(chat.finish_reasons, ["length"], "[{phase}/{kind}] {chat:?}");
            }
            let t0 = Instant::now();
            let report = node.delete(&id, "?mode=drain").await;
            detected = t0.elapsed();
            let text = report.to_string();
            match kind {
                "ignore_sigterm" => {
                    assert!(
                        text.contains("SIGTERM, then SIGKILL"),
                        "[{phase}/{kind}] {text}"
                    );
                    assert!(
                        text.contains("signal=9 (SIGKILL)"),
                        "[{phase}/{kind}] {text}"
                    );
                }
                "slow_drain" => {
                    assert!(
                        text.contains("SIGTERM, then SIGKILL"),
                        "[{phase}/{kind}] {text}"
                    );
                    assert!(
                        text.contains("signal=15 (SIGTERM)"),
                        "[{phase}/{kind}] {text}"
                    );
                }
                _ => {
                    let errors = report["errors"].to_string();
                    assert!(
                        errors.contains(&format!("{id}/1")),
                        "[{phase}/{kind}] {text}"
                    );
                    assert!(
                        errors.contains(expected_cause(kind, phase)),
                        "[{phase}/{kind}] {text}"
                    );
                }
            }
            assert_eq!(
                report["runners"][0]["exit"], "exitcode=0",
                "[{phase}/{kind}] sibling: {text}"
            );
        }
        ("running", _) | ("ready", "ignore_sigterm") => {
            node.wait_state(&id, &["ready"], LONG).await;
            let t0 = Instant::now();
            let chat = watchdog("chat outcome", LONG, async {
                read_chat(node.chat(&id, "a b c", 50, true).await).await
            })
            .await;
            detected = t0.elapsed();
            assert_eq!(chat.terminal_outcomes(), 1, "[{phase}/{kind}] {chat:?}");
            assert_eq!(chat.errors.len(), 1, "[{phase}/{kind}] {chat:?}");
            assert_names(&chat.errors[0], &id, phase, kind);
            let v = node.wait_state(&id, &["failed"], LONG).await;
            assert_failure(&v["failure"], &id, phase, kind);
        }
        _ => {
            let v = node.wait_state(&id, &["failed"], LONG).await;
            detected = started.elapsed();
            assert_failure(&v["failure"], &id, phase, kind);
            // A chat is refused with the cause.
            let chat = read_chat(node.chat(&id, "x", 5, true).await).await;
            assert_eq!(chat.status, 503, "{chat:?}");
            assert!(
                chat.errors.concat().contains(expected_cause(kind, phase)),
                "{chat:?}"
            );
        }
    }
    assert_no_runners_left(&id).await;
    // Failed instances stay visible with their cause until deleted.
    if !(phase == "shutting_down" || kind == "slow_drain") {
        let (_, state) = node.call("GET", "/state", None).await;
        let listed = state["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["instance_id"] == id.as_str())
            .cloned();
        let listed = listed.unwrap_or_else(|| panic!("[{phase}/{kind}] {id} not in /state"));
        assert_eq!(state_name(&listed["state"]), "failed");
        let (status, report) = node.call("DELETE", &format!("/instance/{id}"), None).await;
        assert_eq!(status, 200, "{report}");
    }
    detected
}

/// The lifecycle fault matrix once on a tiny real model (a 2-stage
/// pipeline). `ignore_sigterm` in `ready`/`running` is left out: it stalls
/// the runner's control loop, but a model stage serves its links from its own
/// thread, so the stall is not a failure there (the stall of a whole stage is
/// what `hang` covers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_matrix_on_a_tiny_real_model() {
    let model = crate::harness::fresh_dir("matrix-model").join("tiny");
    engine::testing::write_tiny_llama(&model, 11).unwrap();
    let node = TestNode::start("matrix-model");
    for phase in [
        "connecting",
        "loading",
        "warming_up",
        "ready",
        "running",
        "shutting_down",
    ] {
        let mut timings = Vec::new();
        for kind in KINDS {
            if kind == "ignore_sigterm" && matches!(phase, "ready" | "running") {
                continue;
            }
            let took = run_case_with(&node, phase, kind, model_body(&model, phase, kind)).await;
            timings.push(format!("{kind}={}ms", took.as_millis()));
        }
        println!("model fault matrix {phase}: {}", timings.join(" "));
    }
}

async fn matrix_for(phase: &str) {
    let node = TestNode::start(&format!("matrix-{phase}"));
    let mut timings = Vec::new();
    for kind in KINDS {
        let took = run_case(&node, phase, kind).await;
        timings.push(format!("{kind}={}ms", took.as_millis()));
    }
    println!("fault matrix {phase}: {}", timings.join(" "));
    // The node keeps serving after all of that.
    let id = node
        .create(json!({"model": "scripted", "runners": 2}))
        .await;
    node.wait_state(&id, &["ready"], LONG).await;
    let chat = read_chat(node.chat(&id, "still here", 2, true).await).await;
    assert_eq!(chat.finish_reasons, ["length"], "{chat:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_matrix_connecting() {
    matrix_for("connecting").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_matrix_loading() {
    matrix_for("loading").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_matrix_warming_up() {
    matrix_for("warming_up").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_matrix_ready() {
    matrix_for("ready").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_matrix_running() {
    matrix_for("running").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_matrix_shutting_down() {
    matrix_for("shutting_down").await;
}

/// (e) A runner ignoring SIGTERM is SIGKILLed at the deadline, and the whole
/// shutdown stays within its deadlines plus the grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignored_sigterm_is_escalated_to_sigkill_within_the_budget() {
    let node = TestNode::start("escalation");
    let id = node
        .create(instance_body("shutting_down", "ignore_sigterm"))
        .await;
    node.wait_state(&id, &["ready"], LONG).await;
    let report = node.delete(&id, "?mode=drain").await;
    let runner = &report["runners"][1];
    assert_eq!(runner["exit"], "signal=9 (SIGKILL)", "{report}");
    assert_eq!(runner["escalation"]["sent_sigterm"], true, "{report}");
    assert_eq!(runner["escalation"]["sent_sigkill"], true, "{report}");
    assert_eq!(
        report["escalations"],
        json!([format!(
            "runner {id}/1: SIGTERM, then SIGKILL after the grace period (drain deadline)"
        )])
    );
    // Budget from the configured deadlines: signaling (500) + draining
    // (drain 1000 + signal margin 500) + grace (300); the report's own
    // phase timings must add up within it, plus scheduling slack.
    let budget_ms = 500.0 + 1500.0 + 300.0;
    let total = report["total_ms"].as_f64().unwrap();
    assert!(
        total <= budget_ms + 1000.0,
        "shutdown took {total} ms, budget {budget_ms} ms: {report}"
    );
    assert!(
        total >= 2000.0,
        "escalation cannot precede the deadlines: {total} ms"
    );
    assert_no_runners_left(&id).await;
}

/// (f) With real processes: a runner killed while loading restarts the
/// instance by policy until the limit, then the instance stays Failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_policy_restarts_then_gives_up() {
    let node = TestNode::start("restart");
    let mut body = instance_body("loading", "kill");
    body["restart"] = json!({"max_restarts": 2, "window_ms": 60000, "backoff_initial_ms": 50, "backoff_max_ms": 200});
    let id = node.create(body).await;
    let mut seen_restarting = 0;
    let v = watchdog("gives up", LONG, async {
        let mut last_attempt = None;
        loop {
            let v = node.instance(&id).await;
            match state_name(&v["state"]) {
                "restarting" => {
                    let attempt = v["state"]["attempt"].clone();
                    if last_attempt.as_ref() != Some(&attempt) {
                        seen_restarting += 1;
                        last_attempt = Some(attempt);
                    }
                }
                "failed"
                    if v["state"]["cause"]
                        .as_str()
                        .unwrap_or("")
                        .contains("gave up") =>
                {
                    return v
                }
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert_eq!(v["restarts"], 2, "{v}");
    assert_eq!(seen_restarting, 2, "{v}");
    let cause = v["state"]["cause"].as_str().unwrap();
    assert!(
        cause.contains("gave up after 2 restarts within 60 s"),
        "{cause}"
    );
    assert!(cause.contains("signal=9 (SIGKILL)"), "{cause}");
    assert_no_runners_left(&id).await;
}

/// (h) A runner writing garbage or an oversize frame fails its own instance
/// with a clear cause; the node keeps serving another instance throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_garbage_fails_only_its_instance() {
    let node = TestNode::start("garbage");
    let healthy = node
        .create(json!({"model": "scripted", "runners": 2}))
        .await;
    node.wait_state(&healthy, &["ready"], LONG).await;
    for kind in ["garbage", "oversize_frame"] {
        let id = node.create(instance_body("ready", kind)).await;
        let v = node.wait_state(&id, &["failed"], LONG).await;
        assert_failure(&v["failure"], &id, "ready", kind);
        assert_no_runners_left(&id).await;
        let chat = read_chat(node.chat(&healthy, "fine", 2, true).await).await;
        assert_eq!(chat.finish_reasons, ["length"], "{chat:?}");
    }
}
