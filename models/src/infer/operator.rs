//! The `infer` operator: micro-batches rows, runs the live (and shadow) model on runs of one
//! event time, and stamps the outputs with the model's name and checksum.

use citystream_operators::LiveChangeError;
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{Array, ArrayRef, AsArray, FixedSizeListArray, Float32Array, RecordBatch, StringArray};
use arrow::buffer::ScalarBuffer;
use arrow::compute::concat_batches;
use arrow::datatypes::{DataType, Float32Type, SchemaRef};
use citystream_operators::common::as_f64;
use citystream_operators::{Collector, Counter, Gauge, Metrics, Operator, OperatorError, OutputSpec};

use crate::onnx::{Model, Provider};

use super::calm::{Calm, calm_state_schema};
use super::config::{BatchConfig, InferConfig, Resolved};
use super::hot_swap::Slot;

/// The `infer` operator.
pub struct Infer {
    pub(super) r: Resolved,
    pub(super) outputs: Vec<OutputSpec>,
    pub(super) live: Slot,
    pub(super) shadow: Option<Slot>,
    pub(super) carbon: Option<Slot>,
    /// Whether the stage follows the carbon policy at all.
    pub(super) carbon_on: bool,
    pub(super) calm: Option<Calm>,
    pub(super) carbon_max_rows: Option<usize>,
    pub(super) high_mode: bool,
    pub(super) metrics: Metrics,
    pub(super) stage: String,
    pub(super) batch: BatchConfig,
    pub(super) buffered: Vec<RecordBatch>,
    pub(super) buffered_rows: usize,
    pub(super) first_at: Option<Instant>,
    pub(super) rows: Counter,
    pub(super) runs: Counter,
    pub(super) micros: Counter,
    /// The share of `runs` and `micros` on the CUDA provider (the GPU's busy time is shared
    /// among stages by it).
    pub(super) cuda_runs: Counter,
    pub(super) cuda_micros: Counter,
    pub(super) shadow_errors: Counter,
    pub(super) last_batch: Gauge,
}

impl std::fmt::Debug for Infer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Infer").field("model", &self.live.model).finish_non_exhaustive()
    }
}

pub(super) fn ext(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> OperatorError {
    OperatorError::Arrow(arrow::error::ArrowError::ExternalError(e.into()))
}

/// Which rows of `batch` have a null feature (`None`: none has).
pub(super) fn null_features(r: &Resolved, batch: &RecordBatch) -> Option<arrow::array::BooleanArray> {
    let cols: Vec<&ArrayRef> = r.input.iter().map(|&c| batch.column(c)).collect();
    let list_values_null = r.list && {
        let list = batch.column(r.input[0]).as_fixed_size_list();
        list.values().null_count() > 0
    };
    if cols.iter().all(|c| c.null_count() == 0) && !list_values_null {
        return None;
    }
    let mask: arrow::array::BooleanArray = (0..batch.num_rows())
        .map(|i| {
            let null = if r.list {
                let list = batch.column(r.input[0]).as_fixed_size_list();
                list.is_null(i) || list.value(i).null_count() > 0
            } else {
                cols.iter().any(|c| c.is_null(i))
            };
            Some(null)
        })
        .collect();
    (mask.true_count() > 0).then_some(mask)
}

/// Row-major features of `batch`: borrowed from the list column when its layout allows,
/// otherwise copied into `scratch`.
pub(super) fn features<'a>(
    r: &Resolved,
    batch: &'a RecordBatch,
    scratch: &'a mut Vec<f32>,
) -> Result<&'a [f32], OperatorError> {
    let n = batch.num_rows();
    if r.list {
        let list: &FixedSizeListArray = batch.column(r.input[0]).as_fixed_size_list();
        if list.null_count() > 0 {
            return Err(ext("a feature row is null"));
        }
        let values = list.values().as_primitive::<Float32Type>();
        if values.null_count() > 0 {
            return Err(ext("a feature value is null"));
        }
        // arrow slices a FixedSizeList's values with it (offset() is 0); kept general
        let start = list.offset() * r.width;
        return Ok(&values.values()[start..start + n * r.width]);
    }
    scratch.clear();
    scratch.resize(n * r.width, 0.0);
    for (j, &c) in r.input.iter().enumerate() {
        let (v, nulls) = as_f64(batch.column(c))?;
        if nulls.is_some_and(|b| b.null_count() > 0) {
            return Err(ext(format!("feature column `{}` has nulls", batch.schema().field(c).name())));
        }
        for (i, x) in v.into_iter().enumerate() {
            scratch[i * r.width + j] = x as f32;
        }
    }
    Ok(scratch)
}

