//! `shardvisor bench cluster`: multi-node figures on one machine. This
//! process is node 1 (an embedded, clustered node); nodes 2 and 3 are
//! `shardvisor serve` child processes on loopback, all with one lease.
//!
//! * control-plane round trip: a command to node 2 and its answer;
//! * time to Ready of a 3-runner tiny-model instance, all on node 1 vs one
//!   runner per node (interleaved rounds);
//! * decode speed of a 3-stage pipeline of the real model, one node vs one
//!   stage per node (interleaved rounds);
//! * node-loss detection: a 2-node instance, node 2 SIGKILLed (its TCP
//!   links close), SIGSTOPped (silent: only the lease notices), or, as
//!   root, in its own network namespace with the veth link cut; until node
//!   1's instance is `Failed`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use engine::loader::WeightFormat;
use ipc::ShutdownMode;
use supervisor::instance::{InstanceHandle, InstanceState};

use super::{instance_request, ms, stats, timed_chat, BENCH_PROMPT};
use crate::mesh::MeshConfig;
use crate::netns::Netns;
use crate::node::{CreateInstance, Node};

pub struct ClusterBench {
    pub rounds: usize,
    /// The model for the decode comparison (`None`: skipped).
    pub model: Option<PathBuf>,
    pub lease_ms: u64,
}

/// A `shardvisor serve` child in the cluster, killed on drop.
struct ChildNode {
    child: Child,
}

impl Drop for ChildNode {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child; SIGCONT first in case it is stopped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGCONT) };
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn start_child(dir: &Path, peer: u16, lease_ms: u64) -> anyhow::Result<ChildNode> {
    let peer = format!("tcp/127.0.0.1:{peer}");
    start_child_in(dir, None, "127.0.0.1", free_port()?, &peer, lease_ms)
}

