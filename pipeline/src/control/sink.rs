//! The control center as the runtime runs it (`task::Sink`): alert rows update the book, which
//! is in memory (decisions are stored when they are made, so a flush has nothing to do).

use arrow::array::RecordBatch;
use futures_util::FutureExt;
use futures_util::future::BoxFuture;

use super::{ControlCenter, ControlConfig};
use crate::task::{PipelineError, Sink, SinkContext, blocking_metered, sink_error};

/// A running control center fed by a pipeline.
pub(crate) struct ControlSink {
    name: String,
    center: ControlCenter,
    cpu_ns: citystream_operators::Counter,
}

impl ControlSink {
    /// Starts the control center `ctx.name` for `cfg`, calibrating the pipeline's alert levels.
    pub(crate) fn try_new(cfg: &ControlConfig, ctx: SinkContext<'_>) -> Result<Self, PipelineError> {
        let center = ControlCenter::start_with(ctx.name, cfg, ctx.metrics, ctx.thresholds).map_err(|e| ctx.error(e))?;
        Ok(Self { name: ctx.name.to_owned(), center, cpu_ns: ctx.cpu_ns })
    }
}

impl Sink for ControlSink {
    fn write<'a>(&'a mut self, _input: usize, batch: &'a RecordBatch) -> BoxFuture<'a, Result<(), PipelineError>> {
        let r = blocking_metered(&self.cpu_ns, || self.center.apply(batch));
        std::future::ready(r.map_err(|e| sink_error(&self.name, e))).boxed()
    }

    fn flush(&mut self) -> BoxFuture<'_, Result<(), PipelineError>> {
        std::future::ready(Ok(())).boxed()
    }
}
