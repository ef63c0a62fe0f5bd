//! The in-process API of `LogNode` on a 3-node loopback cluster: proposals
//! from followers are forwarded, subscriptions deliver in order, durable
//! subscribers let the leader trim, and trimmed positions are refused.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use cfs_log::shard::Timing;
use cfs_log::wal::WalConfig;
use cfs_log::{Entry, EntryKind, LogError, LogNode, LogNodeConfig, Position, ShardId};

/// A free port below the ephemeral range (which outgoing connections use,
/// so a port from `bind(0)` could be taken before the node binds it).
fn free_addr() -> SocketAddr {
    for _ in 0..1000 {
        let port = 10_000 + rand::random::<u16>() % 20_000;
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
            return l.local_addr().unwrap();
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

async fn start_cluster(
    dir: &std::path::Path,
    segment_bytes: u64,
) -> (Vec<LogNode>, Vec<SocketAddr>) {
    let nodes: BTreeMap<u64, SocketAddr> = (1..=3).map(|i| (i, free_addr())).collect();
    let mut out = Vec::new();
    for (&id, &addr) in &nodes {
        let cfg = LogNodeConfig {
            node_id: id,
            cluster_id: "rt".into(),
            listen: addr,
            nodes: nodes.clone(),
            data_dir: dir.join(format!("n{id}")),
            shards: vec![ShardId(0)],
            connections_per_peer: 64,
            security: cfs_net::Security::plaintext(),
            tick: Duration::from_millis(10),
            timing: Timing::default(),
            propose_timeout: Duration::from_secs(5),
            wal: WalConfig {
                segment_bytes,
                background_prealloc: true,
                // Small: subscribers read most entries back from disk.
                memory_bytes_max: 4096,
            },
            retain_entries: 0,
            dial: BTreeMap::new(),
            faults: Default::default(),
        };
        out.push(LogNode::start(cfg).await.unwrap());
    }
    (out, nodes.values().copied().collect())
}

async fn wait_leader(nodes: &[LogNode]) -> usize {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        for (i, n) in nodes.iter().enumerate() {
            if n.status()[0].is_leader {
                return i;
            }
        }
        assert!(Instant::now() < until, "no leader elected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn data(v: &str) -> Entry {
    Entry::new(EntryKind::DATA, Default::default(), v.as_bytes().to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_subscribe_trim() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            std::env::var("CFS_LOG").unwrap_or_else(|_| "warn".into()),
        ))
        .with_test_writer()
        .try_init();
    let dir = std::env::temp_dir().join(format!("cfs-rt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (nodes, _) = start_cluster(&dir, 64 << 10).await;
    let leader = wait_leader(&nodes).await;
    let follower = (leader + 1) % 3;
    // The leader's term begins with its barrier; followers have none.
    let term_start = nodes[leader].status()[0]
        .term_start
        .expect("a leader's term start");
    assert_eq!(nodes[follower].status()[0].term_start, None);

    // Durable subscribers on every node, registered before any entry.
    let mut subs: Vec<_> = nodes
        .iter()
        .map(|n| {
            n.subscribe(ShardId(0), Position(0), Some("test-materializer"))
                .unwrap()
        })
        .collect();

    // Proposals through a follower are forwarded to the leader.
    let mut positions = Vec::new();
    for i in 0..400 {
        let n = if i % 2 == 0 {
            &nodes[follower]
        } else {
            &nodes[leader]
        };
        match n.propose(ShardId(0), data(&format!("{i:0>200}"))).await {
            Ok(p) => positions.push(p),
            Err(e) => {
                let st: Vec<_> = nodes.iter().map(|n| n.status()).collect();
                let m: Vec<String> = nodes
                    .iter()
                    .map(|n| {
                        n.metrics_text()
                            .lines()
                            .filter(|l| !l.starts_with('#'))
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .collect();
                panic!(
                    "proposal {i} via node {}: {e}; status {st:?}; metrics {m:#?}",
                    n.node_id()
                );
            }
        }
    }
    let mut sorted = positions.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), positions.len(), "distinct positions");

    // Every subscriber sees the same entries in the same order.
    let last = *positions.iter().max().unwrap();
    let mut seen: Vec<Vec<(Position, Entry)>> = Vec::new();
    for s in subs.iter_mut() {
        let mut got = Vec::new();
        while got.len() as u64 <= last.get() {
            got.extend(s.next_batch(1000).await.unwrap());
        }
        seen.push(got);
    }
    assert_eq!(seen[0], seen[1]);
    assert_eq!(seen[0], seen[2]);
    let (at, first) = &seen[0][term_start.get() as usize];
    assert_eq!((*at, first.kind), (term_start, EntryKind::BARRIER));
    assert!(positions.iter().all(|p| *p > term_start));

    // A read barrier orders after everything acknowledged.
    let b = nodes[follower].read_barrier(ShardId(0)).await.unwrap();
    assert!(b > last);

    // Subscribers persist; the leader trims below the minimum.
    for s in &subs {
        s.persisted(Position(300));
    }
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        if nodes.iter().all(start_is_trimmed) {
            break;
        }
        assert!(
            Instant::now() < until,
            "log was not trimmed on every replica"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Reading below the trim point is refused; above it works.
    let mut s = nodes[leader]
        .subscribe(ShardId(0), Position(10), None)
        .unwrap();
    assert!(matches!(s.next_batch(10).await, Err(LogError::Trimmed(_))));
    let mut s = nodes[leader]
        .subscribe(ShardId(0), Position(300), None)
        .unwrap();
    assert_eq!(s.next_batch(1).await.unwrap()[0].0, Position(300));
    // Whole WAL segments below the trim point are gone.
    for id in 1..=3 {
        let wal_dir = dir.join(format!("n{id}/wal"));
        let first = std::fs::read_dir(&wal_dir)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("seg-"))
            .min()
            .unwrap();
        assert_ne!(
            first, "seg-0000000000000000.wal",
            "node {id} kept its first segment"
        );
    }
    for n in &nodes {
        n.shutdown().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// True if position 0 of shard 0 is trimmed on `n`.
fn start_is_trimmed(n: &LogNode) -> bool {
    let mut s = n.subscribe(ShardId(0), Position(0), None).unwrap();
    let rt = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| {
        rt.block_on(async {
            matches!(
                tokio::time::timeout(Duration::from_millis(200), s.next_batch(1)).await,
                Ok(Err(LogError::Trimmed(_)))
            )
        })
    })
}

/// Remote clients: many proposals in flight on one connection go to the
/// node as `ProposeBatch` frames, each answered on its own; a frame mixing
/// a bad proposal with good ones refuses only the bad one; a frame over
/// the batch limit closes the connection without deciding any of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_proposals_batched_per_connection() {
    use cfs_log::client::LogClient;
    use cfs_log::transport::{dial, write_msg, Identity};
    use cfs_log::wire::{Role, Wire, PROPOSE_BATCH_MAX};
    use std::sync::Arc;

    let dir = std::env::temp_dir().join(format!("cfs-rt-batch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (nodes, addrs) = start_cluster(&dir, 1 << 20).await;
    let leader = wait_leader(&nodes).await;

    let client = Arc::new(LogClient::new(
        "rt",
        addrs.clone(),
        cfs_net::Security::plaintext(),
    ));
    client.propose(ShardId(0), b"warm".to_vec()).await.unwrap();
    let tasks: Vec<_> = (0..600)
        .map(|i| {
            let c = client.clone();
            tokio::spawn(async move { c.propose(ShardId(0), format!("e{i}").into_bytes()).await })
        })
        .collect();
    let mut positions = Vec::new();
    for t in tasks {
        positions.push(t.await.unwrap().unwrap());
    }
    positions.sort();
    positions.dedup();
    assert_eq!(positions.len(), 600, "every proposal decided once");

    // A hand-made frame to the leader: good, bad (no request id), good.
    // (Asked again if leadership moved since the cluster settled.)
    let me = Identity {
        cluster_id: "rt".into(),
        node_id: 0,
        incarnation: 1,
        security: cfs_net::Security::plaintext(),
    };
    let req = |seq| cfs_log::RequestId { client: 77, seq };
    let good = |seq| Entry::new(EntryKind::DATA, req(seq), b"ok".to_vec());
    let mut leader = leader;
    let mut attempts = 0;
    let answers = loop {
        attempts += 1;
        assert!(attempts <= 20, "no stable leader to take the frame");
        let bad = Entry::new(EntryKind::DATA, Default::default(), b"no id".to_vec());
        let (mut reader, mut w, _) = dial(addrs[leader], &me, Role::Client).await.unwrap();
        let frame = Wire::ProposeBatch {
            shard: ShardId(0),
            proposals: vec![(1, good(1)), (2, bad), (3, good(2))],
        };
        write_msg(&mut w, &frame).await.unwrap();
        let mut answers = BTreeMap::new();
        while answers.len() < 3 {
            match reader.next().await.unwrap() {
                Wire::Decided { id, result } => {
                    answers.insert(id, result);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        if matches!(answers[&1], Err(LogError::NotLeader { .. })) {
            leader = wait_leader(&nodes).await;
            continue;
        }
        break answers;
    };
    assert!(answers[&1].is_ok() && answers[&3].is_ok(), "{answers:?}");
    assert!(
        matches!(answers[&2], Err(LogError::Invalid(_))),
        "{answers:?}"
    );

    // Over the limit: the connection is closed, nothing decided.
    let before = nodes[leader].status()[0].decided;
    let (mut reader, mut w, _) = dial(addrs[leader], &me, Role::Client).await.unwrap();
    let proposals = (0..=PROPOSE_BATCH_MAX as u64)
        .map(|i| (i, good(1000 + i)))
        .collect();
    let frame = Wire::ProposeBatch {
        shard: ShardId(0),
        proposals,
    };
    write_msg(&mut w, &frame).await.unwrap();
    assert!(reader.next().await.is_err(), "connection closed");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // None of them was decided (what was decided since `before` is the
    // hand-made frame's tail, or a new leader's barrier).
    let after = nodes[leader].status()[0].decided;
    let mut s = nodes[leader].subscribe(ShardId(0), before, None).unwrap();
    let mut since = Vec::new();
    while (since.len() as u64) < after.get() - before.get() {
        since.extend(s.next_batch(1000).await.unwrap());
    }
    assert!(
        since
            .iter()
            .all(|(_, e)| !(e.request.client == 77 && e.request.seq >= 1000)),
        "{since:?}"
    );

    for n in &nodes {
        n.shutdown().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}
