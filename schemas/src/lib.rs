//! # citystream-schemas
//!
//! The event contracts of citystream and everything needed to turn raw messages into typed
//! Arrow data:
//!
//! - [`EventKind`]: the three event families (traffic, camera, environment), with their
//!   Arrow schemas ([`EventKind::schema`]) and table names.
//! - [`raw`]: the schema of a *raw batch* — undecoded payloads with their source position —
//!   which every source produces, so the rest of the pipeline only ever sees `RecordBatch`es.
//! - [`Decoder`]: batch-wise JSON decoding and validation of a raw batch into a typed batch
//!   plus a [`dead_letter`] batch that carries, for every rejected event, its source position,
//!   the (truncated) payload and a precise [`Reason`].
//!
//! Decoding reads each payload straight into a borrowed, typed wire struct (no
//! `serde_json::Value` trees) and appends it to Arrow builders: a flat object of the contract's
//! keys in one pass of its own (`flat`), anything else through serde_json.

#![deny(missing_docs)]

pub mod dead_letter;
mod decode;
mod flat;
mod kind;
pub mod privacy;
pub mod raw;
mod reason;
mod wire;

pub use decode::{DecodeOptions, Decoded, Decoder, SchemaError};
pub use kind::{CAMERA_KINDS, EventKind, OBJECT_CLASSES, SCHEMA_VERSION, columns};
pub use reason::{Reason, ReasonCode};

/// The Arrow type of every event-time column: UTC timestamps in milliseconds.
pub fn timestamp_type() -> arrow::datatypes::DataType {
    arrow::datatypes::DataType::Timestamp(arrow::datatypes::TimeUnit::Millisecond, Some("UTC".into()))
}
