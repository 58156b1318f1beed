//! YAML configuration in three steps, as text moves towards a running pipeline:
//!
//! 1. [`load`]: text to [`RawPipeline`] with serde (strict: unknown keys are errors with a
//!    suggestion; every error names file, line, column and key path);
//! 2. [`plan`](crate::config::plan::plan): [`RawPipeline`] to [`PipelinePlan`] — resolves stream
//!    references, rejects cycles, and checks the schema flow of every stage before any data
//!    moves, reporting every problem at once;
//! 3. the runtime runs a [`PipelinePlan`].

mod load;
pub mod plan;
mod tagged;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::num::NonZeroUsize;

use citystream_models::{California7Config, FeaturesConfig, InferConfig};
use citystream_operators::admit::AdmitConfig;
use citystream_operators::alert::AlertConfig;
use citystream_operators::compress::CompressConfig;
use citystream_operators::decode::DecodeConfig;
use citystream_operators::dedup::DedupConfig;
use citystream_operators::dp::DpConfig;
use citystream_operators::filter::FilterConfig;
use citystream_operators::project::ProjectConfig;
use citystream_operators::window::WindowConfig;
use citystream_operators::zstd_column::ZstdConfig;
use citystream_operators::{Duration, OperatorConfig};
use serde::Deserialize;
use serde_saphyr::{Location, Spanned};

pub use citystream_operators::EnvString;
pub use load::{ConfigError, ConfigErrors, load_file, load_str};
pub use plan::{PipelinePlan, SinkNode, SourceNode, StageNode, StreamRef};

use crate::simulator::SimulatorConfig;
use crate::sink::parquet::ParquetSinkConfig;

/// A whole pipeline as written in YAML.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPipeline {
    /// A name for logs and metrics. Default `citystream`.
    #[serde(default = "default_name")]
    pub name: String,
    /// Sources by name. Each emits one stream per output (e.g. `city.traffic`).
    pub sources: BTreeMap<String, SourceConfig>,
    /// Operator stages by name.
    #[serde(default)]
    pub stages: BTreeMap<String, StageConfig>,
    /// Sinks by name.
    pub sinks: BTreeMap<String, SinkConfig>,
    /// Runtime settings.
    #[serde(default)]
    pub runtime: RuntimeConfig,
}

fn default_name() -> String {
    "citystream".into()
}

/// Runtime settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Capacity, in messages (batches), of each channel between stages: bounds memory and
    /// applies backpressure. Default 8.
    pub channel_capacity: NonZeroUsize,
    /// How often the status line is printed; `null` for never. Default `5s`.
    pub status_interval: Option<Duration>,
    /// Address of the Prometheus metrics endpoint (`GET /metrics`), e.g. `127.0.0.1:9464`;
    /// absent or `null` for none.
    pub metrics_addr: Option<EnvString>,
    /// Time allowed to drain and flush on SIGINT/SIGTERM before giving up. Default `30s`.
    pub shutdown_timeout: Duration,
    /// The energy and carbon account (an `energy` table); absent for none.
    pub energy: Option<crate::energy::EnergyConfig>,
    /// Carbon-aware scheduling of deferrable work (needs `energy` for the grid intensity);
    /// absent for none.
    pub carbon_policy: Option<crate::energy::CarbonPolicyConfig>,
    /// Where stateful stages write their state at every checkpoint, so that a pipeline with a
    /// Kafka source resumes windows, deduplication, features and alert rules exactly where its
    /// last checkpoint left them (see `runtime::state`); absent for none.
    pub state_dir: Option<EnvString>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            channel_capacity: NonZeroUsize::new(8).expect("non-zero"),
            status_interval: Some(Duration::from_secs(5)),
            metrics_addr: None,
            shutdown_timeout: Duration::from_secs(30),
            energy: None,
            carbon_policy: None,
            state_dir: None,
        }
    }
}

