//! A small HTTP proxy on loopback that counts what goes through it: `CONNECT host:port` tunnels
//! (what a client sends for an https:// URL through `HTTPS_PROXY`) and absolute-form requests
//! (`GET http://host:port/... HTTP/1.1`, what a client sends for an http:// URL through
//! `HTTP_PROXY`), each forwarded to its target as is.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What went through the proxy.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// Targets of CONNECT requests (`host:port`), one per tunnel.
    pub tunnels: Vec<String>,
    /// Absolute-form request lines (`GET http://host:port/api/instance`), one per request.
    pub requests: Vec<String>,
}

pub struct Proxy {
    /// `http://127.0.0.1:<port>`
    pub url: String,
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    pub async fn start() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let s = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(serve(client, s.clone()));
            }
        });
        Proxy { url, seen, task }
    }

    pub fn seen(&self) -> Seen {
        self.seen.lock().unwrap().clone()
    }

    /// Tunnels and requests that went to `host:port`.
    pub fn count_to(&self, authority: &str) -> usize {
        let seen = self.seen();
        seen.tunnels.iter().filter(|t| *t == authority).count()
            + seen
                .requests
                .iter()
                .filter(|r| r.contains(&format!("://{authority}/")))
                .count()
    }
}

/// Reads up to the end of a request head; returns the head and what was read after it.
async fn read_head(stream: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Some((String::from_utf8_lossy(&buf).into_owned(), rest));
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The length of a request's body, from its head (the operator's requests carry a
/// Content-Length or no body).
fn content_length(head: &str) -> usize {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

async fn serve(mut client: TcpStream, seen: Arc<Mutex<Seen>>) {
    let Some((head, mut rest)) = read_head(&mut client).await else {
        return;
    };
    let line = head.lines().next().unwrap_or_default().to_string();
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method == "CONNECT" {
        seen.lock().unwrap().tunnels.push(target.to_string());
        let Ok(mut upstream) = TcpStream::connect(target).await else {
            let _ = client
                .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
                .await;
            return;
        };
        if client
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await
            .is_err()
        {
            return;
        }
        if !rest.is_empty() && upstream.write_all(&rest).await.is_err() {
            return;
        }
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        return;
    }
    // absolute form: one request at a time, each to its own upstream connection, so every request
    // is counted (a kept-alive client connection sends the next one here too)
    let mut head = head;
    loop {
        let line = head.lines().next().unwrap_or_default().to_string();
        let Some(authority) = line
            .split(' ')
            .nth(1)
            .and_then(|t| t.split_once("://"))
            .map(|(_, r)| r.split('/').next().unwrap_or_default().to_string())
        else {
            return;
        };
        seen.lock().unwrap().requests.push(
            line.rsplit_once(' ')
                .map_or(line.as_str(), |(l, _)| l)
                .to_string(),
        );
        let length = content_length(&head);
        while rest.len() < length {
            let mut chunk = [0u8; 4096];
            match client.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => rest.extend_from_slice(&chunk[..n]),
            }
        }
        let after = rest.split_off(length);
        let Ok(mut upstream) = TcpStream::connect(&authority).await else {
            return;
        };
        // one request per upstream connection: the answer ends when the upstream closes
        let head_closed = head.replacen("\r\n\r\n", "\r\nconnection: close\r\n\r\n", 1);
        if upstream.write_all(head_closed.as_bytes()).await.is_err()
            || upstream.write_all(&rest).await.is_err()
        {
            return;
        }
        let mut answer = Vec::new();
        if upstream.read_to_end(&mut answer).await.is_err() {
            return;
        }
        // the client may keep its connection: tell it the answer's end by closing after it
        if client.write_all(&answer).await.is_err() {
            return;
        }
        rest = after;
        match next_head(&mut client, &mut rest).await {
            Some(h) => head = h,
            None => return,
        }
    }
}

/// The next request head on a kept-alive client connection.
async fn next_head(client: &mut TcpStream, rest: &mut Vec<u8>) -> Option<String> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") {
            let tail = rest.split_off(end + 4);
            let head = String::from_utf8_lossy(rest).into_owned();
            *rest = tail;
            return Some(head);
        }
        let n = client.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        rest.extend_from_slice(&chunk[..n]);
    }
}
