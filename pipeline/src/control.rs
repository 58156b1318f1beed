//! The control-center service: a sink (`type: control_center`) that keeps the book of alerts
//! from the `alert` stages and serves it over HTTP to the people who act on them.
//!
//! - `GET /` the page (live alert list, a map drawn from the road graph, details, buttons);
//! - `GET /api/alerts?state=&alert_type=&location=&limit=` alerts, newest first;
//! - `GET /api/alerts/{id}`; `GET /api/map` (segments with coordinates); `GET /api/health`
//!   (per-stage rows in, dead letters, queue depths);
//! - `GET /api/stream` Server-Sent Events: every alert change and every operator decision;
//! - `GET /api/calibration?target_precision=0.8`: per rule and location, a bounded threshold
//!   proposal from the operators' verdicts (`alert::calibrate`), logged;
//! - `POST /api/calibration/apply` `{"operator", "target_precision"}`: applies the proposals
//!   live to the pipeline's [`ThresholdBoard`] (no config edit), as one numbered change kept
//!   in `calibration_file`; `POST /api/calibration/{n}/revert` puts the old levels back;
//!   `GET /api/calibration/history` lists the live levels and every change;
//! - `POST /api/alerts/{id}/{acknowledge|resolve|false_alarm}` with
//!   `{"operator": "...", "comment": "..."}`: lifecycle open → acknowledged → resolved, or
//!   false alarm. Each decision is stored before the answer: a row of the `feedback` table
//!   and a lifecycle event (status `acknowledged`, `resolved` or `false_alarm`) in the
//!   `alerts` table under `feedback_path`, and with `kafka:` a message on each of its topics
//!   (`alerts_topic`, keyed by location, and `feedback_topic`); then an SSE event.
//!
//! Every `/api` request needs a bearer token (`Authorization: Bearer …`; the event stream also
//! takes `?token=`, as browsers' EventSource cannot set headers). Tokens come from a file or an
//! environment variable, never the YAML: one `role token` pair per line (or `;`-separated),
//! role `viewer` (read) or `operator` (read and decide). Requests are rate-limited per token
//! (and per client address for failed authentication) with `governor`; bad input is a 4xx with
//! a JSON `{"error": ...}`.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use arrow::array::{Array, AsArray, Float64Array, RecordBatch, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Float64Type, Int32Type, Schema, SchemaRef, TimestampMillisecondType};
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use citystream_operators::Metrics;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use citystream_operators::alert::ThresholdBoard;

use crate::config::{EnvString, Inputs};
use crate::sink::parquet::{ParquetSinkConfig, ParquetWriter};

fn d_rate() -> u32 {
    120
}

/// YAML of a `control_center` sink.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// Listen address, e.g. `127.0.0.1:8088` (port 0: any free port, logged).
    pub addr: EnvString,
    /// The alert streams (outputs of `alert` stages).
    pub alerts: Inputs,
    /// A file of `role token` lines (roles `viewer`, `operator`).
    #[serde(default)]
    pub tokens_file: Option<EnvString>,
    /// Single machines: create `tokens_file` with one viewer and one operator token (random,
    /// mode 0600) when it does not exist.
    #[serde(default)]
    pub create_tokens_file: bool,
    /// The name of an environment variable holding `role token` pairs separated by `;`.
    #[serde(default)]
    pub tokens_env: Option<String>,
    /// Root of the `feedback` Parquet table (operator decisions) and of the decision events
    /// in its `alerts` table. Default: none (not stored). At start the book is rebuilt from
    /// that `alerts` table (the rule events the lake sink wrote there, then the decisions), so
    /// a restart keeps what operators saw and decided.
    #[serde(default)]
    pub feedback_path: Option<EnvString>,
    /// The road graph CSV for the map.
    #[serde(default)]
    pub road_graph: Option<EnvString>,
    /// Where alerts at cameras and stations go on the map: CSV `location,segment_id`.
    #[serde(default)]
    pub sites: Option<EnvString>,
    /// Requests per minute per token. Default 120.
    #[serde(default = "d_rate")]
    pub requests_per_minute: u32,
    /// A JSON file keeping the live calibrated levels and their history across restarts
    /// (written atomically). Default: none (calibration lasts as long as the process).
    #[serde(default)]
    pub calibration_file: Option<EnvString>,
    /// Publish every decision to Kafka as well (needs the `kafka` feature).
    #[serde(default)]
    pub kafka: Option<ControlKafka>,
}

/// Where the control center publishes decisions on Kafka.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlKafka {
    /// `bootstrap.servers`.
    pub brokers: EnvString,
    /// Lifecycle events in the alert schema, keyed by location (e.g. `city.alerts`).
    #[serde(default)]
    pub alerts_topic: Option<String>,
    /// Feedback rows, keyed by location (e.g. `city.feedback`).
    #[serde(default)]
    pub feedback_topic: Option<String>,
    /// Any librdkafka producer property.
    #[serde(default)]
    pub properties: BTreeMap<String, EnvString>,
}

/// A role a token grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Reads alerts, the map, health and the stream.
    Viewer,
    /// Also acknowledges, resolves and marks false alarms.
    Operator,
}

/// Parses `role token` pairs (one per line or `;`-separated; `#` starts a comment).
pub fn parse_tokens(text: &str) -> Result<HashMap<String, Role>, String> {
    let mut out = HashMap::new();
    for (n, entry) in text.split(['\n', ';']).enumerate() {
        let entry = entry.split('#').next().unwrap_or("").trim();
        if entry.is_empty() {
            continue;
        }
        let mut parts = entry.split_whitespace();
        let (Some(role), Some(token), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!("token entry {}: expected `role token`", n + 1));
        };
        let role = match role {
            "viewer" => Role::Viewer,
            "operator" => Role::Operator,
            other => return Err(format!("token entry {}: unknown role `{other}` (viewer or operator)", n + 1)),
        };
        if token.len() < 16 {
            return Err(format!("token entry {}: tokens need at least 16 characters", n + 1));
        }
        out.insert(token.to_owned(), role);
    }
    if out.is_empty() {
        return Err("no tokens: the control center would refuse every request".into());
    }
    Ok(out)
}

