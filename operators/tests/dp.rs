mod util;

use std::collections::{HashMap, HashSet};

use arrow::array::AsArray;
use arrow::datatypes::Float64Type;
use citystream_operators::dp::{DpConfig, bound_contributions};
use citystream_operators::{Collector, Metrics};
use proptest::prelude::*;
use rand::SeedableRng;
use util::*;

fn allow_seed() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    // SAFETY: set once, before any test of this binary reads it (every config goes through here)
    ONCE.call_once(|| unsafe { std::env::set_var(citystream_operators::dp::INSECURE_SEED_ENV, "1") });
}

fn cfg(dir: &std::path::Path, extra: &str) -> DpConfig {
    allow_seed();
    yaml(&format!(
        "release: r\nprivacy_unit: sensor_id\npartition: event_id\naggregate: count\nwindow: 1h\nmechanism: laplace\n\
         epsilon: 1.0\nbudget: {{epsilon: 3.0}}\nbudget_dir: {}\ninsecure_seed: 7\n{extra}",
        dir.display()
    ))
}

proptest! {
    /// Whatever the input, each unit keeps at most L0 partitions and L∞ rows per partition,
    /// and every kept row was in the input.
    #[test]
    fn contribution_bounding_holds(
        rows in proptest::collection::vec((0..5u8, 0..6u8, 0..100u8), 0..300),
        l0 in 1usize..4,
        linf in 1usize..4,
        seed in any::<u64>(),
    ) {
        let input: Vec<(String, String, f64)> = rows.iter().map(|(u, p, v)| (format!("u{u}"), format!("p{p}"), f64::from(*v))).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (kept, cut) = bound_contributions(input.clone(), l0, linf, &mut rng);
        prop_assert_eq!(kept.len() + cut, input.len());
        let mut parts: HashMap<&str, HashSet<&str>> = HashMap::new();
        let mut per: HashMap<(&str, &str), usize> = HashMap::new();
        for (u, p, _) in &kept {
            parts.entry(u).or_default().insert(p);
            *per.entry((u, p)).or_default() += 1;
        }
        prop_assert!(parts.values().all(|s| s.len() <= l0));
        prop_assert!(per.values().all(|n| *n <= linf));
        // nothing invented: every kept row is an input row (as a multiset)
        let mut pool: HashMap<(String, String, u64), i64> = HashMap::new();
        for (u, p, v) in &input { *pool.entry((u.clone(), p.clone(), v.to_bits())).or_default() += 1; }
        for (u, p, v) in &kept { *pool.entry((u.clone(), p.clone(), v.to_bits())).or_default() -= 1; }
        prop_assert!(pool.values().all(|n| *n >= 0));
        // and the bound keeps as much as it may: a unit with few rows keeps them all
        for (u, s) in &parts {
            let distinct: HashSet<&str> = input.iter().filter(|(x, _, _)| x == u).map(|(_, p, _)| p.as_str()).collect();
            prop_assert_eq!(s.len(), distinct.len().min(l0));
        }
    }
}

#[test]
fn bounding_samples_fairly_not_the_first_rows() {
    // one unit, ten partitions, L0 = 1: over many draws every partition is chosen
    let mut chosen = HashSet::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    for _ in 0..200 {
        let rows: Vec<_> = (0..10).map(|p| ("u".to_owned(), format!("p{p}"), 1.0)).collect();
        let (kept, _) = bound_contributions(rows, 1, 1, &mut rng);
        chosen.insert(kept[0].1.clone());
    }
    assert_eq!(chosen.len(), 10, "{chosen:?}");
}

