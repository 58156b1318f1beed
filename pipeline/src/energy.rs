//! The energy and carbon account: per task (source, stage, sink) and interval, the thread CPU
//! time it used, the rows it took in and handed on, the joules that CPU time cost and the
//! grams of CO2-equivalent at the grid's intensity — written to an `energy` Parquet table and
//! published as metrics.
//!
//! Joules come from Intel RAPL (`/sys/class/powercap/intel-rapl:*/energy_uj`) when the machine
//! exposes it: the package energy of the interval is shared among tasks by their CPU time over
//! the machine's busy CPU time (`/proc/stat`). Otherwise from a documented model:
//! `cpu_s × watts_per_busy_core`, plus `idle_watts × interval` shared by CPU time. Each row says
//! which (`source`). GPU time (`gpu_s`) is the NVML busy time of the device shared among the
//! `infer` stages on the CUDA provider (`crate::gpu`); absent without NVML or such a stage,
//! never invented.
//! Carbon intensity (gCO2e/kWh) is a constant, an hourly series from a CSV file, or read live
//! from a Kafka topic (`carbon_topic`: JSON `{"hour": "2026-03-02T08:00:00Z", "g_per_kwh": 412}`
//! for an hour of a forecast or measured series, or `{"g_per_kwh": 412}` for "from now on").

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use citystream_operators::{Duration, EnvString, Metrics};
use serde::Deserialize;

fn d_interval() -> Duration {
    Duration::from_secs(60)
}
fn d_watts() -> f64 {
    15.0
}
fn d_intensity() -> f64 {
    350.0
}

/// `runtime.energy` in YAML.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnergyConfig {
    /// Where the `energy` table is written (a Parquet root, e.g. the lake's path).
    pub path: EnvString,
    /// Accounting interval. Default `1m`.
    #[serde(default = "d_interval")]
    pub interval: Duration,
    /// Model: watts drawn per fully busy core. Default 15 W (a server core under load, package
    /// share; see docs/ARCHITECTURE.md).
    #[serde(default = "d_watts")]
    pub watts_per_busy_core: f64,
    /// Model: baseline watts attributed to the pipeline while it runs, shared by CPU time.
    /// Default 0.
    #[serde(default)]
    pub idle_watts: f64,
    /// Use RAPL when readable. Default true.
    #[serde(default = "d_true")]
    pub rapl: bool,
    /// Grid carbon intensity, gCO2e per kWh, when no series is given. Default 350.
    #[serde(default = "d_intensity")]
    pub carbon_g_per_kwh: f64,
    /// An hourly intensity series: CSV lines `2026-03-02T08:00:00Z,412` (hour start, g/kWh).
    #[serde(default)]
    pub carbon_file: Option<EnvString>,
    /// A Kafka topic of intensity messages, read from its start and then live (overrides the
    /// file for the hours it names).
    #[serde(default)]
    pub carbon_topic: Option<CarbonTopicConfig>,
}

/// Where live grid intensity comes from on Kafka.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CarbonTopicConfig {
    /// `bootstrap.servers`.
    pub brokers: EnvString,
    /// The topic, e.g. `city.grid_intensity`.
    pub topic: String,
    /// Any librdkafka consumer property.
    #[serde(default)]
    pub properties: BTreeMap<String, EnvString>,
}

fn d_true() -> bool {
    true
}

/// Counters of one task at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    /// Thread CPU nanoseconds so far.
    pub cpu_ns: u64,
    /// Rows taken in so far.
    pub rows_in: u64,
    /// Rows handed on so far.
    pub rows_out: u64,
    /// Bytes taken in so far (payload bytes for a source, Arrow bytes for stages and sinks).
    pub bytes_in: u64,
    /// Bytes handed on so far.
    pub bytes_out: u64,
}

/// Where the joules of an interval come from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Power {
    /// The model: watts per busy core, idle watts, over `seconds`.
    Model {
        /// W per busy core.
        watts_per_busy_core: f64,
        /// Baseline W.
        idle_watts: f64,
        /// Interval length.
        seconds: f64,
    },
    /// RAPL: the package joules of the interval and the machine's busy CPU seconds.
    Rapl {
        /// Package energy of the interval.
        joules: f64,
        /// Busy CPU seconds of the whole machine in the interval.
        machine_busy_s: f64,
    },
}

/// One row of the `energy` table.
#[derive(Debug, Clone, PartialEq)]
pub struct EnergyRow {
    /// Interval start (UTC ms).
    pub ts: i64,
    /// The task.
    pub stage: String,
    /// Thread CPU seconds.
    pub cpu_s: f64,
    /// GPU busy seconds (NVML) of an `infer` stage on the CUDA provider; `None` elsewhere and
    /// without NVML.
    pub gpu_s: Option<f64>,
    /// Joules.
    pub joules: f64,
    /// Grams CO2e.
    pub gco2e: f64,
    /// Rows in.
    pub events_in: i64,
    /// Rows out.
    pub events_out: i64,
    /// Bytes in.
    pub bytes_in: i64,
    /// Bytes out.
    pub bytes_out: i64,
    /// `rapl` or `model`.
    pub source: &'static str,
    /// Grid intensity used.
    pub g_per_kwh: f64,
}

