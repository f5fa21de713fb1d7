//! The model engine: a shard of a llama-family model (crate `engine`) behind
//! the runner's [`Engine`] trait, with the data plane of [`crate::links`].
//!
//! Rank 0 owns every task: it renders the chat template, tokenizes, runs its
//! shard and drives the others; it alone talks to the node about tasks.
//! Other ranks are driven over their links by a *stage server* thread,
//! started after warm-up:
//!
//! * pipeline (ring): stage i runs its layers on the activations from stage
//!   i−1 and passes them on; the last stage samples and sends the token back
//!   to rank 0. One task is in the pipeline at a time (rank 0 waits for each
//!   token), so the order of messages on every link is rank 0's order.
//! * tensor (star): rank 0 sends each step's tokens to every rank; all run
//!   every layer on their slice and sum partials through rank 0.
//!
//! A prompt longer than the prefill chunk is fed one chunk per step: every
//! chunk but the last only advances the KV caches (a pipeline's last stage
//! answers `Prefilled`), the last one samples. Each chunk is reported to the
//! node as progress, and other tasks take their turns in between. The
//! chunk is the instance's `prefill_chunk`, or else adapts to aim each step
//! at a couple of seconds of compute ([`crate::prefill`]).
//!
//! A task that asks for its prompt's log-probabilities (a text completion
//! with `echo` and `logprobs`) is prefilled with the logits of every
//! position: the shard that ends the model scores each prompt token under
//! the logits of the position before it, chunk by chunk (in smaller chunks,
//! [`SCORE_CHUNK`], to bound the `[chunk, vocab]` logits), and rank 0
//! reports them all in one `Prompt` step before the first token.
//!
//! Closing goes front to back: rank 0 ends its outgoing links, each stage
//! ends its own when its upstream ended, and rank 0 waits for the ends to
//! come back around, so no stage sees `PeerLost` on a graceful path.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use engine::chat::{ChatMessage, ChatTemplate, RenderOptions};
use engine::loader::{load_shard, WeightFormat};
use engine::model::{
    AllReduce, KvCache, Logits, NoAllReduce, Shard, ShardSpec, StageInput, StageOutput,
};
use engine::sampler::{score_rows, Sampled, Sampler, SamplingParams, Scored};
use engine::tokenizer::Tokenizer;
use engine::wire::{tensor_from_bytes, tensor_to_bytes};
use engine::EngineError;
use ipc::proto::{InvalidTask, PromptReport, Sampling, TaskInput, TaskRequest, TokenLogprob};
use ipc::Blob;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::runtime::Handle;

use crate::engine::{Engine, StartError, Step};
use crate::links::{self, Link, LinkEnd, LinkMsg, ScoreTargets};

/// How the instance is split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sharding {
    Pipeline,
    Tensor,
}

/// The model engine's configuration, as the node sends it (the same for
/// every rank; each picks its own part).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEngineArgs {
    /// A `.gguf` file or a Hugging Face model directory.
    pub path: PathBuf,
    pub sharding: Sharding,
    /// Pipeline: each rank's layer range `[start, end)`, by rank.
    #[serde(default)]
    pub layers: Vec<(usize, usize)>,
    /// How weight matrices are held: `f32`, `gguf` (blocks as stored) or
    /// `q8_0`.
    pub weights: WeightFormat,
    /// A scripted fault, for lifecycle tests on a real model.
    #[serde(default)]
    pub fault: Option<crate::fault::FaultSpec>,
    /// Prompt tokens per prefill step (default [`DEFAULT_PREFILL_CHUNK`]).
    #[serde(default)]
    pub prefill_chunk: Option<u32>,
}

/// Prompt tokens per prefill step at most when the instance names no
/// chunk; steps shrink from it when they take longer than
/// [`crate::prefill::STEP_TARGET`]. Each chunk is one step: it reports
/// progress (so a long prompt is never taken for a stall), lets other tasks
/// take their turn, and is where a cancel lands. llama.cpp's default
/// micro-batch is the same size.
pub const DEFAULT_PREFILL_CHUNK: u32 = 512;

/// Prompt tokens per prefill step at most while a prompt is scored: its
/// logits are `[chunk, vocab]` f32 (128 × 152k vocabulary ≈ 78 MB).
pub const SCORE_CHUNK: usize = 128;

/// What the engine tells the runner from outside a task.
pub enum EngineNotice {
    /// A stage processed a step (the `running` phase of a rank > 0).
    StageStep,
    /// The stage server failed for good.
    Fatal(String),
}

enum Topology {
    Alone,
    Ring { prev: Link, next: Link },
    Star { links: Vec<Link> },
}

