//! End-to-end throughput harness: runs the embedded default pipeline (simulator → decode →
//! zstd Parquet) over a simulated span and prints events/s, CPU-seconds per million events and
//! peak RSS. The simulator's own cost is measured separately (`--generate-only`) so the
//! pipeline's share can be read as a difference.
//!
//! Run: `cargo run --release -p citystream-benches --bin e2e -- --days 1 --repeat 3`
//!
//! `--models fp32` (or `int8`) runs the pipeline with the fp32 (or int8) model variants in
//! place of the configured ones (`congestion_small`, `incident_fp32`) and prints, beside CPU-seconds, the joules per million events of the energy
//! account (table `energy`: RAPL when readable, else the configured watts-per-core model) and
//! of the inference stages alone:
//! `cargo run --release -p citystream-benches --bin e2e -- --days 1 --repeat 3 --models int8`
//!
//! Kafka mode (feature `kafka`, a broker from `deploy/kafka/start.sh`): produces the simulated
//! days into fresh topics once, then per run consumes them with the pipeline
//! (Kafka → decode → Parquet) and, beside it, the ceiling: the same consumer settings only
//! decoding, no sink.
//! `cargo run --release -p citystream-benches --features kafka --bin e2e -- --kafka 127.0.0.1:9092`
//!
//! Files mode (a backfill): writes the simulated days once as zstd JSON lines, one file per
//! kind, then per run reads them with the files source through the same decode → Parquet
//! pipeline as Kafka mode, so the two compare:
//! `cargo run --release -p citystream-benches --bin e2e -- --files`

use std::time::Instant;

use citystream_benches::{median, usage};
use citystream_operators::Metrics;
use citystream_pipeline::config::{self, plan::plan};
use citystream_pipeline::runtime::{self, StopHandle};
use citystream_pipeline::simulator::{Simulation, SimulatorConfig};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Simulated days (about 300k events per day with the default city).
    #[arg(long, default_value_t = 1)]
    days: u64,
    /// Runs; the median is reported.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Only run the simulator (no pipeline): the cost of generating the events.
    #[arg(long)]
    generate_only: bool,
    /// Pipeline config to run (its `sinks.*.path` is replaced by a temporary folder).
    #[arg(long, default_value = "deploy/local.yaml")]
    config: std::path::PathBuf,
    /// Print thread CPU-seconds per million events for every task (median over runs).
    #[arg(long)]
    per_stage: bool,
    /// Model variant in the pipeline: `small` (as configured: congestion_small, incident_fp32),
    /// `fp32` or `int8`.
    #[arg(long, default_value = "small")]
    models: String,
    /// Files mode: the same decode → Parquet pipeline as Kafka mode, reading zstd JSON lines.
    #[arg(long)]
    files: bool,
    /// Kafka mode: brokers to produce to and consume from.
    #[cfg(feature = "kafka")]
    #[arg(long)]
    kafka: Option<String>,
    /// Kafka mode: a librdkafka consumer property (`key=value`, repeatable) for both the
    /// pipeline's source and the ceiling's consumer, e.g. `max.partition.fetch.bytes=8388608`.
    #[cfg(feature = "kafka")]
    #[arg(long = "consumer-property")]
    consumer_properties: Vec<String>,
    /// Kafka mode: a field of the pipeline's `kafka` source (`key: value` YAML, repeatable),
    /// e.g. `max_drift: null`.
    #[cfg(feature = "kafka")]
    #[arg(long = "source-field")]
    source_fields: Vec<String>,
}

/// Per task (source, stage, sink), the thread CPU-s per million events of the runs so far.
#[derive(Default)]
struct Profile {
    per_task: std::collections::BTreeMap<String, Vec<f64>>,
    files: Vec<f64>,
}

impl Profile {
    /// Adds one run: its tasks' thread CPU and the Parquet files it wrote.
    fn add(&mut self, metrics: &citystream_operators::Metrics, report: &citystream_pipeline::RunReport, events: u64) {
        for (labels, ns) in metrics.series("citystream_stage_cpu_nanoseconds_total") {
            self.per_task.entry(labels).or_default().push(ns / 1e9 / events as f64 * 1e6);
        }
        self.files.push(report.tables.values().flat_map(|t| t.values()).map(|t| t.files as f64).sum());
    }

