//! # citystream-operators
//!
//! The operator contract at the centre of citystream, and the built-in operators.
//!
//! - [`Message`]: what flows on every edge of the stage graph — data ([`RecordBatch`]),
//!   watermarks, checkpoint barriers and end-of-data — in one ordered stream.
//! - [`Operator`]: a synchronous, runtime-free transformation. One required method,
//!   [`Operator::process_batch`]; watermarks, end of data and state are hooks with defaults.
//!   Operators write to named output ports through a [`Collector`]; port 0 is the main output,
//!   others are side outputs such as dead letters.
//! - [`OperatorConfig`]: the YAML-facing description of an operator, which states its output
//!   schemas for a given input schema (checked before any data moves) and builds the operator.
//! - [`Metrics`]: a small registry of counters and gauges rendered in the Prometheus text format.
//!
//! Built-in operators: [`decode::Decode`] (JSON to Arrow with dead letters),
//! [`filter::Filter`], [`project::Project`], [`dedup::Dedup`] (exact and content duplicates),
//! [`compress::Compress`] (swinging door / deadband with an error bound),
//! [`zstd_column::ZstdColumn`] (zstd payloads, optionally with a dictionary),
//! [`admit::Admit`] (rate limits per stream and key) and [`window::Window`] (event-time
//! windows and aggregates).
//!
//! This crate depends on Arrow and the event schemas only — no Kafka, Parquet, ONNX or
//! DataFusion — so its tests build and run fast, without an async runtime.

#![deny(missing_docs)]

pub mod admit;
pub mod alert;
pub mod common;
pub mod compress;
mod contract;
pub mod decode;
pub mod dedup;
pub mod dp;
pub mod duration;
mod env;
pub mod event_time;
pub mod exact_sum;
pub mod filter;
pub mod health;
mod metrics;
pub mod partitioning;
pub mod project;
pub mod road_graph;
pub mod secret;
#[cfg(test)]
mod test_util;
pub mod window;
pub mod zstd_column;

pub use arrow::array::RecordBatch;
pub use contract::{
    Barrier, BuildContext, Collector, ErrorClass, LiveChangeError, Message, Operator, OperatorConfig, OperatorError,
    OutputSpec, PlanError, did_you_mean,
};
pub use duration::Duration;
pub use env::EnvString;
pub use metrics::{Counter, Gauge, Metrics, label_value};
