//! End-to-end tests against real `cfs-node` processes on loopback.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use cfs_log::client::LogClient;
use cfs_log::wire::{Role, Wire};
use cfs_log::{Position, ShardId};
use cfs_node::cluster;
use common::{bin, Cluster};

/// kill -9 the leader mid-load, restart it: every acknowledged entry is
/// present exactly once, at its acknowledged position, in one order on all
/// replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_leader_mid_load_loses_nothing_acknowledged() {
    let cl = Cluster::start("kill");
    let shard = ShardId(0);
    let client = Arc::new(cl.client());
    let acked: Arc<Mutex<HashMap<String, Position>>> = Arc::default();
    let stop_at = Instant::now() + Duration::from_secs(8);
    let mut tasks = Vec::new();
    for t in 0..16 {
        let (client, acked) = (client.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0;
            while Instant::now() < stop_at {
                let v = format!("t{t}-{i}");
                i += 1;
                if let Ok(p) = client.propose(shard, v.clone().into_bytes()).await {
                    acked.lock().unwrap().insert(v, p);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let leader = cl.leader(shard).await;
    let before = acked.lock().unwrap().len();
    cluster::stop_node(&cl.dir, leader, libc::SIGKILL, Duration::from_secs(5)).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster::start_node(&cl.dir, leader, &bin()).unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        before > 100,
        "load was running before the kill ({before} acked)"
    );
    assert!(
        acked.len() > before + 100,
        "load continued after the kill ({} acked)",
        acked.len()
    );
    let max = *acked.values().max().unwrap();

    // Every replica, including the restarted one, catches up.
    let mut logs = BTreeMap::new();
    for c in &cl.cfgs {
        let until = Instant::now() + Duration::from_secs(30);
        let reader = cl.client();
        loop {
            if let Ok((_, st)) = reader.status(c.listen).await {
                if st.iter().any(|s| s.shard == shard && s.decided > max) {
                    break;
                }
            }
            assert!(
                Instant::now() < until,
                "node {} did not catch up",
                c.node_id
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let entries = reader
            .read_range(c.listen, shard, Position::ZERO, max + 1)
            .await
            .unwrap();
        logs.insert(c.node_id, entries);
    }
    let first = logs.values().next().unwrap().clone();
    for (id, l) in &logs {
        assert_eq!(l.len(), first.len(), "node {id} length");
        for (a, b) in l.iter().zip(&first) {
            assert_eq!(a, b, "node {id} differs at position {}", a.0);
        }
    }
    let mut seen: HashMap<Vec<u8>, Position> = HashMap::new();
    for (p, e) in &first {
        if e.kind == cfs_log::EntryKind::DATA {
            if let Some(q) = seen.insert(e.payload.to_vec(), *p) {
                panic!(
                    "value {:?} at positions {q} and {p}",
                    String::from_utf8_lossy(&e.payload)
                );
            }
        }
    }
    for (v, p) in &acked {
        assert_eq!(
            seen.get(v.as_bytes()),
            Some(p),
            "acknowledged {v} not at {p}"
        );
    }
    assert!(cl.log_of(leader).contains("log node started"));
}

/// A connection with `sec`'s certificate, for writing raw frames.
fn raw_connect(sec: &cfs_net::Security, addr: std::net::SocketAddr) -> cfs_net::BlockingConn {
    let s = sec
        .connect_blocking(addr, Duration::from_secs(5))
        .expect("TLS connection");
    s.tcp()
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    s
}

fn send_frame(s: &mut impl Write, w: &Wire) {
    let mut b = Vec::new();
    w.encode_frame(&mut b);
    s.write_all(&b).unwrap();
}

/// Reads until EOF; returns the decoded messages.
fn read_all(s: &mut impl Read) -> Vec<Wire> {
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let mut out = Vec::new();
    let mut pos = 0;
    while let Ok(Some((body, used))) = cfs_log::frame::decode(&buf[pos..], 1 << 20) {
        if let Ok(w) = Wire::decode(body) {
            out.push(w);
        }
        pos += used;
    }
    out
}

fn hello(cluster_id: &str, role: Role, node_id: u64) -> Wire {
    Wire::Hello {
        protocol: cfs_log::wire::PROTOCOL_VERSION,
        cluster_id: cluster_id.into(),
        role,
        node_id,
        incarnation: 42,
    }
}

fn refusal(msgs: &[Wire]) -> String {
    match msgs.first() {
        Some(Wire::Refused { reason }) => reason.clone(),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Malformed, oversized and checksum-failing frames, a wrong cluster id and
/// duplicate node ids are refused, logged, counted, and change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_changes_nothing() {
    let cl = Cluster::start("bad");
    let target = cl.cfg(1);
    let id = cl.cfgs[0].cluster_id.clone();
    let client = cl.client();
    let p0 = client
        .propose(ShardId(0), b"before".to_vec())
        .await
        .unwrap();
    let rejected_before = cl.metric(1, "claudefs_log_rejected_connections_total");
    let admin = cl.admin();

    // Garbage bytes, without TLS: refused at the handshake.
    let mut s = TcpStream::connect(target.listen).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\nnot a frame at all")
        .unwrap();
    assert!(read_all(&mut s).is_empty());
    // Garbage bytes inside TLS.
    let mut s = raw_connect(&admin, target.listen);
    s.write_all(b"GET / HTTP/1.1\r\n\r\nnot a frame at all")
        .unwrap();
    assert!(read_all(&mut s).is_empty());
    // A frame whose checksum fails.
    let mut s = raw_connect(&admin, target.listen);
    let mut b = Vec::new();
    hello(&id, Role::Client, 0).encode_frame(&mut b);
    b[6] ^= 0xff;
    s.write_all(&b).unwrap();
    assert!(read_all(&mut s).is_empty());
    // An oversized frame before the handshake.
    let mut s = raw_connect(&admin, target.listen);
    s.write_all(&(100u32 << 20).to_le_bytes()).unwrap();
    s.write_all(&[0u8; 4]).unwrap();
    assert!(read_all(&mut s).is_empty());
    // Wrong cluster id: refused without naming this cluster's.
    let node2 = cl.issue(cfs_net::Principal::Node(2), "node-2-copy");
    let mut s = raw_connect(&node2, target.listen);
    send_frame(&mut s, &hello("someone-else", Role::Peer, 2));
    let r = refusal(&read_all(&mut s));
    assert!(r.contains("wrong cluster id") && !r.contains(&id), "{r}");
    // A peer claiming the target's own id (with that node's certificate).
    let node1 = cl.issue(cfs_net::Principal::Node(1), "node-1-copy");
    let mut s = raw_connect(&node1, target.listen);
    send_frame(&mut s, &hello(&id, Role::Peer, 1));
    assert!(refusal(&read_all(&mut s)).contains("duplicate node id"));
    // A second process claiming node 2 while node 2 is connected.
    let mut s = raw_connect(&node2, target.listen);
    send_frame(&mut s, &hello(&id, Role::Peer, 2));
    assert!(refusal(&read_all(&mut s)).contains("duplicate node id"));
    // A stranger with a node certificate of this CA.
    let node99 = cl.issue(cfs_net::Principal::Node(99), "node-99");
    let mut s = raw_connect(&node99, target.listen);
    send_frame(&mut s, &hello(&id, Role::Peer, 99));
    assert!(refusal(&read_all(&mut s)).contains("not a member"));
    // A node certificate used with another node id.
    let mut s = raw_connect(&node2, target.listen);
    send_frame(&mut s, &hello(&id, Role::Peer, 3));
    let r = refusal(&read_all(&mut s));
    assert!(r.contains("node 2 claimed to be node 3"), "{r}");
    // An administrator posing as a peer.
    let mut s = raw_connect(&admin, target.listen);
    send_frame(&mut s, &hello(&id, Role::Peer, 3));
    let r = refusal(&read_all(&mut s));
    assert!(r.contains("claimed to be node 3"), "{r}");
    // A client proposing a reserved kind gets an error, not a decision.
    let bad = cfs_log::Entry::new(cfs_log::EntryKind(1), client.next_request(), Vec::new());
    assert!(matches!(
        client.propose_entry(ShardId(0), bad).await,
        Err(cfs_log::LogError::Invalid(_))
    ));
    // So does one proposing a raw namespace or transaction entry: those
    // come only from the metadata service inside a node.
    for kind in [
        cfs_log::entry::KIND_USER_MIN,
        cfs_log::entry::KIND_USER_MIN + 1,
        0x1ff,
    ] {
        let raw = cfs_log::Entry::new(cfs_log::EntryKind(kind), client.next_request(), vec![1; 16]);
        match client.propose_entry(ShardId(0), raw).await {
            Err(cfs_log::LogError::Invalid(m)) => assert!(m.contains("inside a node"), "{m}"),
            other => panic!("kind {kind:#x} from a remote client: {other:?}"),
        }
    }

    assert!(
        cl.metric_at_least(
            1,
            "claudefs_log_rejected_connections_total",
            rejected_before + 7
        ) >= rejected_before + 7
    );
    let log = cl.log_of(1);
    assert!(log.contains("closing connection"), "reason logged");
    // Nothing changed: the next entry follows directly, or after the
    // barriers of new leaders' terms (D41) if leadership moved meanwhile.
    let p1 = client.propose(ShardId(0), b"after".to_vec()).await.unwrap();
    only_barriers_between(&cl, &client, ShardId(0), p0, p1).await;
    cluster::wait_healthy(&cl.cfgs, Duration::from_secs(5)).unwrap();
}

fn flip_byte(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x40;
    f.write_all_at(&b, offset).unwrap();
}

/// A node whose log disk fills stops its shards and says so on /health
/// (503 naming them) instead of staying healthy; the other two go on. (A
/// follower cannot refuse what the leader replicates: its headroom only
/// stops proposals made through it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_log_disk_fails_the_node_visibly() {
    // Node 1: the lowest id loses leader-affinity ties.
    const SMALL: u64 = 1;
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let mounted = std::cell::RefCell::new(None);
    let cl = Cluster::start_with("walfull", |cfg| {
        cfg.wal_segment_mib = 1;
        if cfg.node_id == SMALL {
            cfg.election_ticks *= 10;
            let wal = cfg.data_dir.join("log/wal");
            std::fs::create_dir_all(&wal).unwrap();
            let ok = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=6m", "tmpfs"])
                .arg(&wal)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "mounting a tmpfs needs root");
            *mounted.borrow_mut() = Some(Unmount(wal));
        }
    });
    let _unmount = mounted.take();
    // The small node must be a follower: a leader low on log space refuses new
    // proposals before its disk fills (a_log_disk_low_on_space_… in
    // fs.rs). Its long election timeout (above) leaves the first
    // elections to the others, and leader affinity never moves the
    // shards to a node low on log space.
    let leader = cl.wait_leaders_together();
    assert_ne!(leader, SMALL);
    let client = LogClient::new(
        &cl.cfgs[0].cluster_id,
        vec![cl.cfg(leader).listen],
        cl.admin(),
    );
    let payload = vec![5u8; 1024];
    let until = Instant::now() + Duration::from_secs(120);
    let mut failed = String::new();
    let (mut n, mut errors) = (0, 0);
    while failed.is_empty() {
        assert!(
            Instant::now() < until,
            "the small node never reported its full log disk"
        );
        for _ in 0..200 {
            // A leader change (affinity) may time a proposal out: retried.
            match client.propose(ShardId(0), payload.clone()).await {
                Ok(_) => n += 1,
                Err(e) => {
                    errors += 1;
                    assert!(errors < 20, "after {n} entries: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        let (code, body) = cluster::http_get(cl.cfg(SMALL).http, "/health").unwrap();
        if code == 503 && body.contains("failed") {
            failed = body;
        }
    }
    eprintln!("after {n} entries node {SMALL} says: {failed}");
    assert!(failed.contains("shard 0 failed"), "{failed}");
    assert!(failed.contains("No space left"), "{failed}");
    // The majority goes on.
    client.propose(ShardId(0), b"after".to_vec()).await.unwrap();
    let (code, body) = cluster::http_get(cl.cfg(leader).http, "/health").unwrap();
    assert_eq!(code, 200, "{body}");
}

/// A corrupt log file is detected at start, naming the file and offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_log_file_is_reported_at_start() {
    let cl = Cluster::start("corrupt");
    let client = cl.client();
    for i in 0..50 {
        client
            .propose(ShardId(1), format!("v{i}").into_bytes())
            .await
            .unwrap();
    }
    cluster::stop_node(&cl.dir, 3, libc::SIGTERM, Duration::from_secs(10)).unwrap();
    let seg = cl.cfg(3).data_dir.join("log/wal/seg-0000000000000000.wal");
    flip_byte(&seg, 200);
    let out = std::process::Command::new(bin())
        .arg("--config")
        .arg(cluster::node_dir(&cl.dir, 3).join("config.toml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("corrupt log file")
            && err.contains("seg-0000000000000000.wal")
            && err.contains("offset"),
        "{err}"
    );
}

/// A leader cut off from its followers cannot serve a linearizable read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_leader_cannot_serve_a_read_barrier() {
    let cl = Cluster::start("lease");
    let shard = ShardId(0);
    let leader = cl.leader(shard).await;
    let mut client = LogClient::new(
        &cl.cfgs[0].cluster_id,
        vec![cl.cfg(leader).listen],
        cl.admin(),
    );
    client.timeout = Duration::from_secs(3);
    let p0 = client.read_barrier(shard).await.unwrap();
    eprintln!("leader {leader} barrier at {p0}");
    let others: Vec<u64> = (1..=3).filter(|i| *i != leader).collect();
    let pids: Vec<i32> = others
        .iter()
        .map(|i| cluster::running_pid(&cl.dir, *i).unwrap())
        .collect();
    for p in &pids {
        // SAFETY: signalling processes this test started.
        unsafe { libc::kill(*p, libc::SIGSTOP) };
    }
    // SIGSTOP takes effect asynchronously: wait until both are stopped.
    for p in &pids {
        while !std::fs::read_to_string(format!("/proc/{p}/stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('T')
            })
            .unwrap_or(true)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let t = Instant::now();
    let r = client.read_barrier(shard).await;
    eprintln!("second barrier {r:?} after {:?}", t.elapsed());
    for p in &pids {
        // SAFETY: as above.
        unsafe { libc::kill(*p, libc::SIGCONT) };
    }
    assert!(r.is_err(), "isolated leader answered a read barrier: {r:?}");
    client.timeout = Duration::from_secs(20);
    let c2 = cl.client();
    c2.read_barrier(shard).await.unwrap();
}

/// A mount may not propose what only metadata services may (transaction
/// steps, breaking a lapsed hold), nor take or release another client's
/// locks: each is refused with EPERM, and nothing reaches the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_only_steps_and_other_clients_locks_are_refused() {
    use cfs_client::conn::MetaClient;
    use cfs_proto::ops::{Op, Request};
    use cfs_proto::tx::TxId;
    use cfs_proto::types::{Creds, Errno, LockRange, ROOT_INO};

    let cl = Cluster::start("refused-ops");
    let (meta, _inval) = MetaClient::new(
        cluster::meta_servers(&cl.cfgs),
        cl.cfgs[0].cluster_id.clone(),
        cluster::mount_security(&cl.dir).unwrap(),
        Duration::from_secs(20),
    );
    let creds = Creds {
        uid: 0,
        gid: 0,
        groups: Vec::new(),
    };
    // A first call opens the session.
    meta.call(Request::StatFs, true).await.unwrap();
    let log = cl.client();
    let shards = [ShardId(0), ShardId(1)];
    let mut before = Vec::new();
    for s in shards {
        before.push(log.propose(s, b"before".to_vec()).await.unwrap());
    }

    let other = meta.client_id ^ 0x10;
    let lock = LockRange {
        start: 0,
        end: u64::MAX,
        typ: libc::F_WRLCK,
        client: other,
        owner: 1,
        pid: 1,
        flock: false,
    };
    let refused = [
        Op::Lock {
            ino: ROOT_INO,
            lock,
        },
        Op::ReleaseLocks {
            ino: ROOT_INO,
            client: other,
            owner: 1,
            flock: false,
        },
        Op::ExpireHold {
            shard: ShardId(0),
            client: other,
        },
        Op::TxFinish {
            tx: TxId::new(other, 1),
            shard: ShardId(1),
            commit: true,
        },
    ];
    for op in refused {
        let what = format!("{op:?}");
        for early in [false, true] {
            let r = meta
                .call(
                    Request::Mutate {
                        op_id: 0,
                        creds: creds.clone(),
                        op: op.clone(),
                        early,
                    },
                    true,
                )
                .await;
            assert_eq!(r.err(), Some(Errno::EPERM), "{what} (early {early})");
        }
    }
    // Nothing reached the log: the next entry of each shard follows
    // directly.
    for (s, p0) in shards.into_iter().zip(before) {
        let p1 = log.propose(s, b"after".to_vec()).await.unwrap();
        only_barriers_between(&cl, &log, s, p0, p1).await;
    }
    let logged = cl.log_of(1) + &cl.log_of(2) + &cl.log_of(3);
    assert!(logged.contains("only metadata services may propose"));
    assert!(logged.contains("a lock operation for another client"));
}

/// The metadata port plays safe with peers that hold a connection without
/// a Hello (slow loris) or that send requests and never read the replies:
/// both are closed, and the node stays healthy for everyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_sessions_are_bounded() {
    use cfs_proto::ops::{Request, RequestFrame};
    let cl = Cluster::start("meta-bounds");
    let addr = cl.cfg(1).meta_listen.expect("metadata service");
    // Slow loris: connected, nothing sent. Closed within the handshake
    // timeout (5 s).
    let started = Instant::now();
    let mut idle = TcpStream::connect(addr).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut buf = [0u8; 64];
    let n = idle.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );

    // A client that floods requests and never reads: its session is
    // closed once a bounded number of messages is queued for it.
    let mut s = raw_connect(&cluster::mount_security(&cl.dir).unwrap(), addr);
    let frame = |id: u64, req: Request| {
        let mut out = Vec::new();
        cfs_frame::encode_with(&mut out, |o| {
            bincode::serialize_into(
                o,
                &RequestFrame {
                    id,
                    fresh: false,
                    req,
                },
            )
        })
        .unwrap();
        out
    };
    let hello = Request::Hello {
        cluster_id: cl.cfgs[0].cluster_id.clone(),
        client_id: 0xbad,
    };
    s.write_all(&frame(1, hello)).unwrap();
    let mut batch = Vec::new();
    for id in 2..1_002u64 {
        batch.extend(frame(id, Request::GetAttr { ino: 1 }));
    }
    s.tcp()
        .set_write_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut sent = 0u64;
    let closed = loop {
        if s.write_all(&batch).is_err() {
            break true;
        }
        sent += 1000;
        if sent >= 2_000_000 {
            break false;
        }
    };
    assert!(
        closed,
        "the node kept a session that read none of {sent} replies"
    );
    assert!(
        cl.log_of(1).contains("client stopped reading its replies"),
        "the reason is logged"
    );
    eprintln!("closed after {sent} requests");
    cluster::wait_healthy(&cl.cfgs, Duration::from_secs(10)).unwrap();
}

/// One address cannot hold more than `connections_per_peer` connections
/// on any listener: the rest are closed at once, and the node serves
/// everyone again once they are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_address_are_bounded() {
    const MAX: usize = 16;
    let cl = Cluster::start_with("conn-limit", |cfg| cfg.connections_per_peer = MAX);
    let c = cl.cfg(1);
    let ports = [
        ("log", c.listen),
        ("segments", c.segments_listen.expect("segment server")),
        ("metadata", c.meta_listen.expect("metadata service")),
    ];
    for (what, addr) in ports {
        let conns: Vec<TcpStream> = (0..MAX + 24)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        let (mut open, mut closed) = (0, 0);
        for mut s in conns.iter() {
            s.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            let mut b = [0u8; 16];
            match s.read(&mut b) {
                Ok(0) => closed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => open += 1,
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => open += 1,
                // A reset counts as closed too.
                Err(_) => closed += 1,
                Ok(_) => panic!("{what}: the node spoke first"),
            }
        }
        eprintln!("{what}: {open} open, {closed} closed");
        assert!(
            open <= MAX,
            "{what}: {open} connections kept from one address"
        );
        assert!(closed >= 24, "{what}: only {closed} refused");
        drop(conns);
    }
    assert!(cl.log_of(1).contains("too many open from this address"));
    cluster::wait_healthy(&cl.cfgs, Duration::from_secs(20)).unwrap();
    cl.client()
        .propose(ShardId(0), b"after".to_vec())
        .await
        .unwrap();
}

/// A log client cannot open subscriptions without end on one connection:
/// past the bound each is refused with a message, and the first ones keep
/// streaming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_per_connection_are_bounded() {
    use cfs_log::runtime::SUBSCRIPTIONS_PER_CONNECTION_MAX as MAX;
    let cl = Cluster::start("sub-limit");
    let client = cl.client();
    client.propose(ShardId(0), b"one".to_vec()).await.unwrap();
    let mut s = raw_connect(&cl.admin(), cl.cfg(1).listen);
    send_frame(&mut s, &hello(&cl.cfgs[0].cluster_id, Role::Client, 0));
    for id in 0..(MAX as u64 + 8) {
        send_frame(
            &mut s,
            &Wire::Subscribe {
                id,
                shard: ShardId(0),
                from: Position(0),
            },
        );
    }
    s.tcp()
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let msgs = read_all(&mut s);
    let refused: Vec<u64> = msgs
        .iter()
        .filter_map(|m| match m {
            Wire::Entries {
                id,
                result: Err(cfs_log::LogError::Invalid(e)),
            } if e.contains("too many subscriptions") => Some(*id),
            _ => None,
        })
        .collect();
    let streaming = msgs
        .iter()
        .filter(|m| matches!(m, Wire::Entries { result: Ok(_), .. }))
        .count();
    assert_eq!(refused.len(), 8, "{refused:?}");
    assert!(refused.iter().all(|id| *id >= MAX as u64), "{refused:?}");
    assert!(
        streaming >= MAX,
        "the first {MAX} stream ({streaming} batches)"
    );
}

/// Every listener refuses a peer without a certificate of this cluster's
/// CA (no certificate, another cluster's); a mount's certificate gets
/// neither the log nor the administrative segment calls. Each refusal is
/// an error naming the reason, logged with the peer, and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_without_the_right_certificate_are_refused() {
    use cfs_client::conn::MetaClient;
    use cfs_proto::ops::Request;
    use cfs_segments::client::{ClientError, SegmentClient};
    use cfs_segments::store::StoreError;

    let cl = Cluster::start("tls-refusals");
    let id = cl.cfgs[0].cluster_id.clone();
    let log = cl.client();
    let p0 = log.propose(ShardId(0), b"before".to_vec()).await.unwrap();
    let other_ca = tempfile::tempdir().unwrap();
    let stranger = {
        let ca = cfs_net::ca::Ca::generate("other").unwrap();
        let who = cfs_net::Principal::Admin("local".into());
        ca.issue_files(&who, 1, other_ca.path(), "admin").unwrap();
        cfs_net::Security::load(&cfs_net::TlsFiles::in_dir(other_ca.path(), "admin")).unwrap()
    };
    for (what, sec) in [
        ("no certificate", cfs_net::Security::plaintext()),
        ("another cluster's certificate", stranger),
    ] {
        let mut c = LogClient::new(&id, vec![cl.cfg(1).listen], sec.clone());
        c.timeout = Duration::from_secs(3);
        assert!(c.status(cl.cfg(1).listen).await.is_err(), "log, {what}");
        let s = SegmentClient::new(&id, cluster::segment_servers(&cl.cfgs), sec.clone());
        let r = s.stat(1).await;
        assert!(
            matches!(r, Err(ClientError::Unreachable { .. })),
            "segments, {what}: {r:?}"
        );
        let (m, _inval) = MetaClient::new(
            vec![cl.cfg(1).meta_listen.unwrap()],
            id.clone(),
            sec,
            Duration::from_secs(3),
        );
        assert!(
            m.call(Request::StatFs, true).await.is_err(),
            "metadata, {what}"
        );
    }
    // A mount's certificate: no log access, no administrative calls, but
    // the rest of the segment protocol.
    let mount = cluster::mount_security(&cl.dir).unwrap();
    let mut c = LogClient::new(&id, vec![cl.cfg(1).listen], mount.clone());
    c.timeout = Duration::from_secs(3);
    match c.status(cl.cfg(1).listen).await {
        Err(e) => assert!(e.to_string().contains("may not use the log"), "{e}"),
        Ok(s) => panic!("a mount read the log's status: {s:?}"),
    }
    let s = SegmentClient::new(&id, cluster::segment_servers(&cl.cfgs), mount);
    s.stat(1).await.unwrap();
    let r = s.list(1).await;
    assert!(
        matches!(
            r,
            Err(ClientError::Store {
                error: StoreError::Denied(_),
                ..
            })
        ),
        "{r:?}"
    );
    let logged = cl.log_of(1);
    for reason in [
        "tls handshake",
        "may not use the log",
        "administrative segment request refused",
    ] {
        assert!(logged.contains(reason), "{reason:?} not logged");
    }
    // ... and counted where an administrator looks.
    let (_, metrics) = cluster::http_get(cl.cfg(1).http, "/metrics").unwrap();
    let denied = metrics
        .lines()
        .find_map(|l| l.strip_prefix("claudefs_segments_refused_total{reason=\"denied\"} "))
        .and_then(|v| v.parse::<u64>().ok());
    assert!(
        denied >= Some(1),
        "refusals counted: {:?}",
        metrics
            .lines()
            .filter(|l| l.contains("refused_total"))
            .collect::<Vec<_>>()
    );
    // Nothing changed: the next entry follows directly, or after the
    // barriers of new leaders' terms (D41) if leadership moved meanwhile.
    let p1 = log.propose(ShardId(0), b"after".to_vec()).await.unwrap();
    only_barriers_between(&cl, &log, ShardId(0), p0, p1).await;
    cluster::wait_healthy(&cl.cfgs, Duration::from_secs(5)).unwrap();
}

/// A mount's identities are the cluster's as its certificate grants:
/// root is squashed to 65534 unless the certificate trusts root, and its
/// uid maps apply, whatever uid the mount claims.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mounts_root_is_squashed_unless_its_certificate_trusts_root() {
    use cfs_client::conn::MetaClient;
    use cfs_proto::ops::Reply;
    use cfs_proto::ops::{Op, Request};
    use cfs_proto::types::{Backing, Creds, Errno, ExtentRef, SetAttr, ROOT_INO};

    let cl = Cluster::start("squash");
    let id = cl.cfgs[0].cluster_id.clone();
    let metas = cluster::meta_servers(&cl.cfgs);
    let session = |sec: cfs_net::Security| {
        MetaClient::new(metas.clone(), id.clone(), sec, Duration::from_secs(20)).0
    };
    let trusted = session(cluster::mount_security(&cl.dir).unwrap());
    let squashed = session(cl.issue(
        cfs_net::Principal::Client {
            name: "sq".into(),
            policy: cfs_net::ClientPolicy {
                trust_root: false,
                uid_map: vec![(1000, 4242)],
                gid_map: vec![],
                ..Default::default()
            },
        },
        "client-sq",
    ));
    let as_uid = |uid: u32| Creds {
        uid,
        gid: uid,
        groups: Vec::new(),
    };
    let create = |parent: u64, name: &str, mode: u32| Op::Create {
        parent,
        name: name.as_bytes().to_vec(),
        mode,
        umask: 0,
        rdev: 0,
        target: None,
        excl: true,
        ino: None,
    };
    let mutate = |m: &Arc<MetaClient>, creds: Creds, op: Op| {
        let m = m.clone();
        async move {
            m.call(
                Request::Mutate {
                    op_id: 0,
                    creds,
                    op,
                    early: false,
                },
                true,
            )
            .await
        }
    };
    let attr = |r: Result<Reply, Errno>| match r {
        Ok(Reply::Attr(i)) => i,
        other => panic!("expected attributes, got {other:?}"),
    };
    let open = attr(
        mutate(
            &trusted,
            as_uid(0),
            create(ROOT_INO, "open", libc::S_IFDIR | 0o777),
        )
        .await,
    );
    assert_eq!(open.uid, 0, "a trusted mount's root stays root");
    // The squashed mount's root cannot write the root directory (0755,
    // owned by root) ...
    let r = mutate(
        &squashed,
        as_uid(0),
        create(ROOT_INO, "planted", libc::S_IFREG | 0o4755),
    )
    .await;
    assert_eq!(r.err(), Some(Errno::EACCES));
    // ... creates as 65534 where anyone may ...
    let f = attr(
        mutate(
            &squashed,
            as_uid(0),
            create(open.ino, "f", libc::S_IFREG | 0o644),
        )
        .await,
    );
    assert_eq!(
        (f.uid, f.gid),
        (cfs_net::principal::NOBODY, cfs_net::principal::NOBODY)
    );
    // ... cannot give a file to root ...
    let chown = Op::SetAttr {
        ino: f.ino,
        set: SetAttr {
            uid: Some(0),
            ..Default::default()
        },
    };
    assert_eq!(
        mutate(&squashed, as_uid(0), chown).await.err(),
        Some(Errno::EPERM)
    );
    // ... and its uid 1000 is the cluster's 4242.
    let g = attr(
        mutate(
            &squashed,
            as_uid(1000),
            create(open.ino, "g", libc::S_IFREG | 0o644),
        )
        .await,
    );
    assert_eq!(g.uid, 4242);

    // Bytes are checked on the server too (D42): the squashed root
    // cannot write or fallocate a root-owned file it could not open ...
    let write = |ino: u64| Op::Write {
        ino,
        extents: vec![ExtentRef {
            offset: 0,
            len: 1,
            skip: 0,
            backing: Backing::Inline(b"x".to_vec()),
        }],
        then: None,
    };
    let rootfile = attr(
        mutate(
            &trusted,
            as_uid(0),
            create(open.ino, "rootfile", libc::S_IFREG | 0o644),
        )
        .await,
    );
    assert_eq!(
        mutate(&squashed, as_uid(0), write(rootfile.ino))
            .await
            .err(),
        Some(Errno::EACCES)
    );
    let fallocate = Op::Fallocate {
        ino: rootfile.ino,
        offset: 0,
        len: 4096,
        mode: 0,
    };
    assert_eq!(
        mutate(&squashed, as_uid(0), fallocate).await.err(),
        Some(Errno::EACCES)
    );
    // ... a user who may write a set-user-ID file writes it, and the bit
    // goes, as on a local file system ...
    let setuid = attr(
        mutate(
            &trusted,
            as_uid(0),
            create(open.ino, "setuid", libc::S_IFREG | 0o4777),
        )
        .await,
    );
    let written = attr(mutate(&squashed, as_uid(1000), write(setuid.ino)).await);
    assert_eq!(written.mode & 0o7777, 0o777, "set-user-ID dropped");
    // ... and an owner writes its own read-only file (opened for writing
    // before it was made read-only, as `cp -p` does).
    let ro = attr(
        mutate(
            &trusted,
            as_uid(7),
            create(open.ino, "ro", libc::S_IFREG | 0o444),
        )
        .await,
    );
    assert_eq!(
        attr(mutate(&trusted, as_uid(7), write(ro.ino)).await).size,
        1
    );
    assert_eq!(
        mutate(&trusted, as_uid(8), write(ro.ino)).await.err(),
        Some(Errno::EACCES)
    );
}

