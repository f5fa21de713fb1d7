//! Rank 0's batched step: what each task of a batch needs (a plan), one
//! forward pass of all their tokens together, and what each made of it.
//!
//! Invariants:
//! * A task's step is decided without a forward pass when it can be (a
//!   finish, a prompt report, the token sampled with the prompt's last
//!   chunk); otherwise it takes its next prompt chunk or its last token.
//! * A step's prompt tokens are bounded by the step budget
//!   (`prefill::StepBudget`, measured on rank 0's own part of each step,
//!   which no other lane's work inflates) beside the sequences that decode
//!   in it and in the other lanes, and each prompt by its own chunk; every
//!   task in the batch moves on. Cuts between a prompt's steps fall on
//!   whole attention blocks (unless the instance names a `prefill_chunk`
//!   that is not), so its answer does not depend on what else was running.
//! * A forward that fails fails the tasks that took part in it, with its
//!   cause; tasks decided without it keep their results. A sampler that
//!   fails fails its own task only.
//! * Pipeline: `launch` runs rank 0's layers and sends the step on; `land`
//!   reads the results of the oldest step in flight. Steps land in launch
//!   order, which is the order of every link.

use std::time::Instant;

use engine::model::{BatchOutput, Logits, NoAllReduce, SeqStep, StageInput};
use engine::sampler::{Sampled, Scored};
use engine::wire::tensor_to_bytes;
use engine::EngineError;
use ipc::proto::PromptReport;
use ipc::Blob;

use super::clock::timed;
use super::stage::StarAllReduce;
use super::{compute, split_scores, ModelEngine, ModelTask, Topology};
use crate::engine::Step;
use crate::links::{Keep, LinkMsg, ScoreTargets, SeqDone, SeqMeta, TpSeq};

/// What a forward pass gave one task: the token sampled (when it was to
/// sample) and the scores of its chunk.
type Outcome = Result<(Option<Sampled>, Vec<Scored>), EngineError>;

/// A task's part of a step in flight.
pub(super) enum Flight {
    /// Decided without a forward pass.
    Ready(Result<Step, EngineError>),
    /// In the forward pass: `n` tokens at positions `pos..`.
    Forward {
        pos: usize,
        n: usize,
        /// The chunk took the rest of the prompt (or is a decoded token).
        last: bool,
        sample: bool,
        score: Option<ScoreTargets>,
        /// Set once known: the token sampled (when `sample`) and the
        /// chunk's scores.
        outcome: Option<Outcome>,
    },
}

/// A step in flight, for the budget's measurements.
pub(super) struct InFlight {
    started: Instant,
    /// Rank 0's own part of the step: its forward pass (and, alone or
    /// tensor parallel, the sampling).
    forward: std::time::Duration,
    decoding: usize,
    prefill: usize,
}

fn forward_outcome(task: &mut ModelTask) -> Option<&mut Option<Outcome>> {
    match &mut task.flight {
        Some(Flight::Forward { outcome, .. }) => Some(outcome),
        _ => None,
    }
}

impl ModelEngine {
    /// What `task` does this step if it needs no forward pass.
    fn ready_step(&self, task: &mut ModelTask) -> Option<Result<Step, EngineError>> {
        if let Some(reason) = task.finish.clone() {
            return Some(Ok(Step::Finished {
                finish_reason: reason,
                completion_tokens: task.produced,
            }));
        }
        // The prompt's tokens alone need no forward pass.
        if task.report == Some(PromptReport::Tokens) {
            return Some(self.prompt_step(task));
        }
        if let Some(sampled) = task.ahead.take() {
            return Some(self.take_token(task, sampled));
        }
        // A prompt to score is prefilled even when nothing is to be
        // generated (`echo` with `max_tokens` 0).
        if task.produced >= task.max_tokens && task.report.is_none() {
            return Some(self.finish(task, "length"));
        }
        None
    }

