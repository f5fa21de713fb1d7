//! Request checks, against what OpenAI's API documents (the request
//! schema of `POST /v1/chat/completions` and `POST /v1/completions`, and
//! the error codes it answers with).

use serde_json::json;

use super::*;

fn chat(body: Value) -> Result<Plan, ApiFailure> {
    serde_json::from_value::<ChatRequest>(body)
        .expect("parses")
        .plan()
}

fn completion(body: Value) -> Result<Plan, ApiFailure> {
    serde_json::from_value::<CompletionRequest>(body)
        .expect("parses")
        .plan()
}

fn code(f: &ApiFailure) -> (&str, Option<&str>) {
    (
        f.body.error.code.as_deref().unwrap_or(""),
        f.body.error.param.as_deref(),
    )
}

#[test]
fn unknown_and_harmless_fields_are_accepted() {
    let plan = chat(json!({
        "model": "m",
        "messages": [{"role": "user", "content": "hi", "name": "ann"}],
        "stream": true,
        "stream_options": {"include_usage": true},
        "user": "u1", "store": false, "metadata": {"a": "b"}, "service_tier": "auto",
        "parallel_tool_calls": false, "reasoning_effort": "low", "prediction": null,
        "tools": [], "tool_choice": "none", "response_format": {"type": "text"},
        "some_future_field": {"x": [1, 2]},
    }))
    .expect("accepted");
    assert!(plan.stream && plan.include_usage);
    assert_eq!(
        plan.max_tokens, None,
        "a chat without a bound runs to its end"
    );
}

#[test]
fn content_parts_and_every_role() {
    let plan = chat(json!({
        "model": "m",
        "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "system", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": null},
            {"role": "tool", "content": "42", "tool_call_id": "c1"},
        ],
    }))
    .expect("accepted");
    let TaskInput::Chat { turns, .. } = &plan.prompts[0] else {
        panic!("a chat")
    };
    let got: Vec<(&str, &str)> = turns
        .iter()
        .map(|t| (t.role.as_str(), t.content.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("system", "be brief"),
            ("system", "a\nb"),
            ("user", "q"),
            ("assistant", ""),
            ("tool", "42")
        ]
    );
}

#[test]
fn refusals_name_the_parameter_and_code() {
    let cases = [
        (
            json!({"tools": [{"type": "function", "function": {"name": "f"}}]}),
            ("unsupported_parameter", Some("tools")),
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {}}}),
            ("unsupported_value", Some("response_format")),
        ),
        (json!({"n": 0}), ("invalid_value", Some("n"))),
        (json!({"n": 17}), ("invalid_value", Some("n"))),
        (
            json!({"temperature": 2.5}),
            ("invalid_value", Some("temperature")),
        ),
        (json!({"top_p": 0}), ("invalid_value", Some("top_p"))),
        (
            json!({"frequency_penalty": -3}),
            ("invalid_value", Some("frequency_penalty")),
        ),
        (
            json!({"presence_penalty": 2.1}),
            ("invalid_value", Some("presence_penalty")),
        ),
        (
            json!({"top_logprobs": 3}),
            ("invalid_value", Some("top_logprobs")),
        ),
        (
            json!({"logprobs": true, "top_logprobs": 21}),
            ("invalid_value", Some("top_logprobs")),
        ),
        (
            json!({"logit_bias": {"x": 1}}),
            ("invalid_value", Some("logit_bias")),
        ),
        (
            json!({"logit_bias": {"5": 101}}),
            ("invalid_value", Some("logit_bias")),
        ),
        (
            json!({"stop": ["a", "b", "c", "d", "e"]}),
            ("invalid_value", Some("stop")),
        ),
        (json!({"stop": [""]}), ("invalid_value", Some("stop"))),
        (
            json!({"max_tokens": 0}),
            ("invalid_value", Some("max_tokens")),
        ),
        (
            json!({"max_completion_tokens": 0}),
            ("invalid_value", Some("max_completion_tokens")),
        ),
        (
            json!({"modalities": ["text", "audio"]}),
            ("unsupported_value", Some("modalities")),
        ),
    ];
    for (extra, expected) in cases {
        let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let err = chat(body.clone()).expect_err(&body.to_string());
        assert_eq!(err.status, 400, "{body}");
        assert_eq!(code(&err), expected, "{body}");
    }
    let bad_messages = [
        (json!([]), ("invalid_value", Some("messages"))),
        (
            json!([{"role": "wizard", "content": "x"}]),
            ("invalid_value", Some("messages[0].role")),
        ),
        (
            json!([{"role": "user", "content": 5}]),
            ("invalid_type", Some("messages[0].content")),
        ),
        (
            json!([{"role": "user", "content": null}]),
            ("invalid_type", Some("messages[0].content")),
        ),
        (
            json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
            ("unsupported_value", Some("messages[0].content[0]")),
        ),
        (
            json!([{"role": "user", "content": "a"}, {"role": "assistant", "content": null, "tool_calls": [{"id": "1"}]}]),
            ("unsupported_parameter", Some("messages[1].tool_calls")),
        ),
    ];
    for (messages, expected) in bad_messages {
        let err = chat(json!({"model": "m", "messages": messages})).expect_err("refused");
        assert_eq!(code(&err), expected, "{messages}");
    }
}

