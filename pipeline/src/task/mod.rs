//! What the runtime hands to the tasks it runs — sources, sinks and services (the Kafka
//! source, the energy recorder): the output ports of a task, the checkpoint acknowledgements
//! of the sinks, the operator-state store, CPU accounting and the error type. A leaf for them:
//! it imports nothing of the runtime, so connectors use it without importing the runtime.

mod checkpoint;
mod cpu;
mod error;
mod outputs;
mod source;
mod state;

pub use checkpoint::CheckpointAcks;
pub(crate) use checkpoint::SinkAck;
pub(crate) use cpu::{AbortOnDrop, cpu, cpu_metered, thread_cpu_ns};
pub use error::PipelineError;
pub(crate) use outputs::{Edge, Outputs};
pub(crate) use source::{Recovery, Source, SourceContext, SourceReport};
pub use state::{StateError, StateStore};
