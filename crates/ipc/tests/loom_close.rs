//! Loom model of the close/drain protocol of a channel's send side.
//!
//! It mirrors `Sender::send` / `Sender::close` and the writer task: a send
//! decides and enqueues under the state lock, a close queues `End` under the
//! same lock, the writer pops frames and marks `End` written, and a reader
//! may concurrently see the peer vanish. Loom explores every interleaving.
//!
//! Properties: nothing accepted follows `End`; every refused message is
//! returned to its sender; the queue holds each accepted message exactly
//! once, in each sender's order; the final state agrees with what happened.

use std::collections::VecDeque;

use ipc::state::{Core, EofKind, SendSide};
use ipc::ChannelState;
use loom::sync::{Arc, Mutex};
use loom::thread;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Item {
    Data(u32, u32),
    End,
}

struct Model {
    core: Mutex<Core>,
    queue: Mutex<VecDeque<Item>>,
}

fn send(m: &Model, sender: u32, seq: u32) -> bool {
    let core = m.core.lock().unwrap();
    if core.accepts_data() {
        m.queue.lock().unwrap().push_back(Item::Data(sender, seq));
        true
    } else {
        false
    }
}

fn close(m: &Model) -> bool {
    let mut core = m.core.lock().unwrap();
    if core.begin_close() {
        m.queue.lock().unwrap().push_back(Item::End);
        true
    } else {
        false
    }
}

fn check(with_loss: bool) {
    loom::model(move || {
        let m = Arc::new(Model {
            core: Mutex::new(Core::new()),
            queue: Mutex::new(VecDeque::new()),
        });
        // One sender thread with two messages plus the main thread sending
        // one keeps the state space small enough to explore exhaustively.
        let senders: Vec<_> = (0..1u32)
            .map(|sender| {
                let m = m.clone();
                thread::spawn(move || {
                    (0..2u32)
                        .map(|seq| send(&m, sender, seq))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let main_sent = send(&m, 1, 0);
        let closer = {
            let m = m.clone();
            thread::spawn(move || close(&m))
        };
        let reader = {
            let m = m.clone();
            thread::spawn(move || {
                if with_loss {
                    Some(m.core.lock().unwrap().eof())
                } else {
                    None
                }
            })
        };
        let mut accepted: Vec<Vec<bool>> = senders.into_iter().map(|h| h.join().unwrap()).collect();
        accepted.push(vec![main_sent]);
        let closed = closer.join().unwrap();
        let loss = reader.join().unwrap();

        // The writer drains the queue.
        let written: Vec<Item> = m.queue.lock().unwrap().drain(..).collect();
        if written.contains(&Item::End) {
            m.core.lock().unwrap().end_written();
        }

        // Nothing follows End, and End is queued exactly when close won.
        let end_at = written.iter().position(|i| *i == Item::End);
        assert_eq!(end_at.is_some(), closed);
        if let Some(at) = end_at {
            assert_eq!(at, written.len() - 1, "data after End: {written:?}");
        }
        // Every accepted message is queued once, in order; no refused one is.
        for (sender, results) in accepted.iter().enumerate() {
            let queued: Vec<u32> = written
                .iter()
                .filter_map(|i| match i {
                    Item::Data(s, seq) if *s == sender as u32 => Some(*seq),
                    _ => None,
                })
                .collect();
            let wanted: Vec<u32> = results
                .iter()
                .enumerate()
                .filter(|(_, ok)| **ok)
                .map(|(seq, _)| seq as u32)
                .collect();
            assert_eq!(queued, wanted);
            // A refusal only ever follows the close or the loss, so once a
            // sender is refused it stays refused.
            let first_refused = results.iter().position(|ok| !ok);
            if let Some(at) = first_refused {
                assert!(results[at..].iter().all(|ok| !ok), "{results:?}");
            }
        }
        let core = *m.core.lock().unwrap();
        match loss {
            Some(EofKind::Lost) => assert_eq!(core.state(), ChannelState::PeerLost),
            Some(EofKind::Clean) => panic!("EOF without End cannot be clean"),
            None => {
                assert!(closed);
                assert_eq!(core.send_side(), SendSide::EndWritten);
                assert_eq!(core.state(), ChannelState::Draining);
            }
        }
    });
}

#[test]
fn close_races_sends() {
    check(false);
}

#[test]
fn close_races_sends_and_peer_loss() {
    check(true);
}
