//! The control-center service: a sink (`type: control_center`) that keeps the book of alerts
//! from the `alert` stages and serves it over HTTP to the people who act on them.
//!
//! - `GET /` the page (live alert list, a map drawn from the road graph, details, buttons);
//! - `GET /api/alerts?state=&alert_type=&location=&limit=` alerts, newest first;
//! - `GET /api/alerts/{id}`; `GET /api/map` (segments with coordinates); `GET /api/health`
//!   (per-stage rows in, late rows, dead letters, queue depths);
//! - `GET /api/stream` Server-Sent Events: every alert change and every operator decision;
//! - `GET /api/calibration?target_precision=0.8`: per rule and location, a bounded threshold
//!   proposal from the operators' verdicts (`alert::calibrate`), logged;
//! - `POST /api/calibration/apply` `{"target_precision"}`: applies the proposals live to the
//!   pipeline's [`ThresholdBoard`] (no config edit), as one numbered change kept in
//!   `calibration_file`; `POST /api/calibration/{n}/revert` puts the old levels back;
//!   `GET /api/calibration/history` lists the live levels and every change;
//! - `POST /api/alerts/{id}/{acknowledge|resolve|false_alarm}` with `{"comment": "..."}`:
//!   lifecycle open → acknowledged → resolved, or false alarm, made under the name of the
//!   token. Each decision is stored before the answer: a row of the `feedback` table and a
//!   lifecycle event (status `acknowledged`, `resolved` or `false_alarm`) in the `alerts`
//!   table under `feedback_path`, and with `kafka:` a message on each of its topics
//!   (`alerts_topic`, keyed by location, and `feedback_topic`); then an SSE event.
//!
//! - `GET /api/ready` (no token): 200 once the book can serve decisions (for probes).
//!
//! Inside a pipeline the book is fed by its `alert` stages ([`ControlCenter::start_with`]);
//! `citystream control` feeds it from the alerts topic instead ([`ControlCenter::start_shared`],
//! `replica`), so that several instances serve one book.
//!
//! Modules: [`config`] (the YAML), [`auth`] (tokens, roles, rate limits), [`book`] (the alerts,
//! bounded, rebuilt from the lake), [`decisions`] (their rows), [`outbox`] (Kafka), [`calibration`],
//! [`routes`] (the HTTP surface and its headers), [`sink`] (the book fed by a pipeline).

pub mod auth;
pub mod book;
pub mod calibration;
pub mod config;
pub mod decisions;
mod error;
mod outbox;
mod replica;
mod routes;
mod sink;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};

use arrow::array::RecordBatch;
use citystream_operators::Metrics;
use citystream_operators::alert::ThresholdBoard;
use tokio::sync::broadcast;

pub use auth::{Identity, Role, TokensError, parse_tokens};
pub use book::{AlertView, Decision};
pub use calibration::{CalibrationChange, LevelChange};
pub use config::{ControlConfig, ControlKafka};
pub use decisions::feedback_schema;
pub use error::ControlError;
pub(crate) use sink::ControlSink;

/// The running control center: apply alert batches to it; it serves them.
pub struct ControlCenter {
    book: Arc<Mutex<Book>>,
    events: broadcast::Sender<String>,
    board: ThresholdBoard,
    /// Where it listens.
    pub addr: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    replica: Option<Arc<replica::Replica>>,
}

use book::Book;

impl Drop for ControlCenter {
    fn drop(&mut self) {
        self.tasks.iter().for_each(tokio::task::JoinHandle::abort);
        if let Some(r) = &self.replica {
            r.stop();
        }
    }
}

/// Where a control center's book comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Feed {
    /// The pipeline it is a sink of ([`ControlCenter::apply`]), restored from the lake at start.
    Pipeline,
    /// The alerts topic, read from its start, shared with every control center reading it.
    AlertsTopic,
}

