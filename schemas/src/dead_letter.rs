//! The `dead_letters` table: every rejected event with its source position, its payload
//! (truncated to a configured size) and the precise reason.

use std::sync::{Arc, LazyLock};

use arrow::array::{
    BinaryBuilder, Int32Builder, Int64Builder, RecordBatch, StringBuilder, TimestampMillisecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use crate::reason::Reason;

/// Name of the dead-letter table.
pub const TABLE: &str = "dead_letters";
/// Column holding the reason code (see [`crate::ReasonCode`]).
pub const REASON_CODE: &str = "reason_code";
/// Column holding the human-readable reason.
pub const REASON: &str = "reason";

static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("source", DataType::Utf8, false),
        Field::new("src_partition", DataType::Int32, false),
        Field::new("src_offset", DataType::Int64, false),
        Field::new("received_at", crate::timestamp_type(), false),
        Field::new("kind", DataType::Utf8, false),
        Field::new(REASON_CODE, DataType::Utf8, false),
        Field::new(REASON, DataType::Utf8, false),
        Field::new("payload", DataType::Binary, false),
        Field::new("payload_bytes", DataType::Int64, false),
    ]))
});

/// The schema of the dead-letter table.
pub fn schema() -> SchemaRef {
    SCHEMA.clone()
}

/// Where a rejected message came from.
#[derive(Debug, Clone, Copy)]
pub struct Position<'a> {
    /// Source stream name.
    pub source: &'a str,
    /// Partition in the source stream.
    pub partition: i32,
    /// Offset in the partition.
    pub offset: i64,
    /// Processing time (UTC ms).
    pub received_at_ms: i64,
}

/// Builds a dead-letter batch.
#[derive(Debug)]
pub struct DeadLetterBuilder {
    max_payload_bytes: usize,
    source: StringBuilder,
    partition: Int32Builder,
    offset: Int64Builder,
    received_at: TimestampMillisecondBuilder,
    kind: StringBuilder,
    code: StringBuilder,
    reason: StringBuilder,
    payload: BinaryBuilder,
    payload_bytes: Int64Builder,
    len: usize,
}

impl DeadLetterBuilder {
    /// A builder that keeps at most `max_payload_bytes` of each payload.
    pub fn new(max_payload_bytes: usize) -> Self {
        Self {
            max_payload_bytes,
            source: StringBuilder::new(),
            partition: Int32Builder::new(),
            offset: Int64Builder::new(),
            received_at: TimestampMillisecondBuilder::new().with_timezone("UTC"),
            kind: StringBuilder::new(),
            code: StringBuilder::new(),
            reason: StringBuilder::new(),
            payload: BinaryBuilder::new(),
            payload_bytes: Int64Builder::new(),
            len: 0,
        }
    }

    /// Records one rejected message.
    pub fn append(&mut self, pos: Position<'_>, kind: &str, reason: &Reason, payload: &[u8]) {
        self.source.append_value(pos.source);
        self.partition.append_value(pos.partition);
        self.offset.append_value(pos.offset);
        self.received_at.append_value(pos.received_at_ms);
        self.kind.append_value(kind);
        self.code.append_value(reason.code.as_str());
        self.reason.append_value(&reason.message);
        self.payload.append_value(&payload[..payload.len().min(self.max_payload_bytes)]);
        self.payload_bytes.append_value(payload.len() as i64);
        self.len += 1;
    }

    /// Rows appended since the last [`finish`](Self::finish).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing was appended since the last [`finish`](Self::finish).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The batch of everything appended; the builder starts empty again.
    pub fn finish(&mut self) -> RecordBatch {
        self.len = 0;
        RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(self.source.finish()),
                Arc::new(self.partition.finish()),
                Arc::new(self.offset.finish()),
                Arc::new(self.received_at.finish()),
                Arc::new(self.kind.finish()),
                Arc::new(self.code.finish()),
                Arc::new(self.reason.finish()),
                Arc::new(self.payload.finish()),
                Arc::new(self.payload_bytes.finish()),
            ],
        )
        .expect("dead-letter columns match the dead-letter schema by construction")
    }
}
