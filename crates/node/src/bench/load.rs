//! `shardvisor bench load`: many streaming clients at once on one instance
//! of an embedded node with real runner processes.
//!
//! For each layout (with its threads per runner) and each client count N:
//! N clients submit at once, each a fixed prompt of its own and the same
//! number of tokens; the table gives the aggregate rate (every client's
//! tokens over the round's wall time, prefills included), the decode rate
//! (each stream's tokens after its first over the time from its first to
//! its last, summed over the streams), time to first token and inter-token
//! latency (p50, p99 over every gap of every client). A second
//! table: the p99 inter-token latency of running streams while a long
//! prompt is admitted, against the same streams' before it (chunked
//! prefill). A third: a conversation's first turn under a long system
//! prompt, then its second, which starts from the first's kept prefix
//! (prefix reuse): their times to first token.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use engine::loader::WeightFormat;
use ipc::ShutdownMode;
use supervisor::instance::{InstanceHandle, TaskEvent, TaskSubmit};

use super::{chat_submit, instance_request, parse_layout, stats, BENCH_PROMPT};
use crate::node::{CreateInstance, Node};

pub struct LoadBench {
    pub path: String,
    /// `layout:threads`, e.g. `pipeline-2:1` or `pipeline-2:1@19`.
    pub layouts: Vec<String>,
    pub weights: WeightFormat,
    pub clients: Vec<usize>,
    pub max_tokens: u32,
    /// Tokens of the long prompt of the prefill table (0: no table).
    pub long_prompt: usize,
    /// Clients of the profile table's round (0: no table).
    pub profile_clients: usize,
}

/// When one client's tokens came.
pub(super) struct Stream {
    submitted: Instant,
    prompt_tokens: u32,
    cached_tokens: u32,
    tokens: Vec<Instant>,
    completion_tokens: u32,
}

/// Streams one chat to its end, noting when each token came.
pub(super) async fn stream(
    handle: InstanceHandle,
    prompt: String,
    max_tokens: u32,
    tag: String,
) -> anyhow::Result<Stream> {
    stream_task(handle, chat_submit(prompt, max_tokens, tag)).await
}

async fn stream_task(handle: InstanceHandle, submit: TaskSubmit) -> anyhow::Result<Stream> {
    let submitted = Instant::now();
    let mut task = handle.submit(submit).await?;
    let mut out = Stream {
        submitted,
        prompt_tokens: 0,
        cached_tokens: 0,
        tokens: Vec::new(),
        completion_tokens: 0,
    };
    while let Some(event) = task.next().await {
        match event {
            TaskEvent::Started {
                prompt_tokens,
                cached_tokens,
            } => {
                out.prompt_tokens = prompt_tokens;
                out.cached_tokens = cached_tokens.unwrap_or(0);
            }
            TaskEvent::Prompt { .. } => {}
            TaskEvent::Token { .. } => out.tokens.push(Instant::now()),
            TaskEvent::Done(ipc::proto::TaskOutcome::Completed {
                completion_tokens, ..
            }) => out.completion_tokens = completion_tokens,
            TaskEvent::Done(other) => bail!("bench task ended {other:?}"),
        }
    }
    Ok(out)
}

/// `n` clients at once, each its own prompt (`client_prompt`), tagged
/// `{tag}-{i}`: every client's stream.
pub(super) async fn round(
    handle: &InstanceHandle,
    n: usize,
    max_tokens: u32,
    tag: &str,
) -> anyhow::Result<Vec<Stream>> {
    let clients: Vec<_> = (0..n)
        .map(|i| {
            tokio::spawn(stream(
                handle.clone(),
                client_prompt(i),
                max_tokens,
                format!("{tag}-{i}"),
            ))
        })
        .collect();
    let mut streams = Vec::new();
    for c in clients {
        streams.push(c.await.context("client task")??);
    }
    Ok(streams)
}

/// Client `i`'s prompt: the same request with its own number, so no two
/// clients send the same text.
pub(super) fn client_prompt(i: usize) -> String {
    format!("{BENCH_PROMPT} Make it story number {}.", i + 1)
}

fn gaps(tokens: &[Instant]) -> Vec<f64> {
    tokens
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64() * 1000.0)
        .collect()
}

