//! The model engine: a shard of a llama-family model (crate `engine`) behind
//! the runner's [`Engine`] trait, with the data plane of [`crate::links`].
//!
//! Rank 0 owns every task: it renders the chat template, tokenizes, runs its
//! shard and drives the others; it alone talks to the node about tasks.
//! Other ranks are driven over their links by a *stage server* thread,
//! started after warm-up ([`stage`]).
//!
//! Tasks step in batches ([`step`]): one forward pass takes the next tokens
//! of every task in the batch (a decoded token, or a chunk of a prompt),
//! so each weight matrix is read once per step for all of them.
//!
//! * pipeline (ring): stage i runs its layers on the batch's activations
//!   from stage i−1 and passes them on; the last stage samples each
//!   sequence and sends the results back to rank 0. With S stages, S
//!   batches are in flight around the ring (`Engine::lanes`), so every
//!   stage computes at once; they land in the order sent, which is the
//!   order of messages on every link.
//! * tensor (star): rank 0 sends each step's tokens to every rank; all run
//!   every layer on their slice and sum the whole batch's partials through
//!   rank 0.
//!
//! A prompt longer than its chunk is fed one chunk per step: every chunk
//! but the last only advances the KV caches (a pipeline's last stage
//! answers `Prefilled`), the last one samples. Each chunk is reported to
//! the node as progress. The chunk is the instance's `prefill_chunk`, or
//! else adapts to aim each step at a couple of seconds of compute; beside
//! decoding sequences a step takes only the prompt tokens that keep it
//! within a couple of decode steps ([`crate::prefill`]).
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

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use engine::chat::{ChatMessage, ChatTemplate, RenderOptions};
use engine::loader::{load_shard, WeightFormat};
use engine::model::{KvCache, NoAllReduce, Shard, ShardSpec, StageInput};
use engine::sampler::{score_rows, Sampled, Sampler, SamplingParams, Scored};
use engine::tokenizer::Tokenizer;
use engine::EngineError;
use ipc::proto::{InvalidTask, PromptReport, Sampling, TaskInput, TaskRequest, TokenLogprob};
use ipc::Blob;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::runtime::Handle;

use crate::engine::{Engine, StartError, Step};
use crate::kv_budget::{self, Fit, KvBudget};
use crate::links::{self, Link, LinkMsg, ScoreTargets};
use crate::prefix::{PrefixIndex, PrefixStore, Reuse};

mod clock;
mod stage;
mod step;

use stage::{drain_until_end, stage_server};

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
    /// Tasks one batched step takes at most (default
    /// [`DEFAULT_MAX_BATCH`]).
    #[serde(default)]
    pub max_batch: Option<u32>,
    /// Tokens one batched step takes at most, decoded and prompt tokens
    /// together (default [`DEFAULT_PREFILL_CHUNK`]).
    #[serde(default)]
    pub max_step_tokens: Option<u32>,
    /// Memory for kept prompt prefixes, all ranks together, in MiB
    /// (default [`DEFAULT_PREFIX_CACHE_MB`]; 0: no prefix reuse).
    #[serde(default)]
    pub prefix_cache_mb: Option<u32>,
    /// Memory the running tasks' keys and values may take, all ranks
    /// together, in MiB (default: [`crate::kv_budget::default_positions`]
    /// of the memory available at load).
    #[serde(default)]
    pub kv_cache_mb: Option<u32>,
}

/// Memory kept prompt prefixes take at most when the instance names no
/// bound: SmolLM2-135M keeps ~5,800 positions in it, a Llama-3-8B ~2,000.
pub const DEFAULT_PREFIX_CACHE_MB: u32 = 256;

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

/// Tasks one batched step takes at most when the instance names no limit;
/// more wait for their turn (the engine thread rotates them).
pub const DEFAULT_MAX_BATCH: u32 = 16;

