//! OpenAI's API shapes: the chat and text completion requests as clients
//! send them, checked and turned into what an instance runs ([`Plan`]), the
//! response and chunk bodies, and the error shape every API error uses.
//!
//! Invariants:
//! * A request is accepted whole or refused with a [`ApiFailure`] naming the
//!   parameter (`param`) and OpenAI's code: fields this server does not
//!   know are ignored (clients send fields of newer API versions), fields it
//!   knows but cannot honour (`tools`, a JSON `response_format`, non-text
//!   content) are refused, never silently dropped.
//! * Every check here is pure: no instance, no I/O; the API layer only
//!   forwards a [`Plan`].

use std::collections::BTreeMap;

use ipc::proto::{ChatTurn, PromptReport, Sampling, TaskInput, TokenLogprob};
use ipc::Blob;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Completion length for a text completion that names none (OpenAI's
/// default for `/v1/completions`). A chat without one runs to the end of its
/// turn, bounded by the model's context.
pub const DEFAULT_COMPLETION_MAX_TOKENS: u32 = 16;
/// Largest completion a request may ask for.
pub const MAX_TOKENS_LIMIT: u32 = 1 << 20;
/// Most choices one request may ask for (`n`).
pub const MAX_N: u32 = 16;
/// Most alternatives per token (`top_logprobs`; OpenAI's limit).
pub const MAX_TOP_LOGPROBS: u32 = 20;
/// Most alternatives per token of a text completion (`logprobs`; OpenAI's
/// limit).
pub const MAX_COMPLETION_LOGPROBS: u32 = 5;
/// Most prompts in one text completion request.
pub const MAX_PROMPTS: usize = 64;
/// Most tasks one request may start (prompts × `n`): each holds a KV cache.
pub const MAX_CHOICES: usize = 64;

/// An error as the API answers it: status, OpenAI's type, code and param.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiFailure {
    pub status: u16,
    pub body: ErrorBody,
}

impl ApiFailure {
    pub fn new(
        status: u16,
        kind: &str,
        code: Option<&str>,
        param: Option<&str>,
        message: impl Into<String>,
    ) -> Self {
        ApiFailure {
            status,
            body: ErrorBody {
                error: ErrorDetail {
                    message: message.into(),
                    kind: kind.into(),
                    param: param.map(String::from),
                    code: code.map(String::from),
                },
            },
        }
    }

    /// A 400 about one parameter.
    pub fn invalid(param: &str, code: &str, message: impl Into<String>) -> Self {
        Self::new(
            400,
            "invalid_request_error",
            Some(code),
            Some(param),
            message,
        )
    }

    /// A 400 for a parameter this server knows but does not implement.
    pub fn unsupported(param: &str, message: impl Into<String>) -> Self {
        Self::new(
            400,
            "invalid_request_error",
            Some("unsupported_parameter"),
            Some(param),
            message,
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

impl ErrorBody {
    pub fn new(kind: &str, message: impl Into<String>) -> Self {
        ErrorBody {
            error: ErrorDetail {
                message: message.into(),
                kind: kind.into(),
                param: None,
                code: None,
            },
        }
    }

    pub fn with_code(mut self, code: &str) -> Self {
        self.error.code = Some(code.into());
        self
    }
}

/// `POST /v1/chat/completions`, the fields this server reads. Every other
/// field is ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    /// An instance id, or the name of a model a ready instance serves.
    pub model: String,
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    #[serde(flatten)]
    pub common: Common,
    #[serde(default)]
    pub logprobs: Option<bool>,
    #[serde(default)]
    pub top_logprobs: Option<u32>,
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub functions: Option<Vec<Value>>,
    #[serde(default)]
    pub response_format: Option<Value>,
    #[serde(default)]
    pub modalities: Option<Vec<String>>,
    /// Not in OpenAI's API; vLLM's and SGLang's extension (the SDK sends it
    /// in `extra_body`): further chat-template variables, e.g.
    /// `{"enable_thinking": false}` for Qwen3.
    #[serde(default)]
    pub chat_template_kwargs: Option<Value>,
}

/// Fields chat and text completions share.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Common {
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Not in OpenAI's API; accepted as an extension (0 = off).
    #[serde(default)]
    pub top_k: Option<u32>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub stop: Option<Value>,
    #[serde(default)]
    pub n: Option<u32>,
    #[serde(default)]
    pub frequency_penalty: Option<f64>,
    #[serde(default)]
    pub presence_penalty: Option<f64>,
    #[serde(default)]
    pub logit_bias: Option<BTreeMap<String, f64>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// One message. `content` is checked by hand: a string, a list of parts,
/// or null (an assistant turn), each with its own error.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Value,
    #[serde(default)]
    pub tool_calls: Option<Vec<Value>>,
    #[serde(default)]
    pub function_call: Option<Value>,
}

/// `POST /v1/completions`, the fields this server reads.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Value,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(flatten)]
    pub common: Common,
    #[serde(default)]
    pub echo: Option<bool>,
    /// 0–5 alternatives per token (OpenAI's legacy shape).
    #[serde(default)]
    pub logprobs: Option<u32>,
    #[serde(default)]
    pub best_of: Option<u32>,
    #[serde(default)]
    pub suffix: Option<String>,
}

