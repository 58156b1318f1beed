//! YAML configuration in three steps, as text moves towards a running pipeline:
//!
//! 1. [`load`]: text to [`RawPipeline`] with serde (strict: unknown keys are errors with a
//!    suggestion; every error names file, line, column and key path);
//! 2. [`plan`](crate::config::plan::plan): [`RawPipeline`] to [`PipelinePlan`] — resolves stream
//!    references, rejects cycles, and checks the schema flow of every stage before any data
//!    moves, reporting every problem at once;
//! 3. the runtime runs a [`PipelinePlan`].

pub mod backfill;
mod load;
pub mod plan;
mod registry;
mod tagged;
mod tasks;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::num::NonZeroUsize;

use citystream_operators::Duration;
use serde::Deserialize;
use serde_saphyr::Location;

pub use crate::primitives::{EnvString, Inputs};
pub use load::{ConfigError, ConfigErrors, load_file, load_str, parse_file, parse_str};
pub use plan::{PipelinePlan, SinkNode, SourceNode, StageNode, StreamRef};
pub use registry::OperatorSpec;

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
    /// last checkpoint left them (see `task::state`); absent for none. A local directory;
    /// `state_url` says the same as a URL, and also reaches object storage.
    pub state_dir: Option<EnvString>,
    /// Where the state lives as a URL: `file:///absolute/dir` or `s3://bucket/prefix` (so a
    /// replacement machine restores what a dead one wrote). At most one of `state_dir` and
    /// `state_url`.
    pub state_url: Option<EnvString>,
    /// How a Kafka pipeline's work is cut into tasks. Default `process`.
    pub tasks: TaskMode,
    /// With `tasks: partition`: run the stages holding city-wide state (storm limits,
    /// per-stream rate limits, DP public partitions) and their readers once, in a global task
    /// fed through the topic `{group_id}.global` (see `kafka::global`), instead of in every
    /// task over its own partitions. Default `false` (new; see the README's limits).
    pub global_task: bool,
}

/// `runtime.tasks`: what one unit of work (with its own watermark, checkpoints and state) is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskMode {
    /// One stage graph over every partition this process is assigned, with one state store.
    /// State stays with the process: a partition moved to another member of the group starts
    /// its windows empty there.
    #[default]
    Process,
    /// One stage graph per partition number (partition `p` of every topic), each with its
    /// own watermark, checkpoints and state store at `{state}/task-{p}`: a task restores its
    /// state wherever the consumer group assigns its partition (see `runtime::tasks`).
    Partition,
}

impl RuntimeConfig {
    /// Starts the services these settings ask for (the energy account, the carbon policy).
    pub(crate) fn services(
        &self,
        ctx: crate::task::ServiceContext<'_>,
    ) -> Result<Vec<Box<dyn crate::task::Service>>, crate::task::PipelineError> {
        Ok(crate::energy::services::start(self.energy.as_ref(), self.carbon_policy.as_ref(), ctx)?
            .into_iter()
            .collect())
    }

    /// Whether operator state is kept (`state_dir` or `state_url`).
    pub fn has_state(&self) -> bool {
        self.state_dir.is_some() || self.state_url.is_some()
    }

    /// Where operator state lives, if anywhere (the planner has checked the URL).
    pub fn state(&self) -> Result<Option<crate::task::StateUrl>, String> {
        match (&self.state_dir, &self.state_url) {
            (Some(_), Some(_)) => Err("give `state_dir` or `state_url`, not both".into()),
            (Some(dir), None) => Ok(Some(crate::task::StateUrl::Local(dir.as_str().into()))),
            (None, Some(url)) => crate::task::StateUrl::parse(url.as_str()).map(Some),
            (None, None) => Ok(None),
        }
    }
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
            state_url: None,
            tasks: TaskMode::Process,
            global_task: false,
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
    /// `type: files`: JSON lines and Parquet files, one list per event kind.
    Files(Box<crate::files::FilesSourceConfig>),
    /// The global task's source (`runtime.tasks: partition` with city-wide stages): the
    /// tasks' committed epochs from the global topic. Made by the planner, not written in YAML.
    #[cfg(feature = "kafka")]
    Global(Box<crate::kafka::global::ReceiveConfig>),
}

