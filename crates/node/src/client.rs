//! A small HTTP/1.1 client for the CLI (`status`, `inspect`) and the
//! integration tests: plain requests, and streamed response bodies read
//! line by line (SSE).

use anyhow::{anyhow, bail, Context};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// `http://host:port/path` → (`host:port`, `/path`).
fn split_url(url: &str) -> anyhow::Result<(String, String)> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("only http:// URLs are supported: {url}"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        bail!("no host in {url}");
    }
    Ok((authority.to_string(), path.to_string()))
}

/// Sends one request; the response body is left to the caller.
pub async fn send(
    method: &str,
    url: &str,
    body: Option<String>,
) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
    let (authority, path) = split_url(url)?;
    let stream = TcpStream::connect(&authority)
        .await
        .with_context(|| format!("cannot connect to {authority}"))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut builder = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", authority);
    if body.is_some() {
        builder = builder.header("content-type", "application/json");
    }
    let request = builder.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
    sender
        .send_request(request)
        .await
        .with_context(|| format!("{method} {url}"))
}

/// Sends a request and reads the whole body.
pub async fn request(
    method: &str,
    url: &str,
    body: Option<String>,
) -> anyhow::Result<(u16, String)> {
    let response = send(method, url, body).await?;
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

/// A streamed response, read line by line.
pub struct LineStream {
    pub status: u16,
    body: hyper::body::Incoming,
    buf: Vec<u8>,
    done: bool,
}

impl LineStream {
    /// The next line (without its newline); `None` at the end of the body.
    pub async fn next_line(&mut self) -> anyhow::Result<Option<String>> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                let text = String::from_utf8_lossy(&line[..line.len() - 1]);
                return Ok(Some(text.trim_end_matches('\r').to_string()));
            }
            if self.done {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                let rest = std::mem::take(&mut self.buf);
                return Ok(Some(String::from_utf8_lossy(&rest).into_owned()));
            }
            match self.body.frame().await {
                Some(frame) => {
                    if let Ok(data) = frame?.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                None => self.done = true,
            }
        }
    }

    /// The next SSE `data:` payload; `None` at the end of the stream.
    pub async fn next_data(&mut self) -> anyhow::Result<Option<String>> {
        while let Some(line) = self.next_line().await? {
            if let Some(data) = line.strip_prefix("data:") {
                return Ok(Some(data.trim_start().to_string()));
            }
        }
        Ok(None)
    }
}

pub async fn stream(method: &str, url: &str, body: Option<String>) -> anyhow::Result<LineStream> {
    let response = send(method, url, body).await?;
    let status = response.status().as_u16();
    Ok(LineStream {
        status,
        body: response.into_body(),
        buf: Vec::new(),
        done: false,
    })
}