    /// Prints the medians, largest first, and what is left of `cpu_per_m` (the process's CPU
    /// per million events): the source threads (a Kafka consumer, librdkafka, a files reader)
    /// and the runtime.
    fn print(self, cpu_per_m: f64) {
        if self.per_task.is_empty() {
            return;
        }
        let mut rows: Vec<(String, f64)> = self.per_task.into_iter().map(|(k, v)| (k, median(v))).collect();
        rows.sort_by(|a, b| b.1.total_cmp(&a.1));
        let total: f64 = rows.iter().map(|r| r.1).sum();
        println!(
            "thread CPU-s per million events by task (medians; {total:.2} of {cpu_per_m:.2}; Parquet files written: {:.0}):",
            median(self.files)
        );
        for (k, v) in rows {
            println!("  {k:<48} {v:>6.2}  {:>5.1}%", v / cpu_per_m * 100.0);
        }
        let rest = cpu_per_m - total;
        println!("  {:<48} {rest:>6.2}  {:>5.1}%", "(sources' threads, librdkafka, runtime)", rest / cpu_per_m * 100.0);
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    #[cfg(feature = "kafka")]
    if let Some(brokers) = &args.kafka {
        let props = args
            .consumer_properties
            .iter()
            .map(|p| p.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| anyhow::anyhow!("--consumer-property takes key=value"))?;
        return kafka::run(&rt, brokers, args.days, args.repeat, &props, &args.source_fields);
    }
    if args.files {
        return files::run(&rt, args.days, args.repeat);
    }
    let mut rates = Vec::new();
    let mut cpu_per_m = Vec::new();
    let mut events = 0u64;
    let mut joules_per_m = Vec::new();
    let mut profile = Profile::default();
    let mut infer_joules_per_m = Vec::new();
    let mut gpu_s_per_m = Vec::new();
    for run in 0..args.repeat {
        let before = usage();
        let t0 = Instant::now();
        if args.generate_only {
            let cfg = SimulatorConfig {
                duration: citystream_operators::Duration::from_secs(args.days * 86_400),
                ..SimulatorConfig::default()
            };
            let mut sim = Simulation::new(cfg, 0);
            let mut buf = Vec::new();
            let mut n = 0u64;
            while sim.step(&mut buf) {
                n += buf.len() as u64;
                buf.clear();
            }
            events = n;
        } else {
            let dir = tempfile::tempdir()?;
            let text = std::fs::read_to_string(&args.config)?;
            // SAFETY: single-threaded at this point; the variables are read by the config loader below.
            unsafe {
                std::env::set_var("CITYSTREAM_DATA", dir.path());
                std::env::set_var("CITYSTREAM_METRICS_ADDR", "127.0.0.1:0");
                std::env::set_var("CITYSTREAM_CONTROL_ADDR", "127.0.0.1:0");
            }
            let text = text.replace("duration: 1d", &format!("duration: {}d", args.days));
            // no shadow model: each variant runs alone, so the comparison is of one model
            let text: String = text
                .lines()
                .filter(|l| !l.trim_start().starts_with("shadow:") && !l.contains("congestion.shadow"))
                .map(|l| format!("{l}\n"))
                .collect::<String>()
                .replace(" predictions_shadow,", "");
            // the config runs congestion_small and incident_fp32 (there is no small incident model)
            let text = match args.models.as_str() {
                "small" => text,
                "fp32" => text.replace("congestion_small.onnx", "congestion_fp32.onnx"),
                "int8" => text
                    .replace("congestion_small.onnx", "congestion_int8.onnx")
                    .replace("incident_fp32.onnx", "incident_int8.onnx"),
                other => anyhow::bail!("--models {other}: expected small, fp32 or int8"),
            };
            let mut raw = config::load_str(&text, &args.config.display().to_string())?;
            raw.runtime.status_interval = None;
            raw.runtime.metrics_addr = None;
            let p = plan(raw, "bench")?;
            let (_stop, rx) = StopHandle::new();
            let metrics = Metrics::new();
            let report = rt.block_on(runtime::run(p, metrics.clone(), rx))?;
            events = report.source_messages.values().sum();
            // thread CPU per task (stages, sinks, the simulator), for the per-stage profile
            profile.add(&metrics, &report, events);
            if let Some(e) = energy_joules(&dir.path().join("lake/energy"))? {
                joules_per_m.push(e.all / events as f64 * 1e6);
                infer_joules_per_m.push(e.infer / events as f64 * 1e6);
                if let Some(g) = e.gpu_s {
                    gpu_s_per_m.push(g / events as f64 * 1e6);
                }
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        let after = usage();
        let cpu = after.cpu_s - before.cpu_s;
        rates.push(events as f64 / secs);
        cpu_per_m.push(cpu / events as f64 * 1e6);
        eprintln!(
            "run {run}: {events} events in {secs:.2} s, {:.0} events/s, {:.2} CPU-s per million events",
            events as f64 / secs,
            cpu / events as f64 * 1e6
        );
    }
    let mode =
        if args.generate_only { "simulator only".to_owned() } else { format!("pipeline ({} models)", args.models) };
    let cpu_per_m = median(cpu_per_m);
    println!(
        "{mode}: {events} events/run, median {:.0} events/s, median {cpu_per_m:.2} CPU-s per million events, peak RSS {:.0} MiB ({} runs)",
        median(rates),
        usage().peak_rss_mib,
        args.repeat
    );
    if !joules_per_m.is_empty() {
        println!(
            "energy: median {:.1} J per million events (all tasks), {:.1} J per million events in the inference stages",
            median(joules_per_m),
            median(infer_joules_per_m)
        );
    }
    if !gpu_s_per_m.is_empty() {
        println!(
            "gpu: median {:.3} GPU-busy seconds per million events (NVML, shared among the stages on CUDA)",
            median(gpu_s_per_m)
        );
    }
    if args.per_stage {
        profile.print(cpu_per_m);
    }
    Ok(())
}

/// What one run's `energy` table adds up to.
struct EnergyTotals {
    /// Joules of every task.
    all: f64,
    /// Joules of the `infer` stages (`congestion`, `incident_scores`).
    infer: f64,
    /// GPU busy seconds (NVML), `None` where no row measured any.
    gpu_s: Option<f64>,
}

/// The totals of the `energy` table under `dir`; `None` when the run wrote no energy table.
fn energy_joules(dir: &std::path::Path) -> anyhow::Result<Option<EnergyTotals>> {
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::Float64Type;
    if !dir.exists() {
        return Ok(None);
    }
    let (mut all, mut infer, mut gpu_s) = (0.0, 0.0, None::<f64>);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(d)? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                let reader =
                    parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(std::fs::File::open(&p)?, 8192)?;
                for b in reader {
                    let b = b?;
                    let stage = b.column_by_name("stage").expect("energy has stage").as_string::<i32>();
                    let joules = b.column_by_name("joules").expect("energy has joules").as_primitive::<Float64Type>();
                    let gpu = b.column_by_name("gpu_s").map(|c| c.as_primitive::<Float64Type>().clone());
                    for i in 0..b.num_rows() {
                        if let Some(g) = gpu.as_ref().filter(|g| g.is_valid(i)) {
                            *gpu_s.get_or_insert(0.0) += g.value(i);
                        }
                        all += joules.value(i);
                        if matches!(stage.value(i), "congestion" | "incident_scores") {
                            infer += joules.value(i);
                        }
                    }
                }
            }
        }
    }
    Ok(Some(EnergyTotals { all, infer, gpu_s }))
}