impl ControlConfig {
    /// Loads the tokens from the file or the environment.
    pub fn tokens(&self) -> Result<HashMap<String, Role>, String> {
        match (&self.tokens_file, &self.tokens_env) {
            (Some(f), None) if self.create_tokens_file && !std::path::Path::new(f.as_str()).exists() => {
                create_tokens_file(f.as_str())?;
                tracing::info!(file = f.as_str(), "control center: created a viewer and an operator token");
                parse_tokens(&std::fs::read_to_string(f.as_str()).map_err(|e| e.to_string())?)
            }
            (Some(f), None) => std::fs::read_to_string(f.as_str())
                .map_err(|e| format!("reading tokens_file `{}`: {e}", f.as_str()))
                .and_then(|t| parse_tokens(&t)),
            (None, Some(v)) => std::env::var(v)
                .map_err(|_| format!("tokens_env: the environment variable `{v}` is not set"))
                .and_then(|t| parse_tokens(&t)),
            _ => Err("set exactly one of `tokens_file` and `tokens_env` (tokens never go in the YAML)".into()),
        }
    }
}

fn create_tokens_file(path: &str) -> Result<(), String> {
    use base64::Engine;
    use rand::Rng;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let token = || base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::rng().random::<[u8; 24]>());
    if let Some(dir) = std::path::Path::new(path).parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("creating tokens_file `{path}`: {e}"))?;
    writeln!(
        f,
        "# citystream control-center tokens: `role token` per line (viewer, operator)\nviewer {}\noperator {}",
        token(),
        token()
    )
    .and_then(|()| f.sync_all())
    .map_err(|e| format!("writing tokens_file `{path}`: {e}"))
}

/// One operator decision.
#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    /// When (processing time, ms).
    pub ts: i64,
    /// `acknowledged`, `resolved` or `false_alarm`.
    pub decision: String,
    /// Who.
    pub operator: String,
    /// Why.
    pub comment: String,
}

/// An alert as the control center shows it.
#[derive(Debug, Clone, Serialize)]
pub struct AlertView {
    /// Its id.
    pub alert_id: String,
    /// The rule that raised it.
    pub rule: String,
    /// Its type.
    pub alert_type: String,
    /// Its severity.
    pub severity: String,
    /// Where.
    pub location: String,
    /// Lifecycle: `open`, `acknowledged`, `resolved` or `false_alarm`.
    pub state: String,
    /// Whether the rule still holds it open.
    pub active: bool,
    /// When it opened (event time, ms).
    pub opened_at: i64,
    /// The last change (event time, ms).
    pub updated_at: i64,
    /// When the pipeline emitted its first event (processing time, ms).
    pub emitted_at: i64,
    /// The latest value, threshold and peak.
    pub value: Option<f64>,
    /// The raise level.
    pub threshold: f64,
    /// The peak.
    pub peak: Option<f64>,
    /// Locations in a storm summary.
    pub locations: i32,
    /// What fired it.
    pub evidence: serde_json::Value,
    /// Operator decisions, oldest first.
    pub decisions: Vec<Decision>,
}

/// The feedback table's schema.
pub fn feedback_schema() -> SchemaRef {
    let ts = citystream_schemas::timestamp_type;
    Arc::new(Schema::new(vec![
        Field::new("ts", ts(), false),
        Field::new("alert_id", DataType::Utf8, false),
        Field::new("rule", DataType::Utf8, false),
        Field::new("alert_type", DataType::Utf8, false),
        Field::new("location", DataType::Utf8, false),
        Field::new("decision", DataType::Utf8, false),
        Field::new("operator", DataType::Utf8, false),
        Field::new("comment", DataType::Utf8, false),
        Field::new("opened_at", ts(), false),
        Field::new("value", DataType::Float64, true),
        Field::new("threshold", DataType::Float64, false),
    ]))
}

struct Book {
    alerts: HashMap<String, AlertView>,
    /// Tables `feedback` and `alerts` (decision events) under `feedback_path`.
    feedback: Option<DecisionLake>,
    calibration: Calibrations,
}

/// Where decisions are stored: a fresh writer per decision, so a failed one leaves no rows
/// buffered for the next decision to flush.
struct DecisionLake {
    name: String,
    cfg: ParquetSinkConfig,
    tables: BTreeMap<String, SchemaRef>,
    metrics: Metrics,
}

impl DecisionLake {
    fn store(&self, feedback: &RecordBatch, event: &RecordBatch) -> Result<(), String> {
        let mut w =
            ParquetWriter::try_new(&self.name, &self.cfg, &self.tables, &self.metrics).map_err(|e| e.to_string())?;
        w.write("feedback", "control_center", feedback)
            .and_then(|()| w.write("alerts", "control_center", event))
            .and_then(|()| w.flush())
            .map_err(|e| e.to_string())
    }
}

/// One level a calibration changed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LevelChange {
    /// The rule.
    pub rule: String,
    /// The location.
    pub location: String,
    /// The level before (the configured one when there was no live level).
    pub old: f64,
    /// The level after.
    pub new: f64,
    /// The precision the proposal reported (`alert::Proposal::precision`).
    pub precision: f64,
    /// Alerts judged.
    pub judged: usize,
    /// Whether a live level was set before (a revert removes it again when not).
    pub had_live: bool,
}

/// One applied calibration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CalibrationChange {
    /// Its number.
    pub id: u64,
    /// When (processing time, ms).
    pub ts: i64,
    /// Who applied it.
    pub operator: String,
    /// The precision it aimed at.
    pub target_precision: f64,
    /// What it changed.
    pub changes: Vec<LevelChange>,
    /// When and by whom it was reverted.
    pub reverted: Option<(i64, String)>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Calibrations {
    history: Vec<CalibrationChange>,
    #[serde(skip)]
    file: Option<std::path::PathBuf>,
}