/// What the engine tells the runner from outside a task.
pub enum EngineNotice {
    /// A stage processed a step (the `running` phase of a rank > 0).
    StageStep,
    /// The stage server failed for good.
    Fatal(EngineError),
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
    server: Option<std::thread::JoinHandle<Result<(), EngineError>>>,
    /// Tells the runner what the stage server does.
    notify: Arc<dyn Fn(EngineNotice) + Send + Sync>,
    /// How many prompt tokens a step takes beside decoding sequences.
    budget: crate::prefill::StepBudget,
    /// The steps launched and not yet landed, oldest first.
    in_flight: std::collections::VecDeque<step::InFlight>,
    /// Rank 0's index of kept prompt prefixes (`None`: no prefix reuse).
    prefix: Option<PrefixIndex>,
    /// Rank 0's own KV of the kept prefixes.
    store: PrefixStore,
    /// Rank 0's KV budget of the running tasks (set at load).
    kv: Option<KvBudget>,
    /// Where rank 0's time goes (logged at release).
    clock: clock::RankClock,
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
    /// Its part of the step in flight.
    flight: Option<step::Flight>,
    /// The kept prefix it started from, until its first step names it to
    /// the other ranks (the entry is pinned until then).
    reuse: Option<Reuse>,
    /// The prompt's whole blocks, to keep once the prompt is in (empty:
    /// nothing to keep).
    keep: Vec<u32>,
    /// Prompt positions taken from a kept prefix (`None`: no prefix reuse).
    cached: Option<u32>,
    /// Positions it holds of the KV budget: its prompt and completion bound.
    reserved: usize,
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
        let args_max_step_tokens = args.max_step_tokens.unwrap_or(DEFAULT_PREFILL_CHUNK).max(1);
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
            budget: crate::prefill::StepBudget::new(args_max_step_tokens as usize),
            in_flight: Default::default(),
            notify,
            prefix: None,
            store: PrefixStore::default(),
            kv: None,
            clock: clock::RankClock::default(),
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
            // Budgets in positions of the whole model's keys and values.
            let per_position =
                kv_budget::bytes_per_position(config.n_layers, config.n_kv_heads, config.head_dim);
            let mb = self.args.prefix_cache_mb.unwrap_or(DEFAULT_PREFIX_CACHE_MB);
            let positions = kv_budget::positions_in_mb(u64::from(mb), per_position);
            self.prefix = (positions > 0).then(|| PrefixIndex::new(positions));
            let (capacity, from) = match self.args.kv_cache_mb {
                Some(mb) => (
                    kv_budget::positions_in_mb(u64::from(mb), per_position),
                    "kv_cache_mb",
                ),
                None => {
                    let available = kv_budget::mem_available().unwrap_or(0);
                    (
                        kv_budget::default_positions(available, per_position),
                        "available memory",
                    )
                }
            };
            tracing::info!(
                positions = capacity,
                mib = (capacity * per_position) >> 20,
                from,
                "KV budget"
            );
            self.kv = Some(KvBudget::new(capacity));
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
                    if let Err(e) = &result {
                        notify(EngineNotice::Fatal(e.clone()));
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
        let shard = self.shard()?.clone();
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
        let reserved = ids.len() + max_tokens as usize;
        if let Some(kv) = self.kv.as_mut() {
            match kv.reserve(reserved) {
                Fit::Now => {}
                Fit::Later => return Err(StartError::NoRoom),
                Fit::Never => {
                    return Err(StartError::Invalid(
                        InvalidTask::ContextLengthExceeded,
                        format!(
                            "the prompt ({} tokens) and max_tokens ({max_tokens}) need {reserved} positions of KV cache, and this instance holds at most {} for all its tasks together: lower max_tokens, shorten the prompt, or create the instance with a larger kv_cache_mb",
                            ids.len(),
                            kv.capacity(),
                        ),
                    ))
                }
            }
        }
        let prompt_tokens = ids.len() as u32;
        // A task that reports its prompt needs every position's logits: it
        // neither reuses nor keeps a prefix.
        let (cache, reuse, keep) = match self.prefix.as_mut() {
            Some(index) if request.report_prompt.is_none() => {
                let keep = ids[..crate::prefix::keepable(ids.len())].to_vec();
                match index.lookup(&ids) {
                    Some(reuse) => match self.store.start(reuse) {
                        Ok(cache) => (cache, Some(reuse), keep),
                        Err(e) => {
                            index.unpin(reuse.0);
                            tracing::warn!(task = %request.task_id, error = %e, "kept prefix unusable: computing the prompt");
                            (shard.new_cache(), None, keep)
                        }
                    },
                    None => (shard.new_cache(), None, keep),
                }
            }
            _ => (shard.new_cache(), None, Vec::new()),
        };
        let cached = reuse.map(|r| r.1);
        let from = cached.unwrap_or(0) as usize;
        // Nothing new to keep when the whole of it was reused.
        let keep = if keep.len() > from { keep } else { Vec::new() };
        let cached = self
            .prefix
            .as_ref()
            .filter(|_| request.report_prompt.is_none())
            .map(|_| cached.unwrap_or(0));
        tracing::debug!(task = %request.task_id, prompt_tokens, cached = from, "prompt tokenized");
        let pending = ids[from..].to_vec();
        let task = ModelTask {
            task_id: request.task_id.clone(),
            // Kept only for the report (pending drains as prefill goes).
            prompt: match request.report_prompt {
                Some(_) => ids.clone(),
                None => Vec::new(),
            },
            pending,
            prompt_total: prompt_tokens,
            report: request.report_prompt,
            scores: Vec::new(),
            ahead: None,
            held_logprobs: Vec::new(),
            chunk: self.chunk_ceiling(request.report_prompt.is_some()),
            pos: from,
            cache,
            sampler: sampler_for(&request.sampling),
            sampling: request.sampling.clone(),
            produced: 0,
            max_tokens,
            stop: request.stop.clone(),
            generated: Vec::new(),
            emitted: 0,
            finish: None,
            flight: None,
            reuse,
            keep,
            cached,
            reserved,
        };
        Ok((task, prompt_tokens))
    }

