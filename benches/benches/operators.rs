//! Throughput of the stream operators on decoded simulator batches (with the default faults:
//! duplicates, re-sends, out-of-order arrivals), in rows per second. Each iteration runs a
//! fresh operator over 16 batches of 8192 rows with a watermark after each, then ends it.
//! The dedup bench also prints its state: keys held and accounted bytes per key; the alert
//! benches how many events their rules emit.
//!
//! Run: `cargo bench -p citystream-benches --bench operators`

use arrow::array::RecordBatch;
use citystream_benches::sample_batches;
use citystream_operators::{BuildContext, Collector, Metrics, Operator, OperatorConfig};
use citystream_schemas::EventKind;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};

fn run(op: &mut dyn Operator, batches: &[(RecordBatch, i64)]) -> usize {
    let mut c = Collector::new(op.outputs().len());
    let mut rows = 0;
    for (b, wm) in batches {
        op.process_batch(b.clone(), &mut c).unwrap();
        op.on_watermark(*wm, &mut c).unwrap();
        rows += c.drain().map(|(_, b)| b.num_rows()).sum::<usize>();
    }
    op.on_end(&mut c).unwrap();
    rows + c.drain().map(|(_, b)| b.num_rows()).sum::<usize>()
}

fn build<C: OperatorConfig + serde::de::DeserializeOwned>(
    yaml: &str,
    batches: &[(RecordBatch, i64)],
    m: &Metrics,
) -> Box<dyn Operator> {
    let cfg: C = serde_saphyr::from_str(yaml).unwrap();
    cfg.build(&batches[0].0.schema(), &BuildContext { stage: "bench".into(), metrics: m.clone(), ..Default::default() })
        .unwrap()
}

