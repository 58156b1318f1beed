//! The book of alerts: every alert the rules raised, its lifecycle and the operators'
//! decisions, kept in memory for the page and rebuilt from the lake at start.
//!
//! Bounded: a finished alert (resolved or a false alarm, no longer held by its rule) leaves
//! the book `retention` after its last change (event time, against the newest change seen),
//! and beyond `max_alerts` the oldest finished ones leave first. They stay in the lake's
//! `alerts` and `feedback` tables. An alert keeps at most [`MAX_JOINED`] joined locations.

use super::ControlError;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::array::{Array, AsArray, Float64Array, RecordBatch, StringArray};
use arrow::datatypes::{Float64Type, Int32Type, TimestampMillisecondType};
use serde::Serialize;

/// The most locations that joined one alert the book keeps apart (`AlertView::joined`): a
/// queue spans a few segments, so this many come only from a writer to the alerts topic that
/// is not a rule; the ones beyond it are left out of calibration, and the alert's memory stays
/// bounded whatever that topic carries.
pub(crate) const MAX_JOINED: usize = 256;

/// One operator decision.
#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    /// When (processing time, ms).
    pub ts: i64,
    /// `acknowledged`, `resolved` or `false_alarm`.
    pub decision: String,
    /// Who (the name of the token that made it).
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
    /// Locations in a storm summary or a joined alert.
    pub locations: i32,
    /// With `join`: each location that joined the alert, with its own peak furthest beyond its
    /// raise level, and that level (what calibration judges a rejected alert's members by).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub joined: BTreeMap<String, JoinedLocation>,
    /// What fired it.
    pub evidence: serde_json::Value,
    /// Operator decisions, oldest first.
    pub decisions: Vec<Decision>,
}

/// A location that joined another's alert: its peak furthest beyond its level over all its
/// events in the alert (the rule starts a new peak when a location leaves and joins again; the
/// book keeps the furthest of them), and that level.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct JoinedLocation {
    /// Its peak (the rule's `peak` column on its events).
    pub peak: f64,
    /// Its raise level.
    pub threshold: f64,
}

impl AlertView {
    pub(crate) fn finished(&self) -> bool {
        finished(self.active, &self.state)
    }
}

/// How far a peak lies beyond its raise level, whichever way the rule raises (a peak is at or
/// beyond the level it raised at).
fn beyond(peak: f64, level: f64) -> f64 {
    (peak - level).abs()
}

/// Whether an alert is finished: no longer held by its rule, and resolved or a false alarm.
fn finished(active: bool, state: &str) -> bool {
    !active && (state == "resolved" || state == "false_alarm")
}

/// Whether an operator may move an alert in state `from` to `to` (`acknowledged`, `resolved`
/// or `false_alarm`): open → acknowledged → resolved, and a false alarm from anything but
/// itself.
pub(crate) fn transition_allowed(from: &str, to: &str) -> bool {
    match to {
        "acknowledged" => from == "open",
        "resolved" => from == "open" || from == "acknowledged",
        "false_alarm" => from != "false_alarm",
        _ => false,
    }
}

/// One event of an alerts topic applied to a shared book (see [`Book::apply_log`]).
#[derive(Debug)]
pub(crate) struct Applied {
    /// The stream message of the change; `None` for a decision the book refused.
    pub(crate) message: Option<String>,
    /// For an operator's decision that carries an id: the id, and the alert after it or why
    /// it was refused (a decision made elsewhere came first).
    pub(crate) decision: Option<(String, Result<AlertView, String>)>,
}

/// The lifecycle step of one rule event (shared by [`Book::apply`] and the first pass of
/// [`Book::restore`]): `open` after the alert finished starts it again (returns true);
/// `resolved` ends the rule's hold, and an open or acknowledged alert becomes resolved.
fn step_lifecycle(active: &mut bool, state: &mut String, status: &str) -> bool {
    let reopened = status == "open" && !*active;
    if reopened {
        *active = true;
        *state = "open".into();
    }
    if status == "resolved" {
        *active = false;
        if state == "open" || state == "acknowledged" {
            *state = "resolved".into();
        }
    }
    reopened
}