/// How many token log-probabilities a request wants, and in which shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogprobsShape {
    /// Chat: `choices[].logprobs.content[]`.
    Chat { top: u8 },
    /// Text completion: `choices[].logprobs.{tokens, token_logprobs, …}`.
    Completion { top: u8 },
}

/// What one request runs: `n` tasks per prompt, all with the same
/// parameters (choice `i` of a prompt gets `seed + i`, so choices differ
/// when sampling and are reproducible).
#[derive(Debug, Clone)]
pub struct Plan {
    pub model: String,
    pub prompts: Vec<TaskInput>,
    /// For `echo`, each prompt's text; `None` for a prompt of token ids,
    /// whose text comes from the runner's report of its tokens.
    pub echo: Option<Vec<Option<String>>>,
    /// What each task's runner reports of its prompt: its tokens for the
    /// echo of token ids, and their log-probabilities for `echo` with
    /// `logprobs`.
    pub report_prompt: Option<PromptReport>,
    pub n: u32,
    /// `None`: to the end of the turn, bounded by the context.
    pub max_tokens: Option<u32>,
    pub sampling: Sampling,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub logprobs: Option<LogprobsShape>,
}

impl Plan {
    /// The tasks to submit: `(choice index, input, sampling)`.
    pub fn tasks(&self) -> Vec<(u32, TaskInput, Sampling)> {
        let mut tasks = Vec::new();
        for (p, input) in self.prompts.iter().enumerate() {
            for i in 0..self.n {
                let index = p as u32 * self.n + i;
                let mut sampling = self.sampling.clone();
                sampling.seed = sampling.seed.wrapping_add(u64::from(i));
                tasks.push((index, input.clone(), sampling));
            }
        }
        tasks
    }
}

/// A request one of the OpenAI endpoints takes.
pub trait OpenAiRequest: serde::de::DeserializeOwned {
    /// What the request is, for parse errors (`invalid … body`).
    const WHAT: &'static str;
    /// The `model` it names.
    fn model(&self) -> &str;
    /// The checked request, or why it is refused.
    fn plan(&self) -> Result<Plan, ApiFailure>;
}

impl OpenAiRequest for ChatRequest {
    const WHAT: &'static str = "chat completion";

    fn model(&self) -> &str {
        &self.model
    }