pub struct ModelEngine {
    args: ModelEngineArgs,
    rank: u32,
    world: u32,
    handle: Handle,
    listener: Option<TcpListener>,
    data_addr: Option<String>,
    shard: Option<Arc<Shard>>,
    tokenizer: Option<Tokenizer>,
    template: Option<ChatTemplate>,
    eos: Vec<u32>,
    topology: Option<Topology>,
    server: Option<std::thread::JoinHandle<Result<(), String>>>,
    /// Tells the runner what the stage server does.
    notify: Arc<dyn Fn(EngineNotice) + Send + Sync>,
}

pub struct ModelTask {
    task_id: String,
    /// Tokens not yet fed to the model (the prompt, then each sampled token).
    pending: Vec<u32>,
    /// The whole prompt, for its report and the scores' targets (empty when
    /// the task asked for no report).
    prompt: Vec<u32>,
    prompt_total: u32,
    /// The prompt report still to send (cleared once sent).
    report: Option<PromptReport>,
    /// Scores of the prompt tokens prefilled so far (for
    /// `PromptReport::Logprobs`): entry `i` scores `prompt[i + 1]`.
    scores: Vec<Scored>,
    /// The first token, sampled with the prompt's last chunk and held while
    /// the prompt's report goes out.
    ahead: Option<Sampled>,
    /// Log-probabilities of tokens whose text is still held back.
    held_logprobs: Vec<TokenLogprob>,
    /// Prompt tokens the next prefill step takes ([`crate::prefill`]).
    chunk: usize,
    pos: usize,
    cache: KvCache,
    sampler: Sampler,
    sampling: Sampling,
    produced: u32,
    max_tokens: u32,
    stop: Vec<String>,
    generated: Vec<u32>,
    /// Text of `generated` handed out so far.
    emitted: usize,
    finish: Option<String>,
}

/// The logits of a shard that ends the model; `who` names it in the error.
fn logits_of(output: StageOutput, who: &str) -> Result<Tensor, EngineError> {
    match output {
        StageOutput::Logits(logits) => Ok(logits),
        StageOutput::Hidden(_) => Err(compute(format!("{who} must produce logits"))),
    }
}

/// Splits a scored chunk's logits (`[rows, vocab]` when `score` asked for
/// every position) into the last row, which samples the next token, and the
/// scores of the targets.
fn split_scores(
    logits: Tensor,
    score: Option<&ScoreTargets>,
) -> Result<(Tensor, Vec<Scored>), EngineError> {
    let Some(score) = score else {
        return Ok((logits, Vec::new()));
    };
    let scores = score_rows(&logits, &score.targets, usize::from(score.top))?;
    let rows = logits.dim(0).map_err(compute)?;
    let last = logits.get(rows - 1).map_err(compute)?;
    Ok((last, scores))
}

fn compute(e: impl std::fmt::Display) -> EngineError {
    EngineError::Compute(e.to_string())
}

fn sampler_for(s: &Sampling) -> Sampler {
    Sampler::new(SamplingParams {
        temperature: s.temperature,
        top_p: s.top_p,
        top_k: s.top_k as usize,
        seed: s.seed,
        frequency_penalty: s.frequency_penalty,
        presence_penalty: s.presence_penalty,
        logit_bias: s.logit_bias.clone(),
        logprobs: s.logprobs.map(usize::from),
    })
}

fn invalid(message: impl Into<String>) -> StartError {
    StartError::Invalid(InvalidTask::InvalidPrompt, message.into())
}

impl ModelEngine {
    pub fn new(
        args: ModelEngineArgs,
        rank: u32,
        world: u32,
        handle: Handle,
        notify: Arc<dyn Fn(EngineNotice) + Send + Sync>,
    ) -> Result<ModelEngine, EngineError> {
        let (listener, data_addr) = if world > 1 {
            let (listener, addr) =
                links::listen().map_err(|e| compute(format!("cannot listen for links: {e}")))?;
            (Some(listener), Some(addr))
        } else {
            (None, None)
        };
        Ok(ModelEngine {
            args,
            rank,
            world,
            handle,
            listener,
            data_addr,
            shard: None,
            tokenizer: None,
            template: None,
            eos: Vec::new(),
            topology: None,
            server: None,
            notify,
        })
    }

