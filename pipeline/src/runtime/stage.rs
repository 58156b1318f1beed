//! The task that drives one operator.

use std::sync::Arc;

use arrow::array::RecordBatch;
use citystream_operators::{Collector, Counter, Message, Metrics, Operator};
use tokio::sync::{mpsc, watch};

use crate::config::OperatorSpec;

use super::align::{Aligner, Next};
use super::{Outputs, PipelineError};

enum Either {
    Next(Next),
    Retune(Option<Arc<OperatorSpec>>),
}

/// Drives an [`Operator`]: merges its inputs, tracks their watermarks, aligns barriers and
/// ends when every input has ended.
pub(crate) struct StageTask {
    name: String,
    op: Box<dyn Operator>,
    inputs: usize,
    outputs: Outputs,
    rows_in: Counter,
    bytes_in: Counter,
    batches_in: Counter,
    rows_out: Vec<Counter>,
    bytes_out: Vec<Counter>,
    /// Rows routed to a `late_events` port (one counter per port, `None` for other ports).
    late: Vec<Option<Counter>>,
    cpu_ns: Counter,
    /// New configurations to apply live (see [`super::reload`]).
    retune: Option<watch::Receiver<Option<Arc<OperatorSpec>>>>,
    retunes: [Counter; 2],
    /// Where the operator's state goes at each checkpoint (stateful operators only).
    state: Option<(super::StateStore, citystream_operators::Gauge)>,
    /// The input watermark of the restored state.
    restored_watermark: Option<i64>,
    /// With operator state checkpoints the end of the input keeps what the operator holds
    /// (in the last checkpoint) instead of emitting it.
    keep_state_at_end: bool,
    /// Where batches the operator fails on are recorded (none: a failure stops the pipeline).
    errors: Option<std::sync::Arc<dyn crate::task::ErrorTable>>,
    /// The checkpoint epoch the rows being processed belong to.
    epoch: u64,
}

impl StageTask {
    pub(crate) fn new(name: String, op: Box<dyn Operator>, inputs: usize, outputs: Outputs, metrics: &Metrics) -> Self {
        let l = [("stage", name.as_str())];
        let rows_out = op
            .outputs()
            .iter()
            .map(|o| {
                metrics.counter(
                    "citystream_stage_rows_out_total",
                    "Rows emitted by a stage, per output.",
                    &[("stage", name.as_str()), ("output", o.name.as_str())],
                )
            })
            .collect();
        let bytes_out = op
            .outputs()
            .iter()
            .map(|o| {
                metrics.counter(
                    "citystream_stage_bytes_out_total",
                    "Arrow bytes emitted by a stage, per output.",
                    &[("stage", name.as_str()), ("output", o.name.as_str())],
                )
            })
            .collect();
        let late = op
            .outputs()
            .iter()
            .map(|o| {
                (o.name == "late_events").then(|| {
                    metrics.counter(
                        "citystream_late_events_total",
                        "Rows a stage routed late (behind the watermark it must honour).",
                        &[("stage", name.as_str())],
                    )
                })
            })
            .collect();
        Self {
            late,
            rows_in: metrics.counter("citystream_stage_rows_in_total", "Rows received by a stage.", &l),
            bytes_in: metrics.counter("citystream_stage_bytes_in_total", "Arrow bytes received by a stage.", &l),
            batches_in: metrics.counter("citystream_stage_batches_in_total", "Batches received by a stage.", &l),
            cpu_ns: metrics.counter(
                "citystream_stage_cpu_nanoseconds_total",
                "Thread CPU time spent in a stage's operator.",
                &l,
            ),
            retunes: [
                metrics.counter(
                    "citystream_stage_retunes_total",
                    "Live parameter changes applied to a stage, per outcome.",
                    &[("stage", name.as_str()), ("outcome", "applied")],
                ),
                metrics.counter(
                    "citystream_stage_retunes_total",
                    "Live parameter changes applied to a stage, per outcome.",
                    &[("stage", name.as_str()), ("outcome", "failed")],
                ),
            ],
            rows_out,
            bytes_out,
            name,
            op,
            inputs,
            outputs,
            retune: None,
            state: None,
            restored_watermark: None,
            keep_state_at_end: false,
            errors: None,
            epoch: 1,
        }
    }

