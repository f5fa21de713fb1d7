//! A model's chat template (Jinja, as Hugging Face `transformers` renders
//! it) turned into a prompt string with minijinja.
//!
//! Invariants:
//! * The template is compiled once, in the constructor; a template that does
//!   not compile is a constructor error, never a render-time surprise.
//! * The environment matches `transformers`' `apply_chat_template`:
//!   `trim_blocks` and `lstrip_blocks` on, no auto-escaping, loop controls
//!   (`{% break %}`, `{% continue %}`), `namespace()`, and the globals and
//!   filters chat templates rely on: `raise_exception(msg)` (a render error
//!   carrying `msg`), `strftime_now(format)` (UTC), `tojson` (Python
//!   `json.dumps` separators), and the Python string and dict methods
//!   templates call (`.strip()`, `.startswith()`, `.items()` …, see
//!   [`jinja::python_method`]). Checked against Python's `jinja2` with
//!   `transformers`' definitions (`tests/chat_it.rs`).
//! * The render context is `messages`, `add_generation_prompt`, `bos_token`
//!   and `eos_token`, the names `transformers` uses, plus what the caller
//!   adds ([`RenderOptions`]: `tools`, `enable_thinking`, any other
//!   template variable).
//! * Rendering never panics; a template that raises or misuses a value is an
//!   [`EngineError::Template`] carrying minijinja's message and line.

use std::path::Path;

use candle_core::quantized::gguf_file;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use minijinja::value::{Value, ValueKind};
use minijinja::{AutoEscape, Environment};
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};
use crate::gguf_meta::GgufMeta;

mod jinja;
#[cfg(test)]
use jinja::python_whitespace_split;
use jinja::{python_method, strftime_at, tojson};

/// What a render may add to the context beyond the conversation.
#[derive(Debug, Clone, Default)]
pub struct RenderOptions {
    /// `tools`: the tool definitions (OpenAI `tools`), or `None` (the
    /// variable is then `none`, as `transformers` passes it).
    pub tools: Option<serde_json::Value>,
    /// Further template variables (`enable_thinking`, `date_string`, …).
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// The template variables [`ChatTemplate::render_with`] sets itself; an
/// extra variable of one of these names would be overridden, so callers
/// refuse it.
pub const SERVER_VARIABLES: [&str; 5] = [
    "messages",
    "add_generation_prompt",
    "bos_token",
    "eos_token",
    "tools",
];

/// "Use the system clock" for [`ChatTemplate::with_fixed_time`].
const SYSTEM_CLOCK: i64 = i64::MIN;

/// One turn of a conversation, as the template sees it
/// (`message['role']`, `message['content']`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template plus the bos/eos token texts it may print.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// The name the template is registered under; minijinja puts it in error
    /// messages, so it names where the template came from.
    name: String,
    bos_token: String,
    eos_token: String,
    /// The time `strftime_now` formats: Unix seconds, or [`SYSTEM_CLOCK`].
    fixed_time: Arc<AtomicI64>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("name", &self.name)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `template`; `bos` and `eos` are the texts of the bos and eos
    /// tokens (`bos_token`, `eos_token` in the template).
    pub fn new(template: &str, bos: &str, eos: &str) -> Result<ChatTemplate> {
        Self::named("chat_template", template, bos, eos)
    }

