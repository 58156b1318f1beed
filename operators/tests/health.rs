mod util;

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::{TimestampMillisecondType, UInt32Type};
use citystream_operators::health::SensorHealthConfig;
use citystream_operators::{Collector, Metrics, Operator, OperatorConfig};
use rand::{Rng, SeedableRng};
use util::*;

const S: i64 = 1000;
const M: i64 = 60 * S;

/// A `health` row: (sensor, ts, status, readings, event_id kept from the latest row).
type Health = (String, i64, String, u32, String);

fn health_rows(batches: &[RecordBatch]) -> Vec<Health> {
    batches
        .iter()
        .flat_map(|b| {
            let s = b.column_by_name("sensor_id").unwrap().as_string::<i32>();
            let id = b.column_by_name("event_id").unwrap().as_string::<i32>();
            let ts = b.column_by_name("ts").unwrap().as_primitive::<TimestampMillisecondType>();
            let st = b.column_by_name("status").unwrap().as_string::<i32>();
            let n = b.column_by_name("readings").unwrap().as_primitive::<UInt32Type>();
            let faulty = b.column_by_name("faulty").unwrap().as_primitive::<arrow::datatypes::Float64Type>();
            (0..b.num_rows())
                .map(|i| {
                    assert_eq!(faulty.value(i), if st.value(i) == "ok" { 0.0 } else { 1.0 });
                    (s.value(i).to_owned(), ts.value(i), st.value(i).to_owned(), n.value(i), id.value(i).to_owned())
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

fn config(extra: &str) -> SensorHealthConfig {
    yaml(&format!(
        "key: [sensor_id]\nvalues: [value, flow]\nkeep: [event_id]\nstuck_after: 5\nsilent_after: 2m\n{extra}"
    ))
}

fn reading(sensor: &str, i: i64, value: f64, flow: i32) -> Reading {
    Reading { id: format!("{sensor}-{i}"), sensor: sensor.into(), ts: i * 30 * S, value: Some(value), flow }
}

/// Everything emitted when `rows` arrive in `cuts` batches, with the watermark moved after
/// those batches for which `watermark_after` says so: as far as the contract allows, just
/// before the oldest row still to come (at the end, to the newest row).
fn feed(op: &mut dyn Operator, rows: &[Reading], cuts: &[usize], watermark_after: impl Fn(usize) -> bool) -> Out {
    let mut c = Collector::new(op.outputs().len());
    let mut from = 0;
    for (i, &to) in cuts.iter().chain([rows.len()].iter()).enumerate() {
        if to > from {
            op.process_batch(batch(&rows[from..to]), &mut c).unwrap();
            from = to;
        }
        if watermark_after(i) {
            let newest = rows[..from].iter().map(|r| r.ts).max().unwrap_or(0);
            let wm = rows[from..].iter().map(|r| r.ts - 1).min().unwrap_or(newest);
            op.on_watermark(wm, &mut c).unwrap();
        }
    }
    let mut out = Out { ports: vec![Vec::new(); op.outputs().len()] };
    for (p, b) in c.drain() {
        out.ports[p].push(b);
    }
    out
}

#[test]
fn a_stuck_loop_is_withheld_from_the_reading_that_makes_it_stuck_until_it_changes() {
    let m = Metrics::new();
    let mut op = build_with(&config(""), &m);
    let mut rows = Vec::new();
    for i in 0..20 {
        rows.push(reading("moving", i, 50.0 + i as f64, 3));
        // `frozen` repeats 0.4 / 3 from reading 2 to 14, then moves again
        let v = if (2..15).contains(&i) { 0.4 } else { 0.1 * i as f64 };
        rows.push(reading("frozen", i, v, 3));
    }
    let out = feed(op.as_mut(), &rows, &[7, 19, 30], |_| true);
    let withheld: Vec<String> = out.readings(1).into_iter().map(|r| r.id).collect();
    // the 5th identical reading (index 6) makes it stuck; index 15 differs
    assert_eq!(withheld, (6..15).map(|i| format!("frozen-{i}")).collect::<Vec<_>>());
    assert_eq!(out.rows(0) + out.rows(1), rows.len(), "every row comes out once");
    assert!(out.readings(0).iter().all(|r| !withheld.contains(&r.id)));
    assert_eq!(
        health_rows(&out.ports[2]),
        vec![
            ("frozen".into(), 6 * 30 * S, "stuck".into(), 5, "frozen-6".into()),
            ("frozen".into(), 15 * 30 * S, "ok".into(), 1, "frozen-15".into()),
        ]
    );
    let text = m.render();
    assert!(text.contains("citystream_sensor_health_withheld_total{stage=\"test\"} 9"), "{text}");
    assert!(text.contains("citystream_sensor_health_changes_total{stage=\"test\",status=\"stuck\"} 1"), "{text}");
}

#[test]
fn an_empty_road_repeating_zeros_is_not_stuck() {
    let mut op = build(&config(""));
    let rows: Vec<Reading> = (0..40).map(|i| reading("night", i, 0.0, 0)).collect();
    let mut rows_with_nulls = rows.clone();
    rows_with_nulls.iter_mut().for_each(|r| r.value = None);
    let out = feed(op.as_mut(), &rows, &[], |_| true);
    assert_eq!((out.rows(0), out.rows(1), out.rows(2)), (40, 0, 0));
    let mut op = build(&config(""));
    let out = feed(op.as_mut(), &rows_with_nulls, &[], |_| true);
    assert_eq!((out.rows(0), out.rows(1), out.rows(2)), (40, 0, 0));
}

#[test]
fn silence_is_reported_once_at_the_last_reading_plus_silent_after() {
    let mut op = build(&config(""));
    // `gap` says nothing from reading 4 to reading 12 (4 minutes: more than 2m), then speaks
    let rows: Vec<Reading> = (0..20)
        .flat_map(|i| {
            let mut v = vec![reading("steady", i, i as f64, 1)];
            if !(5..12).contains(&i) {
                v.push(reading("gap", i, i as f64, 2));
            }
            v
        })
        .collect();
    let out = feed(op.as_mut(), &rows, &(1..rows.len()).collect::<Vec<_>>(), |_| true);
    assert_eq!(
        health_rows(&out.ports[2]),
        vec![
            ("gap".into(), 4 * 30 * S + 2 * M, "silent".into(), 0, "gap-4".into()),
            ("gap".into(), 12 * 30 * S, "ok".into(), 1, "gap-12".into()),
        ]
    );
    assert_eq!(out.rows(0), rows.len(), "silence withholds nothing");
}

/// Readings of several devices: steady ones, a stuck one, one silent for a while, one retired
/// for longer than `forget_after` that comes back, one stuck then silent; arriving slightly out
/// of order.
fn city(seed: u64) -> Vec<Reading> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut rows = Vec::new();
    for i in 0..400 {
        for s in 0..4 {
            rows.push(reading(&format!("steady-{s}"), i, rng.random_range(0.0..100.0), rng.random_range(0..20)));
        }
        let stuck = (100..160).contains(&i);
        rows.push(reading("loop", i, if stuck { 7.5 } else { i as f64 }, 4));
        if !(200..230).contains(&i) {
            rows.push(reading("flaky", i, i as f64, 1));
        }
        if !(50..300).contains(&i) {
            rows.push(reading("retired", i, i as f64, 1));
        }
        if i < 80 {
            rows.push(reading("dying", i, if i > 60 { 3.0 } else { i as f64 }, 2));
        }
    }
    // out of order by up to 5 positions (each device's own order is what it is: the same in
    // every run below)
    for i in 0..rows.len() - 5 {
        let j = i + rng.random_range(0..5);
        rows.swap(i, j);
    }
    rows
}

#[test]
fn the_same_readings_give_the_same_rows_live_as_a_backlog_and_across_a_restore() {
    let rows = city(3);
    let cfg = config("forget_after: 1h\n");
    let all = |out: &Out| {
        let mut h = health_rows(&out.ports[2]);
        h.sort();
        (out.readings(0).into_iter().map(|r| r.id).collect::<Vec<_>>(), out.readings(1), h)
    };
    // live: a watermark after every reading
    let live = all(&feed(build(&cfg).as_mut(), &rows, &(1..rows.len()).collect::<Vec<_>>(), |_| true));
    let (_, stuck, health) = &live;
    let statuses: Vec<(&str, &str)> = health.iter().map(|h| (h.0.as_str(), h.2.as_str())).collect();
    for expected in [("loop", "stuck"), ("loop", "ok"), ("flaky", "silent"), ("flaky", "ok"), ("retired", "silent")] {
        assert!(statuses.contains(&expected), "{expected:?} in {statuses:?}");
    }
    assert!(statuses.contains(&("dying", "stuck")) && statuses.contains(&("dying", "silent")), "{statuses:?}");
    assert!(!statuses.contains(&("retired", "ok")), "a forgotten device comes back as new: {statuses:?}");
    assert!(!stuck.is_empty());
    // a backlog: big batches, the watermark only at the end
    let backlog = all(&feed(build(&cfg).as_mut(), &rows, &[700, 1500, 2200], |i| i == 3));
    assert_eq!(live, backlog, "backlog");
    // random batches and random watermarks
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    for _ in 0..5 {
        let mut cuts: Vec<usize> = (0..30).map(|_| rng.random_range(1..rows.len())).collect();
        cuts.sort_unstable();
        cuts.dedup();
        let marks: Vec<bool> = (0..=cuts.len()).map(|_| rng.random_bool(0.3)).collect();
        let mut op = build(&cfg);
        let mut out = feed(op.as_mut(), &rows, &cuts, |i| marks[i] || i == cuts.len());
        assert_eq!(live, all(&out), "cuts {cuts:?}");
        // and a restore half-way: snapshot, a new operator, the rest
        let half = cuts[cuts.len() / 2];
        let mut first = build(&cfg);
        let mark = rng.random_bool(0.5);
        out = feed(first.as_mut(), &rows[..half], &[half / 2], |i| mark || i == 0);
        let state = first.snapshot().unwrap().unwrap();
        let mut second = build(&cfg);
        second.restore(state).unwrap();
        let rest = feed(second.as_mut(), &rows[half..], &[100, 900], |i| i == 2);
        for (p, batches) in rest.ports.into_iter().enumerate() {
            out.ports[p].extend(batches);
        }
        assert_eq!(live, all(&out), "restored at {half}");
    }
}

#[test]
fn a_device_heard_fewer_than_min_readings_times_is_forgotten_without_a_row() {
    let mut op = build(&config("min_readings: 3\n"));
    // `once` speaks once, `twice` twice, `often` three times; then the watermark moves an hour
    let mut rows = vec![reading("once", 0, 1.0, 1), reading("twice", 0, 1.0, 1), reading("twice", 1, 2.0, 1)];
    rows.extend((0..3).map(|i| reading("often", i, i as f64, 1)));
    rows.sort_by_key(|r| r.ts);
    let m = Metrics::new();
    let mut op2 = build_with(&config("min_readings: 3\n"), &m);
    for op in [&mut op, &mut op2] {
        let mut out = feed(op.as_mut(), &rows, &[], |_| true);
        assert_eq!(out.rows(2), 0);
        let mut c = Collector::new(3);
        op.on_watermark(2 * 30 * S + 60 * M, &mut c).unwrap();
        out.ports[2].extend(c.drain().map(|(_, b)| b));
        let silent: Vec<String> = health_rows(&out.ports[2]).into_iter().map(|h| h.0).collect();
        assert_eq!(silent, ["often"]);
    }
    // all three are gone once their horizons passed: the unheard after silent_after (2m),
    // `often` after silent_after + forget_after (7d)
    assert_eq!(m.value("citystream_sensor_health_devices", &[("stage", "test")]), Some(1.0));
}

#[test]
fn bad_configs_are_refused_with_help() {
    let refused = |extra: &str| {
        let cfg: SensorHealthConfig = yaml(&format!("key: [sensor_id]\nvalues: [value]\n{extra}"));
        format!("{:?}", cfg.plan(&schema()).unwrap_err())
    };
    assert!(refused("stuck_after: 1").contains("at least 2 identical readings"));
    assert!(refused("keep: [sensor_id]").contains("is a key column"));
    assert!(refused("keep: [segment]").contains("no column `segment`"));
    assert!(refused("forget_after: 0s").contains("forget_after"));
    assert!(refused("min_readings: 0").contains("at least 1"));
    let cfg: SensorHealthConfig = yaml("key: [sensor_id]\nvalues: [valeu]\n");
    assert!(format!("{:?}", cfg.plan(&schema()).unwrap_err()).contains("did you mean `value`?"));
    let cfg: SensorHealthConfig = yaml("key: []\nvalues: []\n");
    let e = format!("{:?}", cfg.plan(&schema()).unwrap_err());
    assert!(e.contains("name at least one key column") && e.contains("name the measurements"), "{e}");
    let cfg: SensorHealthConfig = yaml("key: [sensor_id]\nvalues: [value]\ntime_column: flow\n");
    assert!(format!("{:?}", cfg.plan(&schema()).unwrap_err()).contains("not a millisecond timestamp"));
}
