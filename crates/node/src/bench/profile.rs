//! `shardvisor bench load`'s profile table: where each rank's time goes
//! while N clients run at once on a fresh instance of a layout.
//!
//! Each rank counts its forward passes' time and, inside them, the
//! all-reduce's waits, (de)serialization and sends, and outside them the
//! data plane's (`runner`'s `rank profile` log line, written as the rank
//! closes); the bench reads those lines from the runners' logs after the
//! delete, and each runner's context switches from `/proc` around the
//! round. Shares are of the round's wall time (the counters also hold the
//! instance's 4-token warm-up chat, a few steps against hundreds).

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use ipc::ShutdownMode;
use serde_json::Value;

use super::load::{client_prompt, round, stream, LoadBench};
use crate::node::{CreateInstance, Node};

/// One rank's row.
pub struct RankRow {
    pub rank: u64,
    pub layers: String,
    pub steps: f64,
    pub compute_ms: f64,
    pub reduce_wait_ms: f64,
    pub reduce_codec_ms: f64,
    pub reduce_send_ms: f64,
    pub reduces: f64,
    pub reduce_bytes: f64,
    pub link_wait_ms: f64,
    pub link_io_ms: f64,
    pub voluntary: u64,
    pub involuntary: u64,
}

/// Context switches of every thread of `pid`, summed.
fn all_switches(pid: u32) -> (u64, u64) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return (0, 0);
    };
    let mut sum = (0, 0);
    for t in tasks.flatten() {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        for line in status.lines() {
            if let Some(v) = line.strip_prefix("voluntary_ctxt_switches:") {
                sum.0 += v.trim().parse::<u64>().unwrap_or(0);
            } else if let Some(v) = line.strip_prefix("nonvoluntary_ctxt_switches:") {
                sum.1 += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    sum
}

/// The `rank profile` lines of `instance`'s runner logs, by rank.
fn profile_lines(node: &Node, instance: &str) -> anyhow::Result<Vec<Value>> {
    let dir = node.logs_dir();
    let mut rows = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        if !entry.file_name().to_string_lossy().starts_with(instance) {
            continue;
        }
        let text = std::fs::read_to_string(entry.path())?;
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            if v["fields"]["message"] == "rank profile" {
                rows.push(v["fields"].clone());
            }
        }
    }
    rows.sort_by_key(|v| v["rank"].as_u64());
    Ok(rows)
}

/// A fresh instance of `request`, one round of `n` clients; each rank's
/// row and the round's wall time in ms.
pub async fn profile(
    node: &Arc<Node>,
    options: &LoadBench,
    request: CreateInstance,
    n: usize,
) -> anyhow::Result<(Vec<RankRow>, f64)> {
    let handle = node.create_instance(request)?;
    if let Err(cause) = handle.wait_ready().await {
        bail!("instance failed: {cause}");
    }
    stream(
        handle.clone(),
        client_prompt(0),
        4,
        "bench-profile-warm".into(),
    )
    .await?;
    let pids: Vec<u32> = handle.view().runners.iter().filter_map(|r| r.pid).collect();
    let before: Vec<_> = pids.iter().map(|&p| all_switches(p)).collect();
    let started = Instant::now();
    round(&handle, n, options.max_tokens, "bench-profile").await?;
    let wall = started.elapsed().as_secs_f64() * 1000.0;
    let after: Vec<_> = pids.iter().map(|&p| all_switches(p)).collect();
    node.delete_instance(&handle.instance_id, ShutdownMode::Drain, None)
        .await?;
    let lines = profile_lines(node, &handle.instance_id)?;
    if lines.len() != pids.len() {
        bail!(
            "{} of {} ranks logged a profile (runner logs in {})",
            lines.len(),
            pids.len(),
            node.logs_dir().display()
        );
    }
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(0.0);
    let rows = lines
        .iter()
        .zip(before.iter().zip(&after))
        .map(|(v, (b, a))| RankRow {
            rank: v["rank"].as_u64().unwrap_or(0),
            layers: v["layers"].as_str().unwrap_or("?").to_string(),
            steps: f(v, "steps"),
            compute_ms: f(v, "compute_ms"),
            reduce_wait_ms: f(v, "reduce_wait_ms"),
            reduce_codec_ms: f(v, "reduce_codec_ms"),
            reduce_send_ms: f(v, "reduce_send_ms"),
            reduces: f(v, "reduces"),
            reduce_bytes: f(v, "reduce_bytes"),
            link_wait_ms: f(v, "link_wait_ms"),
            link_io_ms: f(v, "link_codec_ms") + f(v, "link_send_ms"),
            voluntary: a.0.saturating_sub(b.0),
            involuntary: a.1.saturating_sub(b.1),
        })
        .collect();
    Ok((rows, wall))
}

/// Prints the profile table's rows of one layout.
pub fn print_rows(layout: &str, threads: u32, n: usize, rows: &[RankRow], wall: f64) {
    let share = |ms: f64| 100.0 * ms / wall;
    for r in rows {
        let steps = r.steps.max(1.0);
        println!(
            "| {layout} | {threads} | {n} | {} | {} | {:.0} | {:.1} | {:.0}% | {:.0}% | {:.0} | {:.0}% | {:.0}% | {:.1} | {:.0} | {:.0}% | {:.0}% | {:.0} | {:.0} |",
            r.rank,
            r.layers,
            r.steps,
            wall / steps,
            share(r.compute_ms),
            share(r.reduce_wait_ms),
            1000.0 * r.reduce_wait_ms / r.reduces.max(1.0),
            share(r.reduce_codec_ms),
            share(r.reduce_send_ms),
            r.reduces / steps,
            r.reduce_bytes / r.reduces.max(1.0),
            share(r.link_wait_ms),
            share(r.link_io_ms),
            r.voluntary as f64 / steps,
            r.involuntary as f64 / steps,
        );
    }
}

pub fn print_header() {
    println!("| layout | threads/runner | clients | rank | layers | steps | wall ms a step | compute | all-reduce wait | wait per all-reduce µs | all-reduce (de)serialize + sum | all-reduce send | all-reduces a step | bytes an all-reduce | link wait | link (de)serialize + send | voluntary switches a step | involuntary switches a step |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
}
