//! `cfs`: the ClaudeFS command-line tool.

/// mimalloc instead of glibc's malloc: the daemons and the mount allocate
/// per message and per entry from several threads (docs/decisions.md D38).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cfs_log::client::LogClient;
use cfs_node::cluster;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about = "ClaudeFS command-line tool")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start (or keep running) a local N-node cluster on loopback.
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: u64,
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 4)]
        shards: u32,
        /// Seconds to wait for every node to report healthy.
        #[arg(long, default_value_t = 60)]
        wait: u64,
        /// Also mount the file system here (in the background).
        #[arg(long)]
        mount: Option<PathBuf>,
        /// Options passed to `cfs mount` (e.g. `--cache-mode=strict`).
        #[arg(long = "mount-opt", allow_hyphen_values = true)]
        mount_opts: Vec<String>,
        /// A new cluster without TLS or authentication (development only;
        /// by default `cfs up` makes a cluster CA and certificates in
        /// DIR/tls).
        #[arg(long)]
        insecure_plaintext: bool,
    },
    /// The cluster CA: make one, issue certificates under it.
    #[command(subcommand)]
    Ca(CaCmd),
    /// Administration: cluster status, mount tokens.
    #[command(subcommand)]
    Admin(AdminCmd),
    /// Mount the file system (foreground; SIGTERM or `fusermount3 -u` ends it).
    Mount(MountArgs),
    /// Print a node's namespace database (node stopped or not), one
    /// key/value per line in hex: equal output means equal state.
    NsDump {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        node: u64,
    },
    /// Check a node's namespace (read-only): entries, link counts,
    /// directory tree, open cross-shard transactions. Exits 1 on problems.
    Fsck {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        node: u64,
    },
    /// fsx-style data integrity exerciser on FILE (replay with --seed).
    Fsx {
        file: PathBuf,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 10_000)]
        ops: u64,
        /// Run at least this many seconds (repeating seeds seed, seed+1, ...).
        #[arg(long)]
        seconds: Option<u64>,
        #[arg(long, default_value_t = 4 << 20)]
        max_size: u64,
        #[arg(long, default_value_t = 256 << 10)]
        max_op: u64,
    },
    /// Differential test: the same random operations on two directories
    /// must give the same results and trees.
    Difftest {
        a: PathBuf,
        b: PathBuf,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 2000)]
        ops: u64,
        /// Number of seeds to run (seed, seed+1, ...).
        #[arg(long, default_value_t = 1)]
        runs: u64,
    },
    /// The metadata lakehouse at scale: ingest, Parquet flush, namespace
    /// scan and report latency (see bench/lakehouse.sh); JSON on stdout.
    LakehouseBench {
        /// Scratch directory (the index and a scratch namespace).
        #[arg(long)]
        dir: PathBuf,
        /// Synthetic namespace changes (two per file: inode and name).
        #[arg(long, default_value_t = 10_000_000)]
        entries: u64,
        /// Changes written into a real namespace RocksDB and scanned back.
        #[arg(long, default_value_t = 2_000_000)]
        scan_entries: u64,
        /// Runs of each report (the median is printed).
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// Time file system workloads in DIR (see bench/fs.sh).
    Fsbench {
        dir: PathBuf,
        #[arg(long, default_value_t = 10_000)]
        files: usize,
        #[arg(long, default_value_t = 2_000)]
        small_files: usize,
        #[arg(long, default_value_t = 1024)]
        seq_mib: usize,
        /// A source tarball to extract and remove.
        #[arg(long)]
        tarball: Option<PathBuf>,
        /// Threads of the parallel pass (mdtest-style: each thread works
        /// in its own directories); 0 skips it.
        #[arg(long, default_value_t = 8)]
        threads: usize,
    },
    /// Stop the local cluster in DIR (idempotent).
    Down {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Start one stopped node of the cluster in DIR.
    StartNode {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        node: u64,
    },
    /// Stop one node: SIGTERM (default) or `--kill` for SIGKILL.
    StopNode {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        node: u64,
        #[arg(long)]
        kill: bool,
    },
    /// Same as `cfs admin status --dir D`.
    Status {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Append an entry to a shard's log and print its position.
    Append {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 0)]
        shard: u32,
        value: String,
    },
    /// Drive proposals from concurrent clients and report throughput and latency.
    BenchLog {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 0)]
        shard: u32,
        #[arg(long, default_value_t = 64)]
        clients: usize,
        #[arg(long, default_value_t = 4096)]
        size: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Segment store benchmark: write, read and degraded read through the
    /// stripe writer/reader, and the raw local-file baseline.
    SegBench {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 1024)]
        size_mib: u64,
        #[arg(long, default_value_t = 1024)]
        request_kib: usize,
    },
    /// Erasure code encode/decode throughput on one core.
    EcBench {
        #[arg(long, default_value_t = 4)]
        k: u8,
        #[arg(long, default_value_t = 2)]
        m: u8,
    },
    /// Rebuild the segment fragments a failed node held, on the others.
    Repair {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        node: u64,
    },
    /// Measure the WAL alone: append N entries per batch, one fsync per batch.
    WalBench {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 4096)]
        size: usize,
        #[arg(long, default_value_t = 20000)]
        entries: usize,
    },
    /// Measure 4 KiB write + fdatasync latency into a pre-zeroed file in DIR.
    FsyncBench {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 2000)]
        count: usize,
    },
}