/// A node in network namespace `netns` (or this one), on `host`.
fn start_child_in(
    dir: &Path,
    netns: Option<&str>,
    host: &str,
    port: u16,
    peer: &str,
    lease_ms: u64,
) -> anyhow::Result<ChildNode> {
    std::fs::create_dir_all(dir)?;
    let log = std::fs::File::create(dir.join("node.log"))?;
    let program = std::env::current_exe()?;
    let mut command = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
        None => Command::new(program),
    };
    let mut child = command
        .args(["serve", "--listen", &format!("{host}:0"), "--state-dir"])
        .arg(dir)
        .args(["--cluster-listen", &format!("tcp/{host}:{port}")])
        .args(["--peer", peer])
        .args(["--lease-ms", &lease_ms.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .context("cannot start a node")?;
    // Wait for its "listening on" line: it is serving.
    let mut line = String::new();
    let stdout = child.stdout.take().context("child stdout")?;
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
    if !line.starts_with("listening on") {
        bail!(
            "a node did not start (see {})",
            dir.join("node.log").display()
        );
    }
    Ok(ChildNode { child })
}

/// Waits until `node` sees `n` live members; returns their ids, this node's
/// first.
async fn wait_members(node: &Node, n: usize) -> anyhow::Result<Vec<String>> {
    let mesh = node.mesh().context("not clustered")?;
    let mut members = mesh.cluster().members();
    let alive = |m: &cluster::Membership| m.values().filter(|m| m.alive).count();
    tokio::time::timeout(Duration::from_secs(30), members.wait_for(|m| alive(m) == n))
        .await
        .context("the cluster did not form within 30 s")??;
    let me = mesh.id().to_string();
    let mut ids: Vec<String> = members
        .borrow()
        .values()
        .filter(|m| m.alive && m.id != me)
        .map(|m| m.id.clone())
        .collect();
    ids.insert(0, me);
    Ok(ids)
}

fn request(model: &Path, runners: u32, node_ids: Option<Vec<String>>) -> CreateInstance {
    CreateInstance {
        weights: Some(WeightFormat::Q8_0),
        node_ids,
        ..instance_request(model.display().to_string(), runners)
    }
}

async fn start_ready(node: &Node, req: CreateInstance) -> anyhow::Result<InstanceHandle> {
    let handle = node.create_instance(req)?;
    if let Err(cause) = handle.wait_ready().await {
        bail!("instance failed: {cause}");
    }
    Ok(handle)
}

/// One node-loss round: a 2-rank instance on this node and `victim`,
/// `fault` done to the victim, milliseconds until the instance is `Failed`.
async fn loss_round(
    node: &Node,
    ids: &[String],
    tiny: &Path,
    victim: ChildNode,
    fault: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    let members = wait_members(node, ids.len() + 1).await?;
    let victim_id = members
        .iter()
        .find(|id| !ids.contains(id))
        .cloned()
        .context("the new node is not in the cluster")?;
    let placement = Some(vec![ids[0].clone(), victim_id]);
    let handle = start_ready(node, request(tiny, 2, placement)).await?;
    let t0 = Instant::now();
    fault()?;
    handle
        .wait_for(|v| matches!(v.state, InstanceState::Failed { .. }))
        .await
        .context("the instance ended without failing")?;
    let took = ms(t0.elapsed());
    drop(victim);
    node.delete_instance(&handle.instance_id, ShutdownMode::Cancel, None)
        .await?;
    wait_members(node, ids.len()).await?;
    Ok(took)
}

pub async fn run(options: &ClusterBench) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("shardvisor-bench-cluster-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let result = run_in(&dir, options).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run_in(dir: &Path, options: &ClusterBench) -> anyhow::Result<()> {
    let port = free_port()?;
    let lease = Duration::from_millis(options.lease_ms);
    // A node in a network namespace, for the cut-link rounds (root only).
    let net = Netns::create()
        .map_err(|reason| eprintln!("cut-link rounds skipped: {reason}"))
        .ok();
    let mut listen = vec![format!("tcp/127.0.0.1:{port}")];
    if let Some(net) = &net {
        listen.push(format!("tcp/{}:{port}", net.host_ip));
    }
    let config = MeshConfig {
        cluster: cluster::ClusterConfig {
            listen,
            peers: Vec::new(),
            discover: false,
            lease,
        },
        // Reachable from the namespace and from loopback alike.
        advertise_host: net
            .as_ref()
            .map_or("127.0.0.1".into(), |n| n.host_ip.clone()),
    };
    let node = Node::start_clustered(&dir.join("node1"), std::env::current_exe()?, config).await?;
    node.announce("127.0.0.1:0".into());
    let _children = [
        start_child(&dir.join("node2"), port, options.lease_ms)?,
        start_child(&dir.join("node3"), port, options.lease_ms)?,
    ];
    let ids = wait_members(&node, 3).await?;
    let tiny = dir.join("tiny-llama");
    engine::testing::write_tiny_llama(&tiny, 7).context("write the tiny model")?;
    println!("lease {} ms, {} rounds\n", options.lease_ms, options.rounds);

    // Control-plane round trip.
    let mesh = node.mesh().context("not clustered")?;
    let mut rtt = Vec::new();
    for _ in 0..(options.rounds * 40).max(100) {
        rtt.push(ms(mesh.ping(&ids[1]).await.map_err(anyhow::Error::msg)?));
    }
    let rtt = stats(rtt);
    println!("| control-plane command round trip | median ms | p99 | max |");
    println!("|---|---|---|---|");
    println!(
        "| node 1 → node 2 → node 1 | {:.3} | {:.3} | {:.3} |\n",
        rtt.median, rtt.p99, rtt.max
    );

    // Time to Ready.
    let (mut one, mut three) = (Vec::new(), Vec::new());
    for _ in 0..options.rounds {
        for (samples, placement) in [(&mut one, None), (&mut three, Some(ids.clone()))] {
            let t0 = Instant::now();
            let handle = start_ready(&node, request(&tiny, 3, placement)).await?;
            samples.push(ms(t0.elapsed()));
            node.delete_instance(&handle.instance_id, ShutdownMode::Drain, None)
                .await?;
        }
    }
    let (one, three) = (stats(one), stats(three));
    println!("| tiny model, 3 runners: create → Ready | median ms | p99 |");
    println!("|---|---|---|");
    println!("| one node | {:.1} | {:.1} |", one.median, one.p99);
    println!(
        "| one runner on each of 3 nodes | {:.1} | {:.1} |",
        three.median, three.p99
    );
    println!(
        "| ratio (3 nodes / 1 node) | {:.2}× | |\n",
        three.median / one.median
    );

    // Decode: pipeline-3 on one node vs across three.
    if let Some(model) = &options.model {
        let local = start_ready(&node, request(model, 3, None)).await?;
        let spread = start_ready(&node, request(model, 3, Some(ids.clone()))).await?;
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for run in 0..options.rounds {
            a.push(
                timed_chat(&local, run, BENCH_PROMPT, 64)
                    .await?
                    .decode_tok_s,
            );
            b.push(
                timed_chat(&spread, run, BENCH_PROMPT, 64)
                    .await?
                    .decode_tok_s,
            );
        }
        let (a, b) = (stats(a).median, stats(b).median);
        println!(
            "| {} q8_0, pipeline-3 | decode tok/s (median) |",
            model.display()
        );
        println!("|---|---|");
        println!("| one node | {a:.1} |");
        println!("| one stage per node (3 nodes) | {b:.1} |");
        println!("| ratio | {:.0}% |\n", b / a * 100.0);
        for h in [local, spread] {
            node.delete_instance(&h.instance_id, ShutdownMode::Drain, None)
                .await?;
        }
    }

    // Node-loss detection.
    let mut killed = Vec::new();
    let mut silent = Vec::new();
    for round in 0..options.rounds {
        for (signal, samples) in [(libc::SIGKILL, &mut killed), (libc::SIGSTOP, &mut silent)] {
            let dir = dir.join(format!("victim-{round}-{signal}"));
            let victim = start_child(&dir, port, options.lease_ms)?;
            let pid = victim.child.id() as i32;
            samples.push(
                loss_round(&node, &ids, &tiny, victim, || {
                    // SAFETY: kill(2) on our own child.
                    unsafe { libc::kill(pid, signal) };
                    Ok(())
                })
                .await?,
            );
        }
    }
    let mut cut = Vec::new();
    if let Some(net) = &net {
        let peer = format!("tcp/{}:{port}", net.host_ip);
        for round in 0..options.rounds {
            let dir = dir.join(format!("netns-{round}"));
            let (ns, host) = (Some(net.name.as_str()), net.ns_ip.as_str());
            let victim = start_child_in(&dir, ns, host, 7447, &peer, options.lease_ms)?;
            let sample = loss_round(&node, &ids, &tiny, victim, || {
                net.set_link(false).map_err(anyhow::Error::msg)
            })
            .await;
            net.set_link(true).map_err(anyhow::Error::msg)?;
            cut.push(sample?);
        }
    }
    let (killed, silent) = (stats(killed), stats(silent));
    println!("| node 2 of a 2-node instance | failure seen after, median ms | max |");
    println!("|---|---|---|");
    println!(
        "| SIGKILL (its links close) | {:.1} | {:.1} |",
        killed.median, killed.max
    );
    println!(
        "| SIGSTOP (silent: the lease decides) | {:.1} | {:.1} |",
        silent.median, silent.max
    );
    if !cut.is_empty() {
        let cut = stats(cut);
        println!(
            "| link cut (`ip link set … down` on its veth) | {:.1} | {:.1} |",
            cut.median, cut.max
        );
    }
    node.shutdown_all(ShutdownMode::Drain).await;
    node.leave_cluster().await;
    Ok(())
}
