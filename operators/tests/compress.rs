mod util;

use citystream_operators::compress::CompressConfig;
use proptest::prelude::*;
use util::*;

fn cfg(method: &str, abs: f64, rel: f64) -> CompressConfig {
    yaml(&format!("key: [sensor_id]\nfields:\n  value: {{method: {method}, abs: {abs}, rel: {rel}}}\nmax_gap: 1h\n"))
}

/// Reconstructs every input reading from the kept ones of its series by linear interpolation
/// and returns the worst (error / tolerance) ratio.
fn worst_ratio(input: &[Reading], kept: &[Reading], abs: f64, rel: f64) -> f64 {
    let mut worst: f64 = 0.0;
    for r in input {
        let mut series: Vec<&Reading> = kept.iter().filter(|k| k.sensor == r.sensor).collect();
        series.sort_by_key(|k| k.ts);
        let v = r.value.unwrap();
        let tol = abs.max(rel * v.abs());
        let after = series.iter().position(|k| k.ts >= r.ts).expect("a kept reading at or after every reading");
        let b = series[after];
        let rec = if b.ts == r.ts {
            b.value.unwrap()
        } else {
            let a = series[after.checked_sub(1).expect("a kept reading before")];
            let (av, bv) = (a.value.unwrap(), b.value.unwrap());
            av + (bv - av) * (r.ts - a.ts) as f64 / (b.ts - a.ts) as f64
        };
        worst = worst.max((rec - v).abs() / tol);
    }
    worst
}

#[test]
fn a_sudden_change_is_never_smoothed_away() {
    // a flat speed, then an incident's drop: the last reading before it and the first after
    // are both kept
    let rows: Vec<Reading> =
        (0..60).map(|i| r(&i.to_string(), "s", i * 10_000, if i < 30 { 80.0 } else { 15.0 })).collect();
    for method in ["swinging_door", "deadband"] {
        let out = run(build(&cfg(method, 2.0, 0.0)).as_mut(), std::slice::from_ref(&rows), 0);
        let kept: Vec<i64> = out.readings(0).iter().map(|r| r.ts).collect();
        assert!(kept.contains(&290_000) && kept.contains(&300_000), "{method}: {kept:?}");
        assert!(kept.len() <= 6, "{method}: flat stretches compress: {kept:?}");
    }
}

#[test]
fn a_smooth_ramp_compresses_far_more_with_the_swinging_door() {
    let rows: Vec<Reading> =
        (0..1000).map(|i| r(&i.to_string(), "s", i * 1000, i as f64 * 0.1 + (i % 3) as f64 * 0.01)).collect();
    let sdt = run(build(&cfg("swinging_door", 0.05, 0.0)).as_mut(), std::slice::from_ref(&rows), 0).rows(0);
    let db = run(build(&cfg("deadband", 0.05, 0.0)).as_mut(), std::slice::from_ref(&rows), 0).rows(0);
    assert!(sdt * 20 < rows.len(), "swinging door keeps {sdt} of {}", rows.len());
    assert!(db > sdt * 5, "deadband cannot follow a slope: {db} vs {sdt}");
}

#[test]
fn nulls_are_kept() {
    let mut rows: Vec<Reading> = (0..10).map(|i| r(&i.to_string(), "s", i * 1000, 1.0)).collect();
    rows[5].value = None;
    let out = run(build(&cfg("swinging_door", 1.0, 0.0)).as_mut(), &[rows], 0);
    assert!(out.readings(0).iter().any(|r| r.value.is_none()));
}

#[test]
fn a_zero_tolerance_is_a_plan_error() {
    let c = cfg("deadband", 0.0, 0.0);
    let e = citystream_operators::OperatorConfig::plan(&c, &schema()).unwrap_err();
    assert!(format!("{e:?}").contains("has no tolerance"), "{e:?}");
}

