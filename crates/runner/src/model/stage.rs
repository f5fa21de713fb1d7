//! The ranks > 0 of a model instance: each serves its links on a *stage
//! server* thread, one batched step per message, in the order rank 0 sent
//! them; and the all-reduce of tensor parallelism through rank 0.
//!
//! Invariants:
//! * A stage keeps one KV cache per task it has seen, until that task's
//!   `Finish`; a step's sequences use their own caches only, a new one
//!   starting empty or from the kept prefix its first step names
//!   (`crate::prefix`: each rank keeps and forgets what rank 0 says).
//! * A step the stage cannot compute becomes one `Failed` for the whole
//!   step, passed on to rank 0; the server keeps serving.
//! * A stage ends its outgoing link only once its upstream ended (front to
//!   back), so no stage sees `PeerLost` on a graceful path.

use std::collections::HashMap;

use candle_core::Tensor;
use engine::model::{AllReduce, BatchOutput, KvCache, Logits, SeqStep, Shard, StageInput};
use engine::sampler::Sampler;
use engine::wire::{tensor_from_bytes, tensor_to_bytes};
use engine::EngineError;
use ipc::Blob;
use tokio::runtime::Handle;

use super::clock::{timed, RankClock};
use super::{compute, sampler_for, split_scores, EngineNotice, Topology};
use crate::links::{Keep, Link, LinkEnd, LinkMsg, SeqDone, SeqMeta, SeqResult};
use crate::prefix::{PrefixStore, Reuse};

/// Tensor parallelism's sum through rank 0.
pub(super) enum StarAllReduce<'a> {
    Root {
        handle: &'a Handle,
        links: &'a mut [Link],
        clock: &'a mut RankClock,
    },
    Leaf {
        handle: &'a Handle,
        link: &'a mut Link,
        clock: &'a mut RankClock,
    },
}

impl AllReduce for StarAllReduce<'_> {
    fn all_reduce_sum(&mut self, partial: &Tensor) -> engine::Result<Tensor> {
        match self {
            StarAllReduce::Root {
                handle,
                links,
                clock,
            } => {
                clock.reduces += 1;
                let mut sum = partial.clone();
                for link in links.iter_mut() {
                    match timed(&mut clock.reduce_wait, || link.expect(handle))? {
                        LinkMsg::Partial { data } => {
                            sum = timed(&mut clock.reduce_codec, || {
                                tensor_from_bytes(&data.0).and_then(|p| Ok((sum + p)?))
                            })?
                        }
                        other => {
                            return Err(EngineError::Link(format!(
                                "expected a partial sum from rank {}, got {other:?}",
                                link.peer_rank
                            )))
                        }
                    }
                }
                let bytes = timed(&mut clock.reduce_codec, || tensor_to_bytes(&sum))?;
                clock.reduce_bytes += (bytes.len() * links.len()) as u64;
                for link in links.iter() {
                    timed(&mut clock.reduce_send, || {
                        link.send(
                            handle,
                            LinkMsg::Reduced {
                                data: Blob(bytes.clone()),
                            },
                        )
                    })?;
                }
                Ok(sum)
            }
            StarAllReduce::Leaf {
                handle,
                link,
                clock,
            } => {
                clock.reduces += 1;
                let bytes = timed(&mut clock.reduce_codec, || tensor_to_bytes(partial))?;
                clock.reduce_bytes += bytes.len() as u64;
                timed(&mut clock.reduce_send, || {
                    link.send(handle, LinkMsg::Partial { data: Blob(bytes) })
                })?;
                match timed(&mut clock.reduce_wait, || link.expect(handle))? {
                    LinkMsg::Reduced { data } => Ok(timed(&mut clock.reduce_codec, || {
                        tensor_from_bytes(&data.0)
                    })?),
                    other => Err(EngineError::Link(format!(
                        "expected the reduced sum from rank 0, got {other:?}"
                    ))),
                }
            }
        }
    }
}

/// Reads a link to its end; anything but a clean end is an error.
pub(super) fn drain_until_end(handle: &Handle, link: &mut Link) -> Result<(), EngineError> {
    loop {
        match link.recv(handle) {
            Ok(_) => {}
            Err(LinkEnd::Ended) => return Ok(()),
            Err(LinkEnd::Lost(detail)) => return Err(EngineError::Link(detail)),
        }
    }
}

/// The loop of a rank > 0: serves its links until its upstream ends.
pub(super) fn stage_server(
    shard: &Shard,
    handle: &Handle,
    topology: Topology,
    notify: &(dyn Fn(EngineNotice) + Send + Sync),
) -> Result<(), EngineError> {
    match topology {
        Topology::Ring { prev, next } => pipeline_stage(shard, handle, prev, next, notify),
        Topology::Star { mut links } => match links.pop() {
            Some(link) => tensor_stage(shard, handle, link, notify),
            None => Ok(()),
        },
        Topology::Alone => Ok(()),
    }
}