    fn spec(&self, n_layers: usize) -> Result<ShardSpec, EngineError> {
        let rank = self.rank as usize;
        match self.args.sharding {
            Sharding::Tensor => Ok(ShardSpec {
                layers: 0..n_layers,
                tp_rank: rank,
                tp_degree: self.world as usize,
            }),
            Sharding::Pipeline if self.world == 1 => Ok(ShardSpec {
                layers: 0..n_layers,
                tp_rank: 0,
                tp_degree: 1,
            }),
            Sharding::Pipeline => {
                let (start, end) = *self.args.layers.get(rank).ok_or_else(|| {
                    EngineError::Unsupported(format!(
                        "no layer range for rank {rank} in {:?}",
                        self.args.layers
                    ))
                })?;
                Ok(ShardSpec {
                    layers: start..end,
                    tp_rank: 0,
                    tp_degree: 1,
                })
            }
        }
    }

    fn shard(&self) -> Result<&Arc<Shard>, EngineError> {
        self.shard
            .as_ref()
            .ok_or_else(|| compute("the model is not loaded"))
    }

    /// Loads the tokenizer and chat template (rank 0 only).
    /// The tokenizer and chat template, checked against the model's
    /// `model_vocab` embedding rows.
    fn load_text_side(&mut self, model_vocab: usize) -> Result<(), EngineError> {
        let path = &self.args.path;
        let (tokenizer, template) = if path.is_dir() {
            let tokenizer = Tokenizer::from_file(path.join("tokenizer.json"))?;
            tokenizer.check_fits(
                model_vocab,
                &path.join("tokenizer.json").display().to_string(),
                &format!("vocab_size in {}", path.join("config.json").display()),
            )?;
            let template = ChatTemplate::from_tokenizer_config(path.join("tokenizer_config.json"))?;
            (tokenizer, template)
        } else {
            let mut file = std::fs::File::open(path).map_err(|e| EngineError::Model {
                path: path.display().to_string(),
                detail: format!("cannot open: {e}"),
            })?;
            let content =
                candle_core::quantized::gguf_file::Content::read(&mut file).map_err(|e| {
                    EngineError::Model {
                        path: path.display().to_string(),
                        detail: format!("not a readable GGUF file: {e}"),
                    }
                })?;
            let tokenizer = Tokenizer::from_gguf(&content)?;
            let shown = path.display();
            tokenizer.check_fits(
                model_vocab,
                &format!("tokenizer.ggml.tokens in {shown}"),
                &format!("token_embd.weight in {shown}"),
            )?;
            (tokenizer, ChatTemplate::from_gguf(&content)?)
        };
        self.eos = tokenizer.eos_ids();
        self.tokenizer = Some(tokenizer);
        self.template = template;
        Ok(())
    }

