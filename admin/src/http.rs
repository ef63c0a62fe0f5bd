//! The gateway over HTTP (axum): the UI's files and `/health`, `/metrics`
//! open; everything under `/api` needs an administrator: a client
//! certificate of the cluster's CA naming an administrator or a node
//! (mutual TLS), or the cluster's admin token, as `Authorization: Bearer
//! T` or the cookie `/login` sets. When the cluster uses TLS the gateway
//! speaks only HTTPS ([`cfs_net::Security::accept_https`]). Read-only:
//! the engine runs nothing but SELECT.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use cfs_metrics::{self as m, Histogram, IntCounterVec};
use cfs_net::{Peer, Principal, Security};
use serde::Deserialize;
use tracing::{info, info_span, warn, Instrument};

use crate::answer::{Answer, Format};
use crate::{AdminError, Engine, Report};

/// The cookie `/login` sets.
pub const COOKIE: &str = "cfs_admin";
/// Request bodies larger than this are refused.
const BODY_BYTES_MAX: usize = 256 << 10;
/// Connections served at once; one more is closed at accept.
pub const CONNECTIONS_MAX: usize = 256;
/// How long a client may take to send a request's headers (a slow-loris
/// connection is closed after this).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed accept (out of descriptors) before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Who sent a request: the connection's peer, as [`serve`] saw it.
#[derive(Clone, Debug)]
pub struct Caller {
    pub addr: SocketAddr,
    pub peer: Peer,
    /// The connection is TLS (the login cookie is then `Secure`).
    pub tls: bool,
}

impl Caller {
    /// Whether the connection itself proves an administrator: a
    /// certificate of the cluster's CA naming an administrator or a node.
    fn is_admin(&self) -> bool {
        matches!(
            self.peer,
            Peer::Cert(Principal::Admin(_) | Principal::Node(_))
        )
    }
}

/// Cluster health and capacity for the overview, from the nodes.
pub type Overview = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// The gateway's families (docs/metrics.md).
pub struct GatewayMetrics {
    pub registry: m::Registry,
    requests: IntCounterVec,
    query_seconds: Histogram,
}

impl GatewayMetrics {
    fn new() -> GatewayMetrics {
        let registry = m::Registry::new();
        let requests = m::counter_vec(
            &registry,
            "claudefs_admin_requests_total",
            "Gateway API requests by kind (query, report, overview, index, login) and HTTP status.",
            &["kind", "status"],
        );
        let query_seconds = m::histogram(
            &registry,
            "claudefs_admin_query_duration_seconds",
            "Time to answer a query or report, DuckDB included.",
            m::LATENCY_BUCKETS,
        );
        GatewayMetrics {
            registry,
            requests,
            query_seconds,
        }
    }
}

pub struct Gateway {
    engine: Arc<Engine>,
    token: String,
    overview: Overview,
    metrics: GatewayMetrics,
}

impl Gateway {
    pub fn new(engine: Arc<Engine>, token: String, overview: Overview) -> Arc<Gateway> {
        Arc::new(Gateway {
            engine,
            token,
            overview,
            metrics: GatewayMetrics::new(),
        })
    }

    pub fn metrics_text(&self) -> String {
        m::render(&self.metrics.registry)
    }

    fn count(&self, kind: &str, status: StatusCode) {
        self.metrics
            .requests
            .with_label_values(&[kind, status.as_str()])
            .inc();
    }

    /// Whether the request comes from an administrator: by its
    /// connection's certificate, or by the token (header or cookie).
    fn authorized(&self, headers: &HeaderMap, caller: Option<&Caller>) -> bool {
        caller.is_some_and(Caller::is_admin) || self.has_token(headers)
    }

    fn has_token(&self, headers: &HeaderMap) -> bool {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let cookie = headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|c| {
                c.trim()
                    .strip_prefix(&format!("{COOKIE}="))
                    .map(str::to_string)
            });
        bearer.is_some_and(|t| equal(t, &self.token))
            || cookie.is_some_and(|t| equal(&t, &self.token))
    }
}

/// Compares in time independent of where the strings differ.
fn equal(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": msg.into() }))).into_response()
}

fn from_admin(e: &AdminError) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    error(status, e.to_string())
}

/// Whether the request comes from an administrator (`Gateway::authorized`);
/// a refusal is logged with the peer.
struct Authed(bool);

#[axum::async_trait]
impl FromRequestParts<Arc<Gateway>> for Authed {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, g: &Arc<Gateway>) -> Result<Self, Infallible> {
        let caller = parts.extensions.get::<Caller>();
        let ok = g.authorized(&parts.headers, caller);
        if !ok {
            match caller {
                Some(c) => warn!(addr = %c.addr, peer = %c.peer, path = %parts.uri.path(),
                    "admin gateway: unauthenticated request refused"),
                None => {
                    warn!(path = %parts.uri.path(), "admin gateway: unauthenticated request refused")
                }
            }
        }
        Ok(Authed(ok))
    }
}

