//! Sinks: where tables leave the pipeline.

pub mod compact;
pub mod parquet;
