//! The three event families and their Arrow schemas.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, LazyLock};

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

/// The only `schema_version` this build understands.
pub const SCHEMA_VERSION: i64 = 1;

/// Allowed values of `camera.kind`.
pub const CAMERA_KINDS: [&str; 4] = ["detection", "plate_read", "stalled_vehicle", "line_crossing"];

/// Allowed values of `camera.object_class`.
pub const OBJECT_CLASSES: [&str; 6] = ["car", "truck", "bus", "bicycle", "pedestrian", "other"];

/// An event family. Each has its own Kafka topic, Arrow schema and Parquet table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// Loop detectors and radars: flow, occupancy and speed per lane and interval.
    Traffic,
    /// Cameras: detections, plate reads, stalled vehicles, line crossings.
    Camera,
    /// Environmental stations: air quality, noise, weather.
    Environment,
}

/// Column names shared by every typed table.
pub mod columns {
    /// Unique id of the event.
    pub const EVENT_ID: &str = "event_id";
    /// Event time (UTC ms).
    pub const TS: &str = "ts";
    /// Contract version of the event.
    pub const SCHEMA_VERSION: &str = "schema_version";
    /// Partition of the source stream the event came from.
    pub const SRC_PARTITION: &str = "src_partition";
    /// Offset of the event in its source partition.
    pub const SRC_OFFSET: &str = "src_offset";
}

fn common_head() -> Vec<Field> {
    vec![
        Field::new(columns::EVENT_ID, DataType::Utf8, false),
        Field::new(columns::TS, crate::timestamp_type(), false),
        Field::new(columns::SCHEMA_VERSION, DataType::Int32, false),
    ]
}

fn with_tail(mut fields: Vec<Field>) -> SchemaRef {
    fields.push(Field::new(columns::SRC_PARTITION, DataType::Int32, false));
    fields.push(Field::new(columns::SRC_OFFSET, DataType::Int64, false));
    Arc::new(Schema::new(fields))
}

static TRAFFIC: LazyLock<SchemaRef> = LazyLock::new(|| {
    let mut f = common_head();
    f.extend([
        Field::new("sensor_id", DataType::Utf8, false),
        Field::new("segment_id", DataType::Utf8, false),
        Field::new("lane", DataType::Int32, false),
        Field::new("interval_s", DataType::Int32, false),
        Field::new("flow", DataType::Int32, false),
        Field::new("occupancy", DataType::Float32, false),
        Field::new("speed_kmh", DataType::Float32, true),
    ]);
    with_tail(f)
});

static CAMERA: LazyLock<SchemaRef> = LazyLock::new(|| {
    let mut f = common_head();
    f.extend([
        Field::new("camera_id", DataType::Utf8, false),
        Field::new("zone_id", DataType::Utf8, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("object_class", DataType::Utf8, false),
        Field::new("count", DataType::Int32, false),
        Field::new("track_pseudonym", DataType::Utf8, true),
        Field::new("plate_pseudonym", DataType::Utf8, true),
        Field::new("confidence", DataType::Float32, false),
        Field::new("thumbnail", DataType::Binary, true),
    ]);
    with_tail(f)
});

static ENVIRONMENT: LazyLock<SchemaRef> = LazyLock::new(|| {
    let mut f = common_head();
    f.push(Field::new("station_id", DataType::Utf8, false));
    for name in crate::wire::ENVIRONMENT_MEASURES.iter().map(|m| m.name) {
        f.push(Field::new(name, DataType::Float32, true));
    }
    with_tail(f)
});

impl EventKind {
    /// Every kind, in a stable order.
    pub const ALL: [EventKind; 3] = [EventKind::Traffic, EventKind::Camera, EventKind::Environment];

    /// The lower-case name: `traffic`, `camera`, `environment` (also the Parquet table name).
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Traffic => "traffic",
            EventKind::Camera => "camera",
            EventKind::Environment => "environment",
        }
    }

    /// The Arrow schema of decoded events of this kind.
    pub fn schema(self) -> SchemaRef {
        match self {
            EventKind::Traffic => TRAFFIC.clone(),
            EventKind::Camera => CAMERA.clone(),
            EventKind::Environment => ENVIRONMENT.clone(),
        }
    }

    /// The column that names the device which produced the event
    /// (`sensor_id`, `camera_id`, `station_id`): the Kafka message key.
    pub fn device_column(self) -> &'static str {
        match self {
            EventKind::Traffic => "sensor_id",
            EventKind::Camera => "camera_id",
            EventKind::Environment => "station_id",
        }
    }

    /// The default Kafka topic of this kind.
    pub fn default_topic(self) -> &'static str {
        match self {
            EventKind::Traffic => "city.traffic",
            EventKind::Camera => "city.camera",
            EventKind::Environment => "city.environment",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown event kind `{s}`, expected one of `traffic`, `camera`, `environment`"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_through_their_names() {
        for k in EventKind::ALL {
            assert_eq!(k.as_str().parse::<EventKind>().unwrap(), k);
        }
        assert!("bus".parse::<EventKind>().unwrap_err().contains("unknown event kind `bus`"));
    }

    #[test]
    fn every_schema_has_the_common_columns_and_the_device_column() {
        for k in EventKind::ALL {
            let s = k.schema();
            for c in
                [columns::EVENT_ID, columns::TS, columns::SCHEMA_VERSION, columns::SRC_PARTITION, columns::SRC_OFFSET]
            {
                assert!(s.field_with_name(c).is_ok(), "{k} lacks {c}");
            }
            assert!(s.field_with_name(k.device_column()).is_ok());
        }
        assert!(EventKind::Camera.schema().field_with_name("plate").is_err(), "raw plates are never stored");
    }
}
