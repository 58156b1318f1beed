//! Validation of a [`RawPipeline`] into a [`PipelinePlan`]: names, stream references, cycles,
//! schema flow, and outputs nobody reads. Every problem is reported, not just the first.

use std::collections::BTreeMap;
use std::fmt;

use arrow::datatypes::SchemaRef;
use citystream_operators::OutputSpec;
use citystream_operators::partitioning::TopicKey;
use citystream_schemas::{EventKind, raw};
use serde_saphyr::Location;

mod copartition;
mod graph;
mod rules;
mod sinks;
mod stages;

use super::{ConfigError, ConfigErrors, OperatorSpec, RawPipeline, RuntimeConfig, SinkConfig, SourceConfig};

/// A resolved reference to one output port of a node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamRef {
    /// Source or stage name.
    pub node: String,
    /// Output port index (0 = main).
    pub port: usize,
    /// Output port name.
    pub port_name: String,
}

impl fmt::Display for StreamRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port == 0 && self.port_name == "main" {
            f.write_str(&self.node)
        } else {
            write!(f, "{}.{}", self.node, self.port_name)
        }
    }
}

/// A planned source.
#[derive(Debug, Clone)]
pub struct SourceNode {
    /// Its name.
    pub name: String,
    /// Its configuration.
    pub config: SourceConfig,
    /// Its output ports.
    pub outputs: Vec<OutputSpec>,
}

/// A planned stage.
#[derive(Debug, Clone)]
pub struct StageNode {
    /// Its name.
    pub name: String,
    /// Its operator.
    pub op: OperatorSpec,
    /// The streams it reads.
    pub inputs: Vec<StreamRef>,
    /// The schema of every input.
    pub input_schema: SchemaRef,
    /// Its output ports.
    pub outputs: Vec<OutputSpec>,
}

/// A planned sink.
#[derive(Debug, Clone)]
pub struct SinkNode {
    /// Its name.
    pub name: String,
    /// Its configuration.
    pub config: SinkConfig,
    /// `(table, stream)` pairs, in a stable order. Input `i` of the sink is `inputs[i]`.
    pub inputs: Vec<(String, StreamRef)>,
    /// Schema per table.
    pub tables: BTreeMap<String, SchemaRef>,
    /// The source stream each input's rows come from (file-name prefix), aligned with `inputs`.
    pub origins: Vec<String>,
}

/// A validated pipeline, ready to run: stages in topological order.
#[derive(Debug, Clone)]
pub struct PipelinePlan {
    /// The pipeline's name.
    pub name: String,
    /// Sources.
    pub sources: Vec<SourceNode>,
    /// Stages, each after every stage it reads.
    pub stages: Vec<StageNode>,
    /// Sinks.
    pub sinks: Vec<SinkNode>,
    /// Runtime settings.
    pub runtime: RuntimeConfig,
    /// How each keyed source stream is keyed, by (source, port), lookups read (see
    /// [`copartition`]).
    pub topic_keys: BTreeMap<(String, usize), std::sync::Arc<TopicKey>>,
    /// The stages reading a keyed topic that hold city-wide state, with what it is: with
    /// several instances in one group, each applies it to the partitions it reads.
    pub city_wide_state: Vec<(String, String)>,
}

impl PipelinePlan {
    /// The topics a Kafka source declares `keys` for, with their keys.
    #[cfg(feature = "kafka")]
    pub fn keyed_topics(&self) -> Vec<(String, std::sync::Arc<TopicKey>)> {
        self.topic_keys
            .iter()
            .filter_map(|((source, port), key)| Some((origin_name(&self.sources, source, *port)?, key.clone())))
            .collect()
    }

    /// Every Kafka topic a pipeline reads or writes, per broker list: its sources' topics, its
    /// Kafka sinks' topics, the control center's decision topics and the grid-intensity topic.
    #[cfg(feature = "kafka")]
    pub fn kafka_topics(&self) -> std::collections::BTreeMap<String, std::collections::BTreeSet<String>> {
        let plan = self;
        let mut out: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
            std::collections::BTreeMap::new();
        let mut add = |brokers: &crate::primitives::EnvString, topic: &str| {
            out.entry(brokers.as_str().to_owned()).or_default().insert(topic.to_owned());
        };
        for s in &plan.sources {
            if let SourceConfig::Kafka(k) = &s.config {
                for kind in citystream_schemas::EventKind::ALL {
                    if let Some(t) = k.topic(kind) {
                        add(&k.brokers, t);
                    }
                }
            }
        }
        for s in &plan.sinks {
            match &s.config {
                SinkConfig::Kafka(k) => k.topics.keys().for_each(|t| add(&k.brokers, t)),
                SinkConfig::ControlCenter(c) => {
                    if let Some(k) = &c.kafka {
                        k.alerts_topic.iter().chain(&k.feedback_topic).for_each(|t| add(&k.brokers, t));
                    }
                }
                SinkConfig::Parquet(_) => {}
                SinkConfig::Global(c) => add(&c.brokers, &c.topic),
            }
        }
        if let Some(t) = plan.runtime.energy.as_ref().and_then(|e| e.carbon_topic.as_ref()) {
            add(&t.brokers, &t.topic);
        }
        out
    }

    /// The topics whose every message must be kept: a control center's alerts topic, from
    /// which a `citystream control` instance rebuilds its book at every start.
    pub fn kept_topics(&self) -> std::collections::BTreeSet<String> {
        self.sinks
            .iter()
            .filter_map(|s| match &s.config {
                SinkConfig::ControlCenter(c) => c.kafka.as_ref()?.alerts_topic.clone(),
                _ => None,
            })
            .collect()
    }