/// `location,segment_id` rows: the segment a camera or station watches.
fn read_sites(path: &str) -> Result<BTreeMap<String, String>, ControlError> {
    let bad = |problem: String| ControlError::Config { key: "sites", problem };
    let text = std::fs::read_to_string(path).map_err(|e| bad(format!("`{path}`: {e}")))?;
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate().skip(1).filter(|(_, l)| !l.trim().is_empty()) {
        let (loc, seg) = line
            .split_once(',')
            .ok_or_else(|| bad(format!("`{path}` line {}: expected `location,segment_id`", i + 1)))?;
        out.insert(loc.trim().to_owned(), seg.trim().to_owned());
    }
    Ok(out)
}

/// The map the page draws: the road graph the `features` stage reads, with coordinates.
fn read_map(path: &str) -> Result<serde_json::Value, ControlError> {
    let bad = |problem: String| ControlError::Config { key: "road_graph", problem };
    let g = citystream_models::RoadGraph::read(std::path::Path::new(path)).map_err(|e| bad(e.to_string()))?;
    if !g.has_coordinates {
        return Err(bad(format!("`{path}` has no `lat` and `lon` columns for the map")));
    }
    let segs: Vec<serde_json::Value> = g
        .segments
        .iter()
        .map(|s| {
            serde_json::json!({
                "id": s.segment_id,
                "lat": s.lat,
                "lon": s.lon,
                "downstream": s.downstream.map(|d| g.segments[d].segment_id.as_str()),
            })
        })
        .collect();
    Ok(serde_json::json!({ "segments": segs }))
}

impl ControlCenter {
    /// Binds the address, loads tokens and the map, and starts serving (with a board of live
    /// thresholds of its own; a pipeline shares its board through [`start_with`](Self::start_with)).
    pub fn start(name: &str, cfg: &ControlConfig, metrics: &Metrics) -> Result<ControlCenter, ControlError> {
        Self::start_with(name, cfg, metrics, &ThresholdBoard::default())
    }

    /// As [`start`](Self::start), calibrating the alert rules that read `board`.
    pub fn start_with(
        name: &str,
        cfg: &ControlConfig,
        metrics: &Metrics,
        board: &ThresholdBoard,
    ) -> Result<ControlCenter, ControlError> {
        Self::start_fed(name, cfg, metrics, board, Feed::Pipeline)
    }

    /// A control center whose book is the alerts topic (`kafka.alerts_topic`), so that several
    /// serve the same book (`citystream control`): it reads the topic from its start, makes
    /// decisions by producing them there and applies them when read back (see
    /// `control::replica`). Its decisions are stored in `feedback_path` (if set) once made; the
    /// book is not restored from the lake. Live calibration is refused: thresholds live in the
    /// pipelines, which this process is not part of.
    pub fn start_shared(name: &str, cfg: &ControlConfig, metrics: &Metrics) -> Result<ControlCenter, ControlError> {
        Self::start_fed(name, cfg, metrics, &ThresholdBoard::default(), Feed::AlertsTopic)
    }