    /// Records batches the operator fails on in `errors` and goes on (see [`crate::task::ErrorTable`]).
    pub(crate) fn with_errors(mut self, errors: std::sync::Arc<dyn crate::task::ErrorTable>) -> Self {
        self.errors = Some(errors);
        self
    }

    /// The operator's state was restored from a checkpoint taken at input watermark `wm`.
    pub(crate) fn with_restored_watermark(mut self, wm: i64) -> Self {
        self.restored_watermark = Some(wm);
        self
    }

    /// Writes the operator's state to `store` at every checkpoint barrier.
    pub(crate) fn with_state(mut self, store: super::StateStore, metrics: &Metrics) -> Self {
        self.keep_state_at_end = true;
        self.epoch = store.first_epoch();
        if self.op.is_stateful() {
            let g = metrics.gauge(
                "citystream_state_bytes",
                "Bytes of a stage's state written at the last checkpoint.",
                &[("stage", self.name.as_str())],
            );
            self.state = Some((store, g));
        }
        self
    }

    /// A checkpoint barrier passes: what the operator holds only to batch work goes out
    /// first, then its state is written, all before the barrier is forwarded — so once the
    /// sinks acknowledge the epoch, the state is durable.
    async fn checkpoint(&mut self, epoch: u64, watermark: i64, out: &mut Collector) -> Result<(), PipelineError> {
        self.call("on_checkpoint", |op, out| op.on_checkpoint(out), out)?;
        self.emit(out).await?;
        if let Some((store, bytes)) = &self.state {
            let op = &self.op;
            // the snapshot is the stage's work too: it counts in its CPU time (and energy)
            let written = super::blocking_metered(&self.cpu_ns, || -> Result<u64, PipelineError> {
                match op.snapshot().map_err(|source| PipelineError::Operator { stage: self.name.clone(), source })? {
                    Some(b) => store
                        .save(epoch, &self.name, op.kind(), &b, watermark)
                        .map_err(|source| PipelineError::State { stage: self.name.clone(), source }),
                    None => Ok(0),
                }
            })?;
            bytes.set(written as f64);
        }
        Ok(())
    }

    /// Lets the stage take new tunable parameters from `rx` between messages.
    pub(crate) fn with_retune(mut self, rx: watch::Receiver<Option<Arc<OperatorSpec>>>) -> Self {
        self.retune = Some(rx);
        self
    }

    /// Applies a new configuration between two messages: nothing in flight is lost or repeated.
    fn apply_retune(&mut self, spec: &OperatorSpec) {
        match self.op.retune(spec.as_any()) {
            Ok(()) => {
                self.retunes[0].inc();
                tracing::info!(stage = self.name, "applied new parameters live");
            }
            Err(e) => {
                self.retunes[1].inc();
                tracing::error!(stage = self.name, "could not apply new parameters, keeping the old ones: {e}");
            }
        }
    }

    /// The next input, or a new configuration if one arrived first.
    async fn next_input(
        retune: &mut Option<watch::Receiver<Option<Arc<OperatorSpec>>>>,
        inputs: &mut Aligner,
    ) -> Result<Either, PipelineError> {
        match retune {
            Some(r) => tokio::select! {
                biased;
                changed = r.changed() => match changed {
                    Ok(()) => Ok(Either::Retune(r.borrow_and_update().clone())),
                    Err(_) => {
                        // the reloader is gone: no more changes can come
                        *retune = None;
                        Ok(Either::Retune(None))
                    }
                },
                // cancel-safe: the aligner takes a message only in the poll that returns it
                next = inputs.next() => next.map(Either::Next),
            },
            None => inputs.next().await.map(Either::Next),
        }
    }

    async fn emit(&mut self, out: &mut Collector) -> Result<(), PipelineError> {
        let drained: Vec<_> = out.drain().collect();
        for (port, batch) in drained {
            self.rows_out[port].inc_by(batch.num_rows() as u64);
            if let Some(late) = &self.late[port] {
                late.inc_by(batch.num_rows() as u64);
            }
            self.bytes_out[port].inc_by(super::batch_bytes(&batch));
            self.outputs.send(port, Message::Batch(batch)).await?;
        }
        Ok(())
    }

