//! The close/drain state machine of one channel end: pure, no I/O.
//!
//! Each end tracks its two directions. The send side goes
//! `Open → EndQueued → EndWritten`; the receive side goes
//! `Open → EndReceived` or `Open → Lost`. Invariants, checked by unit tests
//! and by the loom model in `tests/loom.rs`:
//!
//! * States only move forward; `Lost` and `EndReceived` are final for the
//!   receive side.
//! * Data is accepted only while the send side is `Open` and the peer is not
//!   lost; the decision is made under the same lock that orders the `End`
//!   frame into the queue, so no accepted message can follow `End`.
//! * EOF after `End` is a clean close, never `PeerLost`.

use serde::{Deserialize, Serialize};

/// The state of a channel as a whole, as shown in stats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelState {
    /// Both directions open.
    Open,
    /// One direction has ended; the other still flows.
    Draining,
    /// Both directions ended with `End`.
    Ended,
    /// The peer went away without `End` (EOF, reset or a malformed frame).
    PeerLost,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendSide {
    Open,
    EndQueued,
    EndWritten,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecvSide {
    Open,
    EndReceived,
    Lost,
}

/// What an EOF or a read error means in the current state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EofKind {
    /// The peer announced its end before; nothing is wrong.
    Clean,
    /// The peer vanished without `End`.
    Lost,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Core {
    send: SendSide,
    recv: RecvSide,
}

impl Default for Core {
    fn default() -> Self {
        Self::new()
    }
}

impl Core {
    pub const fn new() -> Self {
        Core {
            send: SendSide::Open,
            recv: RecvSide::Open,
        }
    }

    pub fn send_side(&self) -> SendSide {
        self.send
    }

    pub fn recv_side(&self) -> RecvSide {
        self.recv
    }

    pub fn state(&self) -> ChannelState {
        match (self.send, self.recv) {
            (_, RecvSide::Lost) => ChannelState::PeerLost,
            (SendSide::EndWritten, RecvSide::EndReceived) => ChannelState::Ended,
            (SendSide::Open, RecvSide::Open) => ChannelState::Open,
            _ => ChannelState::Draining,
        }
    }

    /// May a data message be queued now?
    pub fn accepts_data(&self) -> bool {
        self.send == SendSide::Open && self.recv != RecvSide::Lost
    }

    /// Starts closing the send direction. Returns false when it was already
    /// closing (close is idempotent) or the peer is lost.
    pub fn begin_close(&mut self) -> bool {
        if self.accepts_data() {
            self.send = SendSide::EndQueued;
            true
        } else {
            false
        }
    }

    /// The `End` frame reached the socket.
    pub fn end_written(&mut self) {
        if self.send == SendSide::EndQueued {
            self.send = SendSide::EndWritten;
        }
    }

    /// The peer's `End` frame arrived.
    pub fn end_received(&mut self) {
        if self.recv == RecvSide::Open {
            self.recv = RecvSide::EndReceived;
        }
    }

    /// The stream reached EOF or failed. Decides whether that is a loss.
    pub fn eof(&mut self) -> EofKind {
        match self.recv {
            RecvSide::EndReceived => EofKind::Clean,
            RecvSide::Lost => EofKind::Lost,
            RecvSide::Open => {
                self.recv = RecvSide::Lost;
                EofKind::Lost
            }
        }
    }

    /// A write failed: the peer cannot be reached any more. After both ends
    /// announced their close this is expected (the peer exited) and harmless.
    /// It does not change the receive side: only the reader, which sees every
    /// frame the peer managed to send (its `End` included), decides that.
    pub fn write_failed(&self) -> EofKind {
        match (self.send, self.recv) {
            (SendSide::EndWritten, _) | (_, RecvSide::EndReceived) => EofKind::Clean,
            _ => EofKind::Lost,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn graceful_both_ways() {
        let mut c = Core::new();
        assert_eq!(c.state(), ChannelState::Open);
        assert!(c.begin_close());
        assert!(!c.accepts_data());
        assert_eq!(c.state(), ChannelState::Draining);
        c.end_written();
        c.end_received();
        assert_eq!(c.state(), ChannelState::Ended);
        assert_eq!(c.eof(), EofKind::Clean);
        assert_eq!(c.write_failed(), EofKind::Clean);
        assert_eq!(c.state(), ChannelState::Ended);
    }

    #[test]
    fn close_is_idempotent() {
        let mut c = Core::new();
        assert!(c.begin_close());
        assert!(!c.begin_close());
        assert_eq!(c.send_side(), SendSide::EndQueued);
    }

    #[test]
    fn eof_without_end_is_lost_and_final() {
        let mut c = Core::new();
        assert_eq!(c.eof(), EofKind::Lost);
        assert_eq!(c.state(), ChannelState::PeerLost);
        assert!(!c.accepts_data());
        assert!(!c.begin_close());
        c.end_received();
        assert_eq!(c.state(), ChannelState::PeerLost);
    }

    #[test]
    fn peer_end_then_our_data_still_flows() {
        let mut c = Core::new();
        c.end_received();
        assert!(c.accepts_data());
        assert_eq!(c.state(), ChannelState::Draining);
        assert_eq!(c.eof(), EofKind::Clean);
    }

    #[test]
    fn write_failure_before_any_end_is_loss() {
        let mut c = Core::new();
        c.end_received();
        assert_eq!(c.write_failed(), EofKind::Clean);
        let d = Core::new();
        assert_eq!(d.write_failed(), EofKind::Lost);
        // The reader decides the receive outcome, not a failed write.
        assert_eq!(d.state(), ChannelState::Open);
    }
}
