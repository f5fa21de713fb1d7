//! One conformance suite, run over every transport.

use std::time::Duration;

use ipc::{channel, ChannelConfig, ChannelState, Control, Incoming, Receiver, SendError, Sender};
use tokio::io::AsyncWriteExt;

async fn recv_all<T>(rx: &mut Receiver<T>) -> (Vec<T>, Incoming<T>) {
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

macro_rules! conformance {
    ($transport:ident, $pair:path) => {
        mod $transport {
            use super::*;

            async fn ends<A, B>(window: u32) -> ((Sender<A>, Receiver<B>), (Sender<B>, Receiver<A>))
            where
                A: serde::Serialize + serde::de::DeserializeOwned + Send + 'static,
                B: serde::Serialize + serde::de::DeserializeOwned + Send + 'static,
            {
                let (a, b) = $pair().await;
                let mut ca = ChannelConfig::named("a");
                ca.window = window;
                let mut cb = ChannelConfig::named("b");
                cb.window = window;
                (channel(a, ca), channel(b, cb))
            }

            #[tokio::test]
            async fn delivers_in_order_then_end_both_ways() {
                let ((atx, mut arx), (btx, mut brx)) = ends::<u64, String>(8).await;
                let sender = tokio::spawn(async move {
                    for i in 0..1000u64 {
                        atx.send(i).await.unwrap();
                    }
                    atx.close("done").await.unwrap();
                    atx
                });
                let (got, end) = recv_all(&mut brx).await;
                let atx = sender.await.unwrap();
                assert_eq!(got, (0..1000).collect::<Vec<_>>());
                assert_eq!(
                    end,
                    Incoming::End {
                        reason: "done".into()
                    }
                );
                assert_eq!(brx.state(), ChannelState::Draining);

                btx.send("reply".into()).await.unwrap();
                btx.close("bye").await.unwrap();
                let (got, end) = recv_all(&mut arx).await;
                assert_eq!(got, vec!["reply".to_string()]);
                assert_eq!(
                    end,
                    Incoming::End {
                        reason: "bye".into()
                    }
                );
                atx.finished().await;
                btx.finished().await;
                assert_eq!(atx.state(), ChannelState::Ended);
                assert_eq!(btx.state(), ChannelState::Ended);
                let stats = atx.stats();
                assert_eq!((stats.sent, stats.received, stats.queued), (1000, 1, 0));
                // Once ended, further receives repeat the end.
                assert_eq!(
                    arx.recv().await,
                    Incoming::End {
                        reason: "bye".into()
                    }
                );
            }

            #[tokio::test]
            async fn end_written_resolves_once_end_left() {
                let ((atx, _arx), (_btx, mut brx)) = ends::<u32, u32>(8).await;
                atx.send(1).await.unwrap();
                atx.close("done").await.unwrap();
                tokio::time::timeout(Duration::from_secs(10), atx.end_written())
                    .await
                    .expect("watchdog");
                assert_eq!(atx.state(), ChannelState::Draining);
                let (got, end) = recv_all(&mut brx).await;
                assert_eq!(got, vec![1]);
                assert_eq!(
                    end,
                    Incoming::End {
                        reason: "done".into()
                    }
                );
            }

            #[tokio::test]
            async fn send_after_close_returns_the_message() {
                let ((atx, _arx), (_btx, _brx)) = ends::<String, String>(8).await;
                atx.close("done").await.unwrap();
                atx.close("twice is fine").await.unwrap();
                let err = atx.send("late".into()).await.unwrap_err();
                assert!(err.to_string().contains("Draining"), "{err}");
                assert_eq!(err.into_inner(), "late");
            }

            #[tokio::test]
            async fn drop_without_end_is_peer_lost_with_count() {
                let ((atx, arx), (_btx, mut brx)) = ends::<u32, u32>(8).await;
                for i in 0..5 {
                    atx.send(i).await.unwrap();
                }
                drop(atx);
                drop(arx);
                let (got, end) = recv_all(&mut brx).await;
                assert_eq!(got, vec![0, 1, 2, 3, 4]);
                match end {
                    Incoming::PeerLost(lost) => {
                        assert_eq!(lost.received, 5);
                        assert_eq!(lost.detail, "eof without end");
                    }
                    other => panic!("expected PeerLost, got {other:?}"),
                }
                assert_eq!(brx.state(), ChannelState::PeerLost);
            }

            #[tokio::test]
            async fn send_to_lost_peer_returns_the_message() {
                let ((atx, _arx), (btx, brx)) = ends::<u32, u32>(8).await;
                drop(btx);
                drop(brx);
                // The loss is noticed by the reader; sends fail from then on.
                let mut last = Ok(());
                for i in 0..100 {
                    last = atx.send(i).await.map_err(|e| e.into_inner());
                    if last.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                assert!(last.is_err(), "sends kept succeeding to a dead peer");
                assert_eq!(atx.state(), ChannelState::PeerLost);
                assert_eq!(atx.close("x").await, Err(ChannelState::PeerLost));
            }

            #[tokio::test]
            async fn oversize_message_is_refused_with_the_message() {
                let (a, _b) = $pair().await;
                let mut config = ChannelConfig::named("small");
                config.max_frame = 1024;
                let (tx, _rx): (Sender<Vec<u8>>, Receiver<Vec<u8>>) = channel(a, config);
                let err = tx.send(vec![7u8; 4096]).await.unwrap_err();
                assert!(
                    err.to_string().contains("exceeds the limit of 1024 bytes"),
                    "{err}"
                );
                assert!(matches!(err, SendError::Frame { .. }));
                assert_eq!(err.into_inner().len(), 4096);
                // The channel stays usable.
                tx.send(vec![1, 2, 3]).await.unwrap();
            }

            #[tokio::test]
            async fn oversize_frame_from_peer_is_peer_lost_not_a_panic() {
                let (a, mut raw) = $pair().await;
                let mut config = ChannelConfig::named("small");
                config.max_frame = 1024;
                let (_tx, mut rx): (Sender<u8>, Receiver<Vec<u8>>) = channel(a, config);
                let frame = ipc::frame::encode_data(&vec![0u8; 4096], usize::MAX).unwrap();
                raw.write_all(&frame).await.unwrap();
                let (got, end) = recv_all(&mut rx).await;
                assert!(got.is_empty());
                match end {
                    Incoming::PeerLost(lost) => {
                        assert!(
                            lost.detail.contains("exceeds the limit of 1024"),
                            "{}",
                            lost.detail
                        )
                    }
                    other => panic!("expected PeerLost, got {other:?}"),
                }
            }

            #[tokio::test]
            async fn garbage_from_peer_is_peer_lost_after_good_frames() {
                let (a, mut raw) = $pair().await;
                let (_tx, mut rx): (Sender<u8>, Receiver<String>) =
                    channel(a, ChannelConfig::named("g"));
                raw.write_all(&ipc::frame::encode_data(&"ok".to_string(), 1024).unwrap())
                    .await
                    .unwrap();
                raw.write_all(&[5, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff])
                    .await
                    .unwrap();
                let (got, end) = recv_all(&mut rx).await;
                assert_eq!(got, vec!["ok".to_string()]);
                match end {
                    Incoming::PeerLost(lost) => {
                        assert_eq!(lost.received, 1);
                        assert!(lost.detail.contains("malformed"), "{}", lost.detail);
                    }
                    other => panic!("expected PeerLost, got {other:?}"),
                }
            }

            #[tokio::test]
            async fn backpressure_bounds_the_queue_and_control_overtakes_data() {
                let ((atx, _arx), (_btx, mut brx)) = ends::<Vec<u8>, Vec<u8>>(4).await;
                // Fill the peer's window, our queue and the socket buffers until
                // a send cannot complete: the receiver is not reading.
                let payload = vec![0u8; 64 * 1024];
                let mut accepted = 0u64;
                loop {
                    match tokio::time::timeout(
                        Duration::from_millis(300),
                        atx.send(payload.clone()),
                    )
                    .await
                    {
                        Ok(r) => {
                            r.unwrap();
                            accepted += 1;
                            assert!(accepted < 10_000, "send never applied backpressure");
                        }
                        Err(_) => break,
                    }
                }
                let queued = atx.stats().queued;
                assert!(queued <= 4, "queue grew past its bound: {queued}");
                // A control frame still gets through, ahead of the data queued
                // behind the full window.
                atx.send_control(Control::Cancel {
                    task_id: "t1".into(),
                })
                .await
                .unwrap();
                let mut data_before_control = 0u64;
                loop {
                    match tokio::time::timeout(Duration::from_secs(10), brx.recv())
                        .await
                        .expect("watchdog")
                    {
                        Incoming::Data(v) => {
                            assert_eq!(v.len(), payload.len());
                            data_before_control += 1;
                        }
                        Incoming::Control(c) => {
                            assert_eq!(
                                c,
                                Control::Cancel {
                                    task_id: "t1".into()
                                }
                            );
                            break;
                        }
                        other => panic!("unexpected {:?}", std::mem::discriminant(&other)),
                    }
                }
                assert!(
                    data_before_control < accepted,
                    "control waited behind all {accepted} data messages"
                );
                assert!(data_before_control <= 4, "{data_before_control} > window");
                // Draining resumes the flow: everything accepted arrives.
                let mut received = data_before_control;
                while received < accepted {
                    match tokio::time::timeout(Duration::from_secs(10), brx.recv())
                        .await
                        .expect("watchdog")
                    {
                        Incoming::Data(v) => {
                            assert_eq!(v.len(), payload.len());
                            received += 1;
                        }
                        Incoming::Control(_) => {}
                        other => panic!("unexpected {:?}", std::mem::discriminant(&other)),
                    }
                }
            }

            #[tokio::test]
            async fn ping_pong_on_the_control_lane() {
                let ((atx, mut arx), (btx, mut brx)) = ends::<u8, u8>(8).await;
                atx.send_control(Control::Ping { seq: 42 }).await.unwrap();
                let Incoming::Control(Control::Ping { seq }) = brx.recv().await else {
                    panic!("expected a ping")
                };
                btx.send_control(Control::Pong { seq }).await.unwrap();
                assert_eq!(
                    arx.recv().await,
                    Incoming::Control(Control::Pong { seq: 42 })
                );
            }

            #[tokio::test]
            async fn mebibyte_payloads_round_trip() {
                let ((atx, _arx), (_btx, mut brx)) = ends::<Vec<u8>, Vec<u8>>(8).await;
                let payload: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
                let sender = {
                    let payload = payload.clone();
                    tokio::spawn(async move {
                        for _ in 0..8 {
                            atx.send(payload.clone()).await.unwrap();
                        }
                        atx.close("done").await.unwrap();
                    })
                };
                let (got, end) = recv_all(&mut brx).await;
                sender.await.unwrap();
                assert_eq!(got.len(), 8);
                assert!(got.iter().all(|g| *g == payload));
                assert_eq!(
                    end,
                    Incoming::End {
                        reason: "done".into()
                    }
                );
            }

            #[tokio::test]
            async fn stats_show_in_the_process_registry() {
                let (a, _b) = $pair().await;
                let name = format!("registry-probe-{}", stringify!($transport));
                let (tx, _rx): (Sender<u8>, Receiver<u8>) = channel(a, ChannelConfig::named(&name));
                tx.send(1).await.unwrap();
                let found = ipc::stats::snapshot()
                    .into_iter()
                    .find(|s| s.name == name)
                    .unwrap();
                assert_eq!(found.sent, 1);
                assert_eq!(found.state, ChannelState::Open);
                drop(tx);
                drop(_rx);
            }
        }
    };
}

conformance!(unix, crate::unix_pair);
conformance!(tcp, crate::tcp_pair);
