//! `alert`: an alert rule over a stream of values per location, emitting alert lifecycle events.
//!
//! Per location a rule moves through idle → pending → open → resolved:
//! - **hysteresis**: a value at or beyond `raise` (the location's own threshold from
//!   `thresholds` when there is one) starts a pending alert; it stays pending (and later open)
//!   while the value stays at or beyond `clear`; `below: true` flips the comparisons (a speed
//!   below a limit);
//! - **minimum duration**: a pending alert opens once it has lasted `min_duration` (event time);
//! - **suppression**: one open alert per location and rule; while open, a new peak is an
//!   `update` of the same alert (at most one per `update_every`), never a new alert;
//! - **cooldown**: after an alert resolves, the location cannot open another for `cooldown`;
//! - **storm limit**: with `storm.max_open`, once that many alerts are open, further locations
//!   join one summarized alert (location `*`, with the count and the member list) instead of
//!   opening their own; it resolves when its last member clears;
//! - **active hours**: with `active_hours: [from, to]` (UTC hours, may wrap midnight), rows
//!   outside them count as clear (noise at night);
//! - **staleness**: a location silent for `stale_after` is resolved, at its last row's time
//!   plus `stale_after` (found when the watermark passes that time, or when the location's next
//!   row comes first).
//!
//! Rows are taken per location in the order they arrive. For rows derived by windows (the
//! model scores) that order is fixed by event time, so the events are the same however the
//! input was read; the storm summary, which joins locations, sees locations in arrival order,
//! which across the partitions of a raw event stream can differ between runs.
//!
//! A location's raise level is, first, the live level on the pipeline's [`ThresholdBoard`]
//! (set by calibration in the control center, without a config edit), then its entry in
//! `thresholds`, then `raise`.
//!
//! Every event carries the triggering value, the threshold, the peak and the `evidence` columns
//! of the row that caused it (model name and checksum, for instance) as JSON, and the processing
//! time it was emitted at, for latency accounting.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, RwLock};

use arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, Int32Array, RecordBatch, StringArray, TimestampMillisecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimestampMillisecondType};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use serde::Deserialize;

use crate::common::{as_f64, column, columns, time_column};
use crate::{
    BuildContext, Collector, Counter, Duration, Gauge, Operator, OperatorConfig, OperatorError, OutputSpec, PlanError,
};

/// How urgent an alert is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// For the record.
    Info,
    /// Look at it.
    Warning,
    /// Act now.
    Critical,
}

impl Severity {
    /// The name written to the output.
    pub fn name(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// The storm limit.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StormConfig {
    /// Most alerts of this rule open at once; more locations join one summarized alert.
    pub max_open: usize,
}

fn d_update_every() -> Duration {
    Duration::from_secs(300)
}
fn d_stale() -> Duration {
    Duration::from_secs(900)
}
fn d_location() -> String {
    "segment_id".into()
}
fn d_time() -> String {
    "window_end".into()
}

/// Live per-location raise levels, per rule, shared by one pipeline's `alert` stages and its
/// control center: calibration writes them, the rules read them (a version number tells a
/// rule when to copy its part again, so a batch costs one atomic load).
#[derive(Debug, Clone, Default)]
pub struct ThresholdBoard {
    levels: Arc<RwLock<BTreeMap<String, BTreeMap<String, f64>>>>,
    version: Arc<AtomicU64>,
}

impl ThresholdBoard {
    /// Sets (`Some`) or removes (`None`) the live raise level of `rule` at `location`.
    pub fn set(&self, rule: &str, location: &str, level: Option<f64>) {
        let mut m = self.levels.write().unwrap_or_else(|e| e.into_inner());
        match level {
            Some(v) => {
                m.entry(rule.to_owned()).or_default().insert(location.to_owned(), v);
            }
            None => {
                if let Some(r) = m.get_mut(rule) {
                    r.remove(location);
                    if r.is_empty() {
                        m.remove(rule);
                    }
                }
            }
        }
        self.version.fetch_add(1, Ordering::Release);
    }

    /// The live level of `rule` at `location`, if one is set.
    pub fn get(&self, rule: &str, location: &str) -> Option<f64> {
        self.levels.read().unwrap_or_else(|e| e.into_inner()).get(rule).and_then(|r| r.get(location)).copied()
    }