fn operators(c: &mut Criterion) {
    use citystream_operators::{
        admit::AdmitConfig, alert::AlertConfig, compress::CompressConfig, dedup::DedupConfig,
        health::SensorHealthConfig, window::WindowConfig,
    };
    // an alert rule on raw readings (a slow reading per segment), each row in arrival order, or
    // held for the watermark and joined to an open neighbour's alert (the road graph of the
    // simulated city)
    let slow = "rule: slow\nalert_type: congestion\nseverity: info\nvalue: speed_kmh\ntime: ts\nbelow: true\n\
                raise: 20\nclear: 30\nopen_after: {raises: 2, within: 3m}\ncooldown: 5m\n";
    let graph = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/road_graph.csv");
    let joined = format!("{slow}join: {{road_graph: {graph}, within: 2}}\n");
    let traffic = sample_batches(EventKind::Traffic, 16, 8192);
    let env = sample_batches(EventKind::Environment, 4, 8192);
    let rows: usize = traffic.iter().map(|(b, _)| b.num_rows()).sum();
    let env_rows: usize = env.iter().map(|(b, _)| b.num_rows()).sum();

    // dedup state per key, measured once on the same input
    // (small batches, so the state is measured near its steady size rather than a batch's peak)
    let m = Metrics::new();
    let small = sample_batches(EventKind::Traffic, 400, 256);
    let mut op = build::<DedupConfig>("horizon: 10m\n", &small, &m);
    let mut per_key = Vec::new();
    let mut col = Collector::new(2);
    for (b, wm) in &small {
        op.process_batch(b.clone(), &mut col).unwrap();
        op.on_watermark(*wm, &mut col).unwrap();
        col.drain().for_each(drop);
        let keys = m.value("citystream_dedup_state_keys", &[("stage", "bench")]).unwrap_or(0.0);
        let bytes = m.value("citystream_dedup_state_bytes", &[("stage", "bench")]).unwrap_or(0.0);
        if keys > 0.0 {
            per_key.push((bytes / keys, keys));
        }
    }
    per_key.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (median, keys) = per_key[per_key.len() / 2];
    eprintln!("dedup state (horizon 10m, traffic): median {median:.1} bytes per key (accounted) at about {keys} keys");

    // how much the alert benches emit (so that they measure rules that open, join and resolve)
    let events = |yaml: &str| run(build::<AlertConfig>(yaml, &traffic, &Metrics::new()).as_mut(), &traffic);
    eprintln!("alert events (slow readings per segment): {} each alone, {} joined", events(slow), events(&joined));

    let mut g = c.benchmark_group("operators");
    g.throughput(Throughput::Elements(rows as u64));
    g.sample_size(10);
    type Make<'a> = Box<dyn Fn(&Metrics) -> Box<dyn Operator> + 'a>;
    let cases: Vec<(&str, Make)> = vec![
        ("dedup/traffic", Box::new(|m| build::<DedupConfig>("horizon: 10m\n", &traffic, m))),
        (
            "window/traffic_5m_segment",
            Box::new(|m| {
                build::<WindowConfig>(
                    "key: [segment_id]\nsize: 5m\nallowed_lateness: 1m\naggregates:\n  - {fn: count}\n  - {fn: sum, column: flow}\n  - {fn: mean, column: speed_kmh}\n  - {fn: weighted_mean, column: speed_kmh, weight: flow}\n  - {fn: quantile, column: speed_kmh, q: 0.85}\n",
                    &traffic,
                    m,
                )
            }),
        ),
        (
            "window/traffic_15m_hop_5m",
            Box::new(|m| {
                build::<WindowConfig>(
                    "key: [segment_id]\nsize: 15m\nslide: 5m\naggregates:\n  - {fn: count}\n  - {fn: mean, column: speed_kmh}\n",
                    &traffic,
                    m,
                )
            }),
        ),
        (
            "compress/traffic_swinging_door",
            Box::new(|m| {
                build::<CompressConfig>(
                    "key: [sensor_id]\nfields:\n  speed_kmh: {abs: 5.0}\n  occupancy: {abs: 0.02}\n",
                    &traffic,
                    m,
                )
            }),
        ),
        (
            "sensor_health/traffic_per_sensor",
            Box::new(|m| {
                build::<SensorHealthConfig>(
                    "key: [sensor_id]\nvalues: [flow, occupancy, speed_kmh]\nkeep: [segment_id]\n",
                    &traffic,
                    m,
                )
            }),
        ),
        ("alert/traffic_slow_segment", Box::new(|m| build::<AlertConfig>(slow, &traffic, m))),
        ("alert/traffic_slow_segment_joined", Box::new(|m| build::<AlertConfig>(&joined, &traffic, m))),
        (
            "admit/traffic_per_sensor",
            Box::new(|m| {
                build::<AdmitConfig>("per_key: {key: [sensor_id], rate: 10/m, burst: 20}\npolicy: drop\n", &traffic, m)
            }),
        ),
    ];
    for (name, make) in &cases {
        g.bench_function(*name, |b| {
            b.iter_batched(|| make(&Metrics::new()), |mut op| run(op.as_mut(), &traffic), BatchSize::LargeInput)
        });
    }
    g.throughput(Throughput::Elements(env_rows as u64));
    g.bench_function("compress/environment_8_fields", |b| {
        b.iter_batched(
            || {
                build::<CompressConfig>(
                    "key: [station_id]\nfields:\n  pm25: {abs: 3.0, rel: 0.1}\n  pm10: {abs: 5.0, rel: 0.1}\n  no2: {abs: 5.0, rel: 0.1}\n  o3: {abs: 5.0, rel: 0.1}\n  noise_db: {abs: 2.0}\n  temp_c: {abs: 0.5}\n  humidity: {abs: 3.0}\n  rain_mm_h: {abs: 0.5}\n",
                    &env,
                    &Metrics::new(),
                )
            },
            |mut op| run(op.as_mut(), &env),
            BatchSize::LargeInput,
        )
    });
    let camera = sample_batches(EventKind::Camera, 4, 8192);
    let thumbs: u64 = camera
        .iter()
        .map(|(b, _)| {
            use arrow::array::Array;
            b.column_by_name("thumbnail").unwrap().len() as u64
                - b.column_by_name("thumbnail").unwrap().null_count() as u64
        })
        .sum();
    g.throughput(Throughput::Elements(thumbs));
    g.bench_function("zstd/camera_thumbnails_level3", |b| {
        b.iter_batched(
            || {
                build::<citystream_operators::zstd_column::ZstdConfig>(
                    "column: thumbnail\nlevel: 3\n",
                    &camera,
                    &Metrics::new(),
                )
            },
            |mut op| run(op.as_mut(), &camera),
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, operators);
criterion_main!(benches);