    fn plan(&self) -> Result<Plan, ApiFailure> {
        if self.messages.is_empty() {
            return Err(ApiFailure::invalid(
                "messages",
                "invalid_value",
                "messages must hold at least one message",
            ));
        }
        let turns = self
            .messages
            .iter()
            .enumerate()
            .map(|(i, m)| m.turn(i))
            .collect::<Result<Vec<_>, _>>()?;
        let tools_requested = self.tools.as_ref().is_some_and(|t| !t.is_empty())
            && !matches!(&self.tool_choice, Some(Value::String(s)) if s == "none");
        if tools_requested {
            return Err(ApiFailure::unsupported(
                "tools",
                "tools (function calling) are not supported by this server; send the request without tools, or with tool_choice \"none\"",
            ));
        }
        if self.functions.as_ref().is_some_and(|f| !f.is_empty()) {
            return Err(ApiFailure::unsupported(
                "functions",
                "functions (function calling) are not supported by this server",
            ));
        }
        if let Some(format) = &self.response_format {
            match format.get("type").and_then(Value::as_str) {
                Some("text") => {}
                Some(other @ ("json_object" | "json_schema")) => {
                    return Err(ApiFailure::invalid(
                        "response_format",
                        "unsupported_value",
                        format!("response_format {other:?} is not supported by this server: only \"text\""),
                    ))
                }
                _ => {
                    return Err(ApiFailure::invalid(
                        "response_format",
                        "invalid_value",
                        "response_format must be an object with type \"text\", \"json_object\" or \"json_schema\"",
                    ))
                }
            }
        }
        if let Some(modalities) = &self.modalities {
            if let Some(other) = modalities.iter().find(|m| *m != "text") {
                return Err(ApiFailure::invalid(
                    "modalities",
                    "unsupported_value",
                    format!("modality {other:?} is not supported: this server generates text only"),
                ));
            }
        }
        let (param, max_tokens) = match (self.max_completion_tokens, self.max_tokens) {
            (Some(m), _) => ("max_completion_tokens", Some(m)),
            (None, m) => ("max_tokens", m),
        };
        if let Some(m) = max_tokens {
            check_range(param, f64::from(m), 1.0, f64::from(MAX_TOKENS_LIMIT))?;
        }
        let top = match (self.logprobs, self.top_logprobs) {
            (Some(true), top) => {
                let top = top.unwrap_or(0);
                check_range(
                    "top_logprobs",
                    f64::from(top),
                    0.0,
                    f64::from(MAX_TOP_LOGPROBS),
                )?;
                Some(top as u8)
            }
            (_, Some(t)) if t > 0 => {
                return Err(ApiFailure::invalid(
                    "top_logprobs",
                    "invalid_value",
                    "top_logprobs needs logprobs set to true",
                ))
            }
            _ => None,
        };
        let template_vars = match &self.chat_template_kwargs {
            None | Some(Value::Null) => String::new(),
            Some(Value::Object(vars)) => {
                if let Some(key) = vars
                    .keys()
                    .find(|k| engine::chat::SERVER_VARIABLES.contains(&k.as_str()))
                {
                    return Err(ApiFailure::invalid(
                        "chat_template_kwargs",
                        "invalid_value",
                        format!(
                            "chat_template_kwargs.{key} is set by the server from the request; \
                             pass it as its own field, or leave it out (reserved: {})",
                            engine::chat::SERVER_VARIABLES.join(", ")
                        ),
                    ));
                }
                if vars.is_empty() {
                    String::new()
                } else {
                    Value::Object(vars.clone()).to_string()
                }
            }
            Some(_) => {
                return Err(ApiFailure::invalid(
                    "chat_template_kwargs",
                    "invalid_type",
                    "chat_template_kwargs must be a JSON object of chat-template variables, \
                     e.g. {\"enable_thinking\": false}",
                ))
            }
        };
        self.common.plan(
            self.model.clone(),
            vec![TaskInput::Chat {
                turns,
                template_vars,
            }],
            max_tokens,
            top.map(|top| LogprobsShape::Chat { top }),
        )
    }
}

const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

