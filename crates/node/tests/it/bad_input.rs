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
            "sharding, layers, weights, prefill_chunk, max_step_tokens, prefix_cache_mb and kv_cache_mb apply to model files",
        ),
        (
            "POST",
            "/instance",
            r#"{"model": "scripted", "max_step_tokens": 4}"#,
            400,
            "prefix_cache_mb and kv_cache_mb apply to model files",
        ),
        (
            "POST",
            "/instance",
            r#"{"model": "scripted", "max_batch": 0}"#,
            400,
            "max_batch must be at least 1 task",
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

/// One raw HTTP/1.1 request (bytes as given: invalid UTF-8 in the path
/// included); returns the status and the body.
async fn raw_http(
    addr: &str,
    method: &str,
    path: &[u8],
    headers: &str,
    body: &[u8],
) -> (u16, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut request = Vec::new();
    request.extend_from_slice(method.as_bytes());
    request.push(b' ');
    request.extend_from_slice(path);
    request.extend_from_slice(
        format!(
            " HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n{headers}\r\n",
            body.len()
        )
        .as_bytes(),
    );
    request.extend_from_slice(body);
    // The server may answer (413) and close before it read the whole body.
    let _ = stream.write_all(&request).await;
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await;
    let text = String::from_utf8_lossy(&response);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = match response.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(at) => response[at + 4..].to_vec(),
        None => Vec::new(),
    };
    (status, body)
}

fn node_rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// (c) Hostile requests: a seeded generator of malformed bodies, wrong
/// types, invalid UTF-8 in paths and bodies, deeply nested JSON and
/// oversize bodies against every route. Every answer is a success or a JSON
/// error in OpenAI's shape (`error.message`, `error.type`), the node stays
/// healthy, and its memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_openai_errors_and_the_node_stays_healthy() {
    let node = TestNode::start("hostile");
    let id = node
        .create(json!({"model": "scripted", "runners": 1, "scripted": {"token_delay_ms": 0}}))
        .await;
    node.wait_state(&id, &["ready"], Duration::from_secs(30))
        .await;
    let addr = node.base.trim_start_matches("http://").to_string();
    let routes: Vec<(&str, Vec<u8>)> = vec![
        ("POST", b"/v1/chat/completions".to_vec()),
        ("POST", b"/v1/completions".to_vec()),
        ("POST", b"/instance".to_vec()),
        ("GET", format!("/instance/{id}").into_bytes()),
        ("DELETE", b"/instance/i-none?mode=%ff%fe".to_vec()),
        ("POST", b"/v1/cancel/%00%ff".to_vec()),
        ("GET", b"/instance/%c3%28".to_vec()),
        ("GET", b"/v1/models/%ff".to_vec()),
        ("GET", b"/v1/models".to_vec()),
        ("PUT", b"/v1/chat/completions".to_vec()),
        ("GET", b"/state".to_vec()),
        ("GET", b"/nowhere/%ff%fe".to_vec()),
    ];
    let fields = [
        "model",
        "messages",
        "prompt",
        "max_tokens",
        "n",
        "stream",
        "stop",
        "temperature",
        "top_p",
        "logprobs",
        "top_logprobs",
        "logit_bias",
        "stream_options",
        "tools",
        "seed",
        "echo",
        "runners",
        "content",
        "role",
    ];
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    let value = |rng: &mut fastrand::Rng, depth: u32| -> Value {
        match rng.u8(..9) {
            0 => json!(null),
            1 => json!(rng.i64(..)),
            2 => json!(rng.f64() * 1e6 - 5e5),
            3 => json!("x".repeat(rng.usize(..64))),
            4 => json!([1, "a", null]),
            5 => json!({"role": "user", "content": [{"type": "image_url"}]}),
            6 => json!([{"role": "user", "content": "hi"}]),
            7 => json!(id),
            _ => json!(depth),
        }
    };
    let before = node_rss_kb(node.pid());
    for round in 0..400 {
        let (method, path) = &routes[round % routes.len()];
        let body: Vec<u8> = match rng.u8(..7) {
            // An object of random fields with random values.
            0..=2 => {
                let mut obj = serde_json::Map::new();
                for _ in 0..rng.usize(1..6) {
                    obj.insert(fields[rng.usize(..fields.len())].into(), value(&mut rng, 0));
                }
                if rng.bool() {
                    obj.insert("model".into(), json!(id));
                    obj.insert("max_tokens".into(), json!(2));
                }
                serde_json::to_vec(&obj).unwrap()
            }
            // Truncated JSON.
            3 => br#"{"model": "x", "messages": [{"role": "us"#.to_vec(),
            // Invalid UTF-8 inside a string.
            4 => b"{\"model\": \"\xff\xfe\", \"prompt\": \"\xc3\x28\"}".to_vec(),
            // Deeply nested arrays.
            5 => {
                let depth = 10_000;
                let mut b = format!("{{\"model\": \"{id}\", \"prompt\": ").into_bytes();
                b.extend(std::iter::repeat_n(b'[', depth));
                b.extend(std::iter::repeat_n(b']', depth));
                b.push(b'}');
                b
            }
            // Random bytes.
            _ => (0..rng.usize(1..256)).map(|_| rng.u8(..)).collect(),
        };
        let headers = if rng.u8(..8) == 0 {
            "Content-Type: multipart/form-data; boundary=x\r\n"
        } else {
            "Content-Type: application/json\r\n"
        };
        let (status, body) = raw_http(&addr, method, path, headers, &body).await;
        assert!(status != 0, "{method} {path:?}: no answer");
        if status >= 400 {
            let v: Value = serde_json::from_slice(&body).unwrap_or_else(|e| {
                panic!(
                    "{method} {:?} → {status}, not JSON ({e}): {:?}",
                    String::from_utf8_lossy(path),
                    String::from_utf8_lossy(&body)
                )
            });
            assert!(
                v["error"]["message"].is_string() && v["error"]["type"].is_string(),
                "{method} {:?} → {status}: {v}",
                String::from_utf8_lossy(path)
            );
            assert!(
                status < 500 || status == 502 || status == 503,
                "{status}: {v}"
            );
        }
    }
    // Raw non-ASCII bytes in the request line are not HTTP (RFC 9112: the
    // request target is ASCII): hyper's parser answers a bare 400 and
    // closes, before any route sees it.
    let (status, _) = raw_http(&addr, "GET", b"/nowhere/\xff\xfe", "", b"").await;
    assert_eq!(status, 400);
    // An oversize body is refused with 413, in OpenAI's shape.
    let big = vec![b' '; 9 << 20];
    let (status, body) = raw_http(&addr, "POST", b"/v1/chat/completions", "", &big).await;
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&body));
    let v: Value = serde_json::from_slice(&body).expect("413 body is JSON");
    assert_eq!(v["error"]["code"], "request_too_large", "{v}");
    // Healthy, serving, and memory bounded: well under what 400 requests of
    // up to 9 MiB would hold had anything kept them.
    let (status, _) = node.call("GET", "/health", None).await;
    assert_eq!(status, 200);
    let chat = read_chat(node.chat(&id, "still fine", 2, true).await).await;
    assert_eq!(chat.finish_reasons, ["length"], "{chat:?}");
    let after = node_rss_kb(node.pid());
    eprintln!("node RSS before {before} kB, after {after} kB");
    assert!(
        after < before + 64 * 1024,
        "RSS grew from {before} to {after} kB"
    );
    let view = node.instance(&id).await;
    assert_eq!(view["state"]["state"], "ready", "{view}");
    node.delete(&id, "").await;
}
