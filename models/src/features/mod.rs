//! `features`: the model input rows, from one-minute traffic windows per segment and the road
//! graph. The definition is `models/train/features.py` (the training code); this operator
//! computes the same values in a stream, and `tests/tests/models.rs` compares the two on the
//! same input. [`FEATURES`] is the column order of the model input.
//!
//! Per segment it keeps the last [`HISTORY_MINUTES`] minutes of speed, vehicles and occupancy.
//! Rows wait until the watermark passes their minute, so every neighbour's row for that minute
//! is there (the window stage emits a minute's rows before it forwards the watermark that
//! closes it); then one feature row per (segment, minute) is emitted, as a
//! `FixedSizeList<Float32, 46>` column whose values buffer is the row-major model input. A row
//! for a (segment, minute) the stage has already emitted, or older than one, or for a segment
//! missing from the road graph, goes to port `unmatched` instead.
//!
//! Files: [`config`] (the YAML, planning, the output schema), [`operator`] (per-segment
//! history, waiting rows, the feature rows, snapshots); the road graph and its CSV are
//! [`citystream_operators::road_graph`] (the `alert` stage's `join` reads it too).

mod config;
mod operator;

pub use citystream_operators::road_graph::{GraphError, RoadGraph, RoadSegment};
pub use config::{FeaturesConfig, features_schema};
pub use operator::FeatureBuilder;

/// The features, in model-input order (see `models/train/features.py` for each definition).
pub const FEATURES: [&str; 46] = [
    "speed_1m",
    "speed_5m",
    "speed_15m",
    "speed_lag15",
    "speed_lag30",
    "speed_60m",
    "flow_5m_vph",
    "occ_1m",
    "occ_5m",
    "up_speed_5m",
    "down_speed_5m",
    "up_occ_1m",
    "down_occ_1m",
    "occ_diff_1m",
    "occ_rdiff_1m",
    "speed_drop_5m",
    "free_speed_kmh",
    "tod_sin",
    "tod_cos",
    "weekend",
    // the last minutes one by one (the incident detector's): RECENT_MINUTES - 1 before this one
    "speed_m1",
    "speed_m2",
    "speed_m3",
    "speed_m4",
    "occ_m1",
    "occ_m2",
    "occ_m3",
    "occ_m4",
    "up_speed_1m",
    "up_speed_m1",
    "up_speed_m2",
    "up_speed_m3",
    "up_speed_m4",
    "up_occ_m1",
    "up_occ_m2",
    "up_occ_m3",
    "up_occ_m4",
    "down_speed_1m",
    "down_speed_m1",
    "down_speed_m2",
    "down_speed_m3",
    "down_speed_m4",
    "down_occ_m1",
    "down_occ_m2",
    "down_occ_m3",
    "down_occ_m4",
];
/// Minute t and the minutes before it that the `*_m{k}` features give one by one.
pub const RECENT_MINUTES: i64 = 5;
/// The longest look-back of any feature, minutes.
pub const HISTORY_MINUTES: i64 = 60;
const MINUTE_MS: i64 = 60_000;