impl Calibrations {
    fn load(path: &std::path::Path, board: &ThresholdBoard) -> Result<Self, String> {
        let mut c = match std::fs::read(path) {
            Ok(b) => serde_json::from_slice::<Calibrations>(&b)
                .map_err(|e| format!("calibration_file `{}`: {e}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Calibrations::default(),
            Err(e) => return Err(format!("calibration_file `{}`: {e}", path.display())),
        };
        // replay applies and reverts in the order they happened: the live levels are what
        // they left (a revert may come long after later changes were applied and reverted)
        let mut steps: Vec<(i64, u64, bool, &CalibrationChange)> = Vec::new();
        for ch in &c.history {
            steps.push((ch.ts, ch.id, false, ch));
            if let Some((at, _)) = &ch.reverted {
                steps.push((*at, ch.id, true, ch));
            }
        }
        steps.sort_by_key(|(ts, id, revert, _)| (*ts, *revert, *id));
        for (_, _, revert, ch) in steps {
            if revert {
                for l in ch.changes.iter().rev() {
                    board.set(&l.rule, &l.location, l.had_live.then_some(l.old));
                }
            } else {
                for l in &ch.changes {
                    board.set(&l.rule, &l.location, Some(l.new));
                }
            }
        }
        c.file = Some(path.to_owned());
        Ok(c)
    }

    /// Writes the history (write, fsync, rename, fsync of the directory).
    fn save(&self) -> Result<(), String> {
        let Some(path) = &self.file else { return Ok(()) };
        let body = serde_json::to_vec_pretty(self).map_err(|e| e.to_string())?;
        crate::sink::write_atomic(path, &body).map_err(|e| format!("calibration_file `{}`: {e}", path.display()))
    }
}

/// Publishes decisions to Kafka in the order they were made; a decision the broker did not
/// take stays queued (an outbox in memory) and goes first with the next one.
#[cfg(feature = "kafka")]
struct Publisher {
    writer: tokio::sync::Mutex<(crate::kafka::KafkaWriter, std::collections::VecDeque<(RecordBatch, RecordBatch)>)>,
    alerts_topic: Option<String>,
    feedback_topic: Option<String>,
}

#[cfg(feature = "kafka")]
impl Publisher {
    /// Queues the decision and publishes everything queued; `Err` says how many still wait.
    async fn publish(&self, event: &RecordBatch, feedback: &RecordBatch) -> Result<(), String> {
        let mut guard = self.writer.lock().await;
        let (w, queue) = &mut *guard;
        queue.push_back((event.clone(), feedback.clone()));
        while let Some((event, feedback)) = queue.front() {
            let sent = async {
                if let Some(t) = &self.alerts_topic {
                    w.write(t, Some("location"), event).await?;
                }
                if let Some(t) = &self.feedback_topic {
                    w.write(t, Some("location"), feedback).await?;
                }
                w.flush().await
            }
            .await;
            if let Err(e) = sent {
                tracing::error!("publishing a decision to Kafka: {e}");
                return Err(format!("{} decision(s) wait to be published", queue.len()));
            }
            queue.pop_front();
        }
        Ok(())
    }
}

#[cfg(not(feature = "kafka"))]
struct Publisher;

#[cfg(not(feature = "kafka"))]
impl Publisher {
    async fn publish(&self, _: &RecordBatch, _: &RecordBatch) -> Result<(), String> {
        Err("built without the `kafka` feature".into())
    }
}

fn publisher(name: &str, cfg: &ControlConfig, metrics: &Metrics) -> Result<Option<Publisher>, String> {
    let Some(k) = &cfg.kafka else { return Ok(None) };
    if k.alerts_topic.is_none() && k.feedback_topic.is_none() {
        return Err("kafka: set `alerts_topic`, `feedback_topic` or both".into());
    }
    #[cfg(feature = "kafka")]
    {
        let topics: Vec<&str> = k.alerts_topic.iter().chain(&k.feedback_topic).map(String::as_str).collect();
        let writer = crate::kafka::KafkaWriter::for_topics(name, &k.brokers, &k.properties, &topics, metrics)
            .map_err(|e| format!("kafka: {e}"))?;
        Ok(Some(Publisher {
            writer: tokio::sync::Mutex::new((writer, Default::default())),
            alerts_topic: k.alerts_topic.clone(),
            feedback_topic: k.feedback_topic.clone(),
        }))
    }
    #[cfg(not(feature = "kafka"))]
    {
        let _ = (name, metrics);
        Err("kafka: this build has no Kafka support (feature `kafka`)".into())
    }
}

/// The running control center: apply alert batches to it; it serves them.
pub struct ControlCenter {
    book: Arc<Mutex<Book>>,
    events: broadcast::Sender<String>,
    board: ThresholdBoard,
    /// Where it listens.
    pub addr: SocketAddr,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for ControlCenter {
    fn drop(&mut self) {
        self.server.abort();
    }
}

#[derive(Clone)]
struct App {
    book: Arc<Mutex<Book>>,
    events: broadcast::Sender<String>,
    tokens: Arc<HashMap<String, Role>>,
    limiter: Arc<DefaultKeyedRateLimiter<String>>,
    map: Arc<serde_json::Value>,
    metrics: Metrics,
    board: ThresholdBoard,
    publisher: Option<Arc<Publisher>>,
}

/// `location,segment_id` rows: the segment a camera or station watches.
fn read_sites(path: &str) -> Result<BTreeMap<String, String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("sites `{path}`: {e}"))?;
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate().skip(1).filter(|(_, l)| !l.trim().is_empty()) {
        let (loc, seg) = line
            .split_once(',')
            .ok_or_else(|| format!("sites `{path}` line {}: expected `location,segment_id`", i + 1))?;
        out.insert(loc.trim().to_owned(), seg.trim().to_owned());
    }
    Ok(out)
}

/// The map the page draws: the road graph the `features` stage reads, with coordinates.
fn read_map(path: &str) -> Result<serde_json::Value, String> {
    let g = citystream_models::RoadGraph::read(std::path::Path::new(path)).map_err(|e| format!("road_graph: {e}"))?;
    if !g.has_coordinates {
        return Err(format!("road_graph: `{path}` has no `lat` and `lon` columns for the map"));
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
    pub fn start(name: &str, cfg: &ControlConfig, metrics: &Metrics) -> Result<ControlCenter, String> {
        Self::start_with(name, cfg, metrics, &ThresholdBoard::default())
    }

    /// As [`start`](Self::start), calibrating the alert rules that read `board`.
    pub fn start_with(
        name: &str,
        cfg: &ControlConfig,
        metrics: &Metrics,
        board: &ThresholdBoard,
    ) -> Result<ControlCenter, String> {
        let tokens = cfg.tokens()?;
        let mut map = match &cfg.road_graph {
            Some(p) => read_map(p.as_str())?,
            None => serde_json::json!({ "segments": [] }),
        };
        if let Some(p) = &cfg.sites {
            let sites = read_sites(p.as_str())?;
            let known: std::collections::HashSet<&str> =
                map["segments"].as_array().into_iter().flatten().filter_map(|s| s["id"].as_str()).collect();
            if let Some((loc, seg)) = sites.iter().find(|(_, seg)| !known.contains(seg.as_str())) {
                return Err(format!("sites: `{loc}` is on `{seg}`, which the road graph does not have"));
            }
            map["sites"] = serde_json::to_value(sites).map_err(|e| e.to_string())?;
        }
        let feedback = match &cfg.feedback_path {
            Some(p) => {
                let pc: ParquetSinkConfig = serde_saphyr::from_str(&format!(
                    "path: {}\ntables: {{feedback: decisions, alerts: decisions}}\n",
                    serde_json::to_string(p.as_str()).map_err(|e| e.to_string())?
                ))
                .map_err(|e| format!("feedback_path: {e}"))?;
                let tables = BTreeMap::from([
                    ("feedback".to_owned(), feedback_schema()),
                    ("alerts".to_owned(), citystream_operators::alert::alert_schema()),
                ]);
                // fail at start, not at the first decision
                ParquetWriter::try_new(name, &pc, &tables, metrics).map_err(|e| format!("feedback table: {e}"))?;
                Some(DecisionLake { name: name.to_owned(), cfg: pc, tables, metrics: metrics.clone() })
            }
            None => None,
        };
        let per_minute = NonZeroU32::new(cfg.requests_per_minute).ok_or("requests_per_minute must be at least 1")?;
        let listener = std::net::TcpListener::bind(cfg.addr.as_str())
            .map_err(|e| format!("control center: cannot listen on {}: {e}", cfg.addr.as_str()))?;
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())?;
        let calibrations = match &cfg.calibration_file {
            Some(p) => Calibrations::load(std::path::Path::new(p.as_str()), board)?,
            None => Calibrations::default(),
        };
        let publisher = publisher(name, cfg, metrics)?.map(Arc::new);
        let (events, _) = broadcast::channel(1024);
        let book = Arc::new(Mutex::new(Book { alerts: HashMap::new(), feedback, calibration: calibrations }));
        let app = App {
            book: book.clone(),
            events: events.clone(),
            tokens: Arc::new(tokens),
            limiter: Arc::new(RateLimiter::keyed(Quota::per_minute(per_minute))),
            map: Arc::new(map),
            metrics: metrics.clone(),
            board: board.clone(),
            publisher,
        };
        let router = axum::Router::new()
            .route("/", get(|| async { Html(include_str!("control/page.html")) }))
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
            .with_state(app);
        // the book is restored before the first request is served
        let mut center = ControlCenter { book, events, board: board.clone(), addr, server: tokio::spawn(async {}) };
        if let Some(p) = &cfg.feedback_path {
            let (alerts, decisions) = center.restore(&std::path::Path::new(p.as_str()).join("alerts"))?;
            if alerts > 0 {
                tracing::info!(alerts, decisions, "control center: alert book restored from the lake");
            }
        }
        center.server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>()).await {
                tracing::error!("control center stopped: {e}");
            }
        });
        tracing::info!(%addr, "control center listening");
        Ok(center)
    }

    /// Rebuilds the book from an `alerts` table: rule events (`actor` `rule`) and operators'
    /// decisions (`actor` `operator`) in the order they were emitted. Returns (alerts, decisions).
    fn restore(&self, table: &std::path::Path) -> Result<(usize, usize), String> {
        let files: Vec<std::path::PathBuf> = crate::sink::parquet_files_by_dir(table).into_values().flatten().collect();
        let schema = citystream_operators::alert::alert_schema();
        let mut batches = Vec::new();
        for f in &files {
            let file = std::fs::File::open(f).map_err(|e| format!("{}: {e}", f.display()))?;
            let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
                .and_then(|b| b.build())
                .map_err(|e| format!("{}: {e}", f.display()))?;
            for b in reader {
                let b = b.map_err(|e| format!("{}: {e}", f.display()))?;
                // the columns by name, in the alert schema's order (partition columns aside)
                let cols = schema
                    .fields()
                    .iter()
                    .map(|fld| match b.column_by_name(fld.name()) {
                        Some(c) => Ok(c.clone()),
                        // files written before the `actor` column held rule events only
                        None if fld.name() == "actor" => {
                            Ok(Arc::new(StringArray::from_iter_values(std::iter::repeat_n("rule", b.num_rows())))
                                as Arc<dyn Array>)
                        }
                        None => Err(format!("{}: no column `{}`", f.display(), fld.name())),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                batches.push(RecordBatch::try_new(schema.clone(), cols).map_err(|e| e.to_string())?);
            }
        }
        if batches.is_empty() {
            return Ok((0, 0));
        }
        let all = arrow::compute::concat_batches(&schema, &batches).map_err(|e| e.to_string())?;
        let actor = all.column_by_name("actor").expect("alert schema").as_string::<i32>();
        let ev = all.column_by_name("evidence").expect("alert schema").as_string::<i32>();
        let ts = all.column_by_name("ts").expect("alert schema").as_primitive::<TimestampMillisecondType>();
        let emitted =
            all.column_by_name("emitted_at").expect("alert schema").as_primitive::<TimestampMillisecondType>();
        let ids = all.column_by_name("alert_id").expect("alert schema").as_string::<i32>();
        // rule events and decisions in one processing-time order, replayed through the same
        // transitions as when they happened (a decision's `ts` is when it was made)
        let mut order: Vec<usize> = (0..all.num_rows()).collect();
        order.sort_by_key(|&i| (emitted.value(i), ts.value(i), i));
        let mut n = 0;
        for i in order {
            if actor.value(i) != "operator" {
                self.apply(&all.slice(i, 1))?;
                continue;
            }
            let Ok(d) = serde_json::from_str::<serde_json::Value>(ev.value(i)) else { continue };
            let mut book = self.book.lock().unwrap_or_else(|e| e.into_inner());
            let Some(a) = book.alerts.get_mut(ids.value(i)) else { continue };
            let text = |k: &str| d[k].as_str().unwrap_or_default().to_owned();
            a.state = text("decision");
            a.decisions.push(Decision {
                ts: ts.value(i),
                decision: text("decision"),
                operator: text("operator"),
                comment: text("comment"),
            });
            n += 1;
        }
        let book = self.book.lock().unwrap_or_else(|e| e.into_inner());
        Ok((book.alerts.len(), n))
    }

    /// The live thresholds it calibrates.
    pub fn thresholds(&self) -> &ThresholdBoard {
        &self.board
    }

    /// Applies alert events (the `alert` stages' schema) to the book and streams them.
    pub fn apply(&self, batch: &RecordBatch) -> Result<(), String> {
        let s = |n: &str| batch.column_by_name(n).map(|c| c.as_string::<i32>()).ok_or(format!("no column `{n}`"));
        let t = |n: &str| {
            batch
                .column_by_name(n)
                .map(|c| c.as_primitive::<TimestampMillisecondType>())
                .ok_or(format!("no column `{n}`"))
        };
        let f = |n: &str| {
            batch.column_by_name(n).map(|c| c.as_primitive::<Float64Type>()).ok_or(format!("no column `{n}`"))
        };
        let (id, rule, ty, sev, loc, status, ev) = (
            s("alert_id")?,
            s("rule")?,
            s("alert_type")?,
            s("severity")?,
            s("location")?,
            s("status")?,
            s("evidence")?,
        );
        let (ts, opened, emitted) = (t("ts")?, t("opened_at")?, t("emitted_at")?);
        let (value, thr, peak) = (f("value")?, f("threshold")?, f("peak")?);
        let n_locs =
            batch.column_by_name("locations").map(|c| c.as_primitive::<Int32Type>()).ok_or("no column `locations`")?;
        let opt = |a: &Float64Array, i: usize| a.is_valid(i).then(|| a.value(i));
        let mut book = self.book.lock().unwrap_or_else(|e| e.into_inner());
        for i in 0..batch.num_rows() {
            let key = id.value(i).to_owned();
            let status = status.value(i);
            let a = book.alerts.entry(key.clone()).or_insert_with(|| AlertView {
                alert_id: key.clone(),
                rule: rule.value(i).to_owned(),
                alert_type: ty.value(i).to_owned(),
                severity: sev.value(i).to_owned(),
                location: loc.value(i).to_owned(),
                state: "open".into(),
                active: true,
                opened_at: opened.value(i),
                updated_at: ts.value(i),
                emitted_at: emitted.value(i),
                value: None,
                threshold: thr.value(i),
                peak: None,
                locations: 1,
                evidence: serde_json::Value::Null,
                decisions: Vec::new(),
            });
            // the same id opened again (a re-run of a deterministic simulation, say) after the
            // earlier alert finished: a new alert, not the old one's state
            if status == "open" && !a.active {
                (a.state, a.active, a.opened_at, a.emitted_at) =
                    ("open".into(), true, opened.value(i), emitted.value(i));
                a.decisions.clear();
                (a.value, a.peak) = (None, None);
            }
            a.updated_at = ts.value(i);
            a.value = opt(value, i).or(a.value);
            a.peak = opt(peak, i).or(a.peak);
            a.locations = n_locs.value(i);
            a.evidence = serde_json::from_str(ev.value(i)).unwrap_or(serde_json::Value::Null);
            if status == "resolved" {
                a.active = false;
                if a.state == "open" || a.state == "acknowledged" {
                    a.state = "resolved".into();
                }
            }
            let msg = serde_json::json!({"kind": "alert", "status": status, "alert": &*a}).to_string();
            let _ = self.events.send(msg);
        }
        Ok(())
    }
}

fn error(code: StatusCode, msg: impl Into<String>) -> Response {
    (code, axum::Json(serde_json::json!({ "error": msg.into() }))).into_response()
}

/// Checks the bearer token (or `?token=` where `query_token` is allowed), the role and the rate.
fn authorize(
    app: &App,
    headers: &HeaderMap,
    query_token: Option<&str>,
    peer: SocketAddr,
    need: Role,
) -> Result<Role, Box<Response>> {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let token = bearer.or(query_token);
    let Some(role) = token.and_then(|t| app.tokens.get(t)).copied() else {
        // failed attempts are limited per client address, so guessing is slow
        if app.limiter.check_key(&format!("ip:{}", peer.ip())).is_err() {
            return Err(Box::new(error(StatusCode::TOO_MANY_REQUESTS, "too many requests")));
        }
        return Err(Box::new(error(StatusCode::UNAUTHORIZED, "a valid bearer token is required")));
    };
    if app.limiter.check_key(&format!("token:{}", token.unwrap_or_default())).is_err() {
        return Err(Box::new(error(StatusCode::TOO_MANY_REQUESTS, "too many requests")));
    }
    if need == Role::Operator && role != Role::Operator {
        return Err(Box::new(error(StatusCode::FORBIDDEN, "this token is read-only (role viewer)")));
    }
    Ok(role)
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
    if let Err(r) = authorize(&app, &headers, None, peer, Role::Viewer) {
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
    if let Err(r) = authorize(&app, &headers, None, peer, Role::Viewer) {
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
    operator: String,
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
    if let Err(r) = authorize(&app, &headers, None, peer, Role::Operator) {
        return *r;
    }
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
            return error(
                StatusCode::BAD_REQUEST,
                format!("body: {e} (expected {{\"operator\": \"...\", \"comment\": \"...\"}})"),
            );
        }
    };
    if let Err(r) = check_operator(&body.operator) {
        return *r;
    }
    if body.comment.chars().count() > 1000 {
        return error(StatusCode::BAD_REQUEST, "comment: at most 1000 characters");
    }
    let (view, row, event) = match record_decision(&app, &id, new_state, &body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    // the decision is made (stored, in the book): tell every page, then publish
    app.metrics
        .counter("citystream_control_decisions_total", "Operator decisions on alerts.", &[("decision", new_state)])
        .inc();
    let _ = app.events.send(serde_json::json!({"kind": "decision", "alert": &view}).to_string());
    if let Some(p) = &app.publisher
        && let Err(e) = p.publish(&event, &row).await
    {
        app.metrics
            .counter("citystream_control_publish_failures_total", "Decisions the broker did not take at once.", &[])
            .inc();
        tracing::warn!(alert = %view.alert_id, "decision stored, Kafka publish pending: {e}");
        // recorded and shown; the outbox sends it with the next decision
        return ([("x-citystream-kafka", "pending")], axum::Json(view)).into_response();
    }
    axum::Json(view).into_response()
}

/// Checks and records a decision in the book and the lake (synchronously, under the lock).
fn record_decision(
    app: &App,
    id: &str,
    new_state: &str,
    body: &DecisionBody,
) -> Result<(AlertView, RecordBatch, RecordBatch), Box<Response>> {
    let mut guard = app.book.lock().unwrap_or_else(|e| e.into_inner());
    let book = &mut *guard;
    let Some(a) = book.alerts.get_mut(id) else {
        return Err(Box::new(error(StatusCode::NOT_FOUND, format!("no alert `{id}`"))));
    };
    let allowed = match new_state {
        "acknowledged" => a.state == "open",
        "resolved" => a.state == "open" || a.state == "acknowledged",
        _ => a.state != "false_alarm",
    };
    if !allowed {
        let msg = format!("alert `{id}` is {}: it cannot become {new_state}", a.state);
        return Err(Box::new(error(StatusCode::CONFLICT, msg)));
    }
    let ts = citystream_operators::common::wall_clock_ms();
    let mut view = a.clone();
    view.state = new_state.to_owned();
    view.decisions.push(Decision {
        ts,
        decision: new_state.into(),
        operator: body.operator.clone(),
        comment: body.comment.clone(),
    });
    let row = feedback_row(ts, &view, new_state, &body.operator, &body.comment);
    let event = decision_event(ts, &view, new_state, &body.operator, &body.comment);
    // stored first: a decision the lake does not hold is not made
    if let Some(lake) = &book.feedback
        && let Err(e) = lake.store(&row, &event)
    {
        tracing::error!("feedback table: {e}");
        return Err(Box::new(error(StatusCode::INTERNAL_SERVER_ERROR, "the decision could not be stored")));
    }
    *a = view.clone();
    Ok((view, row, event))
}

/// A one-row UTC timestamp column.
fn one_time(v: i64) -> Arc<dyn Array> {
    Arc::new(TimestampMillisecondArray::from(vec![v]).with_timezone("UTC"))
}

/// A one-row string column.
fn one_str(v: &str) -> Arc<dyn Array> {
    Arc::new(StringArray::from(vec![v]))
}

/// A decision as a lifecycle event in the alert schema (status = the decision).
fn decision_event(ts: i64, a: &AlertView, decision: &str, operator: &str, comment: &str) -> RecordBatch {
    let (t, s) = (one_time, one_str);
    let evidence = serde_json::json!({"decision": decision, "operator": operator, "comment": comment}).to_string();
    RecordBatch::try_new(
        citystream_operators::alert::alert_schema(),
        vec![
            t(ts),
            s(&a.alert_id),
            s(&a.rule),
            s(&a.alert_type),
            s(&a.severity),
            s(&a.location),
            s(decision),
            t(a.opened_at),
            Arc::new(Float64Array::from(vec![a.value])),
            Arc::new(Float64Array::from(vec![a.threshold])),
            Arc::new(Float64Array::from(vec![a.peak])),
            Arc::new(arrow::array::Int32Array::from(vec![a.locations])),
            s(&evidence),
            t(ts),
            s("operator"),
        ],
    )
    .expect("columns match the alert schema")
}

fn feedback_row(ts: i64, a: &AlertView, decision: &str, operator: &str, comment: &str) -> RecordBatch {
    let (t, s) = (one_time, one_str);
    RecordBatch::try_new(
        feedback_schema(),
        vec![
            t(ts),
            s(&a.alert_id),
            s(&a.rule),
            s(&a.alert_type),
            s(&a.location),
            s(decision),
            s(operator),
            s(comment),
            t(a.opened_at),
            Arc::new(Float64Array::from(vec![a.value])),
            Arc::new(Float64Array::from(vec![a.threshold])),
        ],
    )
    .expect("columns match the feedback schema")
}

async fn map_route(State(app): State<App>, ConnectInfo(peer): ConnectInfo<SocketAddr>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&app, &headers, None, peer, Role::Viewer) {
        return *r;
    }
    axum::Json(app.map.as_ref().clone()).into_response()
}

async fn health(State(app): State<App>, ConnectInfo(peer): ConnectInfo<SocketAddr>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&app, &headers, None, peer, Role::Viewer) {
        return *r;
    }
    let m = &app.metrics;
    let lag = m.series("citystream_kafka_consumer_lag");
    axum::Json(serde_json::json!({
        "rows_in": m.series("citystream_stage_rows_in_total"),
        // summed over partitions; absent without a Kafka source
        "kafka_lag": (!lag.is_empty()).then(|| lag.iter().map(|(_, v)| v).sum::<f64>()),
        "dead_letters": m.sum("citystream_dead_letters_total"),
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
    }))
    .into_response()
}

