//! Round trip and throughput of `ipc` channels, side by side with a bare tokio
//! stream doing the same work minimally (4-byte length + payload).
//!
//! Run: `cargo bench -p ipc --bench ipc_bench [-- --quick]`.
//! Prints markdown tables and `RESULT key=value` lines for scripts.

use std::time::{Duration, Instant};

use ipc::{channel, Blob, ChannelConfig, Incoming, Receiver, Sender, Transport};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream, UnixStream};

const SMALL: usize = 64;
const LARGE: usize = 1 << 20;
/// Read/write buffer of the bare baseline, the same size `ipc` uses.
const BUF: usize = 64 * 1024;

/// Payload for the one-way stream, sent as [`StaticBytes`] so the sender needs
/// no clone per message.
static PAYLOAD: [u8; LARGE] = [0; LARGE];

/// Borrowed bytes encoded like [`ipc::Blob`] (one byte string): the same wire
/// bytes, decoded on the other side as a `Blob`.
struct StaticBytes(&'static [u8]);

impl serde::Serialize for StaticBytes {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.0)
    }
}

#[derive(Clone, Copy)]
struct Plan {
    size: usize,
    warmup: usize,
    iters: usize,
    stream: usize,
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    IpcUnix,
    IpcTcp,
    BareUnix,
}

const KINDS: [Kind; 3] = [Kind::IpcUnix, Kind::IpcTcp, Kind::BareUnix];

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::IpcUnix => "ipc-unix",
            Kind::IpcTcp => "ipc-tcp",
            Kind::BareUnix => "bare-unix",
        }
    }
    fn key(self) -> String {
        self.label().replace('-', "_")
    }
}

/// Table label and RESULT key of a payload size.
fn size_names(size: usize) -> (&'static str, &'static str) {
    if size == SMALL {
        ("64 B", "64")
    } else {
        ("1 MiB", "1m")
    }
}

async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let (a, (b, _)) = (a.expect("connect"), b.expect("accept"));
    a.set_nodelay(true).expect("nodelay");
    b.set_nodelay(true).expect("nodelay");
    (a, b)
}

fn expect_data<T>(event: Incoming<T>) -> T {
    match event {
        Incoming::Data(msg) => msg,
        Incoming::Control(c) => panic!("unexpected control {c:?}"),
        Incoming::End { reason } => panic!("unexpected end: {reason}"),
        Incoming::PeerLost(lost) => panic!("peer lost: {lost}"),
    }
}

/// Ping-pong over `ipc`: A sends, B echoes, A receives. Returns one sample per
/// measured iteration.
async fn rtt_ipc<S: Transport>(a: S, b: S, plan: Plan) -> Vec<Duration> {
    let (tx_a, mut rx_a): (Sender<Blob>, Receiver<Blob>) =
        channel(a, ChannelConfig::named("bench-ping"));
    let (tx_b, mut rx_b): (Sender<Blob>, Receiver<Blob>) =
        channel(b, ChannelConfig::named("bench-echo"));
    let echo = tokio::spawn(async move {
        while let Incoming::Data(msg) = rx_b.recv().await {
            tx_b.send(msg).await.expect("echo send");
        }
        tx_b.close("echo done").await.expect("echo close");
    });
    // The echoed Vec is sent again: no payload is built per iteration here
    // (decoding on each side still allocates one).
    let mut msg = Blob(vec![0xA5u8; plan.size]);
    let mut samples = Vec::with_capacity(plan.iters);
    for i in 0..plan.warmup + plan.iters {
        let t = Instant::now();
        tx_a.send(msg).await.expect("send");
        msg = expect_data(rx_a.recv().await);
        if i >= plan.warmup {
            samples.push(t.elapsed());
        }
    }
    assert_eq!(msg.0.len(), plan.size);
    tx_a.close("done").await.expect("close");
    assert!(matches!(rx_a.recv().await, Incoming::End { .. }));
    echo.await.expect("echo task");
    samples
}