    /// Text of `task.generated` that is safe to hand out now: complete UTF-8
    /// and not possibly the start of a stop string. Sets `task.finish` when a
    /// stop string appears.
    fn take_text(&self, task: &mut ModelTask, flush: bool) -> Result<String, EngineError> {
        let tokenizer = self
            .tokenizer
            .as_ref()
            .ok_or_else(|| compute("no tokenizer on this rank"))?;
        let text = tokenizer.decode(&task.generated, true);
        let mut end = text.len();
        if !flush && text.ends_with('\u{FFFD}') {
            // A character split across tokens: wait for the rest.
            end = text.trim_end_matches('\u{FFFD}').len();
        }
        if let Some(at) = task.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
            end = at;
            task.finish = Some("stop".into());
        } else if !flush {
            // Hold back a tail that could still grow into a stop string.
            let held = task
                .stop
                .iter()
                .flat_map(|s| {
                    (1..s.len())
                        .filter(|k| s.is_char_boundary(*k))
                        .filter(|k| text.ends_with(&s[..*k]))
                })
                .max()
                .unwrap_or(0);
            end = end.min(text.len() - held);
        }
        let end = end.max(task.emitted);
        let out = text.get(task.emitted..end).unwrap_or("").to_string();
        task.emitted = end;
        Ok(out)
    }

    /// Ends a task: the text still held back goes out first, `Finished`
    /// (with the reason, a stop string's if the rest held one) on the next
    /// step.
    fn finish(&self, task: &mut ModelTask, reason: &str) -> Result<Step, EngineError> {
        task.finish = Some(reason.into());
        let rest = self.take_text(task, true)?;
        if !rest.is_empty() || !task.held_logprobs.is_empty() {
            return Ok(Step::Token {
                text: rest,
                logprobs: std::mem::take(&mut task.held_logprobs),
            });
        }
        let finish_reason = task.finish.clone().unwrap_or_else(|| reason.into());
        Ok(Step::Finished {
            finish_reason,
            completion_tokens: task.produced,
        })
    }

    /// Runs rank 0's part of one step over the first `n` pending tokens.
    /// With `sample` it returns the next token; without (a prompt chunk that
    /// is not the prompt's last), only the KV caches of every rank advance.
    fn forward_step(
        &mut self,
        task: &mut ModelTask,
        n: usize,
        sample: bool,
    ) -> Result<Option<Sampled>, EngineError> {
        let shard = self.shard()?.clone();
        let tokens: Vec<u32> = task.pending.drain(..n).collect();
        let pos = task.pos;
        let handle = self.handle.clone();
        // While the prompt is scored: the prompt tokens that follow this
        // chunk's positions.
        let score = match task.report {
            Some(PromptReport::Logprobs(top)) => {
                let len = task.prompt.len();
                let targets = task.prompt[(pos + 1).min(len)..(pos + n + 1).min(len)].to_vec();
                Some(ScoreTargets { top, targets })
            }
            _ => None,
        };
        let want = if score.is_some() {
            Logits::All
        } else {
            Logits::Last
        };
        let (sampled, scores) = match self.topology.as_mut() {
            Some(Topology::Alone) | None => {
                let output = shard.forward_logits(
                    StageInput::Tokens(tokens),
                    pos,
                    &mut task.cache,
                    &mut NoAllReduce,
                    want,
                )?;
                let (logits, scores) =
                    split_scores(logits_of(output, "a single shard")?, score.as_ref())?;
                let sampled = sample.then(|| task.sampler.next(&logits)).transpose()?;
                (sampled, scores)
            }
            Some(Topology::Ring { prev, next }) => {
                let hidden = match shard.forward(
                    StageInput::Tokens(tokens),
                    pos,
                    &mut task.cache,
                    &mut NoAllReduce,
                )? {
                    StageOutput::Hidden(h) => h,
                    StageOutput::Logits(_) => {
                        return Err(compute("the first stage of a pipeline produced logits"))
                    }
                };
                let data = Blob(tensor_to_bytes(&hidden)?);
                let msg = LinkMsg::Activations {
                    task_id: task.task_id.clone(),
                    pos: pos as u32,
                    sampling: task.sampling.clone(),
                    sample,
                    score,
                    data,
                };
                next.send(&handle, msg)?;
                match prev.expect(&handle)? {
                    LinkMsg::Token {
                        task_id,
                        token,
                        logprobs,
                        scores,
                    } if task_id == task.task_id && sample => (
                        Some(Sampled {
                            id: token,
                            logprobs,
                        }),
                        scores,
                    ),
                    LinkMsg::Prefilled { task_id, scores }
                        if task_id == task.task_id && !sample =>
                    {
                        (None, scores)
                    }
                    LinkMsg::Failed { cause, .. } => return Err(compute(cause)),
                    other => {
                        return Err(compute(format!(
                            "unexpected message on the token link: {other:?}"
                        )))
                    }
                }
            }
            Some(Topology::Star { links }) => {
                for link in links.iter() {
                    let msg = LinkMsg::TpStep {
                        task_id: task.task_id.clone(),
                        pos: pos as u32,
                        tokens: tokens.clone(),
                    };
                    link.send(&handle, msg)?;
                }
                let mut reduce = StarAllReduce::Root {
                    handle: &handle,
                    links,
                };
                let output = shard.forward_logits(
                    StageInput::Tokens(tokens),
                    pos,
                    &mut task.cache,
                    &mut reduce,
                    want,
                )?;
                let (logits, scores) =
                    split_scores(logits_of(output, "a tensor shard")?, score.as_ref())?;
                let sampled = sample.then(|| task.sampler.next(&logits)).transpose()?;
                (sampled, scores)
            }
        };
        task.pos += n;
        task.scores.extend(scores);
        Ok(sampled)
    }

    /// The prompt's report: its tokens' bytes and, when scored, each
    /// token's log-probability after the first.
    fn prompt_step(&self, task: &mut ModelTask) -> Result<Step, EngineError> {
        let scores = std::mem::take(&mut task.scores);
        let scored = matches!(task.report.take(), Some(PromptReport::Logprobs(_)));
        if scored && scores.len() + 1 != task.prompt.len() {
            return Err(compute(format!(
                "scored {} of the prompt's {} tokens after the first",
                scores.len(),
                task.prompt.len() - 1
            )));
        }
        let tokens = task.prompt.iter().map(|&id| self.token_blob(id)).collect();
        let logprobs = task.prompt[1..]
            .iter()
            .zip(scores)
            .map(|(&id, scored)| self.token_logprob(id, scored))
            .collect();
        Ok(Step::Prompt { tokens, logprobs })
    }

    /// A token's bytes (empty on a rank without the tokenizer).
    fn token_blob(&self, id: u32) -> Blob {
        Blob(
            self.tokenizer
                .as_ref()
                .map(|t| t.token_bytes(id).to_vec())
                .unwrap_or_default(),
        )
    }

    /// A token's log-probabilities with the token texts.
    fn token_logprob(&self, id: u32, (logprob, top): Scored) -> TokenLogprob {
        TokenLogprob {
            bytes: self.token_blob(id),
            logprob,
            top: top
                .into_iter()
                .map(|(id, lp)| (self.token_blob(id), lp))
                .collect(),
        }
    }

    /// The most prompt tokens one prefill step takes: the instance's
    /// `prefill_chunk` (then always exactly that) or the default, at most
    /// [`SCORE_CHUNK`] while a prompt is scored.
    fn chunk_ceiling(&self, scoring: bool) -> usize {
        let chunk = self
            .args
            .prefill_chunk
            .unwrap_or(DEFAULT_PREFILL_CHUNK)
            .max(1) as usize;
        if scoring {
            chunk.min(SCORE_CHUNK)
        } else {
            chunk
        }
    }
}