/// The alerts, bounded (see the module docs).
#[derive(Debug)]
pub(crate) struct Book {
    pub(crate) alerts: HashMap<String, AlertView>,
    retention_ms: i64,
    max_alerts: usize,
    /// The newest change seen (event time).
    newest: i64,
    /// Changes since the last eviction pass.
    since_evict: usize,
    /// A shared book (fed by the alerts topic): decisions on finished alerts are refused, so
    /// that whether one instance already evicted an alert never changes a decision's outcome.
    shared: bool,
}

impl Book {
    pub(crate) fn new(retention_ms: i64, max_alerts: usize) -> Self {
        Self {
            alerts: HashMap::new(),
            retention_ms,
            max_alerts: max_alerts.max(1),
            newest: i64::MIN,
            since_evict: 0,
            shared: false,
        }
    }

    /// A book that several control centers keep from one alerts topic (see [`Book::apply_log`]).
    pub(crate) fn shared(retention_ms: i64, max_alerts: usize) -> Self {
        Self { shared: true, ..Self::new(retention_ms, max_alerts) }
    }

    /// Applies alert events (the `alert` stages' schema); returns the stream messages of the
    /// changes, in order.
    pub(crate) fn apply(&mut self, batch: &RecordBatch) -> Result<Vec<String>, ControlError> {
        self.apply_events(batch, true)
    }

    /// [`apply`](Self::apply), evicting as it goes only when `evict` (a restore evicts once, at
    /// the end, so the outcome does not depend on where eviction passes fell).
    fn apply_events(&mut self, batch: &RecordBatch, evict: bool) -> Result<Vec<String>, ControlError> {
        let col = |n: &str| batch.column_by_name(n).ok_or_else(|| ControlError::MissingColumn(n.to_owned()));
        let s = |n: &str| col(n).map(|c| c.as_string::<i32>());
        let t = |n: &str| col(n).map(|c| c.as_primitive::<TimestampMillisecondType>());
        let f = |n: &str| col(n).map(|c| c.as_primitive::<Float64Type>());
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
        let n_locs = col("locations")?.as_primitive::<Int32Type>();
        let opt = |a: &Float64Array, i: usize| a.is_valid(i).then(|| a.value(i));
        let mut messages = Vec::with_capacity(batch.num_rows());
        for i in 0..batch.num_rows() {
            let key = id.value(i).to_owned();
            let status = status.value(i);
            if self.shared && status != "open" && !self.alerts.contains_key(&key) {
                // a later event of an alert this book never saw open, or evicted when it
                // finished: a book that still holds it keeps it finished, so this one must not
                // start it afresh
                continue;
            }
            let a = self.alerts.entry(key.clone()).or_insert_with(|| AlertView {
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
                joined: BTreeMap::new(),
                evidence: serde_json::Value::Null,
                decisions: Vec::new(),
            });
            // the same id opened again (a re-run of a deterministic simulation, say) after the
            // earlier alert finished: a new alert, not the old one's state
            if step_lifecycle(&mut a.active, &mut a.state, status) {
                (a.opened_at, a.emitted_at) = (opened.value(i), emitted.value(i));
                a.decisions.clear();
                (a.value, a.peak) = (None, None);
                a.joined.clear();
                // as a fresh entry would be (a book that had evicted the old one)
                (a.rule, a.alert_type, a.severity, a.location) = (
                    rule.value(i).to_owned(),
                    ty.value(i).to_owned(),
                    sev.value(i).to_owned(),
                    loc.value(i).to_owned(),
                );
                a.threshold = thr.value(i);
            }
            a.updated_at = ts.value(i);
            let evidence: serde_json::Value = serde_json::from_str(ev.value(i)).unwrap_or(serde_json::Value::Null);
            // with `join`, an event another location made (evidence `location`) carries that
            // location's value and peak: the alert's stay those of the location it opened at
            // (what calibration judges it by), the member's are kept apart. The rule starts a new
            // peak when a location leaves the alert and joins it again: the book keeps each
            // location's furthest beyond its level, whichever way the rule raises
            match evidence.get("location").and_then(|l| l.as_str()) {
                Some(member) if member != a.location => {
                    if let Some(p) = opt(peak, i).or(opt(value, i)) {
                        let now = JoinedLocation { peak: p, threshold: thr.value(i) };
                        if let Some(kept) = a.joined.get_mut(member) {
                            if beyond(now.peak, now.threshold) >= beyond(kept.peak, kept.threshold) {
                                *kept = now;
                            }
                        } else if a.joined.len() < MAX_JOINED {
                            a.joined.insert(member.to_owned(), now);
                        }
                    }
                }
                _ => {
                    a.value = opt(value, i).or(a.value);
                    if let Some(p) = opt(peak, i)
                        && a.peak.is_none_or(|kept| beyond(p, a.threshold) >= beyond(kept, a.threshold))
                    {
                        a.peak = Some(p);
                    }
                }
            }
            a.locations = n_locs.value(i);
            a.evidence = evidence;
            self.newest = self.newest.max(a.updated_at);
            messages.push(serde_json::json!({"kind": "alert", "status": status, "alert": &*a}).to_string());
        }
        self.since_evict += batch.num_rows();
        if evict && (self.since_evict >= 1024 || self.alerts.len() > self.max_alerts) {
            self.evict();
        }
        Ok(messages)
    }

