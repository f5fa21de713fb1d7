//! Runs a checked request ([`Plan`]) on an instance and answers in OpenAI's
//! shapes: one task per choice, collected into one body or streamed as
//! server-sent events.
//!
//! Invariants:
//! * The HTTP status is decided only once every task of the request has
//!   started (its prompt is tokenized and fits the context) or ended: a
//!   refused prompt is a 400 with OpenAI's code, streamed or not, never a
//!   200 followed by an error event.
//! * Every choice ends exactly once in what the client sees: a
//!   `finish_reason`, or the error event that ends the whole stream.
//! * Dropping the response (the client went away) drops every task stream,
//!   which cancels the tasks still running.
//! * An echoed prompt comes first in its choice's text, once: streamed at
//!   once when its text is known and nothing of it is awaited, else when
//!   the runner's report of the prompt (its tokens, their log-probabilities)
//!   arrives, before any token.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream, StreamExt};
use ipc::proto::{InvalidTask, TaskOutcome, TokenLogprob};
use serde_json::{json, Value};
use supervisor::instance::{InstanceHandle, TaskEvent, TaskStream, TaskSubmit};

use crate::api::ApiError;
use crate::openai::{self, ApiFailure, LogprobsShape, Plan, ReportedPrompt, Usage};

/// Which endpoint is answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Completion,
}

