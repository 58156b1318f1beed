//! The HTTP surface: the page, the API, the event stream.
//!
//! Every response carries a Content-Security-Policy (the page's own inline script by its
//! SHA-256, nothing from elsewhere), refuses framing and content sniffing. Handlers never hold
//! the book's lock across I/O: a decision is checked and reserved under the lock, stored (fsync)
//! on a blocking thread, then applied; Kafka is waited for with a bound. The event stream is
//! capped at `max_streams` connections.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use citystream_operators::Metrics;
use citystream_operators::alert::ThresholdBoard;
use serde::Deserialize;
use tokio::sync::broadcast;

use super::ControlError;
use super::auth::{Guard, Identity, Role};
use super::book::{AlertView, Book, Decision};
use super::calibration::{CalibrationChange, CalibrationQuery, Calibrations, proposals, undo};
use super::decisions::{DecisionStore, decision_event, feedback_row};
use super::outbox::Outbox;

/// The page: one HTML file, no build step, no external resources.
pub(crate) const PAGE: &str = include_str!("page.html");

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
}

pub(crate) fn error(code: StatusCode, msg: impl Into<String>) -> Response {
    (code, axum::Json(serde_json::json!({ "error": msg.into() }))).into_response()
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
        .route("/api/alerts", get(list))
        .route("/api/alerts/{id}", get(one))
        .route("/api/alerts/{id}/{action}", post(decide))
        .route("/api/map", get(map_route))
        .route("/api/health", get(health))
        .route("/api/stream", get(stream))
        .route("/api/calibration", get(calibration))
        .route("/api/calibration/history", get(calibration_history))
        .route("/api/calibration/apply", post(calibration_apply))
        .route("/api/calibration/{n}/revert", post(calibration_revert))
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    state: Option<String>,
    alert_type: Option<String>,
    location: Option<String>,
    limit: Option<usize>,
}

async fn list(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Err(r) = app.guard.authorize(&headers, None, peer, Role::Viewer) {
        return *r;
    }
    let Ok(Query(q)) = q else {
        return error(StatusCode::BAD_REQUEST, "query parameters: state, alert_type, location, limit (a number)");
    };
    if let Some(s) = &q.state
        && !["open", "acknowledged", "resolved", "false_alarm"].contains(&s.as_str())
    {
        return error(
            StatusCode::BAD_REQUEST,
            format!("state `{s}`: one of open, acknowledged, resolved, false_alarm"),
        );
    }
    let limit = q.limit.unwrap_or(200).min(5000);
    let book = app.book.lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<&AlertView> = book
        .alerts
        .values()
        .filter(|a| q.state.as_ref().is_none_or(|s| &a.state == s))
        .filter(|a| q.alert_type.as_ref().is_none_or(|s| &a.alert_type == s))
        .filter(|a| q.location.as_ref().is_none_or(|s| &a.location == s))
        .collect();
    v.sort_by(|a, b| b.updated_at.cmp(&a.updated_at).then_with(|| a.alert_id.cmp(&b.alert_id)));
    v.truncate(limit);
    axum::Json(serde_json::json!({ "alerts": v })).into_response()
}

