//! Shared helpers for operator tests.
#![allow(dead_code)]

use std::sync::Arc;

use arrow::array::{
    Array, AsArray, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray,
};
use arrow::datatypes::{DataType, Field, Float64Type, Int64Type, Schema, SchemaRef, TimestampMillisecondType};
use citystream_operators::{BuildContext, Collector, Metrics, Operator, OperatorConfig};

/// A reading: (event_id, sensor, ts ms, value, flow).
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub id: String,
    pub sensor: String,
    pub ts: i64,
    pub value: Option<f64>,
    pub flow: i32,
}

pub fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("event_id", DataType::Utf8, false),
        Field::new("ts", DataType::Timestamp(arrow::datatypes::TimeUnit::Millisecond, Some("UTC".into())), false),
        Field::new("sensor_id", DataType::Utf8, false),
        Field::new("value", DataType::Float64, true),
        Field::new("flow", DataType::Int32, false),
        Field::new("src_partition", DataType::Int32, false),
        Field::new("src_offset", DataType::Int64, false),
    ]))
}

pub fn batch(rows: &[Reading]) -> RecordBatch {
    RecordBatch::try_new(
        schema(),
        vec![
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.id.as_str()))),
            Arc::new(TimestampMillisecondArray::from_iter_values(rows.iter().map(|r| r.ts)).with_timezone("UTC")),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.sensor.as_str()))),
            Arc::new(rows.iter().map(|r| r.value).collect::<Float64Array>()),
            Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| r.flow))),
            Arc::new(Int32Array::from(vec![0; rows.len()])),
            Arc::new(Int64Array::from_iter_values(0..rows.len() as i64)),
        ],
    )
    .unwrap()
}

pub fn readings(b: &RecordBatch) -> Vec<Reading> {
    let id = b.column_by_name("event_id").unwrap().as_string::<i32>();
    let ts = b.column_by_name("ts").unwrap().as_primitive::<TimestampMillisecondType>();
    let s = b.column_by_name("sensor_id").unwrap().as_string::<i32>();
    let v = b.column_by_name("value").unwrap().as_primitive::<Float64Type>();
    let f = b.column_by_name("flow").unwrap().as_primitive::<arrow::datatypes::Int32Type>();
    (0..b.num_rows())
        .map(|i| Reading {
            id: id.value(i).to_owned(),
            sensor: s.value(i).to_owned(),
            ts: ts.value(i),
            value: v.is_valid(i).then(|| v.value(i)),
            flow: f.value(i),
        })
        .collect()
}

pub fn build(cfg: &dyn OperatorConfig) -> Box<dyn Operator> {
    build_with(cfg, &Metrics::new())
}

pub fn build_with(cfg: &dyn OperatorConfig, metrics: &Metrics) -> Box<dyn Operator> {
    let ctx = BuildContext { stage: "test".into(), metrics: metrics.clone(), ..Default::default() };
    cfg.build(&schema(), &ctx).unwrap_or_else(|e| panic!("{e:?}"))
}

/// Everything emitted per port.
#[derive(Default, Debug)]
pub struct Out {
    pub ports: Vec<Vec<RecordBatch>>,
}

impl Out {
    pub fn rows(&self, port: usize) -> usize {
        self.ports.get(port).map_or(0, |p| p.iter().map(RecordBatch::num_rows).sum())
    }
    pub fn readings(&self, port: usize) -> Vec<Reading> {
        self.ports.get(port).map_or(Vec::new(), |p| p.iter().flat_map(readings).collect())
    }
}