    /// Every live level: rule → location → level.
    pub fn all(&self) -> BTreeMap<String, BTreeMap<String, f64>> {
        self.levels.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Changes with every `set`.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    fn rule(&self, rule: &str) -> BTreeMap<String, f64> {
        self.levels.read().unwrap_or_else(|e| e.into_inner()).get(rule).cloned().unwrap_or_default()
    }
}

/// YAML of an `alert` stage.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertConfig {
    /// The rule's name (unique in the pipeline): part of every alert id.
    pub rule: String,
    /// What the alert is about: `incident`, `congestion`, `air_quality`, `noise`, `stalled_vehicle`, ...
    pub alert_type: String,
    /// Its severity.
    pub severity: Severity,
    /// The value column (numeric, or boolean read as 1/0).
    pub value: String,
    /// The location column. Default `segment_id`.
    #[serde(default = "d_location")]
    pub location: String,
    /// The event-time column. Default `window_end`.
    #[serde(default = "d_time")]
    pub time: String,
    /// The raise level.
    pub raise: f64,
    /// The clear level (hysteresis). Default: `raise`.
    #[serde(default)]
    pub clear: Option<f64>,
    /// Alert when the value is at or below the levels instead of at or above.
    #[serde(default)]
    pub below: bool,
    /// How long the value must hold before the alert opens. Default `0s`.
    #[serde(default)]
    pub min_duration: Duration,
    /// After an alert resolves, how long its location stays quiet. Default `0s`.
    #[serde(default)]
    pub cooldown: Duration,
    /// Least time between two updates of an open alert. Default `5m`.
    #[serde(default = "d_update_every")]
    pub update_every: Duration,
    /// A location silent this long behind the watermark is resolved. Default `15m`.
    #[serde(default = "d_stale")]
    pub stale_after: Duration,
    /// The storm limit.
    #[serde(default)]
    pub storm: Option<StormConfig>,
    /// `[from, to]` UTC hours in which the rule applies (`[22, 6]`: at night).
    #[serde(default)]
    pub active_hours: Option<[u8; 2]>,
    /// Per-location raise levels (calibrated from operator feedback), overriding `raise`.
    #[serde(default)]
    pub thresholds: BTreeMap<String, f64>,
    /// Columns copied into each event's evidence.
    #[serde(default)]
    pub evidence: Vec<String>,
}

/// The schema of alert events (every `alert` stage emits it, so they share one table).
pub fn alert_schema() -> SchemaRef {
    static S: LazyLock<SchemaRef> = LazyLock::new(|| {
        let ts = citystream_schemas::timestamp_type;
        Arc::new(Schema::new(vec![
            Field::new("ts", ts(), false),
            Field::new("alert_id", DataType::Utf8, false),
            Field::new("rule", DataType::Utf8, false),
            Field::new("alert_type", DataType::Utf8, false),
            Field::new("severity", DataType::Utf8, false),
            Field::new("location", DataType::Utf8, false),
            Field::new("status", DataType::Utf8, false),
            Field::new("opened_at", ts(), false),
            Field::new("value", DataType::Float64, true),
            Field::new("threshold", DataType::Float64, false),
            Field::new("peak", DataType::Float64, true),
            Field::new("locations", DataType::Int32, false),
            Field::new("evidence", DataType::Utf8, false),
            Field::new("emitted_at", ts(), false),
            // `rule` for the rules' events; the control center writes `operator` decisions
            Field::new("actor", DataType::Utf8, false),
        ]))
    });
    S.clone()
}

struct Cols {
    value: usize,
    location: usize,
    time: usize,
    evidence: Vec<usize>,
}

impl AlertConfig {
    fn check(&self, input: &SchemaRef) -> Result<Cols, Vec<PlanError>> {
        let mut errs = Vec::new();
        let value = column(input, &self.value, "value").map_err(|e| errs.push(e)).ok();
        if let Some(v) = value {
            let t = input.field(v).data_type();
            if !(t.is_numeric() || t == &DataType::Boolean) {
                errs.push(PlanError::new("value", format!("`{}` is {t}, not a number or a boolean", self.value)));
            }
        }
        let location = column(input, &self.location, "location").map_err(|e| errs.push(e)).ok();
        if let Some(l) = location
            && input.field(l).data_type() != &DataType::Utf8
        {
            errs.push(PlanError::new("location", format!("`{}` is not a string column", self.location)));
        }
        let time = time_column(input, &self.time, "time").map_err(|e| errs.push(e)).ok();
        let evidence = columns(input, &self.evidence, "evidence", &mut errs);
        if self.rule.is_empty() || self.rule.contains(char::is_whitespace) {
            errs.push(PlanError::new("rule", "a rule needs a name without spaces (it is part of every alert id)"));
        }
        let clear = self.clear.unwrap_or(self.raise);
        if !self.raise.is_finite() || !clear.is_finite() {
            errs.push(PlanError::new("raise", "raise and clear must be numbers"));
        } else if (!self.below && clear > self.raise) || (self.below && clear < self.raise) {
            errs.push(PlanError::new("clear", format!("clear {clear} is beyond raise {}", self.raise)).with_help(
                if self.below { "with `below: true` clear must be >= raise" } else { "clear must be <= raise" },
            ));
        }
        if let Some(s) = &self.storm
            && s.max_open == 0
        {
            errs.push(PlanError::new("storm.max_open", "must be at least 1"));
        }
        if let Some([a, b]) = self.active_hours
            && (a > 23 || b > 24 || a == b)
        {
            errs.push(PlanError::new("active_hours", "hours are 0..=23 (from) and 0..=24 (to), and differ"));
        }
        let (Some(value), Some(location), Some(time), true) = (value, location, time, errs.is_empty()) else {
            return Err(errs);
        };
        Ok(Cols { value, location, time, evidence })
    }

