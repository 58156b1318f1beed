//! Calm keys in the high-carbon mode: a key whose latest prediction is beyond a level is
//! predicted once per `every` of event time, the rest of its rows skipped and counted.

use std::collections::HashMap;

use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};

use arrow::datatypes::{Float32Type, SchemaRef};

use citystream_operators::{Counter, OperatorError};

use super::config::CalmConfig;
pub(super) fn calm_state_schema() -> SchemaRef {
    Arc::new(arrow::datatypes::Schema::new(vec![
        arrow::datatypes::Field::new("key", arrow::datatypes::DataType::Utf8, false),
        arrow::datatypes::Field::new("t", arrow::datatypes::DataType::Int64, false),
        arrow::datatypes::Field::new("calm", arrow::datatypes::DataType::Boolean, false),
    ]))
}

/// The calm keys of a stage.
pub(super) struct Calm {
    pub(super) cfg: CalmConfig,
    pub(super) key: usize,
    pub(super) time: usize,
    /// key -> (event time of its latest prediction, whether that prediction was calm)
    pub(super) state: HashMap<String, (i64, bool)>,
    pub(super) skipped: Counter,
}

impl Calm {
    /// The rows to run in the high mode: all rows of keys at risk (or unseen), and a calm
    /// key's rows once per `every` after its latest prediction.
    pub(super) fn thin(&self, batch: &RecordBatch) -> Result<RecordBatch, OperatorError> {
        let keys = batch.column(self.key).as_string::<i32>();
        let times = batch.column(self.time).as_primitive::<arrow::datatypes::TimestampMillisecondType>();
        let every = self.cfg.every.as_millis_i64();
        // rows kept in this batch move a calm key's clock too
        let mut last: HashMap<&str, i64> = HashMap::new();
        let keep: arrow::array::BooleanArray = (0..batch.num_rows())
            .map(|i| {
                if keys.is_null(i) || times.is_null(i) {
                    return Some(true);
                }
                let (k, t) = (keys.value(i), times.value(i));
                let Some(&(seen, calm)) = self.state.get(k) else { return Some(true) };
                let prev = last.get(k).copied().unwrap_or(seen);
                let run = !calm || t.saturating_sub(prev) >= every;
                if run && calm {
                    last.insert(k, t);
                }
                Some(run)
            })
            .collect();
        let skipped = keep.false_count();
        self.skipped.inc_by(skipped as u64);
        if skipped == 0 {
            return Ok(batch.clone());
        }
        Ok(arrow::compute::filter_record_batch(batch, &keep)?)
    }

    /// Records each key's latest prediction and whether it was calm.
    pub(super) fn observe(&mut self, input: &RecordBatch, output: &RecordBatch) {
        let Some(col) = output.column_by_name(&self.cfg.column) else { return };
        let values = col.as_primitive::<Float32Type>();
        let keys = input.column(self.key).as_string::<i32>();
        let times = input.column(self.time).as_primitive::<arrow::datatypes::TimestampMillisecondType>();
        for i in 0..input.num_rows() {
            if keys.is_null(i) || times.is_null(i) {
                continue;
            }
            let calm = !values.value(i).is_nan() && self.cfg.is_calm(values.value(i));
            let e = self.state.entry(keys.value(i).to_owned()).or_insert((i64::MIN, calm));
            if times.value(i) >= e.0 {
                *e = (times.value(i), calm);
            }
        }
    }
}
