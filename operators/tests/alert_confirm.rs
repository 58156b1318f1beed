//! `confirm` of an `open_on_evidence` alert rule: a second detector's alarm (a boolean column)
//! makes a minute sure while the location's score reached the level lately. Crafted streams,
//! taken in event-time order, across arrival orders and snapshots.

mod util;

use std::sync::Arc;

use arrow::array::{AsArray, BooleanArray, RecordBatch};
use arrow::datatypes::{DataType, Field, Float64Type, Schema, SchemaRef, TimestampMillisecondType};
use citystream_operators::alert::AlertConfig;
use citystream_operators::{BuildContext, Collector, Operator, OperatorConfig, PlanError};

const MIN: i64 = 60_000;

/// The rule: raise 0.9 (log-odds 2.197), a sum of 3.98 opens (one minute at 0.99 adds 2.398, at
/// 0.98 1.695; at 0.3 it takes 3.044 back), confirmed after 0.97 within 2 minutes.
const RULE: &str = "rule: incident_model\nalert_type: incident\nseverity: critical\nvalue: score\n\
                    evidence: [model]\nraise: 0.9\nclear: 0.5\nopen_on_evidence: 3.98\ncooldown: 10m\n\
                    storm: {max_open: 10, order: event_time}\n";
const CONFIRM: &str = "confirm: {column: alarm, after: 0.97, within: 2m}\n";

