//! (h) Bad input gets a clear error in OpenAI's shape; the node keeps serving.

use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{read_chat, TestNode};

fn message(v: &Value) -> String {
    v["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("not an OpenAI error: {v}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors_and_the_node_keeps_serving() {
    let node = TestNode::start("bad");
    let id = node
        .create(json!({"model": "scripted", "runners": 2}))
        .await;
    node.wait_state(&id, &["ready"], Duration::from_secs(30))
        .await;

    let cases: Vec<(&str, &str, &str, u16, &str)> = vec![
        (
            "POST",
            "/instance",
            "{not json",
            400,
            "invalid POST /instance body",
        ),
        (
            "POST",
            "/instance",
            r#"{"model": "scripted", "runners": "four"}"#,
            400,
            "invalid type",
        ),
        (
            "POST",
            "/instance",
            r#"{"model": "scripted", "runners": 0}"#,
            400,
            "runners must be between 1 and 64, got 0",
        ),
        (
            "POST",
            "/instance",
            r#"{"model": "scripted", "runners": 1000}"#,
            400,
            "got 1000",
        ),
        (
            "POST",
            "/instance",
            r#"{"model": "llama-70b", "runners": 1}"#,
            400,
            "unknown model",
        ),
        (
            "POST",
            "/instance",
            r#"{"model": "scripted", "runnerz": 2}"#,
            400,
            "unknown field `runnerz`",
        ),
        (
            "POST",
            "/instance",
            r#"{"model": "scripted", "runners": 2, "scripted": {"fault": {"runner": 5, "phase": "loading", "kind": "kill"}}}"#,
            400,
            "fault.runner is 5",
        ),
        (
            "POST",
            "/instance",
            r#"{"model": "scripted", "scripted": {"fault": {"runner": 0, "phase": "lunch", "kind": "kill"}}}"#,
            400,
            "unknown variant `lunch`",
        ),
        (
            "POST",
            "/instance",
            r#"{"model": "/m.gguf", "weights": "q4"}"#,
            400,
            "unknown variant `q4`, expected one of `f32`, `gguf`, `q8_0`",
        ),
        (
            "POST",
            "/instance",
            r#"{"model": "scripted", "weights": "f32"}"#,
            400,
            "sharding, layers, weights and prefill_chunk apply to model files",
        ),
        (
            "POST",
            "/instance",
            r#"{"model": "scripted", "runners": 2, "scripted": {"fault": {"runner": 1, "phase": "spawning", "kind": "kill"}}}"#,
            400,
            "spawning cannot be injected",
        ),
        ("GET", "/instance/i-nope", "", 404, "no instance \"i-nope\""),
        (
            "DELETE",
            "/instance/i-nope",
            "",
            404,
            "no instance \"i-nope\"",
        ),
        (
            "POST",
            "/v1/chat/completions",
            "[]",
            400,
            "invalid chat completion body",
        ),
        (
            "POST",
            "/v1/chat/completions",
            r#"{"model": "x", "messages": []}"#,
            400,
            "at least one message",
        ),
        (
            "POST",
            "/v1/chat/completions",
            r#"{"model": "nobody", "messages": [{"role": "user", "content": "hi"}]}"#,
            404,
            "does not exist",
        ),
        (
            "POST",
            "/v1/chat/completions",
            r#"{"model": "scripted", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}"#,
            400,
            "max_tokens must be between",
        ),
        (
            "POST",
            "/v1/chat/completions",
            r#"{"model": "scripted", "messages": [{"role": "user", "content": 7}]}"#,
            400,
            "content must be a string or a list of text parts",
        ),
        ("POST", "/v1/cancel/i-nope-t1", "", 404, "no task"),
        ("GET", "/nowhere", "", 404, "no such endpoint"),
    ];
    for (method, path, body, status, needle) in cases {
        let (got, v) = node.raw(method, path, body).await;
        assert_eq!(got, status, "{method} {path} {body}: {v}");
        let msg = message(&v);
        assert!(
            msg.contains(needle),
            "{method} {path} {body}: {msg:?} lacks {needle:?}"
        );
    }
    let (got, v) = node
        .call("DELETE", &format!("/instance/{id}?mode=sideways"), None)
        .await;
    assert_eq!(got, 400);
    assert!(message(&v).contains("mode must be drain or cancel"), "{v}");

    // Still serving.
    let chat = read_chat(node.chat(&id, "still fine", 2, true).await).await;
    assert_eq!(chat.finish_reasons, ["length"]);
    let report = node.delete(&id, "").await;
    assert_eq!(report["errors"], json!([]));
}
