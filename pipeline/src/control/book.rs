//! The book of alerts: every alert the rules raised, its lifecycle and the operators'
//! decisions, kept in memory for the page and rebuilt from the lake at start.
//!
//! Bounded: a finished alert (resolved or a false alarm, no longer held by its rule) leaves
//! the book `retention` after its last change (event time, against the newest change seen),
//! and beyond `max_alerts` the oldest finished ones leave first. They stay in the lake's
//! `alerts` and `feedback` tables.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, AsArray, Float64Array, RecordBatch, StringArray};
use arrow::datatypes::{Float64Type, Int32Type, TimestampMillisecondType};
use serde::Serialize;

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
    /// Locations in a storm summary.
    pub locations: i32,
    /// What fired it.
    pub evidence: serde_json::Value,
    /// Operator decisions, oldest first.
    pub decisions: Vec<Decision>,
}

impl AlertView {
    fn finished(&self) -> bool {
        !self.active && (self.state == "resolved" || self.state == "false_alarm")
    }
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
}

impl Book {
    pub(crate) fn new(retention_ms: i64, max_alerts: usize) -> Self {
        Self { alerts: HashMap::new(), retention_ms, max_alerts: max_alerts.max(1), newest: i64::MIN, since_evict: 0 }
    }

    /// Applies alert events (the `alert` stages' schema); returns the stream messages of the
    /// changes, in order.
    pub(crate) fn apply(&mut self, batch: &RecordBatch) -> Result<Vec<String>, String> {
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
        let mut messages = Vec::with_capacity(batch.num_rows());
        for i in 0..batch.num_rows() {
            let key = id.value(i).to_owned();
            let status = status.value(i);
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
            self.newest = self.newest.max(a.updated_at);
            messages.push(serde_json::json!({"kind": "alert", "status": status, "alert": &*a}).to_string());
        }
        self.since_evict += batch.num_rows();
        if self.since_evict >= 1024 || self.alerts.len() > self.max_alerts {
            self.evict();
        }
        Ok(messages)
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
    /// decisions (`actor` `operator`) in the order they were emitted, then keeps what the
    /// retention keeps. Returns (alerts, decisions). (Every partition is read: rule events are
    /// partitioned by event time and decisions by when they were made, so after a backlog a
    /// recent decision can refer to an old alert; the table is small, a few rows per alert.)
    pub(crate) fn restore(&mut self, table: &std::path::Path) -> Result<(usize, usize), String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn events(rows: &[(&str, &str, i64)]) -> RecordBatch {
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
}
