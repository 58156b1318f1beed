//! The stream operators on a simulated city day with injected faults: deduplication removes
//! exactly the injected duplicates, windows count exactly what dedup kept, compression stores
//! fewer rows; and live tuning changes a running pipeline without losing or repeating rows.

use std::time::Duration;

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::Int64Type;
use citystream_operators::Metrics;
use citystream_pipeline::config::{self, plan::plan};
use citystream_pipeline::runtime::{self, StopHandle};
use citystream_pipeline::sql;

fn yaml(data: &std::path::Path, duration: &str, speed: &str, threshold: i64, lateness: &str) -> String {
    format!(
        "\
name: ops
sources:
  city:
    type: simulator
    seed: 7
    duration: {duration}
    speed: {speed}
    batch_rows: 2048
    faults:
      duplicate_rate: 0.03
      resend_rate: 0.02
      out_of_order_rate: 0.05
      late_rate: 0.0
      malformed_rate: 0.0
stages:
  traffic: {{type: decode, input: city.traffic, kind: traffic}}
  camera: {{type: decode, input: city.camera, kind: camera}}
  environment: {{type: decode, input: city.environment, kind: environment}}
  traffic_unique: {{type: dedup, input: traffic, horizon: 10m}}
  camera_unique: {{type: dedup, input: camera, horizon: 10m}}
  environment_unique: {{type: dedup, input: environment, horizon: 10m}}
  busy:
    type: filter
    input: traffic_unique
    where: [{{column: flow, op: gt, value: {threshold}}}]
  traffic_windows:
    type: window
    input: traffic_unique
    key: [segment_id]
    size: 5m
    allowed_lateness: {lateness}
    aggregates: [{{fn: count, as: readings}}, {{fn: sum, column: flow, as: vehicles}}]
  traffic_stored:
    type: compress
    input: traffic_unique
    key: [sensor_id]
    fields: {{speed_kmh: {{abs: 5.0}}, occupancy: {{abs: 0.02}}}}
sinks:
  lake:
    type: parquet
    path: {data}/lake
    tables:
      traffic_unique: traffic_unique
      camera_unique: camera_unique
      environment_unique: environment_unique
      busy: busy
      traffic_windows: traffic_windows
      traffic: traffic_stored
      dead_letters: [traffic.dead_letters, camera.dead_letters, environment.dead_letters]
      late: [traffic_unique.late_events, traffic_windows.late_events, traffic_stored.late_events]
      camera_late: camera_unique.late_events
      environment_late: environment_unique.late_events
      traffic_arrived_late: traffic.late_events
      camera_arrived_late: camera.late_events
      environment_arrived_late: environment.late_events
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

async fn count(lake: &std::path::Path, q: &str) -> i64 {
    scalar(&sql::query(lake, q).await.unwrap_or_else(|e| panic!("{q}: {e}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_windows_and_compression_on_a_simulated_day() {
    let dir = tempfile::tempdir().unwrap();
    let text = yaml(dir.path(), "1d", "max", 0, "1m");
    let p = plan(config::load_str(&text, "ops.yaml").unwrap(), "ops.yaml").unwrap();
    let (_stop, rx) = StopHandle::new();
    let report = runtime::run(p, Metrics::new(), rx).await.unwrap();
    let sim = &report.simulations["city"];
    let lake = dir.path().join("lake");
    for kind in ["traffic", "camera", "environment"] {
        let c = &sim.kinds[kind];
        assert!(c.duplicates > 100 || kind == "environment", "{kind}: faults were injected: {c:?}");
        let unique = count(&lake, &format!("SELECT COUNT(*) FROM {kind}_unique")).await;
        // every injected exact duplicate and gateway re-send is removed, nothing else
        assert_eq!(unique as u64, c.valid - c.duplicates - c.resent, "{kind}: {c:?}");
        let ids = count(&lake, &format!("SELECT COUNT(DISTINCT event_id) FROM {kind}_unique")).await;
        assert_eq!(ids, unique, "{kind}: event ids are unique");
        let resends = count(&lake, &format!("SELECT COUNT(*) FROM {kind}_unique WHERE event_id LIKE 'gw2-%'")).await;
        assert_eq!(resends, 0, "{kind}: the originals arrive first, so no re-send is kept");
    }
    let late = report.tables["lake"].get("late").map_or(0, |t| t.rows);
    assert_eq!(late, 0, "no late faults were injected: no stateful stage saw a row behind its watermark");
    // what arrived more than the watermark lag behind its partition's newest event is a copy
    // (a duplicate or a re-send arriving up to two minutes after the original)
    if report.tables["lake"].contains_key("traffic_arrived_late") {
        let copies = count(
            &lake,
            "SELECT COUNT(*) FROM traffic_arrived_late l WHERE NOT EXISTS \
             (SELECT 1 FROM traffic_unique u WHERE u.sensor_id = l.sensor_id AND u.ts = l.ts)",
        )
        .await;
        assert_eq!(copies, 0, "every late traffic row is a copy of a kept reading");
    }
    // windows count exactly the deduplicated readings, and sum their flow
    let unique = count(&lake, "SELECT COUNT(*) FROM traffic_unique").await;
    assert_eq!(count(&lake, "SELECT SUM(readings) FROM traffic_windows").await, unique);
    assert_eq!(
        count(&lake, "SELECT SUM(vehicles)::BIGINT FROM traffic_windows").await,
        count(&lake, "SELECT SUM(flow)::BIGINT FROM traffic_unique").await
    );
    assert_eq!(
        count(&lake, "SELECT COUNT(*) FROM (SELECT DISTINCT segment_id, window_start FROM traffic_windows)").await,
        count(&lake, "SELECT COUNT(*) FROM traffic_windows").await,
        "one row per segment and window"
    );
    // compression keeps fewer rows, including every sensor's first and last
    let stored = count(&lake, "SELECT COUNT(*) FROM traffic").await;
    assert!(stored < unique * 9 / 10, "compression stored {stored} of {unique}");
    assert_eq!(
        count(&lake, "SELECT COUNT(*) FROM (SELECT sensor_id, MAX(ts) FROM traffic GROUP BY sensor_id)").await,
        count(&lake, "SELECT COUNT(DISTINCT sensor_id) FROM traffic_unique").await
    );
    assert_eq!(
        count(&lake, "SELECT COUNT(*) FROM (SELECT sensor_id, MAX(ts) m FROM traffic GROUP BY sensor_id) a JOIN (SELECT sensor_id, MAX(ts) m FROM traffic_unique GROUP BY sensor_id) b ON a.sensor_id = b.sensor_id AND a.m = b.m").await,
        count(&lake, "SELECT COUNT(DISTINCT sensor_id) FROM traffic_unique").await,
        "the last reading of every sensor is kept at the end"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_tuning_changes_a_threshold_without_losing_rows_and_rejects_what_needs_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let before = yaml(dir.path(), "6h", "7200", 1000, "1m");
    let p = plan(config::load_str(&before, "ops.yaml").unwrap(), "ops.yaml").unwrap();
    let metrics = Metrics::new();
    let (_stop, rx) = StopHandle::new();
    let (tx, reload) = tokio::sync::mpsc::channel(4);
    let run = tokio::spawn(runtime::run_with_reload(p, metrics.clone(), rx, Some(reload)));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // a new window size shapes state: rejected, nothing changes
    let bad = yaml(dir.path(), "6h", "7200", 1000, "1m").replace("size: 5m", "size: 10m");
    tx.send(plan(config::load_str(&bad, "ops.yaml").unwrap(), "ops.yaml").unwrap()).await.unwrap();
    // a new threshold and lateness apply live
    let good = yaml(dir.path(), "6h", "7200", 0, "2m");
    tx.send(plan(config::load_str(&good, "ops.yaml").unwrap(), "ops.yaml").unwrap()).await.unwrap();
    let report = tokio::time::timeout(Duration::from_secs(120), run).await.unwrap().unwrap().unwrap();
    let text = metrics.render();
    assert!(text.contains("citystream_config_reloads_total{outcome=\"rejected\"} 1"), "{text}");
    assert!(text.contains("citystream_config_reloads_total{outcome=\"applied\"} 1"), "{text}");
    assert!(text.contains("citystream_stage_retunes_total{stage=\"busy\",outcome=\"applied\"} 1"), "{text}");
    assert!(text.contains("citystream_stage_retunes_total{stage=\"traffic_windows\",outcome=\"applied\"} 1"), "{text}");
    let lake = dir.path().join("lake");
    let sim = &report.simulations["city"].kinds["traffic"];
    // nothing lost or repeated across the change
    assert_eq!(
        count(&lake, "SELECT COUNT(*) FROM traffic_unique").await as u64,
        sim.valid - sim.duplicates - sim.resent
    );
    // before the change no reading had flow > 1000; after it every reading with flow > 0 passed
    let busy = count(&lake, "SELECT COUNT(*) FROM busy").await;
    let first_busy = count(&lake, "SELECT COALESCE(MIN(src_offset), -1) FROM busy").await;
    assert!(busy > 0 && first_busy > 0, "rows pass only after the change: {busy} rows from offset {first_busy}");
    let after =
        count(&lake, &format!("SELECT COUNT(*) FROM traffic_unique WHERE flow > 0 AND src_offset >= {first_busy}"))
            .await;
    assert!(after >= busy && busy * 10 >= after * 9, "the new threshold applies to what follows: {busy} of {after}");
}
