//! Starts the admin gateway (`cfs-admin`) in a node: the engine over this
//! node's lakehouse, the token from the configuration, and an overview
//! that reads every node's `/health` and `/metrics` (`status.rs`).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use cfs_admin::http::Gateway;

use crate::config::NodeConfig;

/// Tokens shorter than this are refused (a guessable gateway).
const TOKEN_CHARS_MIN: usize = 16;

/// `security`: the node's own (the gateway serves HTTPS under the node's
/// certificate when the cluster uses TLS).
pub async fn start(
    cfg: &NodeConfig,
    listen: SocketAddr,
    security: cfs_net::Security,
) -> anyhow::Result<Arc<Gateway>> {
    let dir = cfg
        .lakehouse_dir
        .as_ref()
        .context("admin_listen needs lakehouse_dir (the index the gateway queries)")?;
    let tf = cfg
        .admin_token_file
        .as_ref()
        .context("admin_listen needs admin_token_file")?;
    let token = std::fs::read_to_string(tf)
        .with_context(|| format!("reading the admin token {}", tf.display()))?
        .trim()
        .to_string();
    if token.chars().count() < TOKEN_CHARS_MIN {
        anyhow::bail!(
            "the admin token in {} is shorter than {TOKEN_CHARS_MIN} characters",
            tf.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let engine = cfs_admin::Engine::open(dir, &cfg.admin_allow, cfs_admin::Limits::default())
        .context("opening the admin engine")?;
    let cluster_id = cfg.cluster_id.clone();
    // Nodes whose HTTP address the configuration names (this one always).
    let nodes: Vec<(u64, SocketAddr)> = cfg
        .nodes
        .iter()
        .filter_map(|n| {
            if n.id == cfg.node_id {
                Some((n.id, cfg.http))
            } else {
                n.http.map(|h| (n.id, h))
            }
        })
        .collect();
    let overview: cfs_admin::http::Overview = Arc::new(move || {
        serde_json::to_value(crate::status::gather_nodes(
            cluster_id.clone(),
            &nodes,
            None,
        ))
        .unwrap_or_default()
    });
    let gateway = Gateway::new(Arc::new(engine), token, overview);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the admin gateway to {listen}"))?;
    let g2 = gateway.clone();
    tokio::spawn(cfs_admin::http::serve(listener, g2, security));
    Ok(gateway)
}
