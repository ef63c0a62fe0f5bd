//! `cfs` subcommands for the segment store: benchmarks and repair.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cfs_segments::client::{Extent, SegmentClient, StripeReader, StripeWriter};
use cfs_segments::ec::Codec;
use cfs_segments::layout::{Layout, FRAGMENT_BYTES_DEFAULT};

use crate::cluster;

/// A client for the cluster in `dir`, and its default layout and placement.
pub fn connect(dir: &Path) -> anyhow::Result<(Arc<SegmentClient>, Layout, Vec<u64>)> {
    let cfgs = cluster::load_configs(dir)?;
    let servers = cluster::segment_servers(&cfgs);
    if servers.is_empty() {
        bail!("no segment servers configured in {}", dir.display());
    }
    let layout = Layout::for_cluster(servers.len());
    let nodes: Vec<u64> = servers.keys().copied().take(layout.width()).collect();
    Ok((
        SegmentClient::new(&cfgs[0].cluster_id, servers, cluster::admin_security(dir)?),
        layout,
        nodes,
    ))
}

fn drop_caches() {
    // Best effort (root only): make reads come from the device.
    let _ = std::process::Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3\n");
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

/// Writes `total` bytes through the stripe writer in `request` sized
/// writes; returns the extents and the elapsed time.
pub async fn write_data(
    client: Arc<SegmentClient>,
    layout: Layout,
    nodes: Vec<u64>,
    total: u64,
    request: usize,
    seed: u8,
) -> anyhow::Result<(Vec<Extent>, Duration)> {
    let mut w = StripeWriter::new(client, layout, nodes, FRAGMENT_BYTES_DEFAULT)?;
    let mut extents = Vec::new();
    let t = Instant::now();
    let mut written = 0u64;
    let mut buf = vec![0u8; request];
    while written < total {
        let n = request.min((total - written) as usize);
        fill(&mut buf[..n], written, seed);
        extents.extend(w.write(&buf[..n]).await?);
        written += n as u64;
    }
    extents.extend(w.finish().await?);
    Ok((extents, t.elapsed()))
}

/// Deterministic content: byte `i` of the stream is a function of `i`
/// (computed a 64-bit word at a time, so checking reads stays cheap).
pub fn fill(buf: &mut [u8], offset: u64, seed: u8) {
    let (mut i, mut j) = (offset, 0usize);
    while j < buf.len() {
        let word = ((i / 8).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed as u64).to_le_bytes();
        let start = (i % 8) as usize;
        let n = (8 - start).min(buf.len() - j);
        buf[j..j + n].copy_from_slice(&word[start..start + n]);
        i += n as u64;
        j += n;
    }
}

/// Reads every extent in order with `parallel` extents in flight; checks
/// the bytes against `fill`. Returns (elapsed, bad fragments reported).
pub async fn read_data(
    client: Arc<SegmentClient>,
    extents: &[Extent],
    seed: u8,
    parallel: usize,
) -> anyhow::Result<(Duration, usize)> {
    let reader = Arc::new(StripeReader::new(client));
    let t = Instant::now();
    let mut offset = 0u64;
    let mut bad = 0;
    let mut expect = Vec::new();
    // A sliding window of `parallel` extents in flight, consumed in order.
    let mut window = std::collections::VecDeque::new();
    let mut next = 0;
    while next < extents.len() || !window.is_empty() {
        while window.len() < parallel.max(1) && next < extents.len() {
            let (r, e) = (reader.clone(), extents[next].clone());
            window.push_back((next, tokio::spawn(async move { r.read(&e).await })));
            next += 1;
        }
        let (i, h) = window.pop_front().expect("window not empty");
        let e = &extents[i];
        let out = h
            .await?
            .with_context(|| format!("reading segment {} stripe {}", e.segment, e.stripe))?;
        expect.resize(out.data.len(), 0);
        fill(&mut expect, offset, seed);
        if out.data != expect {
            bail!(
                "data mismatch in segment {} stripe {} (file offset {offset})",
                e.segment,
                e.stripe
            );
        }
        offset += out.data.len() as u64;
        bad += out.bad.len();
    }
    Ok((t.elapsed(), bad))
}

/// `cfs seg-bench`: write, read, degraded read (m servers down), and the
/// raw local baseline, all in one run.
pub async fn seg_bench(
    dir: &Path,
    size_mib: u64,
    request_kib: usize,
    raw_dir: &Path,
) -> anyhow::Result<()> {
    let (client, layout, nodes) = connect(dir)?;
    let total = size_mib << 20;
    let request = request_kib << 10;
    let (raw_w, raw_r) = raw_bench(raw_dir, total, request)?;
    println!("raw local file: write {raw_w:.0} MB/s, read {raw_r:.0} MB/s ({size_mib} MiB, {request_kib} KiB requests)");
    let (extents, wt) =
        write_data(client.clone(), layout, nodes.clone(), total, request, 7).await?;
    let w = mbps(total, wt);
    drop_caches();
    let (rt, _) = read_data(client.clone(), &extents, 7, 32).await?;
    let r = mbps(total, rt);
    // Degraded: stop m servers holding data fragments (the first m of the
    // placement), so every stripe must be reconstructed.
    let down: Vec<u64> = nodes.iter().take(layout.m as usize).copied().collect();
    for n in &down {
        cluster::stop_node(dir, *n, libc::SIGKILL, Duration::from_secs(5))?;
    }
    drop_caches();
    let degraded = read_data(client.clone(), &extents, 7, 32).await;
    let bin = cluster::node_binary()?;
    for n in &down {
        cluster::start_node(dir, *n, &bin)?;
    }
    let (dt, _) = degraded?;
    let d = mbps(total, dt);
    let ov = layout.overhead();
    println!(
        "layout {layout}: goal write >= {:.0} MB/s (60% of raw / {ov:.2}), read >= {:.0} MB/s (80% of raw / {ov:.2})",
        0.6 * raw_w / ov,
        0.8 * raw_r / ov
    );
    println!("segments: write {w:.0} MB/s, read {r:.0} MB/s, degraded read {d:.0} MB/s");
    Ok(())
}

/// Sequential write (fsync at the end) and read of one local file.
pub fn raw_bench(dir: &Path, total: u64, request: usize) -> anyhow::Result<(f64, f64)> {
    use std::io::{Read, Write};
    std::fs::create_dir_all(dir)?;
    let path = dir.join("raw-bench.tmp");
    let mut buf = vec![0u8; request];
    fill(&mut buf, 0, 1);
    let t = Instant::now();
    {
        let mut f = std::fs::File::create(&path)?;
        let mut left = total;
        while left > 0 {
            let n = (left as usize).min(request);
            f.write_all(&buf[..n])?;
            left -= n as u64;
        }
        f.sync_all()?;
    }
    let w = mbps(total, t.elapsed());
    drop_caches();
    let t = Instant::now();
    {
        let mut f = std::fs::File::open(&path)?;
        while f.read(&mut buf)? > 0 {}
    }
    let r = mbps(total, t.elapsed());
    std::fs::remove_file(&path)?;
    Ok((w, r))
}

/// Encode and decode throughput of the erasure code on one core.
pub fn ec_bench(layout: Layout) -> anyhow::Result<()> {
    let codec = Codec::new(layout)?;
    let stripe = FRAGMENT_BYTES_DEFAULT * layout.k as usize;
    let mut data = vec![0u8; stripe];
    fill(&mut data, 0, 3);
    let rounds = (512 << 20) / stripe;
    let t = Instant::now();
    let mut frags = Vec::new();
    for _ in 0..rounds {
        frags = codec.encode(&data)?;
    }
    let enc = mbps((rounds * stripe) as u64, t.elapsed());
    // Decode with the first m data fragments lost (the worst case).
    let t = Instant::now();
    for _ in 0..rounds {
        let mut sel: Vec<Option<Vec<u8>>> = frags.iter().cloned().map(Some).collect();
        for f in sel.iter_mut().take(layout.m as usize) {
            *f = None;
        }
        let out = codec.decode(sel, stripe)?;
        assert_eq!(out.len(), stripe);
    }
    let dec = mbps((rounds * stripe) as u64, t.elapsed());
    println!("erasure code {layout}: encode {enc:.0} MB/s, decode (m data fragments lost) {dec:.0} MB/s per core");
    Ok(())
}

/// `cfs repair`: rebuild what `failed` held on the other nodes.
pub async fn repair(dir: &Path, failed: u64) -> anyhow::Result<()> {
    let (client, _, _) = connect(dir)?;
    let survivors: Vec<u64> = client
        .nodes()
        .into_iter()
        .filter(|n| *n != failed)
        .collect();
    let mut last = Instant::now() - Duration::from_secs(1);
    let report = cfs_segments::repair::repair_node(client, failed, &survivors, |p| {
        if last.elapsed() > Duration::from_millis(500) || p.fragments_done == p.fragments_total {
            println!(
                "repair: {}/{} fragments, {}/{} stripes, {} MiB written",
                p.fragments_done,
                p.fragments_total,
                p.stripes_done,
                p.stripes_total,
                p.bytes_written >> 20
            );
            last = Instant::now();
        }
    })
    .await?;
    for (s, f, n) in &report.moved {
        println!("rebuilt segment {s} fragment {f} on node {n}");
    }
    for (s, f, why) in &report.failed {
        println!("FAILED segment {s} fragment {f}: {why}");
    }
    if !report.failed.is_empty() {
        bail!("{} fragments could not be rebuilt", report.failed.len());
    }
    Ok(())
}
