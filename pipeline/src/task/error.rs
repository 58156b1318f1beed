//! Why a pipeline stopped with an error.

use citystream_operators::OperatorError;

/// Why a pipeline stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// An operator failed.
    #[error("stage `{stage}`: {source}")]
    Operator {
        /// The stage.
        stage: String,
        /// The error.
        source: OperatorError,
    },
    /// A stage could not be built from its plan.
    #[error("stage `{stage}` cannot be built: {message}")]
    Build {
        /// The stage.
        stage: String,
        /// Why.
        message: String,
    },
    /// A sink failed (Parquet, Kafka, the control center).
    #[error("sink `{sink}`: {source}")]
    Sink {
        /// The sink.
        sink: String,
        /// Why.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A source failed.
    #[error("source `{source_name}`: {message}")]
    Source {
        /// The source.
        source_name: String,
        /// Why.
        message: String,
    },
    /// Operator state could not be written or restored.
    #[error("state of `{stage}`: {source}")]
    State {
        /// The stage (or `runtime.state_dir`).
        stage: String,
        /// Why.
        source: super::state::StateError,
    },
    /// Rows a stage refused could not be written to the `operator_errors` table.
    #[error("stage `{stage}`: writing `operator_errors`: {source}")]
    OperatorErrors {
        /// The stage.
        stage: String,
        /// Why.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A downstream task ended early (after an error elsewhere).
    #[error("a downstream task ended early")]
    Disconnected,
    /// A task panicked or was cancelled.
    #[error("task failed: {0}")]
    Task(String),
    /// Draining took longer than `runtime.shutdown_timeout`.
    #[error("shutdown did not finish within {0}")]
    ShutdownTimeout(citystream_operators::Duration),
}
