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
    ///
    /// The next batch starts with room for as many rows and bytes as this one had: Arrow's
    /// builders start empty after `finish`, and a full batch of thousands of payloads grown
    /// from nothing moved its bytes a dozen times.
    pub fn finish(&mut self) -> RecordBatch {
        let next = Self::with_capacity(self.len, self.payload.values_slice().len());
        let mut done = std::mem::replace(self, next);
        RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(done.source.finish()),
                Arc::new(done.partition.finish()),
                Arc::new(done.offset.finish()),
                Arc::new(done.received_at.finish()),
                Arc::new(done.payload.finish()),
            ],
        )
        .expect("raw batch columns match the raw schema by construction")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::AsArray;

    #[test]
    fn each_batch_holds_what_was_appended_since_the_last_with_the_raw_schema() {
        let mut b = RawBatchBuilder::with_capacity(2, 8);
        for i in 0..5 {
            b.append("t", 1, i, 1000 + i, format!("payload-{i}").as_bytes());
        }
        let first = b.finish();
        assert!(b.is_empty());
        b.append("u", 2, 9, 2000, b"last");
        let second = b.finish();
        assert_eq!((first.num_rows(), second.num_rows()), (5, 1));
        for batch in [&first, &second] {
            assert_eq!(batch.schema(), schema(), "the UTC timestamp type is kept");
        }
        assert_eq!(first.column(4).as_binary::<i32>().value(4), b"payload-4");
        assert_eq!(second.column(4).as_binary::<i32>().value(0), b"last");
        assert_eq!(second.column(0).as_string::<i32>().value(0), "u");
        assert_eq!(b.finish().num_rows(), 0);
    }
}
