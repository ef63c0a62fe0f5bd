//! The Jepsen suite of ClaudeFS: real `cfs-node` processes, real faults,
//! recorded histories, and checkers (docs/jepsen.md).
//!
//! `cargo run -p jepsen -- --workload register --nemesis partition,kill
//!  --time-limit 60 --seed 7` leaves in the output directory the history
//! (`history.jsonl`), the nemesis timeline (`timeline.jsonl`), the final
//! reads (`final.json`), the verdict (`verdict.json`) and every node's log
//! (`cluster/node-N/node.log`); it exits 0 when the history is valid, 1
//! when the checker found anomalies.

mod cluster;
mod history;
mod linearizable;
mod nemesis;
mod proxy;
mod stats;
mod workloads;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use serde_json::json;

use cluster::TestCluster;
use history::History;
use workloads::{Checked, Ctx};

/// Times the replicas' namespaces are dumped and compared before they
/// are reported as different.
const DUMP_ATTEMPTS: usize = 5;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Workload {
    /// Appends and reads on the shard logs.
    Log,
    /// Linearizable read/write/cas registers on a key-value API over the log.
    Register,
    /// Concurrent file creates on the mounts.
    Set,
    /// Renames of files between directories; totals conserved.
    Bank,
    /// Files on the mounts as linearizable registers (rename to write,
    /// POSIX locks for compare-and-set).
    FsRegister,
    /// Many small namespace changes with fsync points, each client in its
    /// own directory, read from other mounts; checked against a model
    /// (early answers, D30).
    FsOps,
}

#[derive(Parser, Debug)]
#[command(about = "Jepsen-style fault testing of a local ClaudeFS cluster")]
struct Args {
    #[arg(long, value_enum)]
    workload: Workload,
    /// Faults: kill, pause, partition, delay, power, all or none
    /// (comma-separated).
    #[arg(long, default_value = "kill,pause,partition,delay")]
    nemesis: String,
    /// Seconds of client operations (the final reads come after).
    #[arg(long, default_value_t = 60)]
    time_limit: u64,
    /// Seed of the clients' and the nemesis' choices (random if absent).
    #[arg(long)]
    seed: Option<u64>,
    /// Concurrent client processes.
    #[arg(long, default_value_t = 6)]
    concurrency: u64,
    #[arg(long, default_value_t = 3)]
    nodes: u64,
    /// Faults the nodes run with (CFS_FAULTS): lose-unsynced (a kill
    /// loses what was not fsync'd), and the deliberately broken
    /// fsync-lies and stale-reads the checkers must catch.
    #[arg(long, default_value = "")]
    faults: String,
    /// Output directory (default /var/tmp/cfs-jepsen/WORKLOAD-SEED).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Run only the checker (of --workload fs-ops) again on a saved run's
    /// history.jsonl and final.json in this directory; prints the verdict.
    #[arg(long)]
    recheck: Option<PathBuf>,
    /// Cache mode of the mounts (file system workloads): strict (every
    /// read through a barrier) or close-to-open (leases: opens and stats
    /// answered by the mount; other mounts' changes recalled first).
    #[arg(long, default_value = "strict")]
    cache_mode: String,
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CFS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let args = Args::parse();
    match run(args).await {
        Ok(true) => std::process::exit(0),
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("jepsen: {e:#}");
            std::process::exit(2);
        }
    }
}

/// The checker of `workload` on a saved run (history and final reads).
fn recheck(workload: Workload, dir: &std::path::Path) -> anyhow::Result<bool> {
    let text = std::fs::read_to_string(dir.join("history.jsonl"))
        .with_context(|| format!("reading {}/history.jsonl", dir.display()))?;
    let events: Vec<history::Event> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("parsing history.jsonl")?;
    let fin: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("final.json"))?)?;
    let checked = match workload {
        Workload::FsOps => workloads::fsops::check(&events, &fin),
        other => anyhow::bail!("--recheck supports --workload fs-ops, not {other:?}"),
    };
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "valid": checked.valid,
            "unknown": checked.unknown,
            "anomalies": checked.anomalies,
            "summary": checked.summary,
        }))?
    );
    Ok(checked.valid)
}

