//! Integration tests of `ipc` over real sockets.

mod conformance;
mod property;

use tokio::net::{TcpListener, TcpStream, UnixStream};

/// A connected stream pair of either transport.
pub async fn unix_pair() -> (UnixStream, UnixStream) {
    UnixStream::pair().expect("socketpair")
}

pub async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let a = a.expect("connect");
    let (b, _) = b.expect("accept");
    a.set_nodelay(true).expect("nodelay");
    b.set_nodelay(true).expect("nodelay");
    (a, b)
}
