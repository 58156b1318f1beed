//! The source contract: what a source is handed to run, and what it reports back.
//!
//! A source task reads from outside (a simulator, Kafka, files), hands raw batches to its
//! output ports, sends watermarks from its ports' event clocks, and — if it can resume —
//! takes checkpoints: a barrier, every sink's acknowledgement ([`CheckpointAcks`]), then its
//! positions in the state manifest ([`StateStore::commit`]). The runtime knows sources only
//! through this trait; the planner builds them from their config.

use std::path::PathBuf;

use citystream_operators::Metrics;
use citystream_operators::event_time::EventClock;
use futures_util::future::BoxFuture;
use tokio::sync::watch;

use super::{CheckpointAcks, Outputs, PipelineError, StateStore};

/// What a finished source read.
#[derive(Default)]
pub(crate) struct SourceReport {
    /// Messages handed on.
    pub(crate) messages: u64,
    /// The source's own account of its input, if it keeps one (the simulator: its
    /// `SimReport`, which the runtime puts in the run's report).
    pub(crate) account: Option<Box<dyn std::any::Any + Send>>,
}

/// What a source shares with the sinks' files for exactly-once recovery.
#[derive(Debug, Clone, Default)]
pub(crate) struct Recovery {
    /// Operator state checkpoints, when configured.
    pub(crate) state: Option<StateStore>,
    /// Roots of Parquet sinks whose files are named after source positions.
    pub(crate) sink_roots: Vec<PathBuf>,
    /// Positions committed so far, shared with compaction.
    pub(crate) commits: super::CommitLog,
}

/// Everything the runtime hands a source task.
pub(crate) struct SourceContext {
    /// The source's name in the config.
    pub(crate) name: String,
    /// Subscribers of each output port (one per event kind).
    pub(crate) outputs: Outputs,
    /// The event clock of each output port a `decode` stage reads.
    pub(crate) clocks: Vec<Option<EventClock>>,
    /// How each output port's stream is keyed, where declared: the source records the topic's
    /// partition count in it.
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))]
    pub(crate) routing: Vec<Option<citystream_operators::partitioning::Routing>>,
    /// Becomes true when the run is asked to stop.
    pub(crate) stop: watch::Receiver<bool>,
    /// The run's metrics.
    pub(crate) metrics: Metrics,
    /// Every sink's durable epoch.
    pub(crate) acks: CheckpointAcks,
    /// State and files for exactly-once recovery.
    pub(crate) recovery: Recovery,
}

/// A source the runtime runs as one task.
pub(crate) trait Source: Send {
    /// Reads until the input ends or `ctx.stop` fires, then sends `End` on every port.
    fn run(self: Box<Self>, ctx: SourceContext) -> BoxFuture<'static, Result<SourceReport, PipelineError>>;
}
