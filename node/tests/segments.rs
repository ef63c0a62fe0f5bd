//! End-to-end tests of the segment store on real `cfs-node` processes.

mod common;

use std::os::unix::fs::FileExt;
use std::time::Duration;

use cfs_node::cluster;
use cfs_node::segtools::{fill, read_data, write_data};
use cfs_segments::client::{ClientError, StripeReader};
use cfs_segments::layout::Layout;
use cfs_segments::proto::Request;
use cfs_segments::store::StoreError;
use common::Cluster;

const MIB: u64 = 1 << 20;

fn layout_and_nodes() -> (Layout, Vec<u64>) {
    (Layout::for_cluster(3), vec![1, 2, 3])
}

/// Write, kill -9 m of the k+m servers, read everything back byte-exact;
/// repair the dead node's fragments onto the survivors, read again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_m_servers_read_back_and_repair() {
    let cl = Cluster::start("seg-kill");
    let client = cl.segment_client();
    let (layout, nodes) = layout_and_nodes();
    assert_eq!(layout.to_string(), "2+1");
    let (extents, _) = write_data(client.clone(), layout, nodes, 24 * MIB + 12345, 1 << 20, 5)
        .await
        .unwrap();
    assert!(extents.iter().all(|e| e.missing.is_empty()));
    cluster::stop_node(&cl.dir, 1, libc::SIGKILL, Duration::from_secs(5)).unwrap();
    let (_, bad) = read_data(client.clone(), &extents, 5, 4).await.unwrap();
    assert_eq!(
        bad,
        extents.len(),
        "each stripe reports the fragment on the dead node"
    );

    // Repair node 1's fragments onto nodes 2 and 3, with node 1 still down.
    let report = cfs_segments::repair::repair_node(client.clone(), 1, &[2, 3], |_| {})
        .await
        .unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert!(!report.moved.is_empty());
    assert_eq!(report.progress.stripes_done, report.progress.stripes_total);
    // Every fragment index is now held by a survivor: reads need no parity
    // reconstruction from the dead node's share.
    let (_, _) = read_data(client.clone(), &extents, 5, 4).await.unwrap();
    let mut held = std::collections::BTreeSet::new();
    for n in [2, 3] {
        for f in client.list(n).await.unwrap() {
            held.insert((f.key.segment, f.key.fragment));
        }
    }
    for e in &extents {
        for i in 0..3u8 {
            assert!(
                held.contains(&(e.segment, i)),
                "segment {} fragment {i} not rebuilt",
                e.segment
            );
        }
    }
}

/// A bit flipped in a fragment file on disk: the read returns correct data
/// and reports the corrupt fragment; the server counts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bit_flip_is_corrected_and_reported() {
    let cl = Cluster::start("seg-rot");
    let client = cl.segment_client();
    let (layout, nodes) = layout_and_nodes();
    let (extents, _) = write_data(client.clone(), layout, nodes, 2 * MIB, 1 << 20, 9)
        .await
        .unwrap();
    // Flip one bit in the first data fragment of the first stripe on node 1.
    let e = &extents[0];
    let seg_dir = cl.cfg(1).data_dir.join("segments");
    let path = seg_dir.join(cfs_segments::format::file_name(e.segment, 0));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    // Stripes in flight may land in any order: find this stripe's record
    // (file header, then [record header | data] records).
    let hb = cfs_segments::format::HEADER_BYTES as u64;
    let mut at = hb;
    let off = loop {
        let mut block = vec![0u8; hb as usize];
        f.read_exact_at(&mut block, at).unwrap();
        let h = cfs_segments::format::RecordHeader::decode(&block).expect("record header");
        if h.stripe == e.stripe {
            break at + hb + 777;
        }
        at += hb + h.data_len as u64;
    };
    let mut b = [0u8];
    f.read_exact_at(&mut b, off).unwrap();
    f.write_all_at(&[b[0] ^ 0x08], off).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let before = cl.metric(1, "claudefs_segments_checksum_failures_total");
    let reader = StripeReader::new(client.clone());
    let out = reader.read(e).await.unwrap();
    let mut expect = vec![0u8; out.data.len()];
    fill(&mut expect, 0, 9);
    assert_eq!(
        out.data, expect,
        "data reconstructed around the corrupt fragment"
    );
    assert_eq!(out.bad.len(), 1);
    assert!(
        out.bad[0].corrupt && out.bad[0].fragment == 0 && out.bad[0].node == 1,
        "{:?}",
        out.bad
    );
    assert!(cl.metric(1, "claudefs_segments_checksum_failures_total") > before);
    // The rest reads fine.
    read_data(client, &extents, 9, 4).await.unwrap();
}

