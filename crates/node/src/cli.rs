//! Command-line interface. Each command is a thin wrapper over library
//! operations: [`Node`] for `serve` and `run`, the HTTP client for `status`
//! and `inspect`, the runner crate for `runner`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use engine::loader::WeightFormat;
use ipc::proto::{ChatTurn, Sampling, TaskInput, TaskOutcome};
use ipc::ShutdownMode;
use supervisor::instance::{TaskEvent, TaskSubmit};
use supervisor::shutdown::ShutdownReport;
use supervisor::statedir::StateDir;

use crate::logging::{self, LogFormat};
use crate::node::{CreateInstance, Node};

#[derive(Debug, Parser)]
#[command(
    name = "shardvisor",
    version,
    about = "Run a model split across runner processes, race-free"
)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value = "human", global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node daemon with its HTTP API.
    Serve(ServeArgs),
    /// One shot: start an embedded node, create an instance, stream one
    /// prompt, delete the instance and print its shutdown report.
    Run(RunArgs),
    /// Show a running node's instances and runners.
    Status(RemoteArgs),
    /// Show a running node's runners with their channel stats.
    Inspect(RemoteArgs),
    /// Lifecycle benchmarks on an embedded node (markdown on stdout).
    Bench(BenchArgs),
    /// Internal: the runner process, started by a node.
    #[command(hide = true)]
    Runner(RunnerCliArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[arg(long, default_value = "0.0.0.0:52415")]
    pub listen: SocketAddr,
    /// State directory (default $XDG_STATE_HOME/shardvisor or ~/.local/state/shardvisor).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Join a cluster, listening for other nodes on this endpoint
    /// (`tcp/HOST:PORT`).
    #[arg(long)]
    pub cluster_listen: Option<String>,
    /// A node already in the cluster (`tcp/HOST:PORT`); repeatable. One is
    /// enough: the others are found through it.
    #[arg(long = "peer")]
    pub peers: Vec<String>,
    /// Silence after which a node is declared lost. Must be the same on
    /// every node of the cluster.
    #[arg(long, default_value_t = 2000)]
    pub lease_ms: u64,
    /// Also find nodes by multicast scouting on the local network.
    #[arg(long)]
    pub discover: bool,
    /// The address other nodes reach this node's API and runners on
    /// (default: the cluster-listen host, or the local address that routes
    /// to the first peer).
    #[arg(long)]
    pub advertise_host: Option<String>,
    /// Enable fault-injection endpoints (`POST /fault/stall`), for tests.
    #[arg(long, hide = true)]
    pub fault_injection: bool,
}

impl ServeArgs {
    fn mesh_config(&self) -> Option<crate::mesh::MeshConfig> {
        if self.cluster_listen.is_none() && self.peers.is_empty() && !self.discover {
            return None;
        }
        let advertise_host = match &self.advertise_host {
            Some(host) => host.clone(),
            None => advertise_host(self.cluster_listen.as_deref(), &self.peers),
        };
        Some(crate::mesh::MeshConfig {
            cluster: cluster::ClusterConfig {
                listen: self.cluster_listen.iter().cloned().collect(),
                peers: self.peers.clone(),
                discover: self.discover,
                lease: std::time::Duration::from_millis(self.lease_ms),
            },
            advertise_host,
        })
    }
}

/// The host in a `tcp/HOST:PORT` endpoint.
fn endpoint_host(endpoint: &str) -> Option<std::net::IpAddr> {
    let addr = endpoint.strip_prefix("tcp/")?;
    addr.parse::<SocketAddr>().ok().map(|a| a.ip())
}

