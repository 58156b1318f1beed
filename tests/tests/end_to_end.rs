//! End to end on the embedded default shape: simulator (fixed seed, > 200k events with
//! duplicates, late and malformed events) → decode → zstd Parquet, checked with DataFusion SQL
//! against what the simulator says it emitted.

mod common;

use std::time::Duration;

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::Int64Type;
use citystream_operators::Metrics;
use citystream_pipeline::config::{self, plan::plan};
use citystream_pipeline::runtime::{self, StopHandle};
use citystream_pipeline::sql;
use citystream_schemas::EventKind;

fn pipeline_yaml(data: &std::path::Path, duration: &str) -> String {
    format!(
        "\
name: e2e
sources:
  city:
    type: simulator
    seed: 20260302
    duration: {duration}
    batch_rows: 4096
    faults:
      duplicate_rate: 0.02
      resend_rate: 0.01
      out_of_order_rate: 0.03
      late_rate: 0.005
      malformed_rate: 0.01
    ground_truth: {data}/truth
stages:
  traffic:
    type: decode
    input: city.traffic
    kind: traffic
  camera:
    type: decode
    input: city.camera
    kind: camera
  environment:
    type: decode
    input: city.environment
    kind: environment
sinks:
  lake:
    type: parquet
    path: {data}/lake
    row_group_rows: 20000
    tables:
      traffic: traffic
      camera: camera
      environment: environment
      dead_letters: [traffic.dead_letters, camera.dead_letters, environment.dead_letters]
      traffic_late: traffic.late_events
      camera_late: camera.late_events
      environment_late: environment.late_events
runtime:
  channel_capacity: 4
  status_interval: null
",
        data = data.display()
    )
}

fn scalar(batches: &[RecordBatch]) -> i64 {
    batches[0].column(0).as_primitive::<Int64Type>().value(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulator_to_parquet_counts_match_the_ground_truth() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = pipeline_yaml(dir.path(), "1d");
    let p = plan(config::load_str(&yaml, "e2e.yaml").unwrap(), "e2e.yaml").unwrap();
    let metrics = Metrics::new();
    let (_stop, rx) = StopHandle::new();
    let report = tokio::time::timeout(Duration::from_secs(600), runtime::run(p, metrics.clone(), rx))
        .await
        .expect("the pipeline finished within 10 minutes")
        .expect("the pipeline ran without error");
    let sim = &report.simulations["city"];
    let total: u64 = sim.kinds.values().map(|c| c.valid + c.malformed).sum();
    assert!(total >= 200_000, "the run must cover at least 200k events, got {total}");
    let dups: u64 = sim.kinds.values().map(|c| c.duplicates + c.resent).sum();
    let late: u64 = sim.kinds.values().map(|c| c.late).sum();
    assert!(dups > 1000 && late > 100, "faults were injected: {sim:?}");

    let lake = dir.path().join("lake");
    let tables = sql::context(&lake).await.unwrap().1;
    for kind in EventKind::ALL {
        let c = sim.counts(kind);
        let n = scalar(&sql::query(&lake, &format!("SELECT count(*) FROM {kind}")).await.unwrap());
        let late_table = format!("{kind}_late");
        let late = if tables.contains(&late_table) {
            scalar(&sql::query(&lake, &format!("SELECT count(*) FROM {late_table}")).await.unwrap())
        } else {
            0
        };
        assert_eq!(
            (n + late) as u64,
            c.valid,
            "{kind}: rows stored plus late rows equal valid events emitted (duplicates included)"
        );
        // late: the simulator's late deliveries (10-40 min), plus the few copies of an event
        // (a duplicate, a re-send) that arrived more than the watermark lag after it
        let share = |x: u64| x as f64 / c.valid as f64;
        assert!(
            (share(late as u64) - share(c.late)).abs() < 0.001,
            "{kind}: {late} late rows for {} late deliveries of {} events",
            c.late,
            c.valid
        );
        let dl = scalar(
            &sql::query(&lake, &format!("SELECT count(*) FROM dead_letters WHERE kind = '{kind}'")).await.unwrap(),
        );
        assert_eq!(dl as u64, c.malformed, "{kind}: dead letters equal malformed events");
        assert_eq!(report.tables["lake"][kind.as_str()].rows, n as u64);
    }
    let no_reason = scalar(
        &sql::query(
            &lake,
            "SELECT count(*) FROM dead_letters WHERE reason IS NULL OR reason = '' OR reason_code IS NULL",
        )
        .await
        .unwrap(),
    );
    assert_eq!(no_reason, 0, "every dead letter has a reason");
    // each kind of injected damage shows up under its own precise reason code
    let codes = sql::query(&lake, "SELECT DISTINCT reason_code FROM dead_letters ORDER BY reason_code").await.unwrap();
    let codes: Vec<String> = codes
        .iter()
        .flat_map(|b| {
            // DataFusion reads Parquet strings as Utf8View
            let col = arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Utf8).unwrap();
            col.as_string::<i32>().iter().map(|s| s.unwrap().to_owned()).collect::<Vec<_>>()
        })
        .collect();
    for expected in ["bad_json", "bad_timestamp", "missing_field", "unknown_schema_version", "wrong_type"] {
        assert!(codes.iter().any(|c| c == expected), "reason `{expected}` missing from {codes:?}");
    }
    // Hive partitions are visible as columns and prune by hour
    let hours =
        scalar(&sql::query(&lake, "SELECT count(DISTINCT hour) FROM traffic WHERE date = '2026-03-02'").await.unwrap());
    assert_eq!(hours, 24);
    // metrics agree with the tables
    assert_eq!(
        metrics.sum("citystream_dead_letters_total") as u64,
        sim.kinds.values().map(|c| c.malformed).sum::<u64>()
    );
    // the ground truth is written beside the data
    for f in ["road_graph.csv", "incidents.csv", "report.json", "plates.txt"] {
        assert!(dir.path().join("truth").join(f).exists(), "{f}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_drains_and_flushes_everything_read() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = pipeline_yaml(dir.path(), "7d").replace("duration: 7d", "duration: 7d\n    speed: 3600");
    let p = plan(config::load_str(&yaml, "e2e.yaml").unwrap(), "e2e.yaml").unwrap();
    let metrics = Metrics::new();
    let (stop, rx) = StopHandle::new();
    let run = tokio::spawn(runtime::run(p, metrics.clone(), rx));
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.stop();
    let report = tokio::time::timeout(Duration::from_secs(60), run).await.expect("stopped in time").unwrap().unwrap();
    let read: u64 = report.source_messages.values().sum();
    assert!(read > 0, "some events were read before the stop");
    let lake = dir.path().join("lake");
    let mut stored = 0;
    for t in ["traffic", "camera", "environment", "dead_letters", "traffic_late", "camera_late", "environment_late"] {
        if lake.join(t).exists() {
            stored += scalar(&sql::query(&lake, &format!("SELECT count(*) FROM {t}")).await.unwrap());
        }
    }
    assert_eq!(stored as u64, read, "every message read before the stop is on disk");
    let leftovers = common::walk(&lake).into_iter().filter(|p| p.ends_with(".tmp")).count();
    assert_eq!(leftovers, 0, "no temporary files are left behind");
}
