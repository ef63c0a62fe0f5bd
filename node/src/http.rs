//! `/health` and `/metrics` over HTTP (docs/metrics.md). Nothing else is
//! served: any other path or method is a 404 or 405, and nothing here
//! changes state.

use std::net::SocketAddr;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use cfs_log::LogNode;
use cfs_segments::server::SegmentServer;

/// What the HTTP endpoints report on.
#[derive(Clone)]
pub struct Services {
    pub log: LogNode,
    pub segments: Option<SegmentServer>,
    pub meta: Option<cfs_meta::MetaService>,
    pub lakehouse: Option<std::sync::Arc<cfs_lakehouse::Lakehouse>>,
    pub admin: Option<std::sync::Arc<cfs_admin::http::Gateway>>,
    pub gc: Option<std::sync::Arc<crate::gc::Gc>>,
}

async fn health(State(s): State<Services>) -> impl IntoResponse {
    let node = &s.log;
    let mut problems = node.problems();
    if let Some(seg) = &s.segments {
        problems.extend(seg.problems());
    }
    if let Some(m) = &s.meta {
        problems.extend(m.problems());
    }
    let segments = s.segments.as_ref().map(|seg| {
        let st = seg.stat();
        serde_json::json!({
            "io_mode": st.io_mode, "free_bytes": st.free_bytes, "fragment_files": st.fragments,
            "last_write_error": st.stats.last_write_error,
        })
    });
    let body = serde_json::json!({
        "node_id": node.node_id(),
        "status": if problems.is_empty() { "ok" } else { "degraded" },
        "problems": problems,
        "shards": node.status().iter().map(|s| serde_json::json!({
            "shard": s.shard, "leader": s.leader, "is_leader": s.is_leader,
            "decided": s.decided, "config_id": s.config_id,
        })).collect::<Vec<_>>(),
        "segments": segments,
        "namespace_applied": s.meta.as_ref().map(|m| m.applied()),
    });
    let code = if problems.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body))
}

/// The node's own families: `claudefs_build_info` and its start time.
fn node_registry() -> &'static cfs_metrics::Registry {
    static REG: std::sync::OnceLock<cfs_metrics::Registry> = std::sync::OnceLock::new();
    REG.get_or_init(|| {
        let r = cfs_metrics::Registry::new();
        cfs_metrics::build_info(&r, "node", env!("CARGO_PKG_VERSION"));
        r
    })
}

async fn metrics(State(s): State<Services>) -> impl IntoResponse {
    let mut text = cfs_metrics::render(node_registry());
    text.push_str(&s.log.metrics_text());
    if let Some(seg) = &s.segments {
        text.push_str(&seg.metrics_text());
    }
    if let Some(m) = &s.meta {
        text.push_str(&m.metrics_text());
    }
    if let Some(l) = &s.lakehouse {
        text.push_str(&l.metrics_text());
    }
    if let Some(a) = &s.admin {
        text.push_str(&a.metrics_text());
    }
    if let Some(g) = &s.gc {
        text.push_str(&g.metrics_text());
    }
    ([("content-type", cfs_metrics::CONTENT_TYPE)], text)
}

/// Serves until the process ends.
pub async fn serve(addr: SocketAddr, services: Services) -> anyhow::Result<()> {
    // Made now, so the start time it records is the daemon's.
    node_registry();
    let app = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(services);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).await?;
    Ok(())
}