impl SourceConfig {
    /// Every `type` a source can have.
    pub const TYPES: &'static [&'static str] = &["simulator", "kafka", "files"];

    /// The task that runs this source.
    pub(crate) fn build(&self) -> Box<dyn crate::task::Source> {
        match self {
            SourceConfig::Simulator(c) => c.clone(),
            #[cfg(feature = "kafka")]
            SourceConfig::Kafka(c) => c.clone(),
            SourceConfig::Files(c) => c.clone(),
            #[cfg(feature = "kafka")]
            SourceConfig::Global(c) => c.clone(),
        }
    }

    /// How far behind the newest event of its partition an event may arrive and still be on
    /// time (the lag of its streams' event clocks).
    pub fn max_out_of_orderness(&self) -> citystream_operators::Duration {
        match self {
            SourceConfig::Simulator(c) => c.max_out_of_orderness,
            #[cfg(feature = "kafka")]
            SourceConfig::Kafka(c) => c.max_out_of_orderness,
            SourceConfig::Files(c) => c.max_out_of_orderness,
            #[cfg(feature = "kafka")]
            SourceConfig::Global(c) => c.source.max_out_of_orderness,
        }
    }

    /// How the stream of output `port` is keyed, where the source declares it (a Kafka
    /// source's `keys`): see [`citystream_operators::partitioning`].
    #[cfg_attr(not(feature = "kafka"), allow(unused_variables))]
    pub fn topic_key(&self, port: usize) -> Option<&citystream_operators::partitioning::KeySpec> {
        match self {
            SourceConfig::Simulator(_) | SourceConfig::Files(_) => None,
            #[cfg(feature = "kafka")]
            SourceConfig::Kafka(c) => c.key(*citystream_schemas::EventKind::ALL.get(port)?),
            #[cfg(feature = "kafka")]
            SourceConfig::Global(_) => None,
        }
    }

    /// The member of the group that shares this source's tasks between processes
    /// (`runtime.tasks: partition`), and how long the source waits for a message before it
    /// ends (`stop_when_idle`); `None` for a source without tasks.
    pub(crate) fn membership(&self) -> Option<(Box<dyn crate::task::Membership>, Option<std::time::Duration>)> {
        match self {
            SourceConfig::Simulator(_) | SourceConfig::Files(_) => None,
            #[cfg(feature = "kafka")]
            SourceConfig::Kafka(c) => Some((
                Box::new(crate::kafka::membership::GroupMember((**c).clone())),
                c.stop_when_idle.map(|d| d.to_std()),
            )),
            #[cfg(feature = "kafka")]
            SourceConfig::Global(_) => None,
        }
    }

    /// Whether the source commits its positions at checkpoints (and so resumes after a crash:
    /// derived files after its last commit are removed and written again).
    pub(crate) fn commits_positions(&self) -> bool {
        match self {
            SourceConfig::Simulator(_) => false,
            #[cfg(feature = "kafka")]
            SourceConfig::Kafka(_) => true,
            SourceConfig::Files(_) => true,
            #[cfg(feature = "kafka")]
            SourceConfig::Global(_) => true,
        }
    }
}

impl PipelinePlan {
    /// The table stages record the rows they cannot process in (`operator_errors`), beside the
    /// first Parquet sink's tables; `None` without a Parquet sink. With operator state, its
    /// files are named after epochs and published once committed.
    pub(crate) fn error_table(
        &self,
        state: Option<&crate::task::StateStore>,
        metrics: &citystream_operators::Metrics,
    ) -> Result<Option<std::sync::Arc<dyn crate::task::ErrorTable>>, crate::task::PipelineError> {
        let Some(root) = self.sinks.iter().find_map(|s| s.config.files_root()) else { return Ok(None) };
        let table = crate::sink::OperatorErrors::try_new(&root, state, metrics)
            .map_err(|e| crate::task::sink_error(crate::sink::OPERATOR_ERRORS, e))?;
        Ok(Some(std::sync::Arc::new(table)))
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
    /// A task's publisher of the streams the global task reads (`runtime.tasks: partition`
    /// with city-wide stages). Made by the planner, not written in YAML.
    #[cfg(feature = "kafka")]
    Global(crate::kafka::global::PublishConfig),
}

impl SinkConfig {
    /// Every `type` a sink can have.
    pub const TYPES: &'static [&'static str] = &["parquet", "kafka", "control_center"];

    /// The sink, ready to run.
    pub(crate) fn build(
        &self,
        ctx: crate::task::SinkContext<'_>,
    ) -> Result<Box<dyn crate::task::Sink>, crate::task::PipelineError> {
        Ok(match self {
            SinkConfig::Parquet(c) => Box::new(crate::sink::parquet::ParquetSink::try_new(c, ctx)?),
            #[cfg(feature = "kafka")]
            SinkConfig::Kafka(c) => Box::new(crate::kafka::KafkaSink::try_new(c, ctx)?),
            SinkConfig::ControlCenter(c) => Box::new(crate::control::ControlSink::try_new(c, ctx)?),
            #[cfg(feature = "kafka")]
            SinkConfig::Global(c) => Box::new(crate::kafka::global::GlobalPublisher::try_new(c, ctx)?),
        })
    }

    /// With operator state restored from `state`: removes what the sink wrote after the
    /// restored checkpoint, which the replay writes again. Called for every sink before any is
    /// built.
    pub(crate) fn discard_after_restored(
        &self,
        state: &crate::task::StateStore,
    ) -> Result<(), crate::task::PipelineError> {
        match self {
            SinkConfig::Parquet(c) => crate::sink::parquet::discard_after_restored(c, state),
            // nothing they keep is named by epoch: Kafka cannot take back what it produced (the
            // replay produces it again), the control center stores decisions per run
            #[cfg(feature = "kafka")]
            SinkConfig::Kafka(_) => Ok(()),
            SinkConfig::ControlCenter(_) => Ok(()),
            // the global task skips the epochs it applied
            #[cfg(feature = "kafka")]
            SinkConfig::Global(_) => Ok(()),
        }
    }

    /// Publishes the files under the sink's tables that a killed process on this disk committed
    /// but had not yet published (`committed`: per state lineage, each writer's newest committed
    /// epoch). Only Parquet sinks keep such files.
    pub(crate) fn publish_stranded(
        &self,
        committed: &std::collections::BTreeMap<String, Vec<(String, u64)>>,
    ) -> Result<(), crate::task::PipelineError> {
        match self.files_root() {
            Some(root) => crate::sink::parquet::publish_stranded(&root, committed),
            None => Ok(()),
        }
    }

    /// The directory of the sink's tables, if it writes files (Parquet): operator errors,
    /// compaction and the sources' recovery look there.
    pub(crate) fn files_root(&self) -> Option<std::path::PathBuf> {
        match self {
            SinkConfig::Parquet(c) => Some(std::path::PathBuf::from(c.path.as_str())),
            #[cfg(feature = "kafka")]
            SinkConfig::Kafka(_) => None,
            SinkConfig::ControlCenter(_) => None,
            #[cfg(feature = "kafka")]
            SinkConfig::Global(_) => None,
        }
    }
}
