//! A local development cluster: N `cfs-node` processes on loopback, each
//! with its own directory under one cluster directory.
//!
//! ```text
//! DIR/node-<id>/config.toml   generated once, reused (same ports) later
//! DIR/node-<id>/data/         the node's data directory
//! DIR/node-<id>/node.log      its stderr
//! DIR/node-<id>/pid           while running
//! ```
//! `up` and `down` are idempotent: `up` starts only nodes that are not
//! running, `down` stops only those that are.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::config::{LogFormat, NodeAddr, NodeConfig};

pub fn node_dir(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("node-{id}"))
}

/// A free loopback port *below* the kernel's ephemeral range, so no
/// outgoing connection can take it between now and the node's bind (a port
/// from `bind(0)` can be handed to a client socket in the meantime).
///
/// Ports handed out by this process are never handed out again, so clusters
/// configured concurrently (parallel tests) do not collide.
fn free_port(taken: &mut std::collections::BTreeSet<u16>) -> anyhow::Result<u16> {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    taken.extend(given.iter().copied());
    let port = free_port_inner(taken)?;
    given.insert(port);
    Ok(port)
}

fn free_port_inner(taken: &mut std::collections::BTreeSet<u16>) -> anyhow::Result<u16> {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (min, max) = (10_000u16, low.saturating_sub(1));
    if max > min + 1000 {
        for _ in 0..1000 {
            let port = rand::random::<u16>() % (max - min) + min;
            if !taken.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
                taken.insert(port);
                return Ok(port);
            }
        }
    }
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    taken.insert(port);
    Ok(port)
}

/// How a new local cluster's connections are secured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// A cluster CA in `DIR/tls` and certificates for every node, the
    /// administrator (`cfs` commands with `--dir`) and the local mount.
    Tls,
    /// No TLS, no authentication (`cfs up --insecure-plaintext`).
    InsecurePlaintext,
}

/// Where a local cluster keeps its CA and certificates.
pub fn tls_dir(dir: &Path) -> PathBuf {
    dir.join("tls")
}

/// The administrator's connections to the local cluster in `dir`.
pub fn admin_security(dir: &Path) -> anyhow::Result<cfs_net::Security> {
    local_security(dir, "admin")
}

/// The local mount's connections (`cfs mount --dir`): a client
/// certificate trusted with root, since its user runs the cluster.
pub fn mount_security(dir: &Path) -> anyhow::Result<cfs_net::Security> {
    local_security(dir, "mount")
}

fn local_security(dir: &Path, stem: &str) -> anyhow::Result<cfs_net::Security> {
    let cfgs = load_configs(dir)?;
    let Some(c) = cfgs.first() else {
        bail!("no cluster in {}", dir.display());
    };
    if c.insecure_plaintext {
        return Ok(cfs_net::Security::plaintext());
    }
    cfs_net::Security::load(&cfs_net::TlsFiles::in_dir(&tls_dir(dir), stem))
        .with_context(|| format!("loading the {stem} certificate of {}", dir.display()))
}

/// Makes the CA and the certificates of a new local cluster.
fn make_certificates(dir: &Path, cluster_id: &str, nodes: u64) -> anyhow::Result<()> {
    use cfs_net::ca::{Ca, CERT_VALID_DAYS};
    use cfs_net::{ClientPolicy, Principal};
    let td = tls_dir(dir);
    let ca = Ca::generate(cluster_id)?;
    ca.save(&td)?;
    for id in 1..=nodes {
        ca.issue_files(
            &Principal::Node(id),
            CERT_VALID_DAYS,
            &td,
            &format!("node-{id}"),
        )?;
    }
    ca.issue_files(
        &Principal::Admin("local".into()),
        CERT_VALID_DAYS,
        &td,
        "admin",
    )?;
    let mount = Principal::Client {
        name: "local".into(),
        policy: ClientPolicy::trusted(),
    };
    ca.issue_files(&mount, CERT_VALID_DAYS, &td, "mount")?;
    Ok(())
}

/// The lakehouse flush interval of a local cluster: 5 s, so that a
/// report reflects a change within seconds (production default 60 s).
pub const LAKEHOUSE_FLUSH_MS: u64 = 5_000;

