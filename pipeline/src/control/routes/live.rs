//! What the page keeps live: the map, the pipeline's health, the event stream.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tokio::sync::broadcast;

use crate::control::auth::Role;

use super::{App, error};

pub(super) async fn map_route(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = app.guard.authorize(&headers, None, peer, Role::Viewer) {
        return *r;
    }
    axum::Json(app.map.as_ref().clone()).into_response()
}

pub(super) async fn health(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
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

/// For load balancers and probes, without a token: 200 once the book can serve decisions (a
/// shared book has read the alerts topic up to where it ended at start), 503 before.
pub(super) async fn ready(State(app): State<App>) -> Response {
    match &app.replica {
        Some(r) if !r.caught_up() => {
            error(StatusCode::SERVICE_UNAVAILABLE, "the book is still reading the alerts topic")
        }
        _ => axum::Json(serde_json::json!({"ready": true})).into_response(),
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct StreamQuery {
    token: Option<String>,
}

/// Counts an open event stream; uncounted when dropped.
pub(super) struct StreamSlot(Arc<AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

pub(super) async fn stream(
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