/// The listen host when it is a specific address; otherwise the local
/// address the kernel would use to reach the first peer; otherwise loopback.
fn advertise_host(listen: Option<&str>, peers: &[String]) -> String {
    if let Some(ip) = listen.and_then(endpoint_host) {
        if !ip.is_unspecified() {
            return ip.to_string();
        }
    }
    let routed = peers.iter().find_map(|p| {
        let ip = endpoint_host(p)?;
        let socket = std::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0)).ok()?;
        socket.connect((ip, 9)).ok()?;
        socket.local_addr().ok().map(|a| a.ip())
    });
    match routed {
        Some(ip) => ip.to_string(),
        None => {
            tracing::info!("advertising 127.0.0.1 to the cluster: pass --advertise-host for nodes on other machines");
            "127.0.0.1".into()
        }
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The prompt to answer.
    #[arg(default_value = "Hello from a model split across runner processes")]
    pub prompt: String,
    /// `scripted`, a GGUF file or a Hugging Face model directory. Default:
    /// the model `scripts/fetch-model.sh` fetched (`$SHARDVISOR_MODELS` or
    /// `./models`), else `scripted`.
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long, default_value_t = 2)]
    pub runners: u32,
    /// Model files: `pipeline` (layers split across runners) or `tensor`.
    #[arg(long, default_value = "pipeline")]
    pub sharding: String,
    /// How weight matrices are held: `auto` (default: per stored type the
    /// faster of its blocks and Q8_0 on this CPU), `f32` (exact), `gguf`
    /// (GGUF blocks as stored) or `q8_0`.
    #[arg(long, value_parser = parse_weights)]
    pub weights: Option<WeightFormat>,
    /// Generation ends at the end of the model's turn, or after this many
    /// tokens.
    #[arg(long, default_value_t = 512)]
    pub max_tokens: u32,
    /// Delay per scripted token.
    #[arg(long, default_value_t = 20)]
    pub token_delay_ms: u64,
    /// State directory (default: a fresh temporary one).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
}

#[derive(Debug, Subcommand)]
pub enum BenchWhat {
    /// Spawn → Idle/Ready and graceful shutdown for 1, 4, 16 runners; crash detection.
    Lifecycle {
        #[arg(long, default_value_t = 30)]
        iterations: usize,
    },
    /// Prefill/decode tokens/s and peak RSS per runner of a model file.
    Model {
        /// A GGUF file or Hugging Face directory.
        #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
        model: String,
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Layouts to measure, comma-separated: single, pipeline-N, tensor-N.
        #[arg(
            long,
            default_value = "single,pipeline-2,tensor-3",
            value_delimiter = ','
        )]
        layouts: Vec<String>,
        /// Weight formats to measure, comma-separated.
        #[arg(long, default_value = "auto,f32,q8_0,gguf", value_delimiter = ',', value_parser = parse_weights)]
        weights: Vec<WeightFormat>,
        /// Compute threads per runner (default: the node's default).
        #[arg(long)]
        threads: Option<u32>,
        /// One JSON object per row instead of a markdown table.
        #[arg(long)]
        json: bool,
        /// A file whose text is the user message (default: a one-line
        /// story prompt).
        #[arg(long)]
        prompt_file: Option<PathBuf>,
        /// Tokens generated per chat.
        #[arg(long, default_value_t = 64)]
        max_tokens: u32,
    },
    /// Many streaming clients at once on one instance: aggregate tok/s,
    /// TTFT and inter-token latency per client count, and streams' latency
    /// while a long prompt is admitted.
    Load {
        /// A GGUF file or Hugging Face directory.
        #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
        model: String,
        /// Layouts with their compute threads per runner, comma-separated
        /// `layout:threads` (layout: single, pipeline-N, tensor-N); a
        /// pipeline may name where its later stages begin, `pipeline-2:1@19`.
        #[arg(
            long,
            default_value = "single:2,single:1,pipeline-2:1,tensor-3:1",
            value_delimiter = ','
        )]
        layouts: Vec<String>,
        #[arg(long, default_value = "q8_0", value_parser = parse_weights)]
        weights: WeightFormat,
        /// Client counts, comma-separated.
        #[arg(long, default_value = "1,2,4,8,16", value_delimiter = ',')]
        clients: Vec<usize>,
        /// Tokens generated per client.
        #[arg(long, default_value_t = 64)]
        max_tokens: u32,
        /// Tokens (about) of the prompt admitted while 4 streams decode; 0
        /// leaves that table out.
        #[arg(long, default_value_t = 1000)]
        long_prompt: usize,
        /// Clients of the round whose ranks' time is broken down (compute,
        /// all-reduce, data plane, context switches); 0 leaves that table
        /// out.
        #[arg(long, default_value_t = 8)]
        profile_clients: usize,
    },
    /// create → chat → delete cycles (a soak).
    Cycles {
        #[arg(long, default_value_t = 5000)]
        n: usize,
    },
    /// Three nodes on loopback: command round trip, time to Ready across
    /// nodes, cross-node pipeline decode, node-loss detection.
    Cluster {
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// The model for the decode comparison (skipped when missing).
        #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
        model: PathBuf,
        #[arg(long, default_value_t = 1000)]
        lease_ms: u64,
    },
}