impl Kind {
    fn prompt_param(self) -> &'static str {
        match self {
            Kind::Chat => "messages",
            Kind::Completion => "prompt",
        }
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One choice of a request, as it is being answered.
struct Choice {
    index: u32,
    prompt: usize,
    prompt_tokens: u32,
    /// Of them, taken from a kept prefix (`None`: no prefix reuse).
    cached_tokens: Option<u32>,
    text: String,
    logprobs: Vec<TokenLogprob>,
    /// The echoed prompt's text, once known (text completions with `echo`).
    echo: Option<String>,
    /// The runner's report of the prompt, when the plan asked for one.
    reported: Option<ReportedPrompt>,
    /// Where the next logprobs entry's text starts (text completions).
    offset: usize,
    finish: Option<String>,
    completion_tokens: u32,
}

impl Choice {
    /// The task started: its prompt's size and how much of it was cached.
    fn started(&mut self, prompt_tokens: u32, cached_tokens: Option<u32>) {
        self.prompt_tokens = prompt_tokens;
        self.cached_tokens = cached_tokens;
    }
}

/// What ended a task before or while it ran, as the client sees it.
fn outcome_error(outcome: TaskOutcome, kind: Kind) -> Option<ApiError> {
    match outcome {
        TaskOutcome::Invalid { code, message } => {
            let code = match code {
                InvalidTask::ContextLengthExceeded => "context_length_exceeded",
                InvalidTask::InvalidPrompt => "invalid_value",
                InvalidTask::NoChatTemplate => "no_chat_template",
            };
            Some(ApiFailure::invalid(kind.prompt_param(), code, message).into())
        }
        TaskOutcome::Failed { cause, .. } => Some(ApiError::runner(cause)),
        TaskOutcome::Completed { .. } | TaskOutcome::Cancelled { .. } => None,
    }
}

/// Submits every task of `plan` and waits until each has started.
async fn start(
    handle: &InstanceHandle,
    plan: &Plan,
    kind: Kind,
) -> Result<(Vec<(Choice, TaskStream)>, Vec<Option<TaskOutcome>>), ApiError> {
    let tasks = plan.tasks();
    // More tasks than the instance runs and queues together would get a
    // 429 on every retry: that is the request's fault, a 400.
    let limits = handle.view().limits;
    let capacity = limits.max_running + limits.max_waiting;
    if tasks.len() > capacity {
        let param = if plan.prompts.len() > 1 {
            "prompt"
        } else {
            "n"
        };
        return Err(ApiFailure::invalid(
            param,
            "invalid_value",
            format!(
                "this request needs {} tasks ({} prompt(s) x n = {}), but instance {} runs at most {} (max_batch) and queues {} (max_waiting): ask for fewer choices or prompts at a time",
                tasks.len(),
                plan.prompts.len(),
                plan.n,
                handle.instance_id,
                limits.max_running,
                limits.max_waiting
            ),
        )
        .into());
    }
    let trace_id = format!("{:016x}", fastrand::u64(..));
    let mut streams = Vec::new();
    for (index, input, sampling) in tasks {
        let task = handle
            .submit(TaskSubmit {
                input,
                max_tokens: plan.max_tokens,
                sampling,
                stop: plan.stop.clone(),
                trace_id: trace_id.clone(),
                report_prompt: plan.report_prompt,
            })
            .await?;
        let prompt = (index / plan.n) as usize;
        let echo = plan
            .echo
            .as_ref()
            .and_then(|texts| texts.get(prompt).cloned().flatten());
        let choice = Choice {
            index,
            prompt,
            prompt_tokens: 0,
            cached_tokens: None,
            text: String::new(),
            logprobs: Vec::new(),
            offset: echo.as_ref().map_or(0, String::len),
            echo,
            reported: None,
            finish: None,
            completion_tokens: 0,
        };
        streams.push((choice, task));
    }
    let firsts =
        futures_util::future::join_all(streams.iter_mut().map(|(_, task)| task.next())).await;
    let mut early = Vec::with_capacity(firsts.len());
    for ((choice, _), first) in streams.iter_mut().zip(firsts) {
        match first {
            Some(TaskEvent::Started {
                prompt_tokens,
                cached_tokens,
            }) => {
                choice.started(prompt_tokens, cached_tokens);
                early.push(None);
            }
            Some(TaskEvent::Done(outcome)) => {
                if let Some(e) = outcome_error(outcome.clone(), kind) {
                    return Err(e);
                }
                early.push(Some(outcome));
            }
            Some(TaskEvent::Token { .. } | TaskEvent::Prompt { .. }) => {
                return Err(ApiError::runner("a task reported before it started"))
            }
            None => return Err(ApiError::runner("task ended without an outcome")),
        }
    }
    Ok((streams, early))
}

/// Answers `plan` on `handle`: a JSON body, or an SSE stream.
pub async fn respond(
    handle: &InstanceHandle,
    plan: Plan,
    model: String,
    kind: Kind,
) -> Result<Response, ApiError> {
    let (streams, early) = start(handle, &plan, kind).await?;
    let first_task = streams
        .first()
        .map(|(_, t)| t.task_id.clone())
        .unwrap_or_default();
    let id = match kind {
        Kind::Chat => format!("chatcmpl-{first_task}"),
        Kind::Completion => format!("cmpl-{first_task}"),
    };
    let shape = Shape {
        id,
        model,
        created: now_unix(),
        kind,
        logprobs: plan.logprobs,
        include_usage: plan.include_usage,
        echo: plan.echo.is_some(),
        await_report: plan.report_prompt.is_some(),
        prompts: plan.prompts.len(),
    };
    if plan.stream {
        Ok(stream_response(shape, streams, early).into_response())
    } else {
        collect_response(shape, streams, early).await
    }
}

/// What every body and chunk of one response shares.
#[derive(Clone)]
struct Shape {
    id: String,
    model: String,
    created: u64,
    kind: Kind,
    logprobs: Option<LogprobsShape>,
    include_usage: bool,
    /// Whether choices echo their prompts.
    echo: bool,
    /// Whether each choice waits for its runner's report of the prompt.
    await_report: bool,
    prompts: usize,
}

impl Shape {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    /// Logprobs of `entries` (text completions: after the echoed prompt's
    /// own, when `prompt` is given).
    fn logprobs(
        &self,
        prompt: Option<&ReportedPrompt>,
        entries: &[TokenLogprob],
        offset: usize,
    ) -> Value {
        match self.logprobs {
            None => Value::Null,
            Some(LogprobsShape::Chat { .. }) => openai::chat_logprobs(entries),
            Some(LogprobsShape::Completion { .. }) => {
                openai::completion_logprobs(prompt, entries, offset)
            }
        }
    }

    /// Takes the runner's report of a choice's prompt: the echoed text
    /// where the request did not give it (token ids), and the logprobs
    /// entries of the prompt's tokens.
    fn on_report(&self, c: &mut Choice, report: ReportedPrompt) {
        if self.echo && c.echo.is_none() {
            let text = report.text();
            c.offset = text.len();
            c.echo = Some(text);
        }
        c.reported = Some(report);
    }

