//! The task that drives one operator.

use citystream_operators::{Collector, Counter, Message, Metrics, Operator};
use tokio::sync::mpsc;

use super::align::{Aligner, Next};
use super::{Envelope, Outputs, PipelineError, cpu, thread_cpu_ns};

/// Drives an [`Operator`]: merges its inputs, tracks their watermarks, aligns barriers and
/// ends when every input has ended.
pub(crate) struct StageTask {
    name: String,
    op: Box<dyn Operator>,
    inputs: usize,
    outputs: Outputs,
    rows_in: Counter,
    batches_in: Counter,
    rows_out: Vec<Counter>,
    cpu_ns: Counter,
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
        Self {
            rows_in: metrics.counter("citystream_stage_rows_in_total", "Rows received by a stage.", &l),
            batches_in: metrics.counter("citystream_stage_batches_in_total", "Batches received by a stage.", &l),
            cpu_ns: metrics.counter(
                "citystream_stage_cpu_nanoseconds_total",
                "Thread CPU time spent in a stage's operator.",
                &l,
            ),
            rows_out,
            name,
            op,
            inputs,
            outputs,
        }
    }

    async fn emit(&mut self, out: &mut Collector) -> Result<(), PipelineError> {
        let drained: Vec<_> = out.drain().collect();
        for (port, batch) in drained {
            self.rows_out[port].inc_by(batch.num_rows() as u64);
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
        let mut inputs = Aligner::new(self.inputs);
        loop {
            match inputs.next(&mut rx).await? {
                Next::Message(_, Message::Batch(batch)) => {
                    self.rows_in.inc_by(batch.num_rows() as u64);
                    self.batches_in.inc();
                    self.call(|op, out| op.process_batch(batch, out), &mut out)?;
                    self.emit(&mut out).await?;
                }
                Next::Message(input, Message::Watermark(wm)) => {
                    watermarks[input] = watermarks[input].max(wm);
                    self.advance_watermark(&watermarks, &mut current_wm, &mut out).await?;
                }
                Next::Message(input, Message::End) => {
                    watermarks[input] = i64::MAX;
                    self.advance_watermark(&watermarks, &mut current_wm, &mut out).await?;
                }
                Next::Message(_, Message::Barrier(_)) => unreachable!("the aligner reports barriers as `Aligned`"),
                Next::Aligned(b) => self.outputs.broadcast(Message::Barrier(b)).await?,
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
        out: &mut Collector,
    ) -> Result<(), PipelineError> {
        let min = watermarks.iter().copied().min().unwrap_or(i64::MIN);
        if min > *current && min != i64::MAX {
            *current = min;
            self.call(|op, out| op.on_watermark(min, out), out)?;
            self.emit(out).await?;
            self.outputs.broadcast(Message::Watermark(min)).await?;
        }
        Ok(())
    }
}