    fn named(name: &str, template: &str, bos: &str, eos: &str) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // minijinja would pick escaping from the name's extension (".json"
        // means JSON-escape); a prompt must come out verbatim.
        env.set_auto_escape_callback(|_| AutoEscape::None);
        // Python prints True, False and None; minijinja would print true,
        // false and none.
        env.set_formatter(|out, state, value| match value.kind() {
            ValueKind::Bool if value.is_true() => out.write_str("True").map_err(Into::into),
            ValueKind::Bool => out.write_str("False").map_err(Into::into),
            ValueKind::None => out.write_str("None").map_err(Into::into),
            _ => minijinja::escape_formatter(out, state, value),
        });
        env.add_function("raise_exception", jinja::raise_exception);
        let fixed_time = Arc::new(AtomicI64::new(SYSTEM_CLOCK));
        let clock = Arc::clone(&fixed_time);
        env.add_function("strftime_now", move |format: &str| {
            let at = match clock.load(Ordering::Relaxed) {
                SYSTEM_CLOCK => std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
                fixed => fixed,
            };
            strftime_at(at, format)
        });
        env.add_filter("tojson", tojson);
        env.set_unknown_method_callback(python_method);
        env.add_template_owned(name.to_string(), template.to_string())
            .map_err(|e| EngineError::Template(format!("cannot compile: {e}")))?;
        Ok(ChatTemplate {
            env,
            name: name.to_string(),
            bos_token: bos.to_string(),
            eos_token: eos.to_string(),
            fixed_time,
        })
    }

    /// Makes `strftime_now` format `unix_seconds` instead of the clock's
    /// time, so a render is reproducible.
    pub fn with_fixed_time(self, unix_seconds: i64) -> Self {
        self.fixed_time.store(unix_seconds, Ordering::Relaxed);
        self
    }

    /// The template in GGUF metadata (`tokenizer.chat_template`), with the
    /// bos/eos texts looked up from `tokenizer.ggml.{bos,eos}_token_id`
    /// (empty when the ids are absent).
    /// `None` when the file has no `tokenizer.chat_template` (a base model:
    /// it serves text completions only).
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Option<ChatTemplate>> {
        let meta = GgufMeta::new(&content.metadata);
        let meta_err = |e: crate::gguf_meta::MetadataError| EngineError::Template(e.to_string());
        let Some(template) = meta.opt_str("tokenizer.chat_template").map_err(meta_err)? else {
            return Ok(None);
        };
        let tokens = meta.str_array("tokenizer.ggml.tokens").map_err(meta_err)?;
        let token_text = |key: &str| -> Result<&str> {
            match meta.opt_u32(key).map_err(meta_err)? {
                None => Ok(""),
                Some(id) => tokens.get(id as usize).copied().ok_or_else(|| {
                    EngineError::Template(format!(
                        "gguf metadata key {key}: id {id} is outside the vocabulary of {} tokens",
                        tokens.len()
                    ))
                }),
            }
        };
        let bos = token_text("tokenizer.ggml.bos_token_id")?;
        let eos = token_text("tokenizer.ggml.eos_token_id")?;
        Self::named("tokenizer.chat_template", template, bos, eos).map(Some)
    }

    /// The template of a Hugging Face `tokenizer_config.json`. When the file
    /// has no `chat_template`, a `chat_template.jinja` next to it is used
    /// (newer `transformers` save the template there). `None` when there is
    /// neither (a base model: it serves text completions only).
    pub fn from_tokenizer_config(path: impl AsRef<Path>) -> Result<Option<ChatTemplate>> {
        let path = path.as_ref();
        let json = std::fs::read_to_string(path)
            .map_err(|e| EngineError::Template(format!("{}: cannot read: {e}", path.display())))?;
        let config = parse_config(&json, &path.display().to_string())?;
        let name = path.display().to_string();
        match config.chat_template {
            Some(template) => {
                let template = pick_template(template, &name)?;
                Self::named(&name, &template, &config.bos_token, &config.eos_token).map(Some)
            }
            None => {
                let jinja_path = path.with_file_name("chat_template.jinja");
                let template = match std::fs::read_to_string(&jinja_path) {
                    Ok(t) => t,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => {
                        return Err(EngineError::Template(format!(
                            "{name}: no chat_template, and {} cannot be read: {e}",
                            jinja_path.display()
                        )))
                    }
                };
                Self::named(
                    &jinja_path.display().to_string(),
                    &template,
                    &config.bos_token,
                    &config.eos_token,
                )
                .map(Some)
            }
        }
    }

    /// [`ChatTemplate::from_tokenizer_config`] on the file's text, without
    /// the `chat_template.jinja` fallback.
    pub fn from_tokenizer_config_json(json: &str) -> Result<ChatTemplate> {
        let name = "tokenizer_config.json";
        let config = parse_config(json, name)?;
        let template = config
            .chat_template
            .ok_or_else(|| EngineError::Template(format!("{name}: no chat_template")))?;
        let template = pick_template(template, name)?;
        Self::named(name, &template, &config.bos_token, &config.eos_token)
    }

    /// Renders the conversation. With `add_generation_prompt` the template
    /// appends the header of the assistant's reply (e.g.
    /// `<|im_start|>assistant\n`), so the model continues as the assistant.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let messages = serde_json::to_value(messages)
            .map_err(|e| EngineError::Template(format!("cannot pass the messages: {e}")))?;
        self.render_with(&messages, add_generation_prompt, &RenderOptions::default())
    }

    /// Renders `messages` as they are (a JSON array of message objects:
    /// `content` may be a list of parts, an assistant turn may carry
    /// `tool_calls`, a `tool` turn its `tool_call_id` …) with the options'
    /// variables added.
    pub fn render_with(
        &self,
        messages: &serde_json::Value,
        add_generation_prompt: bool,
        options: &RenderOptions,
    ) -> Result<String> {
        let template = self
            .env
            .get_template(&self.name)
            .map_err(|e| EngineError::Template(format!("cannot load compiled template: {e}")))?;
        let mut context: std::collections::BTreeMap<String, Value> = options
            .extra
            .iter()
            .map(|(name, value)| (name.clone(), Value::from_serialize(value)))
            .collect();
        context.insert("messages".into(), Value::from_serialize(messages));
        context.insert(
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        );
        context.insert("bos_token".into(), Value::from(self.bos_token.as_str()));
        context.insert("eos_token".into(), Value::from(self.eos_token.as_str()));
        context.insert(
            "tools".into(),
            options
                .tools
                .as_ref()
                .map_or(Value::from(()), Value::from_serialize),
        );
        template
            .render(Value::from(context))
            .map_err(|e| EngineError::Template(format!("cannot render: {e}")))
    }

    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }
}