    /// Live tuning: levels, durations, the storm limit, active hours, per-location thresholds
    /// and severity may change; the columns and the rule's identity may not.
    pub fn live_change(&self, new: &AlertConfig) -> Result<(), String> {
        let same = |c: &AlertConfig| {
            (
                c.rule.clone(),
                c.alert_type.clone(),
                c.value.clone(),
                c.location.clone(),
                c.time.clone(),
                c.evidence.clone(),
                c.below,
            )
        };
        if same(self) == same(new) {
            Ok(())
        } else {
            Err("an alert rule's name, type, columns and direction cannot change while running".into())
        }
    }

    fn configured_raise(&self, location: &str) -> f64 {
        self.thresholds.get(location).copied().unwrap_or(self.raise)
    }
}

impl OperatorConfig for AlertConfig {
    fn plan(&self, input: &SchemaRef) -> Result<Vec<OutputSpec>, Vec<PlanError>> {
        self.check(input)?;
        Ok(vec![OutputSpec::new("main", alert_schema())])
    }

    fn build(&self, input: &SchemaRef, ctx: &BuildContext) -> Result<Box<dyn Operator>, Vec<PlanError>> {
        let cols = self.check(input)?;
        let l =
            |status: &'static str| [("stage", ctx.stage.as_str()), ("rule", self.rule.as_str()), ("status", status)];
        let events =
            |s: &'static str| ctx.metrics.counter("citystream_alert_events_total", "Alert lifecycle events.", &l(s));
        Ok(Box::new(AlertRule {
            cfg: self.clone(),
            cols,
            outputs: vec![OutputSpec::new("main", alert_schema())],
            states: HashMap::new(),
            open: 0,
            storm: None,
            out: Events::default(),
            opened: events("open"),
            updated: events("update"),
            resolved: events("resolved"),
            open_gauge: ctx.metrics.gauge(
                "citystream_alerts_open",
                "Alerts open now (a storm summary counts once).",
                &[("stage", ctx.stage.as_str()), ("rule", self.rule.as_str())],
            ),
            board: ctx.thresholds.clone(),
            board_version: u64::MAX,
            live: BTreeMap::new(),
        }))
    }
}

#[derive(Debug, Clone)]
enum Phase {
    Idle,
    Pending {
        since: i64,
        peak: f64,
    },
    Open {
        id: String,
        opened_at: i64,
        peak: f64,
        /// the peak the last event reported
        reported: f64,
        last_emit: i64,
    },
    /// In the storm summary instead of an alert of its own.
    Storm {
        peak: f64,
    },
}

#[derive(Debug, Clone)]
struct LocState {
    phase: Phase,
    quiet_until: i64,
    last_t: i64,
}

#[derive(Debug)]
struct StormAlert {
    id: String,
    opened_at: i64,
    members: BTreeSet<String>,
    last_emit: i64,
    reported: usize,
}

#[derive(Default)]
struct Events {
    ts: Vec<i64>,
    id: Vec<String>,
    location: Vec<String>,
    status: Vec<&'static str>,
    opened_at: Vec<i64>,
    value: Vec<Option<f64>>,
    threshold: Vec<f64>,
    peak: Vec<Option<f64>>,
    locations: Vec<i32>,
    evidence: Vec<String>,
}

/// The `alert` operator.
pub struct AlertRule {
    cfg: AlertConfig,
    cols: Cols,
    outputs: Vec<OutputSpec>,
    states: HashMap<String, LocState>,
    open: usize,
    storm: Option<StormAlert>,
    out: Events,
    opened: Counter,
    updated: Counter,
    resolved: Counter,
    open_gauge: Gauge,
    board: ThresholdBoard,
    board_version: u64,
    /// This rule's live levels from the board, copied when its version moves.
    live: BTreeMap<String, f64>,
}

impl std::fmt::Debug for AlertRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlertRule").field("rule", &self.cfg.rule).field("open", &self.open).finish_non_exhaustive()
    }
}