/// The rows of one interval from counter samples at its start and end; `gpu_s` holds the GPU
/// busy seconds of the tasks that had any.
pub fn account(
    ts: i64,
    before: &BTreeMap<String, Sample>,
    after: &BTreeMap<String, Sample>,
    power: Power,
    g_per_kwh: f64,
    gpu_s: &BTreeMap<String, f64>,
) -> Vec<EnergyRow> {
    let deltas: Vec<(&String, f64, Sample)> = after
        .iter()
        .map(|(k, a)| {
            let b = before.get(k).copied().unwrap_or_default();
            let d = Sample {
                cpu_ns: 0,
                rows_in: a.rows_in.saturating_sub(b.rows_in),
                rows_out: a.rows_out.saturating_sub(b.rows_out),
                bytes_in: a.bytes_in.saturating_sub(b.bytes_in),
                bytes_out: a.bytes_out.saturating_sub(b.bytes_out),
            };
            (k, a.cpu_ns.saturating_sub(b.cpu_ns) as f64 / 1e9, d)
        })
        .collect();
    let total_cpu: f64 = deltas.iter().map(|d| d.1).sum();
    deltas
        .into_iter()
        .map(|(stage, cpu_s, d)| {
            let share = if total_cpu > 0.0 { cpu_s / total_cpu } else { 0.0 };
            let (joules, source) = match power {
                Power::Model { watts_per_busy_core, idle_watts, seconds } => {
                    (cpu_s * watts_per_busy_core + idle_watts * seconds * share, "model")
                }
                Power::Rapl { joules, machine_busy_s } => {
                    let part = if machine_busy_s > 0.0 { (cpu_s / machine_busy_s).min(1.0) } else { 0.0 };
                    (joules * part, "rapl")
                }
            };
            EnergyRow {
                ts,
                stage: stage.clone(),
                cpu_s,
                gpu_s: gpu_s.get(stage).copied(),
                joules,
                gco2e: joules / 3.6e6 * g_per_kwh,
                events_in: d.rows_in as i64,
                events_out: d.rows_out as i64,
                bytes_in: d.bytes_in as i64,
                bytes_out: d.bytes_out as i64,
                source,
                g_per_kwh,
            }
        })
        .collect()
}

/// Hours of intensity kept (two years): beyond it the earliest hours are forgotten, so a topic
/// that keeps publishing (or names hours far apart) cannot grow the process without bound.
pub const MAX_HOURS: usize = 2 * 366 * 24;

/// Carbon intensity: per hour where a series names it, else the latest live value, else the
/// constant. Clones share the series (a Kafka reader updates every holder). At most
/// [`MAX_HOURS`] hours are held.
#[derive(Debug, Clone, Default)]
pub struct Intensity {
    constant: f64,
    hourly: Arc<std::sync::RwLock<BTreeMap<i64, f64>>>,
    latest: Arc<std::sync::RwLock<Option<f64>>>,
}

/// Keeps the latest [`MAX_HOURS`] hours of `hourly`.
fn forget_earliest(hourly: &mut BTreeMap<i64, f64>) {
    while hourly.len() > MAX_HOURS {
        hourly.pop_first();
    }
}