async fn one(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(r) = app.guard.authorize(&headers, None, peer, Role::Viewer) {
        return *r;
    }
    let book = app.book.lock().unwrap_or_else(|e| e.into_inner());
    match book.alerts.get(&id) {
        Some(a) => axum::Json(a).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no alert `{id}`")),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DecisionBody {
    /// Optional: decisions are recorded under the token's name; when given it must be that.
    #[serde(default)]
    operator: Option<String>,
    #[serde(default)]
    comment: String,
}

async fn decide(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Response {
    let who = match app.guard.authorize(&headers, None, peer, Role::Operator) {
        Ok(w) => w,
        Err(r) => return *r,
    };
    let new_state = match action.as_str() {
        "acknowledge" => "acknowledged",
        "resolve" => "resolved",
        "false_alarm" => "false_alarm",
        other => {
            return error(StatusCode::NOT_FOUND, format!("no action `{other}` (acknowledge, resolve, false_alarm)"));
        }
    };
    let body: DecisionBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return error(StatusCode::BAD_REQUEST, format!("body: {e} (expected {{\"comment\": \"...\"}})"));
        }
    };
    if let Err(r) = check_operator(body.operator.as_deref(), &who) {
        return *r;
    }
    if body.comment.chars().count() > 1000 {
        return error(StatusCode::BAD_REQUEST, "comment: at most 1000 characters");
    }
    // the broker is away: a decision that cannot be published is not made
    if let Some(o) = &app.outbox
        && o.pending() > 0
    {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("Kafka is unreachable: {} decision(s) wait to be published; try again shortly", o.pending()),
        );
    }
    // checked and reserved under the lock; stored without it
    let (view, row, event) = {
        let book = app.book.lock().unwrap_or_else(|e| e.into_inner());
        let Some(a) = book.alerts.get(&id) else {
            return error(StatusCode::NOT_FOUND, format!("no alert `{id}`"));
        };
        let allowed = match new_state {
            "acknowledged" => a.state == "open",
            "resolved" => a.state == "open" || a.state == "acknowledged",
            _ => a.state != "false_alarm",
        };
        if !allowed {
            return error(StatusCode::CONFLICT, format!("alert `{id}` is {}: it cannot become {new_state}", a.state));
        }
        if !app.deciding.lock().unwrap_or_else(|e| e.into_inner()).insert(id.clone()) {
            return error(StatusCode::CONFLICT, format!("another decision on `{id}` is being recorded"));
        }
        let ts = citystream_operators::common::wall_clock_ms();
        let mut view = a.clone();
        view.state = new_state.to_owned();
        view.decisions.push(Decision {
            ts,
            decision: new_state.into(),
            operator: who.name.clone(),
            comment: body.comment.clone(),
        });
        let row = feedback_row(ts, &view, new_state, &who.name, &body.comment);
        let event = decision_event(ts, &view, new_state, &who.name, &body.comment);
        (view, row, event)
    };
    let release = || app.deciding.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
    // stored first (fsync, off the async workers): a decision the lake does not hold is not made
    if let Some(lake) = app.lake.clone() {
        let (r, e) = (row.clone(), event.clone());
        let stored = tokio::task::spawn_blocking(move || lake.store(&r, &e)).await;
        if let Err(e) = stored.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())) {
            release();
            tracing::error!("feedback table: {e}");
            return error(StatusCode::INTERNAL_SERVER_ERROR, "the decision could not be stored");
        }
    }
    {
        let mut book = app.book.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(a) = book.alerts.get_mut(&id) {
            // the rule may have moved it on meanwhile (active, value): keep that, add the decision
            a.state = view.state.clone();
            a.decisions = view.decisions.clone();
        }
    }
    release();
    app.metrics
        .counter("citystream_control_decisions_total", "Operator decisions on alerts.", &[("decision", new_state)])
        .inc();
    let _ = app.events.send(serde_json::json!({"kind": "decision", "alert": &view}).to_string());
    if let Some(o) = &app.outbox
        && let Err(waiting) = o.publish(&event, &row).await
    {
        app.metrics
            .counter("citystream_control_publish_failures_total", "Decisions the broker did not take at once.", &[])
            .inc();
        tracing::warn!(alert = %view.alert_id, waiting, "decision stored, Kafka publish pending");
        // recorded and shown; the outbox sends it when the broker is back
        return ([("x-citystream-kafka", "pending")], axum::Json(view)).into_response();
    }
    axum::Json(view).into_response()
}

/// Decisions are made under the token's name; a body that names someone else is refused.
fn check_operator(given: Option<&str>, who: &Identity) -> Result<(), Box<Response>> {
    match given {
        Some(name) if name != who.name => Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            format!("operator: decisions are recorded under your token's name (`{}`)", who.name),
        ))),
        _ => Ok(()),
    }
}

async fn map_route(State(app): State<App>, ConnectInfo(peer): ConnectInfo<SocketAddr>, headers: HeaderMap) -> Response {
    if let Err(r) = app.guard.authorize(&headers, None, peer, Role::Viewer) {
        return *r;
    }
    axum::Json(app.map.as_ref().clone()).into_response()
}

