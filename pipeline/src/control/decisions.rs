//! Operators' decisions as data: a row of the `feedback` table and a lifecycle event in the
//! `alerts` table (status = the decision, `actor` `operator`), stored before a decision counts.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Array, Float64Array, RecordBatch, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use citystream_operators::Metrics;

use super::ControlError;
use super::book::AlertView;
use crate::sink::parquet::{ParquetSinkConfig, ParquetWriter};

/// The feedback table's schema.
pub fn feedback_schema() -> SchemaRef {
    let ts = citystream_schemas::timestamp_type;
    Arc::new(Schema::new(vec![
        Field::new("ts", ts(), false),
        Field::new("alert_id", DataType::Utf8, false),
        Field::new("rule", DataType::Utf8, false),
        Field::new("alert_type", DataType::Utf8, false),
        Field::new("location", DataType::Utf8, false),
        Field::new("decision", DataType::Utf8, false),
        Field::new("operator", DataType::Utf8, false),
        Field::new("comment", DataType::Utf8, false),
        Field::new("opened_at", ts(), false),
        Field::new("value", DataType::Float64, true),
        Field::new("threshold", DataType::Float64, false),
    ]))
}

/// Where a decision's rows are made durable (blocking: the caller runs it off the async
/// workers and outside the book's lock).
pub(crate) trait DecisionStore: Send + Sync {
    /// Writes and makes durable one decision's feedback row and lifecycle event.
    fn store(&self, feedback: &RecordBatch, event: &RecordBatch) -> Result<(), ControlError>;
}

/// Where decisions are stored: a fresh writer per decision, so a failed one leaves no rows
/// buffered for the next decision to flush.
#[derive(Debug)]
pub(crate) struct DecisionLake {
    name: String,
    cfg: ParquetSinkConfig,
    tables: BTreeMap<String, SchemaRef>,
    metrics: Metrics,
}

impl DecisionLake {
    /// The lake under `path`, checked now (a start error, not one at the first decision).
    pub(crate) fn open(name: &str, path: &str, metrics: &Metrics) -> Result<Self, ControlError> {
        let cfg = ParquetSinkConfig::internal(std::path::Path::new(path));
        let tables = BTreeMap::from([
            ("feedback".to_owned(), feedback_schema()),
            ("alerts".to_owned(), citystream_operators::alert::alert_schema()),
        ]);
        ParquetWriter::try_new(name, &cfg, &tables, metrics)?;
        Ok(Self { name: name.to_owned(), cfg, tables, metrics: metrics.clone() })
    }
}

impl DecisionStore for DecisionLake {
    fn store(&self, feedback: &RecordBatch, event: &RecordBatch) -> Result<(), ControlError> {
        let mut w = ParquetWriter::try_new(&self.name, &self.cfg, &self.tables, &self.metrics)?;
        w.write("feedback", "control_center", feedback)?;
        w.write("alerts", "control_center", event)?;
        Ok(w.flush()?)
    }
}

/// A one-row UTC timestamp column.
fn one_time(v: i64) -> Arc<dyn Array> {
    Arc::new(TimestampMillisecondArray::from(vec![v]).with_timezone("UTC"))
}

/// A one-row string column.
fn one_str(v: &str) -> Arc<dyn Array> {
    Arc::new(StringArray::from(vec![v]))
}

/// A decision as a lifecycle event in the alert schema (status = the decision; `evidence`
/// holds the verdict, who, why and the decision's id, by which the control center that made it
/// finds it again on the alerts topic).
pub(crate) fn decision_event(
    ts: i64,
    a: &AlertView,
    decision: &str,
    operator: &str,
    comment: &str,
    decision_id: &str,
) -> RecordBatch {
    let (t, s) = (one_time, one_str);
    let evidence = serde_json::json!({
        "decision": decision, "operator": operator, "comment": comment, "decision_id": decision_id,
    })
    .to_string();
    RecordBatch::try_new(
        citystream_operators::alert::alert_schema(),
        vec![
            t(ts),
            s(&a.alert_id),
            s(&a.rule),
            s(&a.alert_type),
            s(&a.severity),
            s(&a.location),
            s(decision),
            t(a.opened_at),
            Arc::new(Float64Array::from(vec![a.value])),
            Arc::new(Float64Array::from(vec![a.threshold])),
            Arc::new(Float64Array::from(vec![a.peak])),
            Arc::new(arrow::array::Int32Array::from(vec![a.locations])),
            s(&evidence),
            t(ts),
            s("operator"),
        ],
    )
    .expect("columns match the alert schema")
}

/// A decision as a row of the `feedback` table.
pub(crate) fn feedback_row(ts: i64, a: &AlertView, decision: &str, operator: &str, comment: &str) -> RecordBatch {
    let (t, s) = (one_time, one_str);
    RecordBatch::try_new(
        feedback_schema(),
        vec![
            t(ts),
            s(&a.alert_id),
            s(&a.rule),
            s(&a.alert_type),
            s(&a.location),
            s(decision),
            s(operator),
            s(comment),
            t(a.opened_at),
            Arc::new(Float64Array::from(vec![a.value])),
            Arc::new(Float64Array::from(vec![a.threshold])),
        ],
    )
    .expect("columns match the feedback schema")
}