/// Whether hour-of-day `h` (UTC) lies in `[from, to)`, wrapping midnight.
fn in_hours(h: u8, [from, to]: [u8; 2]) -> bool {
    if from <= to { h >= from && h < to } else { h >= from || h < to }
}

impl AlertRule {
    /// The raise level at `location`: live (calibrated) level, else configured.
    fn raise_at(&self, location: &str) -> f64 {
        self.live.get(location).copied().unwrap_or_else(|| self.cfg.configured_raise(location))
    }

    fn refresh_levels(&mut self) {
        let v = self.board.version();
        if v != self.board_version {
            self.board_version = v;
            self.live = self.board.rule(&self.cfg.rule);
        }
    }

    /// `v` at or beyond `level` in the rule's direction.
    fn beyond(&self, v: f64, level: f64) -> bool {
        if self.cfg.below { v <= level } else { v >= level }
    }

    #[allow(clippy::too_many_arguments)]
    fn emit(
        &mut self,
        ts: i64,
        id: &str,
        location: &str,
        status: &'static str,
        opened_at: i64,
        value: Option<f64>,
        threshold: f64,
        peak: Option<f64>,
        locations: i32,
        evidence: String,
    ) {
        match status {
            "open" => self.opened.inc(),
            "update" => self.updated.inc(),
            _ => self.resolved.inc(),
        }
        let e = &mut self.out;
        e.ts.push(ts);
        e.id.push(id.to_owned());
        e.location.push(location.to_owned());
        e.status.push(status);
        e.opened_at.push(opened_at);
        e.value.push(value);
        e.threshold.push(threshold);
        e.peak.push(peak);
        e.locations.push(locations);
        e.evidence.push(evidence);
    }

    fn storm_evidence(&self, s: &StormAlert) -> String {
        serde_json::json!({"storm": true, "members": s.members.iter().collect::<Vec<_>>()}).to_string()
    }

    fn storm_join(&mut self, location: &str, t: i64) {
        let rule = self.cfg.rule.clone();
        let s = self.storm.get_or_insert_with(|| StormAlert {
            id: format!("{rule}:*:{t}"),
            opened_at: t,
            members: BTreeSet::new(),
            last_emit: i64::MIN,
            reported: 0,
        });
        s.members.insert(location.to_owned());
        let (first, due) = (s.reported == 0, t.saturating_sub(s.last_emit) >= self.cfg.update_every.as_millis_i64());
        if first || due {
            let s = self.storm.as_mut().expect("just inserted");
            s.last_emit = t;
            s.reported = s.members.len();
            let (id, opened_at, n) = (s.id.clone(), s.opened_at, s.members.len() as i32);
            let ev = self.storm_evidence(self.storm.as_ref().expect("present"));
            self.emit(t, &id, "*", if first { "open" } else { "update" }, opened_at, None, self.cfg.raise, None, n, ev);
        }
    }

    fn storm_leave(&mut self, location: &str, t: i64) {
        let Some(s) = self.storm.as_mut() else { return };
        s.members.remove(location);
        if s.members.is_empty() {
            let s = self.storm.take().expect("present");
            let ev = serde_json::json!({"storm": true, "members": []}).to_string();
            self.emit(t, &s.id, "*", "resolved", s.opened_at, None, self.cfg.raise, None, 0, ev);
        }
    }

    /// Resolves `loc`, silent for `stale_after`, at the moment it went stale (its last row
    /// plus `stale_after`): an event time that does not depend on when the watermark moved or
    /// whether a newer row arrived first.
    fn resolve_stale(&mut self, loc: &str) {
        let stale = self.cfg.stale_after.as_millis_i64();
        let cooldown = self.cfg.cooldown.as_millis_i64();
        let Some(st) = self.states.get_mut(loc) else { return };
        let (phase, last_t) = (std::mem::replace(&mut st.phase, Phase::Idle), st.last_t);
        let at = last_t.saturating_add(stale);
        if matches!(phase, Phase::Open { .. } | Phase::Storm { .. }) {
            // a stale resolve is a resolve: the cooldown applies
            st.quiet_until = at.saturating_add(cooldown);
        }
        let ev = serde_json::json!({"stale": true, "last_seen": last_t}).to_string();
        match phase {
            Phase::Open { id, opened_at, peak, .. } => {
                self.open -= 1;
                let raise = self.raise_at(loc);
                self.emit(at, &id, loc, "resolved", opened_at, None, raise, Some(peak), 1, ev);
            }
            Phase::Storm { .. } => self.storm_leave(loc, at),
            _ => {}
        }
    }

