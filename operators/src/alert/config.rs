//! YAML of an `alert` stage, the `alerts` table schema, and planning a rule.

use crate::LiveChangeError;
use std::collections::{BTreeMap, HashMap};

use std::sync::{Arc, LazyLock};

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use serde::Deserialize;

use crate::common::{column, columns, time_column};
use crate::road_graph::RoadGraph;
use crate::{BuildContext, Duration, EnvString, Operator, OperatorConfig, OutputSpec, PlanError};

use super::rule::{AlertRule, Events};

/// The most raising values `open_after` may count (a pending alert keeps their times).
const MAX_RAISES: usize = 100;

/// The farthest `join.within` may reach (segments up- or downstream).
const MAX_JOIN_REACH: usize = 10;

/// `join`: a location whose alert would open while an alert of the rule is open at most
/// `within` segments up- or downstream of it joins that alert instead of opening its own (one
/// alert for an incident and the queue it causes on its neighbours).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinConfig {
    /// The road graph CSV (`segment_id,upstream,downstream,...,free_speed_kmh`): the rule's
    /// locations are its segments (a location missing from it joins nothing).
    pub road_graph: EnvString,
    /// How many segments up- or downstream (1 to 10).
    pub within: usize,
}

/// `open_after`: how many raising values, within how long, open a pending alert.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAfter {
    /// Raising values needed (2 to 100).
    pub raises: usize,
    /// The window they must fall within (event time, the latest value's time included).
    pub within: Duration,
}

/// `confirm`: a second detector's alarm makes a minute sure (for `open_on_evidence`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfirmConfig {
    /// A boolean column of the input: the second detector's alarm on the row's location and
    /// minute (the `california7` stage's `incident`, kept beside the score).
    pub column: String,
    /// The level the location's value must have reached, a probability in (0, 1) ...
    pub after: f64,
    /// ... less than this long before the row, or in it (event time).
    pub within: Duration,
}

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
    /// In which order locations' rows are taken (which ones open alerts of their own and
    /// which join the summary depends on it). Default `arrival`.
    #[serde(default)]
    pub order: StormOrder,
}

/// `storm.order`: the order the rule takes rows in when a storm limit joins locations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StormOrder {
    /// As they arrive: at once, but across the partitions of a stream the order (and so the
    /// summary's members) can differ between runs.
    #[default]
    Arrival,
    /// By event time (then location) once the watermark passes them: the same events however
    /// the input was read, at the cost of waiting for the watermark (the global task of
    /// `runtime.tasks: partition` takes its storm-limited rules in this order).
    EventTime,
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
    /// A value at or beyond this level opens a pending alert at once, without waiting for
    /// `min_duration` or the `open_after` count (a persistence test that trusts a very sure
    /// value; `cooldown` still applies). Strictly beyond `raise`; a location whose own
    /// (calibrated) raise level is at or beyond it always waits (`min_duration` or the count).
    /// Default: none.
    #[serde(default)]
    pub open_at_once: Option<f64>,
    /// A persistence test that takes flicker: a pending alert opens once `raises` values at or
    /// beyond the raise level fall within `within` (this one included); values below `clear`
    /// between them do not cancel it, and it lapses when its latest raising value is `within`
    /// old (found on the location's next row; a silent location is resolved by `stale_after`).
    /// A row below `clear` or outside `active_hours` never opens it. Instead of `min_duration`
    /// (setting both is a plan error). Default: none.
    #[serde(default)]
    pub open_after: Option<OpenAfter>,
    /// A persistence test that weighs how sure each value is (Page's CUSUM on log-odds), for a
    /// value that is a probability (a float score in (0, 1), not `below`): a pending alert gathers
    /// `ln(v / (1 - v)) - ln(r / (1 - r))` per row (`r` the location's raise level; the sum
    /// never below 0, where the pending alert lapses, and never above this) and opens once the
    /// sum reaches this. One very sure value can open at once, middling ones in a row open
    /// later, and a value below the raise level takes evidence back; held at this level during
    /// a cooldown, the sum opens the alert when the cooldown ends on a value at about the raise
    /// level, not on any value above `clear`. A row below `clear` or outside `active_hours`
    /// never opens it (outside them a row adds nothing). The sum depends on the rows' order,
    /// so the rule takes rows in event-time order: it needs `join` or `storm.order:
    /// event_time`. Instead of `min_duration`, `open_after` and `open_at_once`. Default: none.
    #[serde(default)]
    pub open_on_evidence: Option<f64>,
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
    /// Join an alert that would open near an open one to it (see [`JoinConfig`]). Rows are
    /// then taken in event-time order, as with `storm.order: event_time`: which of two
    /// neighbours rising in the same minute opens the alert and which joins it must not
    /// depend on how the input was read. Default: none.
    #[serde(default)]
    pub join: Option<JoinConfig>,
    /// With `open_on_evidence`: a row on which `confirm.column` is true (a second detector
    /// alarms) while the location's value reached `confirm.after` less than `confirm.within`
    /// before it, or on it, counts as a sure value (a probability of 1: it opens the pending
    /// alert at once, cooldown permitting, and keeps an open one open); its event carries the
    /// row's own value, as its peak at least the value it was confirmed by and the raise level,
    /// and `confirmed_by` in the evidence. It catches an incident whose score
    /// peaks once and falls away before the sum is gathered, which the second detector then
    /// confirms from its queue. The latest time each location reached the level is part of the
    /// snapshot (a row the watermark had passed before it came is confirmed by that latest time
    /// only; widened live, the window confirms with the reaches it still holds). Default: none.
    #[serde(default)]
    pub confirm: Option<ConfirmConfig>,
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