/// A source, tagged by `type` (which must be its first key).
#[derive(Debug, Clone)]
pub enum SourceConfig {
    /// `type: simulator`: the embedded city simulator.
    Simulator(Box<SimulatorConfig>),
    /// `type: kafka`: a consumer group on one topic per event kind.
    #[cfg(feature = "kafka")]
    Kafka(Box<crate::kafka::KafkaSourceConfig>),
}

impl SourceConfig {
    /// Every `type` a source can have.
    pub const TYPES: &'static [&'static str] = &["simulator", "kafka"];
}

/// What a stage does, tagged by `type`.
#[derive(Debug, Clone, PartialEq)]
pub enum OperatorSpec {
    /// `type: decode`: JSON to typed rows plus dead letters.
    Decode(DecodeConfig),
    /// `type: filter`: keep rows matching every condition.
    Filter(FilterConfig),
    /// `type: project`: keep, order and rename columns.
    Project(ProjectConfig),
    /// `type: dedup`: drop exact and content duplicates within a horizon.
    Dedup(DedupConfig),
    /// `type: window`: event-time windows and aggregates per key.
    Window(WindowConfig),
    /// `type: compress`: swinging-door / deadband compression with an error bound.
    Compress(CompressConfig),
    /// `type: admit`: rate limits per stream and per key.
    Admit(AdmitConfig),
    /// `type: zstd`: zstd-compress a binary column.
    Zstd(ZstdConfig),
    /// `type: dp_aggregate`: differentially private counts, sums and means per window.
    DpAggregate(Box<DpConfig>),
    /// `type: features`: model input rows from one-minute traffic windows and the road graph.
    Features(FeaturesConfig),
    /// `type: infer`: an ONNX model over feature rows (ONNX Runtime).
    Infer(Box<InferConfig>),
    /// `type: california7`: the model-free California #7 incident detector.
    California7(California7Config),
    /// `type: alert`: an alert rule (hysteresis, duration, suppression, storm limit).
    Alert(Box<AlertConfig>),
}

impl OperatorSpec {
    /// Every stage `type`.
    pub const TYPES: &'static [&'static str] = &[
        "decode",
        "filter",
        "project",
        "dedup",
        "window",
        "compress",
        "admit",
        "zstd",
        "dp_aggregate",
        "features",
        "infer",
        "california7",
        "alert",
    ];

    /// The operator's configuration behind its common interface.
    pub fn config(&self) -> &dyn OperatorConfig {
        match self {
            OperatorSpec::Decode(c) => c,
            OperatorSpec::Filter(c) => c,
            OperatorSpec::Project(c) => c,
            OperatorSpec::Dedup(c) => c,
            OperatorSpec::Window(c) => c,
            OperatorSpec::Compress(c) => c,
            OperatorSpec::Admit(c) => c,
            OperatorSpec::Zstd(c) => c,
            OperatorSpec::DpAggregate(c) => c.as_ref(),
            OperatorSpec::Features(c) => c,
            OperatorSpec::Infer(c) => c.as_ref(),
            OperatorSpec::California7(c) => c,
            OperatorSpec::Alert(c) => c.as_ref(),
        }
    }

    /// The configuration as `Any`, for [`Operator::retune`](citystream_operators::Operator::retune).
    pub fn as_any(&self) -> &dyn std::any::Any {
        self.config()
    }

    /// The `type` name.
    pub fn type_name(&self) -> &'static str {
        match self {
            OperatorSpec::Decode(_) => "decode",
            OperatorSpec::Filter(_) => "filter",
            OperatorSpec::Project(_) => "project",
            OperatorSpec::Dedup(_) => "dedup",
            OperatorSpec::Window(_) => "window",
            OperatorSpec::Compress(_) => "compress",
            OperatorSpec::Admit(_) => "admit",
            OperatorSpec::Zstd(_) => "zstd",
            OperatorSpec::DpAggregate(_) => "dp_aggregate",
            OperatorSpec::Features(_) => "features",
            OperatorSpec::Infer(_) => "infer",
            OperatorSpec::California7(_) => "california7",
            OperatorSpec::Alert(_) => "alert",
        }
    }

    /// Whether a running stage configured as `self` can switch to `new` without a restart:
    /// `Ok(true)` if something changed and can be applied live, `Ok(false)` if nothing changed,
    /// and the reason otherwise.
    pub fn live_change(&self, new: &OperatorSpec) -> Result<bool, String> {
        if self == new {
            return Ok(false);
        }
        match (self, new) {
            (OperatorSpec::Filter(a), OperatorSpec::Filter(b)) => a.live_change(b),
            (OperatorSpec::Dedup(a), OperatorSpec::Dedup(b)) => a.live_change(b),
            (OperatorSpec::Window(a), OperatorSpec::Window(b)) => a.live_change(b),
            (OperatorSpec::Compress(a), OperatorSpec::Compress(b)) => a.live_change(b),
            (OperatorSpec::Admit(a), OperatorSpec::Admit(b)) => a.live_change(b),
            (OperatorSpec::Infer(a), OperatorSpec::Infer(b)) => a.live_change(b),
            (OperatorSpec::Alert(a), OperatorSpec::Alert(b)) => a.live_change(b),
            (a, b) if a.type_name() != b.type_name() => {
                Err(format!("the type changed from `{}` to `{}`", a.type_name(), b.type_name()))
            }
            (a, _) => Err(format!("a `{}` stage has no parameters that can change while running", a.type_name())),
        }
        .map(|()| true)
    }
}