    /// One row: value `v` (None: no reading) at `t` for `loc`.
    fn step(&mut self, loc: &str, t: i64, v: Option<f64>, evidence: impl Fn() -> String) {
        let raise = self.raise_at(loc);
        // a location's own (calibrated) raise level may sit beyond the shared clear level
        let clear = self.cfg.clear.unwrap_or(raise);
        let clear = if self.cfg.below { clear.max(raise) } else { clear.min(raise) };
        let hours_ok =
            self.cfg.active_hours.is_none_or(|h| in_hours(((t.div_euclid(3_600_000)).rem_euclid(24)) as u8, h));
        let Some(v) = v.filter(|v| !v.is_nan()) else { return };
        // a row after a silence longer than `stale_after`: the location went stale first
        if self.states.get(loc).is_some_and(|s| {
            t.saturating_sub(s.last_t) > self.cfg.stale_after.as_millis_i64() && !matches!(s.phase, Phase::Idle)
        }) {
            self.resolve_stale(loc);
        }
        let holds = hours_ok && self.beyond(v, clear);
        let raises = hours_ok && self.beyond(v, raise);
        let better = |a: f64, b: f64| if self.cfg.below { a.min(b) } else { a.max(b) };
        let mut st =
            self.states.remove(loc).unwrap_or(LocState { phase: Phase::Idle, quiet_until: i64::MIN, last_t: t });
        st.last_t = st.last_t.max(t);
        // a value that raises starts a pending alert, which may open on this very row
        let phase = match st.phase {
            Phase::Idle if raises => Phase::Pending { since: t, peak: v },
            p => p,
        };
        st.phase = match phase {
            Phase::Idle => Phase::Idle,
            Phase::Pending { .. } if !holds => Phase::Idle,
            Phase::Pending { since, peak } => {
                let peak = better(peak, v);
                if t - since >= self.cfg.min_duration.as_millis_i64() && t >= st.quiet_until {
                    if self.cfg.storm.as_ref().is_some_and(|s| self.open >= s.max_open) {
                        self.storm_join(loc, t);
                        Phase::Storm { peak }
                    } else {
                        let id = format!("{}:{loc}:{t}", self.cfg.rule);
                        self.open += 1;
                        self.emit(t, &id, loc, "open", t, Some(v), raise, Some(peak), 1, evidence());
                        Phase::Open { id, opened_at: t, peak, reported: peak, last_emit: t }
                    }
                } else {
                    Phase::Pending { since, peak }
                }
            }
            Phase::Open { id, opened_at, peak, .. } if !holds => {
                self.open -= 1;
                st.quiet_until = t + self.cfg.cooldown.as_millis_i64();
                self.emit(t, &id, loc, "resolved", opened_at, Some(v), raise, Some(peak), 1, evidence());
                Phase::Idle
            }
            Phase::Open { id, opened_at, peak, reported, last_emit } => {
                // a peak reached within `update_every` of the last event is reported once the
                // throttle allows, even if the value has come down since
                let peak = better(peak, v);
                if peak != reported && t - last_emit >= self.cfg.update_every.as_millis_i64() {
                    self.emit(t, &id, loc, "update", opened_at, Some(v), raise, Some(peak), 1, evidence());
                    Phase::Open { id, opened_at, peak, reported: peak, last_emit: t }
                } else {
                    Phase::Open { id, opened_at, peak, reported, last_emit }
                }
            }
            Phase::Storm { .. } if !holds => {
                st.quiet_until = t + self.cfg.cooldown.as_millis_i64();
                self.storm_leave(loc, t);
                Phase::Idle
            }
            Phase::Storm { peak } => Phase::Storm { peak: better(peak, v) },
        };
        self.states.insert(loc.to_owned(), st);
    }

    fn finish(&mut self, out: &mut Collector) -> Result<(), OperatorError> {
        self.open_gauge.set((self.open + usize::from(self.storm.is_some())) as f64);
        if self.out.ts.is_empty() {
            return Ok(());
        }
        let e = std::mem::take(&mut self.out);
        let n = e.ts.len();
        let now = crate::common::wall_clock_ms();
        let ts = |v: Vec<i64>| -> ArrayRef { Arc::new(TimestampMillisecondArray::from(v).with_timezone("UTC")) };
        let repeat = |s: &str| -> ArrayRef { Arc::new(StringArray::from_iter_values(std::iter::repeat_n(s, n))) };
        let cols: Vec<ArrayRef> = vec![
            ts(e.ts),
            Arc::new(StringArray::from(e.id)),
            repeat(&self.cfg.rule),
            repeat(&self.cfg.alert_type),
            repeat(self.cfg.severity.name()),
            Arc::new(StringArray::from(e.location)),
            Arc::new(StringArray::from(e.status)),
            ts(e.opened_at),
            Arc::new(Float64Array::from(e.value)),
            Arc::new(Float64Array::from(e.threshold)),
            Arc::new(Float64Array::from(e.peak)),
            Arc::new(Int32Array::from(e.locations)),
            Arc::new(StringArray::from(e.evidence)),
            ts(vec![now; n]),
            repeat("rule"),
        ];
        out.emit(0, RecordBatch::try_new(self.outputs[0].schema.clone(), cols)?);
        Ok(())
    }
}