    /// Plans every task's part of the step and runs rank 0's forward pass
    /// (and, alone or tensor parallel, the sampling too).
    pub(super) fn launch_batch(&mut self, batch: &mut [&mut ModelTask]) {
        let started = Instant::now();
        let mut decoding = 0;
        for task in batch.iter_mut() {
            task.flight = self.ready_step(task).map(Flight::Ready);
            if task.flight.is_none() && task.pos >= task.prompt_total as usize {
                decoding += 1;
            }
        }
        // Sequences decoding in the steps still in flight wait behind this
        // one too (a pipeline's other lanes).
        let decoding_elsewhere: usize = self.in_flight.iter().map(|f| f.decoding).sum();
        let mut room = self.budget.prefill_tokens(decoding + decoding_elsewhere);
        let mut prefill = 0;
        for task in batch.iter_mut().filter(|t| t.flight.is_none()) {
            let prefilling = task.pos < task.prompt_total as usize;
            let n = if prefilling {
                // Whole attention blocks of the room, one block once it is
                // spent: cuts stay on block boundaries.
                let take = crate::prefill::whole_blocks(room);
                let n = task.pending.len().min(task.chunk).min(take);
                room = room.saturating_sub(n);
                prefill += n;
                n
            } else {
                task.pending.len()
            };
            let last = n == task.pending.len();
            let pos = task.pos;
            // While the prompt is scored: the prompt tokens that follow
            // this chunk's positions.
            let score = match task.report {
                Some(PromptReport::Logprobs(top)) => {
                    let len = task.prompt.len();
                    let targets = task.prompt[(pos + 1).min(len)..(pos + n + 1).min(len)].to_vec();
                    Some(ScoreTargets { top, targets })
                }
                _ => None,
            };
            task.flight = Some(Flight::Forward {
                pos,
                n,
                last,
                sample: last && task.produced < task.max_tokens,
                score,
                outcome: None,
            });
        }
        let forward_started = Instant::now();
        let forwarded = self.forward_batch(batch);
        self.in_flight.push_back(InFlight {
            started,
            forward: forward_started.elapsed(),
            decoding,
            prefill,
        });
        if let Err(e) = forwarded {
            // The error as it is: a broken link stays a link error.
            for task in batch.iter_mut() {
                if let Some(outcome) = forward_outcome(task) {
                    if outcome.is_none() {
                        *outcome = Some(Err(e.clone()));
                    }
                }
            }
        }
    }

    /// Rank 0's forward pass over the tasks planned `Forward`; alone or
    /// tensor parallel it also samples, in a pipeline it sends the step on.
    fn forward_batch(&mut self, batch: &mut [&mut ModelTask]) -> Result<(), EngineError> {
        let mut tokens = Vec::new();
        let mut metas = Vec::new();
        // Kept prefixes that sequences start from in this step: pinned
        // until the step went out to every rank.
        let mut reused = Vec::new();
        for task in batch.iter_mut() {
            if let Some(Flight::Forward {
                pos,
                n,
                sample,
                score,
                ..
            }) = &task.flight
            {
                tokens.extend(task.pending.drain(..*n));
                let reuse = task.reuse.take();
                reused.extend(reuse.map(|(entry, _)| entry));
                metas.push(SeqMeta {
                    task_id: task.task_id.clone(),
                    pos: *pos as u32,
                    len: *n as u32,
                    reuse,
                    sampling: task.sampling.clone(),
                    sample: *sample,
                    score: score.clone(),
                });
            }
        }
        let result = self.forward_planned(batch, tokens, metas);
        if let Some(index) = self.prefix.as_mut() {
            for entry in reused {
                index.unpin(entry);
            }
        }
        result
    }