/// A pipeline stage's state for one task.
struct StageTask {
    cache: KvCache,
    /// The last stage's sampler, made from the task's first step.
    sampler: Option<Sampler>,
}

/// Takes the tasks of `ids` out of `tasks`, in order, so a step can borrow
/// all their caches at once. A new one gets an empty cache, or a copy of
/// the kept prefix its first step names; a prefix this rank does not hold
/// is an error (every rank keeps what rank 0 keeps).
fn take_tasks(
    shard: &Shard,
    tasks: &mut HashMap<String, StageTask>,
    store: &PrefixStore,
    ids: impl Iterator<Item = (String, Option<Reuse>)>,
) -> Result<Vec<(String, StageTask)>, String> {
    ids.map(|(id, reuse)| {
        let task = match (tasks.remove(&id), reuse) {
            (Some(task), _) => task,
            (None, None) => StageTask {
                cache: shard.new_cache(),
                sampler: None,
            },
            (None, Some(reuse)) => StageTask {
                cache: store.start(reuse)?,
                sampler: None,
            },
        };
        Ok((id, task))
    })
    .collect()
}

/// Applies rank 0's prefix message to this rank's store.
fn apply_prefix(
    store: &mut PrefixStore,
    tasks: &HashMap<String, StageTask>,
    keep: &Option<Keep>,
    forget: &[u64],
) {
    store.forget(forget);
    if let Some(keep) = keep {
        let kept = match tasks.get(&keep.task_id) {
            Some(task) => store.keep(keep.entry, keep.len, &task.cache),
            None => Err(format!("task {} is not on this rank", keep.task_id)),
        };
        if let Err(e) = kept {
            // A later task that names the entry fails with the cause.
            tracing::warn!(entry = keep.entry, error = %e, "cannot keep a prompt prefix");
        }
    }
}

fn pipeline_stage(
    shard: &Shard,
    handle: &Handle,
    mut prev: Link,
    next: Link,
    notify: &(dyn Fn(EngineNotice) + Send + Sync),
) -> Result<(), EngineError> {
    let last = shard.spec().layers.end == shard.config().n_layers;
    let mut tasks: HashMap<String, StageTask> = HashMap::new();
    let mut store = PrefixStore::default();
    let mut clock = RankClock::default();
    loop {
        let msg = match timed(&mut clock.link_wait, || prev.recv(handle)) {
            Ok(msg) => msg,
            Err(LinkEnd::Ended) => {
                next.close(handle);
                clock.log(prev.peer_rank + 1, &shard.spec().layers);
                return Ok(());
            }
            Err(LinkEnd::Lost(detail)) => return Err(EngineError::Link(detail)),
        };
        let forwarded = match msg {
            LinkMsg::Activations { seqs, data } => {
                notify(EngineNotice::StageStep);
                let ids = seqs.iter().map(|m| (m.task_id.clone(), m.reuse));
                match take_tasks(shard, &mut tasks, &store, ids) {
                    Ok(mut taken) => {
                        let answer =
                            pipeline_step(shard, last, &seqs, data, &mut taken, &mut clock);
                        tasks.extend(taken);
                        answer
                    }
                    Err(cause) => LinkMsg::Failed {
                        cause: format!(
                            "the stage with layers {}..{}: {cause}",
                            shard.spec().layers.start,
                            shard.spec().layers.end
                        ),
                    },
                }
            }
            LinkMsg::Prefix { keep, forget } => {
                apply_prefix(&mut store, &tasks, &keep, &forget);
                if last {
                    continue;
                }
                LinkMsg::Prefix { keep, forget }
            }
            LinkMsg::Finish { task_id } => {
                tasks.remove(&task_id);
                if last {
                    continue;
                }
                LinkMsg::Finish { task_id }
            }
            failed @ LinkMsg::Failed { .. } => failed,
            other => {
                return Err(EngineError::Link(format!(
                    "unexpected message on a pipeline link: {other:?}"
                )))
            }
        };
        timed(&mut clock.link_send, || next.send(handle, forwarded))?;
    }
}