    /// The prompt's entries in a choice's logprobs: with `echo` and
    /// `logprobs`, whose report scores the prompt.
    fn echoed_entries<'c>(&self, c: &'c Choice) -> Option<&'c ReportedPrompt> {
        c.reported
            .as_ref()
            .filter(|_| self.echo && self.logprobs.is_some())
    }

    /// Usage over every choice: each prompt counted once.
    fn usage(&self, choices: &[Choice]) -> Usage {
        let mut prompt = vec![0u32; self.prompts];
        let mut cached: Vec<Option<u32>> = vec![None; self.prompts];
        let mut completion = 0;
        for c in choices {
            if let Some(p) = prompt.get_mut(c.prompt) {
                *p = (*p).max(c.prompt_tokens);
            }
            if let (Some(slot), Some(n)) = (cached.get_mut(c.prompt), c.cached_tokens) {
                *slot = Some(slot.unwrap_or(0).max(n));
            }
            completion += c.completion_tokens;
        }
        let mut usage = Usage::new(prompt.iter().sum(), completion);
        if cached.iter().any(Option::is_some) {
            usage.prompt_tokens_details = Some(crate::openai::PromptTokensDetails {
                cached_tokens: cached.iter().flatten().sum(),
            });
        }
        usage
    }

    fn body(&self, choices: Vec<Value>, usage: Usage) -> Value {
        json!({
            "id": self.id,
            "object": self.object(false),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": choices,
            "usage": usage,
        })
    }

    fn chunk(&self, choice: Value) -> Value {
        let mut chunk = json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": [choice],
        });
        if self.include_usage {
            chunk["usage"] = Value::Null;
        }
        chunk
    }

    /// A streamed piece of one choice: text (with its logprobs) or its end.
    fn piece(&self, c: &Choice, text: &str, logprobs: Value, finish: Option<&str>) -> Value {
        match self.kind {
            Kind::Chat => {
                let delta = match finish {
                    Some(_) if text.is_empty() => json!({}),
                    _ => json!({"content": text}),
                };
                self.chunk(json!({
                    "index": c.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish,
                }))
            }
            Kind::Completion => self.chunk(json!({
                "index": c.index, "text": text, "logprobs": logprobs, "finish_reason": finish,
            })),
        }
    }
}

fn finish_of(outcome: &TaskOutcome) -> (String, Option<u32>, Option<u32>) {
    match outcome {
        TaskOutcome::Completed {
            prompt_tokens,
            completion_tokens,
            finish_reason,
        } => (
            finish_reason.clone(),
            Some(*prompt_tokens),
            Some(*completion_tokens),
        ),
        _ => ("cancelled".into(), None, None),
    }
}

/// Applies an outcome to its choice; an error for the ones clients see as
/// errors.
fn settle(c: &mut Choice, outcome: TaskOutcome, kind: Kind) -> Result<(), ApiError> {
    if let Some(e) = outcome_error(outcome.clone(), kind) {
        return Err(e);
    }
    let (finish, prompt, completion) = finish_of(&outcome);
    c.finish = Some(finish);
    if let Some(p) = prompt {
        c.prompt_tokens = p;
    }
    if let Some(n) = completion {
        c.completion_tokens = n;
    }
    Ok(())
}

async fn collect_one(
    mut c: Choice,
    mut task: TaskStream,
    shape: &Shape,
) -> Result<Choice, ApiError> {
    let kind = shape.kind;
    while let Some(event) = task.next().await {
        match event {
            TaskEvent::Started {
                prompt_tokens,
                cached_tokens,
            } => c.started(prompt_tokens, cached_tokens),
            TaskEvent::Prompt { tokens, logprobs } => {
                shape.on_report(&mut c, ReportedPrompt { tokens, logprobs })
            }
            TaskEvent::Token { text, logprobs } => {
                c.text.push_str(&text);
                c.logprobs.extend(logprobs);
            }
            TaskEvent::Done(outcome) => {
                settle(&mut c, outcome, kind)?;
                return Ok(c);
            }
        }
    }
    Err(ApiError::runner("task ended without an outcome"))
}

async fn collect_response(
    shape: Shape,
    streams: Vec<(Choice, TaskStream)>,
    early: Vec<Option<TaskOutcome>>,
) -> Result<Response, ApiError> {
    let kind = shape.kind;
    let runs = streams
        .into_iter()
        .zip(early)
        .map(|((mut c, task), early)| {
            let shape = &shape;
            async move {
                match early {
                    Some(outcome) => {
                        settle(&mut c, outcome, kind)?;
                        Ok(c)
                    }
                    None => collect_one(c, task, shape).await,
                }
            }
        });
    let mut choices = futures_util::future::try_join_all(runs).await?;
    choices.sort_by_key(|c| c.index);
    let usage = shape.usage(&choices);
    let bodies = choices
        .iter()
        .map(|c| {
            let finish = c.finish.as_deref().unwrap_or("stop");
            match kind {
                Kind::Chat => json!({
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text, "refusal": null},
                    "logprobs": shape.logprobs(None, &c.logprobs, 0),
                    "finish_reason": finish,
                }),
                Kind::Completion => {
                    let echo = c.echo.as_deref().unwrap_or("");
                    json!({
                        "index": c.index,
                        "text": format!("{echo}{}", c.text),
                        "logprobs": shape.logprobs(shape.echoed_entries(c), &c.logprobs, echo.len()),
                        "finish_reason": finish,
                    })
                }
            }
        })
        .collect();
    Ok(Json(shape.body(bodies, usage)).into_response())
}

