//! The YAML of a `control_center` sink.

use std::collections::BTreeMap;

use citystream_operators::Duration;
use serde::Deserialize;

use crate::primitives::{EnvString, Inputs};

fn d_rate() -> u32 {
    120
}
fn d_retention() -> Duration {
    Duration::from_secs(7 * 86_400)
}
fn d_max_alerts() -> usize {
    100_000
}
fn d_max_streams() -> usize {
    64
}
fn d_publish_timeout() -> Duration {
    Duration::from_secs(5)
}

/// YAML of a `control_center` sink.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// Listen address, e.g. `127.0.0.1:8088` (port 0: any free port, logged).
    pub addr: EnvString,
    /// The alert streams (outputs of `alert` stages), in a pipeline. `citystream control`
    /// reads `kafka.alerts_topic` instead and refuses this key.
    #[serde(default)]
    pub alerts: Inputs,
    /// A file of `role name token` lines (roles `viewer`, `operator`; the name is who acts, as
    /// recorded with each decision). Mode `0600`, in a directory others cannot write.
    #[serde(default)]
    pub tokens_file: Option<EnvString>,
    /// Single machines: create `tokens_file` with one viewer and one operator token (random,
    /// mode 0600) when it does not exist.
    #[serde(default)]
    pub create_tokens_file: bool,
    /// The name of an environment variable holding `role name token` entries separated by `;`.
    #[serde(default)]
    pub tokens_env: Option<String>,
    /// Root of the `feedback` Parquet table (operator decisions) and of the decision events
    /// in its `alerts` table. Default: none (not stored). At start the book is rebuilt from
    /// that `alerts` table (the rule events the lake sink wrote there, then the decisions), so
    /// a restart keeps what operators saw and decided.
    #[serde(default)]
    pub feedback_path: Option<EnvString>,
    /// The road graph CSV for the map.
    #[serde(default)]
    pub road_graph: Option<EnvString>,
    /// Where alerts at cameras and stations go on the map: CSV `location,segment_id`.
    #[serde(default)]
    pub sites: Option<EnvString>,
    /// Requests per minute per token. Default 120.
    #[serde(default = "d_rate")]
    pub requests_per_minute: u32,
    /// A JSON file keeping the live calibrated levels and their history across restarts
    /// (written atomically). Default: none (calibration lasts as long as the process).
    #[serde(default)]
    pub calibration_file: Option<EnvString>,
    /// Publish every decision to Kafka as well (needs the `kafka` feature).
    #[serde(default)]
    pub kafka: Option<ControlKafka>,
    /// How long a finished alert (resolved or a false alarm, and no longer held by its rule)
    /// stays in the book after its last change (event time); older ones are only in the lake.
    /// At start only that much of the `alerts` table is read. Default `7d`.
    #[serde(default = "d_retention")]
    pub retention: Duration,
    /// The most alerts the book holds; beyond it the oldest finished ones go first. Default
    /// 100000.
    #[serde(default = "d_max_alerts")]
    pub max_alerts: usize,
    /// The most event streams (`/api/stream`) open at once; more are refused with 503.
    /// Default 64.
    #[serde(default = "d_max_streams")]
    pub max_streams: usize,
}

/// Where the control center publishes decisions on Kafka.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlKafka {
    /// `bootstrap.servers`.
    pub brokers: EnvString,
    /// Lifecycle events in the alert schema, keyed by location (e.g. `city.alerts`).
    #[serde(default)]
    pub alerts_topic: Option<String>,
    /// Feedback rows, keyed by location (e.g. `city.feedback`).
    #[serde(default)]
    pub feedback_topic: Option<String>,
    /// How long a decision waits for the broker before it is answered as pending (the outbox
    /// keeps it; later decisions are refused with 503 until the broker takes it). Default `5s`.
    #[serde(default = "d_publish_timeout")]
    pub publish_timeout: Duration,
    /// Any librdkafka producer property.
    #[serde(default)]
    pub properties: BTreeMap<String, EnvString>,
}