    fn step(&mut self, task: &mut ModelTask) -> Result<Step, EngineError> {
        let mut batch = [task];
        self.launch_batch(&mut batch);
        self.land_batch(&mut batch)
            .pop()
            .unwrap_or_else(|| Err(compute("a batch of one landed nothing")))
    }

    fn max_batch(&self) -> usize {
        self.args.max_batch.unwrap_or(DEFAULT_MAX_BATCH).max(1) as usize
    }

    fn lanes(&self) -> usize {
        // A pipeline keeps one step in flight per stage, so that every
        // stage computes at once.
        match &self.topology {
            Some(Topology::Ring { .. }) => self.world as usize,
            _ => 1,
        }
    }

    fn launch(&mut self, batch: &mut [&mut ModelTask]) -> Result<(), EngineError> {
        self.launch_batch(batch);
        Ok(())
    }

    fn land(&mut self, batch: &mut [&mut ModelTask]) -> Vec<Result<Step, EngineError>> {
        self.land_batch(batch)
    }

    fn cached_tokens(&self, task: &ModelTask) -> Option<u32> {
        task.cached
    }

    fn end_task(&mut self, task: ModelTask) {
        if let Some(kv) = self.kv.as_mut() {
            kv.release(task.reserved);
        }
        if let (Some((entry, _)), Some(index)) = (task.reuse, self.prefix.as_mut()) {
            // It ended before its first step: the entry is free to go.
            index.unpin(entry);
        }
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
        if self.server.is_none() {
            if let Some(shard) = &self.shard {
                self.clock.log(self.rank, &shard.spec().layers);
            }
        }
        if let Some(server) = self.server.take() {
            // A stage: its server ends once its upstream ended (front to back).
            return match server.join() {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e),
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