/// A bare frame: little-endian u32 length, then the payload.
fn framed(size: usize) -> Vec<u8> {
    let mut frame = (size as u32).to_le_bytes().to_vec();
    frame.resize(4 + size, 0xA5);
    frame
}

/// Reads one bare frame (header included) into `buf`; false on the
/// zero-length end marker.
async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> bool {
    let mut header = [0u8; 4];
    r.read_exact(&mut header).await.expect("read header");
    let len = u32::from_le_bytes(header) as usize;
    if len == 0 {
        return false;
    }
    buf.resize(4 + len, 0);
    buf[..4].copy_from_slice(&header);
    r.read_exact(&mut buf[4..]).await.expect("read payload");
    true
}

/// The same ping-pong on a bare UnixStream: one write per frame, buffered
/// reads with `read_exact`, an echo task on the other side.
async fn rtt_bare(plan: Plan) -> Vec<Duration> {
    let (a, b) = UnixStream::pair().expect("socketpair");
    let echo = tokio::spawn(async move {
        let mut b = BufReader::with_capacity(BUF, b);
        let mut buf = Vec::new();
        while read_frame(&mut b, &mut buf).await {
            b.get_mut().write_all(&buf).await.expect("echo write");
        }
    });
    let mut a = BufReader::with_capacity(BUF, a);
    let out = framed(plan.size);
    let mut back = Vec::new();
    let mut samples = Vec::with_capacity(plan.iters);
    for i in 0..plan.warmup + plan.iters {
        let t = Instant::now();
        a.get_mut().write_all(&out).await.expect("write");
        assert!(read_frame(&mut a, &mut back).await);
        if i >= plan.warmup {
            samples.push(t.elapsed());
        }
    }
    assert_eq!(back.len(), out.len());
    a.get_mut()
        .write_all(&0u32.to_le_bytes())
        .await
        .expect("end");
    echo.await.expect("echo task");
    samples
}

/// One-way stream of `plan.stream` messages then `End`; returns the time from
/// the start of sending until the receiver saw `End`.
async fn tput_ipc<S: Transport>(a: S, b: S, plan: Plan) -> Duration {
    let (tx, _rx_a): (Sender<StaticBytes>, Receiver<()>) =
        channel(a, ChannelConfig::named("bench-producer"));
    let (tx_b, mut rx): (Sender<()>, Receiver<Blob>) =
        channel(b, ChannelConfig::named("bench-consumer"));
    let (n, payload) = (plan.stream, &PAYLOAD[..plan.size]);
    let start = Instant::now();
    let producer = tokio::spawn(async move {
        for _ in 0..n {
            tx.send(StaticBytes(payload)).await.expect("send");
        }
        tx.close("done").await.expect("close");
        tx // kept alive until the consumer is done
    });
    let mut got = 0;
    loop {
        match rx.recv().await {
            Incoming::End { .. } => break,
            event => {
                assert_eq!(expect_data(event).0.len(), plan.size);
                got += 1;
            }
        }
    }
    let elapsed = start.elapsed();
    assert_eq!(got, n);
    let _tx = producer.await.expect("producer");
    let _ = tx_b.close("done").await;
    elapsed
}

async fn tput_bare(plan: Plan) -> Duration {
    let (a, b) = UnixStream::pair().expect("socketpair");
    let (n, frame) = (plan.stream, framed(plan.size));
    let start = Instant::now();
    let producer = tokio::spawn(async move {
        let mut w = BufWriter::with_capacity(BUF, a);
        for _ in 0..n {
            w.write_all(&frame).await.expect("write");
        }
        w.write_all(&0u32.to_le_bytes()).await.expect("end");
        w.flush().await.expect("flush");
        w
    });
    let mut r = BufReader::with_capacity(BUF, b);
    let (mut buf, mut got) = (Vec::new(), 0);
    while read_frame(&mut r, &mut buf).await {
        got += 1;
    }
    let elapsed = start.elapsed();
    assert_eq!(got, n);
    let _w = producer.await.expect("producer");
    elapsed
}