/// One run of the pipeline in `yaml`: the events its sources read, its wall seconds and the
/// process's CPU seconds; its per-task CPU goes into `profile`.
fn measured_run(rt: &tokio::runtime::Runtime, yaml: &str, profile: &mut Profile) -> anyhow::Result<(u64, f64, f64)> {
    let p = plan(config::load_str(yaml, "bench")?, "bench")?;
    let before = usage();
    let t0 = Instant::now();
    let (_stop, rx) = StopHandle::new();
    let metrics = Metrics::new();
    let report = rt.block_on(runtime::run(p, metrics.clone(), rx))?;
    let secs = t0.elapsed().as_secs_f64();
    let n: u64 = report.source_messages.values().sum();
    let cpu = usage().cpu_s - before.cpu_s;
    profile.add(&metrics, &report, n);
    Ok((n, secs, cpu))
}

mod files {
    use std::io::Write as _;
    use std::time::Instant;

    use citystream_benches::usage;

    use citystream_pipeline::simulator::{Simulation, SimulatorConfig};
    use citystream_schemas::EventKind;

    pub fn run(rt: &tokio::runtime::Runtime, days: u64, repeat: usize) -> anyhow::Result<()> {
        let archive = tempfile::tempdir()?;
        let cfg = SimulatorConfig {
            duration: citystream_operators::Duration::from_secs(days * 86_400),
            ..SimulatorConfig::default()
        };
        let t0 = Instant::now();
        let mut writers = EventKind::ALL
            .iter()
            .map(|k| {
                let f = std::fs::File::create(archive.path().join(format!("{k}.jsonl.zst")))?;
                zstd::stream::write::Encoder::new(std::io::BufWriter::new(f), 3)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut sim = Simulation::new(cfg, 0);
        let (mut buf, mut written) = (Vec::new(), 0u64);
        while sim.step(&mut buf) {
            for m in buf.drain(..) {
                let w = &mut writers[EventKind::ALL.iter().position(|k| *k == m.kind).expect("kind")];
                w.write_all(&m.payload)?;
                w.write_all(b"\n")?;
                written += 1;
            }
        }
        for w in writers {
            w.finish()?.flush()?;
        }
        let bytes: u64 = std::fs::read_dir(archive.path())?
            .map(|e| e.map(|e| e.metadata().map(|m| m.len()).unwrap_or(0)))
            .sum::<Result<u64, _>>()?;
        eprintln!(
            "wrote {written} lines ({:.1} MiB of zstd) in {:.1} s",
            bytes as f64 / 1048576.0,
            t0.elapsed().as_secs_f64()
        );
        let (mut rates, mut cpus, mut profile) = (Vec::new(), Vec::new(), super::Profile::default());
        for run in 0..repeat {
            let dir = tempfile::tempdir()?;
            let a = archive.path().display();
            let source = format!(
                "  archive:\n    type: files\n    paths: {{traffic: {a}/traffic.jsonl.zst, camera: {a}/camera.jsonl.zst, environment: {a}/environment.jsonl.zst}}\n    checkpoint_interval: 5s\n"
            );
            let state = format!(", state_dir: {}", dir.path().join("state").display());
            let yaml = citystream_benches::decode_to_parquet("archive", &source, &dir.path().join("lake"), &state);
            let (n, secs, cpu) = super::measured_run(rt, &yaml, &mut profile)?;
            rates.push(n as f64 / secs);
            cpus.push(cpu / n as f64 * 1e6);
            eprintln!(
                "run {run}: {n} events in {secs:.2} s, {:.0} events/s, {:.2} CPU-s per million events",
                n as f64 / secs,
                cpu / n as f64 * 1e6
            );
        }
        let cpu_per_m = super::median(cpus);
        println!(
            "files pipeline (zstd JSON lines -> decode -> Parquet): median {:.0} events/s, {cpu_per_m:.2} CPU-s per million events, peak RSS {:.0} MiB ({repeat} runs)",
            super::median(rates),
            usage().peak_rss_mib
        );
        profile.print(cpu_per_m);
        Ok(())
    }
}

#[cfg(feature = "kafka")]
mod kafka {
    use std::time::{Duration, Instant};

    use citystream_benches::usage;
    use citystream_pipeline::kafka::KafkaTopics;
    use citystream_pipeline::simulator::SimulatorConfig;
    use citystream_schemas::raw::RawBatchBuilder;
    use citystream_schemas::{DecodeOptions, Decoder, EventKind};
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::Message;

    use super::median;

    /// Consumes every topic to the end, decoding in batches of 8192: the ceiling.
    async fn ceiling(
        brokers: &str,
        topics: &KafkaTopics,
        group: &str,
        expected: u64,
        props: &[(String, String)],
    ) -> anyhow::Result<(u64, f64)> {
        let mut cc = rdkafka::ClientConfig::new();
        cc.set("bootstrap.servers", brokers)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest");
        // the pipeline's source's fetch settings
        for (k, v) in citystream_pipeline::kafka::CONSUMER_DEFAULTS {
            cc.set(*k, *v);
        }
        for (k, v) in props {
            cc.set(k, v);
        }
        let consumer: StreamConsumer = cc.create()?;
        let t0 = Instant::now();
        let mut first = None;
        let names: Vec<&str> =
            [&topics.traffic, &topics.camera, &topics.environment].iter().filter_map(|t| t.as_deref()).collect();
        consumer.subscribe(&names)?;
        let decoders: Vec<Decoder> = EventKind::ALL
            .iter()
            .map(|k| Decoder::new(*k, DecodeOptions { max_past_ms: None, max_future_ms: None, ..Default::default() }))
            .collect();
        let mut builders: Vec<RawBatchBuilder> =
            EventKind::ALL.iter().map(|_| RawBatchBuilder::with_capacity(8192, 8192 * 256)).collect();
        let mut n = 0u64;
        while n < expected {
            let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await??;
            first.get_or_insert_with(|| t0.elapsed().as_secs_f64());
            let port = names.iter().position(|t| *t == m.topic()).unwrap_or(0);
            builders[port].append(m.topic(), m.partition(), m.offset(), 0, m.payload().unwrap_or_default());
            n += 1;
            if builders[port].len() >= 8192 {
                decoders[port].decode(&builders[port].finish())?;
            }
        }
        for (b, d) in builders.iter_mut().zip(&decoders) {
            d.decode(&b.finish())?;
        }
        Ok((n, first.unwrap_or_default()))
    }

    pub fn run(
        rt: &tokio::runtime::Runtime,
        brokers: &str,
        days: u64,
        repeat: usize,
        props: &[(String, String)],
        source_fields: &[String],
    ) -> anyhow::Result<()> {
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
        let prefix = format!("bench-{stamp}");
        let topics = rt.block_on(citystream_benches::kafka::create_topics(brokers, &prefix, 3))?;
        let cfg = SimulatorConfig {
            duration: citystream_operators::Duration::from_secs(days * 86_400),
            ..SimulatorConfig::default()
        };
        let t0 = Instant::now();
        let (_, produced) =
            rt.block_on(citystream_pipeline::kafka::produce::simulate_into(brokers, cfg, &topics, None))?;
        eprintln!("produced {produced} messages in {:.1} s", t0.elapsed().as_secs_f64());
        let (mut pipe_rate, mut pipe_cpu, mut ceil_rate, mut ceil_cpu) = (vec![], vec![], vec![], vec![]);
        let mut profile = super::Profile::default();
        for run in 0..repeat {
            let dir = tempfile::tempdir()?;
            let source = format!(
                "  kafka:\n    type: kafka\n    brokers: {brokers}\n    group_id: {prefix}-p{run}\n    topics: {{traffic: {t}, camera: {c}, environment: {e}}}\n    stop_when_idle: 2s\n    checkpoint_interval: 5s\n    properties: {{{p}}}\n{f}",
                f = source_fields.iter().map(|f| format!("    {f}\n")).collect::<String>(),
                p = props.iter().map(|(k, v)| format!("{k}: \"{v}\"")).collect::<Vec<_>>().join(", "),
                t = topics.traffic.as_ref().unwrap(),
                c = topics.camera.as_ref().unwrap(),
                e = topics.environment.as_ref().unwrap(),
            );
            let yaml = citystream_benches::decode_to_parquet("kafka", &source, dir.path(), "");
            let (n, secs, cpu) = super::measured_run(rt, &yaml, &mut profile)?;
            // the idle wait at the end is not work: take it off the wall time
            let secs = secs - 2.0;
            pipe_rate.push(n as f64 / secs);
            pipe_cpu.push(cpu / n as f64 * 1e6);
            let before = usage();
            let t0 = Instant::now();
            let (m, first) = rt.block_on(ceiling(brokers, &topics, &format!("{prefix}-c{run}"), produced, props))?;
            let secs_c = t0.elapsed().as_secs_f64();
            let cpu_c = usage().cpu_s - before.cpu_s;
            ceil_rate.push(m as f64 / secs_c);
            ceil_cpu.push(cpu_c / m as f64 * 1e6);
            eprintln!(
                "run {run}: pipeline {:.0} ev/s {:.2} CPU-s/M; ceiling {:.0} ev/s {:.2} CPU-s/M (first message after {first:.2} s)",
                n as f64 / secs,
                cpu / n as f64 * 1e6,
                m as f64 / secs_c,
                cpu_c / m as f64 * 1e6
            );
        }
        let (pr, pc, cr, cc) = (median(pipe_rate), median(pipe_cpu), median(ceil_rate), median(ceil_cpu));
        println!("kafka pipeline: median {pr:.0} events/s, {pc:.2} CPU-s per million events");
        println!("kafka ceiling (consume + decode only): median {cr:.0} events/s, {cc:.2} CPU-s per million events");
        println!(
            "pipeline/ceiling: {:.2}x throughput, {:.2}x CPU per event; peak RSS {:.0} MiB ({repeat} runs)",
            pr / cr,
            pc / cc,
            usage().peak_rss_mib
        );
        profile.print(pc);
        Ok(())
    }
}