impl ChatMessage {
    fn turn(&self, i: usize) -> Result<ChatTurn, ApiFailure> {
        let param = |field: &str| format!("messages[{i}].{field}");
        let role = match self.role.as_str() {
            // OpenAI's newer name for system instructions; chat templates
            // know `system`.
            "developer" => "system",
            r if ROLES.contains(&r) => r,
            other => {
                return Err(ApiFailure::invalid(
                    &param("role"),
                    "invalid_value",
                    format!(
                        "invalid role {other:?}: supported roles are 'system', 'developer', 'user', 'assistant' and 'tool'"
                    ),
                ))
            }
        };
        if self.tool_calls.as_ref().is_some_and(|c| !c.is_empty()) || self.function_call.is_some() {
            return Err(ApiFailure::unsupported(
                &param("tool_calls"),
                "tool calls in a conversation are not supported by this server",
            ));
        }
        let content = match &self.content {
            Value::String(s) => s.clone(),
            Value::Null if role == "assistant" => String::new(),
            Value::Array(parts) => {
                let mut texts = Vec::with_capacity(parts.len());
                for (j, part) in parts.iter().enumerate() {
                    let at = param(&format!("content[{j}]"));
                    let kind = part.get("type").and_then(Value::as_str);
                    let text = match kind {
                        Some("text") => part.get("text").and_then(Value::as_str),
                        Some("refusal") => part.get("refusal").and_then(Value::as_str),
                        Some(other) => {
                            return Err(ApiFailure::invalid(
                                &at,
                                "unsupported_value",
                                format!("content part type {other:?} is not supported: this model takes text only"),
                            ))
                        }
                        None => None,
                    };
                    match text {
                        Some(t) => texts.push(t),
                        None => {
                            return Err(ApiFailure::invalid(
                                &at,
                                "invalid_value",
                                "a content part must be an object {\"type\": \"text\", \"text\": \"...\"}",
                            ))
                        }
                    }
                }
                // Text parts are joined with newlines, as vLLM does.
                texts.join("\n")
            }
            _ => {
                return Err(ApiFailure::invalid(
                    &param("content"),
                    "invalid_type",
                    "content must be a string or a list of text parts",
                ))
            }
        };
        Ok(ChatTurn {
            role: role.into(),
            content,
        })
    }
}

impl OpenAiRequest for CompletionRequest {
    const WHAT: &'static str = "text completion";

    fn model(&self) -> &str {
        &self.model
    }

    fn plan(&self) -> Result<Plan, ApiFailure> {
        let bad_prompt = || {
            ApiFailure::invalid(
                "prompt",
                "invalid_type",
                "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids",
            )
        };
        let ids = |v: &Value| -> Option<Vec<u32>> {
            v.as_array()?
                .iter()
                .map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()))
                .collect()
        };
        let prompts: Vec<TaskInput> = match &self.prompt {
            Value::String(s) => vec![TaskInput::Text(s.clone())],
            Value::Array(items) if items.is_empty() => return Err(bad_prompt()),
            Value::Array(items) if items.iter().all(Value::is_string) => items
                .iter()
                .filter_map(|s| s.as_str().map(|s| TaskInput::Text(s.into())))
                .collect(),
            Value::Array(items) if items.iter().all(Value::is_number) => {
                vec![TaskInput::Tokens(ids(&self.prompt).ok_or_else(bad_prompt)?)]
            }
            Value::Array(items) if items.iter().all(Value::is_array) => items
                .iter()
                .map(|v| ids(v).map(TaskInput::Tokens).ok_or_else(bad_prompt))
                .collect::<Result<_, _>>()?,
            _ => return Err(bad_prompt()),
        };
        if prompts.len() > MAX_PROMPTS {
            return Err(ApiFailure::invalid(
                "prompt",
                "invalid_value",
                format!(
                    "at most {MAX_PROMPTS} prompts per request, got {}",
                    prompts.len()
                ),
            ));
        }
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiFailure::unsupported(
                "suffix",
                "suffix (insertion) is not supported by this server",
            ));
        }
        let n = self.common.n.unwrap_or(1);
        if prompts.len() * n as usize > MAX_CHOICES {
            return Err(ApiFailure::invalid(
                "n",
                "invalid_value",
                format!(
                    "{} prompts × n {n} is {} choices; at most {MAX_CHOICES} per request",
                    prompts.len(),
                    prompts.len() * n as usize
                ),
            ));
        }
        if self.best_of.is_some_and(|b| b != n) {
            return Err(ApiFailure::unsupported(
                "best_of",
                "best_of other than n is not supported by this server",
            ));
        }
        let max_tokens = self.max_tokens.unwrap_or(DEFAULT_COMPLETION_MAX_TOKENS);
        let echo = self.echo.unwrap_or(false);
        // max_tokens 0 is valid with echo: the answer is the prompt alone.
        let min = if echo { 0.0 } else { 1.0 };
        check_range(
            "max_tokens",
            f64::from(max_tokens),
            min,
            f64::from(MAX_TOKENS_LIMIT),
        )?;
        let top = match self.logprobs {
            Some(k) => {
                check_range(
                    "logprobs",
                    f64::from(k),
                    0.0,
                    f64::from(MAX_COMPLETION_LOGPROBS),
                )?;
                Some(k as u8)
            }
            None => None,
        };
        let texts: Option<Vec<Option<String>>> = echo.then(|| {
            prompts
                .iter()
                .map(|p| match p {
                    TaskInput::Text(s) => Some(s.clone()),
                    _ => None,
                })
                .collect()
        });
        let report_prompt = match (&texts, top) {
            (None, _) => None,
            (Some(_), Some(top)) => Some(PromptReport::Logprobs(top)),
            (Some(texts), None) if texts.iter().any(Option::is_none) => Some(PromptReport::Tokens),
            (Some(_), None) => None,
        };
        let mut plan = self.common.plan(
            self.model.clone(),
            prompts,
            Some(max_tokens),
            top.map(|top| LogprobsShape::Completion { top }),
        )?;
        plan.echo = texts;
        plan.report_prompt = report_prompt;
        Ok(plan)
    }
}

