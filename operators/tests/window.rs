mod util;

use citystream_operators::Collector;
use citystream_operators::window::{WindowConfig, quantile};
use proptest::prelude::*;
use util::*;

const CFG: &str = "\
key: [sensor_id]
size: 1m
aggregates:
  - {fn: count, as: n}
  - {fn: sum, column: flow, as: vehicles}
  - {fn: mean, column: value}
  - {fn: min, column: value}
  - {fn: max, column: value}
  - {fn: quantile, column: value, q: 0.85, as: p85}
  - {fn: weighted_mean, column: value, weight: flow, as: wmean}
  - {fn: rate_per_hour, column: flow, as: flow_h}
  - {fn: count_above, column: value, above: 2.5, as: exceed}
";

fn rw(sensor: &str, ts: i64, value: Option<f64>, flow: i32) -> Reading {
    Reading { id: format!("{sensor}{ts}"), sensor: sensor.into(), ts, value, flow }
}

#[test]
fn tumbling_aggregates_on_crafted_data() {
    let cfg: WindowConfig = yaml(CFG);
    let mut op = build(&cfg);
    let out = run(
        op.as_mut(),
        &[
            vec![rw("a", 1_000, Some(1.0), 10), rw("a", 2_000, Some(3.0), 30), rw("b", 5_000, None, 0)],
            vec![rw("a", 59_999, Some(2.0), 0), rw("a", 61_000, Some(9.0), 1)],
        ],
        0,
    );
    let b = &out.ports[0];
    let all = arrow::compute::concat_batches(&b[0].schema(), b).unwrap();
    assert_eq!(all.num_rows(), 3, "a and b in the first minute, a in the second");
    assert_eq!(col_i64(&all, "n"), [3, 1, 1]);
    assert_eq!(col_f64(&all, "vehicles"), [Some(40.0), Some(0.0), Some(1.0)]);
    assert_eq!(col_f64(&all, "mean_value"), [Some(2.0), None, Some(9.0)]);
    assert_eq!(col_f64(&all, "min_value"), [Some(1.0), None, Some(9.0)]);
    assert_eq!(col_f64(&all, "max_value"), [Some(3.0), None, Some(9.0)]);
    // numpy.quantile([1, 2, 3], 0.85) = 2.7
    assert!((col_f64(&all, "p85")[0].unwrap() - 2.7).abs() < 1e-6);
    // (1*10 + 3*30) / 40; the zero-flow reading has no weight
    assert_eq!(col_f64(&all, "wmean")[0], Some(2.5));
    assert_eq!(col_f64(&all, "flow_h")[0], Some(40.0 * 60.0));
    assert_eq!(col_i64(&all, "exceed"), [1, 0, 1]);
}

#[test]
fn late_rows_go_aside_and_lateness_is_allowed() {
    let cfg: WindowConfig = yaml(&format!("{CFG}allowed_lateness: 30s\n"));
    let mut op = build(&cfg);
    let mut c = Collector::new(2);
    op.process_batch(batch(&[rw("a", 1_000, Some(1.0), 1)]), &mut c).unwrap();
    op.on_watermark(80_000, &mut c).unwrap();
    assert!(c.port(0).is_empty(), "the window [0, 60 s) waits until 90 s");
    op.process_batch(batch(&[rw("a", 2_000, Some(2.0), 1)]), &mut c).unwrap();
    op.on_watermark(90_000, &mut c).unwrap();
    assert_eq!(col_i64(&c.port(0)[0], "n"), [2], "the row within the allowed lateness counts");
    op.process_batch(batch(&[rw("a", 3_000, Some(2.0), 1)]), &mut c).unwrap();
    assert_eq!(c.port(1).len(), 1, "after the window was emitted the row is late");
}

#[test]
fn hop_windows_count_each_row_size_over_slide_times() {
    let cfg: WindowConfig = yaml("size: 15m\nslide: 5m\naggregates: [{fn: count}]\n");
    let mut op = build(&cfg);
    let out = run(op.as_mut(), &[vec![rw("a", 16 * 60_000, Some(1.0), 1)]], 0);
    let starts: Vec<i64> = out.ports[0]
        .iter()
        .flat_map(|b| {
            b.column(0).as_any().downcast_ref::<arrow::array::TimestampMillisecondArray>().unwrap().values().to_vec()
        })
        .collect();
    assert_eq!(starts, [5 * 60_000, 10 * 60_000, 15 * 60_000]);
}