impl Intensity {
    /// From the config (reads the series file).
    pub fn from_config(cfg: &EnergyConfig) -> Result<Self, String> {
        let mut hourly = BTreeMap::new();
        if let Some(f) = &cfg.carbon_file {
            let text = std::fs::read_to_string(f.as_str()).map_err(|e| format!("{}: {e}", f.as_str()))?;
            for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#')) {
                let (t, v) =
                    line.split_once(',').ok_or(format!("{}:{}: expected `hour,g_per_kwh`", f.as_str(), i + 1))?;
                let t = chrono::DateTime::parse_from_rfc3339(t.trim())
                    .map_err(|e| format!("{}:{}: {e}", f.as_str(), i + 1))?
                    .timestamp_millis();
                let v: f64 = v.trim().parse().map_err(|e| format!("{}:{}: {e}", f.as_str(), i + 1))?;
                hourly.insert(t.div_euclid(3_600_000), v);
            }
            forget_earliest(&mut hourly);
        }
        Ok(Self {
            constant: cfg.carbon_g_per_kwh,
            hourly: Arc::new(std::sync::RwLock::new(hourly)),
            latest: Default::default(),
        })
    }

    /// The intensity at `ts_ms`: the series' hour, else the latest live value, else the constant.
    pub fn at(&self, ts_ms: i64) -> f64 {
        let hourly = self.hourly.read().unwrap_or_else(|e| e.into_inner());
        hourly
            .get(&ts_ms.div_euclid(3_600_000))
            .copied()
            .or(*self.latest.read().unwrap_or_else(|e| e.into_inner()))
            .unwrap_or(self.constant)
    }

    /// Applies one intensity message (JSON `{"hour": RFC 3339, "g_per_kwh": n}` or
    /// `{"g_per_kwh": n}`).
    pub fn apply_message(&self, payload: &[u8]) -> Result<(), String> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Msg {
            #[serde(default)]
            hour: Option<String>,
            g_per_kwh: f64,
        }
        let m: Msg = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
        if !m.g_per_kwh.is_finite() || m.g_per_kwh < 0.0 {
            return Err(format!("g_per_kwh {} is not a non-negative number", m.g_per_kwh));
        }
        match m.hour {
            Some(h) => {
                let t = chrono::DateTime::parse_from_rfc3339(&h).map_err(|e| format!("hour `{h}`: {e}"))?;
                let mut hourly = self.hourly.write().unwrap_or_else(|e| e.into_inner());
                hourly.insert(t.timestamp_millis().div_euclid(3_600_000), m.g_per_kwh);
                forget_earliest(&mut hourly);
            }
            None => *self.latest.write().unwrap_or_else(|e| e.into_inner()) = Some(m.g_per_kwh),
        }
        Ok(())
    }

    /// Hours of the series held.
    pub fn hours(&self) -> usize {
        self.hourly.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Reads `cfg`'s topic from its start and then live into this intensity until the task is
    /// aborted; bad messages are logged and counted, never applied.
    #[cfg(feature = "kafka")]
    pub fn follow(&self, cfg: &CarbonTopicConfig, metrics: &Metrics) -> Result<tokio::task::JoinHandle<()>, String> {
        use rdkafka::Message;
        use rdkafka::consumer::{Consumer, StreamConsumer};
        let mut cc = crate::kafka::client_config(&cfg.brokers, &cfg.properties);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        // a private group: every process reads the whole series, and commits nothing
        cc.set("group.id", format!("citystream-carbon-{}-{nanos:x}", std::process::id()));
        cc.set("auto.offset.reset", "earliest");
        cc.set("enable.auto.commit", "false");
        let consumer: StreamConsumer = cc.create().map_err(|e| format!("carbon_topic: {e}"))?;
        consumer.subscribe(&[cfg.topic.as_str()]).map_err(|e| format!("carbon_topic: {e}"))?;
        let this = self.clone();
        let outcome = |o: &str| {
            metrics.counter("citystream_carbon_messages_total", "Grid intensity messages read.", &[("outcome", o)])
        };
        let (ok, bad) = (outcome("applied"), outcome("invalid"));
        let topic = cfg.topic.clone();
        Ok(tokio::spawn(async move {
            loop {
                match consumer.recv().await {
                    Ok(m) => match this.apply_message(m.payload().unwrap_or_default()) {
                        Ok(()) => ok.inc(),
                        Err(e) => {
                            bad.inc();
                            tracing::warn!(topic = %topic, offset = m.offset(), "carbon intensity message ignored: {e}");
                        }
                    },
                    Err(e) => {
                        tracing::warn!(topic = %topic, "carbon intensity topic: {e}");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    }
                }
            }
        }))
    }
}

/// Package energy counters, in µJ, when readable.
fn rapl_uj() -> Option<u64> {
    let mut total = 0u64;
    let mut any = false;
    for e in std::fs::read_dir("/sys/class/powercap").ok()?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("intel-rapl:") && name.matches(':').count() == 1 {
            total += std::fs::read_to_string(e.path().join("energy_uj")).ok()?.trim().parse::<u64>().ok()?;
            any = true;
        }
    }
    any.then_some(total)
}

/// Busy CPU seconds of the machine so far (`/proc/stat`: all but idle and iowait).
fn machine_busy_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let busy: u64 = v.iter().enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, x)| x).sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(busy as f64 / hz)
}

/// The `energy` table's schema.
pub fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("ts", citystream_schemas::timestamp_type(), false),
        Field::new("stage", DataType::Utf8, false),
        Field::new("cpu_s", DataType::Float64, false),
        Field::new("gpu_s", DataType::Float64, true),
        Field::new("joules", DataType::Float64, false),
        Field::new("gco2e", DataType::Float64, false),
        Field::new("events_in", DataType::Int64, false),
        Field::new("events_out", DataType::Int64, false),
        Field::new("bytes_in", DataType::Int64, false),
        Field::new("bytes_out", DataType::Int64, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("g_per_kwh", DataType::Float64, false),
    ]))
}

fn to_batch(rows: &[EnergyRow]) -> RecordBatch {
    let cols: Vec<ArrayRef> = vec![
        Arc::new(TimestampMillisecondArray::from_iter_values(rows.iter().map(|r| r.ts)).with_timezone("UTC")),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.stage.as_str()))),
        Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.cpu_s))),
        Arc::new(Float64Array::from(rows.iter().map(|r| r.gpu_s).collect::<Vec<_>>())),
        Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.joules))),
        Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.gco2e))),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.events_in))),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.events_out))),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.bytes_in))),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.bytes_out))),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.source))),
        Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.g_per_kwh))),
    ];
    RecordBatch::try_new(schema(), cols).expect("columns match the energy schema")
}