/// The leader's metadata service forgets the outcome tables of a mount
/// idle for `forget_idle_clients_s`: the per-client state a departed
/// mount leaves is bounded in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_mounts_outcome_tables_are_forgotten() {
    use cfs_client::conn::MetaClient;
    use cfs_proto::ops::{Op, Request};
    use cfs_proto::types::{Creds, ROOT_INO};

    let cl = Cluster::start_with("forget-idle", |c| c.forget_idle_clients_s = 2);
    let (meta, _inval) = MetaClient::new(
        cluster::meta_servers(&cl.cfgs),
        cl.cfgs[0].cluster_id.clone(),
        cluster::mount_security(&cl.dir).unwrap(),
        Duration::from_secs(20),
    );
    meta.call(
        Request::Mutate {
            op_id: 0,
            creds: Creds::root(),
            op: Op::Create {
                parent: ROOT_INO,
                name: b"once".to_vec(),
                mode: libc::S_IFREG | 0o644,
                umask: 0,
                rdev: 0,
                target: None,
                excl: true,
                ino: None,
            },
            early: false,
        },
        true,
    )
    .await
    .unwrap();
    drop(meta);
    let forgotten = |id: u64| cl.metric(id, "claudefs_meta_idle_clients_forgotten_total");
    let until = Instant::now() + Duration::from_secs(30);
    while (1..=3).map(forgotten).sum::<u64>() == 0 {
        assert!(Instant::now() < until, "no idle client forgotten");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let logged = cl.log_of(1) + &cl.log_of(2) + &cl.log_of(3);
    assert!(logged.contains("forgot idle clients' outcome tables"));
}

/// Asserts that node 1 holds nothing but term barriers (D41) strictly
/// between positions `p0` and `p1` of `shard`: nothing else was decided.
async fn only_barriers_between(
    cl: &Cluster,
    client: &LogClient,
    shard: ShardId,
    p0: Position,
    p1: Position,
) {
    let between = client
        .read_range(cl.cfg(1).listen, shard, p0 + 1, p1)
        .await
        .unwrap();
    assert!(
        between
            .iter()
            .all(|(_, e)| e.kind == cfs_log::EntryKind::BARRIER && e.request.is_none()),
        "{between:?}"
    );
}