#[test]
fn bad_configs_are_plan_errors() {
    let cfg: WindowConfig = yaml("size: 10m\nslide: 3m\naggregates: [{fn: quantile, column: valu}]\n");
    let errs = citystream_operators::OperatorConfig::plan(&cfg, &schema()).unwrap_err();
    let text = format!("{errs:?}");
    assert!(text.contains("must be positive and divide"), "{text}");
    assert!(text.contains("did you mean `value`"), "{text}");
    assert!(text.contains("`quantile` needs `q`"), "{text}");
}

#[test]
fn snapshot_and_restore_give_the_uninterrupted_result() {
    let cfg: WindowConfig = yaml(CFG);
    let rows: Vec<Reading> = (0..200)
        .map(|i| rw(["a", "b", "c"][i % 3], (i as i64 * 7_919) % 300_000, Some((i % 17) as f64), (i % 5) as i32))
        .collect();
    let whole = run(build(&cfg).as_mut(), std::slice::from_ref(&rows), 1_000_000);
    let mut first = build(&cfg);
    let mut c = Collector::new(2);
    first.process_batch(batch(&rows[..90]), &mut c).unwrap();
    let snap = first.snapshot().unwrap().unwrap();
    let mut second = build(&cfg);
    second.restore(snap).unwrap();
    let rest = run(second.as_mut(), &[rows[90..].to_vec()], 1_000_000);
    let a = arrow::compute::concat_batches(&whole.ports[0][0].schema(), &whole.ports[0]).unwrap();
    let b = arrow::compute::concat_batches(&rest.ports[0][0].schema(), &rest.ports[0]).unwrap();
    assert_eq!(a.num_rows(), b.num_rows());
    let sort = |x: &arrow::array::RecordBatch| {
        let cols: Vec<arrow::compute::SortColumn> =
            (0..3).map(|c| arrow::compute::SortColumn { values: x.column(c).clone(), options: None }).collect();
        let idx = arrow::compute::lexsort_to_indices(&cols, None).unwrap();
        arrow::compute::take_record_batch(x, &idx).unwrap()
    };
    assert_eq!(sort(&a), sort(&b));
}

proptest! {
    /// Every aggregate equals a naive recomputation over the same events, whatever the order
    /// and batching.
    #[test]
    fn aggregates_equal_a_naive_recomputation(
        events in proptest::collection::vec((0..3u8, 0..600_000i64, proptest::option::of(0.0..100.0f64), 0..20i32), 1..150),
        split in 1usize..40,
    ) {
        let rows: Vec<Reading> = events.iter().enumerate()
            .map(|(i, (s, t, v, f))| Reading { id: i.to_string(), sensor: format!("s{s}"), ts: *t, value: v.map(|x| (x * 1e3).round() / 1e3), flow: *f })
            .collect();
        let cfg: WindowConfig = yaml(&CFG.replace("size: 1m", "size: 2m"));
        let batches: Vec<Vec<Reading>> = rows.chunks(split).map(<[Reading]>::to_vec).collect();
        let out = run(build(&cfg).as_mut(), &batches, 10_000_000);
        prop_assert_eq!(out.rows(1), 0);
        let all = arrow::compute::concat_batches(&out.ports[0][0].schema(), &out.ports[0]).unwrap();
        let starts = all.column(0).as_any().downcast_ref::<arrow::array::TimestampMillisecondArray>().unwrap();
        let sensors = all.column(2).as_any().downcast_ref::<arrow::array::StringArray>().unwrap();
        let mut groups = std::collections::BTreeSet::new();
        for i in 0..all.num_rows() {
            let (start, sensor) = (starts.value(i), sensors.value(i));
            groups.insert((start, sensor.to_owned()));
            let members: Vec<&Reading> = rows.iter().filter(|r| r.sensor == sensor && r.ts.div_euclid(120_000) * 120_000 == start).collect();
            let vals: Vec<f64> = members.iter().filter_map(|r| r.value).collect();
            prop_assert_eq!(col_i64(&all, "n")[i], members.len() as i64);
            prop_assert_eq!(col_f64(&all, "vehicles")[i], Some(members.iter().map(|r| f64::from(r.flow)).sum::<f64>()));
            let mean = (!vals.is_empty()).then(|| vals.iter().sum::<f64>() / vals.len() as f64);
            let close = |a: Option<f64>, b: Option<f64>| match (a, b) { (Some(a), Some(b)) => (a - b).abs() <= 1e-6 * (1.0 + b.abs()), (None, None) => true, _ => false };
            prop_assert!(close(col_f64(&all, "mean_value")[i], mean));
            prop_assert_eq!(col_f64(&all, "min_value")[i], vals.iter().copied().reduce(f64::min));
            prop_assert_eq!(col_f64(&all, "max_value")[i], vals.iter().copied().reduce(f64::max));
            let as32: Vec<f32> = vals.iter().map(|v| *v as f32).collect();
            prop_assert!(close(col_f64(&all, "p85")[i], quantile(&as32, 0.85)));
            let (wv, w) = members.iter().filter(|r| r.value.is_some() && r.flow > 0)
                .fold((0.0, 0.0), |(a, b), r| (a + f64::from(r.flow) * r.value.unwrap(), b + f64::from(r.flow)));
            prop_assert!(close(col_f64(&all, "wmean")[i], (w > 0.0).then(|| wv / w)));
            prop_assert_eq!(col_i64(&all, "exceed")[i], vals.iter().filter(|v| **v > 2.5).count() as i64);
        }
        let expected: std::collections::BTreeSet<(i64, String)> = rows.iter().map(|r| (r.ts.div_euclid(120_000) * 120_000, r.sensor.clone())).collect();
        prop_assert_eq!(groups, expected);
    }
}

