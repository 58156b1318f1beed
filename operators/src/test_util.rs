//! Batch-level helpers for operator tests.

use std::sync::Arc;

use arrow::array::{AsArray, Float32Array, Int32Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Float32Type, Schema};

/// Three traffic-like rows: (s1, seg-1, flow 10, 20 km/h), (s2, seg-1, 30, 80), (s3, seg-2, 0, null).
pub fn traffic_batch() -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("sensor_id", DataType::Utf8, false),
        Field::new("segment_id", DataType::Utf8, false),
        Field::new("flow", DataType::Int32, false),
        Field::new("speed_kmh", DataType::Float32, true),
    ]));
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from(vec!["s1", "s2", "s3"])),
            Arc::new(StringArray::from(vec!["seg-1", "seg-1", "seg-2"])),
            Arc::new(Int32Array::from(vec![10, 30, 0])),
            Arc::new(Float32Array::from(vec![Some(20.0), Some(80.0), None])),
        ],
    )
    .unwrap()
}

/// The values of a Utf8 column.
pub fn column_str(b: &RecordBatch, name: &str) -> Vec<String> {
    b.column_by_name(name).unwrap().as_string::<i32>().iter().map(|v| v.unwrap().to_owned()).collect()
}

/// The values of a Float32 column.
pub fn column_f32(b: &RecordBatch, name: &str) -> Vec<Option<f32>> {
    b.column_by_name(name).unwrap().as_primitive::<Float32Type>().iter().collect()
}