/// One layout of the bench: `layout:threads`, and for a pipeline
/// optionally `@B1/B2/…`, the layers where stages after the first begin
/// (e.g. `pipeline-2:1@19`: layers 0..19 and 19..30).
struct Entry {
    label: String,
    runners: u32,
    sharding: runner::model::Sharding,
    threads: u32,
    layers: Option<Vec<[usize; 2]>>,
}

fn parse_entry(entry: &str, n_layers: impl Fn() -> anyhow::Result<usize>) -> anyhow::Result<Entry> {
    let (layout, rest) = entry
        .split_once(':')
        .with_context(|| format!("{entry:?}: use layout:threads, e.g. pipeline-2:1"))?;
    let (threads, bounds) = match rest.split_once('@') {
        Some((t, b)) => (t, Some(b)),
        None => (rest, None),
    };
    let threads: u32 = threads
        .parse()
        .with_context(|| format!("{entry:?}: threads must be a number"))?;
    let (runners, sharding) = parse_layout(layout)?;
    let layers = match bounds {
        None => None,
        Some(b) => {
            let mut starts = vec![0usize];
            for part in b.split('/') {
                starts.push(part.parse().with_context(|| {
                    format!("{entry:?}: stage boundaries are layer numbers, e.g. pipeline-2:1@19")
                })?);
            }
            if starts.len() != runners as usize {
                bail!(
                    "{entry:?}: {runners} stages need {} boundaries",
                    runners - 1
                );
            }
            starts.push(n_layers()?);
            Some(starts.windows(2).map(|w| [w[0], w[1]]).collect())
        }
    };
    let label = match bounds {
        Some(b) => format!("{layout}@{b}"),
        None => layout.to_string(),
    };
    Ok(Entry {
        label,
        runners,
        sharding,
        threads,
        layers,
    })
}

/// The instance every table of a layout runs on.
fn request_for(options: &LoadBench, entry: &Entry) -> CreateInstance {
    CreateInstance {
        sharding: Some(entry.sharding),
        layers: entry.layers.clone(),
        weights: Some(options.weights),
        threads: Some(entry.threads),
        // Every client runs at once, and so do the long prompt table's 4
        // streams and its long prompt (none waits in the queue).
        max_batch: Some(options.clients.iter().copied().max().unwrap_or(1).max(5) as u32),
        ..instance_request(options.path.clone(), entry.runners)
    }
}

