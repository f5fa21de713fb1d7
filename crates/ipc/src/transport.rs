//! Byte streams a channel can run over. Each splits into an owned read half
//! and an owned write half, so the reader task and the writer task each own
//! exactly one half.

use tokio::io::{AsyncRead, AsyncWrite};

pub trait Transport: Send + 'static {
    type Read: AsyncRead + Unpin + Send + 'static;
    type Write: AsyncWrite + Unpin + Send + 'static;
    fn into_split(self) -> (Self::Read, Self::Write);
}

impl Transport for tokio::net::UnixStream {
    type Read = tokio::net::unix::OwnedReadHalf;
    type Write = tokio::net::unix::OwnedWriteHalf;
    fn into_split(self) -> (Self::Read, Self::Write) {
        tokio::net::UnixStream::into_split(self)
    }
}

impl Transport for tokio::net::TcpStream {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;
    fn into_split(self) -> (Self::Read, Self::Write) {
        tokio::net::TcpStream::into_split(self)
    }
}