/// The parts of `tokenizer_config.json` a chat template needs.
struct ConfigParts {
    chat_template: Option<TemplateJson>,
    bos_token: String,
    eos_token: String,
}

#[derive(Deserialize)]
struct ConfigJson {
    #[serde(default)]
    chat_template: Option<TemplateJson>,
    #[serde(default)]
    bos_token: Option<TokenJson>,
    #[serde(default)]
    eos_token: Option<TokenJson>,
}

/// `chat_template` is a string, or a list of `{"name", "template"}` (models
/// with separate templates for tool use, RAG …).
#[derive(Deserialize)]
#[serde(untagged)]
enum TemplateJson {
    Single(String),
    Named(Vec<NamedTemplateJson>),
}

#[derive(Deserialize)]
struct NamedTemplateJson {
    name: String,
    template: String,
}

/// A special token: a string, an `AddedToken` object with `content`, or null.
#[derive(Deserialize)]
#[serde(untagged)]
enum TokenJson {
    Name(String),
    Object { content: String },
    Other(serde::de::IgnoredAny),
}

impl TokenJson {
    fn into_text(self) -> String {
        match self {
            TokenJson::Name(name) => name,
            TokenJson::Object { content } => content,
            TokenJson::Other(_) => String::new(),
        }
    }
}

fn parse_config(json: &str, name: &str) -> Result<ConfigParts> {
    let config: ConfigJson = serde_json::from_str(json)
        .map_err(|e| EngineError::Template(format!("{name}: invalid: {e}")))?;
    Ok(ConfigParts {
        chat_template: config.chat_template,
        bos_token: config
            .bos_token
            .map(TokenJson::into_text)
            .unwrap_or_default(),
        eos_token: config
            .eos_token
            .map(TokenJson::into_text)
            .unwrap_or_default(),
    })
}