#[derive(Debug, Deserialize)]
struct StreamQuery {
    token: Option<String>,
}

async fn stream(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<StreamQuery>,
) -> Response {
    if let Err(r) = authorize(&app, &headers, q.token.as_deref(), peer, Role::Viewer) {
        return *r;
    }
    let rx = app.events.subscribe();
    let s = futures_util::stream::unfold(rx, |mut rx| async move {
        match rx.recv().await {
            Ok(msg) => Some((Ok::<Event, std::convert::Infallible>(Event::default().data(msg)), rx)),
            // a slow client misses events; it reloads the list on `lagged`
            Err(broadcast::error::RecvError::Lagged(n)) => {
                Some((Ok(Event::default().event("lagged").data(n.to_string())), rx))
            }
            Err(broadcast::error::RecvError::Closed) => None,
        }
    });
    Sse::new(s).keep_alive(KeepAlive::default()).into_response()
}

type Group = (i64, f64, i32, Vec<citystream_operators::alert::Judged>);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CalibrationQuery {
    target_precision: f64,
    max_step: Option<f64>,
    min_judged: Option<usize>,
}

impl CalibrationQuery {
    fn spec(&self) -> Result<citystream_operators::alert::CalibrationSpec, Box<Response>> {
        if !(0.0..=1.0).contains(&self.target_precision) || self.max_step.is_some_and(|s| !(0.0..=0.5).contains(&s)) {
            return Err(Box::new(error(StatusCode::BAD_REQUEST, "target_precision is in 0..1 and max_step in 0..0.5")));
        }
        Ok(citystream_operators::alert::CalibrationSpec {
            target_precision: self.target_precision,
            max_step: self.max_step.unwrap_or(0.05),
            min_judged: self.min_judged.unwrap_or(5),
            slack: 0.1,
        })
    }
}

