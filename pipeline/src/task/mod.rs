//! The contracts between the runtime and the components it runs: the [`Source`], [`Sink`],
//! [`Service`] and [`Membership`] traits and what the runtime hands them — output ports, the sinks' checkpoint
//! acknowledgements, the positions committed so far, the operator-state store, CPU accounting
//! and the error type. It imports neither the runtime nor any component, so connectors (Kafka,
//! files, the simulator, Parquet), the control center and the energy account implement these
//! traits without importing the runtime, and the runtime runs them without naming them.

mod checkpoint;
mod commits;
mod cpu;
mod error;
mod error_table;
mod membership;
mod outputs;
mod service;
mod sink;
mod source;
mod state;

pub use checkpoint::CheckpointAcks;
pub(crate) use checkpoint::SinkAck;
pub use commits::{CommitLog, Commits};
pub(crate) use cpu::{AbortOnDrop, blocking, blocking_metered, cpu_metered};
pub use error::PipelineError;
pub(crate) use error_table::ErrorTable;
pub(crate) use membership::{Assignments, Membership};
pub(crate) use outputs::{Edge, Outputs};
pub(crate) use service::{Service, ServiceContext};
pub use sink::TableStats;
pub(crate) use sink::{Sink, SinkContext, sink_error};
pub(crate) use source::{Recovery, Source, SourceContext, SourceReport};
pub use state::{CheckpointSummary, StateError, StateLayout, StateStore, StateUrl, StoreError, layout};