fn series() -> impl Strategy<Value = Vec<Reading>> {
    // random walks with occasional jumps, two sensors, irregular spacing, delivered in a
    // shuffled order within the watermark bound
    proptest::collection::vec((0..2u8, 1..30_000i64, -5.0..5.0f64, proptest::bool::weighted(0.05)), 2..200).prop_map(
        |steps| {
            let mut t = [0i64; 2];
            let mut v = [50.0f64; 2];
            steps
                .into_iter()
                .enumerate()
                .map(|(i, (s, dt, dv, jump))| {
                    let s = s as usize;
                    t[s] += dt;
                    v[s] += if jump { dv * 20.0 } else { dv };
                    Reading {
                        id: i.to_string(),
                        sensor: format!("s{s}"),
                        ts: t[s],
                        value: Some((v[s] * 1000.0).round() / 1000.0),
                        flow: 1,
                    }
                })
                .collect()
        },
    )
}

proptest! {
    #[test]
    fn interpolating_kept_rows_reconstructs_every_reading_within_tolerance(
        rows in series(),
        abs in 0.01..5.0f64,
        rel in prop_oneof![Just(0.0), 0.001..0.1f64],
        deadband in any::<bool>(),
        split in 1usize..50,
        shuffle_seed in any::<u64>(),
    ) {
        let method = if deadband { "deadband" } else { "swinging_door" };
        // deliver out of order within 60 s; the watermark trails by 60 s
        let mut delivered = rows.clone();
        delivered.sort_by_key(|r| r.ts + ((r.ts as u64 ^ shuffle_seed) % 60_000) as i64);
        let batches: Vec<Vec<Reading>> = delivered.chunks(split).map(<[Reading]>::to_vec).collect();
        let out = run(build(&cfg(method, abs, rel)).as_mut(), &batches, 60_000);
        prop_assert_eq!(out.rows(1), 0, "nothing was late");
        let kept = out.readings(0);
        let worst = worst_ratio(&rows, &kept, abs, rel);
        prop_assert!(worst <= 1.0 + 1e-9, "{method}: worst error {worst} x tolerance");
    }
}

/// Feeds `batches` (a watermark `lag` behind the newest ts after each), snapshotting and
/// restoring into a fresh operator after batch `cut`; returns the kept readings, sorted.
fn run_restored(cfg: &CompressConfig, batches: &[Vec<Reading>], lag: i64, cut: usize) -> Vec<(String, i64)> {
    use citystream_operators::Collector;
    let mut op = build(cfg);
    let mut c = Collector::new(2);
    let mut max_ts = i64::MIN;
    for (i, b) in batches.iter().enumerate() {
        if i == cut {
            let state = op.snapshot().unwrap().unwrap();
            op = build(cfg);
            op.restore(state).unwrap();
            if max_ts != i64::MIN {
                op.on_watermark(max_ts - lag, &mut c).unwrap();
            }
        }
        if b.is_empty() {
            continue;
        }
        op.process_batch(batch(b), &mut c).unwrap();
        max_ts = max_ts.max(b.iter().map(|r| r.ts).max().unwrap());
        op.on_watermark(max_ts - lag, &mut c).unwrap();
    }
    op.on_end(&mut c).unwrap();
    let mut kept: Vec<(String, i64)> = c.port(0).iter().flat_map(readings).map(|r| (r.sensor, r.ts)).collect();
    kept.sort();
    kept
}

proptest! {
    #[test]
    fn a_restore_anywhere_and_any_batching_keep_the_same_rows(
        rows in series(),
        split_a in 1usize..50,
        split_b in 1usize..50,
        cut in 0usize..20,
        shuffle_seed in any::<u64>(),
    ) {
        let c = cfg("swinging_door", 0.5, 0.0);
        let mut delivered = rows.clone();
        delivered.sort_by_key(|r| r.ts + ((r.ts as u64 ^ shuffle_seed) % 60_000) as i64);
        let a: Vec<Vec<Reading>> = delivered.chunks(split_a).map(<[Reading]>::to_vec).collect();
        let b: Vec<Vec<Reading>> = delivered.chunks(split_b).map(<[Reading]>::to_vec).collect();
        let reference = run_restored(&c, &a, 60_000, usize::MAX);
        prop_assert_eq!(&run_restored(&c, &b, 60_000, usize::MAX), &reference, "another batching");
        prop_assert_eq!(&run_restored(&c, &a, 60_000, cut.min(a.len())), &reference, "restored after batch {}", cut);
    }
}

