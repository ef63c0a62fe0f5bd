//! The mount's HTTP endpoint: `GET /metrics` (the counters of `stats`) and
//! `GET /health`. A minimal HTTP/1.0 responder: one request per
//! connection, bounded request size and time, anything else is a 404/400.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::debug;

use crate::stats::MountStats;

/// Longest request head read before the connection is dropped.
const REQUEST_BYTES_MAX: usize = 8 << 10;
/// Longest time a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more wait in the accept queue.
const CONNECTIONS_MAX: usize = 16;

/// Binds `addr` and serves until the runtime stops; returns the bound
/// address (for `127.0.0.1:0`).
pub async fn serve(addr: SocketAddr, stats: Arc<MountStats>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let slots = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let Ok((sock, _)) = listener.accept().await else {
                continue;
            };
            let stats = stats.clone();
            tokio::spawn(async move {
                let _permit = permit;
                if let Err(e) = answer(sock, &stats).await {
                    debug!("metrics request: {e}");
                }
            });
        }
    });
    Ok(local)
}

async fn answer(mut sock: tokio::net::TcpStream, stats: &MountStats) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
            let n = sock.read(&mut buf).await?;
            if n == 0 || head.len() + n > REQUEST_BYTES_MAX {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    if tokio::time::timeout(REQUEST_TIMEOUT, read).await.is_err() {
        return Ok(());
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (status, body) = match (parts.next(), parts.next()) {
        (Some("GET"), Some("/metrics")) => ("200 OK", stats.render()),
        (Some("GET"), Some("/health")) => ("200 OK", "ok\n".to_string()),
        (Some("GET"), Some(_)) => ("404 Not Found", "not found\n".to_string()),
        _ => ("400 Bad Request", "bad request\n".to_string()),
    };
    let reply = format!(
        "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(reply.as_bytes()).await?;
    sock.shutdown().await
}