/// (location, minute, score, the second detector's alarm)
type Row = (&'static str, i64, Option<f64>, bool);

fn schema() -> SchemaRef {
    let alarm = Field::new("alarm", DataType::Boolean, true);
    Arc::new(Schema::new([util::score_fields(), vec![alarm]].concat()))
}

fn batch(rows: &[Row]) -> RecordBatch {
    let scores: Vec<(&str, i64, Option<f64>)> = rows.iter().map(|r| (r.0, r.1, r.2)).collect();
    let mut columns = util::score_columns(&scores);
    columns.push(Arc::new(BooleanArray::from(rows.iter().map(|r| r.3).collect::<Vec<_>>())));
    RecordBatch::try_new(schema(), columns).unwrap()
}

fn config(extra: &str) -> AlertConfig {
    serde_saphyr::from_str(&format!("{RULE}{extra}")).unwrap()
}

fn rule(extra: &str) -> Box<dyn Operator> {
    config(extra).build(&schema(), &BuildContext::default()).unwrap()
}

/// (location, status, minute, value, evidence, peak) of every event, in order.
type Event = (String, String, i64, f64, serde_json::Value, f64);

fn drained(out: &mut Collector) -> Vec<Event> {
    let mut v = Vec::new();
    for (_, b) in out.drain() {
        let loc = b.column_by_name("location").unwrap().as_string::<i32>();
        let status = b.column_by_name("status").unwrap().as_string::<i32>();
        let ts = b.column_by_name("ts").unwrap().as_primitive::<TimestampMillisecondType>();
        let value = b.column_by_name("value").unwrap().as_primitive::<Float64Type>();
        let ev = b.column_by_name("evidence").unwrap().as_string::<i32>();
        let peak = b.column_by_name("peak").unwrap().as_primitive::<Float64Type>();
        for i in 0..b.num_rows() {
            let e = serde_json::from_str(ev.value(i)).unwrap();
            let (l, s) = (loc.value(i).to_owned(), status.value(i).to_owned());
            v.push((l, s, ts.value(i) / MIN, value.value(i), e, peak.value(i)));
        }
    }
    v
}

/// `rows` in batches of 3, a watermark after every other batch; with `cut`, the snapshot after
/// that batch restored into a new rule.
fn fed(extra: &str, rows: &[Row], cut: Option<usize>) -> Vec<Event> {
    let batches = util::in_batches(rows, 3, |r| r.1, batch);
    drained(&mut util::fed_in_batches(rule(extra), || rule(extra), batches, 2, cut))
}

fn series(loc: &'static str, values: &[(f64, bool)]) -> Vec<Row> {
    values.iter().enumerate().map(|(m, &(v, a))| (loc, m as i64, Some(v), a)).collect()
}

fn rows() -> Vec<Row> {
    let mut rows = Vec::new();
    // 0.98 at 1 (1.695: pending), the alarm at 2 a minute later: sure, opens on a score of 0.3
    rows.extend(series("peak", &[(0.2, false), (0.98, false), (0.3, true), (0.2, false)]));
    // the same alarm two minutes after the peak: too late (0.3 at 2 lapsed the pending alert)
    rows.extend(series("late", &[(0.98, false), (0.3, false), (0.3, true), (0.2, false)]));
    // a peak below 0.97 confirms nothing
    rows.extend(series("low", &[(0.96, false), (0.3, true), (0.3, true), (0.2, false)]));
    // 0.999 opens at 0 (4.71); the alarm at 1 keeps it open on 0.3; it resolves at 2
    rows.extend(series("kept", &[(0.999, false), (0.3, true), (0.3, false), (0.2, false)]));
    // an alarm on the minute of the peak: the row itself reached the level
    rows.extend(series("same", &[(0.1, false), (0.97, true), (0.1, false)]));
    // a row without a score changes nothing, and reaches nothing
    rows.extend([("none", 0, None, true), ("none", 1, Some(0.3), true)]);
    rows
}

fn lifecycle(events: &[Event]) -> Vec<(String, i64)> {
    events.iter().filter(|e| e.1 != "update").map(|e| (format!("{} {}", e.0, e.1), e.2)).collect()
}

#[test]
fn an_alarm_soon_after_a_sure_score_opens_at_once_and_keeps_an_alert_open() {
    let mut by_minute = rows();
    by_minute.sort_by_key(|r| (r.1, r.0));
    let events = fed(CONFIRM, &by_minute, None);
    let at = |s: &str, m: i64| (s.to_owned(), m);
    // taken by minute, then location
    let expected = [
        at("kept open", 0),
        at("same open", 1),
        at("kept resolved", 2),
        at("peak open", 2),
        at("same resolved", 2),
        at("peak resolved", 3),
    ];
    assert_eq!(lifecycle(&events), expected, "{events:?}");
    // the event carries the row's own score, which column confirmed it, and as its peak the
    // score it was confirmed by (calibration judges an alert by its peak)
    let peak = events.iter().find(|e| e.0 == "peak" && e.1 == "open").unwrap();
    assert_eq!((peak.3, &peak.4["confirmed_by"], peak.5), (0.3, &serde_json::json!("alarm"), 0.98));
    assert!(events.iter().filter(|e| e.0 != "peak" && e.0 != "same").all(|e| e.4.get("confirmed_by").is_none()));
    // without `confirm` the scores alone open only `kept` (and `same` does not open on 0.97)
    let alone = fed("", &by_minute, None);
    assert_eq!(lifecycle(&alone), vec![at("kept open", 0), at("kept resolved", 1)], "{alone:?}");
    // rows in event-time order: by location, and restored after any batch, the same events
    for cut in 0..by_minute.len() / 3 {
        assert_eq!(fed(CONFIRM, &rows(), Some(cut)), events, "by location, restored after batch {cut}");
        assert_eq!(fed(CONFIRM, &by_minute, Some(cut)), events, "restored after batch {cut}");
    }
}

/// A confirmed alert's peak is at least its raise level (it raised against it), even when the
/// score it was confirmed by and its own row's are below it: calibration judges an alert by its
/// peak, and one below the level would count as a `below` rule's.
#[test]
fn a_confirmed_alerts_peak_is_at_least_its_level() {
    let low = "confirm: {column: alarm, after: 0.85, within: 2m}\n";
    // 0.87 reaches 0.85 (below the raise level, 0.9: no pending alert), the alarm confirms 0.3
    let events = fed(low, &series("a", &[(0.87, false), (0.3, true), (0.2, false)]), None);
    let open = events.iter().find(|e| e.1 == "open").expect("confirmed");
    assert_eq!((open.2, open.3, open.5), (1, 0.3, 0.9), "{events:?}");
}

/// The time a location reached the level is in the snapshot (phase 11) while it can still
/// confirm a row after the watermark, and forgotten after.
#[test]
fn the_latest_sure_minute_is_kept_in_the_snapshot_until_the_window_passes() {
    let reached = |op: &dyn Operator| -> Vec<(String, i64)> {
        let s = op.snapshot().unwrap().unwrap();
        let (loc, phase) = (s.column(0).as_string::<i32>(), s.column(1).as_primitive::<arrow::datatypes::UInt8Type>());
        let t = s.column(3).as_primitive::<arrow::datatypes::Int64Type>();
        (0..s.num_rows())
            .filter(|&i| phase.value(i) == 11)
            .map(|i| (loc.value(i).to_owned(), t.value(i) / MIN))
            .collect()
    };
    let mut op = rule(CONFIRM);
    let mut out = Collector::new(1);
    op.process_batch(batch(&[("a", 0, Some(0.98), false), ("b", 0, Some(0.5), false)]), &mut out).unwrap();
    op.on_watermark(0, &mut out).unwrap();
    assert_eq!(reached(op.as_ref()), vec![("a".to_owned(), 0)]);
    op.process_batch(batch(&[("a", 1, Some(0.3), false)]), &mut out).unwrap();
    op.on_watermark(MIN, &mut out).unwrap();
    assert_eq!(reached(op.as_ref()), vec![("a".to_owned(), 0)], "a row at 1:59 may still be confirmed");
    // restored, it confirms the alarm a minute later
    let mut restored = rule(CONFIRM);
    restored.restore(op.snapshot().unwrap().unwrap()).unwrap();
    restored.process_batch(batch(&[("a", 1, Some(0.3), true)]), &mut out).unwrap();
    restored.on_end(&mut out).unwrap();
    // (its peak the restored reach's score)
    assert!(drained(&mut out).iter().any(|e| e.0 == "a" && e.1 == "open" && e.5 == 0.98));
    op.on_watermark(2 * MIN, &mut out).unwrap();
    assert_eq!(reached(op.as_ref()), vec![], "two minutes behind the watermark");
    // a rule without `confirm` keeps none from a snapshot that has them
    let mut op = rule(CONFIRM);
    op.process_batch(batch(&[("a", 0, Some(0.98), false)]), &mut out).unwrap();
    op.on_watermark(0, &mut out).unwrap();
    let mut plain = rule("");
    plain.restore(op.snapshot().unwrap().unwrap()).unwrap();
    assert_eq!(reached(plain.as_ref()), vec![]);
}

#[test]
fn confirm_needs_open_on_evidence_a_boolean_column_a_probability_and_a_window() {
    let errs = |yaml: &str| -> Vec<PlanError> {
        serde_saphyr::from_str::<AlertConfig>(yaml).unwrap().plan(&schema()).err().unwrap_or_default()
    };
    let has = |errs: Vec<PlanError>, key: &str, part: &str| {
        assert!(errs.iter().any(|e| e.key == key && e.message.contains(part)), "{key} {part}: {errs:?}");
    };
    config(CONFIRM).plan(&schema()).unwrap();
    let without = RULE.replace("open_on_evidence: 3.98\n", "");
    has(errs(&format!("{without}{CONFIRM}")), "confirm", "`open_on_evidence`");
    has(
        errs(&format!("{RULE}confirm: {{column: score, after: 0.97, within: 2m}}\n")),
        "confirm.column",
        "not a boolean",
    );
    has(errs(&format!("{RULE}confirm: {{column: alarms, after: 0.97, within: 2m}}\n")), "confirm.column", "alarms");
    has(errs(&format!("{RULE}confirm: {{column: alarm, after: 1.0, within: 2m}}\n")), "confirm.after", "probability");
    has(errs(&format!("{RULE}confirm: {{column: alarm, after: 0.97, within: 0s}}\n")), "confirm.within", "0s");
    // live: the level and the window may change, the column (or having one) may not
    let live = config(CONFIRM);
    assert!(live.live_change(&config("confirm: {column: alarm, after: 0.99, within: 5m}\n")).is_ok());
    assert!(live.live_change(&config("")).is_err());
}