#[derive(Debug, Args)]
pub struct RemoteArgs {
    /// The node's API address.
    #[arg(long, default_value = "http://127.0.0.1:52415")]
    pub node: String,
}

#[derive(Debug, Args)]
pub struct RunnerCliArgs {
    #[arg(long)]
    pub instance: String,
    #[arg(long)]
    pub runner_id: String,
    #[arg(long)]
    pub rank: u32,
    #[arg(long)]
    pub world_size: u32,
    #[arg(long)]
    pub engine_config: String,
}

/// Runs the parsed command; returns the process exit code.
pub fn main(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Runner(args) => {
            logging::init_runner();
            Ok(runner::run(runner::RunnerArgs {
                instance_id: args.instance,
                runner_id: args.runner_id,
                rank: args.rank,
                world_size: args.world_size,
                engine_config: args.engine_config,
            }))
        }
        Command::Serve(args) => {
            logging::init(cli.log_format, "info,zenoh=warn");
            runtime()?.block_on(serve(args))?;
            Ok(0)
        }
        Command::Run(args) => {
            logging::init(cli.log_format, "warn");
            runtime()?.block_on(run(args))
        }
        Command::Bench(args) => {
            logging::init(cli.log_format, "warn");
            runtime()?.block_on(bench(args))?;
            Ok(0)
        }
        Command::Status(args) => {
            logging::init(cli.log_format, "warn");
            runtime()?.block_on(status(args, false))?;
            Ok(0)
        }
        Command::Inspect(args) => {
            logging::init(cli.log_format, "warn");
            runtime()?.block_on(status(args, true))?;
            Ok(0)
        }
    }
}

/// Worker threads of the node's runtime.
pub const RUNTIME_WORKERS: usize = 2;

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(RUNTIME_WORKERS)
        .enable_all()
        .build()?)
}

fn program() -> anyhow::Result<PathBuf> {
    std::env::current_exe().context("cannot find the shardvisor binary to start runners from")
}

/// Resolves on SIGTERM or SIGINT.
async fn terminate_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let state_dir = args
        .state_dir
        .clone()
        .unwrap_or_else(StateDir::default_path);
    let mesh = args.mesh_config();
    let advertise = mesh.as_ref().map(|m| m.advertise_host.clone());
    let node = match mesh {
        Some(config) => Node::start_clustered(&state_dir, program()?, config).await?,
        None => Node::start(&state_dir, program()?)?,
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    if let Some(host) = advertise {
        let api = if addr.ip().is_unspecified() {
            format!("{host}:{}", addr.port())
        } else {
            addr.to_string()
        };
        node.announce(api);
    }
    tracing::info!(listen = %addr, state_dir = %state_dir.display(), "node serving");
    // The one line on stdout: scripts and tests learn the port from it.
    println!("listening on {addr}");
    let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown_node = node.clone();
    tokio::spawn(async move {
        terminate_signal().await;
        tracing::info!("signal received: shutting down every instance");
        let reports = shutdown_node.shutdown_all(ShutdownMode::Drain).await;
        let unclean = reports.iter().filter(|r| !r.is_clean()).count();
        tracing::info!(instances = reports.len(), unclean, "instances shut down");
        shutdown_node.leave_cluster().await;
        let _ = stopped_tx.send(());
    });
    let app = crate::api::router(node, args.fault_injection);
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        let _ = stopped_rx.await;
    });
    // Open connections get a bounded time to finish once instances are down.
    server.await?;
    tracing::info!("node stopped");
    Ok(())
}

/// Runs `f` on an embedded node in a temporary state dir, removed after.
async fn on_embedded_node(
    f: impl AsyncFnOnce(&Arc<Node>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("shardvisor-bench-{}", std::process::id()));
    let node = Node::start(&dir, program()?)?;
    let result = f(&node).await;
    drop(node);
    let _ = std::fs::remove_dir_all(dir);
    result
}

