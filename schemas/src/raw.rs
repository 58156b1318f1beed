//! The raw batch: undecoded messages with their source position.
//!
//! Every source (the simulator, Kafka, files) emits raw batches of this schema for one event
//! kind. Keeping the position (`partition`, `offset`) beside the payload lets the decoder
//! stamp it on typed rows and dead letters, and lets sinks name files after the offsets.

use std::sync::{Arc, LazyLock};

use arrow::array::{
    BinaryBuilder, Int32Builder, Int64Builder, RecordBatch, StringBuilder, TimestampMillisecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

/// Column: name of the source stream (a Kafka topic, or `simulator/<kind>`).
pub const SOURCE: &str = "source";
/// Column: partition of the source stream (0 where the source has none).
pub const PARTITION: &str = "partition";
/// Column: offset of the message within its partition.
pub const OFFSET: &str = "offset";
/// Column: processing time at which the message was received (UTC ms).
pub const RECEIVED_AT: &str = "received_at";
/// Column: the message payload, one JSON object.
pub const PAYLOAD: &str = "payload";

static RAW_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new(SOURCE, DataType::Utf8, false),
        Field::new(PARTITION, DataType::Int32, false),
        Field::new(OFFSET, DataType::Int64, false),
        Field::new(RECEIVED_AT, crate::timestamp_type(), false),
        Field::new(PAYLOAD, DataType::Binary, false),
    ]))
});

/// The schema of a raw batch.
pub fn schema() -> SchemaRef {
    RAW_SCHEMA.clone()
}

/// Builds a raw batch message by message.
#[derive(Debug)]
pub struct RawBatchBuilder {
    source: StringBuilder,
    partition: Int32Builder,
    offset: Int64Builder,
    received_at: TimestampMillisecondBuilder,
    payload: BinaryBuilder,
    len: usize,
}

impl RawBatchBuilder {
    /// A builder with room for `rows` messages of about `bytes` payload bytes in all.
    pub fn with_capacity(rows: usize, bytes: usize) -> Self {
        Self {
            source: StringBuilder::with_capacity(rows, rows * 16),
            partition: Int32Builder::with_capacity(rows),
            offset: Int64Builder::with_capacity(rows),
            received_at: TimestampMillisecondBuilder::with_capacity(rows).with_timezone("UTC"),
            payload: BinaryBuilder::with_capacity(rows, bytes),
            len: 0,
        }
    }

    /// Appends one message.
    pub fn append(&mut self, source: &str, partition: i32, offset: i64, received_at_ms: i64, payload: &[u8]) {
        self.source.append_value(source);
        self.partition.append_value(partition);
        self.offset.append_value(offset);
        self.received_at.append_value(received_at_ms);
        self.payload.append_value(payload);
        self.len += 1;
    }

    /// Messages appended since the last [`finish`](Self::finish).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no message was appended since the last [`finish`](Self::finish).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The batch of everything appended so far; the builder starts empty again.
    pub fn finish(&mut self) -> RecordBatch {
        self.len = 0;
        RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(self.source.finish()),
                Arc::new(self.partition.finish()),
                Arc::new(self.offset.finish()),
                Arc::new(self.received_at.finish()),
                Arc::new(self.payload.finish()),
            ],
        )
        .expect("raw batch columns match the raw schema by construction")
    }
}