impl Common {
    fn plan(
        &self,
        model: String,
        prompts: Vec<TaskInput>,
        max_tokens: Option<u32>,
        logprobs: Option<LogprobsShape>,
    ) -> Result<Plan, ApiFailure> {
        let temperature = self.temperature.unwrap_or(0.0);
        check_range("temperature", temperature, 0.0, 2.0)?;
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiFailure::invalid(
                "top_p",
                "invalid_value",
                format!("top_p must be in (0, 1], got {top_p}"),
            ));
        }
        let frequency_penalty = self.frequency_penalty.unwrap_or(0.0);
        check_range("frequency_penalty", frequency_penalty, -2.0, 2.0)?;
        let presence_penalty = self.presence_penalty.unwrap_or(0.0);
        check_range("presence_penalty", presence_penalty, -2.0, 2.0)?;
        let n = self.n.unwrap_or(1);
        check_range("n", f64::from(n), 1.0, f64::from(MAX_N))?;
        let mut logit_bias = Vec::new();
        for (key, &bias) in self.logit_bias.iter().flatten() {
            let id = key.parse::<u32>().map_err(|_| {
                ApiFailure::invalid(
                    "logit_bias",
                    "invalid_value",
                    format!("logit_bias keys must be token ids, got {key:?}"),
                )
            })?;
            check_range("logit_bias", bias, -100.0, 100.0)?;
            logit_bias.push((id, bias as f32));
        }
        let stop = stop_strings(self.stop.as_ref())?;
        let top = logprobs.map(|l| match l {
            LogprobsShape::Chat { top } | LogprobsShape::Completion { top } => top,
        });
        let stream = self.stream.unwrap_or(false);
        Ok(Plan {
            model,
            prompts,
            echo: None,
            report_prompt: None,
            n,
            max_tokens,
            sampling: Sampling {
                temperature: temperature as f32,
                top_p: top_p as f32,
                top_k: self.top_k.unwrap_or(0),
                // Negative seeds are valid in OpenAI's API; any i64 maps to
                // one u64.
                seed: self.seed.map_or_else(|| fastrand::u64(..), |s| s as u64),
                frequency_penalty: frequency_penalty as f32,
                presence_penalty: presence_penalty as f32,
                logit_bias,
                logprobs: top,
            },
            stop,
            stream,
            include_usage: stream
                && self
                    .stream_options
                    .as_ref()
                    .and_then(|o| o.include_usage)
                    .unwrap_or(false),
            logprobs,
        })
    }
}

/// A 400 naming `param` unless `min <= value <= max` (NaN is outside).
fn check_range(param: &str, value: f64, min: f64, max: f64) -> Result<(), ApiFailure> {
    if value >= min && value <= max {
        return Ok(());
    }
    Err(ApiFailure::invalid(
        param,
        "invalid_value",
        format!("{param} must be between {min} and {max}, got {value}"),
    ))
}

