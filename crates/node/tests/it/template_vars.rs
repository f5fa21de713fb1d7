//! `chat_template_kwargs` (vLLM's and SGLang's extension, sent by the
//! official SDK in `extra_body`) reach the model's chat template on the
//! runner: a tiny model whose template reads `enable_thinking` and
//! `date_string`, as Qwen3's and Llama 3's do.

use serde_json::{json, Value};

use crate::harness::{create_ready, fresh_dir, TestNode};

/// Prompt tokens the instance counted for `body` (one generated token).
async fn prompt_tokens(node: &TestNode, body: Value) -> u64 {
    let (status, v) = node
        .call("POST", "/v1/chat/completions", Some(body.clone()))
        .await;
    assert_eq!(status, 200, "{body}: {v}");
    v["usage"]["prompt_tokens"].as_u64().expect("usage")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_template_kwargs_reach_the_template() {
    let dir = fresh_dir("template-vars").join("model");
    engine::testing::write_tiny_llama(&dir, 5).unwrap();
    let config_path = dir.join("tokenizer_config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    // The tiny tokenizer is byte-level without merges: one token per byte
    // of text, so each variable's effect is its length in bytes.
    config["chat_template"] = json!(
        "{% if date_string is defined %}Today: {{ date_string }}\n{% endif %}\
         {% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
         <|im_start|>assistant\n\
         {% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"
    );
    std::fs::write(&config_path, config.to_string()).unwrap();
    let node = TestNode::start("template-vars");
    let id = create_ready(&node, json!({"model": dir, "runners": 2})).await;
    let body = |vars: Option<Value>| {
        let mut b = json!({
            "model": id, "max_tokens": 1,
            "messages": [{"role": "user", "content": "hi"}],
        });
        if let Some(vars) = vars {
            b["chat_template_kwargs"] = vars;
        }
        b
    };
    let plain = prompt_tokens(&node, body(None)).await;
    let thinking_on = prompt_tokens(&node, body(Some(json!({"enable_thinking": true})))).await;
    let thinking_off = prompt_tokens(&node, body(Some(json!({"enable_thinking": false})))).await;
    let dated = prompt_tokens(
        &node,
        body(Some(
            json!({"date_string": "1 Dec 2026", "enable_thinking": false}),
        )),
    )
    .await;
    assert_eq!(thinking_on, plain);
    assert_eq!(thinking_off, plain + "<think></think>".len() as u64);
    assert_eq!(dated, thinking_off + "Today: 1 Dec 2026\n".len() as u64);
    // Not an object, or a variable the server sets: a 400 in OpenAI's shape.
    for (vars, needle) in [
        (
            json!("enable_thinking"),
            "chat_template_kwargs must be a JSON object",
        ),
        (
            json!({"messages": []}),
            "chat_template_kwargs.messages is set by the server",
        ),
    ] {
        let (status, v) = node
            .call(
                "POST",
                "/v1/chat/completions",
                Some(body(Some(vars.clone()))),
            )
            .await;
        assert_eq!(status, 400, "{vars}: {v}");
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "{vars}: {msg}");
    }
    let report = node.delete(&id, "").await;
    assert_eq!(report["errors"], json!([]), "{report}");
    node.assert_quiet();
}