pub async fn run(node: &Arc<Node>, options: &LoadBench) -> anyhow::Result<()> {
    let entries = options
        .layouts
        .iter()
        .map(|e| {
            parse_entry(e, || {
                let config = engine::loader::read_config(std::path::Path::new(&options.path))?;
                Ok(config.n_layers)
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    println!(
        "{} as {}, {} tokens per client; aggregate = every client's tokens / the round's wall time",
        options.path,
        options.weights.name(),
        options.max_tokens
    );
    println!();
    println!("| layout | threads/runner | clients | aggregate tok/s | vs 1 client | decode tok/s | vs 1 client | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut prefill_rows = Vec::new();
    let mut prefix_rows = Vec::new();
    for entry in &entries {
        let (layout, threads) = (&entry.label, entry.threads);
        let handle = node.create_instance(request_for(options, entry))?;
        if let Err(cause) = handle.wait_ready().await {
            bail!("instance failed: {cause}");
        }
        // One short chat first, so that no round pays for a cold start.
        stream(
            handle.clone(),
            client_prompt(0),
            4,
            "bench-load-warm".into(),
        )
        .await?;
        let (mut one_client, mut one_decode) = (None, None);
        for &n in &options.clients {
            let started = Instant::now();
            let streams = round(&handle, n, options.max_tokens, &format!("bench-load-{n}")).await?;
            let wall = started.elapsed().as_secs_f64();
            let total: u32 = streams.iter().map(|s| s.completion_tokens).sum();
            let aggregate = total as f64 / wall;
            let ratio = aggregate / *one_client.get_or_insert(aggregate);
            // Each stream's rate from its first token to its last, summed:
            // the decode rate of the whole instance while they all run.
            let decode: f64 = streams
                .iter()
                .filter(|s| s.tokens.len() > 1)
                .map(|s| {
                    let span = (*s.tokens.last().expect("tokens") - s.tokens[0]).as_secs_f64();
                    (s.tokens.len() - 1) as f64 / span
                })
                .sum();
            let decode_ratio = decode / *one_decode.get_or_insert(decode);
            let ttft = stats(
                streams
                    .iter()
                    .filter_map(|s| {
                        s.tokens
                            .first()
                            .map(|t| (*t - s.submitted).as_secs_f64() * 1000.0)
                    })
                    .collect(),
            );
            let itl = stats(streams.iter().flat_map(|s| gaps(&s.tokens)).collect());
            println!(
                "| {layout} | {threads} | {n} | {aggregate:.1} | {ratio:.2}x | {decode:.1} | {decode_ratio:.2}x | {:.0} | {:.0} | {:.1} | {:.1} |",
                ttft.median, ttft.p99, itl.median, itl.p99
            );
        }
        if options.long_prompt > 0 {
            prefill_rows.push((
                layout.clone(),
                threads,
                prefill_interference(&handle, options).await?,
            ));
            prefix_rows.push((
                layout.clone(),
                threads,
                prefix_reuse(&handle, options).await?,
            ));
        }
        node.delete_instance(&handle.instance_id, ShutdownMode::Drain, None)
            .await?;
    }
    if options.profile_clients > 0 {
        println!();
        println!(
            "Where each rank's time goes, {} clients on a fresh instance (shares of the round's wall time):",
            options.profile_clients
        );
        println!();
        super::profile::print_header();
        for entry in &entries {
            let n = options.profile_clients;
            let request = request_for(options, entry);
            let (rows, wall) = super::profile::profile(node, options, request, n).await?;
            super::profile::print_rows(&entry.label, entry.threads, n, &rows, wall);
        }
    }
    if !prefill_rows.is_empty() {
        println!();
        println!("4 streams decoding while a long prompt is admitted:");
        println!();
        println!("| layout | threads/runner | long prompt tokens | ITL p99 before ms | ITL p50 during its prefill ms | ITL p99 during its prefill ms | ratio of p99s | its prompt tokens a step | its TTFT s |");
        println!("|---|---|---|---|---|---|---|---|---|");
        for (layout, threads, p) in prefill_rows {
            println!(
                "| {layout} | {threads} | {} | {:.1} | {:.1} | {:.1} | {:.2}x | {:.1} | {:.1} |",
                p.tokens,
                p.before_p99,
                p.during_p50,
                p.during_p99,
                p.during_p99 / p.before_p99,
                p.tokens_a_step,
                p.ttft
            );
        }
        println!();
        println!("A conversation under a long system prompt: the second turn starts from the first turn's kept prefix:");
        println!();
        println!("| layout | threads/runner | prompt tokens | of them cached | TTFT first turn ms | TTFT second turn ms | ratio |");
        println!("|---|---|---|---|---|---|---|");
        for (layout, threads, (tokens, cached, cold, warm)) in prefix_rows {
            println!(
                "| {layout} | {threads} | {tokens} | {cached} | {cold:.0} | {warm:.0} | {:.1}x |",
                cold / warm
            );
        }
    }
    Ok(())
}

/// A two-turn conversation under a system prompt of about
/// `options.long_prompt` tokens: the second turn's prompt tokens and how
/// many of them came from the kept prefix, and both turns' times to first
/// token (ms).
async fn prefix_reuse(
    handle: &InstanceHandle,
    options: &LoadBench,
) -> anyhow::Result<(u32, u32, f64, f64)> {
    let words = options.long_prompt / 2;
    let system: String = (0..words).map(|i| format!("rule{i} ")).collect();
    let turn = |role: &str, content: &str| ipc::proto::ChatTurn {
        role: role.into(),
        content: content.into(),
    };
    let mut turns = vec![
        turn("system", &system),
        turn("user", "What is the capital of France?"),
    ];
    let submit = |turns: &[ipc::proto::ChatTurn], tag: &str| TaskSubmit {
        input: ipc::proto::TaskInput::chat(turns.to_vec()),
        ..chat_submit(String::new(), 8, tag.into())
    };
    let first = stream_task(handle.clone(), submit(&turns, "bench-prefix-1")).await?;
    turns.push(turn("assistant", "Paris."));
    turns.push(turn("user", "And of Italy?"));
    let second = stream_task(handle.clone(), submit(&turns, "bench-prefix-2")).await?;
    let ttft = |s: &Stream| -> anyhow::Result<f64> {
        let t = s.tokens.first().context("a turn gave no token")?;
        Ok((*t - s.submitted).as_secs_f64() * 1000.0)
    };
    Ok((
        second.prompt_tokens,
        second.cached_tokens,
        ttft(&first)?,
        ttft(&second)?,
    ))
}

/// A long prompt admitted while 4 streams decode.
struct Prefill {
    tokens: u32,
    /// The streams' inter-token latency before it arrived (ms).
    before_p99: f64,
    /// ... and while it was prefilled.
    during_p50: f64,
    during_p99: f64,
    /// Its prompt tokens over the steps it took.
    tokens_a_step: f64,
    /// Its time to first token (s).
    ttft: f64,
}

/// The long prompt's tokens, the inter-token latency of 4 streams before
/// it arrives and while it is prefilled, and its time to first token.
async fn prefill_interference(
    handle: &InstanceHandle,
    options: &LoadBench,
) -> anyhow::Result<Prefill> {
    let clients: Vec<_> = (0..4)
        .map(|i| {
            tokio::spawn(stream(
                handle.clone(),
                client_prompt(i),
                options.max_tokens.max(32) * 4,
                format!("bench-prefill-{i}"),
            ))
        })
        .collect();
    // Let them settle into decoding.
    tokio::time::sleep(Duration::from_secs(2)).await;
    // About one token per word: "word 17" is two or three tokens.
    let words = options.long_prompt / 2;
    let long_text: String = (0..words).map(|i| format!("w{i} ")).collect();
    let long_start = Instant::now();
    let long = stream(handle.clone(), long_text, 1, "bench-prefill-long".into()).await?;
    let long_first = *long
        .tokens
        .first()
        .context("the long prompt gave no token")?;
    let mut streams = Vec::new();
    for c in clients {
        streams.push(c.await.context("client task")??);
    }
    let (mut before, mut during) = (Vec::new(), Vec::new());
    for s in &streams {
        for w in s.tokens.windows(2) {
            let gap = (w[1] - w[0]).as_secs_f64() * 1000.0;
            if w[1] <= long_start {
                before.push(gap);
            } else if w[0] >= long_start && w[1] <= long_first {
                during.push(gap);
            }
        }
    }
    if before.is_empty() || during.is_empty() {
        bail!(
            "the streams ended before the long prompt's prefill was over ({} gaps before, {} during): raise --max-tokens",
            before.len(),
            during.len()
        );
    }
    // Steps while it was prefilled: each stream's gaps in that window.
    let steps = during.len() as f64 / streams.len() as f64;
    let tokens_a_step = long.prompt_tokens as f64 / steps.max(1.0);
    let during = stats(during);
    Ok(Prefill {
        tokens: long.prompt_tokens,
        before_p99: stats(before).p99,
        during_p50: during.median,
        during_p99: during.p99,
        tokens_a_step,
        ttft: (long_first - long_start).as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_may_name_where_its_pipeline_stages_begin() {
        let thirty = || Ok(30);
        let plain = parse_entry("pipeline-2:1", thirty).unwrap();
        assert_eq!(
            (plain.label.as_str(), plain.runners, plain.threads),
            ("pipeline-2", 2, 1)
        );
        assert_eq!(plain.layers, None);
        let split = parse_entry("pipeline-2:1@19", thirty).unwrap();
        assert_eq!(split.label, "pipeline-2@19");
        assert_eq!(split.layers, Some(vec![[0, 19], [19, 30]]));
        let three = parse_entry("pipeline-3:1@12/22", thirty).unwrap();
        assert_eq!(three.layers, Some(vec![[0, 12], [12, 22], [22, 30]]));
        let err = parse_entry("pipeline-3:1@12", thirty).err().unwrap();
        assert!(
            err.to_string().contains("3 stages need 2 boundaries"),
            "{err}"
        );
        assert!(parse_entry("pipeline-2:1@x", thirty).is_err());
        assert!(parse_entry("single", thirty).is_err());
    }
}
