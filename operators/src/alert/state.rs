//! The snapshot of an alert rule: per location its phase and open alert, as rows.

use std::sync::{Arc, LazyLock};

use arrow::array::{Float64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

pub(super) fn alert_state_schema() -> SchemaRef {
    static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
        Arc::new(Schema::new(vec![
            Field::new("location", DataType::Utf8, true),
            Field::new("phase", DataType::UInt8, false),
            Field::new("quiet_until", DataType::Int64, false),
            Field::new("last_t", DataType::Int64, false),
            Field::new("id", DataType::Utf8, true),
            Field::new("since", DataType::Int64, true),
            Field::new("peak", DataType::Float64, true),
            Field::new("reported", DataType::Float64, true),
            Field::new("last_emit", DataType::Int64, true),
        ]))
    });
    SCHEMA.clone()
}

/// Columns of an alert rule's snapshot.
#[derive(Default)]
pub(super) struct StateRows {
    pub(super) loc: Vec<Option<String>>,
    pub(super) phase: Vec<u8>,
    pub(super) quiet: Vec<i64>,
    pub(super) last_t: Vec<i64>,
    pub(super) id: Vec<Option<String>>,
    pub(super) since: Vec<Option<i64>>,
    pub(super) peak: Vec<Option<f64>>,
    pub(super) reported: Vec<Option<f64>>,
    pub(super) last_emit: Vec<Option<i64>>,
}

impl StateRows {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn push(
        &mut self,
        loc: Option<String>,
        phase: u8,
        quiet: i64,
        last_t: i64,
        id: Option<String>,
        since: Option<i64>,
        peak: Option<f64>,
        reported: Option<f64>,
        last_emit: Option<i64>,
    ) {
        self.loc.push(loc);
        self.phase.push(phase);
        self.quiet.push(quiet);
        self.last_t.push(last_t);
        self.id.push(id);
        self.since.push(since);
        self.peak.push(peak);
        self.reported.push(reported);
        self.last_emit.push(last_emit);
    }

    pub(super) fn finish(self) -> Result<RecordBatch, arrow::error::ArrowError> {
        use arrow::array::{Int64Array, UInt8Array};
        RecordBatch::try_new(
            alert_state_schema(),
            vec![
                Arc::new(StringArray::from(self.loc)),
                Arc::new(UInt8Array::from(self.phase)),
                Arc::new(Int64Array::from(self.quiet)),
                Arc::new(Int64Array::from(self.last_t)),
                Arc::new(StringArray::from(self.id)),
                Arc::new(Int64Array::from(self.since)),
                Arc::new(Float64Array::from(self.peak)),
                Arc::new(Float64Array::from(self.reported)),
                Arc::new(Int64Array::from(self.last_emit)),
            ],
        )
    }
}
