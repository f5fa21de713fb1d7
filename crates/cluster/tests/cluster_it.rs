//! Integration tests: several `Cluster`s in one process, talking over 127.0.0.1.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use cluster::{
    typed_handler, Cluster, ClusterConfig, ClusterError, CommandError, CommandHandler, MemberEvent,
    Membership, NodeIdentity,
};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::{EnvFilter, LevelFilter};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

// ---------------------------------------------------------------------------------------------
// Logging: print per RUST_LOG (default warn), and record every WARN/ERROR event so tests can
// assert that *our* code stays quiet and report what zenoh said.

/// WARN/ERROR lines: (seconds since the first test started, level, target, message).
static WARNINGS: Mutex<Vec<(f64, Level, String, String)>> = Mutex::new(Vec::new());
static START: OnceLock<Instant> = OnceLock::new();

/// Our own WARNs that tests provoke on purpose.
const EXPECTED_OWN_WARNINGS: &[&str] = &["stream subscriber is not keeping up"];

struct Recorder;

struct MessageVisitor(String);

impl Visit for MessageVisitor {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        } else {
            self.0.push_str(&format!(" {}={value:?}", field.name()));
        }
    }
}

impl<S: Subscriber> Layer<S> for Recorder {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        if *meta.level() <= Level::WARN {
            let mut visitor = MessageVisitor(String::new());
            event.record(&mut visitor);
            let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
            WARNINGS
                .lock()
                .unwrap()
                .push((t, *meta.level(), meta.target().to_owned(), visitor.0));
        }
    }
}

fn init_logging() {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        START.get_or_init(Instant::now);
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
        tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_test_writer()
                    .with_filter(filter),
            )
            .with(Recorder.with_filter(LevelFilter::WARN))
            .init();
    });
}