impl Infer {
    pub(super) fn stamp(
        schema: &SchemaRef,
        batch: &RecordBatch,
        keep: &[usize],
        model: &Model,
        outs: Vec<Vec<f32>>,
        widths: &[usize],
    ) -> Result<RecordBatch, OperatorError> {
        let n = batch.num_rows();
        let mut cols: Vec<ArrayRef> = keep.iter().map(|&i| batch.column(i).clone()).collect();
        for (values, &w) in outs.into_iter().zip(widths) {
            if w == 1 {
                cols.push(Arc::new(Float32Array::new(ScalarBuffer::from(values), None)));
            } else {
                for k in 0..w {
                    cols.push(Arc::new(Float32Array::from_iter_values((0..n).map(|i| values[i * w + k]))));
                }
            }
        }
        cols.push(Arc::new(StringArray::from_iter_values(std::iter::repeat_n(model.name.as_str(), n))));
        cols.push(Arc::new(StringArray::from_iter_values(std::iter::repeat_n(model.sha256.as_str(), n))));
        Ok(RecordBatch::try_new(schema.clone(), cols)?)
    }

    /// Whether the carbon policy reports a high-carbon grid (logged and counted on change).
    pub(super) fn check_carbon(&mut self) -> bool {
        if !self.carbon_on {
            return false;
        }
        let high = self.metrics.value("citystream_carbon_high_mode", &[]) == Some(1.0);
        if high != self.high_mode {
            self.high_mode = high;
            let to = match (&self.carbon, high) {
                (Some(c), true) => c.model.name.clone(),
                _ => self.live.model.name.clone(),
            };
            let thin = self.calm.as_ref().filter(|_| high).map(|c| c.cfg.every.to_string());
            tracing::info!(stage = %self.stage, model = %to, high, calm_every = ?thin, max_rows = self.max_rows(), "carbon policy: {} mode", if high { "high-carbon" } else { "normal" });
            let action = match (self.carbon.is_some(), high) {
                (true, true) => "low_carbon_model",
                (true, false) => "full_model",
                (false, true) => "high_carbon_mode",
                (false, false) => "normal_mode",
            };
            self.metrics
                .counter(
                    "citystream_policy_actions_total",
                    "Actions of the carbon-aware policy.",
                    &[("policy", "model"), ("action", action)],
                )
                .inc();
        }
        high
    }

    pub(super) fn max_rows(&self) -> usize {
        if self.high_mode { self.carbon_max_rows.unwrap_or(self.batch.max_rows) } else { self.batch.max_rows }
    }

    /// The model runs of a micro-batch, as (first row, rows): at most `max_rows` each, and never
    /// rows of two event times (the input's first timestamp column) in one run. A model whose
    /// results depend on the batch (int8 with dynamic quantization takes its scale from the
    /// batch's values; the committed int8 models are quantized statically and do not, but an
    /// operator's own model may) then scores a row the same whether the rows arrived live,
    /// minute by minute, or as a backlog of many minutes at once.
    pub(super) fn runs_of(&self, all: &RecordBatch) -> Vec<(usize, usize)> {
        let max_rows = self.max_rows().max(1);
        let n = all.num_rows();
        let times = all
            .columns()
            .iter()
            .find(|c| matches!(c.data_type(), DataType::Timestamp(..)))
            .and_then(|c| c.as_primitive_opt::<arrow::datatypes::TimestampMillisecondType>());
        let mut runs = Vec::new();
        let mut start = 0;
        while start < n {
            let mut end = (start + max_rows).min(n);
            if let Some(t) = times {
                let first = t.is_valid(start).then(|| t.value(start));
                end = (start + 1..end).find(|&i| (t.is_valid(i).then(|| t.value(i))) != first).unwrap_or(end);
            }
            runs.push((start, end - start));
            start = end;
        }
        runs
    }

