mod util;

use citystream_operators::dedup::DedupConfig;
use citystream_operators::partitioning::StateScope;
use citystream_operators::{Collector, Metrics, OperatorConfig as _};
use proptest::prelude::*;
use util::*;

fn cfg(horizon: &str) -> DedupConfig {
    yaml(&format!("horizon: {horizon}\n"))
}

#[test]
fn exact_and_content_duplicates_go_across_batches_and_out_of_order() {
    let mut op = build(&cfg("10m"));
    let out = run(
        op.as_mut(),
        &[
            vec![r("a", "s1", 60_000, 1.0), r("b", "s1", 70_000, 2.0)],
            // exact re-delivery of `b` arriving before the original's neighbour, then a gateway
            // re-send of `a` under a new id, then a distinct reading with the same ts as `a`
            vec![r("c", "s2", 65_000, 5.0), r("b", "s1", 70_000, 2.0)],
            vec![r("gw2-a", "s1", 60_000, 1.0), r("d", "s1", 60_000, 1.5), r("a", "s1", 60_000, 1.0)],
        ],
        120_000,
    );
    let ids: Vec<String> = out.readings(0).into_iter().map(|r| r.id).collect();
    assert_eq!(ids, ["a", "b", "c", "d"]);
    assert_eq!(out.rows(1), 0, "nothing was late");
}

/// `within: [sensor_id]` matches ids only per sensor (the state then splits by sensor: one
/// instance per topic partition holds whole sensors); content duplicates are still caught.
#[test]
fn ids_match_within_the_scope_columns_only() {
    let rows = [
        vec![r("a", "s1", 60_000, 1.0), r("a", "s2", 60_000, 2.0)],
        // a re-send of s1's `a`, and a gateway copy of s2's reading under a new id
        vec![r("a", "s1", 60_000, 1.0), r("gw-a", "s2", 60_000, 2.0), r("gw-a", "s2", 60_000, 2.0)],
    ];
    let ids = |cfg: &DedupConfig| -> Vec<(String, String)> {
        let mut op = build(cfg);
        run(op.as_mut(), &rows, 120_000).readings(0).into_iter().map(|r| (r.id, r.sensor)).collect()
    };
    let pair = |a: &str, b: &str| (a.to_owned(), b.to_owned());
    // one id across the stream: s2's reading is taken for s1's, so the gateway's copy is new
    assert_eq!(ids(&cfg("10m")), [pair("a", "s1"), pair("gw-a", "s2")]);
    let scoped: DedupConfig = yaml("horizon: 10m\nwithin: [sensor_id]\n");
    assert_eq!(ids(&scoped), [pair("a", "s1"), pair("a", "s2")]);
    assert_eq!(
        scoped.state_scopes(&schema()),
        [
            StateScope::Keys(vec!["sensor_id".into(), "event_id".into()]),
            StateScope::Keys(["ts", "sensor_id", "value", "flow"].map(String::from).to_vec())
        ]
    );
    let errs =
        citystream_operators::OperatorConfig::plan(&yaml::<DedupConfig>("horizon: 1m\nwithin: [segment]\n"), &schema())
            .unwrap_err();
    assert_eq!(errs[0].key, "within[0]");
}

#[test]
fn rows_older_than_the_horizon_are_set_aside_not_passed_unchecked() {
    let m = Metrics::new();
    let mut op = build_with(&cfg("5m"), &m);
    let out = run(
        op.as_mut(),
        &[vec![r("a", "s1", 0, 1.0)], vec![r("z", "s1", 3_600_000, 1.0)], vec![r("a", "s1", 0, 1.0)]],
        0,
    );
    assert_eq!(out.readings(0).iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["a", "z"]);
    assert_eq!(out.readings(1).len(), 1, "the old re-delivery is late, not silently dropped or passed");
    assert!(m.render().contains("citystream_dedup_late_rows_total{stage=\"test\"} 1"), "{}", m.render());
}

