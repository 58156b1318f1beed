//! The HTTP surface: the page, the API, the event stream.
//!
//! Every response carries a Content-Security-Policy (the page's own inline script by its
//! SHA-256, nothing from elsewhere), refuses framing and content sniffing. Handlers never hold
//! the book's lock across I/O: a decision is checked and reserved under the lock, stored (fsync)
//! on a blocking thread, then applied; Kafka is waited for with a bound. The event stream is
//! capped at `max_streams` connections.
//!
//! Handlers by resource: [`alerts`] (the list, one alert, decisions), [`live`] (the map, health,
//! the event stream), [`calibration`] (proposals, applying and reverting them).

mod alerts;
mod calibration;
mod live;
#[cfg(test)]
mod tests;

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use citystream_operators::Metrics;
use citystream_operators::alert::ThresholdBoard;
use tokio::sync::broadcast;

use super::auth::{Guard, Identity};
use super::book::Book;
use super::calibration::Calibrations;
use super::decisions::DecisionStore;
use super::outbox::Outbox;
use super::replica::Replica;

/// The page: one HTML file, no build step, no external resources.
pub(crate) const PAGE: &str = include_str!("../page.html");

/// What every handler shares.
#[derive(Clone)]
pub(crate) struct App {
    pub(crate) book: Arc<Mutex<Book>>,
    pub(crate) calibrations: Arc<Mutex<Calibrations>>,
    /// One calibration change at a time (held across the file write, not the book's lock).
    pub(crate) calibrating: Arc<tokio::sync::Mutex<()>>,
    pub(crate) lake: Option<Arc<dyn DecisionStore>>,
    pub(crate) events: broadcast::Sender<String>,
    pub(crate) guard: Guard,
    pub(crate) map: Arc<serde_json::Value>,
    pub(crate) metrics: Metrics,
    pub(crate) board: ThresholdBoard,
    pub(crate) outbox: Option<Arc<Outbox>>,
    pub(crate) streams: Arc<AtomicUsize>,
    pub(crate) max_streams: usize,
    /// Alerts with a decision being stored: another decision on them is refused (409).
    pub(crate) deciding: Arc<Mutex<std::collections::HashSet<String>>>,
    /// A shared book's reader of the alerts topic (`None`: the book is fed by a pipeline).
    pub(crate) replica: Option<Arc<Replica>>,
}

pub(crate) fn error(code: StatusCode, msg: impl Into<String>) -> Response {
    (code, axum::Json(serde_json::json!({ "error": msg.into() }))).into_response()
}

/// Decisions are made under the token's name; a body that names someone else is refused.
pub(crate) fn check_operator(given: Option<&str>, who: &Identity) -> Result<(), Box<Response>> {
    match given {
        Some(name) if name != who.name => Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            format!("operator: decisions are recorded under your token's name (`{}`)", who.name),
        ))),
        _ => Ok(()),
    }
}

/// The Content-Security-Policy of every response: the page's inline script and style by hash.
fn content_security_policy() -> String {
    let hash = |open: &str, close: &str| -> String {
        let start = PAGE.find(open).map(|i| i + open.len());
        let body = start.and_then(|s| PAGE[s..].find(close).map(|e| &PAGE[s..s + e])).unwrap_or("");
        let digest = <sha2::Sha256 as sha2::Digest>::digest(body.as_bytes());
        format!("'sha256-{}'", base64::engine::general_purpose::STANDARD.encode(digest))
    };
    format!(
        "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; img-src 'self' data:; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        hash("<script>", "</script>"),
        hash("<style>", "</style>")
    )
}

pub(crate) fn router(app: App) -> axum::Router {
    let csp = HeaderValue::from_str(&content_security_policy()).expect("a header-safe policy");
    axum::Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/api/alerts", get(alerts::list))
        .route("/api/alerts/{id}", get(alerts::one))
        .route("/api/alerts/{id}/{action}", post(alerts::decide))
        .route("/api/map", get(live::map_route))
        .route("/api/health", get(live::health))
        .route("/api/ready", get(live::ready))
        .route("/api/stream", get(live::stream))
        .route("/api/calibration", get(calibration::calibration))
        .route("/api/calibration/history", get(calibration::calibration_history))
        .route("/api/calibration/apply", post(calibration::calibration_apply))
        .route("/api/calibration/{n}/revert", post(calibration::calibration_revert))
        .with_state(app)
        .layer(axum::middleware::map_response(move |mut r: Response| {
            let csp = csp.clone();
            async move {
                let h = r.headers_mut();
                h.insert(header::CONTENT_SECURITY_POLICY, csp);
                h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
                h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
                h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
                h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                r
            }
        }))
}