/// Per rule and location, the proposal from the judged alerts; the current level is the live
/// one when calibration set it, else the threshold of the latest alert.
fn proposals(
    book: &Book,
    board: &ThresholdBoard,
    spec: &citystream_operators::alert::CalibrationSpec,
) -> Vec<(String, String, citystream_operators::alert::Proposal)> {
    // (rule, location) -> (time of the latest alert, its threshold, below-rule votes, judged alerts)
    let mut groups: BTreeMap<(String, String), Group> = BTreeMap::new();
    let mut newest_verdict: BTreeMap<(String, String), i64> = BTreeMap::new();
    for a in book.alerts.values().filter(|a| a.location != "*") {
        let Some(last) = a.decisions.last() else { continue };
        let v = newest_verdict.entry((a.rule.clone(), a.location.clone())).or_insert(i64::MIN);
        *v = (*v).max(last.ts);
        let Some(v) = a.peak.or(a.value) else { continue };
        let g = groups.entry((a.rule.clone(), a.location.clone())).or_insert((i64::MIN, a.threshold, 0, Vec::new()));
        if a.updated_at > g.0 {
            (g.0, g.1) = (a.updated_at, a.threshold);
        }
        g.2 += if v < a.threshold { 1 } else { -1 };
        g.3.push(citystream_operators::alert::Judged { value: v, true_alarm: last.decision != "false_alarm" });
    }
    // a level an applied change moved is proposed again only after new verdicts: without them
    // the same evidence would move it another step at every apply
    let mut moved: BTreeMap<(&str, &str), i64> = BTreeMap::new();
    for ch in book.calibration.history.iter().filter(|c| c.reverted.is_none()) {
        for l in &ch.changes {
            let m = moved.entry((l.rule.as_str(), l.location.as_str())).or_insert(i64::MIN);
            *m = (*m).max(ch.ts);
        }
    }
    groups
        .into_iter()
        .filter(|((rule, loc), _)| {
            moved.get(&(rule.as_str(), loc.as_str())).is_none_or(|m| newest_verdict[&(rule.clone(), loc.clone())] > *m)
        })
        .filter_map(|((rule, loc), (_, latest, below, judged))| {
            let current = board.get(&rule, &loc).unwrap_or(latest);
            citystream_operators::alert::calibrate(current, below > 0, &judged, spec).map(|p| (rule, loc, p))
        })
        .collect()
}