fn unauthorized() -> Response {
    error(
        StatusCode::UNAUTHORIZED,
        "authentication required: the cluster's admin token (Authorization: Bearer, or log in)",
    )
}

pub fn router(g: Arc<Gateway>) -> Router {
    Router::new()
        .route("/", get(|| async { crate::ui::asset("index.html") }))
        .route("/app.js", get(|| async { crate::ui::asset("app.js") }))
        .route(
            "/style.css",
            get(|| async { crate::ui::asset("style.css") }),
        )
        .route(
            "/vendor/chart.umd.min.js",
            get(|| async { crate::ui::asset("chart.umd.min.js") }),
        )
        .route(
            "/health",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/metrics", get(metrics))
        .route("/login", post(login))
        .route("/logout", post(logout))
        .route("/api/query", get(query_get).post(query_post))
        .route("/api/reports/:name", get(report))
        .route("/api/overview", get(overview))
        .route("/api/index", get(index))
        .fallback(|method: Method| async move {
            if method == Method::GET || method == Method::POST {
                error(StatusCode::NOT_FOUND, "no such page")
            } else {
                error(StatusCode::METHOD_NOT_ALLOWED, "read-only gateway")
            }
        })
        .layer(axum::extract::DefaultBodyLimit::max(BODY_BYTES_MAX))
        .with_state(g)
}

/// Serves the gateway on `listener` until the process ends: HTTPS when
/// `security` is TLS (the cluster's), plain HTTP only on a development
/// cluster. At most [`CONNECTIONS_MAX`] connections, each with
/// [`HEADER_READ_TIMEOUT`] per request's headers and the TLS handshake
/// bounded by `cfs_net`.
pub async fn serve(listener: tokio::net::TcpListener, g: Arc<Gateway>, security: Security) {
    let tls = security.is_tls();
    info!(addr = ?listener.local_addr().ok(), tls, "admin gateway listening");
    let app = router(g);
    let slots = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
    loop {
        let (sock, addr) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                warn!("admin gateway: accept: {e}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            warn!(%addr, "admin gateway: connection refused, {CONNECTIONS_MAX} already open");
            continue;
        };
        let (app, security) = (app.clone(), security.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let (io, peer) = match security.accept_https(sock).await {
                Ok(c) => c,
                Err(e) => {
                    warn!(%addr, "admin gateway: connection refused: {e}");
                    return;
                }
            };
            let caller = Caller { addr, peer, tls };
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let mut req = req.map(Body::new);
                    req.extensions_mut().insert(caller.clone());
                    tower::ServiceExt::oneshot(app.clone(), req)
                });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
                .await;
            if let Err(e) = served {
                info!(%addr, "admin gateway: connection ended: {e}");
            }
        });
    }
}

async fn metrics(State(g): State<Arc<Gateway>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        g.metrics_text(),
    )
        .into_response()
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(
    State(g): State<Arc<Gateway>>,
    caller: Option<axum::Extension<Caller>>,
    Form(f): Form<LoginForm>,
) -> Response {
    if !equal(&f.token, &g.token) {
        g.count("login", StatusCode::UNAUTHORIZED);
        if let Some(axum::Extension(c)) = &caller {
            warn!(addr = %c.addr, peer = %c.peer, "admin gateway: login with a wrong token");
        }
        return error(StatusCode::UNAUTHORIZED, "wrong token");
    }
    g.count("login", StatusCode::SEE_OTHER);
    let secure = if caller.is_some_and(|c| c.tls) {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/{secure}",
        f.token
    );
    Response::builder()
        .status(StatusCode::SEE_OTHER)
        .header(header::LOCATION, "/")
        .header(header::SET_COOKIE, cookie)
        .body(Body::empty())
        .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "login"))
}

async fn logout() -> Response {
    Response::builder()
        .status(StatusCode::SEE_OTHER)
        .header(header::LOCATION, "/")
        .header(
            header::SET_COOKIE,
            format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
        )
        .body(Body::empty())
        .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "logout"))
}

#[derive(Deserialize, Default)]
struct QueryParams {
    sql: Option<String>,
    format: Option<String>,
    limit: Option<usize>,
}

async fn query_get(
    State(g): State<Arc<Gateway>>,
    auth: Authed,
    Query(q): Query<QueryParams>,
) -> Response {
    run_query(g, auth, q).await
}

async fn query_post(
    State(g): State<Arc<Gateway>>,
    auth: Authed,
    body: axum::body::Bytes,
) -> Response {
    let q: QueryParams = match serde_json::from_slice(&body) {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("body: {e}")),
    };
    run_query(g, auth, q).await
}

