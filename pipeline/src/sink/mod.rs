//! Sinks: where tables leave the pipeline.

pub mod parquet;
