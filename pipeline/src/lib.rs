//! # citystream-pipeline
//!
//! The runnable part of citystream:
//!
//! - [`config`]: YAML text → [`config::RawPipeline`] → validated [`config::PipelinePlan`];
//! - [`runtime`]: runs a plan as tokio tasks joined by bounded channels ([`runtime::run`]);
//! - [`simulator`]: the embedded, seeded city simulator (a source and `citystream simulate`);
//! - [`sink`]: the zstd Parquet sink;
//! - [`kafka`] (feature `kafka`): the Kafka source and sink;
//! - [`sql`] (feature `sql`): DataFusion SQL over the Parquet tables;
//! - [`serve`]: the Prometheus endpoint and the status line;
//! - [`energy`]: the energy and carbon account per task.
//!
//! The `citystream` binary (`src/main.rs`) is a thin CLI over these.

#![deny(missing_docs)]

pub mod config;
pub mod control;
pub mod energy;
pub mod gpu;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod primitives;
pub mod runtime;
pub mod serve;
pub mod simulator;
pub mod sink;
#[cfg(feature = "sql")]
pub mod sql;

use citystream_operators::Metrics;

pub use runtime::{PipelineError, RunReport, StopHandle};

/// Loads, validates and runs the pipeline in `path` until its sources end or `stop` fires.
pub async fn run_file(
    path: &std::path::Path,
    metrics: Metrics,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<RunReport> {
    let file = path.display().to_string();
    let raw = config::load_file(path)?;
    let plan = config::plan::plan(raw, &file)?;
    Ok(runtime::run(plan, metrics, stop).await?)
}
