//! `shardvisor bench`: lifecycle figures measured on an embedded node with
//! real runner processes, printed as markdown for BENCHMARKS.md.
//!
//! * spawn → every runner Idle, spawn → Ready, and graceful shutdown, for
//!   1, 4 and 16 scripted runners;
//! * crash detection: SIGKILL of a runner → instance `Failed` observed;
//! * `cycles`: create → chat → delete, over and over (a soak).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use engine::loader::WeightFormat;
use ipc::ShutdownMode;
use supervisor::instance::{InstanceHandle, InstanceState, TaskEvent, TaskSubmit};
use supervisor::restart::RestartConfig;

use crate::node::{CreateInstance, Node};

pub mod cluster;
pub mod load;
mod profile;

fn fast_instance(runners: u32) -> CreateInstance {
    let scripted = runner::scripted::ScriptedConfig {
        token_delay_ms: 0,
        load_step_ms: 0,
        warmup_ms: 0,
        ..Default::default()
    };
    CreateInstance {
        scripted: Some(scripted),
        ..instance_request("scripted".into(), runners)
    }
}

/// An instance of `runners` runners of `model` with the defaults and no
/// restarts (a benchmark measures, it does not recover).
pub(crate) fn instance_request(model: String, runners: u32) -> CreateInstance {
    CreateInstance {
        model,
        runners,
        scripted: None,
        timeouts: None,
        restart: Some(RestartConfig {
            max_restarts: 0,
            ..Default::default()
        }),
        sharding: None,
        layers: None,
        weights: None,
        threads: None,
        fault: None,
        nodes: None,
        node_ids: None,
        prefill_chunk: None,
        max_batch: None,
        max_waiting: None,
        prefix_cache_mb: None,
        kv_cache_mb: None,
        max_step_tokens: None,
    }
}