async fn run_query(g: Arc<Gateway>, auth: Authed, q: QueryParams) -> Response {
    if !auth.0 {
        g.count("query", StatusCode::UNAUTHORIZED);
        return unauthorized();
    }
    let Some(sql) = q.sql.filter(|s| !s.trim().is_empty()) else {
        g.count("query", StatusCode::BAD_REQUEST);
        return error(StatusCode::BAD_REQUEST, "no sql");
    };
    let format = match q.format.as_deref().unwrap_or("json").parse::<Format>() {
        Ok(Format::Table) | Err(_) => {
            g.count("query", StatusCode::BAD_REQUEST);
            return error(StatusCode::BAD_REQUEST, "format: json, csv or arrow");
        }
        Ok(f) => f,
    };
    let limit = q.limit;
    let span = info_span!("admin_query", sql = %sql.chars().take(200).collect::<String>());
    let g2 = g.clone();
    let started = Instant::now();
    let r = tokio::task::spawn_blocking(move || g2.engine.query(&sql, limit))
        .instrument(span)
        .await;
    g.metrics
        .query_seconds
        .observe(started.elapsed().as_secs_f64());
    respond(&g, "query", r, format)
}

fn respond(
    g: &Gateway,
    kind: &str,
    r: Result<Result<Answer, AdminError>, tokio::task::JoinError>,
    format: Format,
) -> Response {
    let a = match r {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => {
            let resp = from_admin(&e);
            g.count(kind, resp.status());
            return resp;
        }
        Err(e) => {
            g.count(kind, StatusCode::INTERNAL_SERVER_ERROR);
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("query task: {e}"),
            );
        }
    };
    let body = match format {
        Format::Json => a
            .to_json()
            .map(|v| ("application/json", v.to_string().into_bytes())),
        Format::Csv => a.to_csv().map(|b| ("text/csv; charset=utf-8", b)),
        Format::Arrow => a
            .to_arrow()
            .map(|b| ("application/vnd.apache.arrow.stream", b)),
        Format::Table => a.to_table().map(|t| ("text/plain", t.into_bytes())),
    };
    let (ctype, body) = match body {
        Ok(b) => b,
        Err(e) => {
            g.count(kind, StatusCode::INTERNAL_SERVER_ERROR);
            return from_admin(&e);
        }
    };
    g.count(kind, StatusCode::OK);
    let mut resp = (StatusCode::OK, body).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    let pairs = [
        ("x-cfs-index-timestamp", a.index.timestamp.clone()),
        ("x-cfs-index-lag-seconds", a.index.lag_seconds.to_string()),
        ("x-cfs-index-generation", a.index.generation.to_string()),
        ("x-cfs-truncated", a.truncated.to_string()),
    ];
    for (k, v) in pairs {
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(k, v);
        }
    }
    if format == Format::Csv {
        h.insert(
            header::CONTENT_DISPOSITION,
            HeaderValue::from_static("attachment; filename=\"query.csv\""),
        );
    }
    resp
}

#[derive(Deserialize, Default)]
struct ReportParams {
    limit: Option<usize>,
    depth: Option<usize>,
    pattern: Option<String>,
    days: Option<u32>,
    format: Option<String>,
}

async fn report(
    State(g): State<Arc<Gateway>>,
    auth: Authed,
    Path(name): Path<String>,
    Query(p): Query<ReportParams>,
) -> Response {
    if !auth.0 {
        g.count("report", StatusCode::UNAUTHORIZED);
        return unauthorized();
    }
    let r = match Report::parse(&name, p.limit, p.depth, p.pattern.as_deref(), p.days) {
        Ok(r) => r,
        Err(e) => {
            g.count("report", StatusCode::BAD_REQUEST);
            return from_admin(&e);
        }
    };
    let format = match p.format.as_deref().unwrap_or("json").parse::<Format>() {
        Ok(Format::Table) | Err(_) => {
            return error(StatusCode::BAD_REQUEST, "format: json, csv or arrow")
        }
        Ok(f) => f,
    };
    let g2 = g.clone();
    let started = Instant::now();
    let a = tokio::task::spawn_blocking(move || g2.engine.report(&r)).await;
    g.metrics
        .query_seconds
        .observe(started.elapsed().as_secs_f64());
    respond(&g, "report", a, format)
}

async fn overview(State(g): State<Arc<Gateway>>, auth: Authed) -> Response {
    if !auth.0 {
        g.count("overview", StatusCode::UNAUTHORIZED);
        return unauthorized();
    }
    let f = g.overview.clone();
    let cluster = tokio::task::spawn_blocking(move || f())
        .await
        .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }));
    let index = match g.engine.index() {
        Ok(i) => serde_json::to_value(i).unwrap_or_default(),
        Err(e) => serde_json::json!({ "error": e.to_string() }),
    };
    g.count("overview", StatusCode::OK);
    Json(serde_json::json!({ "cluster": cluster, "index": index })).into_response()
}

async fn index(State(g): State<Arc<Gateway>>, auth: Authed) -> Response {
    if !auth.0 {
        g.count("index", StatusCode::UNAUTHORIZED);
        return unauthorized();
    }
    match g.engine.index() {
        Ok(i) => {
            g.count("index", StatusCode::OK);
            Json(i).into_response()
        }
        Err(e) => {
            let r = from_admin(&e);
            g.count("index", r.status());
            r
        }
    }
}