/// Reads every task's counters from the registry.
fn samples(metrics: &Metrics, tasks: &[(String, Vec<(String, String)>)]) -> BTreeMap<String, Sample> {
    tasks
        .iter()
        .map(|(task, outs)| {
            let l = [("stage", task.as_str())];
            let cpu_ns = metrics.value("citystream_stage_cpu_nanoseconds_total", &l).unwrap_or(0.0) as u64;
            // per output port (stages) or stream (sources, whose bytes are the payloads read)
            let out = |name: &str, label: &str| {
                metrics
                    .value(name, &[("stage", task.as_str()), ("output", label)])
                    .or_else(|| metrics.value(name, &[("source", task.as_str()), ("stream", label)]))
                    .unwrap_or(0.0)
            };
            let bytes_metric = |rows: &str| match rows {
                "citystream_source_events_total" => "citystream_source_bytes_total",
                _ => "citystream_stage_bytes_out_total",
            };
            let rows_out: f64 = outs.iter().map(|(name, label)| out(name, label)).sum();
            let bytes_out: f64 = outs.iter().map(|(name, label)| out(bytes_metric(name), label)).sum();
            // a source takes nothing in from the pipeline (`citystream report energy` counts the
            // events of tasks with no input)
            let rows_in = metrics.value("citystream_stage_rows_in_total", &l).unwrap_or(0.0);
            let bytes_in = metrics.value("citystream_stage_bytes_in_total", &l).unwrap_or(0.0);
            let s = Sample {
                cpu_ns,
                rows_in: rows_in as u64,
                rows_out: rows_out as u64,
                bytes_in: bytes_in as u64,
                bytes_out: bytes_out as u64,
            };
            (task.clone(), s)
        })
        .collect()
}

