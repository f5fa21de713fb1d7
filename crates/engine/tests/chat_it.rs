//! Chat templates against Python's `jinja2` (`chat_oracle.py`, with the
//! environment and helpers `transformers`' `apply_chat_template` uses):
//! templates written here in the shapes of real ones (Llama 3.1's tools and
//! dates, Qwen3's thinking and reverse search, Mistral's alternation check,
//! and a grab bag of the string, dict and filter calls templates make)
//! render byte for byte alike, and a template that raises fails in both.
//!
//! Skips, saying why, without `jinja2`; fails instead where
//! `SHARDVISOR_REQUIRE_MODEL=1` (CI installs it).

use engine::chat::{ChatTemplate, RenderOptions};
use serde_json::{json, Value};

const LLAMA31_LIKE: &str = r#"{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none %}
    {{- "Use these functions:\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message.role == 'tool' %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {{- message.content | tojson }}
        {{- "<|eot_id|>" }}
    {%- elif message.tool_calls is defined %}
        {%- set call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
        {{- '{"name": "' + call.name + '", "parameters": ' + call.arguments | tojson + '}' }}
        {{- "<|eot_id|>" }}
    {%- else %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"#;

const QWEN3_LIKE: &str = r#"{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not message.content.startswith('<tool_response>') %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
        {%- break %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == "system" and loop.first %}{% continue %}{% endif %}
    {%- set content = message.content %}
    {%- if message.role == "assistant" %}
        {%- set reasoning = '' %}
        {%- if '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and reasoning %}
            {{- '<|im_start|>assistant\n<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
        {%- else %}
            {{- '<|im_start|>assistant\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\n' + content.replace('  ', ' ') + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if messages[0].role == "system" %}{{ '[system: ' + messages[0].content.upper() + ']' }}{% endif %}
{{- '[last query ' ~ ns.last_query_index ~ ']' }}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}
"#;

const MISTRAL_LIKE: &str = r#"{{- bos_token }}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {{- '[INST] ' + message['content'] + ' [/INST]' }}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token }}
    {%- endif %}
{%- endfor %}
"#;

const GRAB_BAG: &str = r#"{% for m in messages %}
{{ loop.index }}. {{ m.role | title }}: {{ m.content.split(' ', 1)[0] }} / {{ m.content.split() | length }} words{% if not loop.last %};{% endif %}

{% endfor %}
{% for k, v in info.items() %}{{ k }}={{ v | tojson }} {% endfor %}

{{ info.get('missing', 'fallback') }} {{ info.get('n') }} {{ messages | map(attribute='role') | join(',') }}
{{ '  padded  '.strip() }}|{{ 'xxhixx'.strip('x') }}|{{ 'a-b-c'.replace('-', '+') }}|{{ 'Hello'.endswith('lo') }}|{{ none }}|{{ info.flag }}
{{ 'one two  three'.split() | join('_') }}|{{ 'k=v=w'.split('=', 1) | tojson }}|{{ 'MiXeD'.lower() }}|{{ 'word'.capitalize() }}
{%- set ns = namespace(total=0) %}
{%- for n in [1, 2, 3, 4, 5, 6] %}{% if n is even %}{% continue %}{% endif %}{% if n > 4 %}{% break %}{% endif %}{% set ns.total = ns.total + n %}{% endfor %}
 total={{ ns.total }} {{ info | tojson }}
"#;

/// A fixed instant (2025-03-14 15:09:26 UTC) for `strftime_now`.
const NOW: i64 = 1_741_964_966;

fn tools() -> Value {
    json!([{
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city — in °C",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]}
        }
    }])
}

struct Case {
    name: &'static str,
    template: &'static str,
    messages: Value,
    add_generation_prompt: bool,
    tools: Option<Value>,
    extra: Value,
}

fn cases() -> Vec<Case> {
    let chat = json!([
        {"role": "system", "content": "  You are terse.  "},
        {"role": "user", "content": "What  is the weather in Paris?"},
    ]);
    let with_tools = json!([
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": {"temp": 21, "sky": "clear ☀"}},
    ]);
    let thinking = json!([
        {"role": "system", "content": "think first"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
        {"role": "user", "content": "<tool_response>ok</tool_response>"},
        {"role": "assistant", "content": "<think>\nfinal check\n</think>\n\nstill 4"},
    ]);
    let alternating = json!([
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
    ]);
    let not_alternating = json!([
        {"role": "user", "content": "hi"},
        {"role": "user", "content": "again"},
    ]);
    let info = json!({"info": {"z_last": [1, "two", null, true], "a_first": "é\"q", "n": 7, "flag": false}});
    vec![
        Case {
            name: "llama31 plain",
            template: LLAMA31_LIKE,
            messages: chat.clone(),
            add_generation_prompt: true,
            tools: None,
            extra: json!({}),
        },
        Case {
            name: "llama31 tools",
            template: LLAMA31_LIKE,
            messages: with_tools,
            add_generation_prompt: true,
            tools: Some(tools()),
            extra: json!({}),
        },
        Case {
            name: "llama31 date_string",
            template: LLAMA31_LIKE,
            messages: chat.clone(),
            add_generation_prompt: false,
            tools: None,
            extra: json!({"date_string": "01 Jan 2030"}),
        },
        Case {
            name: "qwen3 thinking",
            template: QWEN3_LIKE,
            messages: thinking.clone(),
            add_generation_prompt: true,
            tools: None,
            extra: json!({}),
        },
        Case {
            name: "qwen3 no thinking",
            template: QWEN3_LIKE,
            messages: thinking,
            add_generation_prompt: true,
            tools: None,
            extra: json!({"enable_thinking": false}),
        },
        Case {
            name: "qwen3 chat",
            template: QWEN3_LIKE,
            messages: chat.clone(),
            add_generation_prompt: false,
            tools: None,
            extra: json!({"enable_thinking": true}),
        },
        Case {
            name: "mistral alternating",
            template: MISTRAL_LIKE,
            messages: alternating,
            add_generation_prompt: true,
            tools: None,
            extra: json!({}),
        },
        Case {
            name: "mistral raises",
            template: MISTRAL_LIKE,
            messages: not_alternating,
            add_generation_prompt: true,
            tools: None,
            extra: json!({}),
        },
        Case {
            name: "grab bag",
            template: GRAB_BAG,
            messages: chat,
            add_generation_prompt: false,
            tools: None,
            extra: info,
        },
    ]
}

#[test]
fn templates_render_like_python_jinja2() {
    if !engine::testing::python_has("jinja2", "jinja2") {
        return;
    }
    let (bos, eos) = ("<s>", "</s>");
    let cases = cases();
    let dir = std::env::temp_dir().join(format!("chat-oracle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let input: Vec<Value> = cases
        .iter()
        .map(|c| {
            json!({"template": c.template, "messages": c.messages,
                   "add_generation_prompt": c.add_generation_prompt, "tools": c.tools,
                   "extra": c.extra, "bos_token": bos, "eos_token": eos, "now": NOW})
        })
        .collect();
    let (cases_path, out_path) = (dir.join("cases.json"), dir.join("out.json"));
    std::fs::write(&cases_path, serde_json::to_vec(&input).expect("json")).expect("write");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/chat_oracle.py");
    let run = std::process::Command::new("python3")
        .args([
            script.as_ref(),
            cases_path.as_os_str(),
            out_path.as_os_str(),
        ])
        .output()
        .expect("run python3");
    assert!(
        run.status.success(),
        "chat_oracle.py failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let expected: Vec<Value> =
        serde_json::from_slice(&std::fs::read(&out_path).expect("out.json")).expect("json");
    assert_eq!(expected.len(), cases.len());
    for (case, expected) in cases.iter().zip(&expected) {
        let template = ChatTemplate::new(case.template, bos, eos)
            .unwrap_or_else(|e| panic!("{}: {e}", case.name))
            .with_fixed_time(NOW);
        let options = RenderOptions {
            tools: case.tools.clone(),
            extra: case.extra.as_object().cloned().unwrap_or_default(),
        };
        let ours = template.render_with(&case.messages, case.add_generation_prompt, &options);
        match (expected.get("text").and_then(Value::as_str), ours) {
            (Some(text), Ok(ours)) => assert_eq!(ours, text, "{}", case.name),
            (None, Err(e)) => {
                let message = expected["error"].as_str().expect("error");
                assert!(
                    e.to_string().contains(message),
                    "{}: {e} vs {message}",
                    case.name
                );
            }
            (Some(text), Err(e)) => panic!("{}: we fail ({e}), jinja2 renders {text:?}", case.name),
            (None, Ok(ours)) => panic!(
                "{}: jinja2 raises {}, we render {ours:?}",
                case.name, expected["error"]
            ),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