/// Tensor parallelism's sum through rank 0.
enum StarAllReduce<'a> {
    Root {
        handle: &'a Handle,
        links: &'a mut [Link],
    },
    Leaf {
        handle: &'a Handle,
        link: &'a mut Link,
    },
}

impl AllReduce for StarAllReduce<'_> {
    fn all_reduce_sum(&mut self, partial: &Tensor) -> engine::Result<Tensor> {
        match self {
            StarAllReduce::Root { handle, links } => {
                let mut sum = partial.clone();
                for link in links.iter_mut() {
                    match link.expect(handle)? {
                        LinkMsg::Partial { data } => sum = (sum + tensor_from_bytes(&data.0)?)?,
                        other => {
                            return Err(compute(format!(
                                "expected a partial sum from rank {}, got {other:?}",
                                link.peer_rank
                            )))
                        }
                    }
                }
                let bytes = tensor_to_bytes(&sum)?;
                for link in links.iter() {
                    link.send(
                        handle,
                        LinkMsg::Reduced {
                            data: Blob(bytes.clone()),
                        },
                    )?;
                }
                Ok(sum)
            }
            StarAllReduce::Leaf { handle, link } => {
                link.send(
                    handle,
                    LinkMsg::Partial {
                        data: Blob(tensor_to_bytes(partial)?),
                    },
                )?;
                match link.expect(handle)? {
                    LinkMsg::Reduced { data } => Ok(tensor_from_bytes(&data.0)?),
                    other => Err(compute(format!(
                        "expected the reduced sum from rank 0, got {other:?}"
                    ))),
                }
            }
        }
    }
}

impl Engine for ModelEngine {
    type Task = ModelTask;

    fn data_addr(&self) -> Option<String> {
        self.data_addr.clone()
    }

    fn connect(&mut self, peers: &[String], deadline: Duration) -> Result<(), EngineError> {
        let deadline = Instant::now() + deadline;
        let topology = match (&self.listener, self.args.sharding) {
            (None, _) => Topology::Alone,
            (Some(listener), Sharding::Pipeline) => {
                match links::connect_ring(
                    &self.handle,
                    listener,
                    self.rank,
                    self.world,
                    peers,
                    deadline,
                )? {
                    Some((prev, next)) => Topology::Ring { prev, next },
                    None => Topology::Alone,
                }
            }
            (Some(listener), Sharding::Tensor) => Topology::Star {
                links: links::connect_star(
                    &self.handle,
                    listener,
                    self.rank,
                    self.world,
                    peers,
                    deadline,
                )?,
            },
        };
        // Every link is up: nobody else dials in.
        self.listener = None;
        self.topology = Some(topology);
        Ok(())
    }

    fn load(&mut self, progress: &mut dyn FnMut(u32, u32)) -> Result<(), EngineError> {
        let config = engine::loader::read_config(&self.args.path)?;
        let spec = self.spec(config.n_layers)?;
        spec.validate(&config)?;
        let shard = load_shard(&self.args.path, &spec, self.args.weights, progress)?;
        self.shard = Some(Arc::new(shard));
        if self.rank == 0 {
            self.load_text_side(config.vocab_size)?;
        }
        Ok(())
    }

