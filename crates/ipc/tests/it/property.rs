//! Property tests over random sequences of send / close / drop / peer-kill.

use std::time::Duration;

use ipc::{channel, ChannelConfig, Incoming, Receiver, Sender};
use proptest::prelude::*;
use tokio::io::AsyncWriteExt;

#[derive(Debug, Clone)]
enum Op {
    Send(u32),
    Close,
}

#[derive(Debug, Clone, Copy)]
enum Finish {
    /// Keep the channel alive until the receiver saw everything.
    Nothing,
    /// Drop the sender and its receiver without `End`.
    Drop,
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(
        prop_oneof![8 => any::<u32>().prop_map(Op::Send), 1 => Just(Op::Close)],
        0..60,
    )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn drain(rx: &mut Receiver<u32>) -> (Vec<u32>, Incoming<u32>) {
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("watchdog")
        {
            Incoming::Data(v) => got.push(v),
            Incoming::Control(_) => {}
            end => return (got, end),
        }
    }
}

/// Raw peer behaviours: a process that writes frames itself and then dies.
#[derive(Debug, Clone, Copy)]
enum RawEnd {
    End,
    Eof,
    /// Killed halfway through writing a frame.
    Truncated,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Every message accepted before `End` is delivered in order exactly
    /// once; every message refused is returned; the receiver then sees `End`
    /// if the sender closed, and `PeerLost` with the right count if it was
    /// dropped without closing.
    #[test]
    fn channel_to_channel(ops in ops(), drop_at_end in any::<bool>(), window in 1u32..16) {
        let finish = if drop_at_end { Finish::Drop } else { Finish::Nothing };
        runtime().block_on(async move {
            let (a, b) = tokio::net::UnixStream::pair().unwrap();
            let mut ca = ChannelConfig::named("p-a");
            ca.window = window;
            let mut cb = ChannelConfig::named("p-b");
            cb.window = window;
            let (atx, arx): (Sender<u32>, Receiver<u32>) = channel(a, ca);
            let (_btx, mut brx): (Sender<u32>, Receiver<u32>) = channel(b, cb);
            let reader = tokio::spawn(async move { drain(&mut brx).await });
            let mut accepted = Vec::new();
            let mut closed = false;
            for op in ops {
                match op {
                    Op::Send(v) => match atx.send(v).await {
                        Ok(()) => {
                            prop_assert!(!closed, "send accepted after close");
                            accepted.push(v);
                        }
                        Err(e) => {
                            prop_assert!(closed, "send refused while open: {}", e);
                            prop_assert_eq!(e.into_inner(), v);
                        }
                    },
                    Op::Close => {
                        atx.close("bye").await.unwrap();
                        closed = true;
                    }
                }
            }
            match finish {
                Finish::Drop => {
                    drop(atx);
                    drop(arx);
                }
                Finish::Nothing if !closed => {
                    atx.close("final").await.unwrap();
                    closed = true;
                }
                Finish::Nothing => {}
            }
            let (got, end) = reader.await.unwrap();
            prop_assert_eq!(&got, &accepted);
            match end {
                Incoming::End { .. } => prop_assert!(closed),
                Incoming::PeerLost(lost) => {
                    prop_assert!(!closed, "PeerLost after a close");
                    prop_assert_eq!(lost.received, accepted.len() as u64);
                }
                other => prop_assert!(false, "unexpected {:?}", other),
            }
            Ok(())
        })?;
    }

    /// A peer that writes frames and then ends, vanishes or dies mid-frame:
    /// everything before is delivered in order, then `End` or `PeerLost`
    /// with the number of messages that arrived.
    #[test]
    fn raw_peer_kill(values in prop::collection::vec(any::<u32>(), 0..40), how in prop_oneof![Just(RawEnd::End), Just(RawEnd::Eof), Just(RawEnd::Truncated)]) {
        runtime().block_on(async move {
            let (a, mut raw) = tokio::net::UnixStream::pair().unwrap();
            let (_tx, mut rx): (Sender<u32>, Receiver<u32>) = channel(a, ChannelConfig::named("raw"));
            let mut bytes = Vec::new();
            for v in &values {
                bytes.extend(ipc::frame::encode_data(v, 1024).unwrap());
            }
            match how {
                RawEnd::End => bytes.extend(ipc::frame::encode_end("bye")),
                RawEnd::Eof => {}
                RawEnd::Truncated => {
                    let next = ipc::frame::encode_data(&u32::MAX, 1024).unwrap();
                    bytes.extend(&next[..next.len() - 1]);
                }
            }
            raw.write_all(&bytes).await.unwrap();
            drop(raw);
            let (got, end) = drain(&mut rx).await;
            prop_assert_eq!(&got, &values);
            match (how, end) {
                (RawEnd::End, Incoming::End { reason }) => prop_assert_eq!(reason, "bye"),
                (RawEnd::Eof, Incoming::PeerLost(lost)) => {
                    prop_assert_eq!(lost.received, values.len() as u64);
                    prop_assert_eq!(lost.detail, "eof without end");
                }
                (RawEnd::Truncated, Incoming::PeerLost(lost)) => {
                    prop_assert_eq!(lost.received, values.len() as u64);
                    prop_assert!(lost.detail.contains("eof inside a frame"), "{}", lost.detail);
                }
                (how, end) => prop_assert!(false, "{:?} gave {:?}", how, end),
            }
            Ok(())
        })?;
    }
}
