//! The sink contract: what the runtime hands a sink when it builds it, and what a sink does
//! with the messages of its inputs.
//!
//! The runtime's sink task reads a sink's inputs, aligns their barriers, and calls the sink:
//! [`write`](Sink::write) for every batch, [`on_watermark`](Sink::on_watermark) when the
//! minimum watermark of its inputs advances, [`flush`](Sink::flush) at every aligned barrier
//! (everything before it becomes durable; then the barrier is acknowledged, so the sources may
//! commit their positions) and at the end. The runtime knows sinks only through this trait;
//! the planner builds them from their config (`SinkConfig::build`).

use std::collections::BTreeMap;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use citystream_operators::alert::ThresholdBoard;
use citystream_operators::event_time::EventClock;
use citystream_operators::{Counter, Metrics};
use futures_util::future::BoxFuture;

use super::{PipelineError, StateStore};

/// What a table holds after the sink closed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableStats {
    /// Rows written.
    pub rows: u64,
    /// Files written.
    pub files: u64,
    /// Bytes on disk.
    pub bytes: u64,
}

/// Everything the runtime hands a sink when it builds it.
pub(crate) struct SinkContext<'a> {
    /// The sink's name in the config.
    pub(crate) name: &'a str,
    /// The table (or topic) of each input, in input order.
    pub(crate) inputs: Vec<String>,
    /// The source stream each input's rows come from, in input order.
    pub(crate) origins: &'a [String],
    /// Schema per table.
    pub(crate) tables: &'a BTreeMap<String, SchemaRef>,
    /// Tables whose rows a stage upstream held back (`compress`): they arrive after newer
    /// rows, so their source positions do not say which checkpoint wrote them.
    pub(crate) holding: Vec<String>,
    /// The event clocks of the source streams each input's rows come from, in input order
    /// (whether they went idle: the global topic's publisher says so).
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))]
    pub(crate) upstream_clocks: Vec<Vec<EventClock>>,
    /// The run's metrics.
    pub(crate) metrics: &'a Metrics,
    /// Live alert levels (the control center calibrates them).
    pub(crate) thresholds: &'a ThresholdBoard,
    /// Operator state checkpoints, when configured.
    pub(crate) state: Option<&'a StateStore>,
    /// Becomes true when the run is asked to stop (a revocation, a signal): an end that
    /// follows is not the end of the input.
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))]
    pub(crate) stop: tokio::sync::watch::Receiver<bool>,
    /// Thread CPU time the sink spends (`citystream_stage_cpu_nanoseconds_total`): a sink
    /// meters its own synchronous work with [`cpu_metered`](super::cpu_metered).
    pub(crate) cpu_ns: Counter,
}

impl SinkContext<'_> {
    /// The error of this sink, for a failure `source`.
    pub(crate) fn error(&self, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> PipelineError {
        sink_error(self.name, source)
    }
}

/// The error of sink `sink`, for a failure `source`.
pub(crate) fn sink_error(sink: &str, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> PipelineError {
    PipelineError::Sink { sink: sink.to_owned(), error: source.into() }
}

/// A sink the runtime runs as one task.
pub(crate) trait Sink: Send {
    /// Writes a batch of input `input` (see [`SinkContext::inputs`]).
    fn write<'a>(&'a mut self, input: usize, batch: &'a RecordBatch) -> BoxFuture<'a, Result<(), PipelineError>>;

    /// The minimum watermark of the sink's inputs advanced to `watermark`.
    fn on_watermark(&mut self, _watermark: i64) -> Result<(), PipelineError> {
        Ok(())
    }

    /// The watermark of input `input` advanced to `watermark` (before
    /// [`on_watermark`](Self::on_watermark) is told of their minimum).
    fn on_input_watermark(&mut self, _input: usize, _watermark: i64) {}

    /// Every input ended: the [`flush`](Self::flush) that follows is the last, after the
    /// source's final checkpoint.
    fn on_end(&mut self) {}

    /// Makes everything written so far durable (at an aligned barrier, and at the end).
    fn flush(&mut self) -> BoxFuture<'_, Result<(), PipelineError>>;

    /// Barrier `epoch` is durable: what comes next belongs to the epoch after it.
    fn on_checkpoint(&mut self, _epoch: u64) {}

    /// What each table holds, once the sink has flushed for the last time.
    fn tables(&self) -> BTreeMap<String, TableStats> {
        BTreeMap::new()
    }
}