    fn warm_up(&mut self) -> Result<(), EngineError> {
        let shard = self.shard()?.clone();
        // A real forward pass of this shard's layers on one position, with a
        // throwaway cache; the sum of tensor parallelism is skipped (local).
        let mut cache = shard.new_cache();
        let input = if shard.spec().layers.start == 0 {
            StageInput::Tokens(vec![0])
        } else {
            StageInput::Hidden(Tensor::zeros(
                (1, shard.config().hidden_size),
                DType::F32,
                &Device::Cpu,
            )?)
        };
        shard.forward(input, 0, &mut cache, &mut NoAllReduce)?;
        if self.rank > 0 {
            let topology = self
                .topology
                .take()
                .ok_or_else(|| compute("links are not set up"))?;
            let handle = self.handle.clone();
            let notify = self.notify.clone();
            let thread = std::thread::Builder::new()
                .name("stage".into())
                .spawn(move || {
                    let result = stage_server(&shard, &handle, topology, &*notify);
                    if let Err(cause) = &result {
                        notify(EngineNotice::Fatal(cause.clone()));
                    }
                    result
                })
                .map_err(|e| compute(format!("cannot start the stage thread: {e}")))?;
            self.server = Some(thread);
        }
        Ok(())
    }

    fn start(&mut self, request: &TaskRequest) -> Result<(ModelTask, u32), StartError> {
        let tokenizer = self
            .tokenizer
            .as_ref()
            .ok_or_else(|| compute("tasks go to rank 0"))?;
        let shard = self.shard()?;
        let vocab = shard.config().vocab_size;
        let ids = match &request.input {
            TaskInput::Chat {
                turns,
                template_vars,
            } => {
                let messages: Vec<ChatMessage> = turns
                    .iter()
                    .map(|m| ChatMessage {
                        role: m.role.clone(),
                        content: m.content.clone(),
                    })
                    .collect();
                let template = self.template.as_ref().ok_or_else(|| {
                    StartError::Invalid(
                        InvalidTask::NoChatTemplate,
                        "this model has no chat template, so it cannot answer chat requests: send a text completion (/v1/completions) instead".into(),
                    )
                })?;
                let mut options = RenderOptions::default();
                if !template_vars.is_empty() {
                    options.extra = serde_json::from_str(template_vars).map_err(|e| {
                        invalid(format!(
                            "chat template variables are not a JSON object: {e}"
                        ))
                    })?;
                }
                let messages = serde_json::to_value(&messages)
                    .map_err(|e| invalid(format!("cannot pass the messages: {e}")))?;
                let prompt = template
                    .render_with(&messages, true, &options)
                    .map_err(|e| invalid(e.to_string()))?;
                tokenizer
                    .encode_prompt(&prompt)
                    .map_err(|e| invalid(e.to_string()))?
            }
            TaskInput::Text(text) => tokenizer
                .encode_prompt(text)
                .map_err(|e| invalid(e.to_string()))?,
            TaskInput::Tokens(ids) => {
                if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                    return Err(invalid(format!(
                        "token id {bad} in the prompt is outside the vocabulary of {vocab}"
                    )));
                }
                ids.clone()
            }
        };
        if ids.is_empty() {
            return Err(invalid("the prompt has no tokens"));
        }
        if let Some((bad, _)) = request
            .sampling
            .logit_bias
            .iter()
            .find(|(id, _)| *id as usize >= vocab)
        {
            return Err(invalid(format!(
                "logit_bias names token id {bad}, outside the vocabulary of {vocab}"
            )));
        }
        let limit = shard.config().max_position_embeddings;
        let room = limit.saturating_sub(ids.len());
        let max_tokens = match request.max_tokens {
            Some(m) if m as usize <= room => m,
            Some(m) => {
                return Err(StartError::Invalid(
                    InvalidTask::ContextLengthExceeded,
                    format!(
                        "this model's maximum context length is {limit} tokens; the prompt has {} tokens and max_tokens is {m}: shorten the prompt or lower max_tokens",
                        ids.len(),
                    ),
                ))
            }
            // To the end of the turn: whatever the context leaves, at
            // least one token.
            None if room > 0 => room as u32,
            None => {
                return Err(StartError::Invalid(
                    InvalidTask::ContextLengthExceeded,
                    format!(
                        "this model's maximum context length is {limit} tokens; the prompt has {} tokens and leaves no room for a completion: shorten the prompt",
                        ids.len(),
                    ),
                ))
            }
        };
        let prompt_tokens = ids.len() as u32;
        tracing::debug!(task = %request.task_id, prompt_tokens, "prompt tokenized");
        let task = ModelTask {
            task_id: request.task_id.clone(),
            // Kept only for the report (pending drains as prefill goes).
            prompt: match request.report_prompt {
                Some(_) => ids.clone(),
                None => Vec::new(),
            },
            pending: ids,
            prompt_total: prompt_tokens,
            report: request.report_prompt,
            scores: Vec::new(),
            ahead: None,
            held_logprobs: Vec::new(),
            chunk: self.chunk_ceiling(request.report_prompt.is_some()),
            pos: 0,
            cache: shard.new_cache(),
            sampler: sampler_for(&request.sampling),
            sampling: request.sampling.clone(),
            produced: 0,
            max_tokens,
            stop: request.stop.clone(),
            generated: Vec::new(),
            emitted: 0,
            finish: None,
        };
        Ok((task, prompt_tokens))
    }

    fn step(&mut self, task: &mut ModelTask) -> Result<Step, EngineError> {
        if let Some(reason) = task.finish.clone() {
            return Ok(Step::Finished {
                finish_reason: reason,
                completion_tokens: task.produced,
            });
        }
        // The prompt's tokens alone need no forward pass.
        if task.report == Some(PromptReport::Tokens) {
            return self.prompt_step(task);
        }
        let sampled = match task.ahead.take() {
            Some(sampled) => sampled,
            None => {
                // A prompt to score is prefilled even when nothing is to be
                // generated (`echo` with `max_tokens` 0).
                let scoring = task.report.is_some();
                if task.produced >= task.max_tokens && !scoring {
                    return self.finish(task, "length");
                }
                let chunk = task.chunk;
                if task.pending.len() > chunk {
                    let started = std::time::Instant::now();
                    self.forward_step(task, chunk, false)?;
                    if self.args.prefill_chunk.is_none() {
                        task.chunk = crate::prefill::next_chunk(
                            chunk,
                            started.elapsed(),
                            self.chunk_ceiling(scoring),
                        );
                    }
                    // Until the prompt is in, the position is what was
                    // prefilled.
                    return Ok(Step::Prefilled {
                        done: task.pos as u32,
                        total: task.prompt_total,
                    });
                }
                let n = task.pending.len();
                let sample = task.produced < task.max_tokens;
                let sampled = self.forward_step(task, n, sample)?;
                if scoring {
                    task.ahead = sampled;
                    return self.prompt_step(task);
                }
                sampled.ok_or_else(|| compute("a sampling step produced no token"))?
            }
        };
        let token = sampled.id;
        task.produced += 1;
        if self.eos.contains(&token) {
            return self.finish(task, "stop");
        }
        if let Some(lp) = sampled.logprobs {
            let lp = self.token_logprob(token, lp);
            task.held_logprobs.push(lp);
        }
        task.generated.push(token);
        task.pending.push(token);
        let text = self.take_text(task, false)?;
        Ok(if text.is_empty() {
            Step::Progress
        } else {
            Step::Token {
                text,
                logprobs: std::mem::take(&mut task.held_logprobs),
            }
        })
    }

    fn end_task(&mut self, task: ModelTask) {
        let handle = self.handle.clone();
        let finish = LinkMsg::Finish {
            task_id: task.task_id,
        };
        match self.topology.as_ref() {
            Some(Topology::Ring { next, .. }) => {
                let _ = next.send(&handle, finish);
            }
            Some(Topology::Star { links }) => {
                for link in links {
                    let _ = link.send(&handle, finish.clone());
                }
            }
            _ => {}
        }
    }

    fn release(&mut self) -> Result<(), EngineError> {
        let handle = self.handle.clone();
        if let Some(server) = self.server.take() {
            // A stage: its server ends once its upstream ended (front to back).
            return match server.join() {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(compute(e)),
                Err(_) => Err(compute("the stage thread panicked")),
            };
        }
        match self.topology.take() {
            Some(Topology::Ring { mut prev, next }) => {
                next.close(&handle);
                // The ends come back around the ring.
                drain_until_end(&handle, &mut prev)
            }
            Some(Topology::Star { mut links }) => {
                for link in &links {
                    link.close(&handle);
                }
                links
                    .iter_mut()
                    .try_for_each(|link| drain_until_end(&handle, link))
            }
            _ => Ok(()),
        }
    }
}