/// Proposed per-location thresholds from the operators' verdicts, per rule (nothing changes:
/// `POST /api/calibration/apply` applies them).
async fn calibration(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    q: Result<Query<CalibrationQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Err(r) = authorize(&app, &headers, None, peer, Role::Viewer) {
        return *r;
    }
    let Ok(Query(q)) = q else {
        return error(StatusCode::BAD_REQUEST, "query: target_precision (0..1), optional max_step and min_judged");
    };
    let spec = match q.spec() {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let props = proposals(&app.book.lock().unwrap_or_else(|e| e.into_inner()), &app.board, &spec);
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
    if let Err(r) = authorize(&app, &headers, None, peer, Role::Viewer) {
        return *r;
    }
    let book = app.book.lock().unwrap_or_else(|e| e.into_inner());
    axum::Json(serde_json::json!({ "live": app.board.all(), "changes": book.calibration.history })).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApplyBody {
    operator: String,
    target_precision: f64,
    max_step: Option<f64>,
    min_judged: Option<usize>,
}

fn check_operator(op: &str) -> Result<(), Box<Response>> {
    if op.is_empty() || op.len() > 64 || !op.chars().all(|c| c.is_ascii_alphanumeric() || "._@-".contains(c)) {
        return Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "operator: 1 to 64 characters of letters, digits and . _ @ -",
        )));
    }
    Ok(())
}