    /// [`ModelEngine::forward_batch`] once the step's tokens and sequences
    /// are known.
    fn forward_planned(
        &mut self,
        batch: &mut [&mut ModelTask],
        tokens: Vec<u32>,
        metas: Vec<SeqMeta>,
    ) -> Result<(), EngineError> {
        let shard = self.shard()?.clone();
        let handle = self.handle.clone();
        if metas.is_empty() {
            return Ok(());
        }
        let mut steps: Vec<SeqStep<'_>> = batch
            .iter_mut()
            .filter_map(|task| match &task.flight {
                Some(Flight::Forward { n, score, .. }) => Some(SeqStep {
                    len: *n,
                    logits: if score.is_some() {
                        Logits::All
                    } else {
                        Logits::Last
                    },
                    cache: &mut task.cache,
                }),
                _ => None,
            })
            .collect();
        let clock = &mut self.clock;
        clock.steps += 1;
        let output = match self.topology.as_mut() {
            Some(Topology::Alone) | None => timed(&mut clock.forward, || {
                shard.forward_batch(StageInput::Tokens(tokens), &mut steps, &mut NoAllReduce)
            })?,
            Some(Topology::Star { links }) => {
                let seqs: Vec<TpSeq> = metas
                    .iter()
                    .map(|m| TpSeq {
                        task_id: m.task_id.clone(),
                        pos: m.pos,
                        len: m.len,
                        reuse: m.reuse,
                    })
                    .collect();
                for link in links.iter() {
                    timed(&mut clock.link_send, || {
                        link.send(
                            &handle,
                            LinkMsg::TpStep {
                                seqs: seqs.clone(),
                                tokens: tokens.clone(),
                            },
                        )
                    })?;
                }
                let started = Instant::now();
                let mut reduce = StarAllReduce::Root {
                    handle: &handle,
                    links,
                    clock: &mut *clock,
                };
                let output =
                    shard.forward_batch(StageInput::Tokens(tokens), &mut steps, &mut reduce)?;
                clock.forward += started.elapsed();
                output
            }
            Some(Topology::Ring { next, .. }) => {
                let input = StageInput::Tokens(tokens);
                let output = timed(&mut clock.forward, || {
                    shard.forward_batch(input, &mut steps, &mut NoAllReduce)
                })?;
                let hidden = match output {
                    BatchOutput::Hidden(h) => h,
                    BatchOutput::Logits(_) => {
                        return Err(compute("the first stage of a pipeline produced logits"))
                    }
                };
                drop(steps);
                for task in batch.iter_mut() {
                    if let Some(Flight::Forward { n, .. }) = &task.flight {
                        task.pos += n;
                    }
                }
                let data = Blob(timed(&mut clock.link_codec, || tensor_to_bytes(&hidden))?);
                timed(&mut clock.link_send, || {
                    next.send(&handle, LinkMsg::Activations { seqs: metas, data })
                })?;
                return Ok(());
            }
        };
        drop(steps);
        let BatchOutput::Logits(logits) = output else {
            return Err(compute(
                "a shard that ends the model produced hidden states",
            ));
        };
        let mut logits = logits.into_iter();
        for task in batch.iter_mut() {
            let Some(Flight::Forward {
                n,
                sample,
                score,
                outcome,
                ..
            }) = &mut task.flight
            else {
                continue;
            };
            task.pos += *n;
            let l = logits
                .next()
                .ok_or_else(|| compute("the batch gave fewer logits than sequences"))?;
            let result = split_scores(l, score.as_ref()).and_then(|(l, scores)| {
                let sampled = sample.then(|| task.sampler.next(&l)).transpose()?;
                Ok((sampled, scores))
            });
            *outcome = Some(result);
        }
        Ok(())
    }

    /// Completes the oldest step in flight: reads a pipeline's results,
    /// then turns every task's part into its `Step`.
    pub(super) fn land_batch(
        &mut self,
        batch: &mut [&mut ModelTask],
    ) -> Vec<Result<Step, EngineError>> {
        if batch
            .iter_mut()
            .any(|t| forward_outcome(t).is_some_and(|o| o.is_none()))
        {
            self.receive_results(batch);
        }
        if let Some(step) = self.in_flight.pop_front() {
            // The budget measures rank 0's own part of each step: from
            // launch to land a pipeline's step also waits for the other
            // lanes at every stage, so a lane's prefill would count as the
            // decode cost of the others and grow their prefill share in
            // turn (a long prompt then froze the streams for seconds).
            self.budget
                .observe(step.decoding, step.prefill, step.forward);
            let took = step.started.elapsed();
            if self.args.prefill_chunk.is_none() {
                for task in batch.iter_mut() {
                    if let Some(Flight::Forward { n, last: false, .. }) = &task.flight {
                        let ceiling = self.chunk_ceiling(task.report.is_some());
                        task.chunk = crate::prefill::next_chunk(*n, took, ceiling);
                    }
                }
            }
        }
        let results: Vec<Result<Step, EngineError>> = batch
            .iter_mut()
            .map(|task| self.finish_step(task))
            .collect();
        for (task, result) in batch.iter_mut().zip(&results) {
            if result.is_ok() && !task.keep.is_empty() && task.pos >= task.prompt_total as usize {
                self.keep_prefix(task);
            }
        }
        results
    }