/// The admin gateway's token of the local cluster in `dir`.
pub fn admin_token_path(dir: &Path) -> PathBuf {
    dir.join("admin-token")
}

/// The master key of the local cluster in `dir` (D51): seals its
/// tenants' keys in the log. Every node reads it (`master_key_file`).
pub fn master_key_path(dir: &Path) -> PathBuf {
    dir.join("master.key")
}

/// 32 new random bytes as 64 hex digits (an admin token, a master key),
/// readable by their owner only.
fn write_secret(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let token: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(token.as_bytes())?;
    Ok(())
}

/// The admin gateway of the local cluster in `dir`: its address and token.
pub fn admin_gateway(dir: &Path) -> anyhow::Result<Option<(SocketAddr, String)>> {
    let Some(c) = load_configs(dir)?
        .into_iter()
        .find(|c| c.admin_listen.is_some())
    else {
        return Ok(None);
    };
    let (Some(addr), Some(tf)) = (c.admin_listen, c.admin_token_file) else {
        return Ok(None);
    };
    let token = std::fs::read_to_string(&tf)
        .with_context(|| format!("reading the admin token {}", tf.display()))?;
    Ok(Some((addr, token.trim().to_string())))
}

/// The lakehouse directory of the local cluster in `dir`.
pub fn lakehouse_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    load_configs(dir)?
        .into_iter()
        .find_map(|c| c.lakehouse_dir)
        .with_context(|| {
            format!(
                "no node of the cluster in {} keeps a lakehouse",
                dir.display()
            )
        })
}

/// Writes the configs of a new cluster, or loads the existing ones.
pub fn ensure_configs(
    dir: &Path,
    nodes: u64,
    shards: u32,
    transport: Transport,
) -> anyhow::Result<Vec<NodeConfig>> {
    let existing = load_configs(dir)?;
    if !existing.is_empty() {
        if existing.len() as u64 != nodes {
            bail!(
                "{} already holds a {}-node cluster; run `cfs down` and remove it to change the size",
                dir.display(),
                existing.len()
            );
        }
        return Ok(existing);
    }
    if nodes < 2 {
        bail!("a cluster needs at least 2 nodes (3 for fault tolerance)");
    }
    let mut taken = std::collections::BTreeSet::new();
    let mut addrs = Vec::new();
    for id in 1..=nodes {
        addrs.push(NodeAddr {
            id,
            addr: SocketAddr::from(([127, 0, 0, 1], free_port(&mut taken)?)),
            segments: Some(SocketAddr::from(([127, 0, 0, 1], free_port(&mut taken)?))),
            meta: Some(SocketAddr::from(([127, 0, 0, 1], free_port(&mut taken)?))),
            http: Some(SocketAddr::from(([127, 0, 0, 1], free_port(&mut taken)?))),
        });
    }
    let cluster_id = format!("cfs-{:08x}", rand::random::<u32>());
    if transport == Transport::Tls {
        make_certificates(dir, &cluster_id, nodes)?;
    }
    let td = std::path::absolute(tls_dir(dir))?;
    let token_file = std::path::absolute(admin_token_path(dir))?;
    write_secret(&token_file)?;
    let master_key = std::path::absolute(master_key_path(dir))?;
    write_secret(&master_key)?;
    let mut out = Vec::new();
    for a in &addrs {
        let nd = node_dir(dir, a.id);
        std::fs::create_dir_all(&nd)?;
        let cfg = NodeConfig {
            cluster_id: cluster_id.clone(),
            node_id: a.id,
            listen: a.addr,
            http: a.http.unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0))),
            data_dir: nd.join("data"),
            shards: (0..shards).map(cfs_log::ShardId).collect(),
            tick_ms: 10,
            election_ticks: 10,
            propose_timeout_ms: 5000,
            wal_segment_mib: 64,
            wal_memory_mib: 64,
            log_retain_entries: 100_000,
            log_format: LogFormat::Json,
            segments_listen: a.segments,
            meta_listen: a.meta,
            spread_depth: cfs_proto::types::DEFAULT_SPREAD_DEPTH,
            connections_per_peer: cfs_frame::peers::CONNECTIONS_PER_PEER_DEFAULT,
            segments_dir: None,
            segments_io_uring: true,
            forget_idle_clients_s: 3600,
            insecure_plaintext: transport == Transport::InsecurePlaintext,
            tls: (transport == Transport::Tls).then(|| crate::config::TlsSection {
                ca: td.join("ca.crt"),
                cert: td.join(format!("node-{}.crt", a.id)),
                key: td.join(format!("node-{}.key", a.id)),
                enroll_ca_dir: Some(td.clone()),
            }),
            // Node 1 keeps the lakehouse and serves the admin gateway.
            lakehouse_dir: (a.id == 1).then(|| nd.join("data").join("lakehouse")),
            lakehouse_flush_ms: LAKEHOUSE_FLUSH_MS,
            admin_listen: (a.id == 1)
                .then(|| free_port(&mut taken))
                .transpose()?
                .map(|p| SocketAddr::from(([127, 0, 0, 1], p))),
            admin_token_file: (a.id == 1).then(|| token_file.clone()),
            admin_allow: Vec::new(),
            gc_interval_ms: 10_000,
            gc_grace_ms: 30_000,
            master_key_file: Some(master_key.clone()),
            nodes: addrs.clone(),
            dial: Vec::new(),
        };
        std::fs::write(nd.join("config.toml"), toml::to_string(&cfg)?)?;
        out.push(cfg);
    }
    Ok(out)
}

