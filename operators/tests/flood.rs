//! A key flood: one hostile device sends a million events, each under a new event id, a new
//! sensor id and a new segment, for hours of event time. Every stateful operator keyed by
//! those columns (admit, dedup, windows, compress, sensor_health) must level off — hold what its horizon
//! needs and forget the rest — instead of growing with the input.
//!
//! `CITYSTREAM_FLOOD_EVENTS` sets the number of events (default 1,000,000). Peak memory of
//! the process is printed (`VmHWM`), not asserted: targets live in the benches.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, Float32Array, Int32Array, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray,
};
use arrow::datatypes::DataType;
use citystream_operators::{BuildContext, Collector, Metrics, Operator, OperatorConfig};
use citystream_schemas::EventKind;

/// Events per second of event time (a device far over any sane rate).
const RATE_PER_S: i64 = 100;
const BATCH: usize = 4096;

fn yaml<T: serde::de::DeserializeOwned>(text: &str) -> T {
    serde_saphyr::from_str(text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// Traffic rows `first..first + n`: row `i` at `i / RATE_PER_S` seconds, all its keys new.
fn batch(first: i64, n: usize) -> RecordBatch {
    let schema = EventKind::Traffic.schema();
    let ids: Vec<i64> = (first..first + n as i64).collect();
    let t0 = 1_772_409_600_000i64;
    let columns: Vec<ArrayRef> = schema
        .fields()
        .iter()
        .map(|f| -> ArrayRef {
            match (f.name().as_str(), f.data_type()) {
                ("ts", _) => Arc::new(
                    TimestampMillisecondArray::from_iter_values(ids.iter().map(|i| t0 + i * 1000 / RATE_PER_S))
                        .with_timezone("UTC"),
                ),
                ("event_id", _) => Arc::new(StringArray::from_iter_values(ids.iter().map(|i| format!("flood-{i}")))),
                ("sensor_id", _) => Arc::new(StringArray::from_iter_values(ids.iter().map(|i| format!("loop-{i}")))),
                ("segment_id", _) => Arc::new(StringArray::from_iter_values(ids.iter().map(|i| format!("seg-{i}")))),
                ("src_offset", _) => Arc::new(Int64Array::from_iter_values(ids.iter().copied())),
                (_, DataType::Int32) => Arc::new(Int32Array::from(vec![1; n])),
                (_, DataType::Float32) => Arc::new(Float32Array::from_iter_values(ids.iter().map(|i| (i % 97) as f32))),
                (name, t) => panic!("no generator for column {name} of {t}"),
            }
        })
        .collect();
    RecordBatch::try_new(schema, columns).unwrap()
}

fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn a_flood_of_new_keys_levels_off_in_every_stateful_operator() {
    let events: i64 = std::env::var("CITYSTREAM_FLOOD_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let metrics = Metrics::new();
    let schema = EventKind::Traffic.schema();
    let build = |stage: &str, cfg: &dyn OperatorConfig| -> Box<dyn Operator> {
        let ctx = BuildContext { stage: stage.into(), metrics: metrics.clone(), ..Default::default() };
        cfg.build(&schema, &ctx).unwrap_or_else(|e| panic!("{e:?}"))
    };
    let admit_cfg: citystream_operators::admit::AdmitConfig =
        yaml("{per_key: {key: [sensor_id], rate: 10/m, burst: 20}, policy: drop}");
    let dedup_cfg: citystream_operators::dedup::DedupConfig = yaml("{horizon: 10m}");
    let window_cfg: citystream_operators::window::WindowConfig = yaml(
        "{key: [segment_id], size: 5m, allowed_lateness: 1m, aggregates: [{fn: count, as: n}, \
         {fn: quantile, column: speed_kmh, q: 0.85, as: p85}]}",
    );
    let compress_cfg: citystream_operators::compress::CompressConfig =
        yaml("{key: [sensor_id], fields: {speed_kmh: {abs: 5.0}}, max_gap: 10m}");
    let health_cfg: citystream_operators::health::SensorHealthConfig =
        yaml("{key: [sensor_id], values: [flow, occupancy, speed_kmh], keep: [segment_id], silent_after: 5m}");
    let (mut admit, mut dedup) = (build("admit", &admit_cfg), build("dedup", &dedup_cfg));
    let (mut window, mut compress) = (build("window", &window_cfg), build("compress", &compress_cfg));
    let mut health = build("health", &health_cfg);
    // one operator's main output for `input`, with the watermark after it
    let step = |op: &mut Box<dyn Operator>, input: Vec<RecordBatch>, wm: i64| -> Vec<RecordBatch> {
        let mut c = Collector::new(op.outputs().len());
        for b in input {
            op.process_batch(b, &mut c).unwrap();
        }
        op.on_watermark(wm, &mut c).unwrap();
        c.drain().filter(|(p, _)| *p == 0).map(|(_, b)| b).collect()
    };
    let gauges = [
        ("citystream_admit_keys", "admit"),
        ("citystream_dedup_state_keys", "dedup"),
        ("citystream_window_state_bytes", "window"),
        ("citystream_compress_series", "compress"),
        ("citystream_sensor_health_devices", "health"),
    ];
    let level = |name: &str, stage: &str| metrics.value(name, &[("stage", stage)]).unwrap_or(0.0);
    // a gauge's highest value in each tenth of the run
    let mut peaks = [[0f64; 5]; 10];
    let mut windows_out = 0usize;
    let mut first = 0i64;
    let lag_ms = 30_000;
    let started = std::time::Instant::now();
    while first < events {
        let n = BATCH.min((events - first) as usize);
        let wm = 1_772_409_600_000 + (first + n as i64) * 1000 / RATE_PER_S - lag_ms;
        // admit → dedup → (windows, compress)
        let admitted = step(&mut admit, vec![batch(first, n)], wm);
        let unique = step(&mut dedup, admitted, wm);
        windows_out += step(&mut window, unique.clone(), wm).iter().map(RecordBatch::num_rows).sum::<usize>();
        step(&mut compress, unique.clone(), wm);
        step(&mut health, unique, wm);
        let tenth = ((first * 10) / events) as usize;
        for (g, (name, stage)) in gauges.iter().enumerate() {
            peaks[tenth][g] = peaks[tenth][g].max(level(name, stage));
        }
        first += n as i64;
    }
    let elapsed = started.elapsed();

    // what each operator's horizon can need at this rate, with room for eviction granularity
    let per_min = (RATE_PER_S * 60) as f64;
    let bounds = [
        per_min * 1.0 + 1.0,          // admit: a key's bucket refills within 2 minutes (burst 20 at 10/m)
        2.0 * per_min * (10.0 + 2.0), // dedup: an id and a content key per row over the 10-minute horizon,
        // plus minute buckets and the lag
        per_min * (5.0 + 1.0 + 1.0) * 512.0, // windows: a segment's open 5-minute window, under 512 bytes
        per_min * 10.0 * 1.34 + 1024.0 + per_min, // compress: silent series go once a quarter is silent
        per_min * (5.0 + 1.0),               // sensor_health: a device heard once goes after silent_after
    ];
    eprintln!(
        "{events} events in {:.1} s; peaks per tenth of the run (admit, dedup, windows, compress, sensor_health): {:?}; \
         windows emitted {windows_out}; peak RSS {} MiB",
        elapsed.as_secs_f64(),
        peaks,
        peak_rss_kib().map_or("?".into(), |k| (k / 1024).to_string())
    );
    for (g, (name, _)) in gauges.iter().enumerate() {
        let overall = peaks.iter().map(|p| p[g]).fold(0.0, f64::max);
        assert!(overall > 0.0, "{name} never moved: the test does not reach the operator");
        assert!(overall <= bounds[g], "{name} reached {overall}, above what its horizon needs ({})", bounds[g]);
        // levelled off: the last tenth holds no more than the second
        assert!(
            peaks[9][g] <= peaks[1][g] * 1.05 + 8.0,
            "{name} keeps growing: {:?}",
            peaks.iter().map(|p| p[g]).collect::<Vec<_>>()
        );
    }
}
