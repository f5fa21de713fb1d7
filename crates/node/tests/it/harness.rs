//! A node under test: a real `shardvisor serve` process on a free loopback
//! port with its own state dir, and helpers to drive and inspect it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::{json, Value};

/// Fails the test instead of hanging it.
pub async fn watchdog<T>(
    what: &str,
    limit: Duration,
    fut: impl std::future::Future<Output = T>,
) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("watchdog: {what} did not happen within {limit:?}"),
    }
}

pub fn fresh_dir(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "shardvisor-it-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

pub struct TestNode {
    pub child: Child,
    pub base: String,
    pub state_dir: PathBuf,
    pub log_path: PathBuf,
    keep_dir: bool,
}

impl TestNode {
    pub fn start(tag: &str) -> TestNode {
        Self::start_in(&fresh_dir(tag), false)
    }

    /// Starts a node on `state_dir`; `keep_dir` leaves it in place on drop.
    pub fn start_in(state_dir: &Path, keep_dir: bool) -> TestNode {
        Self::start_with(state_dir, keep_dir, &[])
    }

    /// [`TestNode::start_in`] with extra `serve` arguments.
    pub fn start_with(state_dir: &Path, keep_dir: bool, extra: &[String]) -> TestNode {
        Self::start_wrapped(&[], "127.0.0.1:0", state_dir, keep_dir, extra)
    }

    /// Starts `wrapper… shardvisor serve --listen listen …` (e.g. inside a
    /// network namespace with `ip netns exec NAME`).
    pub fn start_wrapped(
        wrapper: &[&str],
        listen: &str,
        state_dir: &Path,
        keep_dir: bool,
        extra: &[String],
    ) -> TestNode {
        Self::try_start_wrapped(wrapper, listen, state_dir, keep_dir, extra)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`TestNode::start_wrapped`], or why the node did not start (its
    /// first output line and its log).
    pub fn try_start_wrapped(
        wrapper: &[&str],
        listen: &str,
        state_dir: &Path,
        keep_dir: bool,
        extra: &[String],
    ) -> Result<TestNode, String> {
        let log_path = state_dir.join(format!("node-{}.log", fastrand::u32(..)));
        let log = std::fs::File::create(&log_path).expect("log file");
        let program = env!("CARGO_BIN_EXE_shardvisor");
        let mut command = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(program);
                c
            }
            None => Command::new(program),
        };
        let mut child = command
            .args([
                "--log-format",
                "json",
                "serve",
                "--listen",
                listen,
                "--state-dir",
            ])
            .arg(state_dir)
            .args(extra)
            .env("RUST_LOG", "info,zenoh=warn")
            .env("SHARDVISOR_RUNNER_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn shardvisor serve");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read address line");
        let Some(addr) = line.trim().strip_prefix("listening on ") else {
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            return Err(format!("node did not start: {line:?}\n{log}"));
        };
        Ok(TestNode {
            child,
            base: format!("http://{addr}"),
            state_dir: state_dir.to_path_buf(),
            log_path,
            keep_dir,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        let (status, text) = node::client::request(method, &url, body.map(|b| b.to_string()))
            .await
            .expect("request");
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    pub async fn raw(&self, method: &str, path: &str, body: &str) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        let (status, text) = node::client::request(method, &url, Some(body.to_string()))
            .await
            .expect("request");
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    pub async fn create(&self, body: Value) -> String {
        let (status, v) = self.call("POST", "/instance", Some(body)).await;
        assert_eq!(status, 201, "create failed: {v}");
        v["instance_id"].as_str().expect("instance_id").to_string()
    }

    pub async fn instance(&self, id: &str) -> Value {
        let (status, v) = self.call("GET", &format!("/instance/{id}"), None).await;
        assert_eq!(status, 200, "GET /instance/{id}: {v}");
        v
    }

    /// Polls the instance until its state is one of `states`.
    pub async fn wait_state(&self, id: &str, states: &[&str], limit: Duration) -> Value {
        watchdog(
            &format!("instance {id} reaching {states:?}"),
            limit,
            async {
                loop {
                    let v = self.instance(id).await;
                    if states.contains(&state_name(&v["state"])) {
                        return v;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        )
        .await
    }

    pub async fn delete(&self, id: &str, query: &str) -> Value {
        let (status, v) = self
            .call("DELETE", &format!("/instance/{id}{query}"), None)
            .await;
        assert_eq!(status, 200, "DELETE {id}: {v}");
        v
    }

    pub async fn chat(
        &self,
        model: &str,
        prompt: &str,
        max_tokens: u32,
        stream: bool,
    ) -> node::client::LineStream {
        let body = json!({
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "stream": stream,
        });
        let url = format!("{}/v1/chat/completions", self.base);
        node::client::stream("POST", &url, Some(body.to_string()))
            .await
            .expect("chat request")
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// Lines of the node's log and of every runner log that are WARN or
    /// ERROR or mention a lost peer.
    pub fn log_problems(&self) -> Vec<String> {
        let mut files = vec![self.log_path.clone()];
        if let Ok(entries) = std::fs::read_dir(self.state_dir.join("logs")) {
            files.extend(entries.flatten().map(|e| e.path()));
        }
        let mut problems = Vec::new();
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            for line in text.lines() {
                // zenoh logs its own view of links that come and go; the
                // cluster's behaviour is judged by our own lines.
                if line.contains("\"target\":\"zenoh") {
                    continue;
                }
                let lower = line.to_lowercase();
                if line.contains("\"level\":\"WARN\"")
                    || line.contains("\"level\":\"ERROR\"")
                    || lower.contains("peer lost")
                    || line.contains("PeerLost")
                {
                    problems.push(format!("{}: {line}", file.display()));
                }
            }
        }
        problems
    }

    pub fn assert_quiet(&self) {
        let problems = self.log_problems();
        assert!(
            problems.is_empty(),
            "graceful path logged problems:\n{}",
            problems.join("\n")
        );
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !self.keep_dir && !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.state_dir);
        }
    }
}

/// `{"ready": ..}`-style or `"ready"` state values → their name.
pub fn state_name(v: &Value) -> &str {
    match v {
        Value::String(s) => s,
        Value::Object(o) => o
            .get("state")
            .and_then(|s| s.as_str())
            .or_else(|| o.keys().next().map(|k| k.as_str()))
            .unwrap_or("?"),
        _ => "?",
    }
}

/// What a client saw on one streamed chat.
#[derive(Debug, Default)]
pub struct ChatResult {
    pub status: u16,
    pub text: String,
    pub finish_reasons: Vec<String>,
    pub errors: Vec<String>,
    pub done_markers: u32,
    pub task_id: Option<String>,
}

impl ChatResult {
    /// Exactly one terminal outcome: one finish reason or one error.
    pub fn terminal_outcomes(&self) -> usize {
        self.finish_reasons.len() + self.errors.len()
    }
}

/// The task id behind a chunk's `chatcmpl-…` id.
fn task_id_of(chunk: &Value) -> Option<String> {
    chunk["id"]
        .as_str()
        .and_then(|s| s.strip_prefix("chatcmpl-"))
        .map(String::from)
}

/// Reads a streamed chat's first chunk and returns its task id.
pub async fn first_chunk_task_id(stream: &mut node::client::LineStream) -> String {
    let data = stream
        .next_data()
        .await
        .expect("sse")
        .expect("a first chunk");
    let chunk: Value = serde_json::from_str(&data).expect("sse json");
    task_id_of(&chunk).unwrap_or_else(|| panic!("first chunk has no chatcmpl- id: {chunk}"))
}

pub async fn read_chat(mut stream: node::client::LineStream) -> ChatResult {
    let mut result = ChatResult {
        status: stream.status,
        ..Default::default()
    };
    if stream.status != 200 {
        while let Some(line) = stream.next_line().await.expect("body") {
            result.errors.push(line);
        }
        return result;
    }
    while let Some(data) = stream.next_data().await.expect("sse") {
        if data == "[DONE]" {
            result.done_markers += 1;
            continue;
        }
        let v: Value = serde_json::from_str(&data).expect("sse json");
        if let Some(err) = v.get("error") {
            result
                .errors
                .push(err["message"].as_str().unwrap_or("").to_string());
            continue;
        }
        if result.task_id.is_none() {
            result.task_id = task_id_of(&v);
        }
        let choice = &v["choices"][0];
        if let Some(t) = choice["delta"]["content"].as_str() {
            result.text.push_str(t);
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            result.finish_reasons.push(f.to_string());
        }
    }
    result
}

/// Pids of live runner processes of `instance_id` (scans /proc).
pub fn runner_pids(instance_id: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        if !cmdline.contains("runner\0") || !cmdline.contains(instance_id) {
            continue;
        }
        // A zombie is dead already: only its parent's reaping is missing.
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let state = stat
            .rsplit_once(") ")
            .map(|(_, rest)| rest.chars().next().unwrap_or('?'));
        if state != Some('Z') {
            pids.push(pid);
        }
    }
    pids
}

pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Short deadlines so fault tests finish quickly.
pub fn fast_timeouts() -> Value {
    json!({
        "spawn_ms": 5000,
        "connect_ms": 1500,
        "load_ms": 1500,
        "warmup_ms": 1500,
        "ping_interval_ms": 100,
        "ping_timeout_ms": 500,
        "task_stall_ms": 1000,
        "signal_ms": 500,
        "drain_ms": 1000,
        "close_ms": 1000,
        "term_grace_ms": 300,
    })
}

/// A free TCP port on loopback for a node's cluster listener: a random one
/// below Linux's ephemeral range (32768 and up), so that no outgoing
/// connection is given it, and one that binds now. It is released before
/// the node binds it, so another test can still take it in between:
/// [`start_cluster_node`] starts the node again on a new port then.
pub fn free_port() -> u16 {
    loop {
        let port = fastrand::u16(20_000..32_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A clustered node listening on `*port`, knowing `peer`, with `extra`
/// `serve` arguments. When the port was taken between [`free_port`] and
/// the node's bind, the node is started again on a new port, which `*port`
/// holds afterwards.
pub fn start_cluster_node(
    tag: &str,
    port: &mut u16,
    peer: Option<u16>,
    lease_ms: u64,
    extra: &[String],
) -> TestNode {
    for _ in 0..5 {
        let mut args = cluster_args(*port, peer, lease_ms);
        args.extend_from_slice(extra);
        let dir = fresh_dir(tag);
        match TestNode::try_start_wrapped(&[], "127.0.0.1:0", &dir, false, &args) {
            Ok(node) => return node,
            Err(why) if why.contains("Address already in use") => {
                let _ = std::fs::remove_dir_all(&dir);
                *port = free_port();
            }
            Err(why) => panic!("{why}"),
        }
    }
    panic!("{tag}: every cluster port tried was taken before the node bound it")
}

/// A node's cluster arguments: listen on `port`, know `peer`.
pub fn cluster_args(port: u16, peer: Option<u16>, lease_ms: u64) -> Vec<String> {
    let mut args = vec![
        "--cluster-listen".to_string(),
        format!("tcp/127.0.0.1:{port}"),
        "--lease-ms".to_string(),
        lease_ms.to_string(),
    ];
    if let Some(peer) = peer {
        args.push("--peer".into());
        args.push(format!("tcp/127.0.0.1:{peer}"));
    }
    args
}

/// `n` clustered nodes on loopback, each knowing only the first; returns
/// once every node sees all `n` alive with their info.
pub async fn start_cluster(tag: &str, n: usize, lease_ms: u64) -> Vec<TestNode> {
    let mut first_port = 0;
    let nodes: Vec<TestNode> = (0..n)
        .map(|i| {
            let mut port = free_port();
            let peer = (i > 0).then_some(first_port);
            let node = start_cluster_node(&format!("{tag}-{i}"), &mut port, peer, lease_ms, &[]);
            if i == 0 {
                first_port = port;
            }
            node
        })
        .collect();
    for node in &nodes {
        node.wait_cluster(n).await;
    }
    nodes
}

impl TestNode {
    /// The node's own cluster id.
    pub async fn node_id(&self) -> String {
        let (_, state) = self.call("GET", "/state", None).await;
        state["cluster"]["node_id"]
            .as_str()
            .expect("a clustered node")
            .to_string()
    }

    /// The cluster part of `/state`.
    pub async fn cluster(&self) -> Value {
        let (status, state) = self.call("GET", "/state", None).await;
        assert_eq!(status, 200, "{state}");
        state["cluster"].clone()
    }

    /// Waits until this node sees `n` nodes alive, each with its info.
    pub async fn wait_cluster(&self, n: usize) {
        watchdog("the cluster forming", Duration::from_secs(30), async {
            loop {
                let cluster = self.cluster().await;
                let ready = cluster["nodes"].as_array().map_or(0, |nodes| {
                    nodes
                        .iter()
                        .filter(|m| m["alive"] == true && m["api_addr"].is_string())
                        .count()
                });
                if ready == n {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
    }

    /// A long streamed chat (960 tokens, most of the tiny model's context)
    /// on `id`, returned once its first token arrived.
    pub async fn streaming_chat(&self, id: &str) -> node::client::LineStream {
        let mut stream = self.chat(id, "a long story", 960, true).await;
        assert_eq!(stream.status, 200);
        first_chunk_task_id(&mut stream).await;
        stream.next_data().await.expect("sse").expect("a token");
        stream
    }

    /// Waits until this node knows instance `id` (its own, or announced by
    /// its coordinator), answering `GET /instance/{id}`.
    pub async fn wait_knows(&self, id: &str) -> Value {
        watchdog(
            &format!("instance {id} known"),
            Duration::from_secs(10),
            async {
                loop {
                    let (status, v) = self.call("GET", &format!("/instance/{id}"), None).await;
                    if status == 200 {
                        return v;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
        )
        .await
    }
}

/// A tiny random llama (seed 7) written to a fresh directory.
pub fn tiny_model(tag: &str) -> PathBuf {
    let dir = fresh_dir(tag).join("tiny-llama");
    engine::testing::write_tiny_llama(&dir, 7).expect("write tiny model");
    dir
}

/// Creates an instance and waits (up to two minutes) until it is ready.
pub async fn create_ready(node: &TestNode, body: Value) -> String {
    let id = node.create(body).await;
    let v = node
        .wait_state(&id, &["ready", "failed"], Duration::from_secs(120))
        .await;
    assert_eq!(v["state"]["state"], "ready", "{v}");
    id
}

/// Waits until no runner process of `instance` is left; returns how long
/// that took.
pub async fn wait_no_runners(instance: &str, limit: Duration) -> Duration {
    let start = std::time::Instant::now();
    watchdog(&format!("runners of {instance} gone"), limit, async {
        while !runner_pids(instance).is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    start.elapsed()
}

/// Runs the Python check script `name` beside these tests with `args`
/// within `limit`; fails the test unless it exits 0 and prints "checks
/// passed". Returns its output.
pub async fn python_checks(name: &str, args: &[String], limit: Duration) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/it")
        .join(name);
    let out = watchdog(
        &format!("python3 {name}"),
        limit,
        tokio::process::Command::new("python3")
            .arg(&script)
            .args(args)
            .output(),
    )
    .await
    .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(out.status.success(), "{name} failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("checks passed"), "{stdout}");
    stdout
}

/// Deletes instance `id` in `mode` while `clients` stream from it, and
/// checks what that leaves: one outcome each; all completed (drain) or all
/// cancelled (cancel), as the shutdown report counts them; no errors or
/// escalations, no runner left, quiet logs.
pub async fn delete_and_assert_outcomes(
    node: &TestNode,
    id: &str,
    mode: &str,
    clients: Vec<tokio::task::JoinHandle<ChatResult>>,
) {
    let report = node.delete(id, &format!("?mode={mode}")).await;
    let mut results = Vec::new();
    for client in clients {
        let result = watchdog("client end", Duration::from_secs(60), client).await;
        results.push(result.expect("client task"));
    }
    let n = results.len();
    for r in &results {
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.terminal_outcomes(), 1, "{r:?}");
        assert!(r.errors.is_empty(), "{r:?}");
        assert_eq!(r.done_markers, 1, "{r:?}");
    }
    let finishes: Vec<&str> = results
        .iter()
        .map(|r| r.finish_reasons[0].as_str())
        .collect();
    match mode {
        "drain" => {
            assert!(finishes.iter().all(|f| *f == "length"), "{finishes:?}");
            assert!(results.iter().all(|r| !r.text.is_empty()), "{results:?}");
            assert_eq!(report["tasks_drained"], n, "{report}");
        }
        _ => {
            assert!(finishes.iter().all(|f| *f == "cancelled"), "{finishes:?}");
            assert_eq!(report["tasks_cancelled"], n, "{report}");
        }
    }
    assert_eq!(report["errors"], json!([]), "{report}");
    assert_eq!(report["escalations"], json!([]), "{report}");
    assert!(runner_pids(id).is_empty());
    node.assert_quiet();
}

/// A streaming chat on its own task: its whole result.
pub fn spawn_chat(
    node: &TestNode,
    id: &str,
    prompt: &str,
    max_tokens: u32,
) -> tokio::task::JoinHandle<ChatResult> {
    let url = format!("{}/v1/chat/completions", node.base);
    let body = json!({
        "model": id,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": true,
    })
    .to_string();
    tokio::spawn(async move {
        let stream = node::client::stream("POST", &url, Some(body))
            .await
            .expect("chat request");
        read_chat(stream).await
    })
}

/// Waits until the instance runs `running` tasks and queues `waiting`.
pub async fn wait_counts(node: &TestNode, id: &str, running: u64, waiting: u64) -> Value {
    wait_view(
        node,
        id,
        &format!("{running} running and {waiting} waiting"),
        |v| v["tasks_running"] == running && v["tasks_waiting"] == waiting,
    )
    .await
}

/// Polls the instance's `/state` view until `done` holds (at most 60 s).
pub async fn wait_view(
    node: &TestNode,
    id: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    watchdog(what, Duration::from_secs(60), async {
        loop {
            let v = node.instance(id).await;
            if done(&v) {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}