/// Fails on unexpected WARN/ERROR from this crate; prints what zenoh logged.
fn check_logs(test: &str) {
    let warnings = WARNINGS.lock().unwrap();
    for (t, level, target, msg) in warnings.iter() {
        if target.starts_with("zenoh") {
            eprintln!("[{test}] zenoh {level} at {t:.2}s {target}: {msg}");
        }
    }
    let own: Vec<_> = warnings
        .iter()
        .filter(|(_, _, target, msg)| {
            !target.starts_with("zenoh") && !EXPECTED_OWN_WARNINGS.iter().any(|e| msg.contains(e))
        })
        .collect();
    assert!(
        own.is_empty(),
        "unexpected WARN/ERROR from our code: {own:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// A port that was free a moment ago. Ports come from below the kernel's ephemeral range
/// (32768..) so that zenoh's own outgoing connections cannot grab them between our check and
/// zenoh's bind; each process starts at a random offset so parallel test processes rarely meet.
fn free_port() -> u16 {
    static NEXT: OnceLock<std::sync::atomic::AtomicU16> = OnceLock::new();
    let next = NEXT.get_or_init(|| std::sync::atomic::AtomicU16::new(fastrand::u16(0..10_000)));
    loop {
        let port = 20_000 + next.fetch_add(1, Ordering::Relaxed) % 12_000;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn endpoint(port: u16) -> String {
    format!("tcp/127.0.0.1:{port}")
}

/// A fresh scratch directory (removed when dropped).
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "cluster-it-{tag}-{}-{}-{:08x}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn sub(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Echoes `"{name} got {request} from {from:?}"`; `fail` -> Err, `sleep` -> sleeps 5 s.
fn echo_handler(name: &'static str) -> Arc<dyn CommandHandler> {
    Arc::new(move |from: Option<String>, req: Vec<u8>| async move {
        match req.as_slice() {
            b"fail" => Err(format!("{name} refuses to fail")),
            b"sleep" => {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok(b"woke up".to_vec())
            }
            _ => Ok(
                format!("{name} got {} from {from:?}", String::from_utf8_lossy(&req)).into_bytes(),
            ),
        }
    })
}

async fn start(
    dir: &Path,
    port: u16,
    peers: &[u16],
    lease_ms: u64,
    handler: Arc<dyn CommandHandler>,
) -> Cluster {
    try_start(dir, port, peers, lease_ms, handler)
        .await
        .unwrap()
}

async fn try_start(
    dir: &Path,
    port: u16,
    peers: &[u16],
    lease_ms: u64,
    handler: Arc<dyn CommandHandler>,
) -> Result<Cluster, ClusterError> {
    let identity = NodeIdentity::load_or_create(dir).unwrap();
    let config = ClusterConfig {
        listen: vec![endpoint(port)],
        peers: peers.iter().map(|&p| endpoint(p)).collect(),
        discover: false,
        lease: Duration::from_millis(lease_ms),
    };
    Cluster::join(&config, identity, handler).await
}

/// Starts a node on a fresh port, picking another one if it was taken in the meantime.
async fn start_fresh(
    dir: &Path,
    peers: &[u16],
    lease_ms: u64,
    handler: Arc<dyn CommandHandler>,
) -> (Cluster, u16) {
    for _ in 0..5 {
        let port = free_port();
        match try_start(dir, port, peers, lease_ms, handler.clone()).await {
            Ok(cluster) => return (cluster, port),
            Err(e) if e.to_string().contains("Address already in use") => continue,
            Err(e) => panic!("join failed: {e}"),
        }
    }
    panic!("no free port after 5 attempts");
}

/// Three nodes: 2 dials 1, 3 dials only 2 (gossip must connect 1 and 3).
async fn three_nodes(tmp: &TempDir, lease_ms: u64) -> ([Cluster; 3], [u16; 3]) {
    let (n1, p1) = start_fresh(&tmp.sub("n1"), &[], lease_ms, echo_handler("n1")).await;
    let typed = typed_handler(|from: Option<String>, n: u64| async move {
        if n == 0 {
            Err("zero".to_string())
        } else {
            Ok((n * 2, from))
        }
    });
    let (n2, p2) = start_fresh(&tmp.sub("n2"), &[p1], lease_ms, Arc::new(typed)).await;
    let (n3, p3) = start_fresh(&tmp.sub("n3"), &[p2], lease_ms, echo_handler("n3")).await;
    ([n1, n2, n3], [p1, p2, p3])
}

async fn wait_members(
    c: &Cluster,
    what: &str,
    within: Duration,
    pred: impl Fn(&Membership) -> bool,
) {
    let mut rx = c.members();
    let reached = matches!(
        tokio::time::timeout(within, rx.wait_for(|m| pred(m))).await,
        Ok(Ok(_))
    );
    if !reached {
        panic!(
            "{what}: not reached within {within:?}; {} sees {:#?}",
            c.id(),
            *rx.borrow()
        );
    }
}

fn all_alive(m: &Membership, ids: &[&str]) -> bool {
    ids.iter().all(|id| m.get(*id).is_some_and(|mm| mm.alive))
}

async fn wait_mesh(nodes: &[&Cluster], within: Duration) {
    let ids: Vec<&str> = nodes.iter().map(|n| n.id()).collect();
    for n in nodes {
        wait_members(n, "all nodes alive", within, |m| all_alive(m, &ids)).await;
    }
}

async fn leave_all(nodes: impl IntoIterator<Item = Cluster>) {
    for n in nodes {
        n.leave().await;
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_identity_persists_and_increments() {
    init_logging();
    let tmp = TempDir::new("identity");
    let dir = tmp.sub("node");
    let first = NodeIdentity::load_or_create(&dir).unwrap();
    assert!(
        first.id.starts_with("n-") && first.id.len() == 10,
        "{first:?}"
    );
    assert_eq!(first.incarnation, 1);
    let second = NodeIdentity::load_or_create(&dir).unwrap();
    let third = NodeIdentity::load_or_create(&dir).unwrap();
    assert_eq!(second.id, first.id);
    assert_eq!(third.id, first.id);
    assert_eq!((second.incarnation, third.incarnation), (2, 3));
    // no temp files left behind
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");

    std::fs::write(dir.join("incarnation"), "banana\n").unwrap();
    let err = NodeIdentity::load_or_create(&dir).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    let msg = err.to_string();
    assert!(
        msg.contains("incarnation") && msg.contains("delete it"),
        "{msg}"
    );
    std::fs::remove_file(dir.join("incarnation")).unwrap();
    assert_eq!(NodeIdentity::load_or_create(&dir).unwrap().incarnation, 1);

    std::fs::write(dir.join("node-id"), "not an id").unwrap();
    let msg = NodeIdentity::load_or_create(&dir).unwrap_err().to_string();
    assert!(
        msg.contains("node-id") && msg.contains("delete it"),
        "{msg}"
    );
    check_logs("a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_three_nodes_see_each_other_and_infos() {
    init_logging();
    let t0 = Instant::now();
    let tmp = TempDir::new("mesh");
    let (nodes, _) = three_nodes(&tmp, 2000).await;
    // Publish right away, before the mesh exists: joins must trigger re-publishing.
    for (i, n) in nodes.iter().enumerate() {
        let info = n.local_node_info(format!("127.0.0.1:{}", 8000 + i), i as u32);
        assert!(info.cores >= 1 && info.mem_total_bytes > 0, "{info:?}");
        n.publish_info(&info).await.unwrap();
    }
    let refs: Vec<&Cluster> = nodes.iter().collect();
    wait_mesh(&refs, Duration::from_secs(10)).await;
    eprintln!("[b] mesh after {:?}", t0.elapsed());
    let ids: Vec<String> = nodes.iter().map(|n| n.id().to_owned()).collect();
    for n in &nodes {
        wait_members(n, "all infos", Duration::from_secs(10), |m| {
            ids.iter().enumerate().all(|(i, id)| {
                m.get(id)
                    .and_then(|mm| mm.info.as_ref())
                    .is_some_and(|info| {
                        info.api_addr == format!("127.0.0.1:{}", 8000 + i)
                            && info.runners == i as u32
                    })
            })
        })
        .await;
        let m = n.members().borrow().clone();
        assert_eq!(m.len(), 3);
        for id in &ids {
            assert_eq!(m[id].incarnation, 1);
            assert_eq!(m[id].info.as_ref().unwrap().incarnation, 1);
        }
    }
    eprintln!("[b] infos after {:?}", t0.elapsed());
    leave_all(nodes).await;
    eprintln!("[b] done after {:?}", t0.elapsed());
    check_logs("b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_commands() {
    init_logging();
    let t0 = Instant::now();
    let tmp = TempDir::new("cmd");
    let (nodes, _) = three_nodes(&tmp, 2000).await;
    let refs: Vec<&Cluster> = nodes.iter().collect();
    wait_mesh(&refs, Duration::from_secs(10)).await;
    let [n1, n2, n3] = &nodes;
    let timeout = Duration::from_secs(5);

    let resp = n1
        .command(n3.id(), b"hello".to_vec(), timeout)
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8(resp).unwrap(),
        format!("n3 got hello from Some({:?})", n1.id())
    );

    match n1.command(n3.id(), b"fail".to_vec(), timeout).await {
        Err(CommandError::Remote { node, message }) => {
            assert_eq!(node, n3.id());
            assert_eq!(message, "n3 refuses to fail");
        }
        other => panic!("expected Remote, got {other:?}"),
    }

    let started = Instant::now();
    let err = n1
        .command("n-00000000", b"x".to_vec(), timeout)
        .await
        .unwrap_err();
    assert_eq!(err, CommandError::NoSuchNode("n-00000000".into()));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert!(err.to_string().contains("n-00000000"), "{err}");

    let started = Instant::now();
    let short = Duration::from_millis(500);
    let err = n1
        .command(n3.id(), b"sleep".to_vec(), short)
        .await
        .unwrap_err();
    assert_eq!(
        err,
        CommandError::Timeout {
            node: n3.id().to_owned(),
            after: short
        }
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(err.to_string().contains(n3.id()), "{err}");

    // typed round trip against node 2's typed handler, from node 3 (a gossip-made link)
    let (doubled, from): (u64, Option<String>) =
        n3.command_typed(n2.id(), &21u64, timeout).await.unwrap();
    assert_eq!((doubled, from.as_deref()), (42, Some(n3.id())));
    let err = n3
        .command_typed::<u64, (u64, Option<String>)>(n2.id(), &0, timeout)
        .await
        .unwrap_err();
    assert!(
        matches!(err, CommandError::Remote { ref message, .. } if message == "zero"),
        "{err:?}"
    );

    // a node can command itself
    let resp = n1.command(n1.id(), b"me".to_vec(), timeout).await.unwrap();
    assert!(String::from_utf8(resp).unwrap().starts_with("n1 got me"));

    leave_all(nodes).await;
    eprintln!("[c] done after {:?}", t0.elapsed());
    check_logs("c");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_leave_and_rejoin() {
    init_logging();
    let t0 = Instant::now();
    let tmp = TempDir::new("leave");
    let (nodes, ports) = three_nodes(&tmp, 2000).await;
    let refs: Vec<&Cluster> = nodes.iter().collect();
    wait_mesh(&refs, Duration::from_secs(10)).await;
    let [n1, n2, n3] = nodes;
    let id3 = n3.id().to_owned();
    let mut ev1 = n1.events();
    let mut ev2 = n2.events();

    let left_at = Instant::now();
    n3.leave().await;
    for (n, ev) in [(&n1, &mut ev1), (&n2, &mut ev2)] {
        wait_members(n, "node 3 lost", Duration::from_secs(5), |m| {
            m.get(&id3)
                .is_some_and(|mm| !mm.alive && mm.incarnation == 1)
        })
        .await;
        let expected = MemberEvent::Left {
            id: id3.clone(),
            incarnation: 1,
        };
        wait_event(ev, &expected, Duration::from_secs(5)).await;
    }
    eprintln!("[d] node 3 seen gone after {:?}", left_at.elapsed());

    let rejoin_at = Instant::now();
    let n3 = start(
        &tmp.sub("n3"),
        ports[2],
        &[ports[1]],
        2000,
        echo_handler("n3b"),
    )
    .await;
    assert_eq!(n3.id(), id3);
    assert_eq!(n3.identity().incarnation, 2);
    for n in [&n1, &n2] {
        wait_members(n, "node 3 back", Duration::from_secs(10), |m| {
            m.get(&id3)
                .is_some_and(|mm| mm.alive && mm.incarnation == 2)
        })
        .await;
    }
    wait_mesh(&[&n1, &n2, &n3], Duration::from_secs(10)).await;
    eprintln!("[d] node 3 seen back after {:?}", rejoin_at.elapsed());
    let resp = n1
        .command(&id3, b"again".to_vec(), Duration::from_secs(5))
        .await
        .unwrap();
    assert!(String::from_utf8(resp)
        .unwrap()
        .starts_with("n3b got again"));

    leave_all([n1, n2, n3]).await;
    eprintln!("[d] done after {:?}", t0.elapsed());
    check_logs("d");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e_dropped_node_is_seen_gone() {
    init_logging();
    let t0 = Instant::now();
    let tmp = TempDir::new("drop");
    let (n1, p1) = start_fresh(&tmp.sub("n1"), &[], 1000, echo_handler("n1")).await;
    let (n2, _) = start_fresh(&tmp.sub("n2"), &[p1], 1000, echo_handler("n2")).await;
    wait_mesh(&[&n1, &n2], Duration::from_secs(10)).await;
    let id2 = n2.id().to_owned();
    let dropped_at = Instant::now();
    drop(n2);
    wait_members(&n1, "dropped node lost", Duration::from_secs(5), |m| {
        m.get(&id2).is_some_and(|mm| !mm.alive)
    })
    .await;
    eprintln!(
        "[e] dropped node seen gone after {:?}",
        dropped_at.elapsed()
    );

    // Dropping on a plain thread, and inside a current-thread runtime (where zenoh's own
    // blocking close would panic), must not panic either.
    let (n3, _) = start_fresh(&tmp.sub("n3"), &[p1], 1000, echo_handler("n3")).await;
    let (n4, _) = start_fresh(&tmp.sub("n4"), &[p1], 1000, echo_handler("n4")).await;
    let (id3, id4) = (n3.id().to_owned(), n4.id().to_owned());
    wait_mesh(&[&n1, &n3, &n4], Duration::from_secs(10)).await;
    std::thread::spawn(move || drop(n3)).join().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move { drop(n4) });
    })
    .join()
    .unwrap();
    wait_members(&n1, "dropped nodes lost", Duration::from_secs(5), |m| {
        !m[&id3].alive && !m[&id4].alive
    })
    .await;
    n1.leave().await;
    eprintln!("[e] done after {:?}", t0.elapsed());
    check_logs("e");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f_streams_in_order() {
    init_logging();
    let t0 = Instant::now();
    let tmp = TempDir::new("stream");
    let (nodes, _) = three_nodes(&tmp, 2000).await;
    let refs: Vec<&Cluster> = nodes.iter().collect();
    wait_mesh(&refs, Duration::from_secs(10)).await;
    let [n1, _n2, n3] = &nodes;

    let key = "shardvisor/test/stream";
    let mut rx = n3.subscribe(key).await.unwrap();
    let publisher = n1.publisher(key).await.unwrap();
    assert!(
        publisher
            .wait_for_subscribers(Duration::from_secs(10))
            .await
    );

    let reader = tokio::spawn(async move {
        let mut got = Vec::with_capacity(1000);
        while got.len() < 1000 {
            let (k, payload) = rx.recv().await.expect("stream ended early");
            assert_eq!(k, "shardvisor/test/stream");
            got.push(u32::from_le_bytes(payload.try_into().unwrap()));
        }
        (got, rx)
    });
    let sent_at = Instant::now();
    for i in 0u32..1000 {
        publisher.send(i.to_le_bytes().to_vec()).await.unwrap();
    }
    let (got, rx) = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .expect("1000 messages within 10 s")
        .unwrap();
    assert_eq!(got, (0..1000).collect::<Vec<u32>>());
    eprintln!("[f] 1000 messages in {:?}", sent_at.elapsed());

    // Dropping the receiver ends the subscription quietly (checked in the log check).
    drop(rx);
    for i in 0u32..20 {
        publisher.send(i.to_le_bytes().to_vec()).await.unwrap();
    }

    // A reader that does not keep up gets a complete prefix, then the end of the stream.
    let mut slow = n3
        .subscribe_with_capacity("shardvisor/test/slow", 8)
        .await
        .unwrap();
    let slow_pub = n1.publisher("shardvisor/test/slow").await.unwrap();
    assert!(slow_pub.wait_for_subscribers(Duration::from_secs(10)).await);
    for i in 0u32..100 {
        slow_pub.send(i.to_le_bytes().to_vec()).await.unwrap();
    }
    // Read nothing until the stream has been cut (all senders gone), so the cut happens at
    // exactly `capacity` messages.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !slow.is_closed() {
        assert!(
            Instant::now() < deadline,
            "slow stream was not cut; buffered {}",
            slow.len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut prefix = Vec::new();
    while let Some((_, payload)) = slow.recv().await {
        prefix.push(u32::from_le_bytes(payload.try_into().unwrap()));
    }
    assert_eq!(prefix, (0..8).collect::<Vec<u32>>());

    tokio::time::sleep(Duration::from_millis(200)).await;
    drop((publisher, slow_pub));
    leave_all(nodes).await;
    eprintln!("[f] done after {:?}", t0.elapsed());
    check_logs("f");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g_bad_config_is_explained() {
    init_logging();
    let tmp = TempDir::new("config");
    let identity = NodeIdentity::load_or_create(&tmp.sub("n")).unwrap();
    let config = ClusterConfig {
        peers: vec!["foo".into()],
        ..Default::default()
    };
    let err = Cluster::join(&config, identity.clone(), echo_handler("x"))
        .await
        .unwrap_err();
    assert!(matches!(err, ClusterError::Config(_)), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("\"foo\"") && msg.contains("peers") && msg.contains("tcp/HOST:PORT"),
        "{msg}"
    );

    let config = ClusterConfig {
        listen: vec!["tcp/127.0.0.1:notaport".into()],
        ..Default::default()
    };
    let msg = config.zenoh_config().unwrap_err().to_string();
    assert!(msg.contains("listen") && msg.contains("port"), "{msg}");

    let bad_id = NodeIdentity {
        id: "a/b".into(),
        incarnation: 1,
    };
    let err = Cluster::join(&ClusterConfig::default(), bad_id, echo_handler("x"))
        .await
        .unwrap_err();
    assert!(matches!(err, ClusterError::InvalidNodeId(_)), "{err:?}");
    check_logs("g");
}

#[test]
fn h_current_thread_runtime_is_refused() {
    init_logging();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let err = rt
        .block_on(Cluster::join(
            &ClusterConfig::default(),
            NodeIdentity {
                id: "n-1".into(),
                incarnation: 1,
            },
            echo_handler("x"),
        ))
        .unwrap_err();
    assert!(matches!(err, ClusterError::Runtime), "{err:?}");
    check_logs("h");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn i_busy_listen_port_is_an_error() {
    init_logging();
    let tmp = TempDir::new("busy");
    let holder = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let identity = NodeIdentity::load_or_create(&tmp.sub("n")).unwrap();
    let config = ClusterConfig {
        listen: vec![endpoint(port)],
        ..Default::default()
    };
    let err = Cluster::join(&config, identity, echo_handler("x"))
        .await
        .unwrap_err();
    assert!(matches!(err, ClusterError::Zenoh { .. }), "{err:?}");
    eprintln!("[i] busy port error: {err}");
    check_logs("i");
}

// ---------------------------------------------------------------------------------------------
// A TCP proxy that can cut its connections (links drop at once) or freeze them (links go
// silent, as with a network partition or a stopped process, so only the lease notices).

struct Proxy {
    port: u16,
    frozen: Arc<std::sync::atomic::AtomicBool>,
    conns: Arc<Mutex<Vec<std::net::TcpStream>>>,
}

impl Proxy {
    fn start(target: u16) -> Proxy {
        use std::sync::atomic::AtomicBool;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let frozen = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<std::net::TcpStream>>> = Arc::default();
        let (f, c) = (frozen.clone(), conns.clone());
        std::thread::spawn(move || {
            for inbound in listener.incoming() {
                let Ok(inbound) = inbound else { return };
                let Ok(outbound) = std::net::TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                c.lock()
                    .unwrap()
                    .extend([inbound.try_clone().unwrap(), outbound.try_clone().unwrap()]);
                for (from, to) in [
                    (inbound.try_clone().unwrap(), outbound.try_clone().unwrap()),
                    (outbound, inbound),
                ] {
                    let f = f.clone();
                    std::thread::spawn(move || pump(from, to, f));
                }
            }
        });
        Proxy {
            port,
            frozen,
            conns,
        }
    }

    /// Closes every current connection.
    fn cut(&self) {
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    fn freeze(&self, on: bool) {
        self.frozen.store(on, Ordering::SeqCst);
    }
}

fn pump(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    frozen: Arc<std::sync::atomic::AtomicBool>,
) {
    use std::io::{Read, Write};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        while frozen.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while frozen.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(10));
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
    let _ = from.shutdown(std::net::Shutdown::Both);
}

/// Waits for `expected`, skipping other events (the watch is updated before events are
/// broadcast, so a receiver created right after a watch change may still get that change's event).
async fn wait_event(
    ev: &mut tokio::sync::broadcast::Receiver<MemberEvent>,
    expected: &MemberEvent,
    within: Duration,
) {
    let found = tokio::time::timeout(within, async {
        loop {
            if ev.recv().await.expect("event channel open") == *expected {
                break;
            }
        }
    })
    .await;
    assert!(found.is_ok(), "no {expected:?} within {within:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn j_link_flaps_and_silence_are_followed() {
    init_logging();
    let t0 = Instant::now();
    let tmp = TempDir::new("flap");
    let lease_ms = 1000;
    let (n1, p1) = start_fresh(&tmp.sub("n1"), &[], lease_ms, echo_handler("n1")).await;
    let proxy = Proxy::start(p1);
    let (n2, _) = start_fresh(&tmp.sub("n2"), &[proxy.port], lease_ms, echo_handler("n2")).await;
    wait_mesh(&[&n1, &n2], Duration::from_secs(10)).await;
    let id2 = n2.id().to_owned();
    let mut ev = n1.events();
    let left = MemberEvent::Left {
        id: id2.clone(),
        incarnation: 1,
    };
    let joined = MemberEvent::Joined {
        id: id2.clone(),
        incarnation: 1,
    };

    // 1. The link drops (TCP closed): same incarnation goes Left, then Joined when n2 redials.
    let cut_at = Instant::now();
    proxy.cut();
    wait_event(&mut ev, &left, Duration::from_secs(5)).await;
    eprintln!("[j] cut: Left after {:?}", cut_at.elapsed());
    wait_event(&mut ev, &joined, Duration::from_secs(5)).await;
    eprintln!("[j] cut: Joined again after {:?}", cut_at.elapsed());
    wait_mesh(&[&n1, &n2], Duration::from_secs(5)).await;
    let resp = n1
        .command(&id2, b"after cut".to_vec(), Duration::from_secs(5))
        .await
        .unwrap();
    assert!(String::from_utf8(resp)
        .unwrap()
        .starts_with("n2 got after cut"));

    // 2. The link goes silent: only the lease can notice.
    let frozen_at = Instant::now();
    proxy.freeze(true);
    wait_event(&mut ev, &left, Duration::from_secs(5)).await;
    let noticed = frozen_at.elapsed();
    eprintln!("[j] freeze: Left after {noticed:?} (lease {lease_ms} ms)");
    assert!(
        noticed >= Duration::from_millis(lease_ms / 2),
        "{noticed:?}"
    );
    // Each side runs its own lease timer, so n2 notices independently (about as fast).
    let id1 = n1.id().to_owned();
    wait_members(&n2, "n2 sees n1 gone", Duration::from_secs(3), |m| {
        m.get(&id1).is_some_and(|mm| !mm.alive)
    })
    .await;
    eprintln!("[j] freeze: n2 saw n1 gone after {:?}", frozen_at.elapsed());
    proxy.freeze(false);
    let thawed_at = Instant::now();
    wait_event(&mut ev, &joined, Duration::from_secs(10)).await;
    eprintln!("[j] thaw: Joined again after {:?}", thawed_at.elapsed());
    wait_mesh(&[&n1, &n2], Duration::from_secs(5)).await;
    let resp = n1
        .command(&id2, b"after freeze".to_vec(), Duration::from_secs(5))
        .await
        .unwrap();
    assert!(String::from_utf8(resp)
        .unwrap()
        .starts_with("n2 got after freeze"));

    leave_all([n1, n2]).await;
    eprintln!("[j] done after {:?}", t0.elapsed());
    check_logs("j");
}