/// A greedy one-turn chat of `prompt`, `max_tokens` long, traced as `trace_id`.
pub(crate) fn chat_submit(prompt: String, max_tokens: u32, trace_id: String) -> TaskSubmit {
    TaskSubmit {
        input: ipc::proto::TaskInput::chat(vec![ipc::proto::ChatTurn {
            role: "user".into(),
            content: prompt,
        }]),
        max_tokens: Some(max_tokens),
        sampling: Default::default(),
        stop: Vec::new(),
        trace_id,
        report_prompt: None,
    }
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub(crate) struct Stats {
    pub(crate) median: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
}

pub(crate) fn stats(mut samples: Vec<f64>) -> Stats {
    samples.sort_by(|a, b| a.total_cmp(b));
    Stats {
        median: percentile(&samples, 0.5),
        p99: percentile(&samples, 0.99),
        max: *samples.last().unwrap_or(&f64::NAN),
    }
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Prints the lifecycle tables.
pub async fn lifecycle(node: &Arc<Node>, iterations: usize) -> anyhow::Result<()> {
    println!("| runners | spawn→all Idle median ms | p99 | spawn→Ready median ms | p99 | graceful shutdown median ms | p99 |");
    println!("|---|---|---|---|---|---|---|");
    for runners in [1u32, 4, 16] {
        let (mut idle, mut ready, mut down) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..iterations {
            let t0 = Instant::now();
            let handle = node.create_instance(fast_instance(runners))?;
            let n = runners as usize;
            handle
                .wait_for(|v| {
                    v.runners.len() == n && v.runners.iter().all(|r| !r.history.is_empty())
                })
                .await
                .context("instance ended before its runners were idle")?;
            idle.push(ms(t0.elapsed()));
            if let Err(cause) = handle.wait_ready().await {
                bail!("instance failed: {cause}");
            }
            ready.push(ms(t0.elapsed()));
            let t1 = Instant::now();
            let report = node
                .delete_instance(&handle.instance_id, ShutdownMode::Drain, None)
                .await?;
            down.push(ms(t1.elapsed()));
            if !report.is_clean() {
                bail!("unclean shutdown: {report:?}");
            }
        }
        let (i, r, d) = (stats(idle), stats(ready), stats(down));
        println!(
            "| {runners} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            i.median, i.p99, r.median, r.p99, d.median, d.p99
        );
        println!("RESULT runners={runners} idle_median_ms={:.3} ready_median_ms={:.3} shutdown_median_ms={:.3}", i.median, r.median, d.median);
    }

    // Crash detection: SIGKILL rank 1 of a ready 4-runner instance, then
    // time until the instance is observed Failed.
    let mut detect = Vec::new();
    for _ in 0..iterations.max(100) {
        let handle = node.create_instance(fast_instance(4))?;
        if let Err(cause) = handle.wait_ready().await {
            bail!("instance failed: {cause}");
        }
        let pid = handle.view().runners[1]
            .pid
            .context("runner 1 has no pid")?;
        let t0 = Instant::now();
        // SAFETY: kill(2) on the pid of a runner this node spawned and has not reaped.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        handle
            .wait_for(|v| matches!(v.state, InstanceState::Failed { .. }))
            .await
            .context("instance vanished")?;
        detect.push(ms(t0.elapsed()));
        handle.wait_settled().await;
        node.delete_instance(&handle.instance_id, ShutdownMode::Cancel, None)
            .await?;
    }
    let d = stats(detect);
    println!();
    println!("| crash detection (SIGKILL → Failed observed) | median ms | p99 ms | max ms |");
    println!("|---|---|---|---|");
    println!(
        "| 4 runners, rank 1 killed | {:.3} | {:.3} | {:.3} |",
        d.median, d.p99, d.max
    );
    println!(
        "RESULT crash_detect_median_ms={:.3} crash_detect_p99_ms={:.3}",
        d.median, d.p99
    );
    Ok(())
}

/// Create (4 runners) → chat → delete, `n` times; fails on the first
/// unclean cycle.
pub async fn cycles(node: &Arc<Node>, n: usize) -> anyhow::Result<()> {
    let started = Instant::now();
    for i in 0..n {
        let handle = node.create_instance(fast_instance(4))?;
        if let Err(cause) = handle.wait_ready().await {
            bail!("cycle {i}: instance failed: {cause}");
        }
        let mut task = handle
            .submit(chat_submit("cycle".into(), 3, format!("cycle-{i}")))
            .await?;
        while let Some(event) = task.next().await {
            if let TaskEvent::Done(outcome) = event {
                if !matches!(outcome, ipc::proto::TaskOutcome::Completed { .. }) {
                    bail!("cycle {i}: task ended {outcome:?}");
                }
            }
        }
        let report = node
            .delete_instance(&handle.instance_id, ShutdownMode::Drain, None)
            .await?;
        if !report.is_clean() {
            bail!("cycle {i}: unclean shutdown: {report:?}");
        }
        if (i + 1) % 500 == 0 {
            eprintln!("{} cycles, {:.1} s", i + 1, started.elapsed().as_secs_f64());
        }
    }
    println!(
        "{n} cycles clean in {:.1} s ({:.2} ms per cycle)",
        started.elapsed().as_secs_f64(),
        ms(started.elapsed()) / n as f64
    );
    Ok(())
}

fn peak_rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// What `bench model` measures.
pub struct ModelBench {
    /// A GGUF file or Hugging Face directory.
    pub path: String,
    pub runs: usize,
    /// `single`, `pipeline-N` or `tensor-N`.
    pub layouts: Vec<String>,
    pub weights: Vec<WeightFormat>,
    pub threads: Option<u32>,
    pub json: bool,
    /// The user message (default [`BENCH_PROMPT`]).
    pub prompt: Option<String>,
    /// Tokens generated per chat.
    pub max_tokens: u32,
}

/// The chat `bench model` times when no prompt is given.
pub const BENCH_PROMPT: &str = "Write a long story about a dragon who learns to cook.";

/// One timed chat.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timed {
    pub prompt_tokens: u32,
    /// Submission to the first token.
    pub ttft_s: f64,
    pub prefill_tok_s: f64,
    /// NaN when fewer than two tokens came.
    pub decode_tok_s: f64,
}

pub(crate) fn parse_layout(layout: &str) -> anyhow::Result<(u32, runner::model::Sharding)> {
    use runner::model::Sharding;
    if layout == "single" {
        return Ok((1, Sharding::Pipeline));
    }
    let parsed = layout.split_once('-').and_then(|(kind, n)| {
        let n: u32 = n.parse().ok()?;
        match kind {
            "pipeline" => Some((n, Sharding::Pipeline)),
            "tensor" => Some((n, Sharding::Tensor)),
            _ => None,
        }
    });
    parsed.with_context(|| {
        format!("layout {layout:?}: use single, pipeline-N or tensor-N (e.g. pipeline-2)")
    })
}

/// One timed greedy chat of `prompt`, `max_tokens` long.
pub(crate) async fn timed_chat(
    handle: &InstanceHandle,
    run: usize,
    prompt: &str,
    max_tokens: u32,
) -> anyhow::Result<Timed> {
    let started = Instant::now();
    let mut task = handle
        .submit(chat_submit(
            prompt.into(),
            max_tokens,
            format!("bench-{run}"),
        ))
        .await?;
    let mut first: Option<Instant> = None;
    let mut last = started;
    let (mut prompt_tokens, mut tokens) = (0u32, 0u32);
    while let Some(event) = task.next().await {
        match event {
            TaskEvent::Started { .. } | TaskEvent::Prompt { .. } => {}
            TaskEvent::Token { .. } => {
                first.get_or_insert_with(Instant::now);
                last = Instant::now();
            }
            TaskEvent::Done(ipc::proto::TaskOutcome::Completed {
                prompt_tokens: p,
                completion_tokens,
                ..
            }) => {
                prompt_tokens = p;
                tokens = completion_tokens;
            }
            TaskEvent::Done(other) => bail!("bench task ended {other:?}"),
        }
    }
    let first = first.context("no token produced")?;
    let ttft_s = (first - started).as_secs_f64();
    Ok(Timed {
        prompt_tokens,
        ttft_s,
        prefill_tok_s: prompt_tokens as f64 / ttft_s,
        decode_tok_s: if tokens < 2 {
            f64::NAN
        } else {
            (tokens - 1) as f64 / (last - first).as_secs_f64()
        },
    })
}

/// Prefill and decode speed and peak RSS per runner of a model, for each
/// weight format and layout asked for. Per format, every layout's instance
/// is started first and the runs then go round-robin over them, so that
/// load from elsewhere on the machine falls on all layouts alike.
pub async fn model(node: &Arc<Node>, options: &ModelBench) -> anyhow::Result<()> {
    let layouts = options
        .layouts
        .iter()
        .map(|l| parse_layout(l).map(|parsed| (l.as_str(), parsed)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if !options.json {
        println!(
            "| layout | weights | prefill tok/s | decode tok/s | decode vs {} | peak RSS per runner MB |",
            layouts.first().map_or("first", |l| l.0)
        );
        println!("|---|---|---|---|---|---|");
    }
    for &weights in &options.weights {
        let mut handles = Vec::new();
        for &(_, (runners, sharding)) in &layouts {
            let request = CreateInstance {
                sharding: Some(sharding),
                weights: Some(weights),
                threads: options.threads,
                ..instance_request(options.path.clone(), runners)
            };
            let handle = node.create_instance(request)?;
            if let Err(cause) = handle.wait_ready().await {
                bail!("instance failed: {cause}");
            }
            handles.push(handle);
        }
        let prompt = options.prompt.as_deref().unwrap_or(BENCH_PROMPT);
        let mut samples: Vec<Vec<Timed>> = vec![Vec::new(); handles.len()];
        for run in 0..options.runs {
            for (handle, samples) in handles.iter().zip(&mut samples) {
                samples.push(timed_chat(handle, run, prompt, options.max_tokens).await?);
            }
        }
        let mut first_decode = None;
        for ((&(layout, _), handle), samples) in layouts.iter().zip(&handles).zip(samples) {
            let prompt_tokens = samples.first().map_or(0, |s| s.prompt_tokens);
            let ttft_ms = stats(samples.iter().map(|s| s.ttft_s * 1000.0).collect()).median;
            let prefill = stats(samples.iter().map(|s| s.prefill_tok_s).collect()).median;
            let decode = stats(samples.iter().map(|s| s.decode_tok_s).collect()).median;
            let ratio = decode / *first_decode.get_or_insert(decode);
            let rss: Vec<f64> = handle
                .view()
                .runners
                .iter()
                .filter_map(|r| r.pid)
                .map(peak_rss_mb)
                .collect();
            let weights = weights.name();
            if options.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "layout": layout,
                        "weights": weights,
                        "threads": options.threads,
                        "prompt_tokens": prompt_tokens,
                        "ttft_ms": ttft_ms,
                        "prefill_tok_s": prefill,
                        "decode_tok_s": decode,
                        "peak_rss_mb": rss,
                    })
                );
            } else {
                let rss: Vec<String> = rss.iter().map(|mb| format!("{mb:.0}")).collect();
                println!(
                    "| {layout} | {weights} | {prefill:.1} | {decode:.1} | {:.0}% | {} |",
                    ratio * 100.0,
                    rss.join(" / ")
                );
            }
        }
        for handle in handles {
            node.delete_instance(&handle.instance_id, ShutdownMode::Drain, None)
                .await?;
        }
    }
    Ok(())
}