    fn start_fed(
        name: &str,
        cfg: &ControlConfig,
        metrics: &Metrics,
        board: &ThresholdBoard,
        feed: Feed,
    ) -> Result<ControlCenter, ControlError> {
        let tokens = cfg.tokens()?;
        let mut map = match &cfg.road_graph {
            Some(p) => read_map(p.as_str())?,
            None => serde_json::json!({ "segments": [] }),
        };
        if let Some(p) = &cfg.sites {
            let sites = read_sites(p.as_str())?;
            let known: HashSet<&str> =
                map["segments"].as_array().into_iter().flatten().filter_map(|s| s["id"].as_str()).collect();
            if let Some((loc, seg)) = sites.iter().find(|(_, seg)| !known.contains(seg.as_str())) {
                return Err(ControlError::Config {
                    key: "sites",
                    problem: format!("`{loc}` is on `{seg}`, which the road graph does not have"),
                });
            }
            map["sites"] = serde_json::to_value(sites).expect("a map of strings serializes");
        }
        let lake: Option<Arc<dyn decisions::DecisionStore>> = match &cfg.feedback_path {
            Some(p) => Some(Arc::new(decisions::DecisionLake::open(name, p.as_str(), metrics)?)),
            None => None,
        };
        let per_minute = NonZeroU32::new(cfg.requests_per_minute)
            .ok_or(ControlError::Config { key: "requests_per_minute", problem: "must be at least 1".into() })?;
        let listen = |source| ControlError::Listen { addr: cfg.addr.as_str().to_owned(), source };
        let listener = std::net::TcpListener::bind(cfg.addr.as_str()).map_err(listen)?;
        listener.set_nonblocking(true).map_err(listen)?;
        let addr = listener.local_addr().map_err(listen)?;
        let listener = tokio::net::TcpListener::from_std(listener).map_err(listen)?;
        let calibrations = match &cfg.calibration_file {
            Some(p) => calibration::Calibrations::load(std::path::Path::new(p.as_str()), board)?,
            None => calibration::Calibrations::default(),
        };
        let outbox = outbox::Outbox::open(name, cfg, metrics)?;
        let (events, _) = broadcast::channel(1024);
        let (retention, max) = (cfg.retention.as_millis_i64(), cfg.max_alerts);
        let book = Arc::new(Mutex::new(match feed {
            Feed::Pipeline => Book::new(retention, max),
            Feed::AlertsTopic => Book::shared(retention, max),
        }));
        // the book is restored before the first request is served
        if let Some(p) = cfg.feedback_path.as_ref().filter(|_| feed == Feed::Pipeline) {
            let table = std::path::Path::new(p.as_str()).join("alerts");
            let (alerts, decisions) = book.lock().unwrap_or_else(|e| e.into_inner()).restore(&table)?;
            if alerts > 0 {
                tracing::info!(alerts, decisions, "control center: alert book restored from the lake");
            }
        }
        let replica = match (feed, &cfg.kafka) {
            (Feed::Pipeline, _) => None,
            (Feed::AlertsTopic, None) => {
                return Err(ControlError::Config {
                    key: "kafka",
                    problem:
                        "a shared book is read from the alerts topic: set `kafka.brokers` and `kafka.alerts_topic`"
                            .into(),
                });
            }
            (Feed::AlertsTopic, Some(k)) => {
                let target = replica::Target { book: book.clone(), events: events.clone() };
                Some(Arc::new(replica::Replica::start(name, k, target, metrics)?))
            }
        };
        let guard = auth::Guard::new(tokens, per_minute);
        let app = routes::App {
            book: book.clone(),
            calibrations: Arc::new(Mutex::new(calibrations)),
            calibrating: Arc::default(),
            lake,
            events: events.clone(),
            guard: guard.clone(),
            map: Arc::new(map),
            metrics: metrics.clone(),
            board: board.clone(),
            outbox: outbox.clone(),
            streams: Arc::new(AtomicUsize::new(0)),
            max_streams: cfg.max_streams,
            deciding: Arc::default(),
            replica: replica.clone(),
        };
        let router = routes::router(app);
        let mut tasks = vec![tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>()).await {
                tracing::error!("control center stopped: {e}");
            }
        })];
        if let Some(o) = outbox {
            tasks.push(tokio::spawn(o.retry_forever()));
        }
        // the rate limiter forgets clients whose budget is full again, the book its old alerts
        let (keys, in_book) = (
            metrics.gauge("citystream_control_rate_keys", "Clients and tokens the rate limiter holds state for.", &[]),
            metrics.gauge("citystream_control_alerts_in_book", "Alerts in the control center's book.", &[]),
        );
        let housekeeping_book = book.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(30));
            loop {
                tick.tick().await;
                keys.set(guard.forget_idle() as f64);
                let mut b = housekeeping_book.lock().unwrap_or_else(|e| e.into_inner());
                b.evict();
                in_book.set(b.alerts.len() as f64);
            }
        }));
        tracing::info!(%addr, "control center listening");
        Ok(ControlCenter { book, events, board: board.clone(), addr, tasks, replica })
    }

    /// The live thresholds it calibrates.
    pub fn thresholds(&self) -> &ThresholdBoard {
        &self.board
    }

    /// Applies alert events (the `alert` stages' schema) to the book and streams them.
    pub fn apply(&self, batch: &RecordBatch) -> Result<(), ControlError> {
        let messages = self.book.lock().unwrap_or_else(|e| e.into_inner()).apply(batch)?;
        for m in messages {
            let _ = self.events.send(m);
        }
        Ok(())
    }
}
