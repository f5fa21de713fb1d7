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
use ipc::ShutdownMode;
use supervisor::instance::{InstanceState, TaskEvent, TaskSubmit};
use supervisor::restart::RestartConfig;

use crate::node::{CreateInstance, Node};

fn fast_instance(runners: u32) -> CreateInstance {
    let scripted = runner::scripted::ScriptedConfig {
        token_delay_ms: 0,
        load_step_ms: 0,
        warmup_ms: 0,
        ..Default::default()
    };
    CreateInstance {
        model: "scripted".into(),
        runners,
        scripted: Some(scripted),
        timeouts: None,
        restart: Some(RestartConfig {
            max_restarts: 0,
            ..Default::default()
        }),
        sharding: None,
        layers: None,
        quantized: None,
        threads: None,
        fault: None,
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

struct Stats {
    median: f64,
    p99: f64,
    max: f64,
}

fn stats(mut samples: Vec<f64>) -> Stats {
    samples.sort_by(|a, b| a.total_cmp(b));
    Stats {
        median: percentile(&samples, 0.5),
        p99: percentile(&samples, 0.99),
        max: *samples.last().unwrap_or(&f64::NAN),
    }
}

fn ms(d: Duration) -> f64 {
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
            .submit(TaskSubmit {
                messages: vec![ipc::proto::ChatTurn {
                    role: "user".into(),
                    content: "cycle".into(),
                }],
                max_tokens: 3,
                sampling: Default::default(),
                stop: Vec::new(),
                trace_id: format!("cycle-{i}"),
            })
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

/// Prefill and decode speed and peak RSS per runner of a model, for single,
/// pipeline-2 and tensor-3 instances, f32 and quantized.
pub async fn model(node: &Arc<Node>, path: &str, runs: usize) -> anyhow::Result<()> {
    let prompt = "Write a long story about a dragon who learns to cook.";
    println!("| layout | weights | prefill tok/s (median) | decode tok/s (median) | peak RSS per runner MB |");
    println!("|---|---|---|---|---|");
    for quantized in [false, true] {
        for (runners, sharding) in [(1u32, "pipeline"), (2, "pipeline"), (3, "tensor")] {
            let request = CreateInstance {
                model: path.to_string(),
                runners,
                scripted: None,
                timeouts: None,
                restart: Some(RestartConfig {
                    max_restarts: 0,
                    ..Default::default()
                }),
                sharding: Some(if sharding == "tensor" {
                    runner::model::Sharding::Tensor
                } else {
                    runner::model::Sharding::Pipeline
                }),
                layers: None,
                quantized: Some(quantized),
                threads: None,
                fault: None,
            };
            let handle = node.create_instance(request)?;
            if let Err(cause) = handle.wait_ready().await {
                bail!("instance failed: {cause}");
            }
            let (mut prefill, mut decode) = (Vec::new(), Vec::new());
            for run in 0..runs {
                let started = Instant::now();
                let mut task = handle
                    .submit(TaskSubmit {
                        messages: vec![ipc::proto::ChatTurn {
                            role: "user".into(),
                            content: prompt.into(),
                        }],
                        max_tokens: 64,
                        sampling: Default::default(),
                        stop: Vec::new(),
                        trace_id: format!("bench-{run}"),
                    })
                    .await?;
                let mut first: Option<Instant> = None;
                let mut last = started;
                let mut tokens = 0u32;
                let mut prompt_tokens = 0u32;
                while let Some(event) = task.next().await {
                    match event {
                        TaskEvent::Token(_) => {
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
                prefill.push(prompt_tokens as f64 / (first - started).as_secs_f64());
                if tokens > 1 {
                    decode.push((tokens - 1) as f64 / (last - first).as_secs_f64());
                }
            }
            let rss: Vec<String> = handle
                .view()
                .runners
                .iter()
                .filter_map(|r| r.pid)
                .map(|pid| format!("{:.0}", peak_rss_mb(pid)))
                .collect();
            let layout = if runners == 1 {
                "single".to_string()
            } else {
                format!("{sharding}-{runners}")
            };
            let weights = if quantized { "Q4_1 (quantized)" } else { "f32" };
            println!(
                "| {layout} | {weights} | {:.1} | {:.1} | {} |",
                stats(prefill).median,
                stats(decode).median,
                rss.join(" / ")
            );
            node.delete_instance(&handle.instance_id, ShutdownMode::Drain, None)
                .await?;
        }
    }
    Ok(())
}