#[derive(Subcommand)]
enum CaCmd {
    /// Make a new cluster CA in DIR (`ca.crt`, and `ca.key`, mode 0600:
    /// keep it off the nodes you can).
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// The cluster's name, for people reading the certificate.
        #[arg(long)]
        cluster_id: String,
    },
    /// Issue a certificate signed by the CA in CA_DIR, written to
    /// OUT/STEM.crt and OUT/STEM.key (with OUT/ca.crt beside them).
    Issue {
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// File name stem (default: node-N, admin or client-NAME).
        #[arg(long)]
        stem: Option<String>,
        /// A node certificate for this node id.
        #[arg(long, conflicts_with_all = ["admin", "client"])]
        node: Option<u64>,
        /// An administrator certificate (tools, repair, log clients).
        #[arg(long, conflicts_with = "client")]
        admin: Option<String>,
        /// A mount's certificate.
        #[arg(long)]
        client: Option<String>,
        /// The mount's root stays root (default: squashed to 65534).
        #[arg(long, requires = "client")]
        trust_root: bool,
        /// Map the mount's uid FROM to the cluster's uid TO (FROM:TO; repeat).
        #[arg(long, requires = "client", value_parser = parse_id_map)]
        map_uid: Vec<(u32, u32)>,
        /// Map the mount's gid FROM to the cluster's gid TO (FROM:TO; repeat).
        #[arg(long, requires = "client", value_parser = parse_id_map)]
        map_gid: Vec<(u32, u32)>,
        /// The mount may have this tenant's data keys (repeat; D51).
        #[arg(long, requires = "client")]
        tenant: Vec<String>,
        #[arg(long, default_value_t = cfs_net::ca::CERT_VALID_DAYS)]
        days: i64,
    },
}