async fn health(State(app): State<App>, ConnectInfo(peer): ConnectInfo<SocketAddr>, headers: HeaderMap) -> Response {
    if let Err(r) = app.guard.authorize(&headers, None, peer, Role::Viewer) {
        return *r;
    }
    let m = &app.metrics;
    let lag = m.series("citystream_kafka_consumer_lag");
    axum::Json(serde_json::json!({
        "rows_in": m.series("citystream_stage_rows_in_total"),
        // summed over partitions; absent without a Kafka source
        "kafka_lag": (!lag.is_empty()).then(|| lag.iter().map(|(_, v)| v).sum::<f64>()),
        "dead_letters": m.sum("citystream_dead_letters_total"),
        "late_events": m.series("citystream_late_events_total"),
        "operator_errors": m.sum("citystream_operator_errors_total"),
        "queue_depth": m.series("citystream_queue_depth"),
        "alerts_open": m.series("citystream_alerts_open"),
        "carbon_high_mode": m.value("citystream_carbon_high_mode", &[]),
        "carbon_g_per_kwh": m.value("citystream_carbon_g_per_kwh", &[]),
        "energy_watts": m.value("citystream_energy_watts", &[]),
        "carbon_switches": m.series("citystream_carbon_mode_switches_total"),
        "policy_actions": m.series("citystream_policy_actions_total"),
        "predictions_skipped": m.sum("citystream_infer_rows_skipped_total"),
        // closed DP windows waiting for a cleaner grid (`dp_aggregate.defer`)
        "dp_windows_held": m.sum("citystream_dp_windows_held"),
        "decisions_unpublished": app.outbox.as_ref().map(|o| o.pending()),
    }))
    .into_response()
}

#[derive(Debug, Deserialize)]
struct StreamQuery {
    token: Option<String>,
}