/// The streamed answer: per choice a first chunk (the role, or the echoed
/// prompt), its text chunks and its finish chunk; then, when asked, the
/// usage chunk; then `[DONE]`. A failure ends the stream with an error
/// event and no `[DONE]`.
fn stream_response(
    shape: Shape,
    streams: Vec<(Choice, TaskStream)>,
    early: Vec<Option<TaskOutcome>>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let data = |v: Value| Event::default().data(v.to_string());
    let mut opening = Vec::new();
    let mut choices = Vec::new();
    let mut live = Vec::new();
    for (slot, ((mut c, task), early)) in streams.into_iter().zip(early).enumerate() {
        match shape.kind {
            Kind::Chat => opening.push(data(shape.chunk(json!({
                "index": c.index,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": null,
                "finish_reason": null,
            })))),
            Kind::Completion => {
                if let Some(echo) = c.echo.as_ref().filter(|_| !shape.await_report) {
                    opening.push(data(shape.piece(&c, echo, Value::Null, None)));
                }
            }
        }
        match early {
            Some(outcome) => {
                // Only completions and cancels end before they start
                // (errors were answered before the stream began).
                let _ = settle(&mut c, outcome, shape.kind);
                let finish = c.finish.clone().unwrap_or_default();
                opening.push(data(shape.piece(&c, "", Value::Null, Some(&finish))));
            }
            None => {
                let events = stream::unfold(task, |mut task| async move {
                    task.next().await.map(|event| (event, task))
                })
                .map(move |event| (slot, event));
                live.push(events.boxed());
            }
        }
        choices.push(c);
    }
    let merged = stream::select_all(live);
    let state = StreamState {
        shape,
        choices,
        merged: Some(merged),
    };
    let body = stream::unfold(state, move |mut state| async move {
        let mut merged = state.merged.take()?;
        match merged.next().await {
            Some((slot, event)) => {
                let (events, go_on) = state.on_event(slot, event);
                if go_on {
                    state.merged = Some(merged);
                }
                Some((events, state))
            }
            None => {
                let mut events = Vec::new();
                if state.shape.include_usage {
                    let usage = state.shape.usage(&state.choices);
                    let mut chunk = state.shape.chunk(json!(null));
                    chunk["choices"] = json!([]);
                    chunk["usage"] = json!(usage);
                    events.push(Event::default().data(chunk.to_string()));
                }
                events.push(Event::default().data("[DONE]"));
                Some((events, state))
            }
        }
    });
    let all = stream::iter(opening.into_iter().map(Ok))
        .chain(body.flat_map(|events| stream::iter(events.into_iter().map(Ok::<_, Infallible>))));
    Sse::new(all)
}

type Merged = stream::SelectAll<stream::BoxStream<'static, (usize, TaskEvent)>>;

struct StreamState {
    shape: Shape,
    choices: Vec<Choice>,
    /// `None` once the stream ended (after `[DONE]` or an error).
    merged: Option<Merged>,
}

impl StreamState {
    /// The events for one task event, and whether the stream goes on.
    fn on_event(&mut self, slot: usize, event: TaskEvent) -> (Vec<Event>, bool) {
        let data = |v: Value| Event::default().data(v.to_string());
        let shape = &self.shape;
        let c = &mut self.choices[slot];
        match event {
            TaskEvent::Started {
                prompt_tokens,
                cached_tokens,
            } => {
                c.started(prompt_tokens, cached_tokens);
                (Vec::new(), true)
            }
            TaskEvent::Prompt { tokens, logprobs } => {
                shape.on_report(c, ReportedPrompt { tokens, logprobs });
                let Some(echo) = c.echo.clone().filter(|_| shape.echo) else {
                    return (Vec::new(), true);
                };
                let lp = match shape.echoed_entries(c) {
                    Some(prompt) => shape.logprobs(Some(prompt), &[], 0),
                    None => Value::Null,
                };
                (vec![data(shape.piece(c, &echo, lp, None))], true)
            }
            TaskEvent::Token { text, logprobs } => {
                let lp = shape.logprobs(None, &logprobs, c.offset);
                c.offset += logprobs
                    .iter()
                    .map(|e| String::from_utf8_lossy(&e.bytes.0).len())
                    .sum::<usize>();
                (vec![data(shape.piece(c, &text, lp, None))], true)
            }
            TaskEvent::Done(outcome) => match settle(c, outcome, shape.kind) {
                Ok(()) => {
                    let finish = c.finish.clone().unwrap_or_default();
                    (
                        vec![data(shape.piece(c, "", Value::Null, Some(&finish)))],
                        true,
                    )
                }
                Err(e) => (vec![data(json!(e.1))], false),
            },
        }
    }
}