#[derive(Subcommand)]
enum AdminCmd {
    /// SQL over the metadata lakehouse: the current namespace is the view
    /// `files`; `'index/**/*.parquet'` reads the files directly.
    Query {
        #[command(flatten)]
        index: cfs_node::admin_cli::IndexArgs,
        /// One SELECT statement.
        sql: String,
    },
    /// Space by owner.
    TopUsers {
        #[command(flatten)]
        index: cfs_node::admin_cli::IndexArgs,
    },
    /// The largest directories N levels below the root.
    TopDirs {
        #[command(flatten)]
        index: cfs_node::admin_cli::IndexArgs,
        #[arg(long, default_value_t = 2)]
        depth: usize,
    },
    /// Names matching a glob ('*.h5'; with a '/', the whole path).
    Find {
        #[command(flatten)]
        index: cfs_node::admin_cli::IndexArgs,
        pattern: String,
    },
    /// Files neither read nor written for N days.
    Stale {
        #[command(flatten)]
        index: cfs_node::admin_cli::IndexArgs,
        #[arg(long, default_value_t = 180)]
        days: u32,
    },
    /// Files and bytes by type (extension).
    Types {
        #[command(flatten)]
        index: cfs_node::admin_cli::IndexArgs,
    },
    /// Space saved by data reduction, by top-level directory.
    ReductionReport {
        #[command(flatten)]
        index: cfs_node::admin_cli::IndexArgs,
    },
    /// One-time mount tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// A subtree's data policy (a directory on a mount; inherited by
    /// what is created in it from then on).
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Tenants' data keys (encryption at rest, D51).
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Copy-on-write snapshots of a directory on a mount (D52), browsed
    /// read-only at DIR/.snapshots/NAME.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// The cluster as its daemons report it: health, leaders, lag,
    /// capacity, mounts, and every daemon's metrics URL.
    Status {
        /// A local cluster made by `cfs up`.
        #[arg(long)]
        dir: PathBuf,
        /// JSON instead of the table.
        #[arg(long)]
        json: bool,
        /// Refresh every N seconds until interrupted.
        #[arg(long, value_name = "SECONDS")]
        watch: Option<u64>,
    },
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Make TENANT's first key (sealed under the master key, in the log).
    Create {
        tenant: String,
        /// A local cluster made by `cfs up`.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Make a new generation of TENANT's key: new stripes use it within
    /// seconds; the collector re-encrypts the older stripes in the
    /// background (progress: `cfs admin keys list`, `cfs admin status`).
    Rotate {
        tenant: String,
        #[arg(long)]
        dir: PathBuf,
    },
    /// Every tenant's key generations (never key bytes) and how far
    /// re-encryption has gone.
    List {
        #[arg(long)]
        dir: PathBuf,
        /// JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum SnapshotCmd {
    /// Snapshot DIR (root, on a mount) as DIR/.snapshots/NAME: one log
    /// entry; the data stays shared and pinned until the snapshot is
    /// deleted.
    Create {
        dir: PathBuf,
        #[arg(long)]
        name: String,
    },
    /// DIR's snapshots, oldest first.
    List {
        dir: PathBuf,
        /// JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Delete snapshot NAME of DIR (its data is freed by the collector
    /// unless something else names it).
    Delete { dir: PathBuf, name: String },
    /// Copy snapshot NAME of DIR to NEWPATH (must not exist): contents,
    /// modes, owners, times, extended attributes, links; on the same
    /// mount the file data is shared, not copied.
    Restore {
        dir: PathBuf,
        name: String,
        newpath: PathBuf,
    },
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Set PATH's policy (root, on a mount).
    Set {
        path: PathBuf,
        /// How new files' stripes are stored: `zstd:N` (1..=19) or `off`.
        #[arg(long)]
        compress: Option<cfs_proto::types::Compression>,
        /// Whether new files' stripes are deduplicated: `on` or `off`.
        #[arg(long, value_parser = on_off, action = clap::ArgAction::Set)]
        dedupe: Option<bool>,
        /// Seal new files' stripes with this tenant's key (it must have
        /// one: `cfs admin keys create TENANT`); its dedupe domain is its
        /// own.
        #[arg(long, value_name = "TENANT")]
        encrypt: Option<String>,
    },
    /// Print PATH's policy (`mount default`: none set).
    Get { path: PathBuf },
    /// Remove PATH's policy (new files take the mount's `--compress` and
    /// `--dedupe`).
    Clear { path: PathBuf },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Print a one-time token that `cfs mount --token` trades at a node
    /// for a client certificate with this name and policy. Signed with
    /// the CA key (from --ca-dir, or the local cluster's in --dir);
    /// usable once, within --ttl; its use is recorded in the log.
    Create {
        /// The CA directory (ca.crt, ca.key).
        #[arg(long, conflicts_with = "dir")]
        ca_dir: Option<PathBuf>,
        /// A local cluster made by `cfs up` (its CA is DIR/tls).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// How long the token may be traded: seconds, or with a unit
        /// (30m, 12h, 7d; at most 7 days).
        #[arg(long, default_value = "1h", value_parser = parse_ttl)]
        ttl: u64,
        /// The mount's name in its certificate.
        #[arg(long)]
        client: String,
        /// The mount's root stays root (default: squashed to 65534).
        #[arg(long)]
        trust_root: bool,
        /// Map the mount's uid FROM to the cluster's uid TO (FROM:TO; repeat).
        #[arg(long, value_parser = parse_id_map)]
        map_uid: Vec<(u32, u32)>,
        /// Map the mount's gid FROM to the cluster's gid TO (FROM:TO; repeat).
        #[arg(long, value_parser = parse_id_map)]
        map_gid: Vec<(u32, u32)>,
        /// The mount may have this tenant's data keys (repeat; D51).
        #[arg(long)]
        tenant: Vec<String>,
    },
}

fn parse_ttl(s: &str) -> Result<u64, String> {
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num.parse().map_err(|e| format!("{s:?}: {e}"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("{s:?}: the unit is one of s, m, h, d")),
    };
    let secs = n.saturating_mul(mult);
    if secs == 0 || secs > cfs_net::token::TTL_MAX_SECS {
        return Err(format!(
            "{s:?}: between 1 s and {} s",
            cfs_net::token::TTL_MAX_SECS
        ));
    }
    Ok(secs)
}

/// Longest refresh interval `cfs admin status --watch` takes.
const WATCH_MAX_SECS: u64 = 3600;

fn admin_status(dir: &Path, json: bool, watch: Option<u64>) -> anyhow::Result<()> {
    let show = || -> anyhow::Result<String> {
        let st = cfs_node::status::gather(dir)?;
        Ok(if json {
            serde_json::to_string_pretty(&st)? + "\n"
        } else {
            cfs_node::status::render_table(&st)
        })
    };
    let Some(every) = watch else {
        print!("{}", show()?);
        return Ok(());
    };
    let every = Duration::from_secs(every.clamp(1, WATCH_MAX_SECS));
    loop {
        let out = show()?;
        // Clear the screen and home the cursor, as watch(1) does.
        print!("\x1b[2J\x1b[H{}", out);
        use std::io::Write;
        std::io::stdout().flush()?;
        std::thread::sleep(every);
    }
}

fn admin_cmd(c: AdminCmd) -> anyhow::Result<()> {
    match c {
        AdminCmd::Status { dir, json, watch } => admin_status(&dir, json, watch)?,
        AdminCmd::Query { index, sql } => {
            cfs_node::admin_cli::run(&index, cfs_node::admin_cli::Ask::Sql(sql))?
        }
        AdminCmd::TopUsers { index } => report(&index, "top-users", None, None, None)?,
        AdminCmd::TopDirs { index, depth } => report(&index, "top-dirs", Some(depth), None, None)?,
        AdminCmd::Find { index, pattern } => report(&index, "find", None, Some(&pattern), None)?,
        AdminCmd::Stale { index, days } => report(&index, "stale", None, None, Some(days))?,
        AdminCmd::Types { index } => report(&index, "types", None, None, None)?,
        AdminCmd::Policy(PolicyCmd::Set {
            path,
            compress,
            dedupe,
            encrypt,
        }) => {
            cfs_node::policy::set(
                &path,
                cfs_node::policy::Policy {
                    compress,
                    dedupe,
                    tenant: encrypt,
                },
            )?;
            println!("{}: {}", path.display(), cfs_node::policy::get(&path)?);
        }
        AdminCmd::Keys(cmd) => keys(cmd)?,
        AdminCmd::Snapshot(cmd) => snapshot(cmd)?,
        AdminCmd::Policy(PolicyCmd::Get { path }) => {
            println!("{}: {}", path.display(), cfs_node::policy::get(&path)?)
        }
        AdminCmd::Policy(PolicyCmd::Clear { path }) => {
            cfs_node::policy::clear(&path)?;
            println!("{}: {}", path.display(), cfs_node::policy::get(&path)?);
        }
        AdminCmd::ReductionReport { index } => {
            report(&index, "reduction-report", None, None, None)?
        }
        AdminCmd::Token(TokenCmd::Create {
            ca_dir,
            dir,
            ttl,
            client,
            trust_root,
            map_uid,
            map_gid,
            tenant,
        }) => {
            let ca_dir = match (ca_dir, dir) {
                (Some(d), None) => d,
                (None, Some(d)) => d.join("tls"),
                _ => bail!("give --ca-dir or --dir"),
            };
            let ca = cfs_net::ca::Ca::load(&ca_dir)
                .with_context(|| format!("loading the CA in {}", ca_dir.display()))?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs();
            let policy = cfs_net::ClientPolicy {
                trust_root,
                uid_map: map_uid,
                gid_map: map_gid,
                tenants: tenant,
                any_tenant: false,
            };
            let token = ca.token_key().mint(&client, policy, now, ttl)?;
            eprintln!("a one-time token for client {client}, valid {ttl} s:");
            println!("{token}");
        }
    }
    Ok(())
}

fn report(
    index: &cfs_node::admin_cli::IndexArgs,
    name: &str,
    depth: Option<usize>,
    pattern: Option<&str>,
    days: Option<u32>,
) -> anyhow::Result<()> {
    let r = cfs_admin::Report::parse(name, index.limit, depth, pattern, days)?;
    cfs_node::admin_cli::run(index, cfs_node::admin_cli::Ask::Report(r))
}

fn parse_id_map(s: &str) -> Result<(u32, u32), String> {
    let (a, b) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: expected FROM:TO"))?;
    let n = |x: &str| x.parse::<u32>().map_err(|e| format!("{x:?}: {e}"));
    Ok((n(a)?, n(b)?))
}

fn ca_cmd(c: CaCmd) -> anyhow::Result<()> {
    use cfs_net::ca::Ca;
    use cfs_net::{ClientPolicy, Principal};
    match c {
        CaCmd::Init { dir, cluster_id } => {
            if dir.join("ca.key").exists() {
                bail!("{} already holds a CA", dir.display());
            }
            Ca::generate(&cluster_id)?.save(&dir)?;
            println!("CA written to {}/ca.crt and ca.key", dir.display());
        }
        CaCmd::Issue {
            ca_dir,
            out,
            stem,
            node,
            admin,
            client,
            trust_root,
            map_uid,
            map_gid,
            tenant,
            days,
        } => {
            let (who, default_stem) = match (node, admin, client) {
                (Some(id), None, None) => (Principal::Node(id), format!("node-{id}")),
                (None, Some(n), None) => (Principal::Admin(n), "admin".to_string()),
                (None, None, Some(name)) => (
                    Principal::Client {
                        name: name.clone(),
                        policy: ClientPolicy {
                            trust_root,
                            uid_map: map_uid,
                            gid_map: map_gid,
                            tenants: tenant,
                            any_tenant: false,
                        },
                    },
                    format!("client-{name}"),
                ),
                _ => bail!("give one of --node, --admin, --client"),
            };
            let stem = stem.unwrap_or(default_stem);
            Ca::load(&ca_dir)?.issue_files(&who, days, &out, &stem)?;
            println!(
                "{who}: {}/{stem}.crt and {stem}.key (valid {days} days)",
                out.display()
            );
        }
    }
    Ok(())
}

#[derive(clap::Args)]
struct MountArgs {
    mountpoint: PathBuf,
    /// Cluster directory (servers and cluster id from its configs).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Metadata servers, comma-separated `host:port` (instead of --dir).
    #[arg(long, value_delimiter = ',')]
    servers: Vec<std::net::SocketAddr>,
    #[arg(long)]
    cluster_id: Option<String>,
    /// Directory with this mount's TLS files: ca.crt, and STEM.crt and
    /// STEM.key (`cfs ca issue --client NAME`); needed with --servers.
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// The certificate's file name stem in --tls-dir.
    #[arg(long, default_value = "mount")]
    tls_stem: String,
    /// A one-time token (`cfs admin token create`) to trade at a node for
    /// this mount's certificate, kept in --tls-dir as STEM.crt and
    /// STEM.key (later mounts use them without a token). --tls-dir must
    /// hold the cluster's ca.crt.
    #[arg(long, requires = "tls_dir")]
    token: Option<String>,
    /// Connect without TLS (only to a cluster made with
    /// --insecure-plaintext).
    #[arg(long)]
    insecure_plaintext: bool,
    /// strict | close-to-open | session
    #[arg(long, default_value = "close-to-open")]
    cache_mode: cfs_client::CacheMode,
    /// Buffered dirty bytes per file before a flush, MiB.
    #[arg(long, default_value_t = 8)]
    write_buffer: usize,
    /// Largest read-ahead window, MiB (0: off).
    #[arg(long, default_value_t = 16)]
    read_ahead: usize,
    /// Decoded-stripe cache, MiB.
    #[arg(long, default_value_t = 256)]
    cache: usize,
    /// Seconds to wait for a server before failing a call with EIO/ENOTCONN.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// Move to the node leading most shards (default: yes with --dir, no
    /// with --servers, whose order is then kept).
    #[arg(long)]
    follow_leader: Option<bool>,
    /// Serve the mount's counters at http://ADDR/metrics (port 0: any).
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Write the metrics URL to this file.
    #[arg(long)]
    metrics_url_file: Option<PathBuf>,
    /// Log lines as `console` text or `json` (one object per line, with
    /// the span fields: `req` ties a request to the node's lines).
    #[arg(long, default_value = "console", value_parser = ["console", "json"])]
    log_format: String,
    /// Make every namespace change wait for its log commit (no early
    /// answers: docs/filesystem.md, "When changes are durable").
    #[arg(long)]
    sync_namespace: bool,
    /// Honour setuid/setgid bits of files run from this mount (default:
    /// the mount is nosuid).
    #[arg(long)]
    suid: bool,
    /// Allow opening device files on this mount (default: nodev).
    #[arg(long)]
    dev: bool,
    /// How the stripes this mount writes are stored: `zstd:N` (1..=19,
    /// each stripe compressed when that saves 1/16 or more) or `off`.
    #[arg(long, default_value = "zstd:1")]
    compress: cfs_proto::types::Compression,
    /// Inline dedupe of the stripes this mount writes: `on` (chunks the
    /// cluster already stores are referenced, not written again) or
    /// `off`.
    #[arg(long, default_value = "on", value_parser = on_off, action = clap::ArgAction::Set)]
    dedupe: bool,
}

fn on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("{s:?}: expected `on` or `off`")),
    }
}

