//! Typed duplex channels between shardvisor processes.
//!
//! A channel end is a [`Sender`] and a [`Receiver`] over one byte stream (a
//! `socketpair` between node and runner, TCP between runners). Its guarantees:
//!
//! * **Announced close.** A direction ends only with an `End { reason }` frame,
//!   sent by [`Sender::close`]. The receiver yields every message sent before
//!   `End`, in order, then [`Incoming::End`].
//! * **Crash is distinguishable.** EOF, a reset or a malformed frame without a
//!   prior `End` is [`Incoming::PeerLost`], carrying how many messages arrived.
//! * **Nothing lost silently.** A send that cannot be accepted returns the
//!   message inside [`SendError`].
//! * **Bounded.** Data flows under credit: a sender writes at most as many data
//!   frames as the receiver has room for, so the receiving task never blocks on
//!   data and control frames ([`Control`]) are never stuck behind data.
//! * **Observable.** Every channel registers live [`ChannelStats`] in a
//!   per-process registry ([`stats::snapshot`]).

mod blob;
mod channel;
pub mod frame;
pub mod proto;
pub mod state;
pub mod stats;
mod transport;

pub use blob::Blob;
pub use channel::{channel, ChannelConfig, Incoming, PeerLost, Receiver, SendError, Sender};
pub use frame::{Control, FrameError, ShutdownMode};
pub use state::ChannelState;
pub use stats::ChannelStats;
pub use transport::Transport;