/// Runs the account until `done` fires, then accounts the last partial interval and returns.
pub(crate) async fn run(
    cfg: EnergyConfig,
    intensity: Intensity,
    metrics: Metrics,
    tasks: Vec<(String, Vec<(String, String)>)>,
    mut done: tokio::sync::oneshot::Receiver<()>,
) -> Result<(), String> {
    let root = PathBuf::from(cfg.path.as_str());
    let sink_cfg: crate::sink::parquet::ParquetSinkConfig =
        serde_saphyr::from_str(&format!("path: {}\ntables: {{energy: x}}\n", root.display()))
            .map_err(|e| e.to_string())?;
    let tables = BTreeMap::from([("energy".to_owned(), schema())]);
    let mut writer = crate::sink::parquet::ParquetWriter::try_new("energy", &sink_cfg, &tables, &metrics)
        .map_err(|e| e.to_string())?;
    let joules_total = |stage: &str, source: &str| {
        metrics.counter(
            "citystream_energy_millijoules_total",
            "Energy attributed to a task (mJ).",
            &[("stage", stage), ("source", source)],
        )
    };
    // registered with its first reading, so no reader mistakes "not yet measured" for 0 W
    let mut watts: Option<citystream_operators::Gauge> = None;
    // GPU busy time where NVML is there (sampled each second), else nothing
    // (ended with the account, whichever way it returns)
    let gpu_sampler = crate::gpu::Nvml::open().map(|n| {
        tracing::info!(nvml = ?n, "energy: GPU busy time from NVML");
        crate::runtime::AbortOnDrop(n.sample(metrics.clone()))
    });
    let gpu_busy = |m: &Metrics| m.sum("citystream_gpu_busy_microseconds_total") / 1e6;
    let mut gpu_before = gpu_busy(&metrics);
    let mut before = samples(&metrics, &tasks);
    let mut rapl_before = if cfg.rapl { rapl_uj() } else { None };
    let mut busy_before = machine_busy_s();
    let mut t0 = Instant::now();
    let mut start_ms = chrono::Utc::now().timestamp_millis();
    let mut tick = tokio::time::interval(cfg.interval.to_std().max(std::time::Duration::from_millis(100)));
    tick.tick().await;
    loop {
        let last = tokio::select! {
            _ = tick.tick() => false,
            _ = &mut done => true,
        };
        let after = samples(&metrics, &tasks);
        let rapl_after = if cfg.rapl { rapl_uj() } else { None };
        let busy_after = machine_busy_s();
        let power = match (rapl_before, rapl_after, busy_before, busy_after) {
            (Some(a), Some(b), Some(x), Some(y)) if b >= a => {
                Power::Rapl { joules: (b - a) as f64 / 1e6, machine_busy_s: y - x }
            }
            _ => Power::Model {
                watts_per_busy_core: cfg.watts_per_busy_core,
                idle_watts: cfg.idle_watts,
                seconds: t0.elapsed().as_secs_f64(),
            },
        };
        let seconds = t0.elapsed().as_secs_f64();
        let gpu_after = gpu_busy(&metrics);
        let gpu_s: BTreeMap<String, f64> = if gpu_sampler.is_some() {
            let busy = (gpu_after - gpu_before).max(0.0);
            crate::gpu::cuda_shares(&metrics).into_iter().map(|(stage, share)| (stage, busy * share)).collect()
        } else {
            BTreeMap::new()
        };
        gpu_before = gpu_after;
        let rows = account(start_ms, &before, &after, power, intensity.at(start_ms), &gpu_s);
        for r in &rows {
            joules_total(&r.stage, r.source).inc_by((r.joules * 1000.0) as u64);
        }
        if seconds > 0.0 {
            watts
                .get_or_insert_with(|| {
                    metrics.gauge(
                        "citystream_energy_watts",
                        "The pipeline's mean power over the latest accounting interval (W).",
                        &[],
                    )
                })
                .set(rows.iter().map(|r| r.joules).sum::<f64>() / seconds);
        }
        if !rows.is_empty() {
            let batch = to_batch(&rows);
            crate::runtime::cpu(|| writer.write("energy", "energy", &batch).and_then(|()| writer.flush()))
                .map_err(|e| e.to_string())?;
        }
        before = after;
        rapl_before = rapl_after;
        busy_before = busy_after;
        t0 = Instant::now();
        start_ms = chrono::Utc::now().timestamp_millis();
        if last {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(cpu_ms: u64, rin: u64, rout: u64) -> Sample {
        Sample { cpu_ns: cpu_ms * 1_000_000, rows_in: rin, rows_out: rout, bytes_in: rin * 100, bytes_out: rout * 40 }
    }

    #[test]
    fn the_model_charges_cpu_time_and_shares_idle_power_by_cpu() {
        let before = BTreeMap::from([("decode".to_owned(), s(1000, 10, 10)), ("sink".to_owned(), s(0, 0, 0))]);
        let after = BTreeMap::from([("decode".to_owned(), s(4000, 1010, 1000)), ("sink".to_owned(), s(1000, 1000, 0))]);
        let rows = account(
            0,
            &before,
            &after,
            Power::Model { watts_per_busy_core: 10.0, idle_watts: 4.0, seconds: 60.0 },
            300.0,
            &BTreeMap::from([("decode".to_owned(), 1.5)]),
        );
        // decode: 3 CPU-s × 10 W + 4 W × 60 s × 3/4 = 30 + 180 = 210 J
        assert_eq!(rows[0].stage, "decode");
        assert!((rows[0].cpu_s - 3.0).abs() < 1e-12 && (rows[0].joules - 210.0).abs() < 1e-9);
        assert_eq!((rows[0].events_in, rows[0].events_out), (1000, 990));
        assert_eq!((rows[0].bytes_in, rows[0].bytes_out), (100_000, 39_600), "bytes are interval deltas too");
        assert_eq!((rows[0].gpu_s, rows[1].gpu_s), (Some(1.5), None), "GPU time only where measured");
        // 210 J = 210 / 3.6e6 kWh at 300 g/kWh
        assert!((rows[0].gco2e - 210.0 / 3.6e6 * 300.0).abs() < 1e-12);
        // sink: 1 × 10 + 240 × 1/4 = 70 J
        assert!((rows[1].joules - 70.0).abs() < 1e-9);
        assert_eq!(rows[1].source, "model");
    }

    #[test]
    fn rapl_energy_is_shared_by_cpu_time_over_the_machine_busy_time() {
        let before = BTreeMap::from([("a".to_owned(), s(0, 0, 0))]);
        let after = BTreeMap::from([("a".to_owned(), s(2000, 0, 0))]);
        let rows =
            account(0, &before, &after, Power::Rapl { joules: 100.0, machine_busy_s: 8.0 }, 100.0, &BTreeMap::new());
        assert!((rows[0].joules - 25.0).abs() < 1e-9);
        assert_eq!(rows[0].source, "rapl");
    }

    #[test]
    fn an_hourly_series_overrides_the_constant() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("grid.csv");
        std::fs::write(&f, "# hour,g\n2026-03-02T08:00:00Z,412\n2026-03-02T09:00:00Z,120\n").unwrap();
        let cfg: EnergyConfig =
            serde_saphyr::from_str(&format!("path: /tmp/x\ncarbon_file: {}\ncarbon_g_per_kwh: 300\n", f.display()))
                .unwrap();
        let i = Intensity::from_config(&cfg).unwrap();
        let h8 = 1_772_438_400_000; // 2026-03-02T08:00Z
        assert_eq!(i.at(h8 + 10), 412.0);
        assert_eq!(i.at(h8 + 3_600_000 + 5), 120.0);
        assert_eq!(i.at(h8 - 1), 300.0);
        std::fs::write(&f, "yesterday,12\n").unwrap();
        assert!(Intensity::from_config(&cfg).unwrap_err().contains("grid.csv:1"));
    }

    #[test]
    fn intensity_messages_set_an_hour_or_the_value_from_now_on_and_bad_ones_change_nothing() {
        let cfg: EnergyConfig = serde_saphyr::from_str("path: /tmp/x\ncarbon_g_per_kwh: 300\n").unwrap();
        let i = Intensity::from_config(&cfg).unwrap();
        let shared = i.clone();
        let h8 = 1_772_438_400_000; // 2026-03-02T08:00:00Z
        assert_eq!(i.at(h8), 300.0);
        i.apply_message(br#"{"hour": "2026-03-02T08:00:00Z", "g_per_kwh": 512}"#).unwrap();
        assert_eq!((shared.at(h8 + 59 * 60_000), shared.at(h8 + 3_600_000)), (512.0, 300.0), "clones share");
        i.apply_message(br#"{"g_per_kwh": 120.5}"#).unwrap();
        assert_eq!((i.at(h8), i.at(h8 + 3_600_000)), (512.0, 120.5), "the series' hour, else the latest");
        for bad in
            [&br#"{"g_per_kwh": -1}"#[..], br#"{"hour": "8 o'clock", "g_per_kwh": 1}"#, b"412", br#"{"gco2": 1}"#]
        {
            assert!(i.apply_message(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        assert_eq!((i.at(h8), i.at(h8 + 3_600_000)), (512.0, 120.5));
    }

    #[test]
    fn the_hourly_series_keeps_its_latest_hours_only() {
        let cfg: EnergyConfig = serde_saphyr::from_str("path: /tmp/x\ncarbon_g_per_kwh: 300\n").unwrap();
        let i = Intensity::from_config(&cfg).unwrap();
        let h0 = chrono::DateTime::parse_from_rfc3339("2020-01-01T00:00:00Z").unwrap();
        let n = MAX_HOURS + 500;
        for h in 0..n {
            let hour = (h0 + chrono::Duration::hours(h as i64)).to_rfc3339();
            i.apply_message(format!(r#"{{"hour": "{hour}", "g_per_kwh": {h}}}"#).as_bytes()).unwrap();
        }
        assert_eq!(i.hours(), MAX_HOURS);
        let ms = |h: usize| h0.timestamp_millis() + h as i64 * 3_600_000;
        assert_eq!(i.at(ms(n - 1)), (n - 1) as f64, "the latest hour is kept");
        assert_eq!(i.at(ms(499)), 300.0, "the earliest hours are forgotten");
        assert_eq!(i.at(ms(500)), 500.0);
    }
}

/// `runtime.carbon_policy` in YAML: deferrable work waits for low-carbon hours.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CarbonPolicyConfig {
    /// Grid intensity (gCO2e/kWh) above which deferrable work waits.
    pub high_g_per_kwh: f64,
    /// How often the policy is checked. Default `1m`.
    #[serde(default = "d_interval")]
    pub check_every: Duration,
    /// Parquet compaction as deferrable work; absent: the pipeline never compacts by itself
    /// (the policy still tracks the grid's mode for the stages that switch models).
    #[serde(default)]
    pub compaction: Option<CompactionPolicyConfig>,
    /// Training exports (settled partitions of lake tables copied for `models/train`) as
    /// deferrable work. Default: none.
    #[serde(default)]
    pub training_export: Option<ExportPolicyConfig>,
    /// The high mode also holds while the pipeline draws more than this (watts, from the
    /// energy account's latest interval). Default: none (the grid alone decides).
    #[serde(default)]
    pub energy_budget_watts: Option<f64>,
    /// Alerting is never degraded below this: a stage that alert rules read may predict a calm
    /// segment at most this far apart in the high mode (`infer` `carbon.calm.every`). Default `5m`.
    #[serde(default = "d_alert_floor")]
    pub alert_floor: Duration,
}

/// The default alert floor (5 minutes).
pub fn d_alert_floor() -> Duration {
    Duration::from_secs(300)
}

/// When compaction runs.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompactionPolicyConfig {
    /// Compaction is due this long after the last one. Default `1h`.
    #[serde(default = "d_hour")]
    pub every: Duration,
    /// A due compaction waits at most this long for a low-carbon hour, then runs anyway.
    /// Default `6h`.
    #[serde(default = "d_six_hours")]
    pub max_delay: Duration,
    /// Files younger than this are left alone. Default `10m`.
    #[serde(default = "d_ten_minutes")]
    pub min_age: Duration,
    /// Target size of merged files, MiB. Default 128.
    #[serde(default = "d_target_mb")]
    pub target_mb: u64,
}

/// When and what the training export copies (`sink::export`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportPolicyConfig {
    /// Where the export tree goes (read by `models/train/feedback.py` and `train.py --feedback-lake`).
    pub to: EnvString,
    /// The lake tables exported. Default `[traffic_minutes, feedback, alerts]`.
    #[serde(default = "d_export_tables")]
    pub tables: Vec<String>,
    /// An export is due this long after the last one. Default `1d`.
    #[serde(default = "d_day")]
    pub every: Duration,
    /// A due export waits at most this long for a low-carbon hour. Default `12h`.
    #[serde(default = "d_twelve_hours")]
    pub max_delay: Duration,
    /// Partitions with a file younger than this wait for a later run. Default `10m`.
    #[serde(default = "d_ten_minutes")]
    pub min_age: Duration,
}

fn d_export_tables() -> Vec<String> {
    ["traffic_minutes", "feedback", "alerts"].map(String::from).to_vec()
}
fn d_day() -> Duration {
    Duration::from_secs(86_400)
}
fn d_twelve_hours() -> Duration {
    Duration::from_secs(12 * 3600)
}

fn d_hour() -> Duration {
    Duration::from_secs(3600)
}
fn d_six_hours() -> Duration {
    Duration::from_secs(6 * 3600)
}
fn d_ten_minutes() -> Duration {
    Duration::from_secs(600)
}
fn d_target_mb() -> u64 {
    128
}

/// What the policy decided at one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Nothing is due.
    Idle,
    /// Compaction is due and the grid is clean enough: run it.
    Run,
    /// Compaction is due but the grid is dirty: wait.
    Defer,
    /// Compaction waited `max_delay`: run it whatever the grid.
    Forced,
}

/// The carbon-aware scheduler of deferrable work (a pure state machine; the runtime feeds it
/// the clock and the intensity).
#[derive(Debug, Clone)]
pub struct CarbonScheduler {
    high: f64,
    budget_watts: Option<f64>,
    every_ms: i64,
    max_delay_ms: i64,
    last_run_ms: i64,
    high_mode: Option<bool>,
}

impl CarbonScheduler {
    /// A scheduler whose first compaction is due `every` after `start_ms`.
    pub fn new(cfg: &CarbonPolicyConfig, c: &CompactionPolicyConfig, start_ms: i64) -> Self {
        Self::periodic(cfg, c.every, c.max_delay, start_ms)
    }

    /// A scheduler of any deferrable job due every `every`, waiting at most `max_delay`.
    pub fn periodic(cfg: &CarbonPolicyConfig, every: Duration, max_delay: Duration, start_ms: i64) -> Self {
        Self {
            high: cfg.high_g_per_kwh,
            budget_watts: cfg.energy_budget_watts,
            every_ms: every.as_millis_i64(),
            max_delay_ms: max_delay.as_millis_i64(),
            last_run_ms: start_ms,
            high_mode: None,
        }
    }

    /// Whether the pipeline is in the high mode now (the grid above the threshold, or the
    /// pipeline's power above the budget), and whether that changed.
    pub fn mode(&mut self, g_per_kwh: f64, watts: Option<f64>) -> (bool, bool) {
        let high = self.is_high(g_per_kwh, watts);
        let changed = self.high_mode != Some(high);
        self.high_mode = Some(high);
        (high, changed)
    }

    /// Above the budget enters the high mode; only below 90% of it leaves it again (the high
    /// mode lowers the power, which must not flip the mode back at the next check).
    fn is_high(&self, g_per_kwh: f64, watts: Option<f64>) -> bool {
        let over = match (watts, self.budget_watts) {
            (Some(w), Some(b)) if self.high_mode == Some(true) => w > 0.9 * b,
            (Some(w), Some(b)) => w > b,
            _ => false,
        };
        g_per_kwh > self.high || over
    }

    /// The decision at `now_ms` with the grid at `g_per_kwh` and the pipeline drawing `watts`.
    pub fn decide(&mut self, now_ms: i64, g_per_kwh: f64, watts: Option<f64>) -> Decision {
        let due_since = self.last_run_ms + self.every_ms;
        if now_ms < due_since {
            return Decision::Idle;
        }
        let d = if !self.is_high(g_per_kwh, watts) {
            Decision::Run
        } else if now_ms - due_since >= self.max_delay_ms {
            Decision::Forced
        } else {
            Decision::Defer
        };
        if d != Decision::Defer {
            self.last_run_ms = now_ms;
        }
        d
    }
}

/// Runs the carbon policy until the pipeline ends: compacts the Parquet roots when due and
/// the grid allows, logging and counting every switch and action.
pub(crate) async fn run_policy(
    cfg: CarbonPolicyConfig,
    intensity: Intensity,
    roots: Vec<PathBuf>,
    positioned: crate::sink::compact::Positioned,
    metrics: Metrics,
) {
    // without compaction the policy still publishes the grid's mode, which stages read
    // (an `infer` stage's `carbon` model switch)
    let compaction = cfg.compaction.clone();
    let for_sched = compaction.clone().unwrap_or_else(|| serde_saphyr::from_str("{}").expect("defaults deserialize"));
    let mut sched = CarbonScheduler::new(&cfg, &for_sched, chrono::Utc::now().timestamp_millis());
    let action = |a: &str| {
        metrics.counter(
            "citystream_policy_actions_total",
            "Actions of the carbon-aware policy.",
            &[("policy", "compaction"), ("action", a)],
        )
    };
    let mode = metrics.gauge(
        "citystream_carbon_high_mode",
        "1 while the grid is above the policy's threshold or the pipeline above its energy budget.",
        &[],
    );
    let intensity_gauge = metrics.gauge("citystream_carbon_g_per_kwh", "The grid's carbon intensity now.", &[]);
    let switches = |to: &str| {
        metrics.counter("citystream_carbon_mode_switches_total", "Switches of the carbon policy's mode.", &[("to", to)])
    };
    let export = cfg.training_export.clone();
    let mut export_sched = export
        .as_ref()
        // due `every` after the last recorded run; without a record, at once (the manifest
        // makes a repeated export incremental)
        .map(|e| {
            let now = chrono::Utc::now().timestamp_millis();
            let last = crate::sink::export::last_run(Path::new(e.to.as_str()))
                .filter(|t| *t <= now)
                .unwrap_or(now - e.every.as_millis_i64());
            CarbonScheduler::periodic(&cfg, e.every, e.max_delay, last)
        });
    let export_action = |a: &str| {
        metrics.counter(
            "citystream_policy_actions_total",
            "Actions of the carbon-aware policy.",
            &[("policy", "training_export"), ("action", a)],
        )
    };
    let mut export_job: Option<tokio::task::JoinHandle<()>> = None;
    let mut tick = tokio::time::interval(cfg.check_every.to_std().max(std::time::Duration::from_millis(100)));
    loop {
        tick.tick().await;
        let now = chrono::Utc::now().timestamp_millis();
        let g = intensity.at(now);
        let watts = metrics.value("citystream_energy_watts", &[]);
        let (high, changed) = sched.mode(g, watts);
        mode.set(if high { 1.0 } else { 0.0 });
        intensity_gauge.set(g);
        if changed {
            switches(if high { "high" } else { "normal" }).inc();
            tracing::info!(
                g_per_kwh = g,
                watts,
                high,
                "carbon policy: {}",
                if high { "high mode (grid or energy budget): deferring, cheaper inference" } else { "normal mode" }
            );
        }
        if let (Some(e), Some(s)) = (&export, export_sched.as_mut()) {
            let d = s.decide(now, g, watts);
            match d {
                Decision::Idle => {}
                Decision::Defer => export_action("defer").inc(),
                Decision::Run | Decision::Forced if export_job.as_ref().is_some_and(|j| !j.is_finished()) => {
                    export_action("still_running").inc();
                }
                Decision::Run | Decision::Forced => {
                    export_action(if d == Decision::Run { "run" } else { "forced" }).inc();
                    // off the policy loop: the mode keeps being checked while a long export runs
                    let (roots, e) = (roots.clone(), e.clone());
                    export_job = Some(tokio::task::spawn_blocking(move || {
                        let to = PathBuf::from(e.to.as_str());
                        let mut ok = true;
                        for root in &roots {
                            match crate::sink::export::export(root, &e.tables, &to, e.min_age.to_std()) {
                                Ok(r) => tracing::info!(
                                    ?d,
                                    partitions = r.partitions,
                                    rows = r.rows,
                                    skipped = r.skipped,
                                    "carbon policy: training export"
                                ),
                                Err(e) => {
                                    ok = false;
                                    tracing::error!("carbon policy: training export failed: {e}");
                                }
                            }
                        }
                        if ok
                            && let Err(e) = crate::sink::export::record_run(&to, chrono::Utc::now().timestamp_millis())
                        {
                            tracing::warn!("carbon policy: recording the training export's run: {e}");
                        }
                    }));
                }
            }
        }
        let Some(c) = &compaction else { continue };
        let d = sched.decide(now, g, watts);
        match d {
            Decision::Idle => {}
            Decision::Defer => {
                action("defer").inc();
            }
            Decision::Run | Decision::Forced => {
                action(if d == Decision::Run { "run" } else { "forced" }).inc();
                let opts = crate::sink::compact::CompactOptions {
                    target_bytes: c.target_mb << 20,
                    min_age: c.min_age.to_std(),
                    positioned: positioned.clone(),
                    ..Default::default()
                };
                for root in &roots {
                    let (root, opts) = (root.clone(), opts.clone());
                    match tokio::task::spawn_blocking(move || crate::sink::compact::compact(&root, &opts)).await {
                        Ok(Ok(r)) => tracing::info!(
                            ?d,
                            partitions = r.partitions,
                            files_in = r.files_in,
                            files_out = r.files_out,
                            "carbon policy: compacted"
                        ),
                        Ok(Err(e)) => tracing::error!("carbon policy: compaction failed: {e}"),
                        Err(e) => tracing::error!("carbon policy: compaction task: {e}"),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod policy_tests {
    use super::*;

    #[test]
    fn compaction_waits_for_a_clean_hour_but_never_longer_than_max_delay() {
        let cfg: CarbonPolicyConfig =
            serde_saphyr::from_str("high_g_per_kwh: 300\ncompaction: {every: 1h, max_delay: 3h}\n").unwrap();
        let mut s = CarbonScheduler::new(&cfg, cfg.compaction.as_ref().unwrap(), 0);
        let h = 3_600_000;
        // a scripted grid, one check per hour (fake clock)
        let grid = [500.0, 500.0, 200.0, 450.0, 450.0, 450.0, 450.0, 450.0, 100.0];
        let decisions: Vec<Decision> = grid.iter().enumerate().map(|(i, g)| s.decide(i as i64 * h, *g, None)).collect();
        use Decision::*;
        assert_eq!(
            decisions,
            [Idle, Defer, Run, Defer, Defer, Defer, Forced, Defer, Run],
            "due at 1 h (dirty: wait), clean at 2 h (run); due at 3 h, dirty until 6 h = 3 h late (forced); due at 7 h, clean at 8 h"
        );
        assert_eq!(s.mode(500.0, None), (true, true));
        assert_eq!(s.mode(600.0, None), (true, false));
        assert_eq!(s.mode(100.0, None), (false, true));
    }

    #[test]
    fn an_energy_budget_also_sets_the_high_mode_and_defers_compaction() {
        let cfg: CarbonPolicyConfig = serde_saphyr::from_str(
            "high_g_per_kwh: 300\nenergy_budget_watts: 40\ncompaction: {every: 1h, max_delay: 3h}\n",
        )
        .unwrap();
        let mut s = CarbonScheduler::new(&cfg, cfg.compaction.as_ref().unwrap(), 0);
        // a clean grid throughout; the pipeline's power (fake clock, one check per hour)
        let watts = [10.0, 55.0, 55.0, 30.0, 80.0];
        let modes: Vec<(bool, bool)> = watts.iter().map(|w| s.mode(100.0, Some(*w))).collect();
        assert_eq!(modes, [(false, true), (true, true), (true, false), (false, true), (true, true)]);
        // hysteresis: in the high mode, 38 W (under the budget, above 90% of it) keeps it
        assert_eq!(s.mode(100.0, Some(38.0)), (true, false));
        assert_eq!(s.mode(100.0, Some(35.0)), (false, true));
        assert_eq!(s.mode(100.0, Some(38.0)), (false, false), "entering needs the budget itself");
        assert_eq!(s.mode(100.0, None), (false, false), "no reading: the grid decides");
        let h = 3_600_000;
        let d: Vec<Decision> = watts.iter().enumerate().map(|(i, w)| s.decide(i as i64 * h, 100.0, Some(*w))).collect();
        assert_eq!(d, [Decision::Idle, Decision::Defer, Decision::Defer, Decision::Run, Decision::Defer]);
    }
}
