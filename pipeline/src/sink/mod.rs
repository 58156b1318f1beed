//! Sinks: where tables leave the pipeline.

pub mod compact;
pub mod export;
pub mod parquet;
