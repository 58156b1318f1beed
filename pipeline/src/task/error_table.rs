//! Where a stage records the rows it could not process (an operator panicked on their batch,
//! or refused them as bad input) before it goes on with the next batch.

use arrow::array::RecordBatch;

/// A table of rows stages could not process (`operator_errors`), shared by every stage of a
/// run. A record is durable when `record` returns, so a checkpoint the stage passes later
/// includes it.
pub(crate) trait ErrorTable: Send + Sync + std::fmt::Debug {
    /// Records the rows of `batch`, which stage `stage` (an operator of `kind`) could not
    /// process because of `what`, as belonging to checkpoint `epoch`.
    fn record(
        &self,
        stage: &str,
        kind: &str,
        epoch: u64,
        batch: &RecordBatch,
        what: &str,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>;

    /// With operator state: publishes what was recorded for epochs committed since (called at
    /// the end of a run; a record publishes what is committed by then too).
    fn publish_committed(&self) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        Ok(())
    }
}