fn mount_cmd(a: MountArgs) -> anyhow::Result<()> {
    let (servers, cluster_id) = match &a.dir {
        Some(dir) => {
            let cfgs = cluster::load_configs(dir)?;
            if cfgs.is_empty() {
                bail!("no cluster in {}", dir.display());
            }
            let servers = if a.servers.is_empty() {
                cluster::meta_servers(&cfgs)
            } else {
                a.servers.clone()
            };
            (servers, cfgs[0].cluster_id.clone())
        }
        None => (
            a.servers.clone(),
            a.cluster_id
                .clone()
                .context("--cluster-id is needed with --servers")?,
        ),
    };
    if servers.is_empty() {
        bail!("no metadata servers: give --dir or --servers");
    }
    if let (Some(token), Some(tls)) = (&a.token, &a.tls_dir) {
        let files = cfs_net::TlsFiles::in_dir(tls, &a.tls_stem);
        if files.cert.exists() {
            bail!(
                "{} exists: this mount has its certificate (mount without --token)",
                files.cert.display()
            );
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let got = rt
            .block_on(cfs_client::enroll::enroll(
                &servers, &files.ca, token, "mount",
            ))
            .context("trading the mount token")?;
        cfs_net::ca::write_file(&files.key, got.key_pem.as_bytes(), 0o600)?;
        cfs_net::ca::write_file(&files.cert, got.cert_pem.as_bytes(), 0o644)?;
        eprintln!(
            "mount token traded: certificate in {}",
            files.cert.display()
        );
    }
    let security = match (&a.tls_dir, &a.dir, a.insecure_plaintext) {
        (Some(t), _, false) => cfs_net::Security::load(&cfs_net::TlsFiles::in_dir(t, &a.tls_stem))
            .context("loading the mount's TLS files")?,
        (None, Some(d), false) => cluster::mount_security(d)?,
        (None, _, true) => cfs_net::Security::plaintext(),
        (Some(_), _, true) => bail!("--tls-dir and --insecure-plaintext exclude each other"),
        (None, None, false) => bail!(
            "--tls-dir is needed with --servers (or --insecure-plaintext for a development cluster)"
        ),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CFS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false);
    if a.log_format == "json" {
        b.json().init();
    } else {
        b.init();
    }
    let opts = cfs_client::MountOptions {
        servers,
        cluster_id,
        security,
        cache_mode: a.cache_mode,
        write_buffer: a.write_buffer.max(1) << 20,
        read_ahead: a.read_ahead << 20,
        cache_bytes: a.cache.max(8) << 20,
        timeout: Duration::from_secs(a.timeout.max(1)),
        follow_leader: a.follow_leader.unwrap_or(a.servers.is_empty()),
        metrics_listen: a.metrics_listen,
        metrics_url_file: a.metrics_url_file,
        sync_namespace: a.sync_namespace,
        allow_suid: a.suid,
        allow_dev: a.dev,
        compression: a.compress,
        dedupe: a.dedupe,
    };
    cfs_client::mount(&a.mountpoint, opts)?;
    Ok(())
}

fn ns_dump(dir: &Path, node: u64) -> anyhow::Result<()> {
    let path = cluster::node_dir(dir, node).join("data/namespace");
    let db = cfs_materializers::NamespaceDb::open_read_only(&path)?;
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for (k, v) in db.dump()? {
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        writeln!(out, "{} {}", hex(&k), hex(&v))?;
    }
    Ok(())
}

fn fsck(dir: &Path, node: u64) -> anyhow::Result<()> {
    let path = cluster::node_dir(dir, node).join("data/namespace");
    let db = cfs_materializers::NamespaceDb::open_read_only(&path)?;
    let r = cfs_materializers::check::check(&db)?;
    println!(
        "node {node}: {} inodes, {} entries, {} orphans, {} open transaction records, {} problems",
        r.inodes,
        r.entries,
        r.orphans,
        r.open_transactions,
        r.problems.len()
    );
    for p in &r.problems {
        println!("  {p}");
    }
    if !r.problems.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}

fn client_for(dir: &Path) -> anyhow::Result<LogClient> {
    let cfgs = cluster::load_configs(dir)?;
    if cfgs.is_empty() {
        bail!(
            "no cluster in {} (run `cfs up --dir {}`)",
            dir.display(),
            dir.display()
        );
    }
    Ok(LogClient::new(
        &cfgs[0].cluster_id,
        cfgs.iter().map(|c| c.listen).collect(),
        cluster::admin_security(dir)?,
    ))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

async fn bench_log(
    dir: &Path,
    shard: u32,
    clients: usize,
    size: usize,
    seconds: u64,
) -> anyhow::Result<()> {
    let shard = cfs_log::ShardId(shard);
    let client = Arc::new(client_for(dir)?);
    // Warm up: find the leader.
    client.propose(shard, vec![0u8; size]).await?;
    let until = Instant::now() + Duration::from_secs(seconds);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            while Instant::now() < until {
                let t = Instant::now();
                match c.propose(shard, vec![7u8; size]).await {
                    Ok(_) => lat.push(t.elapsed().as_secs_f64() * 1e3),
                    Err(_) => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        all.extend(l);
        errors += e;
    }
    let secs = start.elapsed().as_secs_f64();
    all.sort_by(|a, b| a.total_cmp(b));
    println!(
        "log: {:.0} entries/s, p50 {:.2} ms, p99 {:.2} ms ({} B entries, {} clients, {} errors)",
        all.len() as f64 / secs,
        percentile(&all, 0.5),
        percentile(&all, 0.99),
        size,
        clients,
        errors
    );
    Ok(())
}

fn fsync_bench(dir: &Path, count: usize) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    std::fs::create_dir_all(dir)?;
    let path = dir.join("fsync-bench.tmp");
    let len = (count * 4096) as u64;
    {
        let f = std::fs::File::create(&path)?;
        f.write_all_at(&vec![0u8; len as usize], 0)?;
        f.sync_all()?;
    }
    let f = std::fs::OpenOptions::new().write(true).open(&path)?;
    let buf = vec![0xabu8; 4096];
    let mut lat = Vec::with_capacity(count);
    for i in 0..count {
        let t = Instant::now();
        f.write_all_at(&buf, (i * 4096) as u64)?;
        f.sync_data()?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    std::fs::remove_file(&path)?;
    lat.sort_by(|a, b| a.total_cmp(b));
    println!(
        "fdatasync: 4 KiB write+fdatasync into a pre-zeroed file: p50 {:.3} ms, p99 {:.3} ms ({} samples)",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        count
    );
    // The disk's own bandwidth for what a WAL does under load: large
    // sequential writes, each made durable, into a pre-zeroed file.
    const CHUNK: usize = 1 << 20;
    const BANDWIDTH_BYTES: usize = 256 << 20;
    {
        let f = std::fs::File::create(&path)?;
        let zeros = vec![0u8; CHUNK];
        for i in 0..BANDWIDTH_BYTES / CHUNK {
            f.write_all_at(&zeros, (i * CHUNK) as u64)?;
        }
        f.sync_all()?;
    }
    let f = std::fs::OpenOptions::new().write(true).open(&path)?;
    let buf = vec![0xcdu8; CHUNK];
    let t = Instant::now();
    for i in 0..BANDWIDTH_BYTES / CHUNK {
        f.write_all_at(&buf, (i * CHUNK) as u64)?;
        f.sync_data()?;
    }
    let secs = t.elapsed().as_secs_f64();
    std::fs::remove_file(&path)?;
    println!(
        "sequential: 1 MiB write+fdatasync into a pre-zeroed file: {:.1} MiB/s ({} MiB)",
        (BANDWIDTH_BYTES >> 20) as f64 / secs,
        BANDWIDTH_BYTES >> 20
    );
    Ok(())
}

fn wal_bench(dir: &Path, size: usize, entries: usize) -> anyhow::Result<()> {
    use cfs_log::wal::{Wal, WalConfig, WalOp};
    for batch in [1usize, 8, 64, 512] {
        let d = dir.join(format!("wal-bench-{batch}"));
        let _ = std::fs::remove_dir_all(&d);
        let mut wal = Wal::open(cfs_log::disk::FsDisk::new(&d)?, WalConfig::default())?;
        let payload = vec![5u8; size];
        let t = Instant::now();
        let mut done = 0;
        while done < entries {
            for _ in 0..batch {
                let first_idx = wal.state().end();
                let e = cfs_log::Entry::new(
                    cfs_log::EntryKind::DATA,
                    cfs_log::RequestId::NONE,
                    payload.clone(),
                );
                wal.append(WalOp::Append {
                    first_idx,
                    entries: vec![e],
                })?;
            }
            wal.sync()?;
            done += batch;
        }
        let secs = t.elapsed().as_secs_f64();
        println!(
            "wal: {size} B entries, {batch} per fsync: {:.0} entries/s, {:.1} MB/s, {:.3} ms per batch",
            done as f64 / secs,
            done as f64 * size as f64 / secs / 1e6,
            secs * 1e3 / (done / batch) as f64
        );
        drop(wal);
        std::fs::remove_dir_all(&d)?;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Up {
            nodes,
            dir,
            shards,
            wait,
            mount,
            mount_opts,
            insecure_plaintext,
        } => {
            std::fs::create_dir_all(&dir)?;
            let dir = dir.canonicalize()?;
            let transport = if insecure_plaintext {
                cluster::Transport::InsecurePlaintext
            } else {
                cluster::Transport::Tls
            };
            let cfgs = cluster::ensure_configs(&dir, nodes, shards, transport)?;
            let bin = cluster::node_binary()?;
            for c in &cfgs {
                cluster::start_node(&dir, c.node_id, &bin)?;
            }
            cluster::wait_healthy(&cfgs, Duration::from_secs(wait)).with_context(|| {
                format!(
                    "cluster in {} did not become healthy; see node-*/node.log",
                    dir.display()
                )
            })?;
            println!("cluster up: {} nodes in {}", cfgs.len(), dir.display());
            for c in &cfgs {
                println!(
                    "  node {}: log {} http http://{}",
                    c.node_id, c.listen, c.http
                );
            }
            if let Some((addr, _)) = cluster::admin_gateway(&dir)? {
                let token = cluster::admin_token_path(&dir);
                if cfgs.iter().any(|c| c.insecure_plaintext) {
                    println!(
                        "  admin gateway and web UI: http://{addr} (token in {})",
                        token.display()
                    );
                } else {
                    println!(
                        "  admin gateway and web UI: https://{addr} (token in {}; \
                         its certificate names {} under the CA {})",
                        token.display(),
                        cfs_net::principal::ANY_NODE,
                        cluster::tls_dir(&dir).join("ca.crt").display()
                    );
                }
            }
            if let Some(mnt) = mount {
                cfs_node::mounts::start_mount(&dir, &mnt, &mount_opts)?;
                println!("mounted at {}", mnt.canonicalize()?.display());
            }
        }
        Cmd::Ca(c) => ca_cmd(c)?,
        Cmd::Admin(c) => admin_cmd(c)?,
        Cmd::Mount(a) => mount_cmd(a)?,
        Cmd::LakehouseBench {
            dir,
            entries,
            scan_entries,
            runs,
        } => {
            let r = cfs_node::lakebench::run(&dir, entries, scan_entries, runs)?;
            println!("{}", serde_json::to_string_pretty(&r)?);
        }
        Cmd::Fsbench {
            dir,
            files,
            small_files,
            seq_mib,
            tarball,
            threads,
        } => cfs_node::fstest::bench::run(
            &dir,
            &cfs_node::fstest::bench::BenchConfig {
                files,
                small_files,
                seq_mib,
                tarball,
                threads,
            },
        )?,
        Cmd::Fsx {
            file,
            seed,
            ops,
            seconds,
            max_size,
            max_op,
        } => {
            use cfs_node::fstest::fsx;
            let until = seconds.map(|s| Instant::now() + Duration::from_secs(s));
            let mut seed = seed;
            loop {
                let cfg = fsx::FsxConfig {
                    seed,
                    ops,
                    duration: None,
                    max_size: max_size.max(4096),
                    max_op: max_op.max(1),
                };
                let r = fsx::run(&file, &cfg)?;
                println!(
                    "fsx: seed {seed}: {} ops, {} bytes checked, {:.1} s: ok",
                    r.ops,
                    r.bytes_checked,
                    r.elapsed.as_secs_f64()
                );
                seed += 1;
                if until.is_none_or(|u| Instant::now() >= u) {
                    break;
                }
            }
        }
        Cmd::Difftest {
            a,
            b,
            seed,
            ops,
            runs,
        } => {
            for s in seed..seed + runs {
                cfs_node::fstest::difftest::run(&a, &b, s, ops)?;
                println!("difftest: seed {s}: {ops} ops, same results and trees");
            }
        }
        Cmd::NsDump { dir, node } => ns_dump(&dir, node)?,
        Cmd::Fsck { dir, node } => fsck(&dir, node)?,
        Cmd::Down { dir } => {
            if let Some(mnt) = cfs_node::mounts::stop_mount(&dir)? {
                println!("unmounted {}", mnt.display());
            }
            let cfgs = cluster::load_configs(&dir)?;
            let mut stopped = 0;
            for c in &cfgs {
                if cluster::stop_node(&dir, c.node_id, libc::SIGTERM, Duration::from_secs(10))? {
                    stopped += 1;
                }
            }
            println!("cluster down: stopped {stopped} of {} nodes", cfgs.len());
        }
        Cmd::StartNode { dir, node } => {
            cluster::start_node(&dir, node, &cluster::node_binary()?)?;
        }
        Cmd::StopNode { dir, node, kill } => {
            let sig = if kill { libc::SIGKILL } else { libc::SIGTERM };
            cluster::stop_node(&dir, node, sig, Duration::from_secs(10))?;
        }
        Cmd::Status { dir } => admin_status(&dir, false, None)?,
        Cmd::Append { dir, shard, value } => {
            let rt = tokio::runtime::Runtime::new()?;
            let client = client_for(&dir)?;
            let p = rt.block_on(client.propose(cfs_log::ShardId(shard), value.into_bytes()))?;
            println!("{p}");
        }
        Cmd::BenchLog {
            dir,
            shard,
            clients,
            size,
            seconds,
        } => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(bench_log(&dir, shard, clients, size, seconds))?;
        }
        Cmd::FsyncBench { dir, count } => fsync_bench(&dir, count)?,
        Cmd::SegBench {
            dir,
            size_mib,
            request_kib,
        } => {
            let rt = tokio::runtime::Runtime::new()?;
            let raw = dir.join("raw");
            rt.block_on(cfs_node::segtools::seg_bench(
                &dir,
                size_mib,
                request_kib,
                &raw,
            ))?;
        }
        Cmd::EcBench { k, m } => {
            cfs_node::segtools::ec_bench(cfs_segments::layout::Layout::new(k, m)?)?
        }
        Cmd::Repair { dir, node } => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(cfs_node::segtools::repair(&dir, node))?;
        }
        Cmd::WalBench { dir, size, entries } => wal_bench(&dir, size, entries)?,
    }
    Ok(())
}

fn snapshot(cmd: SnapshotCmd) -> anyhow::Result<()> {
    use cfs_node::snapshot;
    match cmd {
        SnapshotCmd::Create { dir, name } => {
            let s = snapshot::create(&dir, &name)?;
            println!(
                "snapshot {} of {}: {}",
                s.name,
                dir.display(),
                s.path.display()
            );
        }
        SnapshotCmd::List { dir, json } => {
            let all = snapshot::list(&dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else if all.is_empty() {
                println!("{}: no snapshots", dir.display());
            } else {
                println!("{:<32} {:<20} PATH", "NAME", "TAKEN (UTC)");
                for s in all {
                    println!("{:<32} {:<20} {}", s.name, utc(s.taken), s.path.display());
                }
            }
        }
        SnapshotCmd::Delete { dir, name } => {
            snapshot::delete(&dir, &name)?;
            println!("deleted snapshot {name} of {}", dir.display());
        }
        SnapshotCmd::Restore { dir, name, newpath } => {
            let r = snapshot::restore(&dir, &name, &newpath)?;
            println!(
                "restored snapshot {name} of {} to {}: {} directories, {} files, {} hard links, {} bytes",
                dir.display(),
                newpath.display(),
                r.dirs,
                r.files,
                r.links,
                r.bytes
            );
        }
    }
    Ok(())
}

/// `secs` since the epoch as `YYYY-MM-DD HH:MM:SS` (UTC).
fn utc(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn keys(cmd: KeysCmd) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match cmd {
        KeysCmd::Create { tenant, dir } => {
            let r = rt.block_on(cfs_node::keys::make(&dir, &tenant, false))?;
            print!("{}", cfs_node::keys::render(&r));
        }
        KeysCmd::Rotate { tenant, dir } => {
            let r = rt.block_on(cfs_node::keys::make(&dir, &tenant, true))?;
            print!("{}", cfs_node::keys::render(&r));
        }
        KeysCmd::List { dir, json } => {
            let r = rt.block_on(cfs_node::keys::report(&dir))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", cfs_node::keys::render(&r));
            }
        }
    }
    Ok(())
}