#[test]
fn public_partitions_are_all_released_with_their_account_and_the_budget_stops_releases() {
    let dir = tempfile::tempdir().unwrap();
    let m = Metrics::new();
    let c = cfg(dir.path(), "partitions: {public: [a, b, c]}\n");
    let mut op = build_with(&c, &m);
    // 3 hourly windows with rows in partition `a` only; budget ε = 3 allows 3 releases of ε = 1
    let mut batches = Vec::new();
    for h in 0..4 {
        batches.push((0..50).map(|i| r("a", &format!("s{i}"), h * 3_600_000 + i, 1.0)).collect::<Vec<_>>());
    }
    let out = run(op.as_mut(), &batches, 0);
    let rows: usize = out.rows(0);
    assert_eq!(rows, 9, "3 partitions in each of 3 windows; the 4th window is refused");
    let b = &out.ports[0][0];
    let parts = b.column_by_name("event_id").unwrap().as_string::<i32>();
    assert_eq!(
        (0..3).map(|i| parts.value(i)).collect::<Vec<_>>(),
        ["a", "b", "c"],
        "empty partitions are released too"
    );
    let v = b.column_by_name("value").unwrap().as_primitive::<Float64Type>();
    assert!((v.value(0) - 50.0).abs() < 20.0, "noisy count near 50: {}", v.value(0));
    assert_eq!(b.column_by_name("mechanism").unwrap().as_string::<i32>().value(0), "discrete_laplace");
    let scale = b.column_by_name("noise_scale").unwrap().as_primitive::<Float64Type>().value(0);
    assert!((scale - 1.0).abs() < 1e-5, "L0·L∞/ε = 1: {scale}");
    let bound = b.column_by_name("error_bound_95").unwrap().as_primitive::<Float64Type>().value(0);
    assert!((bound - 20f64.ln()).abs() < 1e-4);
    assert!(
        m.render().contains("citystream_dp_releases_refused_total{stage=\"test\",release=\"r\"} 1"),
        "{}",
        m.render()
    );
    // the spent budget survives a restart: a new operator refuses at once
    let mut again = build_with(&c, &Metrics::new());
    let out = run(again.as_mut(), &[batches[0].clone()], 0);
    assert_eq!(out.rows(0), 0);
}

#[test]
fn private_partitions_need_a_noisy_count_above_the_threshold() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(dir.path(), "partitions: {private: true}\ndelta: 1.0e-6\n");
    let mut op = build(&c);
    // partition `big` has 100 units, each of `rare-*` one unit
    let mut rows: Vec<_> = (0..100).map(|i| r("big", &format!("s{i}"), i, 1.0)).collect();
    rows.extend((0..20).map(|i| r(&format!("rare-{i}"), &format!("t{i}"), i, 1.0)));
    let out = run(op.as_mut(), &[rows], 0);
    let released: Vec<String> = out.ports[0]
        .iter()
        .flat_map(|b| {
            b.column_by_name("event_id")
                .unwrap()
                .as_string::<i32>()
                .iter()
                .map(|s| s.unwrap().to_owned())
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(released, ["big"], "τ = 1 + ln(1/(2δ)) ≈ 14.1: single-unit partitions are never released");
}

#[test]
fn plan_errors_explain_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let c: DpConfig = yaml(&format!(
        "release: r\nprivacy_unit: sensor_id\npartition: event_id\naggregate: mean\nwindow: 1h\nmechanism: gaussian\nepsilon: 5\n\
         budget: {{epsilon: 1}}\nbudget_dir: {}\npartitions: {{private: true}}\n",
        dir.path().display()
    ));
    let e = format!("{:?}", citystream_operators::OperatorConfig::plan(&c, &schema()).unwrap_err());
    assert!(e.contains("need a `column`"), "{e}");
    assert!(e.contains("finite `bounds"), "{e}");
    assert!(e.contains("exceeds the period's budget"), "{e}");
    assert!(e.contains("Laplace counts only"), "{e}");
    let _ = Collector::new(1);
}