fn calibration_changed(app: &App, kind: &str, change: &CalibrationChange) {
    app.metrics
        .counter("citystream_calibration_changes_total", "Calibrations applied or reverted.", &[("kind", kind)])
        .inc();
    let _ = app.events.send(serde_json::json!({"kind": "calibration", "action": kind, "change": change}).to_string());
}

/// Applies the current proposals live, as one change that can be reverted.
async fn calibration_apply(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Err(r) = authorize(&app, &headers, None, peer, Role::Operator) {
        return *r;
    }
    let b: ApplyBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("body: {e} (expected {{\"operator\": \"...\", \"target_precision\": 0.8}})"),
            );
        }
    };
    if let Err(r) = check_operator(&b.operator) {
        return *r;
    }
    let q = CalibrationQuery { target_precision: b.target_precision, max_step: b.max_step, min_judged: b.min_judged };
    let spec = match q.spec() {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let mut book = app.book.lock().unwrap_or_else(|e| e.into_inner());
    let props = proposals(&book, &app.board, &spec);
    if props.is_empty() {
        return error(StatusCode::CONFLICT, "nothing to change: no location has enough judged alerts off the target");
    }
    let changes: Vec<LevelChange> = props
        .into_iter()
        .map(|(rule, location, p)| LevelChange {
            had_live: app.board.get(&rule, &location).is_some(),
            rule,
            location,
            old: p.old,
            new: p.new,
            precision: p.precision,
            judged: p.judged,
        })
        .collect();
    for l in &changes {
        app.board.set(&l.rule, &l.location, Some(l.new));
        tracing::info!(rule = %l.rule, location = %l.location, old = l.old, new = l.new, operator = %b.operator, "calibration applied");
    }
    let change = CalibrationChange {
        id: book.calibration.history.last().map_or(1, |c| c.id + 1),
        ts: citystream_operators::common::wall_clock_ms(),
        operator: b.operator,
        target_precision: b.target_precision,
        changes,
        reverted: None,
    };
    book.calibration.history.push(change.clone());
    if let Err(e) = book.calibration.save() {
        tracing::error!("{e}");
        return error(StatusCode::INTERNAL_SERVER_ERROR, "applied, but the calibration file could not be written");
    }
    drop(book);
    calibration_changed(&app, "applied", &change);
    axum::Json(change).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RevertBody {
    operator: String,
}

/// Puts back the levels a change replaced (in reverse order, so nested changes unwind).
async fn calibration_revert(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(n): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    if let Err(r) = authorize(&app, &headers, None, peer, Role::Operator) {
        return *r;
    }
    let b: RevertBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("body: {e} (expected {{\"operator\": \"...\"}})")),
    };
    if let Err(r) = check_operator(&b.operator) {
        return *r;
    }
    let Ok(n) = n.parse::<u64>() else {
        return error(StatusCode::BAD_REQUEST, format!("`{n}` is not a change number"));
    };
    let mut book = app.book.lock().unwrap_or_else(|e| e.into_inner());
    let Some(i) = book.calibration.history.iter().position(|c| c.id == n) else {
        return error(StatusCode::NOT_FOUND, format!("no calibration change {n}"));
    };
    if book.calibration.history[i].reverted.is_some() {
        return error(StatusCode::CONFLICT, format!("calibration change {n} is already reverted"));
    }
    // a later change of the same level would be undone silently: refuse, revert that first
    let later = book.calibration.history[i + 1..].iter().filter(|c| c.reverted.is_none()).find(|c| {
        c.changes
            .iter()
            .any(|l| book.calibration.history[i].changes.iter().any(|m| m.rule == l.rule && m.location == l.location))
    });
    if let Some(c) = later {
        return error(StatusCode::CONFLICT, format!("change {} moved the same levels later: revert it first", c.id));
    }
    let ts = citystream_operators::common::wall_clock_ms();
    let change = &mut book.calibration.history[i];
    for l in change.changes.iter().rev() {
        app.board.set(&l.rule, &l.location, l.had_live.then_some(l.old));
        tracing::info!(rule = %l.rule, location = %l.location, from = l.new, to = l.old, operator = %b.operator, "calibration reverted");
    }
    change.reverted = Some((ts, b.operator));
    let change = change.clone();
    if let Err(e) = book.calibration.save() {
        tracing::error!("{e}");
        return error(StatusCode::INTERNAL_SERVER_ERROR, "reverted, but the calibration file could not be written");
    }
    drop(book);
    calibration_changed(&app, "reverted", &change);
    axum::Json(change).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calibration_history_replays_applies_and_reverts_in_the_order_they_happened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("calibration.json");
        let level = |old: f64, new: f64, had_live: bool| LevelChange {
            rule: "r".into(),
            location: "a".into(),
            old,
            new,
            precision: 0.5,
            judged: 5,
            had_live,
        };
        let change = |id: u64, ts: i64, l: LevelChange, reverted: Option<i64>| CalibrationChange {
            id,
            ts,
            operator: "op".into(),
            target_precision: 0.8,
            changes: vec![l],
            reverted: reverted.map(|t| (t, "op".to_owned())),
        };
        // 1 sets 0.93 (no live level before), 2 moves it to 0.96; 2 is reverted, then 1
        let mut c = Calibrations {
            history: vec![
                change(1, 10, level(0.90, 0.93, false), Some(40)),
                change(2, 20, level(0.93, 0.96, true), Some(30)),
            ],
            file: Some(path.clone()),
        };
        c.save().unwrap();
        let board = ThresholdBoard::default();
        Calibrations::load(&path, &board).unwrap();
        assert_eq!(board.get("r", "a"), None, "both reverted: the configured level applies");
        // only 2 reverted: 1's level stands
        c.history[0].reverted = None;
        c.save().unwrap();
        let board = ThresholdBoard::default();
        Calibrations::load(&path, &board).unwrap();
        assert_eq!(board.get("r", "a"), Some(0.93));
    }
}