    /// Runs the operator on one batch. A panic, or rows the operator refuses as bad input
    /// (`ErrorClass::User`), are recorded in `operator_errors` and the stage goes on; other
    /// errors, a panic of an operator that cannot go on, or one without an `operator_errors`
    /// table, stop the pipeline.
    fn process(&mut self, batch: RecordBatch, out: &mut Collector) -> Result<(), PipelineError> {
        let op = &mut self.op;
        let input = batch.clone();
        let res = metered(&self.cpu_ns, op.waits(), || {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| op.process_batch(batch, out)))
        });
        let failed = |source| PipelineError::Operator { stage: self.name.clone(), source };
        let (rows, what) = match res {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(citystream_operators::OperatorError::Rejected { rows, detail, .. })) => (rows, detail),
            Ok(Err(e)) if e.class() == citystream_operators::ErrorClass::User => {
                out.clear();
                (input, e.to_string())
            }
            Ok(Err(e)) => return Err(failed(e)),
            Err(panic) => {
                let message = panic_message(panic.as_ref());
                out.clear();
                if !self.op.recovers_from_panic() || self.errors.is_none() {
                    return Err(PipelineError::Task(format!("stage `{}` panicked: {message}", self.name)));
                }
                (input, format!("panicked: {message}"))
            }
        };
        let Some(errors) = &self.errors else {
            return Err(PipelineError::Task(format!("stage `{}` refused {} rows: {what}", self.name, rows.num_rows())));
        };
        tracing::error!(
            stage = self.name,
            rows = rows.num_rows(),
            "{what}: the rows go to `operator_errors`, the stage goes on"
        );
        // appended and fsynced
        super::blocking(|| errors.record(&self.name, self.op.kind(), self.epoch, &rows, &what))
            .map_err(|error| PipelineError::OperatorErrors { stage: self.name.clone(), error })
    }

    /// Calls one of the operator's hooks (`hook` names it in errors). A panic there stops the
    /// pipeline with an error naming the stage: no rows are at fault (unlike in
    /// [`process`](Self::process)), and the operator's state may be half changed, so a restart
    /// from the last checkpoint is the way on.
    fn call(
        &mut self,
        hook: &'static str,
        f: impl FnOnce(&mut dyn Operator, &mut Collector) -> Result<(), citystream_operators::OperatorError>,
        out: &mut Collector,
    ) -> Result<(), PipelineError> {
        let op = &mut self.op;
        let res = metered(&self.cpu_ns, op.waits(), || {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(op.as_mut(), out)))
        });
        match res {
            Ok(r) => r.map_err(|source| PipelineError::Operator { stage: self.name.clone(), source }),
            Err(panic) => Err(PipelineError::Task(format!(
                "stage `{}` panicked in {hook}: {}",
                self.name,
                panic_message(panic.as_ref())
            ))),
        }
    }

    pub(crate) async fn run(mut self, inputs: Vec<mpsc::Receiver<Message>>) -> Result<(), PipelineError> {
        let mut out = Collector::new(self.op.outputs().len());
        let mut watermarks = vec![i64::MIN; self.inputs];
        let mut current_wm = i64::MIN;
        let mut forwarded = i64::MIN;
        if let Some(wm) = self.restored_watermark.filter(|w| *w != i64::MIN) {
            // the restored state was taken at this watermark: what it closes was emitted before
            // the checkpoint, and rows behind it are late, as they were before the crash
            current_wm = wm;
            self.call("on_watermark", |op, out| op.on_watermark(wm, out), &mut out)?;
            self.emit(&mut out).await?;
            // downstream stages restored their own watermark: nothing to forward
            forwarded = self.op.output_watermark(wm);
        }
        let mut inputs = Aligner::new(inputs);
        loop {
            let next = match Self::next_input(&mut self.retune, &mut inputs).await? {
                Either::Next(n) => n,
                Either::Retune(Some(spec)) => {
                    self.apply_retune(&spec);
                    continue;
                }
                Either::Retune(None) => continue,
            };
            match next {
                Next::Message(_, Message::Batch(batch)) => {
                    self.rows_in.inc_by(batch.num_rows() as u64);
                    self.bytes_in.inc_by(super::batch_bytes(&batch));
                    self.batches_in.inc();
                    self.process(batch, &mut out)?;
                    self.emit(&mut out).await?;
                }
                Next::Message(input, Message::Watermark(wm)) => {
                    watermarks[input] = watermarks[input].max(wm);
                    self.advance_watermark(&watermarks, &mut current_wm, &mut forwarded, &mut out).await?;
                }
                Next::Message(input, Message::End) => {
                    watermarks[input] = i64::MAX;
                    self.advance_watermark(&watermarks, &mut current_wm, &mut forwarded, &mut out).await?;
                }
                Next::Message(_, Message::Barrier(_)) => unreachable!("the aligner reports barriers as `Aligned`"),
                Next::Aligned(b) => {
                    self.epoch = b.epoch + 1;
                    self.checkpoint(b.epoch, current_wm, &mut out).await?;
                    // what the checkpoint flushed may let the output watermark move on
                    self.forward_watermark(current_wm, &mut forwarded).await?;
                    self.outputs.broadcast(Message::Barrier(b)).await?
                }
                Next::Ended if self.keep_state_at_end => {
                    // the source's last checkpoint holds this state: the next start resumes it
                    // (emitting it now would write output that no checkpoint accounts for)
                    self.outputs.broadcast(Message::End).await?;
                    return Ok(());
                }
                Next::Ended => {
                    self.call("on_end", |op, out| op.on_end(out), &mut out)?;
                    self.emit(&mut out).await?;
                    self.outputs.broadcast(Message::End).await?;
                    return Ok(());
                }
            }
        }
    }

    async fn advance_watermark(
        &mut self,
        watermarks: &[i64],
        current: &mut i64,
        forwarded: &mut i64,
        out: &mut Collector,
    ) -> Result<(), PipelineError> {
        let min = watermarks.iter().copied().min().unwrap_or(i64::MIN);
        if min > *current && min != i64::MAX {
            *current = min;
            self.call("on_watermark", |op, out| op.on_watermark(min, out), out)?;
            self.emit(out).await?;
            self.forward_watermark(min, forwarded).await?;
        }
        Ok(())
    }

    /// Forwards the watermark the operator's output honours for input watermark `input`, if
    /// it moved on.
    async fn forward_watermark(&mut self, input: i64, forwarded: &mut i64) -> Result<(), PipelineError> {
        if input == i64::MIN {
            return Ok(());
        }
        let wm = self.op.output_watermark(input);
        if wm > *forwarded {
            *forwarded = wm;
            self.outputs.broadcast(Message::Watermark(wm)).await?;
        }
        Ok(())
    }
}