/// The list form is resolved as `transformers` does without an explicit
/// choice: the template named "default".
fn pick_template(template: TemplateJson, name: &str) -> Result<String> {
    match template {
        TemplateJson::Single(text) => Ok(text),
        TemplateJson::Named(list) => {
            let names: Vec<String> = list.iter().map(|t| format!("{:?}", t.name)).collect();
            list.into_iter()
                .find(|t| t.name == "default")
                .map(|t| t.template)
                .ok_or_else(|| {
                    EngineError::Template(format!(
                        "{name}: chat_template list has no template named \"default\" (has {})",
                        names.join(", ")
                    ))
                })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-135M-Instruct's template, verbatim from its GGUF.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn smollm2() -> ChatTemplate {
        ChatTemplate::new(SMOLLM2, "<|im_start|>", "<|im_end|>").unwrap()
    }

    #[test]
    fn default_system_block_is_inserted_without_a_system_message() {
        let out = smollm2()
            .render(&[ChatMessage::new("user", "Hi")], true)
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn explicit_system_message_replaces_the_default() {
        let messages = [
            ChatMessage::new("system", "Be terse."),
            ChatMessage::new("user", "Hi"),
        ];
        let out = smollm2().render(&messages, true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn multiple_turns_render_in_order() {
        let messages = [
            ChatMessage::new("user", "2+2?"),
            ChatMessage::new("assistant", "4"),
            ChatMessage::new("user", "and 3+3?"),
        ];
        let out = smollm2().render(&messages, false).unwrap();
        let turns: Vec<&str> = out.split("<|im_start|>").skip(1).collect();
        assert_eq!(turns.len(), 4, "{out}");
        assert!(turns[0].starts_with("system\n"));
        assert_eq!(turns[1], "user\n2+2?<|im_end|>\n");
        assert_eq!(turns[2], "assistant\n4<|im_end|>\n");
        assert_eq!(turns[3], "user\nand 3+3?<|im_end|>\n");
    }

    #[test]
    fn generation_prompt_is_added_only_when_asked() {
        let messages = [ChatMessage::new("user", "Hi")];
        let with = smollm2().render(&messages, true).unwrap();
        let without = smollm2().render(&messages, false).unwrap();
        assert_eq!(with, format!("{without}<|im_start|>assistant\n"));
        assert!(without.ends_with("Hi<|im_end|>\n"));
    }

    #[test]
    fn broken_template_is_a_compile_error_naming_the_problem() {
        let err = ChatTemplate::new("{% for m in messages %}{{ m.content }}", "", "").unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("chat template: cannot compile: syntax error"),
            "{text}"
        );
        assert!(text.contains("unexpected end of input"), "{text}");
        assert!(text.contains("chat_template:1"), "{text}");
    }

    #[test]
    fn raise_exception_is_a_render_error_carrying_its_message() {
        let template = "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('Conversation must start with user') }}{% endif %}ok";
        let chat = ChatTemplate::new(template, "", "").unwrap();
        assert_eq!(
            chat.render(&[ChatMessage::new("user", "x")], false)
                .unwrap(),
            "ok"
        );
        let err = chat
            .render(&[ChatMessage::new("assistant", "x")], false)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("Conversation must start with user"),
            "{err}"
        );
        assert!(
            err.to_string().starts_with("chat template: cannot render:"),
            "{err}"
        );
    }

    #[test]
    fn trim_and_lstrip_blocks_match_transformers() {
        // Jinja2 with trim_blocks and lstrip_blocks renders this as "a\nb\n"
        // (checked with jinja2 3.1): block tags leave no indentation and
        // swallow their newline.
        let template = "{% for m in messages %}\n    {% if true %}\n{{ m.content }}\n    {% endif %}\n{% endfor %}";
        let chat = ChatTemplate::new(template, "", "").unwrap();
        let out = chat
            .render(
                &[ChatMessage::new("user", "a"), ChatMessage::new("user", "b")],
                false,
            )
            .unwrap();
        assert_eq!(out, "a\nb\n");
    }

    #[test]
    fn bos_eos_and_python_methods_are_available() {
        let template = "{{ bos_token }}{% for m in messages %}{{ m['content'].strip() | upper }}|{{ m.content.startswith(' x') }}|{{ m.content.split() | join(',') }}{% endfor %}{{ {'a': [1, 'b']} | tojson }}{{ eos_token }}";
        let chat = ChatTemplate::new(template, "<s>", "</s>").unwrap();
        let out = chat
            .render(&[ChatMessage::new("user", " x y ")], false)
            .unwrap();
        assert_eq!(out, "<s>X Y|True|x,y{\"a\": [1, \"b\"]}</s>");
    }

    #[test]
    fn tokenizer_config_string_and_list_forms() {
        let single = r#"{"chat_template": "{{ bos_token }}{{ messages[0].content }}", "bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "</s>"}"#;
        let chat = ChatTemplate::from_tokenizer_config_json(single).unwrap();
        assert_eq!(
            chat.render(&[ChatMessage::new("user", "hi")], false)
                .unwrap(),
            "<s>hi"
        );
        assert_eq!(chat.eos_token(), "</s>");

        let list = r#"{"chat_template": [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "default {{ messages | length }}"}]}"#;
        let chat = ChatTemplate::from_tokenizer_config_json(list).unwrap();
        assert_eq!(
            chat.render(&[ChatMessage::new("user", "hi")], true)
                .unwrap(),
            "default 1"
        );

        let no_default = r#"{"chat_template": [{"name": "tool_use", "template": "tools"}]}"#;
        let err = ChatTemplate::from_tokenizer_config_json(no_default).unwrap_err();
        assert_eq!(
            err.to_string(),
            "chat template: tokenizer_config.json: chat_template list has no template named \"default\" (has \"tool_use\")"
        );

        let err = ChatTemplate::from_tokenizer_config_json(r#"{"bos_token": "<s>"}"#).unwrap_err();
        assert_eq!(
            err.to_string(),
            "chat template: tokenizer_config.json: no chat_template"
        );
    }

    #[test]
    fn python_split_without_separator_drops_empty_parts() {
        assert_eq!(python_whitespace_split("  a  b c ", None), ["a", "b", "c"]);
        assert_eq!(python_whitespace_split("  a  b c ", Some(2)), ["a", "b c "]);
        assert_eq!(python_whitespace_split("   ", None), Vec::<&str>::new());
    }
}
