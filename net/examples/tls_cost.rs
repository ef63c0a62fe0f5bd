//! What TLS costs a connection over loopback, against plaintext in the
//! same run: request/reply round trips (metadata-sized messages) and a
//! one-way stream (sequential I/O). Run by bench/tls.sh; medians of
//! several runs, ratio TLS / plaintext.

use std::time::{Duration, Instant};

use cfs_net::ca::Ca;
use cfs_net::{Principal, Security, TlsFiles};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const RUNS: usize = 5;
const ROUND_TRIPS: usize = 20_000;
const REQUEST: usize = 200;
const REPLY: usize = 300;
const STREAM_BYTES: usize = 1 << 30;
const CHUNK: usize = 1 << 20;

async fn pair(server: Security, client: Security) -> (cfs_net::Conn, cfs_net::Conn) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let accept = tokio::spawn(async move {
        let (s, _) = l.accept().await.expect("accept");
        server.accept(s).await.expect("server handshake")
    });
    let c = client
        .connect(addr, Duration::from_secs(5))
        .await
        .expect("client handshake");
    (accept.await.expect("join"), c)
}

/// Round trips per second of REQUEST bytes out, REPLY bytes back.
async fn round_trips(server: Security, client: Security) -> f64 {
    let (mut s, mut c) = pair(server, client).await;
    let echo = tokio::spawn(async move {
        let mut req = vec![0u8; REQUEST];
        let reply = vec![7u8; REPLY];
        for _ in 0..ROUND_TRIPS {
            s.reader.read_exact(&mut req).await.expect("read request");
            s.writer.write_all(&reply).await.expect("write reply");
            s.writer.flush().await.expect("flush");
        }
    });
    let req = vec![1u8; REQUEST];
    let mut reply = vec![0u8; REPLY];
    let t = Instant::now();
    for _ in 0..ROUND_TRIPS {
        c.writer.write_all(&req).await.expect("write request");
        c.writer.flush().await.expect("flush");
        c.reader.read_exact(&mut reply).await.expect("read reply");
    }
    let secs = t.elapsed().as_secs_f64();
    echo.await.expect("join");
    ROUND_TRIPS as f64 / secs
}

/// One-way stream, MB/s.
async fn stream(server: Security, client: Security) -> f64 {
    let (mut s, mut c) = pair(server, client).await;
    let sink = tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        let mut got = 0;
        while got < STREAM_BYTES {
            let n = s.reader.read(&mut buf).await.expect("read");
            assert!(n > 0, "stream cut short");
            got += n;
        }
    });
    let chunk = vec![3u8; CHUNK];
    let t = Instant::now();
    for _ in 0..STREAM_BYTES / CHUNK {
        c.writer.write_all(&chunk).await.expect("write");
    }
    c.writer.flush().await.expect("flush");
    sink.await.expect("join");
    STREAM_BYTES as f64 / t.elapsed().as_secs_f64() / 1e6
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = std::env::temp_dir().join(format!("cfs-tls-cost-{}", std::process::id()));
    let ca = Ca::generate("bench").expect("CA");
    ca.issue_files(&Principal::Node(1), 1, &dir, "node")
        .expect("node");
    ca.issue_files(&Principal::Admin("bench".into()), 1, &dir, "admin")
        .expect("admin");
    let node = Security::load(&TlsFiles::in_dir(&dir, "node")).expect("node tls");
    let admin = Security::load(&TlsFiles::in_dir(&dir, "admin")).expect("admin tls");
    let plain = Security::plaintext();
    let (mut rt_plain, mut rt_tls, mut st_plain, mut st_tls) = (vec![], vec![], vec![], vec![]);
    // Interleaved, so drift on a shared machine hits both alike.
    for _ in 0..RUNS {
        rt_plain.push(round_trips(plain.clone(), plain.clone()).await);
        rt_tls.push(round_trips(node.clone(), admin.clone()).await);
        st_plain.push(stream(plain.clone(), plain.clone()).await);
        st_tls.push(stream(node.clone(), admin.clone()).await);
    }
    let (a, b) = (median(rt_plain), median(rt_tls));
    println!(
        "round trips ({REQUEST} B / {REPLY} B): plaintext {a:.0}/s, TLS {b:.0}/s, TLS/plaintext {:.3}",
        b / a
    );
    let (a, b) = (median(st_plain), median(st_tls));
    println!(
        "stream (1 MiB writes): plaintext {a:.0} MB/s, TLS {b:.0} MB/s, TLS/plaintext {:.3}",
        b / a
    );
    let _ = std::fs::remove_dir_all(&dir);
}
