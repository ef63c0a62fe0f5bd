//! `/health` and `/metrics` over HTTP.

use std::net::SocketAddr;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use cfs_log::LogNode;

async fn health(State(node): State<LogNode>) -> impl IntoResponse {
    let problems = node.problems();
    let body = serde_json::json!({
        "node_id": node.node_id(),
        "status": if problems.is_empty() { "ok" } else { "degraded" },
        "problems": problems,
        "shards": node.status().iter().map(|s| serde_json::json!({
            "shard": s.shard, "leader": s.leader, "is_leader": s.is_leader,
            "decided": s.decided, "config_id": s.config_id,
        })).collect::<Vec<_>>(),
    });
    let code = if problems.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body))
}

async fn metrics(State(node): State<LogNode>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        node.metrics_text(),
    )
}

/// Serves until the process ends.
pub async fn serve(addr: SocketAddr, node: LogNode) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(node);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).await?;
    Ok(())
}