/// The configs of the cluster in `dir`, sorted by node id (empty if none).
pub fn load_configs(dir: &Path) -> anyhow::Result<Vec<NodeConfig>> {
    let mut v = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Ok(v);
    };
    for e in rd {
        let p = e?.path().join("config.toml");
        if p.exists() {
            v.push(NodeConfig::load(&p)?);
        }
    }
    v.sort_by_key(|c| c.node_id);
    Ok(v)
}

fn read_pid(dir: &Path, id: u64) -> Option<i32> {
    std::fs::read_to_string(node_dir(dir, id).join("pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn alive(pid: i32) -> bool {
    // A node this process started and that died (e.g. aborted) stays a
    // zombie until reaped: reap it so it does not count as running.
    // SAFETY: waitpid with WNOHANG and a null status pointer only reaps an
    // exited child of ours (ECHILD otherwise); kill with signal 0 only
    // checks that the process exists.
    unsafe {
        libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG);
        libc::kill(pid, 0) == 0
    }
}

/// The running pid of node `id`, if any: the pid file's process must be
/// alive *and* be that node (its `--config` is this node's config file), so
/// a stale pid file whose number the kernel gave to another process (a
/// restarted node of another cluster, say) is never signalled.
pub fn running_pid(dir: &Path, id: u64) -> Option<i32> {
    read_pid(dir, id).filter(|p| alive(*p) && is_node_process(*p, &node_dir(dir, id)))
}

/// Whether process `pid` runs with `--config <nd>/config.toml` (compared as
/// canonical paths, so a cluster directory spelled differently still
/// matches). Where `/proc` cannot tell (not Linux), trusts the pid file.
fn is_node_process(pid: i32, nd: &Path) -> bool {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let Ok(cmdline) = std::fs::read(proc_dir.join("cmdline")) else {
        return !Path::new("/proc/self").exists();
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let Some(config) = args
        .iter()
        .position(|a| *a == b"--config")
        .and_then(|i| args.get(i + 1))
    else {
        return false;
    };
    let config = Path::new(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(config));
    let config = match std::fs::read_link(proc_dir.join("cwd")) {
        Ok(cwd) => cwd.join(config),
        Err(_) => config.to_path_buf(),
    };
    match (
        std::fs::canonicalize(&config),
        std::fs::canonicalize(nd.join("config.toml")),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Starts node `id` in the background unless it is running.
pub fn start_node(dir: &Path, id: u64, node_bin: &Path) -> anyhow::Result<()> {
    start_node_env(dir, id, node_bin, &[])
}

/// [`start_node`] with extra environment variables (fault injection in
/// tests: `CFS_FAILPOINT`).
pub fn start_node_env(
    dir: &Path,
    id: u64,
    node_bin: &Path,
    env: &[(&str, &str)],
) -> anyhow::Result<()> {
    if running_pid(dir, id).is_some() {
        return Ok(());
    }
    let nd = node_dir(dir, id);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(nd.join("node.log"))?;
    let mut cmd = std::process::Command::new(node_bin);
    cmd.envs(env.iter().copied())
        .arg("--config")
        .arg(nd.join("config.toml"))
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    {
        use std::os::unix::process::CommandExt;
        // Own process group: the node outlives the `cfs up` that started it
        // and ignores the terminal's Ctrl-C.
        cmd.process_group(0);
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", node_bin.display()))?;
    std::fs::write(nd.join("pid"), format!("{}\n", child.id()))?;
    Ok(())
}

/// Sends `signal` to node `id` if it runs; with SIGTERM waits up to
/// `grace` and then kills it.
pub fn stop_node(dir: &Path, id: u64, signal: i32, grace: Duration) -> anyhow::Result<bool> {
    let Some(pid) = running_pid(dir, id) else {
        let _ = std::fs::remove_file(node_dir(dir, id).join("pid"));
        return Ok(false);
    };
    // SAFETY: plain kill(2) on a pid we started.
    unsafe { libc::kill(pid, signal) };
    let until = Instant::now() + grace;
    while alive(pid) && Instant::now() < until {
        reap(pid);
        std::thread::sleep(Duration::from_millis(20));
    }
    if alive(pid) {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        while alive(pid) {
            reap(pid);
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let _ = std::fs::remove_file(node_dir(dir, id).join("pid"));
    Ok(true)
}

fn reap(pid: i32) {
    // Children of this process become zombies until waited for.
    // SAFETY: non-blocking waitpid on a pid; harmless if not our child.
    unsafe {
        let mut st = 0;
        libc::waitpid(pid, &mut st, libc::WNOHANG);
    }
}

/// GET `path` from `addr`; returns (status code, body).
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let code = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("malformed HTTP response")?;
    let body = buf.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    Ok((code, body))
}

/// Waits until every node's /health answers 200.
pub fn wait_healthy(cfgs: &[NodeConfig], timeout: Duration) -> anyhow::Result<()> {
    let until = Instant::now() + timeout;
    for c in cfgs {
        loop {
            match http_get(c.http, "/health") {
                Ok((200, _)) => break,
                r if Instant::now() > until => {
                    let detail = match r {
                        Ok((code, body)) => format!("HTTP {code}: {body}"),
                        Err(e) => e.to_string(),
                    };
                    bail!("node {} not healthy after {timeout:?}: {detail}", c.node_id);
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
    Ok(())
}

/// Segment server addresses of the cluster's nodes.
/// Metadata service addresses of a cluster, for `cfs mount --servers`.
pub fn meta_servers(cfgs: &[NodeConfig]) -> Vec<SocketAddr> {
    cfgs.iter().filter_map(|c| c.meta_listen).collect()
}

pub fn segment_servers(cfgs: &[NodeConfig]) -> cfs_segments::proto::ServerMap {
    cfgs.iter()
        .filter_map(|c| Some((c.node_id, c.segments_listen?)))
        .collect()
}

/// The `cfs-node` binary next to the running executable.
pub fn node_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe.with_file_name("cfs-node");
    if !p.exists() {
        bail!(
            "{} not found (build with `cargo build --release`)",
            p.display()
        );
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pid_file_naming_another_process_is_not_a_running_node() {
        let dir = std::env::temp_dir().join(format!("cfs-running-pid-{}", std::process::id()));
        let nd = node_dir(&dir, 1);
        std::fs::create_dir_all(&nd).unwrap();
        std::fs::write(nd.join("config.toml"), "").unwrap();
        // This test process is alive but is not node 1.
        std::fs::write(nd.join("pid"), std::process::id().to_string()).unwrap();
        assert_eq!(read_pid(&dir, 1), Some(std::process::id() as i32));
        assert_eq!(running_pid(&dir, 1), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