#[test]
fn n_choices_get_consecutive_seeds_and_indices() {
    let plan = chat(json!({
        "model": "m", "messages": [{"role": "user", "content": "hi"}],
        "n": 3, "seed": -1, "temperature": 0.8, "logprobs": true, "top_logprobs": 2,
        "logit_bias": {"7": -100}, "frequency_penalty": 0.5, "max_completion_tokens": 9,
    }))
    .expect("accepted");
    let tasks = plan.tasks();
    let seeds: Vec<u64> = tasks.iter().map(|t| t.2.seed).collect();
    assert_eq!(
        seeds,
        [u64::MAX, 0, 1],
        "seed -1 as u64, then +1, +2 (wrapping)"
    );
    assert_eq!(tasks.iter().map(|t| t.0).collect::<Vec<_>>(), [0, 1, 2]);
    assert_eq!(plan.max_tokens, Some(9));
    assert_eq!(plan.sampling.logprobs, Some(2));
    assert_eq!(plan.sampling.logit_bias, vec![(7, -100.0)]);
    assert_eq!(plan.logprobs, Some(LogprobsShape::Chat { top: 2 }));
}

#[test]
fn text_completion_prompts_defaults_and_echo() {
    let plan = completion(json!({"model": "m", "prompt": "Once"})).expect("accepted");
    assert_eq!(plan.prompts, [TaskInput::Text("Once".into())]);
    assert_eq!(plan.max_tokens, Some(DEFAULT_COMPLETION_MAX_TOKENS));
    let plan = completion(
        json!({"model": "m", "prompt": ["a", "b"], "n": 2, "echo": true, "max_tokens": 0}),
    )
    .expect("accepted");
    assert_eq!(
        plan.tasks().iter().map(|t| t.0).collect::<Vec<_>>(),
        [0, 1, 2, 3]
    );
    assert_eq!(plan.echo, Some(vec![Some("a".into()), Some("b".into())]));
    assert_eq!(plan.report_prompt, None, "the texts are known");
    // Echo with logprobs scores the prompt; echo of token ids reports them.
    let plan = completion(
        json!({"model": "m", "prompt": "a b", "echo": true, "logprobs": 3, "max_tokens": 0}),
    )
    .expect("accepted");
    assert_eq!(plan.report_prompt, Some(PromptReport::Logprobs(3)));
    assert_eq!(plan.sampling.logprobs, Some(3));
    let plan = completion(json!({"model": "m", "prompt": [[1, 2], "x"], "echo": true}));
    assert!(plan.is_err(), "a mix of ids and strings is not a prompt");
    let plan =
        completion(json!({"model": "m", "prompt": [[1, 2], [3]], "echo": true})).expect("accepted");
    assert_eq!(plan.echo, Some(vec![None, None]));
    assert_eq!(plan.report_prompt, Some(PromptReport::Tokens));
    let plan = completion(json!({"model": "m", "prompt": [[1, 2], [3]], "logprobs": 5}))
        .expect("accepted");
    assert_eq!(
        plan.prompts,
        [TaskInput::Tokens(vec![1, 2]), TaskInput::Tokens(vec![3])]
    );
    assert_eq!(plan.logprobs, Some(LogprobsShape::Completion { top: 5 }));
    for (body, expected) in [
        (json!({"prompt": 5}), ("invalid_type", Some("prompt"))),
        (json!({"prompt": []}), ("invalid_type", Some("prompt"))),
        (
            json!({"prompt": [1, "a"]}),
            ("invalid_type", Some("prompt")),
        ),
        (json!({"prompt": [-1]}), ("invalid_type", Some("prompt"))),
        (
            json!({"prompt": "a", "logprobs": 6}),
            ("invalid_value", Some("logprobs")),
        ),
        (
            json!({"prompt": "a", "max_tokens": 0}),
            ("invalid_value", Some("max_tokens")),
        ),
        (
            json!({"prompt": "a", "suffix": "z"}),
            ("unsupported_parameter", Some("suffix")),
        ),
        (
            json!({"prompt": "a", "best_of": 3}),
            ("unsupported_parameter", Some("best_of")),
        ),
        (
            json!({"prompt": ["a", "b", "c", "d", "e"], "n": 13}),
            ("invalid_value", Some("n")),
        ),
    ] {
        let mut body = body;
        body["model"] = json!("m");
        let err = completion(body.clone()).expect_err(&body.to_string());
        assert_eq!(code(&err), expected, "{body}");
    }
}