/// JSON of the evidence columns of row `i` (values as displayed by Arrow), plus the value.
fn evidence_json(batch: &RecordBatch, cols: &[usize], i: usize, value: Option<f64>, raise: f64) -> String {
    let mut m = serde_json::Map::new();
    m.insert("value".into(), value.map_or(serde_json::Value::Null, serde_json::Value::from));
    m.insert("threshold".into(), raise.into());
    let opts = FormatOptions::default();
    for &c in cols {
        let name = batch.schema().field(c).name().clone();
        let v = match ArrayFormatter::try_new(batch.column(c).as_ref(), &opts) {
            Ok(f) if batch.column(c).is_valid(i) => serde_json::Value::from(f.value(i).to_string()),
            _ => serde_json::Value::Null,
        };
        m.insert(name, v);
    }
    serde_json::Value::Object(m).to_string()
}

impl Operator for AlertRule {
    fn kind(&self) -> &'static str {
        "alert"
    }

    fn outputs(&self) -> &[OutputSpec] {
        &self.outputs
    }

    fn process_batch(&mut self, batch: RecordBatch, out: &mut Collector) -> Result<(), OperatorError> {
        self.refresh_levels();
        let col = batch.column(self.cols.value);
        let (values, nulls) = if col.data_type() == &DataType::Boolean {
            let b = col.as_boolean();
            ((0..b.len()).map(|i| if b.value(i) { 1.0 } else { 0.0 }).collect(), b.nulls().cloned())
        } else {
            as_f64(col)?
        };
        let locs = batch.column(self.cols.location).as_string::<i32>();
        let times = batch.column(self.cols.time).as_primitive::<TimestampMillisecondType>();
        let ev_cols = self.cols.evidence.clone();
        for (i, &value) in values.iter().enumerate() {
            if locs.is_null(i) || times.is_null(i) {
                continue;
            }
            let v = nulls.as_ref().is_none_or(|n| n.is_valid(i)).then_some(value);
            let loc = locs.value(i);
            let raise = self.raise_at(loc);
            self.step(loc, times.value(i), v, || evidence_json(&batch, &ev_cols, i, v, raise));
        }
        self.finish(out)
    }

    fn on_watermark(&mut self, watermark: i64, out: &mut Collector) -> Result<(), OperatorError> {
        self.refresh_levels();
        let stale = self.cfg.stale_after.as_millis_i64();
        let mut gone: Vec<(i64, String)> = self
            .states
            .iter()
            .filter(|(_, s)| watermark.saturating_sub(s.last_t) > stale && !matches!(s.phase, Phase::Idle))
            .map(|(k, s)| (s.last_t, k.clone()))
            .collect();
        // in the order they went stale: the storm summary's membership follows it
        gone.sort_unstable();
        for (_, loc) in gone {
            self.resolve_stale(&loc);
        }
        // forget idle locations whose cooldown is over: the map holds active locations only
        self.states.retain(|_, s| !matches!(s.phase, Phase::Idle) || s.quiet_until > watermark);
        self.finish(out)
    }

    fn is_stateful(&self) -> bool {
        true
    }

    /// One row per location (phase `0` idle in cooldown, `1` pending, `2` open, `3` in the
    /// storm summary) and, while a storm summary is open, one row without a location (`9`).
    fn snapshot(&self) -> Result<Option<RecordBatch>, OperatorError> {
        let mut r = StateRows::default();
        let mut locs: Vec<(&String, &LocState)> = self.states.iter().collect();
        locs.sort_unstable_by(|a, b| a.0.cmp(b.0));
        for (loc, st) in locs {
            let (phase, id, since, peak, reported, last_emit) = match &st.phase {
                Phase::Idle => (0, None, None, None, None, None),
                Phase::Pending { since, peak } => (1, None, Some(*since), Some(*peak), None, None),
                Phase::Open { id, opened_at, peak, reported, last_emit } => {
                    (2, Some(id.clone()), Some(*opened_at), Some(*peak), Some(*reported), Some(*last_emit))
                }
                Phase::Storm { peak } => (3, None, None, Some(*peak), None, None),
            };
            r.push(Some(loc.clone()), phase, st.quiet_until, st.last_t, id, since, peak, reported, last_emit);
        }
        if let Some(s) = &self.storm {
            r.push(
                None,
                9,
                0,
                0,
                Some(s.id.clone()),
                Some(s.opened_at),
                None,
                Some(s.reported as f64),
                Some(s.last_emit),
            );
        }
        Ok(Some(r.finish()?))
    }

    fn restore(&mut self, state: RecordBatch) -> Result<(), OperatorError> {
        let bad = |detail: String| OperatorError::State { operator: "alert", detail };
        crate::common::check_state_schema("alert", &state, &alert_state_schema())?;
        let loc = state.column(0).as_string::<i32>();
        let phase = state.column(1).as_primitive::<arrow::datatypes::UInt8Type>();
        let i64s = |c: usize| state.column(c).as_primitive::<arrow::datatypes::Int64Type>().clone();
        let f64s = |c: usize| state.column(c).as_primitive::<arrow::datatypes::Float64Type>().clone();
        let (quiet, last_t, since, last_emit) = (i64s(2), i64s(3), i64s(5), i64s(8));
        let (peak, reported) = (f64s(6), f64s(7));
        let id = state.column(4).as_string::<i32>();
        let opt_i = |a: &arrow::array::Int64Array, i: usize| a.is_valid(i).then(|| a.value(i));
        let opt_f = |a: &Float64Array, i: usize| a.is_valid(i).then(|| a.value(i));
        let missing = |what: &str, i: usize| bad(format!("row {i}: phase {} without {what}", phase.value(i)));
        self.states.clear();
        self.storm = None;
        self.open = 0;
        let mut members = BTreeSet::new();
        for i in 0..state.num_rows() {
            let p = match phase.value(i) {
                0 => Phase::Idle,
                1 => Phase::Pending {
                    since: opt_i(&since, i).ok_or_else(|| missing("since", i))?,
                    peak: opt_f(&peak, i).ok_or_else(|| missing("peak", i))?,
                },
                2 => {
                    self.open += 1;
                    Phase::Open {
                        id: id.is_valid(i).then(|| id.value(i).to_owned()).ok_or_else(|| missing("id", i))?,
                        opened_at: opt_i(&since, i).ok_or_else(|| missing("opened_at", i))?,
                        peak: opt_f(&peak, i).ok_or_else(|| missing("peak", i))?,
                        reported: opt_f(&reported, i).ok_or_else(|| missing("reported", i))?,
                        last_emit: opt_i(&last_emit, i).ok_or_else(|| missing("last_emit", i))?,
                    }
                }
                3 => {
                    members.insert(loc.value(i).to_owned());
                    Phase::Storm { peak: opt_f(&peak, i).ok_or_else(|| missing("peak", i))? }
                }
                9 => {
                    self.storm = Some(StormAlert {
                        id: id.is_valid(i).then(|| id.value(i).to_owned()).ok_or_else(|| missing("id", i))?,
                        opened_at: opt_i(&since, i).ok_or_else(|| missing("opened_at", i))?,
                        members: BTreeSet::new(),
                        last_emit: opt_i(&last_emit, i).ok_or_else(|| missing("last_emit", i))?,
                        reported: opt_f(&reported, i).ok_or_else(|| missing("reported", i))? as usize,
                    });
                    continue;
                }
                p => return Err(bad(format!("row {i}: unknown phase {p}"))),
            };
            if loc.is_null(i) {
                return Err(missing("location", i));
            }
            self.states.insert(
                loc.value(i).to_owned(),
                LocState { phase: p, quiet_until: quiet.value(i), last_t: last_t.value(i) },
            );
        }
        match (&mut self.storm, members.is_empty()) {
            (Some(s), _) => s.members = members,
            (None, false) => return Err(bad("locations in a storm summary, but no summary".into())),
            (None, true) => {}
        }
        self.open_gauge.set((self.open + usize::from(self.storm.is_some())) as f64);
        Ok(())
    }

    fn retune(&mut self, config: &dyn std::any::Any) -> Result<(), String> {
        let c = config.downcast_ref::<AlertConfig>().ok_or("not an alert config")?;
        self.cfg.live_change(c)?;
        self.cfg = c.clone();
        Ok(())
    }
}

