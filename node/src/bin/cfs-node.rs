//! The ClaudeFS node daemon: `cfs-node --config FILE`.

/// mimalloc instead of glibc's malloc: the daemons and the mount allocate
/// per message and per entry from several threads (docs/decisions.md D38).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;

use anyhow::Context;
use cfs_node::config::{LogFormat, NodeConfig};
use clap::Parser;
use tracing::{error, info};

#[derive(Parser)]
#[command(version, about = "ClaudeFS node daemon")]
struct Args {
    /// Path of the TOML configuration.
    #[arg(long)]
    config: PathBuf,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CFS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => b.json().init(),
        LogFormat::Console => b.with_ansi(false).init(),
    }
}

async fn run(cfg: NodeConfig) -> anyhow::Result<()> {
    let security = cfg.security()?;
    if !security.is_tls() {
        tracing::warn!("insecure_plaintext: no TLS, no authentication (development only)");
    }
    let mut log_cfg = cfg.log_config(&security);
    // Fault injection for the Jepsen suite (never set in production).
    if let Ok(f) = std::env::var("CFS_FAULTS") {
        log_cfg.faults =
            cfs_log::Faults::parse(&f).map_err(|e| anyhow::anyhow!("CFS_FAULTS: {e}"))?;
        if log_cfg.faults != cfs_log::Faults::default() {
            tracing::warn!(faults = %f, "fault injection on (CFS_FAULTS)");
        }
    }
    let node = cfs_log::LogNode::start(log_cfg)
        .await
        .context("starting the log")?;
    let segments = match cfg.segments_config(&security) {
        Some(sc) => Some(
            cfs_segments::server::SegmentServer::start(sc)
                .await
                .context("starting the segment server")?,
        ),
        None => None,
    };
    let meta = match cfg.meta_listen {
        Some(listen) => Some(
            cfs_meta::MetaService::start(
                cfs_meta::MetaConfig {
                    cluster_id: cfg.cluster_id.clone(),
                    node_id: cfg.node_id,
                    listen,
                    data_dir: cfg.data_dir.clone(),
                    shards: cfg.shards.clone(),
                    segment_servers: cfg
                        .nodes
                        .iter()
                        .filter_map(|n| Some((n.id, n.segments?.to_string())))
                        .collect(),
                    meta_servers: cfg
                        .nodes
                        .iter()
                        .filter_map(|n| Some((n.id, n.meta?.to_string())))
                        .collect(),
                    nodes: cfg.nodes.len() as u64,
                    spread_depth: cfg.spread_depth,
                    connections_per_peer: cfg.connections_per_peer,
                    security: security.clone(),
                    forget_idle_clients: std::time::Duration::from_secs(
                        cfg.forget_idle_clients_s.max(1),
                    ),
                    enroll: match cfg.tls.as_ref().and_then(|t| t.enroll_ca_dir.as_ref()) {
                        Some(d) => Some(std::sync::Arc::new(
                            cfs_net::ca::Ca::load(d).context("loading the enrolling CA")?,
                        )),
                        None => None,
                    },
                    master_key: master_key(&cfg)?.map(std::sync::Arc::new),
                },
                node.clone(),
            )
            .await
            .context("starting the metadata service")?,
        ),
        None => None,
    };
    let lakehouse = match (&cfg.lakehouse_dir, &meta) {
        (Some(dir), Some(meta)) => {
            let (db, changes) = meta.namespace();
            Some(std::sync::Arc::new(
                cfs_lakehouse::Lakehouse::start(
                    cfs_lakehouse::LakehouseConfig {
                        dir: dir.clone(),
                        flush_interval: std::time::Duration::from_millis(cfg.lakehouse_flush_ms),
                        shards: meta.shards(),
                        threads: 2,
                    },
                    db,
                    changes,
                )
                .context("starting the lakehouse")?,
            ))
        }
        (Some(_), None) => anyhow::bail!("lakehouse_dir needs meta_listen (the namespace)"),
        _ => None,
    };
    let gc = match &meta {
        Some(m) if cfg.gc_interval_ms > 0 => {
            let servers: cfs_segments::proto::ServerMap = cfg
                .nodes
                .iter()
                .filter_map(|n| Some((n.id, n.segments?)))
                .collect();
            (!servers.is_empty()).then(|| {
                cfs_node::gc::Gc::start(
                    m.clone(),
                    cfs_segments::client::SegmentClient::new(
                        &cfg.cluster_id,
                        servers,
                        security.clone(),
                    ),
                    cfs_node::gc::GcConfig {
                        interval: std::time::Duration::from_millis(cfg.gc_interval_ms),
                        grace: std::time::Duration::from_millis(cfg.gc_grace_ms),
                    },
                )
            })
        }
        _ => None,
    };
    let admin = match cfg.admin_listen {
        Some(listen) => Some(cfs_node::gateway::start(&cfg, listen, security.clone()).await?),
        None => None,
    };
    let services = cfs_node::http::Services {
        log: node.clone(),
        segments,
        meta,
        lakehouse,
        admin,
        gc,
    };
    let http = tokio::spawn(cfs_node::http::serve(cfg.http, services));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT: stopping"),
        r = http => {
            let e = match r { Ok(Ok(())) => anyhow::anyhow!("http server ended"), Ok(Err(e)) => e, Err(e) => e.into() };
            return Err(e.context(format!("http endpoint {}", cfg.http)));
        }
    }
    node.shutdown().await;
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let cfg = match NodeConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cfs-node: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    init_logging(cfg.log_format);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cfs-node: cannot start runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cfg)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("cfs-node: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The master key from `master_key_file`, else `CFS_MASTER_KEY`, else
/// none (D51).
fn master_key(cfg: &NodeConfig) -> anyhow::Result<Option<cfs_meta::tenant_keys::MasterKey>> {
    use cfs_meta::tenant_keys::{MasterKey, MASTER_KEY_ENV};
    if let Some(path) = &cfg.master_key_file {
        return Ok(Some(MasterKey::load(path)?));
    }
    match std::env::var(MASTER_KEY_ENV) {
        Ok(hex) => Ok(Some(
            MasterKey::from_hex(&hex).with_context(|| format!("reading {MASTER_KEY_ENV}"))?,
        )),
        Err(_) => {
            tracing::info!("no master key (master_key_file, {MASTER_KEY_ENV}): tenants' keys are neither made nor handed out by this node");
            Ok(None)
        }
    }
}
