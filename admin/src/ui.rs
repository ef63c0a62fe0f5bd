//! The web UI's files (`admin/ui/`), compiled in: the page needs nothing
//! from outside the gateway (Chart.js is vendored, see
//! `admin/ui/vendor/README.md`).

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

const INDEX_HTML: &str = include_str!("../ui/index.html");
const APP_JS: &str = include_str!("../ui/app.js");
const STYLE_CSS: &str = include_str!("../ui/style.css");
const CHART_JS: &str = include_str!("../ui/vendor/chart.umd.min.js");

/// One of the UI's files by name, with its content type.
pub fn asset(name: &str) -> Response {
    let (ctype, body) = match name {
        "index.html" => ("text/html; charset=utf-8", INDEX_HTML),
        "app.js" => ("text/javascript; charset=utf-8", APP_JS),
        "style.css" => ("text/css; charset=utf-8", STYLE_CSS),
        "chart.umd.min.js" => ("text/javascript; charset=utf-8", CHART_JS),
        _ => return (StatusCode::NOT_FOUND, "no such file").into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, ctype),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'",
            ),
        ],
        body,
    )
        .into_response()
}
