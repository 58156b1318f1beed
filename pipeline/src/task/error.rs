//! Why a pipeline stopped with an error.

use citystream_operators::OperatorError;

use crate::sink::parquet::ParquetSinkError;

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
    /// A Parquet sink failed.
    #[error("sink `{sink}`: {source}")]
    Parquet {
        /// The sink.
        sink: String,
        /// The error.
        source: ParquetSinkError,
    },
    /// The control center failed.
    #[error("sink `{sink}`: {message}")]
    ControlSink {
        /// The sink.
        sink: String,
        /// Why.
        message: String,
    },
    /// A Kafka sink failed.
    #[error("sink `{sink}`: {message}")]
    KafkaSink {
        /// The sink.
        sink: String,
        /// Why.
        message: String,
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
    #[error("stage `{stage}`: writing `operator_errors`: {message}")]
    OperatorErrors {
        /// The stage.
        stage: String,
        /// Why.
        message: String,
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