/// OpenAI's `stop`: a string or up to 4 strings.
fn stop_strings(stop: Option<&Value>) -> Result<Vec<String>, ApiFailure> {
    let bad = || {
        ApiFailure::invalid(
            "stop",
            "invalid_value",
            "stop must be a string or an array of at most 4 non-empty strings",
        )
    };
    let strings = match stop {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if items.len() <= 4 => items
            .iter()
            .map(|v| v.as_str().map(String::from).ok_or_else(bad))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad()),
    };
    if strings.iter().any(String::is_empty) {
        return Err(bad());
    }
    Ok(strings)
}

/// Token usage, as every completion reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    /// OpenAI's: of the prompt tokens, those taken from a kept prefix
    /// (absent when the engine keeps none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PromptTokensDetails {
    pub cached_tokens: u32,
}

impl Usage {
    pub fn new(prompt_tokens: u32, completion_tokens: u32) -> Self {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: None,
        }
    }
}

/// A token's text for a logprobs entry: its bytes as UTF-8 where they are,
/// with OpenAI's `bytes` array carrying the exact bytes either way.
fn token_text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Chat logprobs entries (`choices[].logprobs.content`).
pub fn chat_logprobs(entries: &[TokenLogprob]) -> Value {
    let content: Vec<Value> = entries
        .iter()
        .map(|e| {
            let top: Vec<Value> = e
                .top
                .iter()
                .map(|(b, lp)| json!({"token": token_text(&b.0), "logprob": lp, "bytes": b.0}))
                .collect();
            json!({
                "token": token_text(&e.bytes.0),
                "logprob": e.logprob,
                "bytes": e.bytes.0,
                "top_logprobs": top,
            })
        })
        .collect();
    json!({ "content": content })
}

/// A prompt as its runner reported it ([`PromptReport`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReportedPrompt {
    /// Every prompt token's bytes.
    pub tokens: Vec<Blob>,
    /// When scored: one per token after the first.
    pub logprobs: Vec<TokenLogprob>,
}

impl ReportedPrompt {
    /// The prompt's text: its tokens' bytes joined, as UTF-8 where they are.
    pub fn text(&self) -> String {
        let bytes: Vec<u8> = self
            .tokens
            .iter()
            .flat_map(|b| b.0.iter().copied())
            .collect();
        token_text(&bytes)
    }
}

/// Text completion logprobs (`choices[].logprobs`), legacy shape: the
/// echoed prompt's tokens first when given (the first with `null`
/// log-probabilities, as OpenAI answers: nothing precedes it), then
/// `entries`; `offset` is where the first entry's text starts in the
/// choice's text (after the echoed prompt).
pub fn completion_logprobs(
    prompt: Option<&ReportedPrompt>,
    entries: &[TokenLogprob],
    mut offset: usize,
) -> Value {
    let mut tokens = Vec::new();
    let mut token_logprobs = Vec::new();
    let mut top_logprobs = Vec::new();
    let mut text_offset = Vec::new();
    let top_map = |e: &TokenLogprob| -> Value {
        Value::Object(
            e.top
                .iter()
                .map(|(b, lp)| (token_text(&b.0), json!(lp)))
                .collect(),
        )
    };
    if let Some(prompt) = prompt {
        let mut at = 0;
        for (i, bytes) in prompt.tokens.iter().enumerate() {
            let text = token_text(&bytes.0);
            text_offset.push(at);
            at += text.len();
            tokens.push(text);
            match i.checked_sub(1).and_then(|j| prompt.logprobs.get(j)) {
                Some(e) => {
                    token_logprobs.push(json!(e.logprob));
                    top_logprobs.push(top_map(e));
                }
                None => {
                    token_logprobs.push(Value::Null);
                    top_logprobs.push(Value::Null);
                }
            }
        }
    }
    for e in entries {
        let text = token_text(&e.bytes.0);
        text_offset.push(offset);
        offset += text.len();
        tokens.push(text);
        token_logprobs.push(json!(e.logprob));
        top_logprobs.push(top_map(e));
    }
    json!({
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    })
}

#[cfg(test)]
mod tests;