/// Runs an operator's call, adding its thread CPU time to `cpu_ns`: on this worker thread
/// (see [`super::blocking`]), or, for an operator that waits (`Operator::waits`), after handing
/// the worker's other tasks over.
fn metered<T>(cpu_ns: &Counter, waits: bool, f: impl FnOnce() -> T) -> T {
    if waits { super::blocking_metered(cpu_ns, f) } else { super::cpu_metered(cpu_ns, f) }
}

/// A panic's message, as far as it can be told.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{AsArray, Int64Array};
    use arrow::datatypes::{DataType, Field, Int64Type, Schema};
    use citystream_operators::{OperatorError, OutputSpec};

    use super::super::{Edge, Outputs};
    use super::*;

    /// Passes batches on; panics on a batch holding the value 13, refuses rows holding 7.
    struct Fragile(Vec<OutputSpec>);

    impl Operator for Fragile {
        fn kind(&self) -> &'static str {
            "fragile"
        }
        fn outputs(&self) -> &[OutputSpec] {
            &self.0
        }
        fn process_batch(&mut self, batch: RecordBatch, out: &mut Collector) -> Result<(), OperatorError> {
            let v = batch.column(0).as_primitive::<Int64Type>();
            assert!(!v.values().contains(&13), "unlucky number");
            let seven: arrow::array::BooleanArray = v.iter().map(|x| Some(x == Some(7))).collect();
            out.emit(0, arrow::compute::filter_record_batch(&batch, &arrow::compute::not(&seven)?)?);
            if seven.true_count() > 0 {
                let rows = arrow::compute::filter_record_batch(&batch, &seven)?;
                return Err(OperatorError::Rejected { operator: "fragile", detail: "seven".into(), rows });
            }
            Ok(())
        }
    }

    fn batch(values: &[i64]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(values.to_vec()))]).unwrap()
    }

    /// One record: stage, operator kind, the rows' values, what went wrong.
    type Record = (String, String, Vec<i64>, String);

    /// Keeps what stages record, in memory.
    #[derive(Debug, Default)]
    struct Recorded(std::sync::Mutex<Vec<Record>>);

    impl crate::task::ErrorTable for Recorded {
        fn record(
            &self,
            stage: &str,
            kind: &str,
            _epoch: u64,
            batch: &RecordBatch,
            what: &str,
        ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
            let values = batch.column(0).as_primitive::<Int64Type>().values().to_vec();
            self.0.lock().unwrap().push((stage.into(), kind.into(), values, what.into()));
            Ok(())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panic_or_refused_rows_are_recorded_and_the_stage_goes_on() {
        let metrics = Metrics::new();
        let errors = Arc::new(Recorded::default());
        let op = Fragile(vec![OutputSpec::new("main", batch(&[]).schema())]);
        let (out_tx, mut out_rx) = mpsc::channel(16);
        let outputs = Outputs { ports: vec![vec![Edge { tx: out_tx }]] };
        let task = StageTask::new("fragile".into(), Box::new(op), 1, outputs, &metrics).with_errors(errors.clone());
        let (tx, rx) = mpsc::channel(16);
        for b in [batch(&[1, 2]), batch(&[3, 13, 4]), batch(&[5, 7, 6])] {
            tx.send(Message::Batch(b)).await.unwrap();
        }
        tx.send(Message::End).await.unwrap();
        task.run(vec![rx]).await.expect("the stage went on");
        let mut passed = Vec::new();
        while let Some(e) = out_rx.recv().await {
            if let Message::Batch(b) = e {
                passed.extend(b.column(0).as_primitive::<Int64Type>().values().iter().copied());
            }
        }
        assert_eq!(passed, [1, 2, 5, 6], "the panicking batch is out, the refused row too, the rest went on");
        let recorded = errors.0.lock().unwrap();
        let rows: Vec<(&str, &str, &[i64])> =
            recorded.iter().map(|(s, k, v, _)| (s.as_str(), k.as_str(), v.as_slice())).collect();
        assert_eq!(rows, [("fragile", "fragile", &[3, 13, 4][..]), ("fragile", "fragile", &[7][..])]);
        assert!(recorded[0].3.contains("unlucky number"), "the panic's message: {}", recorded[0].3);
        assert!(recorded[1].3.contains("seven"), "the refusal's detail: {}", recorded[1].3);
    }

    /// Panics when a watermark reaches it.
    struct BrokenClock(Vec<OutputSpec>);

    impl Operator for BrokenClock {
        fn kind(&self) -> &'static str {
            "broken_clock"
        }
        fn outputs(&self) -> &[OutputSpec] {
            &self.0
        }
        fn process_batch(&mut self, batch: RecordBatch, out: &mut Collector) -> Result<(), OperatorError> {
            out.emit(0, batch);
            Ok(())
        }
        fn on_watermark(&mut self, _wm: i64, _out: &mut Collector) -> Result<(), OperatorError> {
            panic!("no time like the present");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panic_in_a_hook_stops_the_stage_with_an_error_naming_it() {
        let metrics = Metrics::new();
        let errors = Arc::new(Recorded::default());
        let op = BrokenClock(vec![OutputSpec::new("main", batch(&[]).schema())]);
        let (out_tx, _out_rx) = mpsc::channel(16);
        let outputs = Outputs { ports: vec![vec![Edge { tx: out_tx }]] };
        let task = StageTask::new("clock".into(), Box::new(op), 1, outputs, &metrics).with_errors(errors.clone());
        let (tx, rx) = mpsc::channel(16);
        tx.send(Message::Batch(batch(&[1]))).await.unwrap();
        tx.send(Message::Watermark(1_000)).await.unwrap();
        let err = task.run(vec![rx]).await.expect_err("a hook's panic stops the stage");
        let text = err.to_string();
        assert!(
            text.contains("`clock`") && text.contains("on_watermark") && text.contains("no time like the present"),
            "{text}"
        );
        assert!(errors.0.lock().unwrap().is_empty(), "no rows are at fault");
    }
}
