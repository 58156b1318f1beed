//! Alerts: the list, one alert, and the decisions operators make on them.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::control::auth::Role;
use crate::control::book::{AlertView, Decision, transition_allowed};
use crate::control::decisions::{decision_event, feedback_row};

use super::{App, check_operator, error};
use crate::control::replica::Replica;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    pub(super) state: Option<String>,
    pub(super) alert_type: Option<String>,
    pub(super) location: Option<String>,
    pub(super) limit: Option<usize>,
}

pub(super) async fn list(
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

pub(super) async fn one(
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
pub(super) struct DecisionBody {
    /// Optional: decisions are recorded under the token's name; when given it must be that.
    #[serde(default)]
    pub(super) operator: Option<String>,
    #[serde(default)]
    pub(super) comment: String,
}

pub(super) async fn decide(
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
    // the broker is away: a decision that cannot be published is not made (a shared book's
    // decision goes to the alerts topic first, which refuses it then; its outbox only holds
    // feedback rows)
    if let Some(o) = &app.outbox
        && app.replica.is_none()
        && o.pending() > 0
    {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("Kafka is unreachable: {} decision(s) wait to be published; try again shortly", o.pending()),
        );
    }
    if let Some(r) = &app.replica
        && !r.caught_up()
    {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the book is still reading the alerts topic; try again shortly");
    }
    // checked and reserved under the lock; stored without it
    let (view, row, event, decision_id, reserved) = {
        let book = app.book.lock().unwrap_or_else(|e| e.into_inner());
        let Some(a) = book.alerts.get(&id) else {
            return error(StatusCode::NOT_FOUND, format!("no alert `{id}`"));
        };
        if !transition_allowed(&a.state, new_state) {
            return error(StatusCode::CONFLICT, format!("alert `{id}` is {}: it cannot become {new_state}", a.state));
        }
        if app.replica.is_some() && a.finished() {
            // as the shared book will refuse it (`Book::apply_log`)
            return error(StatusCode::CONFLICT, format!("alert `{id}` is finished ({})", a.state));
        }
        let Some(reserved) = Reservation::take(&app.deciding, &id) else {
            return error(StatusCode::CONFLICT, format!("another decision on `{id}` is being recorded"));
        };
        let ts = citystream_operators::common::wall_clock_ms();
        let mut view = a.clone();
        view.state = new_state.to_owned();
        view.decisions.push(Decision {
            ts,
            decision: new_state.into(),
            operator: who.name.clone(),
            comment: body.comment.clone(),
        });
        let decision_id = format!("{:032x}", rand::random::<u128>());
        let row = feedback_row(ts, &view, new_state, &who.name, &body.comment);
        let event = decision_event(ts, &view, new_state, &who.name, &body.comment, &decision_id);
        (view, row, event, decision_id, reserved)
    };
    let made = Made { view, row, event, decision_id, _reserved: reserved };
    let answer = match app.replica.clone() {
        Some(r) => decide_shared(&app, r, made).await,
        None => {
            // a task of its own: a decision whose lake write started is applied and published
            // even if the client goes away meanwhile (the lake must not hold what the book lacks)
            let app = app.clone();
            match tokio::spawn(async move { decide_here(&app, made).await }).await {
                Ok(answer) => answer,
                Err(e) => {
                    tracing::error!("a decision's task failed: {e}");
                    error(StatusCode::INTERNAL_SERVER_ERROR, "the decision failed")
                }
            }
        }
    };
    if answer.status() == StatusCode::OK {
        app.metrics
            .counter("citystream_control_decisions_total", "Operator decisions on alerts.", &[("decision", new_state)])
            .inc();
    }
    answer
}

/// An alert reserved for one decision at a time; released when dropped, also when the request
/// is cancelled by its client.
struct Reservation {
    deciding: Arc<Mutex<HashSet<String>>>,
    id: String,
}

impl Reservation {
    fn take(deciding: &Arc<Mutex<HashSet<String>>>, id: &str) -> Option<Self> {
        let fresh = deciding.lock().unwrap_or_else(|e| e.into_inner()).insert(id.to_owned());
        fresh.then(|| Self { deciding: deciding.clone(), id: id.to_owned() })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.deciding.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
    }
}

/// A decision checked against the book and reserved, not yet made.
struct Made {
    /// The alert after it.
    view: AlertView,
    /// Its `feedback` row.
    row: arrow::array::RecordBatch,
    /// Its lifecycle event.
    event: arrow::array::RecordBatch,
    decision_id: String,
    _reserved: Reservation,
}

/// Stores the decision in the lake (fsync, off the async workers; a decision the lake does
/// not hold is not made), applies it to the book, streams it, then publishes it.
async fn decide_here(app: &App, m: Made) -> Response {
    let Made { view, row, event, _reserved, .. } = m;
    if let Err(e) = store(app, &row, &event).await {
        tracing::error!("storing a decision: {e}");
        return error(StatusCode::INTERNAL_SERVER_ERROR, "the decision could not be stored");
    }
    {
        let mut book = app.book.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(a) = book.alerts.get_mut(&view.alert_id) {
            // the rule may have moved it on meanwhile (active, value): keep that, add the decision
            a.state = view.state.clone();
            a.decisions = view.decisions.clone();
        }
    }
    let _ = app.events.send(serde_json::json!({"kind": "decision", "alert": &view}).to_string());
    publish(app, Some(&event), &row, view).await
}

/// A shared book's decision: made on the alerts topic (produced, then read back and applied in
/// the topic's order by every control center; refused if another came first), then stored in
/// this instance's lake and its feedback row published.
///
/// The work runs as a task of its own, so that a decision the topic takes is stored and
/// published even when the request gave up or its client went away; the request waits for
/// the producer and the read-back, each at most `publish_timeout`.
async fn decide_shared(app: &App, replica: Arc<Replica>, m: Made) -> Response {
    let timeout = app.outbox.as_ref().map_or(Duration::from_secs(5), |o| o.timeout());
    let (answer_tx, answer_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(make_on_topic(app.clone(), replica, m, timeout, answer_tx));
    // the producer (with the outbox's lock) and the read-back, each at most `timeout`
    match tokio::time::timeout(3 * timeout + Duration::from_secs(1), answer_rx).await {
        Ok(Ok(answer)) => answer,
        _ => error(
            StatusCode::GATEWAY_TIMEOUT,
            "the decision is on its way to the alerts topic but was not read back in time; reload the alert",
        ),
    }
}

/// How long a decision produced to the alerts topic is waited for, after its request was
/// answered, to store it in the lake when it arrives (well beyond the producer's own message
/// timeout, `publish_timeout`, after which librdkafka gives up on it).
const READ_BACK_LIMIT: Duration = Duration::from_secs(60);

/// The request a shared decision answers, and the alert it holds until then.
struct Requester {
    answer: Option<tokio::sync::oneshot::Sender<Response>>,
    reserved: Option<Reservation>,
}

impl Requester {
    /// Answers (once; later answers are dropped).
    fn reply(&mut self, r: Response) {
        if let Some(a) = self.answer.take() {
            let _ = a.send(r);
        }
    }

    /// Answers with a failure and frees the alert at once: the operator may try again (the
    /// topic's order refuses the second of two decisions anyway).
    fn fail(&mut self, r: Response) {
        self.reply(r);
        self.reserved.take();
    }

    fn waiting(&self) -> bool {
        self.answer.is_some()
    }
}

async fn make_on_topic(
    app: App,
    replica: Arc<Replica>,
    m: Made,
    timeout: Duration,
    answer: tokio::sync::oneshot::Sender<Response>,
) {
    let Made { row, event, decision_id, view, _reserved } = m;
    let mut request = Requester { answer: Some(answer), reserved: Some(_reserved) };
    let mut outcome = replica.expect(&decision_id);
    let sent = match &app.outbox {
        Some(o) => o.send_event(&event).await,
        None => Err("no Kafka".into()),
    };
    if let Err(e) = sent {
        tracing::warn!(alert = %view.alert_id, "a decision not confirmed by Kafka: {e}");
        request.fail(error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("Kafka did not confirm the decision ({e}); it may still be applied: reload the alert before deciding again"),
        ));
    }
    // the request waits `timeout` for the read-back; the decision is still stored if it comes later
    let first_wait = if request.waiting() { timeout } else { READ_BACK_LIMIT };
    let read_back = match tokio::time::timeout(first_wait, &mut outcome).await {
        Ok(r) => Some(r),
        Err(_) if request.waiting() => {
            request.fail(error(
                StatusCode::GATEWAY_TIMEOUT,
                "the decision is on the alerts topic but was not read back in time; reload the alert",
            ));
            tokio::time::timeout(READ_BACK_LIMIT, &mut outcome).await.ok()
        }
        Err(_) => None,
    };
    let view = match read_back {
        Some(Ok(Ok(view))) => view,
        Some(Ok(Err(why))) => {
            request.reply(error(StatusCode::CONFLICT, format!("another decision came first: {why}")));
            return;
        }
        Some(Err(_)) | None => {
            replica.forget(&decision_id);
            app.metrics
                .counter(
                    "citystream_control_decisions_unconfirmed_total",
                    "Decisions produced to the alerts topic and never read back here (no lake copy here).",
                    &[],
                )
                .inc();
            tracing::warn!(
                alert = %view.alert_id,
                "a decision was not read back from the alerts topic within {READ_BACK_LIMIT:?}: if it arrives \
                 later, the books apply it but this lake has no copy"
            );
            request.reply(error(StatusCode::GATEWAY_TIMEOUT, "the decision was not read back from the alerts topic"));
            return;
        }
    };
    // the topic holds the decision: a lake that fails now loses the lake's copy, not the decision
    if let Err(e) = store(&app, &row, &event).await {
        app.metrics
            .counter("citystream_control_lake_failures_total", "Decisions made but not stored in the lake.", &[])
            .inc();
        tracing::error!(alert = %view.alert_id, "a decision made on the alerts topic could not be stored in the lake: {e}");
    }
    // answered once in the topic and this lake; the feedback row follows (the outbox retries it)
    request.reply(axum::Json(&view).into_response());
    drop(request);
    let _ = publish(&app, None, &row, view).await;
}

/// Writes a decision's rows to the lake, if the control center has one.
async fn store(app: &App, row: &arrow::array::RecordBatch, event: &arrow::array::RecordBatch) -> Result<(), String> {
    let Some(lake) = app.lake.clone() else { return Ok(()) };
    let (r, e) = (row.clone(), event.clone());
    let stored = tokio::task::spawn_blocking(move || lake.store(&r, &e)).await;
    stored.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string()))
}

/// Publishes what Kafka does not have yet of a made decision and answers with the alert.
async fn publish(
    app: &App,
    event: Option<&arrow::array::RecordBatch>,
    row: &arrow::array::RecordBatch,
    view: AlertView,
) -> Response {
    if let Some(o) = &app.outbox
        && let Err(waiting) = o.publish(event, row).await
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