/// A stage: `type` first, then `input` and the operator's own keys.
#[derive(Debug, Clone)]
pub struct StageConfig {
    /// The streams the stage reads (`node` or `node.port`).
    pub input: Inputs,
    /// The operator.
    pub op: OperatorSpec,
    /// Where the stage's `type` is written (for errors found while planning).
    pub location: Location,
}

/// A sink, tagged by `type`.
#[derive(Debug, Clone)]
pub enum SinkConfig {
    /// `type: parquet`: zstd Parquet tables on a local file system.
    Parquet(ParquetSinkConfig),
    /// `type: kafka`: rows as JSON messages.
    #[cfg(feature = "kafka")]
    Kafka(crate::kafka::KafkaSinkConfig),
    /// `type: control_center`: the alert book, served over HTTP to control centers.
    ControlCenter(Box<crate::control::ControlConfig>),
}

impl SinkConfig {
    /// Every `type` a sink can have.
    pub const TYPES: &'static [&'static str] = &["parquet", "kafka", "control_center"];
}

/// One stream reference or a list of them, each with its location in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct Inputs(pub Vec<Spanned<String>>);

impl<'de> Deserialize<'de> for Inputs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct OneOrMany(Vec<Spanned<String>>, bool);
        impl<'de> Deserialize<'de> for OneOrMany {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> serde::de::Visitor<'de> for V {
                    type Value = OneOrMany;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str("a stream name such as `city.traffic`, or a list of them")
                    }
                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<OneOrMany, E> {
                        Ok(OneOrMany(vec![Spanned::new(v.to_owned(), Location::UNKNOWN, Location::UNKNOWN)], true))
                    }
                    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<OneOrMany, A::Error> {
                        let mut v = Vec::new();
                        while let Some(item) = seq.next_element::<Spanned<String>>()? {
                            v.push(item);
                        }
                        Ok(OneOrMany(v, false))
                    }
                }
                d.deserialize_any(V)
            }
        }
        let spanned = Spanned::<OneOrMany>::deserialize(d)?;
        let OneOrMany(mut items, single) = spanned.value;
        if single {
            items[0].referenced = spanned.referenced;
            items[0].defined = spanned.defined;
        }
        Ok(Inputs(items))
    }
}