#[test]
fn keys_forgotten_between_their_windows_give_the_same_rows() {
    // 2,500 keys, each back every 225 s: a key's window has closed (and the key is forgotten)
    // before it comes back; one batch with no watermark until the end forgets nothing
    let rows: Vec<Reading> =
        (0..20_000i64).map(|i| rw(&format!("s{}", (i * 7) % 2_500), i * 90, Some((i % 13) as f64), 1)).collect();
    let live: Vec<Vec<Reading>> = rows.chunks(100).map(<[Reading]>::to_vec).collect();
    let once = rendered(std::slice::from_ref(&rows));
    assert_eq!(once.len(), 20_000, "every row its own key and minute");
    assert_eq!(rendered(&live), once);
}

/// The window rows (every column as text) of `batches` run with a watermark after each.
fn rendered(batches: &[Vec<Reading>]) -> Vec<String> {
    let cfg: WindowConfig = yaml(CFG);
    let out = run(build(&cfg).as_mut(), batches, 60_000);
    let opts = arrow::util::display::FormatOptions::default();
    let mut lines = Vec::new();
    for b in &out.ports[0] {
        let f: Vec<_> = b
            .columns()
            .iter()
            .map(|c| arrow::util::display::ArrayFormatter::try_new(c.as_ref(), &opts).unwrap())
            .collect();
        for r in 0..b.num_rows() {
            lines.push(f.iter().map(|x| x.value(r).to_string()).collect::<Vec<_>>().join("|"));
        }
    }
    lines
}

proptest! {
    /// The same readings of several sensors interleaved and batched differently (as a backlog
    /// and a live run read partitions) give the same rows, bit for bit and in the same order.
    #[test]
    fn the_output_does_not_depend_on_interleaving_or_batching(
        values in proptest::collection::vec((0..4u8, 0..300_000i64, 0.0..200.0f64, 0..40i32), 1..300),
        split_a in 1usize..40,
        split_b in 1usize..40,
        seed in any::<u64>(),
    ) {
        let rows: Vec<Reading> = values
            .iter()
            .map(|(s, t, v, f)| rw(&format!("s{s}"), *t, Some(*v * 1.000_000_1), *f))
            .collect();
        // per sensor the order stays (a sensor is one partition); sensors interleave freely
        let mut a = rows.clone();
        a.sort_by_key(|r| r.ts);
        let mut b = rows.clone();
        b.sort_by_key(|r| (r.ts / 60_000, (r.sensor.as_bytes()[1] as u64 ^ seed) % 7, r.ts));
        let chunks = |v: &[Reading], n: usize| v.chunks(n).map(<[Reading]>::to_vec).collect::<Vec<_>>();
        prop_assert_eq!(rendered(&chunks(&a, split_a)), rendered(&chunks(&b, split_b)));
    }
}