fn alert_state_schema() -> SchemaRef {
    static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
        Arc::new(Schema::new(vec![
            Field::new("location", DataType::Utf8, true),
            Field::new("phase", DataType::UInt8, false),
            Field::new("quiet_until", DataType::Int64, false),
            Field::new("last_t", DataType::Int64, false),
            Field::new("id", DataType::Utf8, true),
            Field::new("since", DataType::Int64, true),
            Field::new("peak", DataType::Float64, true),
            Field::new("reported", DataType::Float64, true),
            Field::new("last_emit", DataType::Int64, true),
        ]))
    });
    SCHEMA.clone()
}

/// Columns of an alert rule's snapshot.
#[derive(Default)]
struct StateRows {
    loc: Vec<Option<String>>,
    phase: Vec<u8>,
    quiet: Vec<i64>,
    last_t: Vec<i64>,
    id: Vec<Option<String>>,
    since: Vec<Option<i64>>,
    peak: Vec<Option<f64>>,
    reported: Vec<Option<f64>>,
    last_emit: Vec<Option<i64>>,
}

impl StateRows {
    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        loc: Option<String>,
        phase: u8,
        quiet: i64,
        last_t: i64,
        id: Option<String>,
        since: Option<i64>,
        peak: Option<f64>,
        reported: Option<f64>,
        last_emit: Option<i64>,
    ) {
        self.loc.push(loc);
        self.phase.push(phase);
        self.quiet.push(quiet);
        self.last_t.push(last_t);
        self.id.push(id);
        self.since.push(since);
        self.peak.push(peak);
        self.reported.push(reported);
        self.last_emit.push(last_emit);
    }

    fn finish(self) -> Result<RecordBatch, arrow::error::ArrowError> {
        use arrow::array::{Int64Array, UInt8Array};
        RecordBatch::try_new(
            alert_state_schema(),
            vec![
                Arc::new(StringArray::from(self.loc)),
                Arc::new(UInt8Array::from(self.phase)),
                Arc::new(Int64Array::from(self.quiet)),
                Arc::new(Int64Array::from(self.last_t)),
                Arc::new(StringArray::from(self.id)),
                Arc::new(Int64Array::from(self.since)),
                Arc::new(Float64Array::from(self.peak)),
                Arc::new(Float64Array::from(self.reported)),
                Arc::new(Int64Array::from(self.last_emit)),
            ],
        )
    }
}

