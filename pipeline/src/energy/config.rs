//! `runtime.energy` in YAML: the interval, the power model and where intensity comes from.

use std::collections::BTreeMap;

use citystream_operators::{Duration, EnvString};
use serde::Deserialize;
pub(super) fn d_interval() -> Duration {
    Duration::from_secs(60)
}
fn d_watts() -> f64 {
    15.0
}
fn d_intensity() -> f64 {
    350.0
}

/// `runtime.energy` in YAML.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnergyConfig {
    /// Where the `energy` table is written (a Parquet root, e.g. the lake's path).
    pub path: EnvString,
    /// Accounting interval. Default `1m`.
    #[serde(default = "d_interval")]
    pub interval: Duration,
    /// Model: watts drawn per fully busy core. Default 15 W (a server core under load, package
    /// share; see docs/ARCHITECTURE.md).
    #[serde(default = "d_watts")]
    pub watts_per_busy_core: f64,
    /// Model: baseline watts attributed to the pipeline while it runs, shared by CPU time.
    /// Default 0.
    #[serde(default)]
    pub idle_watts: f64,
    /// Use RAPL when readable. Default true.
    #[serde(default = "d_true")]
    pub rapl: bool,
    /// Grid carbon intensity, gCO2e per kWh, when no series is given. Default 350.
    #[serde(default = "d_intensity")]
    pub carbon_g_per_kwh: f64,
    /// An hourly intensity series: CSV lines `2026-03-02T08:00:00Z,412` (hour start, g/kWh).
    #[serde(default)]
    pub carbon_file: Option<EnvString>,
    /// A Kafka topic of intensity messages, read from its start and then live (overrides the
    /// file for the hours it names).
    #[serde(default)]
    pub carbon_topic: Option<CarbonTopicConfig>,
}

/// Where live grid intensity comes from on Kafka.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CarbonTopicConfig {
    /// `bootstrap.servers`.
    pub brokers: EnvString,
    /// The topic, e.g. `city.grid_intensity`.
    pub topic: String,
    /// Any librdkafka consumer property.
    #[serde(default)]
    pub properties: BTreeMap<String, EnvString>,
}

fn d_true() -> bool {
    true
}
