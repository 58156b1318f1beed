//! Calibration: proposed thresholds from the operators' verdicts, applied and reverted live.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::control::ControlError;
use crate::control::auth::Role;
use crate::control::calibration::{CalibrationChange, CalibrationQuery, Calibrations, proposals, undo};

use super::{App, check_operator, error};

/// Proposed per-location thresholds from the operators' verdicts, per rule (nothing changes:
/// `POST /api/calibration/apply` applies them).
pub(super) async fn calibration(
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

pub(super) async fn calibration_history(
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
pub(super) struct ApplyBody {
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
pub(super) async fn save_history(history: Calibrations) -> Result<(), ControlError> {
    let path = history.file.clone().unwrap_or_default();
    tokio::task::spawn_blocking(move || history.save())
        .await
        .map_err(|e| ControlError::Calibrations { path, source: std::io::Error::other(e) })?
}

/// Applies the current proposals live, as one change that can be reverted: written to the
/// calibration file first, then to the live levels.
pub(super) async fn calibration_apply(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let who = match app.guard.authorize(&headers, None, peer, Role::Operator) {
        Ok(w) => w,
        Err(r) => return *r,
    };
    if app.replica.is_some() {
        return error(
            StatusCode::NOT_IMPLEMENTED,
            "this control center serves a shared book outside the pipelines: their alert levels cannot be set from here",
        );
    }
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
pub(super) struct RevertBody {
    #[serde(default)]
    operator: Option<String>,
}

/// Puts back the levels a change replaced (in reverse order, so nested changes unwind).
pub(super) async fn calibration_revert(
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
    if app.replica.is_some() {
        return error(
            StatusCode::NOT_IMPLEMENTED,
            "this control center serves a shared book outside the pipelines: their alert levels cannot be set from here",
        );
    }
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
