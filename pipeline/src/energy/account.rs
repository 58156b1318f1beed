//! An interval's `energy` rows from the counter samples at its start and end, and the
//! `energy` table's schema.

use std::collections::BTreeMap;

use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use super::power::Power;

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

pub(super) fn to_batch(rows: &[EnergyRow]) -> RecordBatch {
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
}