async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    match args.what {
        BenchWhat::Lifecycle { iterations } => {
            on_embedded_node(async |node| crate::bench::lifecycle(node, iterations).await).await
        }
        BenchWhat::Cycles { n } => {
            on_embedded_node(async |node| crate::bench::cycles(node, n).await).await
        }
        BenchWhat::Model {
            model,
            runs,
            layouts,
            weights,
            threads,
            json,
            prompt_file,
            max_tokens,
        } => {
            let prompt = match prompt_file {
                Some(path) => Some(
                    std::fs::read_to_string(&path)
                        .with_context(|| format!("reading the prompt file {}", path.display()))?,
                ),
                None => None,
            };
            let options = crate::bench::ModelBench {
                path: model,
                runs,
                layouts,
                weights,
                threads,
                json,
                prompt,
                max_tokens,
            };
            on_embedded_node(async |node| crate::bench::model(node, &options).await).await
        }
        BenchWhat::Load {
            model,
            layouts,
            weights,
            clients,
            max_tokens,
            long_prompt,
            profile_clients,
        } => {
            let options = crate::bench::load::LoadBench {
                path: model,
                layouts,
                weights,
                clients,
                max_tokens,
                long_prompt,
                profile_clients,
            };
            on_embedded_node(async |node| crate::bench::load::run(node, &options).await).await
        }
        BenchWhat::Cluster {
            rounds,
            model,
            lease_ms,
        } => {
            if !model.exists() {
                eprintln!(
                    "{} is missing (scripts/fetch-model.sh): the decode comparison is skipped",
                    model.display()
                );
            }
            let options = crate::bench::cluster::ClusterBench {
                rounds,
                model: model.exists().then_some(model),
                lease_ms,
            };
            crate::bench::cluster::run(&options).await
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<i32> {
    let temp = args
        .state_dir
        .is_none()
        .then(|| std::env::temp_dir().join(format!("shardvisor-run-{}", std::process::id())));
    let state_dir = args
        .state_dir
        .clone()
        .or_else(|| temp.clone())
        .context("no state dir")?;
    let node = Node::start(&state_dir, program()?)?;
    let result = run_once(&node, &args).await;
    drop(node);
    if let Some(temp) = temp {
        let _ = std::fs::remove_dir_all(temp);
    }
    result
}

/// `run`'s model when `--model` names none: the fetched model if it is
/// there, else the scripted engine (saying so).
fn default_model() -> String {
    let dir = std::env::var_os("SHARDVISOR_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("models"));
    let path = dir.join(engine::FETCHED_MODEL);
    if path.is_file() {
        return std::path::absolute(&path)
            .unwrap_or(path)
            .display()
            .to_string();
    }
    eprintln!(
        "no --model given and {} is missing (scripts/fetch-model.sh fetches it): running the scripted engine",
        path.display()
    );
    "scripted".into()
}

async fn run_once(node: &Arc<Node>, args: &RunArgs) -> anyhow::Result<i32> {
    let started = Instant::now();
    let model = args.model.clone().unwrap_or_else(default_model);
    let is_scripted = model == "scripted";
    let scripted = is_scripted.then(|| runner::scripted::ScriptedConfig {
        token_delay_ms: args.token_delay_ms,
        ..Default::default()
    });
    let sharding = match args.sharding.as_str() {
        _ if is_scripted => None,
        "pipeline" => Some(runner::model::Sharding::Pipeline),
        "tensor" => Some(runner::model::Sharding::Tensor),
        other => bail!("--sharding must be pipeline or tensor, got {other:?}"),
    };
    let request = CreateInstance {
        model: model.clone(),
        runners: args.runners,
        scripted,
        timeouts: None,
        restart: Some(supervisor::restart::RestartConfig {
            max_restarts: 0,
            ..Default::default()
        }),
        sharding,
        layers: None,
        weights: if is_scripted { None } else { args.weights },
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
    };
    let handle = node.create_instance(request)?;
    let mut err = std::io::stderr();
    writeln!(
        err,
        "instance {} of {model} with {} runners: starting",
        handle.instance_id, args.runners
    )?;
    if let Err(cause) = handle.wait_ready().await {
        bail!("instance did not start: {cause}");
    }
    writeln!(
        err,
        "ready in {:.1} ms\n",
        started.elapsed().as_secs_f64() * 1000.0
    )?;
    let mut task = handle
        .submit(TaskSubmit {
            input: TaskInput::chat(vec![ChatTurn {
                role: "user".into(),
                content: args.prompt.clone(),
            }]),
            max_tokens: Some(args.max_tokens),
            sampling: Sampling::default(),
            stop: Vec::new(),
            trace_id: "run".into(),
            report_prompt: None,
        })
        .await?;
    let mut out = std::io::stdout();
    let mut code = 0;
    while let Some(event) = task.next().await {
        match event {
            TaskEvent::Started { .. } | TaskEvent::Prompt { .. } => {}
            TaskEvent::Token { text, .. } => {
                write!(out, "{text}")?;
                out.flush()?;
            }
            TaskEvent::Done(TaskOutcome::Completed {
                completion_tokens,
                finish_reason,
                ..
            }) => {
                writeln!(out)?;
                writeln!(
                    err,
                    "\n[{completion_tokens} tokens, finish_reason={finish_reason}]"
                )?;
            }
            TaskEvent::Done(other) => {
                writeln!(out)?;
                writeln!(err, "\ntask did not complete: {other:?}")?;
                code = 1;
            }
        }
    }
    let report = node
        .delete_instance(&handle.instance_id, ShutdownMode::Drain, None)
        .await?;
    print_report(&report);
    if !report.is_clean() {
        code = 1;
    }
    Ok(code)
}

fn print_report(report: &ShutdownReport) {
    eprintln!(
        "shutdown of {} ({:?}, {}): {:.1} ms",
        report.instance_id, report.mode, report.reason, report.total_ms
    );
    for phase in &report.phases {
        let note = if phase.timed_out {
            " (deadline reached)"
        } else {
            ""
        };
        eprintln!(
            "  {:<10} {:>8.1} ms{note}",
            format!("{:?}", phase.phase).to_lowercase(),
            phase.duration_ms
        );
    }
    eprintln!(
        "  tasks: {} drained, {} cancelled, {} failed",
        report.tasks_drained, report.tasks_cancelled, report.tasks_failed
    );
    for runner in &report.runners {
        let exit = runner
            .exit
            .map(|e| e.to_string())
            .unwrap_or_else(|| "-".into());
        let released: Vec<String> = runner
            .released
            .iter()
            .map(|r| match &r.error {
                None => format!("{} {:.1} ms", r.name, r.duration_ms),
                Some(e) => format!("{} failed: {e}", r.name),
            })
            .collect();
        eprintln!(
            "  runner {:<16} ended={} exit={exit} released=[{}]",
            runner.runner_id,
            runner.ended,
            released.join(", ")
        );
    }
    for line in &report.escalations {
        eprintln!("  escalation: {line}");
    }
    for line in &report.errors {
        eprintln!("  error: {line}");
    }
    if report.is_clean() {
        eprintln!("  clean: no escalation, no error");
    }
}

async fn status(args: RemoteArgs, inspect: bool) -> anyhow::Result<()> {
    let url = format!("{}/state", args.node.trim_end_matches('/'));
    let (code, body) = crate::client::request("GET", &url, None).await?;
    if code != 200 {
        bail!("{url} answered {code}: {body}");
    }
    let state: serde_json::Value = serde_json::from_str(&body).context("node state is not JSON")?;
    let node = &state["node"];
    println!(
        "node pid {} state_dir {} up {} ms",
        node["pid"], node["state_dir"], node["uptime_ms"]
    );
    let empty = Vec::new();
    let cluster = &state["cluster"];
    if cluster.is_object() {
        println!(
            "cluster: this is node {} (incarnation {}), lease {} ms",
            cluster["node_id"].as_str().unwrap_or("?"),
            cluster["incarnation"],
            cluster["lease_ms"]
        );
        println!(
            "  {:<12} {:>4} {:<6} {:>10} {:<22} {:>5} {:>9} {:>7}  instances",
            "node", "inc", "alive", "for_ms", "api", "cores", "free_MiB", "runners"
        );
        for m in cluster["nodes"].as_array().unwrap_or(&empty) {
            let instances: Vec<String> = m["instances"]
                .as_array()
                .unwrap_or(&empty)
                .iter()
                .map(|b| {
                    format!(
                        "{} ({})",
                        b["instance_id"].as_str().unwrap_or("?"),
                        b["state"].as_str().unwrap_or("?")
                    )
                })
                .collect();
            println!(
                "  {:<12} {:>4} {:<6} {:>10} {:<22} {:>5} {:>9} {:>7}  {}",
                m["id"].as_str().unwrap_or("?"),
                m["incarnation"].to_string(),
                m["alive"].to_string(),
                m["for_ms"].to_string(),
                m["api_addr"].as_str().unwrap_or("-"),
                m["cores"].to_string(),
                m["mem_free_bytes"]
                    .as_u64()
                    .map_or("-".into(), |b| (b >> 20).to_string()),
                m["runners"].to_string(),
                instances.join(", ")
            );
        }
        let hosted = cluster["hosted"].as_array().unwrap_or(&empty);
        if !hosted.is_empty() {
            println!("  runners hosted for other nodes:");
            for h in hosted {
                println!(
                    "    pid {:>7}  coordinator {}  link {}",
                    h["pid"].to_string(),
                    h["coordinator"].as_str().unwrap_or("?"),
                    h["link"].as_str().unwrap_or("?")
                );
            }
        }
    }
    let list = state["instances"].as_array().unwrap_or(&empty);
    if list.is_empty() {
        println!("no instances");
    }
    for instance in list {
        println!(
            "\ninstance {}  model {}  state {}  tasks {} running, {} awaiting KV room, {} waiting (max {} + {})  restarts {}",
            instance["instance_id"].as_str().unwrap_or("?"),
            instance["model"].as_str().unwrap_or("?"),
            instance["state"]["state"].as_str().unwrap_or("?"),
            instance["tasks_running"],
            instance["tasks_awaiting_kv"],
            instance["tasks_waiting"],
            instance["limits"]["max_running"],
            instance["limits"]["max_waiting"],
            instance["restarts"],
        );
        if let Some(cause) = instance["failure"]["message"].as_str() {
            println!("  failure: {cause}");
        }
        if inspect {
            println!(
                "  {:<16} {:<12} {:>7} {:<14} {:<10} {:>8} {:>8} {:>6} {:>10} {:>8}",
                "runner",
                "node",
                "pid",
                "state",
                "channel",
                "sent",
                "recv",
                "queued",
                "bytes_in",
                "idle_ms"
            );
        } else {
            println!(
                "  {:<16} {:<12} {:>7} {:<14} exit",
                "runner", "node", "pid", "state"
            );
        }
        for runner in instance["runners"].as_array().unwrap_or(&empty) {
            let ch = &runner["channel"];
            if inspect {
                println!(
                    "  {:<16} {:<12} {:>7} {:<14} {:<10} {:>8} {:>8} {:>6} {:>10} {:>8}",
                    runner["runner_id"].as_str().unwrap_or("?"),
                    runner["node"].as_str().unwrap_or("-"),
                    runner["pid"].to_string(),
                    runner_state_name(&runner["state"]),
                    ch["state"].as_str().unwrap_or("-"),
                    ch["sent"].to_string(),
                    ch["received"].to_string(),
                    ch["queued"].to_string(),
                    ch["bytes_received"].to_string(),
                    ch["idle_ms"].to_string(),
                );
            } else {
                println!(
                    "  {:<16} {:<12} {:>7} {:<14} {}",
                    runner["runner_id"].as_str().unwrap_or("?"),
                    runner["node"].as_str().unwrap_or("-"),
                    runner["pid"].to_string(),
                    runner_state_name(&runner["state"]),
                    runner["exit"].as_str().unwrap_or("-"),
                );
            }
        }
    }
    if inspect {
        let channels = state["channels"].as_array().map(|c| c.len()).unwrap_or(0);
        println!("\n{channels} channels open in the node process");
    }
    Ok(())
}

fn parse_weights(s: &str) -> Result<WeightFormat, String> {
    WeightFormat::ALL
        .into_iter()
        .find(|w| w.name() == s)
        .ok_or_else(|| format!("{s:?} is not a weight format: use auto, f32, gguf or q8_0"))
}

/// A runner state as `/state` serializes it: a bare name (`"ready"`) or a
/// one-key object (`{"loading": {"done": 3, "total": 30}}`).
fn runner_state_name(state: &serde_json::Value) -> &str {
    match state {
        serde_json::Value::String(name) => name,
        serde_json::Value::Object(map) => map.keys().next().map_or("?", String::as_str),
        _ => "?",
    }
}
