mod util;

use arrow::array::AsArray;
use citystream_operators::admit::AdmitConfig;
use citystream_operators::{Metrics, OperatorConfig};
use util::*;

#[test]
fn a_flooding_sensor_is_limited_and_the_others_pass() {
    let cfg: AdmitConfig = yaml("per_key: {key: [sensor_id], rate: 2/s}\npolicy: drop\n");
    let m = Metrics::new();
    let mut op = build_with(&cfg, &m);
    // `flood` sends 100 readings within one second of event time; `calm` one per second
    let mut rows: Vec<Reading> = (0..100).map(|i| r(&format!("f{i}"), "flood", 10_000 + i * 10, 1.0)).collect();
    rows.extend((0..10).map(|i| r(&format!("c{i}"), "calm", 10_000 + i * 1000, 1.0)));
    rows.sort_by_key(|r| r.ts);
    let out = run(op.as_mut(), &[rows], 0);
    let passed = out.readings(0);
    assert_eq!(passed.iter().filter(|r| r.sensor == "calm").count(), 10, "calm keeps its rate");
    let flood = passed.iter().filter(|r| r.sensor == "flood").count();
    assert!((2..=5).contains(&flood), "burst of 2 plus about 2/s over one second, got {flood}");
    let dl = &out.ports[1];
    let dropped: usize = dl.iter().map(|b| b.num_rows()).sum();
    assert_eq!(dropped + flood, 100, "every row either passes or is a dead letter");
    let codes = dl[0].column_by_name("reason_code").unwrap().as_string::<i32>();
    assert_eq!(codes.value(0), "rate_limited");
    let reason = dl[0].column_by_name("reason").unwrap().as_string::<i32>().value(0).to_owned();
    assert_eq!(reason, "over the per-key limit 2/s");
    let payload = dl[0].column_by_name("payload").unwrap().as_binary::<i32>().value(0).to_vec();
    assert!(String::from_utf8(payload).unwrap().contains("\"sensor_id\":\"flood\""));
    assert!(
        m.render().contains("citystream_admit_over_limit_total{stage=\"test\",limit=\"key\",policy=\"drop\"} 97"),
        "{}",
        m.render()
    );
}

#[test]
fn flag_passes_everything_and_marks_the_excess() {
    let cfg: AdmitConfig = yaml("per_stream: {rate: 10/m, burst: 3}\npolicy: flag\n");
    let mut op = build(&cfg);
    let rows: Vec<Reading> = (0..6).map(|i| r(&i.to_string(), "s", 1000 + i, 1.0)).collect();
    let out = run(op.as_mut(), &[rows], 0);
    let b = &out.ports[0][0];
    let flags = b.column_by_name("rate_limited").unwrap().as_boolean();
    assert_eq!(flags.len(), 6);
    assert_eq!((0..6).map(|i| flags.value(i)).collect::<Vec<_>>(), [false, false, false, true, true, true]);
}

#[test]
fn delay_needs_the_wall_clock() {
    let cfg: AdmitConfig = yaml("per_stream: {rate: 10/s}\npolicy: delay\n");
    let e = cfg.plan(&schema()).unwrap_err();
    assert!(format!("{e:?}").contains("use `clock: processing_time` with `delay`"), "{e:?}");
    let cfg: AdmitConfig = yaml("per_stream: {rate: 50/s, burst: 1}\npolicy: delay\nclock: processing_time\n");
    let mut op = build(&cfg);
    // it sleeps in its calls: the runtime hands its worker thread over first
    assert!(op.waits(), "delay waits");
    let drop: AdmitConfig = yaml("per_stream: {rate: 50/s}\npolicy: drop\n");
    assert!(!build(&drop).waits(), "drop only computes");
    let t0 = std::time::Instant::now();
    let rows: Vec<Reading> = (0..11).map(|i| r(&i.to_string(), "s", i, 1.0)).collect();
    let out = run(op.as_mut(), &[rows], 0);
    assert_eq!(out.rows(0), 11, "nothing is dropped");
    assert!(t0.elapsed() >= std::time::Duration::from_millis(190), "10 waits of 20 ms: {:?}", t0.elapsed());
}

#[test]
fn bad_rates_are_config_errors() {
    let e = serde_saphyr::from_str::<AdmitConfig>("per_stream: {rate: 10/week}\npolicy: drop\n").unwrap_err();
    assert!(e.to_string().contains("expected `N/s`, `N/m` or `N/h`"), "{e}");
}