/// One batched step of a pipeline stage: the activations for the next
/// stage, or (the last stage) each sequence's result.
fn pipeline_step(
    shard: &Shard,
    last: bool,
    seqs: &[SeqMeta],
    data: Blob,
    taken: &mut [(String, StageTask)],
    clock: &mut RankClock,
) -> LinkMsg {
    clock.steps += 1;
    let layers = &shard.spec().layers;
    let failed = |e: &dyn std::fmt::Display| LinkMsg::Failed {
        cause: format!(
            "the stage with layers {}..{}: {e}",
            layers.start, layers.end
        ),
    };
    let mut steps: Vec<SeqStep<'_>> = taken
        .iter_mut()
        .zip(seqs)
        .map(|((_, t), m)| SeqStep {
            cache: &mut t.cache,
            len: m.len as usize,
            logits: if m.score.is_some() {
                Logits::All
            } else {
                Logits::Last
            },
        })
        .collect();
    let result = timed(&mut clock.link_codec, || tensor_from_bytes(&data.0)).and_then(|hidden| {
        timed(&mut clock.forward, || {
            shard.forward_batch(
                StageInput::Hidden(hidden),
                &mut steps,
                &mut engine::model::NoAllReduce,
            )
        })
    });
    drop(steps);
    match result {
        Ok(BatchOutput::Hidden(hidden)) if !last => {
            match timed(&mut clock.link_codec, || tensor_to_bytes(&hidden)) {
                Ok(bytes) => LinkMsg::Activations {
                    seqs: seqs.to_vec(),
                    data: Blob(bytes),
                },
                Err(e) => failed(&e),
            }
        }
        Ok(BatchOutput::Logits(logits)) if last => {
            let results = logits
                .into_iter()
                .zip(seqs)
                .zip(taken.iter_mut())
                .map(|((logits, m), (_, t))| {
                    let sampler = t.sampler.get_or_insert_with(|| sampler_for(&m.sampling));
                    let outcome =
                        split_scores(logits, m.score.as_ref()).and_then(|(logits, scores)| match m
                            .sample
                        {
                            false => Ok(SeqDone::Prefilled { scores }),
                            true => sampler.next(&logits).map(|sampled| SeqDone::Token {
                                token: sampled.id,
                                logprobs: sampled.logprobs,
                                scores,
                            }),
                        });
                    SeqResult {
                        task_id: m.task_id.clone(),
                        outcome: outcome.map_err(|e| e.to_string()),
                    }
                })
                .collect();
            LinkMsg::Results { results }
        }
        Ok(_) => failed(&"its output does not match its place in the pipeline"),
        Err(e) => failed(&e),
    }
}

fn tensor_stage(
    shard: &Shard,
    handle: &Handle,
    mut link: Link,
    notify: &(dyn Fn(EngineNotice) + Send + Sync),
) -> Result<(), EngineError> {
    let mut tasks: HashMap<String, StageTask> = HashMap::new();
    let mut store = PrefixStore::default();
    let mut clock = RankClock::default();
    loop {
        match timed(&mut clock.link_wait, || link.recv(handle)) {
            Ok(LinkMsg::TpStep { seqs, tokens }) => {
                clock.steps += 1;
                notify(EngineNotice::StageStep);
                let ids = seqs.iter().map(|s| (s.task_id.clone(), s.reuse));
                // Rank 0 would wait for this rank's partials: it cannot go
                // on without the prefix.
                let mut taken = take_tasks(shard, &mut tasks, &store, ids).map_err(compute)?;
                let mut steps: Vec<SeqStep<'_>> = taken
                    .iter_mut()
                    .zip(&seqs)
                    .map(|((_, t), s)| SeqStep {
                        cache: &mut t.cache,
                        len: s.len as usize,
                        logits: Logits::Last,
                    })
                    .collect();
                let mut reduce = StarAllReduce::Leaf {
                    handle,
                    link: &mut link,
                    clock: &mut clock,
                };
                // A rank that cannot take part in the sums cannot go on:
                // rank 0 would wait for its partials.
                let started = std::time::Instant::now();
                shard.forward_batch(StageInput::Tokens(tokens), &mut steps, &mut reduce)?;
                clock.forward += started.elapsed();
                drop(steps);
                tasks.extend(taken);
            }
            Ok(LinkMsg::Finish { task_id }) => {
                tasks.remove(&task_id);
            }
            Ok(LinkMsg::Prefix { keep, forget }) => {
                apply_prefix(&mut store, &tasks, &keep, &forget);
            }
            Ok(other) => {
                return Err(EngineError::Link(format!(
                    "unexpected message on a tensor link: {other:?}"
                )))
            }
            Err(LinkEnd::Ended) => {
                link.close(handle);
                clock.log(shard.spec().tp_rank as u32, &shard.spec().layers);
                return Ok(());
            }
            Err(LinkEnd::Lost(detail)) => return Err(EngineError::Link(detail)),
        }
    }
}
