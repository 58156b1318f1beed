//! The task that drives one operator.

use std::sync::Arc;

use citystream_operators::{Collector, Counter, Message, Metrics, Operator};
use tokio::sync::{mpsc, watch};

use crate::config::OperatorSpec;

use super::align::{Aligner, Next};
use super::{Envelope, Outputs, PipelineError, cpu, thread_cpu_ns};

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
        }
    }

    /// The operator's state was restored from a checkpoint taken at input watermark `wm`.
    pub(crate) fn with_restored_watermark(mut self, wm: i64) -> Self {
        self.restored_watermark = Some(wm);
        self
    }

    /// Writes the operator's state to `store` at every checkpoint barrier.
    pub(crate) fn with_state(mut self, store: super::StateStore, metrics: &Metrics) -> Self {
        self.keep_state_at_end = true;
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
        self.call(|op, out| op.on_checkpoint(out), out)?;
        self.emit(out).await?;
        if let Some((store, bytes)) = &self.state {
            let op = &self.op;
            // the snapshot is the stage's work too: it counts in its CPU time (and energy)
            let written = super::cpu_metered(&self.cpu_ns, || -> Result<u64, PipelineError> {
                match op.snapshot().map_err(|source| PipelineError::Operator { stage: self.name.clone(), source })? {
                    Some(b) => store
                        .save(epoch, &self.name, op.kind(), &b, watermark)
                        .map_err(|message| PipelineError::State { stage: self.name.clone(), message }),
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
        rx: &mut mpsc::Receiver<Envelope>,
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
                // cancel-safe: the aligner only awaits `recv`
                next = inputs.next(rx) => next.map(Either::Next),
            },
            None => inputs.next(rx).await.map(Either::Next),
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

    fn call(
        &mut self,
        f: impl FnOnce(&mut dyn Operator, &mut Collector) -> Result<(), citystream_operators::OperatorError>,
        out: &mut Collector,
    ) -> Result<(), PipelineError> {
        let op = &mut self.op;
        let (res, spent) = cpu(|| {
            let t0 = thread_cpu_ns();
            let r = f(op.as_mut(), out);
            (r, thread_cpu_ns().saturating_sub(t0))
        });
        self.cpu_ns.inc_by(spent);
        res.map_err(|source| PipelineError::Operator { stage: self.name.clone(), source })
    }

    pub(crate) async fn run(mut self, mut rx: mpsc::Receiver<Envelope>) -> Result<(), PipelineError> {
        let mut out = Collector::new(self.op.outputs().len());
        let mut watermarks = vec![i64::MIN; self.inputs];
        let mut current_wm = i64::MIN;
        let mut forwarded = i64::MIN;
        if let Some(wm) = self.restored_watermark.filter(|w| *w != i64::MIN) {
            // the restored state was taken at this watermark: what it closes was emitted before
            // the checkpoint, and rows behind it are late, as they were before the crash
            current_wm = wm;
            self.call(|op, out| op.on_watermark(wm, out), &mut out)?;
            self.emit(&mut out).await?;
            // downstream stages restored their own watermark: nothing to forward
            forwarded = self.op.output_watermark(wm);
        }
        let mut inputs = Aligner::new(self.inputs);
        loop {
            let next = match Self::next_input(&mut self.retune, &mut inputs, &mut rx).await? {
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
                    self.call(|op, out| op.process_batch(batch, out), &mut out)?;
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
                    self.call(|op, out| op.on_end(out), &mut out)?;
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
            self.call(|op, out| op.on_watermark(min, out), out)?;
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