/// Counts an open event stream; uncounted when dropped.
struct StreamSlot(Arc<AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn stream(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<StreamQuery>,
) -> Response {
    if let Err(r) = app.guard.authorize(&headers, q.token.as_deref(), peer, Role::Viewer) {
        return *r;
    }
    if app.streams.fetch_add(1, Ordering::Relaxed) >= app.max_streams {
        app.streams.fetch_sub(1, Ordering::Relaxed);
        return error(StatusCode::SERVICE_UNAVAILABLE, "too many event streams are open: try again later");
    }
    let slot = StreamSlot(app.streams.clone());
    let rx = app.events.subscribe();
    let s = futures_util::stream::unfold((rx, slot), |(mut rx, slot)| async move {
        match rx.recv().await {
            Ok(msg) => Some((Ok::<Event, std::convert::Infallible>(Event::default().data(msg)), (rx, slot))),
            // a slow client misses events; it reloads the list on `lagged`
            Err(broadcast::error::RecvError::Lagged(n)) => {
                Some((Ok(Event::default().event("lagged").data(n.to_string())), (rx, slot)))
            }
            Err(broadcast::error::RecvError::Closed) => None,
        }
    });
    Sse::new(s).keep_alive(KeepAlive::default()).into_response()
}

/// Proposed per-location thresholds from the operators' verdicts, per rule (nothing changes:
/// `POST /api/calibration/apply` applies them).
async fn calibration(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    q: Result<Query<CalibrationQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Err(r) = app.guard.authorize(&headers, None, peer, Role::Viewer) {
        return *r;
    }
    let Ok(Query(q)) = q else {
        return error(StatusCode::BAD_REQUEST, "query: target_precision (0..1), optional max_step and min_judged");
    };
    let spec = match q.spec() {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let props = {
        let book = app.book.lock().unwrap_or_else(|e| e.into_inner());
        let cal = app.calibrations.lock().unwrap_or_else(|e| e.into_inner());
        proposals(&book, &cal, &app.board, &spec)
    };
    let mut rules: BTreeMap<String, serde_json::Map<String, serde_json::Value>> = BTreeMap::new();
    for (rule, loc, p) in props {
        tracing::info!(rule = %rule, location = %loc, old = p.old, new = p.new, precision = p.precision, judged = p.judged, "calibration proposal");
        rules.entry(rule).or_default().insert(loc, serde_json::to_value(p).unwrap_or_default());
    }
    axum::Json(serde_json::json!({ "target_precision": q.target_precision, "rules": rules })).into_response()
}

async fn calibration_history(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = app.guard.authorize(&headers, None, peer, Role::Viewer) {
        return *r;
    }
    let cal = app.calibrations.lock().unwrap_or_else(|e| e.into_inner());
    axum::Json(serde_json::json!({ "live": app.board.all(), "changes": cal.history })).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApplyBody {
    #[serde(default)]
    operator: Option<String>,
    target_precision: f64,
    max_step: Option<f64>,
    min_judged: Option<usize>,
}

fn calibration_changed(app: &App, kind: &str, change: &CalibrationChange) {
    app.metrics
        .counter("citystream_calibration_changes_total", "Calibrations applied or reverted.", &[("kind", kind)])
        .inc();
    let _ = app.events.send(serde_json::json!({"kind": "calibration", "action": kind, "change": change}).to_string());
}

/// Writes `history` to the calibration file on a blocking thread.
async fn save_history(history: Calibrations) -> Result<(), ControlError> {
    let path = history.file.clone().unwrap_or_default();
    tokio::task::spawn_blocking(move || history.save())
        .await
        .map_err(|e| ControlError::Calibrations { path, source: std::io::Error::other(e) })?
}

/// Applies the current proposals live, as one change that can be reverted: written to the
/// calibration file first, then to the live levels.
async fn calibration_apply(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let who = match app.guard.authorize(&headers, None, peer, Role::Operator) {
        Ok(w) => w,
        Err(r) => return *r,
    };
    let b: ApplyBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return error(StatusCode::BAD_REQUEST, format!("body: {e} (expected {{\"target_precision\": 0.8}})"));
        }
    };
    if let Err(r) = check_operator(b.operator.as_deref(), &who) {
        return *r;
    }
    let q = CalibrationQuery { target_precision: b.target_precision, max_step: b.max_step, min_judged: b.min_judged };
    let spec = match q.spec() {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let _one_at_a_time = app.calibrating.lock().await;
    let (change, next) = {
        let book = app.book.lock().unwrap_or_else(|e| e.into_inner());
        let cal = app.calibrations.lock().unwrap_or_else(|e| e.into_inner());
        let props = proposals(&book, &cal, &app.board, &spec);
        if props.is_empty() {
            return error(
                StatusCode::CONFLICT,
                "nothing to change: no location has enough judged alerts off the target",
            );
        }
        let change = cal.plan_apply(&app.board, &who.name, b.target_precision, props);
        let mut next = cal.clone();
        next.history.push(change.clone());
        (change, next)
    };
    if let Err(e) = save_history(next.clone()).await {
        tracing::error!("{e}");
        return error(StatusCode::INTERNAL_SERVER_ERROR, "not applied: the calibration file could not be written");
    }
    for l in &change.changes {
        app.board.set(&l.rule, &l.location, Some(l.new));
        tracing::info!(rule = %l.rule, location = %l.location, old = l.old, new = l.new, operator = %who.name, "calibration applied");
    }
    *app.calibrations.lock().unwrap_or_else(|e| e.into_inner()) = next;
    calibration_changed(&app, "applied", &change);
    axum::Json(change).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RevertBody {
    #[serde(default)]
    operator: Option<String>,
}

/// Puts back the levels a change replaced (in reverse order, so nested changes unwind).
async fn calibration_revert(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(n): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let who = match app.guard.authorize(&headers, None, peer, Role::Operator) {
        Ok(w) => w,
        Err(r) => return *r,
    };
    let b: RevertBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("body: {e} (expected {{}})")),
    };
    if let Err(r) = check_operator(b.operator.as_deref(), &who) {
        return *r;
    }
    let Ok(n) = n.parse::<u64>() else {
        return error(StatusCode::BAD_REQUEST, format!("`{n}` is not a change number"));
    };
    let _one_at_a_time = app.calibrating.lock().await;
    let (change, next) = {
        let cal = app.calibrations.lock().unwrap_or_else(|e| e.into_inner());
        let (i, change) = match cal.plan_revert(n, &who.name) {
            Ok(r) => r,
            Err((code, msg)) => {
                return error(StatusCode::from_u16(code).unwrap_or(StatusCode::CONFLICT), msg);
            }
        };
        let mut next = cal.clone();
        next.history[i] = change.clone();
        (change, next)
    };
    if let Err(e) = save_history(next.clone()).await {
        tracing::error!("{e}");
        return error(StatusCode::INTERNAL_SERVER_ERROR, "not reverted: the calibration file could not be written");
    }
    undo(&app.board, &change);
    for l in &change.changes {
        tracing::info!(rule = %l.rule, location = %l.location, from = l.new, to = l.old, operator = %who.name, "calibration reverted");
    }
    *app.calibrations.lock().unwrap_or_else(|e| e.into_inner()) = next;
    calibration_changed(&app, "reverted", &change);
    axum::Json(change).into_response()
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;
    use std::time::{Duration, Instant};

    use arrow::array::RecordBatch;

    use super::*;

    /// A disk that takes `delay` to make a decision durable.
    struct SlowDisk {
        delay: Duration,
        stored: AtomicUsize,
    }

    impl DecisionStore for SlowDisk {
        fn store(&self, _: &RecordBatch, _: &RecordBatch) -> Result<(), ControlError> {
            std::thread::sleep(self.delay);
            self.stored.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }

    fn alert(id: &str, status: &str, t: i64) -> RecordBatch {
        use arrow::array::{Float64Array, Int32Array, StringArray, TimestampMillisecondArray};
        let ts = || -> Arc<dyn arrow::array::Array> {
            Arc::new(TimestampMillisecondArray::from(vec![t]).with_timezone("UTC"))
        };
        let s = |v: &str| -> Arc<dyn arrow::array::Array> { Arc::new(StringArray::from(vec![v])) };
        RecordBatch::try_new(
            citystream_operators::alert::alert_schema(),
            vec![
                ts(),
                s(id),
                s("r"),
                s("incident"),
                s("critical"),
                s("seg-1"),
                s(status),
                ts(),
                Arc::new(Float64Array::from(vec![Some(0.99)])),
                Arc::new(Float64Array::from(vec![0.9])),
                Arc::new(Float64Array::from(vec![Some(0.99)])),
                Arc::new(Int32Array::from(vec![1])),
                s("{}"),
                ts(),
                s("rule"),
            ],
        )
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_disk_holds_up_the_decision_but_not_the_alerts_or_other_requests() {
        let disk = Arc::new(SlowDisk { delay: Duration::from_secs(2), stored: AtomicUsize::new(0) });
        let tokens = super::super::parse_tokens("operator op.anna operator-token-0123456789").unwrap();
        let book = Arc::new(Mutex::new(Book::new(86_400_000, 1000)));
        book.lock().unwrap().apply(&alert("a1", "open", 0)).unwrap();
        let app = App {
            book: book.clone(),
            calibrations: Arc::default(),
            calibrating: Arc::default(),
            lake: Some(disk.clone()),
            events: broadcast::channel(16).0,
            guard: Guard::new(tokens, NonZeroU32::new(1000).unwrap()),
            map: Arc::new(serde_json::json!({})),
            metrics: Metrics::new(),
            board: ThresholdBoard::default(),
            outbox: None,
            streams: Arc::default(),
            max_streams: 1,
            deciding: Arc::default(),
        };
        let mut headers = HeaderMap::new();
        headers.insert("authorization", HeaderValue::from_static("Bearer operator-token-0123456789"));
        let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let t0 = Instant::now();
        let decision = tokio::spawn(decide(
            State(app.clone()),
            ConnectInfo(peer),
            headers.clone(),
            Path(("a1".into(), "acknowledge".into())),
            axum::body::Bytes::from_static(br#"{"comment": "on it"}"#),
        ));
        tokio::time::sleep(Duration::from_millis(200)).await;
        // the decision is being written: alerts still flow into the book, and it is read
        let t1 = Instant::now();
        book.lock().unwrap().apply(&alert("a2", "open", 60_000)).unwrap();
        let r = list(
            State(app.clone()),
            ConnectInfo(peer),
            headers.clone(),
            Ok(Query(ListQuery { state: None, alert_type: None, location: None, limit: None })),
        )
        .await;
        assert_eq!(r.status(), StatusCode::OK);
        assert!(t1.elapsed() < Duration::from_millis(500), "blocked for {:?} behind the disk", t1.elapsed());
        // a second decision on the same alert meanwhile is refused, not queued behind the lock
        let again = decide(
            State(app.clone()),
            ConnectInfo(peer),
            headers.clone(),
            Path(("a1".into(), "acknowledge".into())),
            axum::body::Bytes::from_static(b"{}"),
        )
        .await;
        assert_eq!(again.status(), StatusCode::CONFLICT);
        let done = decision.await.unwrap();
        assert_eq!(done.status(), StatusCode::OK);
        assert!(t0.elapsed() >= Duration::from_secs(2), "the answer waited for the disk");
        assert_eq!(disk.stored.load(Ordering::Relaxed), 1);
        let b = book.lock().unwrap();
        assert_eq!(
            (b.alerts["a1"].state.as_str(), b.alerts["a1"].decisions[0].operator.as_str()),
            ("acknowledged", "op.anna")
        );
    }

    #[tokio::test]
    async fn every_response_carries_the_security_headers_and_the_page_passes_its_own_policy() {
        let policy = content_security_policy();
        assert!(policy.contains("script-src 'sha256-") && policy.contains("frame-ancestors 'none'"), "{policy}");
        assert!(!policy.contains("unsafe-inline"), "{policy}");
        // the page has exactly one script and one style element, and no inline style or handler
        // attributes, which a hash-based policy would block
        assert_eq!((PAGE.matches("<script").count(), PAGE.matches("<style").count()), (1, 1));
        assert!(!PAGE.contains(" style=\"") && !PAGE.contains(" onclick=\""), "inline attributes in the page");
    }
}
