//! The service contract: work a run starts beside its tasks (the energy account, the carbon
//! policy, a grid-intensity reader) and stops after them. The runtime knows services only
//! through this trait; the planner starts them from `runtime` config (`RuntimeConfig::services`).

use std::path::PathBuf;

use citystream_operators::Metrics;
use futures_util::future::BoxFuture;

use super::CommitLog;

/// Everything the runtime hands the services it starts.
pub(crate) struct ServiceContext<'a> {
    /// The run's metrics.
    pub(crate) metrics: &'a Metrics,
    /// Roots of the tables the Parquet sinks write.
    pub(crate) table_roots: &'a [PathBuf],
    /// The positions the sources committed, when they commit; `None` when no source does (a
    /// run is then all or nothing).
    pub(crate) commits: Option<CommitLog>,
    /// Every task of the run: its name and the `(counter, output)` pairs that count the rows it
    /// hands on.
    pub(crate) tasks: Vec<(String, Vec<(String, String)>)>,
}

/// A running service.
pub(crate) trait Service: Send {
    /// Stops the service after the run's tasks ended, letting it finish its last piece of work.
    fn stop(self: Box<Self>) -> BoxFuture<'static, ()>;
}