    pub(super) fn flush(&mut self, out: &mut Collector) -> Result<(), OperatorError> {
        self.live.poll();
        if let Some(s) = &mut self.shadow {
            s.poll();
        }
        if let Some(s) = &mut self.carbon {
            s.poll();
        }
        let high = self.check_carbon();
        if self.buffered.is_empty() {
            return Ok(());
        }
        let input = self.buffered[0].schema();
        let all = concat_batches(&input, &std::mem::take(&mut self.buffered))?;
        self.buffered_rows = 0;
        self.first_at = None;
        let widths: Vec<usize> = self.live.model.output_widths();
        for (start, len) in self.runs_of(&all) {
            let mut chunk = all.slice(start, len);
            // calm keys are thinned one event time at a time, each after the predictions of the
            // times before it: a key turns calm (or not) at the same minute whether the minutes
            // came one per batch (live) or many in one (a backlog)
            if high && let Some(calm) = &self.calm {
                chunk = calm.thin(&chunk)?;
                if chunk.num_rows() == 0 {
                    continue;
                }
            }
            let len = chunk.num_rows();
            let mut scratch = Vec::new();
            let t0 = Instant::now();
            let feats = features(&self.r, &chunk, &mut scratch)?;
            let model = match (&mut self.carbon, high) {
                (Some(c), true) => &mut c.model,
                _ => &mut self.live.model,
            };
            let on = model.runs_on(len);
            let outs = model.run(feats, len).map_err(ext)?;
            let micros = t0.elapsed().as_micros() as u64;
            self.micros.inc_by(micros);
            if on == Provider::Cuda {
                self.cuda_runs.inc();
                self.cuda_micros.inc_by(micros);
            }
            self.rows.inc_by(len as u64);
            self.runs.inc();
            self.last_batch.set(len as f64);
            let stamped = Self::stamp(&self.outputs[0].schema, &chunk, &self.r.keep, model, outs, &widths)?;
            if let Some(calm) = &mut self.calm {
                calm.observe(&chunk, &stamped);
            }
            out.emit(0, stamped);
            if let Some(s) = &mut self.shadow {
                match s.model.run(feats, len) {
                    Ok(o) => {
                        out.emit(1, Self::stamp(&self.outputs[1].schema, &chunk, &self.r.keep, &s.model, o, &widths)?)
                    }
                    Err(e) => {
                        self.shadow_errors.inc();
                        tracing::warn!(error = %e, "shadow model run failed");
                    }
                }
            }
        }
        Ok(())
    }
}