/// Requests for what does not exist, and hostile handshakes, get clear
/// errors and change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors() {
    let cl = Cluster::start("seg-bad");
    let client = cl.segment_client();
    let seg = cfs_segments::format::SegmentId(42);
    match client.read_fragment(2, seg, 0, 0).await {
        Err(ClientError::Store {
            error: StoreError::NoSuchFragment(k),
            ..
        }) => assert_eq!(k.segment, seg),
        other => panic!("{other:?}"),
    }
    // A fragment whose size is not aligned is refused.
    let r = client
        .call(
            2,
            Request::Append {
                segment: seg,
                fragment: 0,
                layout: Layout::new(2, 1).unwrap(),
                nodes: vec![1, 2, 3],
                stripe: 0,
                data: cfs_segments::ByteBuf::from(vec![1u8; 100]),
            },
        )
        .await;
    assert!(
        matches!(
            r,
            Err(ClientError::Store {
                error: StoreError::BadRequest(_),
                ..
            })
        ),
        "{r:?}"
    );
    // Wrong cluster id.
    let stranger = cfs_segments::client::SegmentClient::new(
        "not-this-cluster",
        cluster::segment_servers(&cl.cfgs),
        cl.admin(),
    );
    let r = stranger.list(2).await;
    assert!(
        matches!(&r, Err(ClientError::Unreachable { reason, .. }) if reason.contains("wrong cluster id")),
        "{r:?}"
    );
    // Garbage on the socket: refused at the TLS handshake (at most a TLS
    // alert comes back, record type 21) ...
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(cl.cfg(2).segments_listen.unwrap()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(&[0xff; 64]).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        assert!(buf.is_empty() || buf[0] == 21, "{buf:?}");
    }
    // ... and inside TLS by the frame decoder: closed without an answer.
    {
        use std::io::{Read, Write};
        let mut s = cl
            .admin()
            .connect_blocking(cl.cfg(2).segments_listen.unwrap(), Duration::from_secs(5))
            .unwrap();
        s.tcp()
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        s.write_all(&[0xff; 64]).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        assert!(buf.is_empty(), "{buf:?}");
    }
    assert!(cl.metric_at_least(2, "claudefs_segments_rejected_connections_total", 3) >= 3);
    assert!(
        client.list(2).await.unwrap().is_empty(),
        "nothing was created"
    );
}

/// A full device: ENOSPC surfaces as a clear error, no partial stripe is
/// reported durable, acknowledged data stays readable, and /health and the
/// metrics show it. The segment directories are small tmpfs mounts; node 1
/// uses the plain pread/pwrite fallback, the others io_uring.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_fails_cleanly() {
    let base = std::env::temp_dir().join(format!("cfs-test-enospc-mnt-{}", std::process::id()));
    let mut mounts = Vec::new();
    for i in 1..=3 {
        let m = base.join(format!("n{i}"));
        std::fs::create_dir_all(&m).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=12m", "tmpfs"])
            .arg(&m)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "mounting a tmpfs needs root");
        mounts.push(m);
    }
    struct Unmount(Vec<std::path::PathBuf>);
    impl Drop for Unmount {
        fn drop(&mut self) {
            for m in &self.0 {
                let _ = std::process::Command::new("umount")
                    .arg("-l")
                    .arg(m)
                    .status();
            }
        }
    }
    let _guard = Unmount(mounts.clone());
    let cl = Cluster::start_with("seg-full", |c| {
        c.segments_dir = Some(mounts[(c.node_id - 1) as usize].clone());
        // Node 1 runs the plain-I/O fallback, the others io_uring.
        c.segments_io_uring = c.node_id != 1;
    });
    let (_, body) = cluster::http_get(cl.cfg(1).http, "/metrics").unwrap();
    assert!(
        body.contains("claudefs_segments_io_mode{mode=\"pread/pwrite\"} 1"),
        "{body}"
    );
    let (_, body) = cluster::http_get(cl.cfg(2).http, "/metrics").unwrap();
    assert!(
        body.contains("claudefs_segments_io_mode{mode=\"io_uring"),
        "{body}"
    );
    let client = cl.segment_client();
    let (layout, nodes) = layout_and_nodes();
    let mut w =
        cfs_segments::client::StripeWriter::new(client.clone(), layout, nodes, 256 << 10).unwrap();
    let mut acked = Vec::new();
    let mut err = None;
    let chunk = vec![7u8; 1 << 20];
    for _ in 0..64 {
        match w.write(&chunk).await {
            Ok(e) => acked.extend(e),
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    if err.is_none() {
        match w.flush().await {
            Ok(e) => acked.extend(e),
            Err(e) => err = Some(e),
        }
    }
    let err = err.expect("a 12 MiB device cannot take 64 MiB");
    let msg = err.to_string();
    assert!(
        matches!(err, ClientError::NotDurable { .. }) && msg.contains("no space left"),
        "{msg}"
    );
    assert!(!acked.is_empty());
    let reader = StripeReader::new(client.clone());
    for e in &acked {
        assert_eq!(
            reader.read(e).await.unwrap().data,
            vec![7u8; e.data_len as usize]
        );
    }
    // The store publishes its counters after answering: wait for them.
    assert!(cl.metric_at_least(1, "claudefs_segments_no_space_errors_total", 1) > 0);
    let (code, health) = cluster::http_get(cl.cfg(1).http, "/health").unwrap();
    assert_eq!(code, 503, "{health}");
    assert!(health.contains("no space left"), "{health}");
}