#[test]
fn state_is_evicted_by_watermark() {
    let m = Metrics::new();
    let mut op = build_with(&cfg("1m"), &m);
    let mut c = Collector::new(2);
    let rows: Vec<_> = (0..1000).map(|i| r(&format!("e{i}"), "s", i * 100, i as f64)).collect();
    op.process_batch(batch(&rows), &mut c).unwrap();
    op.on_watermark(0, &mut c).unwrap();
    let held = |m: &Metrics| -> f64 {
        let text = m.render();
        let line = text.lines().find(|l| l.starts_with("citystream_dedup_state_keys")).unwrap().to_owned();
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert_eq!(held(&m), 2000.0, "an id key and a content key per row");
    op.on_watermark(100_000 + 60_000 + 60_000, &mut c).unwrap();
    assert!(held(&m) < 2000.0 * 0.5, "old keys evicted: {}", held(&m));
}

/// Exact keys hash the `within` columns: a snapshot taken with another `within` restores its
/// content keys only (its id keys could never match again).
#[test]
fn a_snapshot_of_another_scope_restores_content_keys_only() {
    let mut op = build(&cfg("10m"));
    let mut c = Collector::new(2);
    op.process_batch(batch(&[r("a", "s1", 1000, 1.0)]), &mut c).unwrap();
    let snap = op.snapshot().unwrap().unwrap();
    let mut scoped = build(&yaml::<DedupConfig>("horizon: 10m\nwithin: [sensor_id]\n"));
    scoped.restore(snap.clone()).unwrap();
    // `a` again with other values: not an exact duplicate any more; a copy of the reading
    // under a new id: still a content duplicate
    let out = run(scoped.as_mut(), &[vec![r("a", "s1", 1000, 2.0), r("x", "s1", 1000, 1.0)]], 0);
    assert_eq!(out.readings(0).iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["a"]);
    // the same scope restores both
    let mut same = build(&cfg("10m"));
    same.restore(snap).unwrap();
    let out = run(same.as_mut(), &[vec![r("a", "s1", 1000, 2.0), r("x", "s1", 1000, 1.0)]], 0);
    assert!(out.readings(0).is_empty());
}

#[test]
fn a_restored_snapshot_still_knows_its_keys() {
    let mut op = build(&cfg("10m"));
    let mut c = Collector::new(2);
    op.process_batch(batch(&[r("a", "s1", 1000, 1.0)]), &mut c).unwrap();
    let snap = op.snapshot().unwrap().unwrap();
    let mut fresh = build(&cfg("10m"));
    fresh.restore(snap).unwrap();
    let out =
        run(fresh.as_mut(), &[vec![r("a", "s1", 1000, 1.0), r("x", "s1", 1000, 1.0), r("b", "s1", 2000, 2.0)]], 0);
    assert_eq!(out.readings(0).iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["b"]);
}

#[test]
fn a_snapshot_from_before_keyed_hashing_restores_empty_instead_of_failing() {
    let mut op = build(&cfg("10m"));
    let mut c = Collector::new(2);
    op.process_batch(batch(&[r("a", "s1", 1000, 1.0)]), &mut c).unwrap();
    let snap = op.snapshot().unwrap().unwrap();
    // what an earlier version wrote: no hash key in the metadata
    let mut meta = snap.schema().metadata().clone();
    assert!(meta.remove("hash_key").is_some(), "snapshots carry their hash key: {meta:?}");
    let old = arrow::array::RecordBatch::try_new(
        std::sync::Arc::new(snap.schema().as_ref().clone().with_metadata(meta)),
        snap.columns().to_vec(),
    )
    .unwrap();
    let mut fresh = build(&cfg("10m"));
    fresh.restore(old).unwrap();
    let out = run(fresh.as_mut(), &[vec![r("a", "s1", 1000, 1.0)]], 0);
    assert_eq!(out.readings(0).len(), 1, "the old keys cannot be compared: the state starts empty");
}

fn reading() -> impl Strategy<Value = Reading> {
    // few ids, sensors, times and values so that duplicates of every kind occur
    (0..12u8, 0..3u8, 0..6i64, 0..3u8).prop_map(|(id, s, t, v)| Reading {
        id: format!("e{id}"),
        sensor: format!("s{s}"),
        ts: t * 1000,
        value: Some(f64::from(v)),
        flow: 1,
    })
}

/// The specification: keep a row unless its id or its content was kept or seen before.
fn naive(rows: &[Reading]) -> Vec<Reading> {
    let mut ids = std::collections::HashSet::new();
    let mut contents = std::collections::HashSet::new();
    let mut out = Vec::new();
    for r in rows {
        let content = (r.sensor.clone(), r.ts, r.value.map(f64::to_bits), r.flow);
        if ids.contains(&r.id) {
            continue;
        }
        ids.insert(r.id.clone());
        if contents.contains(&content) {
            continue;
        }
        contents.insert(content);
        out.push(r.clone());
    }
    out
}

proptest! {
    #[test]
    fn dedup_matches_the_specification_and_is_idempotent(
        rows in proptest::collection::vec(reading(), 1..80),
        split in 1usize..20,
    ) {
        let batches: Vec<Vec<Reading>> = rows.chunks(split).map(<[Reading]>::to_vec).collect();
        let once = run(build(&cfg("1h")).as_mut(), &batches, 0).readings(0);
        prop_assert_eq!(&once, &naive(&rows));
        let twice = run(build(&cfg("1h")).as_mut(), std::slice::from_ref(&once), 0).readings(0);
        prop_assert_eq!(twice, once);
    }
}