#[test]
fn deferred_releases_wait_for_a_clean_grid_or_max_delay_and_survive_a_restore() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(dir.path(), "partitions: {public: [a]}\ndefer: {max_delay: 3h}\n");
    let c = DpConfig { budget: yaml("{epsilon: 100.0}"), ..c };
    let m = Metrics::new();
    let mut op = build_with(&c, &m);
    const H: i64 = 3_600_000;
    let hour = |h: i64| util::batch(&(0..10).map(|i| r("a", &format!("s{i}"), h * H + i, 1.0)).collect::<Vec<_>>());
    let released = |out: &mut Collector| -> Vec<i64> {
        let mut v = Vec::new();
        for (p, b) in out.drain() {
            if p == 0 {
                let s = b.column_by_name("window_start").unwrap();
                let s = s.as_primitive::<arrow::datatypes::TimestampMillisecondType>();
                v.extend(s.values().iter().map(|s| s / H));
            }
        }
        v
    };
    let metric = |m: &Metrics, action: &str| {
        m.value("citystream_policy_actions_total", &[("policy", "dp_release"), ("action", action)]).unwrap_or(0.0)
    };
    let mut out = Collector::new(2);
    // before the policy has spoken, closed windows are held too
    op.process_batch(hour(0), &mut out).unwrap();
    op.on_watermark(H, &mut out).unwrap();
    assert_eq!(released(&mut out), Vec::<i64>::new());
    // the high mode: hours 0..5 close, only those 3 h behind the watermark are released
    let mode = m.gauge(citystream_operators::dp::CARBON_HIGH_MODE_GAUGE, "mode", &[]);
    mode.set(1.0);
    for h in 1..6 {
        op.process_batch(hour(h), &mut out).unwrap();
        op.on_watermark((h + 1) * H, &mut out).unwrap();
    }
    assert_eq!(released(&mut out), vec![0, 1, 2], "forced after max_delay");
    assert_eq!(m.value("citystream_dp_windows_held", &[("stage", "test"), ("release", "r")]), Some(3.0));
    assert_eq!((metric(&m, "deferred"), metric(&m, "released")), (6.0, 3.0));
    // a checkpoint now: the held windows are state
    let state = op.snapshot().unwrap().unwrap();
    let m2 = Metrics::new();
    let mode2 = m2.gauge(citystream_operators::dp::CARBON_HIGH_MODE_GAUGE, "mode", &[]);
    mode2.set(1.0);
    let mut restored = build_with(&c, &m2);
    restored.restore(state).unwrap();
    restored.on_watermark(6 * H, &mut out).unwrap();
    assert_eq!(released(&mut out), Vec::<i64>::new(), "still held after the restore");
    // the grid is clean again: everything closed goes out at the next watermark
    mode2.set(0.0);
    restored.process_batch(hour(6), &mut out).unwrap();
    restored.on_watermark(7 * H, &mut out).unwrap();
    assert_eq!(released(&mut out), vec![3, 4, 5, 6]);
    assert_eq!(m2.value("citystream_dp_windows_held", &[("stage", "test"), ("release", "r")]), Some(0.0));
    assert_eq!(metric(&m2, "released"), 3.0, "three of them had been deferred");
    // the end of the input releases what is held, whatever the mode
    mode2.set(1.0);
    restored.process_batch(hour(7), &mut out).unwrap();
    restored.on_watermark(8 * H, &mut out).unwrap();
    assert_eq!(released(&mut out), Vec::<i64>::new());
    restored.on_end(&mut out).unwrap();
    assert_eq!(released(&mut out), vec![7]);
}

#[test]
fn held_windows_go_out_at_a_checkpoint_once_the_grid_is_clean_even_without_a_new_watermark() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(dir.path(), "partitions: {public: [a]}\ndefer: {max_delay: 6h}\n");
    let c = DpConfig { budget: yaml("{epsilon: 100.0}"), ..c };
    let m = Metrics::new();
    let mode = m.gauge(citystream_operators::dp::CARBON_HIGH_MODE_GAUGE, "mode", &[]);
    mode.set(1.0);
    let mut op = build_with(&c, &m);
    const H: i64 = 3_600_000;
    let mut out = Collector::new(2);
    op.process_batch(util::batch(&[r("a", "s1", 5, 1.0)]), &mut out).unwrap();
    op.on_watermark(H, &mut out).unwrap();
    op.on_checkpoint(&mut out).unwrap();
    assert_eq!(out.port(0).len(), 0, "held in the high mode");
    // the partitions go idle (no watermark moves); the grid turns clean; a checkpoint passes
    mode.set(0.0);
    op.on_checkpoint(&mut out).unwrap();
    assert_eq!(out.port(0).iter().map(|b| b.num_rows()).sum::<usize>(), 1, "released at the checkpoint");
}