/// One alert an operator judged: the value that raised it (its peak) and the verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct Judged {
    /// The alert's peak value.
    pub value: f64,
    /// Acknowledged or resolved: a true alarm; marked false alarm: not.
    pub true_alarm: bool,
}

/// How thresholds follow operator feedback.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalibrationSpec {
    /// The share of alerts operators should confirm.
    pub target_precision: f64,
    /// Largest move per calibration, as a share of the threshold's magnitude. Default 0.05.
    #[serde(default = "d_max_step")]
    pub max_step: f64,
    /// Fewer judged alerts than this leave a location alone. Default 5.
    #[serde(default = "d_min_judged")]
    pub min_judged: usize,
    /// Above `target_precision + slack` the threshold is lowered (half a step) to catch more.
    /// Default 0.1.
    #[serde(default = "d_slack")]
    pub slack: f64,
}

fn d_max_step() -> f64 {
    0.05
}
fn d_min_judged() -> usize {
    5
}
fn d_slack() -> f64 {
    0.1
}

/// A proposed threshold for one location, with why.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Proposal {
    /// The threshold now.
    pub old: f64,
    /// The proposed one (bounded by `max_step`).
    pub new: f64,
    /// Share of judged alerts confirmed.
    pub precision: f64,
    /// How many were judged.
    pub judged: usize,
}

/// Moves a location's raise level toward the precision target from operator verdicts: when too
/// many alerts are false alarms, up to the least level at which the judged alerts beyond it reach
/// the target (at most `max_step`); when nearly all are confirmed, down half a step. `below`
/// rules move the other way. `None` when there is too little feedback or nothing to change.
pub fn calibrate(current: f64, below: bool, judged: &[Judged], spec: &CalibrationSpec) -> Option<Proposal> {
    if judged.len() < spec.min_judged.max(1) {
        return None;
    }
    let confirmed = judged.iter().filter(|j| j.true_alarm).count();
    let precision = confirmed as f64 / judged.len() as f64;
    let step = spec.max_step * current.abs().max(1e-9);
    // in "above" terms: a higher level is stricter
    let (dir, cur) = if below { (-1.0, -current) } else { (1.0, current) };
    let target = if precision < spec.target_precision {
        let mut vals: Vec<(f64, bool)> = judged.iter().map(|j| (dir * j.value, j.true_alarm)).collect();
        vals.sort_by(|a, b| a.0.total_cmp(&b.0));
        // the least level whose alerts at or beyond it reach the target
        let reach = (0..vals.len()).find(|&i| {
            let rest = &vals[i..];
            rest.iter().filter(|v| v.1).count() as f64 / rest.len() as f64 >= spec.target_precision
        });
        let level = reach.map_or(cur + step, |i| vals[i].0.max(cur));
        level.min(cur + step)
    } else if precision >= spec.target_precision + spec.slack {
        cur - step / 2.0
    } else {
        return None;
    };
    let new = dir * target;
    (new != current).then_some(Proposal { old: current, new, precision, judged: judged.len() })
}
