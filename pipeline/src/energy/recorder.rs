//! The energy task: samples every task's counters each interval, accounts them and writes the
//! `energy` table, publishing the totals as metrics.

use std::collections::BTreeMap;
use std::path::PathBuf;

use std::time::Instant;

use citystream_operators::Metrics;

use super::account::{Sample, account, schema, to_batch};
use super::config::EnergyConfig;
use super::intensity::Intensity;
use super::power::{Power, machine_busy_s, rapl_uj};

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
) -> Result<(), crate::sink::parquet::ParquetSinkError> {
    let root = PathBuf::from(cfg.path.as_str());
    let sink_cfg = crate::sink::parquet::ParquetSinkConfig::internal(&root);
    let tables = BTreeMap::from([("energy".to_owned(), schema())]);
    let mut writer = crate::sink::parquet::ParquetWriter::try_new("energy", &sink_cfg, &tables, &metrics)?;
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
        crate::task::AbortOnDrop(n.sample(metrics.clone()))
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
            crate::task::blocking(|| writer.write("energy", "energy", &batch).and_then(|()| writer.flush()))?;
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