/// Feeds `batches`, with a watermark after each (`wm_lag` behind the newest ts seen), then ends.
pub fn run(op: &mut dyn Operator, batches: &[Vec<Reading>], wm_lag: i64) -> Out {
    let mut c = Collector::new(op.outputs().len());
    let mut max_ts = i64::MIN;
    for b in batches {
        if b.is_empty() {
            continue;
        }
        op.process_batch(batch(b), &mut c).unwrap();
        max_ts = max_ts.max(b.iter().map(|r| r.ts).max().unwrap());
        op.on_watermark(max_ts - wm_lag, &mut c).unwrap();
    }
    op.on_end(&mut c).unwrap();
    let mut out = Out { ports: vec![Vec::new(); op.outputs().len()] };
    for (p, b) in c.drain() {
        out.ports[p].push(b);
    }
    out
}

pub fn col_i64(b: &RecordBatch, name: &str) -> Vec<i64> {
    b.column_by_name(name).unwrap().as_primitive::<Int64Type>().values().to_vec()
}

pub fn col_f64(b: &RecordBatch, name: &str) -> Vec<Option<f64>> {
    b.column_by_name(name).unwrap().as_primitive::<Float64Type>().iter().collect()
}

pub fn yaml<T: serde::de::DeserializeOwned>(text: &str) -> T {
    serde_saphyr::from_str(text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

pub fn r(id: &str, sensor: &str, ts: i64, value: f64) -> Reading {
    Reading { id: id.into(), sensor: sensor.into(), ts, value: Some(value), flow: 1 }
}

/// `rows` in batches of `per` (`batch` makes one), each with the watermark just before the
/// earliest minute (`minute`) of the rows after it, for [`fed_in_batches`].
pub fn in_batches<R>(
    rows: &[R],
    per: usize,
    minute: impl Fn(&R) -> i64,
    batch: impl Fn(&[R]) -> RecordBatch,
) -> Vec<(RecordBatch, i64)> {
    let watermark = |from: usize| rows[from.min(rows.len())..].iter().map(&minute).min().unwrap_or(i64::MAX / 60_000);
    rows.chunks(per).enumerate().map(|(i, chunk)| (batch(chunk), watermark((i + 1) * per) * 60_000 - 1)).collect()
}

/// Feeds `batches` to `op`, each with the watermark that follows it when one is due (after
/// every `every`th batch), restoring the snapshot after batch `cut` into `then()`, then ends
/// the stream: the collector holds everything emitted.
pub fn fed_in_batches(
    mut op: Box<dyn Operator>,
    then: impl Fn() -> Box<dyn Operator>,
    batches: Vec<(RecordBatch, i64)>,
    every: usize,
    cut: Option<usize>,
) -> Collector {
    let mut out = Collector::new(1);
    for (i, (batch, watermark)) in batches.into_iter().enumerate() {
        op.process_batch(batch, &mut out).unwrap();
        if cut == Some(i) {
            let state = op.snapshot().unwrap().unwrap();
            op = then();
            op.restore(state).unwrap();
        }
        if (i + 1) % every == 0 {
            op.on_watermark(watermark, &mut out).unwrap();
        }
    }
    op.on_end(&mut out).unwrap();
    out
}

/// The input of the alert tests: `segment_id`, `window_end`, `score` and `model`.
pub fn score_fields() -> Vec<Field> {
    vec![
        Field::new("segment_id", DataType::Utf8, false),
        Field::new(
            "window_end",
            DataType::Timestamp(arrow::datatypes::TimeUnit::Millisecond, Some("UTC".into())),
            false,
        ),
        Field::new("score", DataType::Float64, true),
        Field::new("model", DataType::Utf8, false),
    ]
}

/// [`score_fields`]' columns of (location, minute, score) rows (the model `incident_fp32`).
pub fn score_columns(rows: &[(&str, i64, Option<f64>)]) -> Vec<arrow::array::ArrayRef> {
    vec![
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
        Arc::new(TimestampMillisecondArray::from_iter_values(rows.iter().map(|r| r.1 * 60_000)).with_timezone("UTC")),
        Arc::new(Float64Array::from(rows.iter().map(|r| r.2).collect::<Vec<_>>())),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|_| "incident_fp32"))),
    ]
}