/// Reads a link to its end; anything but a clean end is an error.
fn drain_until_end(handle: &Handle, link: &mut Link) -> Result<(), EngineError> {
    loop {
        match link.recv(handle) {
            Ok(_) => {}
            Err(LinkEnd::Ended) => return Ok(()),
            Err(LinkEnd::Lost(detail)) => return Err(compute(detail)),
        }
    }
}

/// The loop of a rank > 0: serves its links until its upstream ends.
fn stage_server(
    shard: &Shard,
    handle: &Handle,
    topology: Topology,
    notify: &(dyn Fn(EngineNotice) + Send + Sync),
) -> Result<(), String> {
    match topology {
        Topology::Ring { prev, next } => pipeline_stage(shard, handle, prev, next, notify),
        Topology::Star { mut links } => match links.pop() {
            Some(link) => tensor_stage(shard, handle, link, notify),
            None => Ok(()),
        },
        Topology::Alone => Ok(()),
    }
}

fn pipeline_stage(
    shard: &Shard,
    handle: &Handle,
    mut prev: Link,
    next: Link,
    notify: &(dyn Fn(EngineNotice) + Send + Sync),
) -> Result<(), String> {
    let last = shard.spec().layers.end == shard.config().n_layers;
    let mut tasks: HashMap<String, (KvCache, Option<Sampler>)> = HashMap::new();
    loop {
        let msg = match prev.recv(handle) {
            Ok(msg) => msg,
            Err(LinkEnd::Ended) => {
                next.close(handle);
                return Ok(());
            }
            Err(LinkEnd::Lost(detail)) => return Err(detail),
        };
        let forwarded = match msg {
            LinkMsg::Activations {
                task_id,
                pos,
                sampling,
                sample,
                score,
                data,
            } => {
                notify(EngineNotice::StageStep);
                let entry = tasks
                    .entry(task_id.clone())
                    .or_insert_with(|| (shard.new_cache(), None));
                let want = if score.is_some() {
                    Logits::All
                } else {
                    Logits::Last
                };
                let result = tensor_from_bytes(&data.0).and_then(|hidden| {
                    shard.forward_logits(
                        StageInput::Hidden(hidden),
                        pos as usize,
                        &mut entry.0,
                        &mut NoAllReduce,
                        want,
                    )
                });
                match result {
                    Ok(StageOutput::Hidden(hidden)) if !last => match tensor_to_bytes(&hidden) {
                        Ok(bytes) => LinkMsg::Activations {
                            task_id,
                            pos,
                            sampling,
                            sample,
                            score,
                            data: Blob(bytes),
                        },
                        Err(e) => LinkMsg::Failed {
                            task_id,
                            cause: e.to_string(),
                        },
                    },
                    Ok(StageOutput::Logits(logits)) if last => {
                        let sampler = entry.1.get_or_insert_with(|| sampler_for(&sampling));
                        let answer =
                            split_scores(logits, score.as_ref()).and_then(|(logits, scores)| {
                                match sample {
                                    false => Ok(LinkMsg::Prefilled {
                                        task_id: task_id.clone(),
                                        scores,
                                    }),
                                    true => sampler.next(&logits).map(|sampled| LinkMsg::Token {
                                        task_id: task_id.clone(),
                                        token: sampled.id,
                                        logprobs: sampled.logprobs,
                                        scores,
                                    }),
                                }
                            });
                        answer.unwrap_or_else(|e| LinkMsg::Failed {
                            task_id,
                            cause: e.to_string(),
                        })
                    }
                    Ok(_) => LinkMsg::Failed {
                        task_id,
                        cause: "stage output does not match its place".into(),
                    },
                    Err(e) => LinkMsg::Failed {
                        task_id,
                        cause: format!("rank {}: {e}", shard.spec().tp_rank),
                    },
                }
            }
            LinkMsg::Finish { task_id } => {
                tasks.remove(&task_id);
                if last {
                    continue;
                }
                LinkMsg::Finish { task_id }
            }
            failed @ LinkMsg::Failed { .. } => failed,
            other => return Err(format!("unexpected message on a pipeline link: {other:?}")),
        };
        next.send(handle, forwarded).map_err(|e| e.to_string())?;
    }
}

fn tensor_stage(
    shard: &Shard,
    handle: &Handle,
    mut link: Link,
    notify: &(dyn Fn(EngineNotice) + Send + Sync),
) -> Result<(), String> {
    let mut caches: HashMap<String, KvCache> = HashMap::new();
    loop {
        match link.recv(handle) {
            Ok(LinkMsg::TpStep {
                task_id,
                pos,
                tokens,
            }) => {
                notify(EngineNotice::StageStep);
                let cache = caches.entry(task_id).or_insert_with(|| shard.new_cache());
                let mut reduce = StarAllReduce::Leaf {
                    handle,
                    link: &mut link,
                };
                shard
                    .forward(StageInput::Tokens(tokens), pos as usize, cache, &mut reduce)
                    .map_err(|e| e.to_string())?;
            }
            Ok(LinkMsg::Finish { task_id }) => {
                caches.remove(&task_id);
            }
            Ok(other) => return Err(format!("unexpected message on a tensor link: {other:?}")),
            Err(LinkEnd::Ended) => {
                link.close(handle);
                return Ok(());
            }
            Err(LinkEnd::Lost(detail)) => return Err(detail),
        }
    }
}