    /// Applies the events of an alerts topic in the topic's order: rule events as
    /// [`apply`](Self::apply) does, and operators' decisions (`actor` `operator`, the verdict
    /// in `evidence`) through the same transitions as a request, so every book fed by one topic
    /// takes the same decisions and refuses the same ones, whichever control center made them.
    pub(crate) fn apply_log(&mut self, batch: &RecordBatch) -> Result<Vec<Applied>, ControlError> {
        let col = |n: &str| batch.column_by_name(n).ok_or_else(|| ControlError::MissingColumn(n.to_owned()));
        let (actor, ids, ev) = (
            col("actor")?.as_string::<i32>(),
            col("alert_id")?.as_string::<i32>(),
            col("evidence")?.as_string::<i32>(),
        );
        let ts = col("ts")?.as_primitive::<TimestampMillisecondType>();
        let mut out = Vec::with_capacity(batch.num_rows());
        for i in 0..batch.num_rows() {
            if actor.value(i) != "operator" {
                let message = self.apply(&batch.slice(i, 1))?.pop();
                out.push(Applied { message, decision: None });
                continue;
            }
            let d: serde_json::Value = serde_json::from_str(ev.value(i)).unwrap_or(serde_json::Value::Null);
            let decision_id = d["decision_id"].as_str().map(str::to_owned);
            let result = self.decide(ids.value(i), ts.value(i), &d);
            if let Err(why) = &result {
                tracing::warn!(
                    alert = ids.value(i),
                    "control center: a decision on the alerts topic is refused: {why}"
                );
            }
            let message = result.as_ref().ok().map(|a| serde_json::json!({"kind": "decision", "alert": a}).to_string());
            out.push(Applied { message, decision: decision_id.map(|id| (id, result)) });
        }
        Ok(out)
    }

    /// Applies one decision (`d`: `decision`, `operator`, `comment`) made at `ts` if the
    /// alert's state allows it; returns the alert after it, or why not.
    fn decide(&mut self, id: &str, ts: i64, d: &serde_json::Value) -> Result<AlertView, String> {
        let text = |k: &str| d[k].as_str().unwrap_or_default().to_owned();
        let verdict = text("decision");
        let a = self.alerts.get_mut(id).ok_or_else(|| format!("no alert `{id}` in the book"))?;
        if self.shared && a.finished() {
            return Err(format!("alert `{id}` is finished ({}, no longer held by its rule)", a.state));
        }
        if !transition_allowed(&a.state, &verdict) {
            return Err(format!("alert `{id}` is {}: it cannot become {verdict}", a.state));
        }
        a.state = verdict.clone();
        a.decisions.push(Decision { ts, decision: verdict, operator: text("operator"), comment: text("comment") });
        Ok(a.clone())
    }