    /// The graph as text, one node per line (for `citystream validate` and snapshot tests).
    pub fn describe(&self) -> String {
        let mut s = format!("pipeline {}\n", self.name);
        for src in &self.sources {
            let ports: Vec<_> = src.outputs.iter().map(|o| o.name.as_str()).collect();
            s += &format!("  source {} ({}) -> {}\n", src.name, source_type(&src.config), ports.join(", "));
        }
        for st in &self.stages {
            let ins: Vec<_> = st.inputs.iter().map(ToString::to_string).collect();
            let outs: Vec<_> =
                st.outputs.iter().map(|o| format!("{} [{} cols]", o.name, o.schema.fields().len())).collect();
            s += &format!("  stage {} ({}) <- {} -> {}\n", st.name, st.op.type_name(), ins.join(", "), outs.join(", "));
        }
        for sk in &self.sinks {
            for (table, r) in &sk.inputs {
                s += &format!("  sink {} table {table} <- {r}\n", sk.name);
            }
        }
        s
    }
}

/// Whether any of `sources` commits its positions (Kafka, files): checkpoints, resuming, and
/// files named after positions.
pub(crate) fn any_committing(sources: &[SourceNode]) -> bool {
    sources.iter().any(|s| s.config.commits_positions())
}

fn source_type(c: &SourceConfig) -> &'static str {
    match c {
        SourceConfig::Simulator(_) => "simulator",
        #[cfg(feature = "kafka")]
        SourceConfig::Kafka(_) => "kafka",
        SourceConfig::Files(_) => "files",
        #[cfg(feature = "kafka")]
        SourceConfig::Global(_) => "global",
    }
}

/// The name of the stream a source port reads: the Kafka topic, or `source.port`.
pub fn origin_name(sources: &[SourceNode], node: &str, port: usize) -> Option<String> {
    let src = sources.iter().find(|s| s.name == node)?;
    match &src.config {
        SourceConfig::Simulator(_) | SourceConfig::Files(_) => Some(format!("{node}.{}", src.outputs[port].name)),
        #[cfg(feature = "kafka")]
        SourceConfig::Kafka(k) => k.topic(EventKind::ALL[port]).map(str::to_owned),
        #[cfg(feature = "kafka")]
        SourceConfig::Global(_) => None,
    }
}

/// The source stream the rows of `r` come from, following single-input stages upstream;
/// `None` when a stage merges several inputs.
fn origin_of(sources: &[SourceNode], stages: &[StageNode], r: &StreamRef) -> Option<String> {
    if let Some(o) = origin_name(sources, &r.node, r.port) {
        return Some(o);
    }
    match stages.iter().find(|s| s.name == r.node) {
        Some(st) if st.inputs.len() == 1 => origin_of(sources, stages, &st.inputs[0]),
        _ => None,
    }
}

/// The output ports of a source.
pub fn source_outputs(c: &SourceConfig) -> Vec<OutputSpec> {
    match c {
        SourceConfig::Simulator(_) | SourceConfig::Files(_) => {
            EventKind::ALL.iter().map(|k| OutputSpec::new(k.as_str(), raw::schema())).collect()
        }
        #[cfg(feature = "kafka")]
        SourceConfig::Kafka(_) => EventKind::ALL.iter().map(|k| OutputSpec::new(k.as_str(), raw::schema())).collect(),
        // its ports are the global task's input streams (`PipelinePlan::global_plan`)
        #[cfg(feature = "kafka")]
        SourceConfig::Global(_) => Vec::new(),
    }
}

struct Checker<'a> {
    file: &'a str,
    errors: Vec<ConfigError>,
}

impl Checker<'_> {
    fn error(&mut self, at: Location, path: impl Into<String>, message: impl Into<String>, help: Option<String>) {
        self.errors.push(ConfigError {
            file: self.file.to_owned(),
            line: at.line() as u32,
            column: at.column() as u32,
            path: path.into(),
            message: message.into(),
            help,
        });
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Validates `raw` (parsed from `file`) into a plan, or reports every problem (sorted by
/// place): names and sources ([`graph`]), then stages in topological order against their
/// inputs' schemas ([`stages`]), sinks ([`sinks`]) and whole-plan rules ([`rules`],
/// [`copartition`]).
pub fn plan(raw: RawPipeline, file: &str) -> Result<PipelinePlan, ConfigErrors> {
    let (sources, stages, sinks, keyed, mut errors) = {
        let mut p = Planner {
            raw: &raw,
            ck: Checker { file, errors: Vec::new() },
            owners: BTreeMap::new(),
            ports: BTreeMap::new(),
        };
        p.check_names();
        let sources = p.sources();
        p.check_sources(&sources);
        let order = p.stage_order();
        let stages = p.plan_stages(&order);
        let sinks = p.plan_sinks(&sources, &stages);
        p.check_unread(&stages, &sinks);
        let keyed = p.check_copartitioning(&sources, &stages);
        p.check_carbon_floor(&stages);
        (sources, stages, sinks, keyed, p.ck.errors)
    };
    if errors.is_empty() {
        let copartition::Found { topic_keys, city_wide_state } = keyed;
        Ok(PipelinePlan { name: raw.name, sources, stages, sinks, runtime: raw.runtime, topic_keys, city_wide_state })
    } else {
        errors.sort_by_key(|e| (e.line, e.column));
        Err(ConfigErrors(errors))
    }
}

/// What planning carries from one step to the next.
struct Planner<'a> {
    raw: &'a RawPipeline,
    ck: Checker<'a>,
    /// Name -> the section that defines it (`sources`, `stages`, `sinks`).
    owners: BTreeMap<&'a str, &'a str>,
    /// Every node's output ports, filled in topological order.
    ports: BTreeMap<String, Vec<OutputSpec>>,
}
