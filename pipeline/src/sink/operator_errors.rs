//! Operator errors as data: when an operator panics on a batch (or refuses it with an error of
//! class [`ErrorClass::User`](citystream_operators::ErrorClass)), the batch's rows become rows
//! of the `operator_errors` table — the dead-letter schema, reason code `operator_error`, the
//! stage and what went wrong, each row as JSON in `payload` — and the stage goes on with the
//! next batch. Other errors (a disk or broker failure, a bug the operator reports) stop the
//! pipeline, which restarts from its last checkpoint.
//!
//! The table lives beside the first Parquet sink's tables (the planner picks it); stages reach it
//! through `task::ErrorTable`. Each record is written and made
//! durable (fsync, rename) before the stage goes on, so a checkpoint the stage passes later
//! includes it; with operator state checkpoints its files are named after the epoch they
//! belong to, so a restart that replays the batch writes it once.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Int32Type, Int64Type, TimestampMillisecondType};
use citystream_operators::Metrics;
use citystream_schemas::dead_letter::{self, DeadLetterBuilder, Position};
use citystream_schemas::{Reason, ReasonCode};

use super::parquet::{ParquetSinkConfig, ParquetSinkError, ParquetWriter};
use crate::task::ErrorTable;

/// The table operator errors go to.
pub const TABLE: &str = "operator_errors";

/// Bytes of a row kept as its payload.
const PAYLOAD_MAX: usize = 4096;

/// Where operator errors are written (shared by every stage of a run).
pub(crate) struct OperatorErrors {
    writer: Arc<Mutex<ParquetWriter>>,
    metrics: Metrics,
    /// With operator state: files wait for their epoch's commit, like a Parquet sink's.
    state: Option<crate::task::StateStore>,
}

impl std::fmt::Debug for OperatorErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OperatorErrors")
    }
}

impl OperatorErrors {
    /// A writer of the `operator_errors` table under `root`; with operator state, files are
    /// named after epochs of its lineage and published once their epoch is committed.
    pub(crate) fn try_new(
        root: &Path,
        state: Option<&crate::task::StateStore>,
        metrics: &Metrics,
    ) -> Result<Self, ParquetSinkError> {
        let cfg = ParquetSinkConfig::internal(root);
        let tables = BTreeMap::from([(TABLE.to_owned(), dead_letter::schema())]);
        // rows of derived stages have no source position (-1): name files after the run, or
        // with operator state after the epoch (removed and rewritten by a replay)
        let mut writer =
            ParquetWriter::try_new("runtime", &cfg, &tables, metrics)?.without_positions([TABLE.to_owned()]);
        if let Some(s) = state {
            writer = writer.with_epochs(s.lineage(), 0).with_staging(s.writer());
        }
        Ok(Self { writer: Arc::new(Mutex::new(writer)), metrics: metrics.clone(), state: state.cloned() })
    }
}

impl ErrorTable for OperatorErrors {
    /// Writes the rows as dead letters and makes them durable (fsync, rename) before returning.
    fn record(
        &self,
        stage: &str,
        kind: &str,
        epoch: u64,
        batch: &RecordBatch,
        what: &str,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.metrics
            .counter(
                "citystream_operator_errors_total",
                "Rows a stage could not process (a panic or a refused batch), recorded in the operator_errors table.",
                &[("stage", stage)],
            )
            .inc_by(batch.num_rows() as u64);
        let rows = dead_letters(stage, kind, batch, what)?;
        let mut w = self.writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        w.set_epoch(epoch);
        w.write(TABLE, stage, &rows)?;
        w.flush()?;
        if let Some(s) = &self.state {
            w.publish(s.committed_epoch())?;
        }
        Ok(())
    }

    fn publish_committed(&self) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        if let Some(s) = &self.state {
            self.writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner).publish(s.committed_epoch())?;
        }
        Ok(())
    }
}