    /// Drops finished alerts older than the retention, then the oldest finished ones beyond
    /// `max_alerts`. Returns how many left.
    pub(crate) fn evict(&mut self) -> usize {
        self.since_evict = 0;
        let before = self.alerts.len();
        let horizon = self.newest.saturating_sub(self.retention_ms);
        self.alerts.retain(|_, a| !(a.finished() && a.updated_at < horizon));
        if self.alerts.len() > self.max_alerts {
            let mut finished: Vec<(i64, String)> =
                self.alerts.values().filter(|a| a.finished()).map(|a| (a.updated_at, a.alert_id.clone())).collect();
            finished.sort_unstable();
            let excess = self.alerts.len() - self.max_alerts;
            for (_, id) in finished.into_iter().take(excess) {
                self.alerts.remove(&id);
            }
            if self.alerts.len() > self.max_alerts {
                tracing::warn!(
                    alerts = self.alerts.len(),
                    max = self.max_alerts,
                    "control center: more alerts are open than `max_alerts`; none of them is dropped"
                );
            }
        }
        if self.alerts.capacity() > 4 * self.alerts.len().max(1024) {
            self.alerts.shrink_to_fit();
        }
        before - self.alerts.len()
    }

    /// Rebuilds the book from an `alerts` table: rule events (`actor` `rule`) and operators'
    /// decisions (`actor` `operator`) in the order they were emitted. Returns (alerts,
    /// decisions).
    ///
    /// Loads only what the retention keeps, in two passes. The first reads ids, times,
    /// statuses and decisions' verdicts (evidence is read batch by batch and only a decision's
    /// verdict kept; no values or names), replays the lifecycle and finds
    /// the alerts the retention would drop; the second reads the whole rows of the others
    /// only and replays them through [`apply`](Self::apply). Every partition is read: rule
    /// events are partitioned by event time and decisions by when they were made, so after a
    /// backlog a recent decision can refer to an old alert.
    pub(crate) fn restore(&mut self, table: &std::path::Path) -> Result<(usize, usize), ControlError> {
        let files: Vec<std::path::PathBuf> = crate::sink::parquet_files_by_dir(table).into_values().flatten().collect();
        // pass 1: per alert, the lifecycle only
        let mut rows: Vec<LifeRow> = Vec::new();
        read_alert_rows(&files, Some(&["alert_id", "status", "ts", "emitted_at", "actor", "evidence"]), |b| {
            let (ids, status, actor, ev) = (
                b.column(0).as_string::<i32>(),
                b.column(1).as_string::<i32>(),
                b.column(4).as_string::<i32>(),
                b.column(5).as_string::<i32>(),
            );
            let (ts, emitted) = (
                b.column(2).as_primitive::<TimestampMillisecondType>(),
                b.column(3).as_primitive::<TimestampMillisecondType>(),
            );
            for i in 0..b.num_rows() {
                // a decision's verdict; one whose evidence is not JSON is skipped, as in pass 2
                let verdict = (actor.value(i) == "operator").then(|| {
                    serde_json::from_str::<serde_json::Value>(ev.value(i))
                        .ok()
                        .map(|d| d["decision"].as_str().unwrap_or_default().to_owned())
                });
                rows.push(LifeRow {
                    emitted: emitted.value(i),
                    ts: ts.value(i),
                    id: ids.value(i).to_owned(),
                    verdict,
                    status: status.value(i).to_owned(),
                });
            }
            Ok(())
        })?;
        if rows.is_empty() {
            return Ok((0, 0));
        }
        // (a stable sort: equal times keep the order the files were read in, as in pass 2)
        rows.sort_by_key(|r| (r.emitted, r.ts));
        let mut life: HashMap<String, (bool, String, i64)> = HashMap::new(); // active, state, updated_at
        let mut newest = i64::MIN;
        for LifeRow { ts, id, verdict, status, .. } in rows {
            match verdict {
                None => {
                    let l = life.entry(id).or_insert_with(|| (true, "open".into(), ts));
                    step_lifecycle(&mut l.0, &mut l.1, &status);
                    l.2 = ts;
                    newest = newest.max(ts);
                }
                Some(None) => {}
                Some(Some(v)) => {
                    if let Some(l) = life.get_mut(&id) {
                        l.1 = v;
                    }
                }
            }
        }
        let horizon = newest.saturating_sub(self.retention_ms);
        let keep: std::collections::HashSet<String> =
            life.into_iter().filter(|(_, (a, s, t))| !(finished(*a, s) && *t < horizon)).map(|(id, _)| id).collect();
        // pass 2: the whole rows of the alerts kept
        let schema = citystream_operators::alert::alert_schema();
        let mut batches = Vec::new();
        read_alert_rows(&files, None, |b| {
            let ids = b.column_by_name("alert_id").expect("alert schema").as_string::<i32>();
            let mask: arrow::array::BooleanArray =
                ids.iter().map(|id| Some(id.is_some_and(|id| keep.contains(id)))).collect();
            let kept = arrow::compute::filter_record_batch(&b, &mask)?;
            if kept.num_rows() > 0 {
                batches.push(kept);
            }
            Ok(())
        })?;
        if batches.is_empty() {
            return Ok((0, 0));
        }
        let all = arrow::compute::concat_batches(&schema, &batches)?;
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
                self.apply_events(&all.slice(i, 1), false)?;
                continue;
            }
            let Ok(d) = serde_json::from_str::<serde_json::Value>(ev.value(i)) else { continue };
            let Some(a) = self.alerts.get_mut(ids.value(i)) else { continue };
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
        self.evict();
        Ok((self.alerts.len(), n))
    }
}