/// The legacy logprobs shape: OpenAI's documented `tokens`,
/// `token_logprobs`, `top_logprobs` (a map per token) and `text_offset`
/// (each token's start in the choice's text).
#[test]
fn completion_logprobs_offsets_count_from_the_echoed_prompt() {
    use ipc::Blob;
    let entries = [
        TokenLogprob {
            bytes: Blob(b" Paris".to_vec()),
            logprob: -0.25,
            top: vec![
                (Blob(b" Paris".to_vec()), -0.25),
                (Blob(b" Lyon".to_vec()), -2.0),
            ],
        },
        TokenLogprob {
            bytes: Blob(b".".to_vec()),
            logprob: -1.0,
            top: vec![(Blob(b".".to_vec()), -1.0)],
        },
    ];
    let v = completion_logprobs(None, &entries, 4);
    assert_eq!(v["tokens"], json!([" Paris", "."]));
    assert_eq!(v["token_logprobs"], json!([-0.25, -1.0]));
    assert_eq!(v["text_offset"], json!([4, 10]));
    assert_eq!(v["top_logprobs"][0][" Lyon"], json!(-2.0));
    // With the echoed prompt "It is": its first token has null
    // log-probabilities (nothing precedes it), the rest theirs; the
    // generated entries' offsets start after the prompt's text.
    let prompt = ReportedPrompt {
        tokens: vec![Blob(b"It".to_vec()), Blob(b" is".to_vec())],
        logprobs: vec![TokenLogprob {
            bytes: Blob(b" is".to_vec()),
            logprob: -0.5,
            top: vec![(Blob(b" was".to_vec()), -0.375)],
        }],
    };
    assert_eq!(prompt.text(), "It is");
    let v = completion_logprobs(Some(&prompt), &entries, prompt.text().len());
    assert_eq!(v["tokens"], json!(["It", " is", " Paris", "."]));
    assert_eq!(v["token_logprobs"], json!([null, -0.5, -0.25, -1.0]));
    assert_eq!(v["top_logprobs"][0], json!(null));
    assert_eq!(v["top_logprobs"][1], json!({" was": -0.375}));
    assert_eq!(v["text_offset"], json!([0, 2, 5, 11]));
    let c = chat_logprobs(&entries);
    assert_eq!(c["content"][0]["token"], " Paris");
    assert_eq!(c["content"][0]["bytes"], json!(b" Paris".to_vec()));
    assert_eq!(c["content"][0]["top_logprobs"][1]["token"], " Lyon");
}

#[test]
fn chat_template_kwargs_reach_the_template_and_reserved_names_are_refused() {
    let vars = |body: Value| match &chat(body).expect("accepted").prompts[0] {
        TaskInput::Chat { template_vars, .. } => template_vars.clone(),
        other => panic!("a chat, not {other:?}"),
    };
    let messages = json!([{"role": "user", "content": "hi"}]);
    assert_eq!(vars(json!({"model": "m", "messages": messages})), "");
    assert_eq!(
        vars(json!({"model": "m", "messages": messages, "chat_template_kwargs": {}})),
        ""
    );
    let sent =
        json!({"enable_thinking": false, "date_string": "1 Dec 2026", "n": [1, {"a": null}]});
    let got = vars(json!({"model": "m", "messages": messages, "chat_template_kwargs": sent}));
    assert_eq!(serde_json::from_str::<Value>(&got).unwrap(), sent);
    for reserved in [
        "messages",
        "add_generation_prompt",
        "bos_token",
        "eos_token",
        "tools",
    ] {
        let err = chat(json!({
            "model": "m", "messages": messages,
            "chat_template_kwargs": {"enable_thinking": true, reserved: 1},
        }))
        .expect_err("reserved");
        assert_eq!(err.status, 400);
        assert_eq!(code(&err), ("invalid_value", Some("chat_template_kwargs")));
        assert!(
            err.body.error.message.contains(&format!(
                "chat_template_kwargs.{reserved} is set by the server"
            )),
            "{}",
            err.body.error.message
        );
    }
}