#[test]
fn a_series_silent_past_max_gap_releases_its_undecided_row_and_the_output_watermark() {
    // two readings, then silence: the second is undecided until the next reading, unless the
    // silence exceeds max_gap (then it is kept whatever comes)
    let c: CompressConfig = yaml("key: [sensor_id]\nfields:\n  value: {abs: 1.0}\nmax_gap: 10m\n");
    let mut op = build(&c);
    let mut out = citystream_operators::Collector::new(2);
    op.process_batch(batch(&[r("a", "s", 0, 1.0), r("b", "s", 60_000, 1.0)]), &mut out).unwrap();
    op.on_watermark(120_000, &mut out).unwrap();
    assert_eq!(out.port(0).iter().map(|b| b.num_rows()).sum::<usize>(), 1, "the first is kept, the second undecided");
    assert_eq!(op.output_watermark(120_000), 59_999, "held back by the undecided row");
    op.on_watermark(60_000 + 10 * 60_000 + 1, &mut out).unwrap();
    assert_eq!(out.port(0).iter().map(|b| b.num_rows()).sum::<usize>(), 2, "kept once max_gap passed");
    assert_eq!(op.output_watermark(700_001), 700_001);
}

#[test]
fn silent_series_are_forgotten_without_changing_what_is_kept() {
    // 12 hours; each hour 2000 sensors speak 3 times then fall silent (max_gap 10m), and the
    // sensors of hour h speak again in hour h + 6: the operator must forget them in between
    // and keep exactly the rows it keeps when it never gets a chance to forget (one batch,
    // one watermark at the end)
    let c: CompressConfig = yaml("key: [sensor_id]\nfields:\n  value: {abs: 1.0}\nmax_gap: 10m\n");
    let mut rows = Vec::new();
    for h in 0..12i64 {
        for k in 0..2000 {
            for j in 0..3i64 {
                let sensor = format!("g{}-{k}", h % 2 * 100 + h / 2 % 3);
                let v = 50.0 + ((k as i64 * 7 + j * 13 + h) % 5) as f64 * 0.4;
                rows.push(r(&format!("{h}-{k}-{j}"), &sensor, h * 3_600_000 + j * 60_000 + k as i64, v));
            }
        }
    }
    rows.sort_by_key(|r| r.ts);
    let metrics = citystream_operators::Metrics::new();
    let batches: Vec<Vec<Reading>> = rows.chunks(500).map(<[Reading]>::to_vec).collect();
    let mut op = build_with(&c, &metrics);
    let mut held = Vec::new();
    let mut coll = citystream_operators::Collector::new(2);
    for b in &batches {
        op.process_batch(batch(b), &mut coll).unwrap();
        op.on_watermark(b.last().unwrap().ts - 1, &mut coll).unwrap();
        held.push(metrics.value("citystream_compress_series", &[("stage", "test")]).unwrap_or(0.0));
    }
    op.on_end(&mut coll).unwrap();
    let mut forgetting: Vec<(String, i64)> =
        coll.drain().filter(|(p, _)| *p == 0).flat_map(|(_, b)| readings(&b)).map(|r| (r.id, r.ts)).collect();
    forgetting.sort();
    let everything = run(build(&c).as_mut(), &[rows.clone()], i64::MAX / 4);
    let mut reference: Vec<(String, i64)> = everything.readings(0).into_iter().map(|r| (r.id, r.ts)).collect();
    reference.sort();
    assert_eq!(everything.rows(1), 0);
    assert_eq!(forgetting, reference, "forgetting silent series changed what is kept");
    // 12 hours of 2000 sensors each, 6 distinct groups: never more than the groups of two hours
    let peak = held.iter().copied().fold(0.0, f64::max);
    assert!(peak <= 2.0 * 2000.0 + 1.0, "series held peaked at {peak}");
    assert!(held.last().copied().unwrap_or(0.0) <= 2000.0, "{held:?}");
}