/// One dead letter per row of `batch`: its source position where it has one, its event time
/// (else now) as `received_at`, the row as JSON.
fn dead_letters(
    stage: &str,
    kind: &str,
    batch: &RecordBatch,
    what: &str,
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let mut json = arrow::json::LineDelimitedWriter::new(Vec::new());
    json.write(batch)?;
    json.finish()?;
    let text = json.into_inner();
    let col = |name: &str| batch.column_by_name(name);
    let partition = col("src_partition").and_then(|c| c.as_primitive_opt::<Int32Type>());
    let offset = col("src_offset").and_then(|c| c.as_primitive_opt::<Int64Type>());
    let time = ["ts", "window_end", "window_start"]
        .iter()
        .find_map(|n| col(n).and_then(|c| c.as_primitive_opt::<TimestampMillisecondType>()));
    let now = citystream_operators::common::wall_clock_ms();
    let reason = Reason::new(ReasonCode::OperatorError, format!("stage `{stage}` failed on this row's batch: {what}"));
    let mut dl = DeadLetterBuilder::new(PAYLOAD_MAX);
    for (i, line) in text.split(|b| *b == b'\n').take(batch.num_rows()).enumerate() {
        let pos = Position {
            source: stage,
            partition: partition.map_or(-1, |p| p.value(i)),
            offset: offset.map_or(-1, |o| o.value(i)),
            received_at_ms: time.filter(|t| t.is_valid(i)).map_or(now, |t| t.value(i)),
        };
        dl.append(pos, kind, &reason, line);
    }
    Ok(dl.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_batch_becomes_dead_letters_with_its_position_and_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Metrics::new();
        let state_dir = tempfile::tempdir().unwrap();
        let state = crate::task::StateStore::open(&crate::task::StateUrl::Local(state_dir.path().into())).unwrap();
        let errors = OperatorErrors::try_new(dir.path(), Some(&state), &metrics).unwrap();
        let schema = citystream_schemas::EventKind::Traffic.schema();
        let batch = RecordBatch::new_empty(schema);
        errors.record("windows", "window", 3, &batch, "nothing").unwrap();
        let rows = dead_letters("windows", "window", &RecordBatch::new_empty(dead_letter::schema()), "x").unwrap();
        assert_eq!(rows.num_rows(), 0);
        let d = citystream_schemas::Decoder::new(citystream_schemas::EventKind::Traffic, Default::default());
        let mut raw = citystream_schemas::raw::RawBatchBuilder::with_capacity(1, 256);
        let now = citystream_operators::common::wall_clock_ms();
        raw.append(
            "t",
            4,
            77,
            now,
            format!(r#"{{"event_id":"e","ts":{now},"schema_version":1,"sensor_id":"s","segment_id":"g","lane":1,"interval_s":30,"flow":1,"occupancy":0.1,"speed_kmh":50.5}}"#).as_bytes(),
        );
        let decoded = d.decode(&raw.finish()).unwrap();
        assert_eq!(decoded.dead_letters.num_rows(), 0, "{:?}", decoded.dead_letters);
        let valid = decoded.valid;
        errors.record("windows", "window", 3, &valid, "attempt to add with overflow").unwrap();
        assert_eq!(metrics.value("citystream_operator_errors_total", &[("stage", "windows")]), Some(1.0));
        // named by epoch, and hidden until the epoch is committed
        let named = format!("part-{}-e000000000003", state.lineage());
        let published =
            || walk(dir.path()).into_iter().filter(|f| f.contains(&named) && f.ends_with(".parquet")).count();
        assert_eq!(published(), 0, "{:?}", walk(dir.path()));
        state.commit(3, &Default::default()).unwrap();
        errors.publish_committed().unwrap();
        assert_eq!(published(), 1, "{:?}", walk(dir.path()));
        let dl = dead_letters("windows", "window", &valid, "attempt to add with overflow").unwrap();
        assert_eq!(dl.num_rows(), 1);
        let s = |c: &str| dl.column_by_name(c).unwrap().as_string::<i32>().value(0).to_owned();
        assert_eq!(s(dead_letter::REASON_CODE), "operator_error");
        assert!(s(dead_letter::REASON).contains("attempt to add with overflow"));
        assert_eq!(dl.column_by_name("src_offset").unwrap().as_primitive::<Int64Type>().value(0), 77);
    }

    fn walk(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            if e.path().is_dir() {
                out.extend(walk(&e.path()));
            } else {
                out.push(e.path().display().to_string());
            }
        }
        out
    }
}