async fn run(args: Args) -> anyhow::Result<bool> {
    if let Some(dir) = &args.recheck {
        return recheck(args.workload, dir);
    }
    let kinds = nemesis::Kind::parse_list(&args.nemesis).map_err(anyhow::Error::msg)?;
    cfs_log::Faults::parse(&args.faults).map_err(anyhow::Error::msg)?;
    let seed = args.seed.unwrap_or_else(rand::random);
    let name = format!("{:?}", args.workload).to_lowercase();
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/var/tmp/cfs-jepsen/{name}-{seed}")));
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    eprintln!(
        "jepsen: workload {name}, nemesis {:?}, {} s, seed {seed}, faults {:?} -> {}",
        kinds,
        args.time_limit,
        args.faults,
        out.display()
    );

    let shards = 2;
    let mut tc = TestCluster::start(&out.join("cluster"), args.nodes, shards, &args.faults).await?;
    let fs_workload = matches!(
        args.workload,
        Workload::Set | Workload::Bank | Workload::FsRegister | Workload::FsOps
    );
    if fs_workload {
        tc.mount_all(&args.cache_mode)?;
        let first = tc.mounts[0].path.clone();
        match args.workload {
            Workload::Set => workloads::set::setup(&first)?,
            Workload::FsRegister => workloads::fsreg::setup(&first)?,
            Workload::FsOps => workloads::fsops::setup(&first, args.concurrency)?,
            _ => workloads::bank::setup(&first)?,
        }
    }
    // fs-ops reports how many changes the nodes answered early: their
    // counters, read through the run (a killed node counts from zero again).
    let sampler = (args.workload == Workload::FsOps).then(|| {
        let mut sums = cluster::CounterSums::new(&tc, &workloads::fsops::COUNTERS);
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let task = tokio::task::spawn_blocking(move || {
            while !stop2.load(Ordering::Relaxed) {
                sums.sample();
                std::thread::sleep(workloads::fsops::SAMPLE_EVERY);
            }
            sums.sample();
            sums
        });
        (stop, task)
    });
    let start = Instant::now();
    let history = Arc::new(History::create(&out.join("history.jsonl"), start)?);
    let timeline = nemesis::Timeline::create(&out.join("timeline.jsonl"))?;
    let until = args.time_limit * 1_000_000_000;
    let ctx = Arc::new(Ctx {
        cluster_id: tc.cfgs[0].cluster_id.clone(),
        security: tc.admin.clone(),
        nodes: tc.cfgs.iter().map(|c| c.listen).collect(),
        mounts: tc.mounts.iter().map(|m| m.path.clone()).collect(),
        shards: (0..shards).map(cfs_log::ShardId).collect(),
        history: history.clone(),
        until,
        seed,
        concurrency: args.concurrency,
        failed_nodes: Default::default(),
    });
    let mut clients = Vec::new();
    for slot in 0..args.concurrency {
        let c = ctx.clone();
        clients.push(tokio::spawn(async move {
            match args.workload {
                Workload::Log => workloads::log::client(c, slot).await,
                Workload::Register => workloads::register::client(c, slot).await,
                Workload::Set => workloads::set::client(c, slot).await,
                Workload::Bank => workloads::bank::client(c, slot).await,
                Workload::FsRegister => workloads::fsreg::client(c, slot).await,
                Workload::FsOps => workloads::fsops::client(c, slot).await,
            }
        }));
    }
    let h2 = history.clone();
    nemesis::run(&tc, &kinds, seed, &timeline, move || h2.now(), until).await?;
    // Clients stop invoking at the time limit; an operation still stuck a
    // minute later (e.g. waiting for a lock nobody can release) stays
    // without completion, which the checkers treat as indeterminate.
    let grace = tokio::time::Instant::now() + Duration::from_secs(60);
    for c in clients {
        let abort = c.abort_handle();
        if tokio::time::timeout_at(grace, c).await.is_err() {
            abort.abort();
        }
    }
    let ended = history.now();
    nemesis::heal_all(&tc, &timeline, ended).await?;
    let failed = tc.wait_healthy_or_failed(Duration::from_secs(60)).await?;
    *ctx.failed_nodes.lock().expect("failed nodes lock") =
        failed.iter().map(|f| f.listen).collect();
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut fin = match args.workload {
        Workload::Log | Workload::Register => workloads::log::final_reads(&ctx).await?,
        Workload::Set => workloads::set::final_reads(&ctx).await?,
        Workload::Bank => workloads::bank::final_reads(&ctx).await?,
        Workload::FsRegister => workloads::fsreg::final_reads(&ctx).await?,
        Workload::FsOps => workloads::fsops::final_reads(&ctx).await?,
    };
    if let Some((stop, task)) = sampler {
        stop.store(true, Ordering::Relaxed);
        if let (Ok(sums), Some(o)) = (task.await, fin.as_object_mut()) {
            o.insert("node_counters".to_string(), sums.totals());
        }
    }
    std::fs::write(out.join("final.json"), serde_json::to_vec_pretty(&fin)?)?;
    tc.unmount_all();
    let converged = !fs_workload || tc.wait_applied_equal(Duration::from_secs(30)).await;
    tc.stop();
    let events = history.events();
    let mut checked: Checked = match args.workload {
        Workload::Log => workloads::log::check(&events, &fin),
        Workload::Register => {
            // The log under the registers must be sound too.
            let mut c = workloads::register::check(&events);
            let l = workloads::log::check(&[], &fin);
            for a in l.anomalies.into_iter().filter(|a| {
                // Register commands are not unique values of this history:
                // only order, gaps and replica agreement apply.
                a["kind"] != "unknown-value" && a["kind"] != "duplicate"
            }) {
                c.anomalies.push(a);
            }
            c.valid = c.anomalies.is_empty() && !c.unknown;
            c
        }
        Workload::Set => workloads::set::check(&events, &fin),
        Workload::Bank => workloads::bank::check(&events, &fin),
        Workload::FsRegister => workloads::fsreg::check(&events, &fin),
        Workload::FsOps => workloads::fsops::check(&events, &fin),
    };
    if fs_workload {
        // Every replica materialized the same, consistent namespace.
        for id in tc.ids() {
            let o = std::process::Command::new(&tc.cfs_bin)
                .args(["fsck", "--dir"])
                .arg(&tc.dir)
                .args(["--node", &id.to_string()])
                .output()?;
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            if !o.status.success() || !text.contains(" 0 open transaction records, 0 problems") {
                checked
                    .anomalies
                    .push(json!({"kind": "fsck", "node": id, "report": text}));
            }
        }
        // The mounts' hold renewals (every few seconds) may land between
        // two nodes' dumps: then all are taken again, at one position.
        let mut converged = converged;
        let mut dumps = Vec::new();
        for _ in 0..DUMP_ATTEMPTS {
            dumps.clear();
            for id in tc.ids() {
                let d = std::process::Command::new(&tc.cfs_bin)
                    .args(["ns-dump", "--dir"])
                    .arg(&tc.dir)
                    .args(["--node", &id.to_string()])
                    .output()?;
                dumps.push(d.stdout);
            }
            if !converged || dumps.windows(2).all(|w| w[0] == w[1]) {
                break;
            }
            converged = tc.wait_applied_equal(Duration::from_secs(30)).await;
        }
        if !converged {
            checked
                .anomalies
                .push(json!({"kind": "replicas-never-converged"}));
        } else if dumps.windows(2).any(|w| w[0] != w[1]) {
            checked
                .anomalies
                .push(json!({"kind": "replica-namespaces-differ"}));
        }
        checked.valid = checked.anomalies.is_empty() && !checked.unknown;
    }
    // A replica that stopped a shard rather than let decided entries be
    // overwritten caught the cluster losing durability: invalid.
    for f in &failed {
        checked
            .anomalies
            .push(json!({"kind": "shard-failed", "node": f.node, "problems": f.problems}));
    }
    checked.valid = checked.valid && failed.is_empty();
    let ops = history::pair(&events);
    let windows = stats::windows(&ops, &timeline.windows.lock().expect("windows lock"), ended);
    let verdict = json!({
        "valid": checked.valid,
        "unknown": checked.unknown,
        "workload": name,
        "nemesis": kinds,
        "faults": args.faults,
        "seed": seed,
        "time_limit_s": args.time_limit,
        "concurrency": args.concurrency,
        "operations": ops.len(),
        "summary": checked.summary,
        "anomalies": checked.anomalies,
        "windows": windows,
    });
    std::fs::write(
        out.join("verdict.json"),
        serde_json::to_vec_pretty(&verdict)?,
    )?;
    println!(
        "{}: {} operations, {} anomalies, valid = {}{}",
        name,
        ops.len(),
        verdict["anomalies"].as_array().map(Vec::len).unwrap_or(0),
        checked.valid,
        if checked.unknown {
            " (checker undecided)"
        } else {
            ""
        }
    );
    for a in verdict["anomalies"]
        .as_array()
        .into_iter()
        .flatten()
        .take(10)
    {
        println!("  anomaly: {a}");
    }
    for w in &windows {
        println!(
            "  {:>6.1}-{:>6.1}s {:<60} ok {:>6} ({:>7.1}/s) p50 {:>8} p99 {:>8}",
            w.from_s,
            w.to_s,
            w.what.chars().take(60).collect::<String>(),
            w.ok,
            w.ok_per_s,
            w.p50_ms.map(|v| format!("{v:.1}ms")).unwrap_or("-".into()),
            w.p99_ms.map(|v| format!("{v:.1}ms")).unwrap_or("-".into()),
        );
    }
    println!("  results: {}", out.display());
    Ok(checked.valid)
}