    /// A task's prompt is in, on every rank: keep its whole blocks for the
    /// prompts that start the same way (`crate::prefix`), here and, by
    /// `LinkMsg::Prefix`, on every other rank.
    fn keep_prefix(&mut self, task: &mut ModelTask) {
        let tokens = std::mem::take(&mut task.keep);
        let Some(index) = self.prefix.as_mut() else {
            return;
        };
        let (entry, forget) = index.insert(&tokens);
        self.store.forget(&forget);
        let keep = entry.and_then(|entry| {
            let len = tokens.len() as u32;
            match self.store.keep(entry, len, &task.cache) {
                Ok(()) => Some(Keep {
                    task_id: task.task_id.clone(),
                    entry,
                    len,
                }),
                Err(e) => {
                    index.remove(entry);
                    tracing::warn!(task = %task.task_id, error = %e, "cannot keep a prompt prefix");
                    None
                }
            }
        });
        if keep.is_none() && forget.is_empty() {
            return;
        }
        tracing::debug!(task = %task.task_id, kept = ?keep.as_ref().map(|k| (k.entry, k.len)), ?forget, entries = index.len(), positions = index.used(), "prefix cache");
        let msg = LinkMsg::Prefix { keep, forget };
        let handle = self.handle.clone();
        let sent = match self.topology.as_ref() {
            Some(Topology::Ring { next, .. }) => next.send(&handle, msg),
            Some(Topology::Star { links }) => links
                .iter()
                .try_for_each(|link| link.send(&handle, msg.clone())),
            _ => Ok(()),
        };
        if let Err(e) = sent {
            // The next step on the same link fails the same way, and says so.
            tracing::debug!(error = %e, "prefix message not sent");
        }
    }

    /// A pipeline's answer for the step in flight, into each task's
    /// outcome.
    fn receive_results(&mut self, batch: &mut [&mut ModelTask]) {
        let handle = self.handle.clone();
        let msg = match self.topology.as_mut() {
            Some(Topology::Ring { prev, .. }) => {
                timed(&mut self.clock.link_wait, || prev.expect(&handle))
            }
            _ => Err(compute("a step is in flight without a pipeline")),
        };
        let mut results = match msg {
            Ok(LinkMsg::Results { results }) => Ok(results.into_iter()),
            Ok(LinkMsg::Failed { cause }) => Err(compute(cause)),
            Ok(other) => Err(EngineError::Link(format!(
                "unexpected message on the token link: {other:?}"
            ))),
            Err(e) => Err(e),
        };
        for task in batch.iter_mut() {
            let task_id = task.task_id.clone();
            let Some(outcome) = forward_outcome(task) else {
                continue;
            };
            if outcome.is_some() {
                continue;
            }
            let result = match &mut results {
                Err(e) => Err(e.clone()),
                Ok(results) => match results.next() {
                    Some(r) if r.task_id == task_id => match r.outcome {
                        Ok(SeqDone::Token {
                            token,
                            logprobs,
                            scores,
                        }) => Ok((
                            Some(Sampled {
                                id: token,
                                logprobs,
                            }),
                            scores,
                        )),
                        Ok(SeqDone::Prefilled { scores }) => Ok((None, scores)),
                        Err(cause) => Err(compute(cause)),
                    },
                    Some(r) => Err(compute(format!(
                        "the pipeline answered for task {} where {task_id} was due",
                        r.task_id
                    ))),
                    None => Err(compute(format!(
                        "the pipeline's answer left out task {task_id}"
                    ))),
                },
            };
            *outcome = Some(result);
        }
    }

    /// What a task's part of the step made: its `Step`.
    fn finish_step(&self, task: &mut ModelTask) -> Result<Step, EngineError> {
        match task.flight.take() {
            None => Err(compute("a task landed that was not launched")),
            Some(Flight::Ready(step)) => step,
            Some(Flight::Forward { last, outcome, .. }) => {
                let (sampled, scores) =
                    outcome.unwrap_or_else(|| Err(compute("a step landed without its outcome")))?;
                task.scores.extend(scores);
                if !last {
                    // Until the prompt is in, the position is what was
                    // prefilled.
                    return Ok(Step::Prefilled {
                        done: task.pos as u32,
                        total: task.prompt_total,
                    });
                }
                if task.report.is_some() {
                    task.ahead = sampled;
                    return self.prompt_step(task);
                }
                let sampled =
                    sampled.ok_or_else(|| compute("a sampling step produced no token"))?;
                self.take_token(task, sampled)
            }
        }
    }

    /// A sampled token: the end of the turn, or text for the client.
    fn take_token(&self, task: &mut ModelTask, sampled: Sampled) -> Result<Step, EngineError> {
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
}