/// Round-trip samples and one-way stream time of `kind`, each on a fresh
/// connection.
async fn measure(kind: Kind, plan: Plan) -> (Vec<Duration>, Duration) {
    match kind {
        Kind::IpcUnix => {
            let (a, b) = UnixStream::pair().expect("socketpair");
            let rtt = rtt_ipc(a, b, plan).await;
            let (a, b) = UnixStream::pair().expect("socketpair");
            (rtt, tput_ipc(a, b, plan).await)
        }
        Kind::IpcTcp => {
            let (a, b) = tcp_pair().await;
            let rtt = rtt_ipc(a, b, plan).await;
            let (a, b) = tcp_pair().await;
            (rtt, tput_ipc(a, b, plan).await)
        }
        Kind::BareUnix => (rtt_bare(plan).await, tput_bare(plan).await),
    }
}

/// Median and p99 of the samples, in microseconds.
fn percentiles(mut samples: Vec<Duration>) -> (f64, f64) {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    (us(at(0.5)), us(at(0.99)))
}

async fn run(plans: [Plan; 2]) {
    let mut rtt_rows = Vec::new();
    let mut tput_rows = Vec::new();
    for plan in plans {
        let (size, key) = size_names(plan.size);
        let mut results = Vec::new();
        for kind in KINDS {
            let (samples, stream) = measure(kind, plan).await;
            let (median, p99) = percentiles(samples);
            let msgs = plan.stream as f64 / stream.as_secs_f64();
            let k = kind.key();
            println!("RESULT {k}_rtt_{key}_median_us={median:.2}");
            println!("RESULT {k}_rtt_{key}_p99_us={p99:.2}");
            println!("RESULT {k}_tput_{key}_msgs_per_s={msgs:.0}");
            results.push((kind.label(), median, p99, msgs));
        }
        let bare = results.last().map_or(1.0, |r| r.1); // BareUnix comes last
        for (label, median, p99, msgs) in results {
            let (iters, ratio) = (plan.iters, median / bare);
            let mib = msgs * plan.size as f64 / (1024.0 * 1024.0);
            rtt_rows.push(format!(
                "| {label} | {size} | {iters} | {median:.1} | {p99:.1} | {ratio:.2}x |"
            ));
            tput_rows.push(format!(
                "| {label} | {size} | {} | {msgs:.0} | {mib:.1} |",
                plan.stream
            ));
        }
    }
    println!();
    println!("### ipc round trip (ping-pong, multi-thread tokio, 2 workers)\n");
    println!("| transport | payload | iters | median µs | p99 µs | median / bare |");
    println!("|---|---|---|---|---|---|");
    rtt_rows.iter().for_each(|r| println!("{r}"));
    println!();
    println!("### ipc throughput (one way, N messages then End, timed at the receiver)\n");
    println!("| transport | payload | messages | msg/s | MiB/s |");
    println!("|---|---|---|---|---|");
    tput_rows.iter().for_each(|r| println!("{r}"));
}

fn main() {
    // `cargo bench` passes `--bench`; only `--quick` matters here.
    let quick = std::env::args().any(|a| a == "--quick");
    let plan = |size, warmup, iters, stream| Plan {
        size,
        warmup,
        iters,
        stream,
    };
    let plans = if quick {
        [plan(SMALL, 200, 2_000, 20_000), plan(LARGE, 3, 30, 50)]
    } else {
        [
            plan(SMALL, 2_000, 20_000, 200_000),
            plan(LARGE, 30, 300, 500),
        ]
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // Spawned, so every task runs on the two workers, not on this thread.
    rt.block_on(async { tokio::spawn(run(plans)).await.expect("bench") });
}
