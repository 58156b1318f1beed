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
    #[error("sink `{sink}`: {}", chain(error.as_ref()))]
    Sink {
        /// The sink.
        sink: String,
        /// Why (with its causes in the message, so it is not a `source` too).
        error: Box<dyn std::error::Error + Send + Sync>,
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
        /// The stage (or `runtime`: the state store itself).
        stage: String,
        /// Why.
        source: super::state::StateError,
    },
    /// Rows a stage refused could not be written to the `operator_errors` table.
    #[error("stage `{stage}`: writing `operator_errors`: {}", chain(error.as_ref()))]
    OperatorErrors {
        /// The stage.
        stage: String,
        /// Why (with its causes in the message, so it is not a `source` too).
        error: Box<dyn std::error::Error + Send + Sync>,
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

/// `error` and each of its causes, `: `-separated, leaving out a cause its parent's message
/// already ends with.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut next = error.source();
    while let Some(e) = next {
        let text = e.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sink_error_says_every_cause_once() {
        let io = std::io::Error::other("no space left on device");
        #[derive(Debug, thiserror::Error)]
        #[error("cannot fsync /lake/x.parquet")]
        struct Fsync(#[source] std::io::Error);
        let e = PipelineError::Sink { sink: "lake".into(), error: Box::new(Fsync(io)) };
        assert_eq!(e.to_string(), "sink `lake`: cannot fsync /lake/x.parquet: no space left on device");
        assert!(std::error::Error::source(&e).is_none(), "the causes are in the message, not repeated as a source");
    }
}