impl Operator for Infer {
    fn kind(&self) -> &'static str {
        "infer"
    }

    fn outputs(&self) -> &[OutputSpec] {
        &self.outputs
    }

    fn process_batch(&mut self, batch: RecordBatch, out: &mut Collector) -> Result<(), OperatorError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        // a row with a null feature cannot be scored: refused (recorded by the runtime), the
        // others go on
        let nulls = null_features(&self.r, &batch);
        let (batch, refused) = match nulls {
            Some(mask) => {
                let refused = arrow::compute::filter_record_batch(&batch, &mask)?;
                (arrow::compute::filter_record_batch(&batch, &arrow::compute::not(&mask)?)?, Some(refused))
            }
            None => (batch, None),
        };
        if batch.num_rows() > 0 {
            self.buffered_rows += batch.num_rows();
            self.buffered.push(batch);
            let first = *self.first_at.get_or_insert_with(Instant::now);
            if self.buffered_rows >= self.max_rows() || first.elapsed() >= self.batch.max_delay.to_std() {
                self.flush(out)?;
            }
        }
        match refused {
            Some(rows) => Err(OperatorError::Rejected { operator: "infer", detail: "a feature is null".into(), rows }),
            None => Ok(()),
        }
    }

    fn on_watermark(&mut self, _watermark: i64, out: &mut Collector) -> Result<(), OperatorError> {
        self.flush(out)
    }

    fn on_end(&mut self, out: &mut Collector) -> Result<(), OperatorError> {
        self.flush(out)
    }

    /// The micro-batch is work in progress, not state: it runs before the barrier passes.
    fn on_checkpoint(&mut self, out: &mut Collector) -> Result<(), OperatorError> {
        self.flush(out)
    }

    /// With `carbon.calm`, each key's latest prediction time and calmness is state.
    fn is_stateful(&self) -> bool {
        self.calm.is_some()
    }

    fn snapshot(&self) -> Result<Option<RecordBatch>, OperatorError> {
        let Some(calm) = &self.calm else { return Ok(None) };
        let mut keys: Vec<(&String, &(i64, bool))> = calm.state.iter().collect();
        keys.sort_unstable();
        Ok(Some(RecordBatch::try_new(
            calm_state_schema(),
            vec![
                Arc::new(arrow::array::StringArray::from_iter_values(keys.iter().map(|k| k.0.as_str()))),
                Arc::new(arrow::array::Int64Array::from_iter_values(keys.iter().map(|k| k.1.0))),
                Arc::new(arrow::array::BooleanArray::from(keys.iter().map(|k| k.1.1).collect::<Vec<_>>())),
            ],
        )?))
    }

    fn restore(&mut self, state: RecordBatch) -> Result<(), OperatorError> {
        let Some(calm) = &mut self.calm else {
            return Err(OperatorError::State { operator: "infer", detail: "this stage has no `carbon.calm`".into() });
        };
        citystream_operators::common::check_state_schema("infer", &state, &calm_state_schema())?;
        let keys = state.column(0).as_string::<i32>();
        let t = state.column(1).as_primitive::<arrow::datatypes::Int64Type>();
        let c = state.column(2).as_boolean();
        calm.state = (0..state.num_rows()).map(|i| (keys.value(i).to_owned(), (t.value(i), c.value(i)))).collect();
        Ok(())
    }

    fn retune(&mut self, config: &dyn std::any::Any) -> Result<(), LiveChangeError> {
        let c = config.downcast_ref::<InferConfig>().ok_or(LiveChangeError::WrongConfig("infer"))?;
        self.batch = c.batch.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use arrow::datatypes::{Field, Schema};

    use super::*;

    fn resolved(width: usize) -> Resolved {
        Resolved { input: vec![0], list: true, width, keep: vec![], schema: Arc::new(Schema::empty()) }
    }

    #[test]
    fn list_features_are_borrowed_from_the_arrow_buffer_even_when_sliced() {
        let item = Arc::new(Field::new("item", DataType::Float32, false));
        let values: Vec<f32> = (0..40).map(|v| v as f32).collect();
        let list = FixedSizeListArray::try_new(
            item.clone(),
            4,
            Arc::new(Float32Array::new(ScalarBuffer::from(values), None)),
            None,
        )
        .unwrap();
        let schema = Arc::new(Schema::new(vec![Field::new("f", DataType::FixedSizeList(item, 4), false)]));
        let batch = RecordBatch::try_new(schema, vec![Arc::new(list)]).unwrap();
        let base = batch.column(0).as_fixed_size_list().values().as_primitive::<Float32Type>().values().as_ptr();
        let sliced = batch.slice(3, 5);
        let mut scratch = Vec::new();
        let f = features(&resolved(4), &sliced, &mut scratch).unwrap();
        assert_eq!(f.len(), 20);
        assert_eq!(f[0], 12.0, "row 3 starts at value 12");
        assert_eq!(f.as_ptr(), base.wrapping_add(12), "no copy: the slice points into the Arrow buffer");
        assert!(scratch.is_empty());
    }
}