pub(super) struct Cols {
    pub(super) value: usize,
    pub(super) location: usize,
    pub(super) time: usize,
    pub(super) evidence: Vec<usize>,
    /// `confirm.column`
    pub(super) confirm: Option<usize>,
}

impl AlertConfig {
    /// The columns, and with `join` each segment's neighbours within reach (`joinable`).
    fn check(&self, input: &SchemaRef) -> Result<(Cols, Neighbourhood), Vec<PlanError>> {
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
        if let Some(at_once) = self.open_at_once
            && (!at_once.is_finite() || (!self.below && at_once <= self.raise) || (self.below && at_once >= self.raise))
        {
            errs.push(
                PlanError::new("open_at_once", format!("open_at_once {at_once} is not beyond raise {}", self.raise))
                    .with_help(if self.below {
                        "with `below: true` it must be < raise"
                    } else {
                        "it must be > raise: a value that opens at once has raised, and at raise every alert would skip min_duration"
                    }),
            );
        }
        if let Some(p) = &self.open_after {
            if !(2..=MAX_RAISES).contains(&p.raises) {
                errs.push(
                    PlanError::new("open_after.raises", format!("`raises: {}` is not in 2..={MAX_RAISES}", p.raises))
                        .with_help(
                            "fewer than 2 is no persistence test (leave `open_after` out: a raising value starts an alert); \
                             for more than that, `min_duration` asks a value to hold",
                        ),
                );
            }
            if p.within.as_millis_i64() <= 0 {
                errs.push(PlanError::new("open_after.within", "must be longer than 0s"));
            }
            if self.min_duration.as_millis_i64() > 0 {
                errs.push(
                    PlanError::new("open_after", "`open_after` and `min_duration` are two persistence tests")
                        .with_help("set one: `min_duration` waits for the value to hold, `open_after` counts raising values in a window"),
                );
            }
        }
        if let Some(h) = self.open_on_evidence {
            self.check_evidence(h, value.map(|v| input.field(v).data_type()), &mut errs);
        }
        let confirm = self.confirm.as_ref().and_then(|c| self.check_confirm(c, input, &mut errs));
        let mut near = HashMap::new();
        if let Some(j) = &self.join {
            if !(1..=MAX_JOIN_REACH).contains(&j.within) {
                errs.push(PlanError::new(
                    "join.within",
                    format!("`within: {}` is not in 1..={MAX_JOIN_REACH}", j.within),
                ));
            }
            match joinable(j) {
                Ok(n) => near = n,
                Err(e) => errs.push(PlanError::new("join.road_graph", e).with_help(
                    "`citystream simulate --out DIR` writes the simulated city's graph to DIR/ground_truth/road_graph.csv",
                )),
            }
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
        Ok((Cols { value, location, time, evidence, confirm }, near))
    }

    /// `confirm`: a boolean column, a level in (0, 1), a window longer than 0s, with
    /// `open_on_evidence` (which weighs probabilities in event-time order). The column's index.
    fn check_confirm(&self, c: &ConfirmConfig, input: &SchemaRef, errs: &mut Vec<PlanError>) -> Option<usize> {
        if self.open_on_evidence.is_none() {
            errs.push(
                PlanError::new("confirm", "makes a minute sure for `open_on_evidence`, which this rule does not use")
                    .with_help("set `open_on_evidence`, or leave `confirm` out"),
            );
        }
        if !(c.after.is_finite() && c.after > 0.0 && c.after < 1.0) {
            errs.push(PlanError::new("confirm.after", format!("{} is not a probability in (0, 1)", c.after)));
        }
        if c.within.as_millis_i64() <= 0 {
            errs.push(PlanError::new("confirm.within", "must be longer than 0s"));
        }
        let col = column(input, &c.column, "confirm.column").map_err(|e| errs.push(e)).ok()?;
        let t = input.field(col).data_type();
        if t != &DataType::Boolean {
            errs.push(
                PlanError::new("confirm.column", format!("`{}` is {t}, not a boolean", c.column))
                    .with_help("the second detector's alarm, such as the `california7` stage's `incident`"),
            );
        }
        Some(col)
    }

    /// `open_on_evidence: h`: a level above 0, on probabilities (a floating-point `value` of
    /// type `value_type`), in event-time order, as the only persistence test.
    fn check_evidence(&self, h: f64, value_type: Option<&DataType>, errs: &mut Vec<PlanError>) {
        if !h.is_finite() || h <= 0.0 {
            errs.push(PlanError::new("open_on_evidence", format!("{h} is not a log-odds sum above 0")));
        }
        // a boolean is 0 or 1, an integer at most 0 or at least 1: their log-odds (about -16
        // or 16) would open at once or never
        if let Some(t) = value_type.filter(|t| !t.is_floating()) {
            errs.push(
                PlanError::new(
                    "open_on_evidence",
                    format!("weighs probabilities: `{}` is {t}, not a float", self.value),
                )
                .with_help("for a flag, leave out the persistence test or use `min_duration`"),
            );
        }
        let probability = |r: f64| r > 0.0 && r < 1.0;
        if self.below || !probability(self.raise) || !self.thresholds.values().all(|&r| probability(r)) {
            errs.push(
                PlanError::new("open_on_evidence", "weighs probabilities: raise levels in (0, 1), not `below`")
                    .with_help("for other values, `open_after` counts raising values in a window"),
            );
        }
        if !self.in_event_time_order() {
            errs.push(
                PlanError::new("open_on_evidence", "needs rows in event-time order: the sum depends on their order")
                    .with_help("set `join` or `storm: {order: event_time, ...}`"),
            );
        }
        let others = [
            (self.min_duration.as_millis_i64() > 0, "min_duration"),
            (self.open_after.is_some(), "open_after"),
            (self.open_at_once.is_some(), "open_at_once"),
        ];
        for (_, name) in others.iter().filter(|(set, _)| *set) {
            errs.push(
                PlanError::new(
                    "open_on_evidence",
                    format!("`open_on_evidence` and `{name}` are two persistence tests"),
                )
                .with_help("the sum opens at once on a very sure value: leave the other out"),
            );
        }
    }

    /// Whether the rule takes rows in event-time order (held until the watermark passes them):
    /// with `join` or `storm.order: event_time`.
    pub(super) fn in_event_time_order(&self) -> bool {
        self.join.is_some() || self.storm.as_ref().is_some_and(|s| s.order == StormOrder::EventTime)
    }

    /// Live tuning: levels, durations (`open_after`'s count and window too, `confirm`'s level
    /// and window), the storm limit, active hours, per-location thresholds and severity may
    /// change; the columns (`confirm`'s, or having one, too), the rule's
    /// identity and which persistence test it uses (`min_duration`, `open_after` or
    /// `open_on_evidence`) may not.
    pub fn live_change(&self, new: &AlertConfig) -> Result<(), LiveChangeError> {
        let same = |c: &AlertConfig| {
            (
                c.rule.clone(),
                c.alert_type.clone(),
                c.value.clone(),
                c.location.clone(),
                c.time.clone(),
                c.evidence.clone(),
                c.below,
                c.storm.as_ref().map(|s| s.order),
                // a pending alert's state differs between the two persistence tests
                c.open_after.is_some(),
                c.open_on_evidence.is_some(),
                // the open alerts' members follow the graph they joined by
                c.join.clone(),
                c.confirm.as_ref().map(|c| c.column.clone()),
            )
        };
        if same(self) == same(new) {
            Ok(())
        } else {
            Err(LiveChangeError::NeedsRestart(
                "an alert rule's name, type, columns (confirm's too), direction, storm order, persistence test (min_duration, open_after or open_on_evidence) and join cannot change while running",
            ))
        }
    }

    pub(super) fn configured_raise(&self, location: &str) -> f64 {
        self.thresholds.get(location).copied().unwrap_or(self.raise)
    }
}

impl OperatorConfig for AlertConfig {
    /// Per location; with `join`, a location and its neighbours within reach (an unreadable
    /// graph is reported by `plan`); with `storm`, city-wide.
    fn state_scopes(&self, _input: &SchemaRef) -> Vec<crate::partitioning::StateScope> {
        use crate::partitioning::StateScope;
        let mut s = match &self.join {
            None => vec![StateScope::Keys(vec![self.location.clone()])],
            Some(j) => {
                let near = joinable(j).unwrap_or_default();
                let mut pairs: Vec<(String, String)> =
                    near.iter().flat_map(|(a, ns)| ns.iter().map(|b| (a.clone(), b.clone()))).collect();
                pairs.sort_unstable();
                vec![StateScope::Neighbours { key: self.location.clone(), pairs }]
            }
        };
        if self.storm.is_some() {
            s.push(crate::partitioning::StateScope::City("`storm` limits the alerts open city-wide".into()));
        }
        s
    }

    fn plan(&self, input: &SchemaRef) -> Result<Vec<OutputSpec>, Vec<PlanError>> {
        self.check(input)?;
        Ok(vec![OutputSpec::new("main", alert_schema())])
    }

    fn build(&self, input: &SchemaRef, ctx: &BuildContext) -> Result<Box<dyn Operator>, Vec<PlanError>> {
        let (cols, near) = self.check(input)?;
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
            held: Vec::new(),
            near,
            alerts: HashMap::new(),
            stale_floor: i64::MAX,
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
            reached: HashMap::new(),
        }))
    }
}

/// Per segment of a road graph, the segments within `join`'s reach (in the graph's order).
type Neighbourhood = HashMap<String, Vec<String>>;

/// The neighbourhood of `join`'s road graph.
fn joinable(j: &JoinConfig) -> Result<Neighbourhood, String> {
    let g = RoadGraph::read(std::path::Path::new(j.road_graph.as_str())).map_err(|e| e.to_string())?;
    Ok(g.segments
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let near = g.within(i, j.within).into_iter().map(|n| g.segments[n].segment_id.clone()).collect();
            (s.segment_id.clone(), near)
        })
        .collect())
}