/// A task's state restored on another machine (another `budget_dir`, empty) brings the spent
/// budget with it: a release replayed there is not charged again, and the budget stops
/// releases where it would have on the first machine.
#[test]
fn the_budget_moves_with_the_state_to_another_budget_dir() {
    const H: i64 = 3_600_000;
    let (first, second) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let key = first.path().join("noise.key");
    let extra = format!(
        "partitions: {{public: [a]}}\nnoise_key: {{secret_file: {}, create_secret_file: true}}\n",
        key.display()
    );
    let c = DpConfig { insecure_seed: None, ..cfg(first.path(), &extra) };
    // the hours released by feeding `hours`, each followed by the watermark at its end
    let feed = |op: &mut dyn citystream_operators::Operator, hours: std::ops::Range<i64>| -> Vec<i64> {
        let mut out = Collector::new(op.outputs().len());
        for h in hours {
            let rows: Vec<_> = (0..20).map(|i| r("a", &format!("s{i}"), h * H + i, 1.0)).collect();
            op.process_batch(util::batch(&rows), &mut out).unwrap();
            op.on_watermark((h + 1) * H, &mut out).unwrap();
        }
        let mut starts = Vec::new();
        for (p, b) in out.drain() {
            if p == 0 {
                let s = b.column_by_name("window_start").unwrap();
                starts.extend(
                    s.as_primitive::<arrow::datatypes::TimestampMillisecondType>().values().iter().map(|s| s / H),
                );
            }
        }
        starts
    };
    let mut op = build(&c);
    // two releases of ε = 1 (budget 3), then a checkpoint
    assert_eq!(feed(op.as_mut(), 0..2), [0, 1]);
    let state = op.snapshot().unwrap().unwrap();
    // elsewhere: an empty budget dir
    let c2 = DpConfig {
        budget_dir: citystream_operators::EnvString::literal(second.path().display().to_string()),
        ..c.clone()
    };
    let spent = |dir: &std::path::Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.join("r.json")).unwrap()).unwrap()
    };
    let mut moved = build(&c2);
    moved.restore(state).unwrap();
    assert_eq!(spent(second.path())["releases"], 2, "the restored ledger is persisted where the task runs now");
    // a replay of hour 1 gives the same release at no cost; hour 2 is the third release; hour 3
    // would exceed the budget
    assert_eq!(feed(moved.as_mut(), 1..4), [1, 2]);
    assert_eq!(spent(second.path())["releases"], 3);
    // an older ledger in the state does not lower a further one on disk
    let mut back = build(&c2);
    back.restore(op.snapshot().unwrap().unwrap()).unwrap();
    assert_eq!(spent(second.path())["releases"], 3);
    // without the ledger in the state (an empty budget dir, a snapshot of the windows only),
    // the budget would start over: the test fails without the carried ledger
    let third = tempfile::tempdir().unwrap();
    let c3 = DpConfig {
        budget_dir: citystream_operators::EnvString::literal(third.path().display().to_string()),
        ..c.clone()
    };
    let snap = op.snapshot().unwrap().unwrap();
    // the ledger is the last row
    let windows_only = snap.slice(0, snap.num_rows() - 1).project(&[0, 1, 2, 3]).unwrap();
    let mut fresh = build(&c3);
    fresh.restore(windows_only).unwrap();
    assert_eq!(feed(fresh.as_mut(), 2..5), [2, 3, 4], "an old snapshot (no ledger) restores, budget from the file");
}
