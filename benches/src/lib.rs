//! # citystream-benches
//!
//! Criterion benches (`benches/`) and the end-to-end throughput harness (`src/bin/e2e.rs`),
//! with the helpers they share: simulator payloads and process resource usage.

#![deny(missing_docs)]

use citystream_pipeline::simulator::{FaultConfig, Simulation, SimulatorConfig};
use citystream_schemas::EventKind;

/// `n` valid payloads of `kind` from the simulator (default city, no faults, seed 7).
pub fn sample_payloads(kind: EventKind, n: usize) -> Vec<Vec<u8>> {
    let cfg = SimulatorConfig { seed: 7, faults: FaultConfig::none(), ..SimulatorConfig::default() };
    let mut sim = Simulation::new(cfg, 0);
    let mut out = Vec::with_capacity(n);
    let mut step = Vec::new();
    while out.len() < n && sim.step(&mut step) {
        out.extend(step.drain(..).filter(|m| m.kind == kind).map(|m| m.payload));
    }
    out.truncate(n);
    out
}

/// CPU time (user + system) and peak resident memory of this process so far.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    /// User plus system CPU seconds.
    pub cpu_s: f64,
    /// Peak resident set size, MiB.
    pub peak_rss_mib: f64,
}

/// Reads [`Usage`] of this process with `getrusage`.
pub fn usage() -> Usage {
    rusage(libc::RUSAGE_SELF)
}

/// [`Usage`] of this process's children that have been waited for (their CPU summed, the
/// largest peak RSS among them).
pub fn children_usage() -> Usage {
    rusage(libc::RUSAGE_CHILDREN)
}

fn rusage(who: libc::c_int) -> Usage {
    // SAFETY: getrusage fills the zeroed struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `who` is RUSAGE_SELF or RUSAGE_CHILDREN and `ru` is a valid out-pointer.
    unsafe { libc::getrusage(who, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Usage { cpu_s: tv(ru.ru_utime) + tv(ru.ru_stime), peak_rss_mib: ru.ru_maxrss as f64 / 1024.0 }
}

/// The median of `v` (the upper one of an even count); `v` must not be empty.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Decoded typed batches of `kind` from a simulator run with the default faults (duplicates,
/// re-sends, out-of-order), `rows` rows each, in arrival order, with the watermark each batch
/// may be followed by (the newest simulated time minus two minutes).
pub fn sample_batches(kind: EventKind, batches: usize, rows: usize) -> Vec<(arrow::array::RecordBatch, i64)> {
    use citystream_schemas::raw::RawBatchBuilder;
    use citystream_schemas::{DecodeOptions, Decoder};
    let cfg = SimulatorConfig {
        seed: 7,
        duration: citystream_operators::Duration::from_secs(30 * 86_400),
        ..SimulatorConfig::default()
    };
    let mut sim = Simulation::new(cfg, 0);
    let decoder =
        Decoder::new(kind, DecodeOptions { max_past_ms: None, max_future_ms: None, ..DecodeOptions::default() });
    let mut out = Vec::with_capacity(batches);
    let mut step = Vec::new();
    let mut b = RawBatchBuilder::with_capacity(rows, rows * 256);
    let mut offset = 0;
    while out.len() < batches && sim.step(&mut step) {
        for m in step.drain(..).filter(|m| m.kind == kind) {
            b.append("bench", 0, offset, m.arrival_ms, &m.payload);
            offset += 1;
        }
        if b.len() >= rows {
            let decoded = decoder.decode(&b.finish()).expect("decodes");
            out.push((decoded.valid, sim.now_ms() - 120_000));
        }
    }
    out
}

/// The decode → Parquet pipeline of Kafka and files modes, over `source` (a YAML map entry).
/// Dead letters and late events are partitioned by day, as in `deploy/local.yaml`: small
/// tables, whose hourly files would be most of the files written.
pub fn decode_to_parquet(source_name: &str, source: &str, lake: &std::path::Path, extra_runtime: &str) -> String {
    let decode = |kind: &str| {
        format!(
            "  {kind}: {{type: decode, input: {source_name}.{kind}, kind: {kind}, max_past: null, max_future: null}}\n"
        )
    };
    format!(
        "sources:\n{source}stages:\n{}{}{}sinks:\n  lake:\n    type: parquet\n    path: {d}\n    tables: {{traffic: traffic, camera: camera, environment: environment, dead_letters: [traffic.dead_letters, camera.dead_letters, environment.dead_letters], traffic_late: traffic.late_events, camera_late: camera.late_events, environment_late: environment.late_events}}\n    daily: [dead_letters, traffic_late, camera_late, environment_late]\nruntime: {{status_interval: null{extra_runtime}}}\n",
        decode("traffic"),
        decode("camera"),
        decode("environment"),
        d = lake.display()
    )
}

/// Kafka helpers of the harnesses (feature `kafka`).
#[cfg(feature = "kafka")]
pub mod kafka {
    use citystream_pipeline::kafka::KafkaTopics;

    /// Creates `{prefix}.traffic`, `.camera` and `.environment` with `partitions` each and no
    /// time retention (the simulated events carry old timestamps).
    pub async fn create_topics(brokers: &str, prefix: &str, partitions: i32) -> anyhow::Result<KafkaTopics> {
        use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
        let topics = KafkaTopics {
            traffic: Some(format!("{prefix}.traffic")),
            camera: Some(format!("{prefix}.camera")),
            environment: Some(format!("{prefix}.environment")),
        };
        let admin: AdminClient<rdkafka::client::DefaultClientContext> =
            rdkafka::ClientConfig::new().set("bootstrap.servers", brokers).create()?;
        let names = [&topics.traffic, &topics.camera, &topics.environment];
        let new: Vec<NewTopic> = names
            .iter()
            .filter_map(|n| n.as_deref())
            .map(|n| NewTopic::new(n, partitions, TopicReplication::Fixed(1)).set("retention.ms", "-1"))
            .collect();
        for r in admin.create_topics(&new, &AdminOptions::new()).await? {
            r.map_err(|(t, e)| anyhow::anyhow!("creating {t}: {e}"))?;
        }
        Ok(topics)
    }
}