/// One row of a restore's first pass.
struct LifeRow {
    emitted: i64,
    ts: i64,
    id: String,
    /// For a decision, its verdict (`None` when its evidence is not JSON); `None` for a rule event.
    verdict: Option<Option<String>>,
    status: String,
}

/// Reads every file of an `alerts` table batch by batch, in the alert schema's column order
/// (`columns`: only these, in this order), and hands each batch to `each`. Files written before
/// the `actor` column held rule events only.
fn read_alert_rows(
    files: &[std::path::PathBuf],
    columns: Option<&[&str]>,
    mut each: impl FnMut(RecordBatch) -> Result<(), ControlError>,
) -> Result<(), ControlError> {
    let schema = citystream_operators::alert::alert_schema();
    let names: Vec<&str> = match columns {
        Some(c) => c.to_vec(),
        None => schema.fields().iter().map(|f| f.name().as_str()).collect(),
    };
    let out_schema = Arc::new(arrow::datatypes::Schema::new(
        names.iter().map(|n| schema.field_with_name(n).expect("an alert column").clone()).collect::<Vec<_>>(),
    ));
    for f in files {
        let lake = |e: Box<dyn std::error::Error + Send + Sync>| ControlError::Lake { path: f.clone(), source: e };
        let file = std::fs::File::open(f).map_err(|e| lake(e.into()))?;
        let builder =
            parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| lake(e.into()))?;
        let mask = parquet::arrow::ProjectionMask::columns(builder.parquet_schema(), names.iter().copied());
        let reader = builder.with_projection(mask).build().map_err(|e| lake(e.into()))?;
        for b in reader {
            let b = b.map_err(|e| lake(e.into()))?;
            let cols = names
                .iter()
                .map(|name| match b.column_by_name(name) {
                    Some(c) => Ok(c.clone()),
                    None if *name == "actor" => {
                        Ok(Arc::new(StringArray::from_iter_values(std::iter::repeat_n("rule", b.num_rows())))
                            as Arc<dyn Array>)
                    }
                    None => Err(lake(format!("no column `{name}`").into())),
                })
                .collect::<Result<Vec<_>, _>>()?;
            each(RecordBatch::try_new(out_schema.clone(), cols)?)?;
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Rule events of rule `r` (alert id, status, time), each at the location named as its id,
    /// with value and peak 1.0 against a level of 0.5.
    pub(crate) fn events(rows: &[(&str, &str, i64)]) -> RecordBatch {
        let n = rows.len();
        let t = |v: Vec<i64>| -> Arc<dyn Array> {
            Arc::new(arrow::array::TimestampMillisecondArray::from(v).with_timezone("UTC"))
        };
        let s = |v: Vec<&str>| -> Arc<dyn Array> { Arc::new(StringArray::from(v)) };
        RecordBatch::try_new(
            citystream_operators::alert::alert_schema(),
            vec![
                t(rows.iter().map(|r| r.2).collect()),
                s(rows.iter().map(|r| r.0).collect()),
                s(vec!["r"; n]),
                s(vec!["incident"; n]),
                s(vec!["warning"; n]),
                s(rows.iter().map(|r| r.0).collect()),
                s(rows.iter().map(|r| r.1).collect()),
                t(rows.iter().map(|r| r.2).collect()),
                Arc::new(Float64Array::from(vec![Some(1.0); n])),
                Arc::new(Float64Array::from(vec![0.5; n])),
                Arc::new(Float64Array::from(vec![Some(1.0); n])),
                Arc::new(arrow::array::Int32Array::from(vec![1; n])),
                s(vec!["{}"; n]),
                t(rows.iter().map(|r| r.2).collect()),
                s(vec!["rule"; n]),
            ],
        )
        .unwrap()
    }

    /// One rule event of an alert other locations joined (`join`): the location whose event it
    /// is, its value, peak and raise level, and the alert's members after it.
    pub(crate) struct JoinedEvent<'a> {
        pub location: &'a str,
        pub value: f64,
        pub peak: f64,
        pub level: f64,
        pub members: &'a [&'a str],
    }

    /// The rule events of alert `id` of rule `r`, opened at location `at`: an `open`, then
    /// `update`s, `step` ms apart.
    pub(crate) fn joined_events(id: &str, at: &str, step: i64, rows: &[JoinedEvent]) -> RecordBatch {
        let head: Vec<(&str, &str, i64)> =
            (0..rows.len()).map(|i| (id, if i == 0 { "open" } else { "update" }, i as i64 * step)).collect();
        let b = events(&head);
        let mut cols = b.columns().to_vec();
        cols[5] = Arc::new(StringArray::from(vec![at; rows.len()]));
        cols[8] = Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.value)));
        cols[9] = Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.level)));
        cols[10] = Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.peak)));
        cols[11] = Arc::new(arrow::array::Int32Array::from_iter_values(rows.iter().map(|r| r.members.len() as i32)));
        cols[12] = Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| serde_json::json!({"location": r.location, "members": r.members}).to_string()),
        ));
        RecordBatch::try_new(b.schema(), cols).unwrap()
    }

    /// A decision event as a control center produces it to the alerts topic.
    fn decision(id: &str, verdict: &str, who: &str, ts: i64) -> RecordBatch {
        let mut b = events(&[(id, verdict, ts)]);
        let ev = serde_json::json!({"decision": verdict, "operator": who, "comment": "", "decision_id": format!("{who}-{ts}")});
        let mut cols = b.columns().to_vec();
        cols[12] = Arc::new(StringArray::from(vec![ev.to_string()]));
        cols[14] = Arc::new(StringArray::from(vec!["operator"]));
        b = RecordBatch::try_new(b.schema(), cols).unwrap();
        b
    }

    #[test]
    fn a_shared_book_applies_the_first_of_two_conflicting_decisions_and_refuses_decisions_on_finished_alerts() {
        let mut book = Book::shared(86_400_000, 100);
        book.apply_log(&events(&[("a", "open", 0), ("b", "open", 0)])).unwrap();
        let first = book.apply_log(&decision("a", "acknowledged", "anna", 10)).unwrap();
        let second = book.apply_log(&decision("a", "acknowledged", "ben", 11)).unwrap();
        let (id, outcome) = first[0].decision.as_ref().unwrap();
        assert_eq!((id.as_str(), outcome.as_ref().unwrap().state.as_str()), ("anna-10", "acknowledged"));
        let (id, outcome) = second[0].decision.as_ref().unwrap();
        assert_eq!(id, "ben-11");
        assert!(outcome.as_ref().unwrap_err().contains("cannot become acknowledged"), "{outcome:?}");
        assert!(second[0].message.is_none(), "a refused decision changes nothing to stream");
        assert_eq!(book.alerts["a"].decisions.len(), 1);
        // finished (resolved by its rule): refused, whether or not this book still holds it
        book.apply_log(&events(&[("b", "resolved", 20)])).unwrap();
        let late = book.apply_log(&decision("b", "false_alarm", "anna", 30)).unwrap();
        assert!(late[0].decision.as_ref().unwrap().1.as_ref().unwrap_err().contains("finished"));
        book.alerts.remove("b");
        let gone = book.apply_log(&decision("b", "false_alarm", "anna", 31)).unwrap();
        assert!(gone[0].decision.as_ref().unwrap().1.is_err());
        // a late rule event of the evicted alert does not bring it back; its next `open` does,
        // afresh, as on a book that never evicted it
        book.apply_log(&events(&[("b", "resolved", 32)])).unwrap();
        assert!(!book.alerts.contains_key("b"));
        book.apply_log(&events(&[("a", "resolved", 40), ("a", "open", 50)])).unwrap();
        let a = &book.alerts["a"];
        assert!(a.active && a.state == "open" && a.decisions.is_empty() && a.opened_at == 50, "{a:?}");
        // a book fed by a pipeline keeps allowing a false alarm after the rule resolved it
        let mut own = Book::new(86_400_000, 100);
        own.apply(&events(&[("b", "open", 0), ("b", "resolved", 20)])).unwrap();
        assert!(own.decide("b", 30, &serde_json::json!({"decision": "false_alarm"})).is_ok());
    }

    /// An alert other locations joined (`join`): their events update its count and evidence,
    /// not the value and peak of the location it opened at.
    #[test]
    fn a_joined_locations_events_keep_the_alerts_own_value_and_peak() {
        let mut book = Book::new(86_400_000, 100);
        let ev = |location, value, peak, members| JoinedEvent { location, value, peak, level: 0.5, members };
        let b = joined_events(
            "x",
            "x",
            60_000,
            &[ev("x", 0.9, 0.9, &["x"]), ev("m", 0.6, 0.7, &["m", "x"]), ev("x", 0.95, 0.97, &["m", "x"])],
        );
        book.apply(&b).unwrap();
        let a = &book.alerts["x"];
        assert_eq!((a.value, a.peak, a.locations), (Some(0.95), Some(0.97), 2), "{a:?}");
        let mut book = Book::new(86_400_000, 100);
        book.apply(&b.slice(0, 2)).unwrap();
        let a = &book.alerts["x"];
        assert_eq!((a.value, a.peak, a.locations), (Some(0.9), Some(0.9), 2), "m's event: {a:?}");
        assert_eq!(a.evidence["location"], "m", "the evidence is the latest event's");
    }

    /// The rule starts a new peak when a location leaves a joined alert and joins it again: the
    /// book keeps the furthest beyond the level, for the opener and for a member alike.
    #[test]
    fn a_location_that_joins_again_keeps_its_highest_peak() {
        let mut book = Book::new(86_400_000, 100);
        // x opens at 0.95; m joins at 0.8, leaves, joins again at 0.7; x leaves and joins again at 0.9
        let ev = |location, peak, members| JoinedEvent { location, value: peak, peak, level: 0.5, members };
        let b = joined_events(
            "x",
            "x",
            1,
            &[
                ev("x", 0.95, &["x"]),
                ev("m", 0.8, &["m", "x"]),
                ev("m", 0.8, &["x"]),
                ev("m", 0.7, &["m", "x"]),
                ev("x", 0.9, &["m", "x"]),
            ],
        );
        book.apply(&b).unwrap();
        let a = &book.alerts["x"];
        assert_eq!((a.peak, a.joined["m"].peak), (Some(0.95), 0.8), "{a:?}");
        assert_eq!(a.value, Some(0.9), "the value is the latest");
    }

    /// However many locations an alerts topic says joined one alert, the book keeps at most
    /// MAX_JOINED of them apart, and those it keeps still take their peaks.
    #[test]
    fn an_alert_keeps_at_most_max_joined_locations() {
        fn ev(location: &str, peak: f64) -> JoinedEvent<'_> {
            JoinedEvent { location, value: peak, peak, level: 0.5, members: &[] }
        }
        let names: Vec<String> = (0..MAX_JOINED + 50).map(|i| format!("m{i:04}")).collect();
        let mut rows = vec![ev("x", 0.9)];
        rows.extend(names.iter().map(|n| ev(n, 0.6)));
        rows.push(ev(&names[0], 0.8));
        let mut book = Book::new(86_400_000, 100);
        book.apply(&joined_events("x", "x", 1, &rows)).unwrap();
        let a = &book.alerts["x"];
        assert_eq!(a.joined.len(), MAX_JOINED);
        assert_eq!(a.joined[&names[0]].peak, 0.8, "a kept location still takes its peaks");
        assert!(!a.joined.contains_key(&names[MAX_JOINED]), "beyond the cap: not kept");
    }

    #[test]
    fn finished_alerts_leave_after_the_retention_and_beyond_the_cap() {
        let h = 3_600_000;
        let mut book = Book::new(24 * h, 3);
        book.apply(&events(&[("a", "open", 0), ("a", "resolved", h)])).unwrap();
        book.apply(&events(&[("b", "open", 2 * h)])).unwrap();
        assert_eq!(book.evict(), 0, "within the retention");
        book.apply(&events(&[("c", "open", 30 * h)])).unwrap();
        assert_eq!(book.evict(), 1, "a finished 29 h before the newest change");
        assert!(book.alerts.contains_key("b"), "an open alert stays, however old");
        // the cap: finished ones go first, oldest first
        book.apply(&events(&[("d", "open", 31 * h), ("d", "resolved", 31 * h), ("e", "open", 32 * h)])).unwrap();
        book.apply(&events(&[("f", "open", 33 * h)])).unwrap();
        assert_eq!(book.alerts.len(), 3 + 1, "all open but d");
        assert!(!book.alerts.contains_key("d"));
    }

    #[test]
    fn a_restore_loads_what_the_retention_keeps_and_replays_it_as_it_happened() {
        let h = 3_600_000;
        let dir = tempfile::tempdir().unwrap();
        let table = dir.path().join("alerts");
        std::fs::create_dir_all(&table).unwrap();
        let write = |name: &str, batch: &RecordBatch| {
            let f = std::fs::File::create(table.join(name)).unwrap();
            let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), None).unwrap();
            w.write(batch).unwrap();
            w.close().unwrap();
        };
        // a: finished long ago; b: open, however old; c: recent; d: resolved, then reopened
        write(
            "1.parquet",
            &events(&[("a", "open", 0), ("a", "resolved", h), ("b", "open", 2 * h), ("d", "open", 2 * h)]),
        );
        write("2.parquet", &events(&[("d", "resolved", 3 * h), ("c", "open", 30 * h), ("d", "open", 31 * h)]));
        // more rows than an eviction pass: finished long ago (x…) and finished recently (y…)
        let many: Vec<(String, &str, i64)> = (0..700)
            .flat_map(|i| {
                [
                    (format!("x{i}"), "open", 4 * h),
                    (format!("x{i}"), "resolved", 5 * h),
                    (format!("y{i}"), "open", 20 * h),
                    (format!("y{i}"), "resolved", 20 * h + i),
                ]
            })
            .collect();
        let many: Vec<(&str, &str, i64)> = many.iter().map(|(a, b, c)| (a.as_str(), *b, *c)).collect();
        write("3.parquet", &events(&many));
        let mut book = Book::new(24 * h, 10_000);
        let (alerts, _) = book.restore(&table).unwrap();
        let mut ids: Vec<&str> = book.alerts.keys().map(String::as_str).filter(|id| id.len() == 1).collect();
        ids.sort_unstable();
        assert_eq!(ids, ["b", "c", "d"], "a left with the retention");
        assert_eq!(alerts, 3 + 700, "the y… alerts stay, the x… alerts left");
        let d = &book.alerts["d"];
        assert!(d.active && d.state == "open" && d.opened_at == 31 * h, "{d:?}");
        // the same as replaying everything and evicting
        let mut full = Book::new(24 * h, 10_000);
        full.apply(&events(&[("a", "open", 0), ("a", "resolved", h), ("b", "open", 2 * h), ("d", "open", 2 * h)]))
            .unwrap();
        full.apply(&events(&[("d", "resolved", 3 * h), ("c", "open", 30 * h), ("d", "open", 31 * h)])).unwrap();
        full.apply_events(&events(&many), false).unwrap();
        full.evict();
        let mut want: Vec<String> = full.alerts.values().map(|a| format!("{a:?}")).collect();
        let mut got: Vec<String> = book.alerts.values().map(|a| format!("{a:?}")).collect();
        want.sort();
        got.sort();
        assert_eq!(got, want);
    }
}
