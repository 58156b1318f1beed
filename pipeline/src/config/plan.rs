//! Validation of a [`RawPipeline`] into a [`PipelinePlan`]: names, stream references, cycles,
//! schema flow, and outputs nobody reads. Every problem is reported, not just the first.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use arrow::datatypes::SchemaRef;
use citystream_operators::{OutputSpec, did_you_mean};
use citystream_schemas::{EventKind, raw};
use serde_saphyr::Location;

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
}

impl PipelinePlan {
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
            }
        }
        if let Some(t) = plan.runtime.energy.as_ref().and_then(|e| e.carbon_topic.as_ref()) {
            add(&t.brokers, &t.topic);
        }
        out
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

/// Whether any of `sources` reads Kafka (offset commits, file cleanup on assignment).
pub(crate) fn any_kafka(sources: &[SourceNode]) -> bool {
    sources.iter().any(|s| source_type(&s.config) == "kafka")
}

fn source_type(c: &SourceConfig) -> &'static str {
    match c {
        SourceConfig::Simulator(_) => "simulator",
        #[cfg(feature = "kafka")]
        SourceConfig::Kafka(_) => "kafka",
    }
}

/// The name of the stream a source port reads: the Kafka topic, or `source.port`.
pub fn origin_name(sources: &[SourceNode], node: &str, port: usize) -> Option<String> {
    let src = sources.iter().find(|s| s.name == node)?;
    match &src.config {
        SourceConfig::Simulator(_) => Some(format!("{node}.{}", src.outputs[port].name)),
        #[cfg(feature = "kafka")]
        SourceConfig::Kafka(k) => k.topic(EventKind::ALL[port]).map(str::to_owned),
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
        SourceConfig::Simulator(_) => {
            EventKind::ALL.iter().map(|k| OutputSpec::new(k.as_str(), raw::schema())).collect()
        }
        #[cfg(feature = "kafka")]
        SourceConfig::Kafka(_) => EventKind::ALL.iter().map(|k| OutputSpec::new(k.as_str(), raw::schema())).collect(),
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

/// Validates `raw` (parsed from `file`) into a plan, or reports every problem.
pub fn plan(raw: RawPipeline, file: &str) -> Result<PipelinePlan, ConfigErrors> {
    let mut ck = Checker { file, errors: Vec::new() };
    let nowhere = Location::UNKNOWN;

    // names
    let mut owners: BTreeMap<&str, &str> = BTreeMap::new();
    let sections = [
        ("sources", raw.sources.keys().collect::<Vec<_>>()),
        ("stages", raw.stages.keys().collect()),
        ("sinks", raw.sinks.keys().collect()),
    ];
    for (section, names) in &sections {
        for name in names {
            let at = raw.stages.get(*name).filter(|_| *section == "stages").map_or(nowhere, |s| s.location);
            if !valid_name(name) {
                ck.error(
                    at,
                    format!("{section}.{name}"),
                    format!("`{name}` is not a valid name"),
                    Some("names use lower-case letters, digits and `_`, starting with a letter".into()),
                );
            }
            if let Some(prev) = owners.insert(name, section) {
                ck.error(
                    at,
                    format!("{section}.{name}"),
                    format!("`{name}` is also defined in `{prev}`"),
                    Some("every source, stage and sink needs its own name".into()),
                );
            }
        }
    }
    if raw.sources.is_empty() {
        ck.error(nowhere, "sources", "at least one source is needed", None);
    }
    if raw.sinks.is_empty() {
        ck.error(nowhere, "sinks", "at least one sink is needed", None);
    }

    // outputs of every node, filled in topological order
    let mut ports: BTreeMap<String, Vec<OutputSpec>> = BTreeMap::new();
    let sources: Vec<SourceNode> = raw
        .sources
        .iter()
        .map(|(name, config)| {
            let outputs = source_outputs(config);
            ports.insert(name.clone(), outputs.clone());
            SourceNode { name: name.clone(), config: config.clone(), outputs }
        })
        .collect();

    let has_kafka = any_kafka(&sources);

    // Checkpoints and offset commits are per pipeline: a Kafka source's barriers and sink
    // acknowledgements would interleave with another source's, committing too early.
    if sources.len() > 1 && has_kafka {
        ck.error(
            nowhere,
            "sources",
            format!("a pipeline with a kafka source must have exactly one source (it has {})", sources.len()),
            Some("run one pipeline per source; a kafka source can read several topics".into()),
        );
    }

    // a Kafka source reads exactly the kinds its `topics` names: reading another is a mistake
    #[cfg(feature = "kafka")]
    for (name, src) in &raw.sources {
        let SourceConfig::Kafka(k) = src else { continue };
        if EventKind::ALL.iter().all(|kind| k.topic(*kind).is_none()) {
            ck.error(nowhere, format!("sources.{name}.topics"), "a kafka source needs at least one topic", None);
        }
        for (stage, st) in &raw.stages {
            for r in &st.input.0 {
                let Some((node, port)) = r.value.split_once('.') else { continue };
                let kind = EventKind::ALL.iter().find(|k| k.as_str() == port);
                if node == name && kind.is_some_and(|kd| k.topic(*kd).is_none()) {
                    ck.error(
                        r.referenced,
                        format!("stages.{stage}.input"),
                        format!("`{}` has no topic: source `{name}` reads only the kinds its `topics` names", r.value),
                        Some(format!("add `{port}: <topic>` to `sources.{name}.topics`")),
                    );
                }
            }
        }
    }

    if raw.runtime.state_dir.is_some() && !has_kafka {
        ck.error(
            nowhere,
            "runtime.state_dir",
            "state checkpoints need a kafka source: only a kafka source can resume from a checkpoint",
            Some("remove `state_dir`; a simulator run is all or nothing".into()),
        );
    }

    // topological order of stages (Kahn), reporting cycles
    let stage_deps: BTreeMap<&str, BTreeSet<&str>> = raw
        .stages
        .iter()
        .map(|(name, st)| {
            let deps = st
                .input
                .0
                .iter()
                .filter_map(|i| {
                    let node = i.value.split('.').next().unwrap_or("");
                    raw.stages.get_key_value(node).map(|(k, _)| k.as_str())
                })
                .collect();
            (name.as_str(), deps)
        })
        .collect();
    let mut order: Vec<&str> = Vec::new();
    let mut done: BTreeSet<&str> = BTreeSet::new();
    loop {
        let ready: Vec<&str> = stage_deps
            .iter()
            .filter(|(n, d)| !done.contains(*n) && d.iter().all(|x| done.contains(x)))
            .map(|(n, _)| *n)
            .collect();
        if ready.is_empty() {
            break;
        }
        for n in ready {
            done.insert(n);
            order.push(n);
        }
    }
    let cyclic: Vec<&str> = stage_deps.keys().filter(|n| !done.contains(*n)).copied().collect();
    if !cyclic.is_empty() {
        let at = raw.stages[cyclic[0]].location;
        ck.error(
            at,
            format!("stages.{}", cyclic[0]),
            format!("stages form a cycle: {}", cyclic.join(" -> ")),
            Some("a stage cannot read, directly or not, its own output".into()),
        );
    }

    let resolve = |ck: &mut Checker<'_>,
                   ports: &BTreeMap<String, Vec<OutputSpec>>,
                   text: &str,
                   at: Location,
                   path: &str|
     -> Option<(StreamRef, SchemaRef)> {
        let (node, port_name) = match text.split_once('.') {
            Some((n, p)) => (n, Some(p)),
            None => (text, None),
        };
        let Some(outs) = ports.get(node) else {
            let known = owners.keys().copied().filter(|n| raw.sources.contains_key(*n) || raw.stages.contains_key(*n));
            let help = did_you_mean(node, known).map(|s| format!("did you mean `{s}`?"));
            if !raw.stages.contains_key(node) {
                ck.error(at, path, format!("unknown stream `{text}`: no source or stage is named `{node}`"), help);
            }
            return None;
        };
        let port = match port_name {
            None if raw.sources.contains_key(node) => {
                let names: Vec<_> = outs.iter().map(|o| format!("`{node}.{}`", o.name)).collect();
                ck.error(
                    at,
                    path,
                    format!("source `{node}` has several outputs; name one"),
                    Some(format!("one of {}", names.join(", "))),
                );
                return None;
            }
            None => 0,
            Some(p) => match outs.iter().position(|o| o.name == p) {
                Some(i) => i,
                None => {
                    let names: Vec<_> = outs.iter().map(|o| o.name.as_str()).collect();
                    ck.error(
                        at,
                        path,
                        format!("`{node}` has no output `{p}`"),
                        Some(format!("its outputs are {}", names.join(", "))),
                    );
                    return None;
                }
            },
        };
        Some((StreamRef { node: node.to_owned(), port, port_name: outs[port].name.clone() }, outs[port].schema.clone()))
    };

    let mut stages = Vec::new();
    for name in &order {
        let st = &raw.stages[*name];
        let mut inputs = Vec::new();
        let mut schema: Option<SchemaRef> = None;
        for (i, inp) in st.input.0.iter().enumerate() {
            let path = if st.input.0.len() == 1 {
                format!("stages.{name}.input")
            } else {
                format!("stages.{name}.input[{i}]")
            };
            if let Some((r, s)) = resolve(&mut ck, &ports, &inp.value, inp.referenced, &path) {
                match &schema {
                    Some(prev) if prev != &s => {
                        ck.error(
                            inp.referenced,
                            &path,
                            format!("`{r}` has a different schema from the stage's other inputs"),
                            Some("all inputs of a stage must carry the same columns".into()),
                        );
                    }
                    _ => schema = Some(s),
                }
                inputs.push(r);
            }
        }
        if st.input.0.is_empty() {
            ck.error(st.location, format!("stages.{name}.input"), "a stage needs at least one input", None);
        }
        let Some(input_schema) = schema else { continue };
        if inputs.len() != st.input.0.len() {
            continue;
        }
        match st.op.config().plan(&input_schema) {
            Ok(outputs) => {
                ports.insert((*name).to_owned(), outputs.clone());
                stages.push(StageNode { name: (*name).to_owned(), op: st.op.clone(), inputs, input_schema, outputs });
            }
            Err(errs) => {
                for e in errs {
                    ck.error(st.location, format!("stages.{name}.{}", e.key), e.message, e.help);
                }
            }
        }
    }

    let mut sinks = Vec::new();
    let alerts_table = String::from("alerts");
    for (name, cfg) in &raw.sinks {
        // (table or topic, its inputs, its key column)
        let routes: Vec<(&String, &super::Inputs, Option<&str>)> = match cfg {
            SinkConfig::Parquet(p) => {
                if p.tables.is_empty() {
                    ck.error(nowhere, format!("sinks.{name}.tables"), "a parquet sink needs at least one table", None);
                }
                for (i, d) in p.daily.iter().enumerate() {
                    if !p.tables.contains_key(d) {
                        let help = did_you_mean(d, p.tables.keys().map(String::as_str)).map_or_else(
                            || format!("its tables: {}", p.tables.keys().cloned().collect::<Vec<_>>().join(", ")),
                            |s| format!("did you mean `{s}`?"),
                        );
                        ck.error(
                            nowhere,
                            format!("sinks.{name}.daily[{i}]"),
                            format!("no table `{d}` in this sink"),
                            Some(help),
                        );
                    }
                }
                // the control center writes its decisions hourly into `alerts` and `feedback`
                for (other, c) in &raw.sinks {
                    let SinkConfig::ControlCenter(c) = c else { continue };
                    if c.feedback_path.as_ref().map(|f| f.as_str()) != Some(p.path.as_str()) {
                        continue;
                    }
                    for t in p.daily.iter().filter(|t| *t == "alerts" || *t == "feedback") {
                        ck.error(
                            nowhere,
                            format!("sinks.{name}.daily"),
                            format!("`{t}` is shared with control center `{other}`, which partitions it by hour"),
                            Some(format!("keep `{t}` hourly")),
                        );
                    }
                }
                p.tables.iter().map(|(t, i)| (t, i, None)).collect()
            }
            #[cfg(feature = "kafka")]
            SinkConfig::Kafka(k) => {
                if k.topics.is_empty() {
                    ck.error(nowhere, format!("sinks.{name}.topics"), "a kafka sink needs at least one topic", None);
                }
                k.topics.iter().map(|(t, r)| (t, &r.input, r.key.as_deref())).collect()
            }
            SinkConfig::ControlCenter(c) => vec![(&alerts_table, &c.alerts, None)],
        };
        let section = match cfg {
            SinkConfig::Parquet(_) => "tables",
            #[cfg(feature = "kafka")]
            SinkConfig::Kafka(_) => "topics",
            SinkConfig::ControlCenter(_) => "alerts",
        };
        let mut inputs = Vec::new();
        let mut tables = BTreeMap::new();
        for (table, refs, key) in routes {
            let first = refs.0.first().map_or(nowhere, |r| r.referenced);
            if section == "tables" && !valid_name(table) {
                ck.error(
                    first,
                    format!("sinks.{name}.tables.{table}"),
                    format!("`{table}` is not a valid table name"),
                    Some("table names use lower-case letters, digits and `_`".into()),
                );
            }
            for (i, r) in refs.0.iter().enumerate() {
                let path = if section == "tables" {
                    format!("sinks.{name}.tables.{table}[{i}]")
                } else if section == "alerts" {
                    format!("sinks.{name}.alerts[{i}]")
                } else {
                    format!("sinks.{name}.topics.{table}.input[{i}]")
                };
                if let Some((sref, schema)) = resolve(&mut ck, &ports, &r.value, r.referenced, &path) {
                    if sources.iter().any(|s| s.name == sref.node) && sref.port_name == EventKind::Camera.as_str() {
                        // raw camera payloads carry plates and track ids; only `decode` may read them
                        ck.error(
                            r.referenced,
                            &path,
                            format!("`{sref}` is raw camera messages, which carry plates: they never reach a sink"),
                            Some("decode them first (`type: decode, kind: camera`), which pseudonymizes or drops identifiers".into()),
                        );
                    }
                    if let Some(k) = key
                        && schema.index_of(k).is_err()
                    {
                        let help = did_you_mean(k, schema.fields().iter().map(|f| f.name().as_str()))
                            .map(|s| format!("did you mean `{s}`?"));
                        ck.error(
                            r.referenced,
                            format!("sinks.{name}.topics.{table}.key"),
                            format!("`{sref}` has no column `{k}` to key messages by"),
                            help,
                        );
                    }
                    if section == "alerts" && schema != citystream_operators::alert::alert_schema() {
                        ck.error(
                            r.referenced,
                            &path,
                            format!("`{sref}` is not an alert stream"),
                            Some("a control center reads the outputs of `type: alert` stages".into()),
                        );
                    }
                    match tables.get(table) {
                        Some(prev) if prev != &schema => ck.error(
                            r.referenced,
                            &path,
                            format!("`{sref}` does not have the schema of `{table}`'s other inputs"),
                            Some("route streams of different shapes to different tables".into()),
                        ),
                        _ => {
                            tables.insert(table.clone(), schema);
                        }
                    }
                    inputs.push((table.clone(), sref));
                }
            }
        }
        let mut origins = Vec::new();
        for (table, r) in &inputs {
            let origin = origin_of(&sources, &stages, r);
            let positioned = tables.get(table).is_some_and(|s: &SchemaRef| s.index_of("src_partition").is_ok());
            if origin.is_none() && positioned && has_kafka {
                // files are named after the topic and offsets they hold, which is how a restart
                // finds what was written after the last commit; merged streams have no one topic
                ck.error(
                    nowhere,
                    format!("sinks.{name}.tables.{table}"),
                    format!("`{r}` merges several source streams, so its rows cannot be filed by topic and offset"),
                    Some("route each topic's rows to the table through single-input stages".into()),
                );
            }
            origins.push(origin.unwrap_or_else(|| r.node.clone()));
        }
        sinks.push(SinkNode { name: name.clone(), config: cfg.clone(), inputs, tables, origins });
    }

    // every stage output must be read by someone: nothing is dropped silently
    let consumed: BTreeSet<(String, usize)> = stages
        .iter()
        .flat_map(|s| s.inputs.iter())
        .chain(sinks.iter().flat_map(|s| s.inputs.iter().map(|(_, r)| r)))
        .map(|r| (r.node.clone(), r.port))
        .collect();
    for st in &stages {
        for (p, out) in st.outputs.iter().enumerate() {
            if !consumed.contains(&(st.name.clone(), p)) {
                let r = StreamRef { node: st.name.clone(), port: p, port_name: out.name.clone() };
                ck.error(
                    raw.stages[&st.name].location,
                    format!("stages.{}", st.name),
                    format!("output `{r}` is not read by any stage or sink"),
                    Some(format!("route `{r}` to a sink table; citystream never drops rows silently")),
                );
            }
        }
    }

    // alerting is the floor of carbon-aware operation: a stage whose predictions reach an
    // `alert` stage (directly or through other stages) may thin calm keys to at most one
    // prediction per `alert_floor`, and never beyond a reading rule's `stale_after`
    let floor = raw.runtime.carbon_policy.as_ref().map_or(crate::energy::d_alert_floor(), |p| p.alert_floor);
    for st in &stages {
        // what the high mode may delay, and the key it is set at
        let (delay, key, fix) = match &st.op {
            OperatorSpec::Infer(cfg) => match cfg.carbon.as_ref().and_then(|c| c.calm.as_ref()) {
                Some(calm) => (calm.every, "carbon.calm.every", "shorten `every`"),
                None => continue,
            },
            OperatorSpec::DpAggregate(cfg) => {
                match &cfg.defer {
                    Some(d) => {
                        if raw.runtime.carbon_policy.is_none() {
                            ck.error(
                            raw.stages[&st.name].location,
                            format!("stages.{}.defer", st.name),
                            "deferred releases follow the carbon policy, and there is none",
                            Some("add `runtime.carbon_policy` (and `runtime.energy` for the grid), or remove `defer`".into()),
                        );
                        }
                        (d.max_delay, "defer.max_delay", "shorten `max_delay`")
                    }
                    None => continue,
                }
            }
            _ => continue,
        };
        let mut reached: BTreeSet<&str> = BTreeSet::new();
        let mut frontier = vec![(st.name.as_str(), Some(0usize))];
        while let Some((node, port)) = frontier.pop() {
            for next in &stages {
                let reads = next.inputs.iter().any(|r| r.node == node && port.is_none_or(|p| r.port == p));
                if reads && reached.insert(next.name.as_str()) {
                    frontier.push((next.name.as_str(), None));
                }
            }
        }
        let every = delay.as_millis_i64();
        for a in stages.iter().filter(|a| reached.contains(a.name.as_str())) {
            let OperatorSpec::Alert(rule) = &a.op else { continue };
            let (limit, what) = if rule.stale_after.as_millis_i64() < floor.as_millis_i64() {
                (rule.stale_after, format!("`stale_after` of alert stage `{}`", a.name))
            } else {
                (floor, "the alert floor".to_owned())
            };
            if every > limit.as_millis_i64() {
                ck.error(
                    raw.stages[&st.name].location,
                    format!("stages.{}.{key}", st.name),
                    format!(
                        "`{delay}` is longer than {what} ({limit}): alert stage `{}` reads this stage's output",
                        a.name
                    ),
                    Some(format!("{fix}, or raise `runtime.carbon_policy.alert_floor` deliberately")),
                );
            }
        }
    }

    if ck.errors.is_empty() {
        Ok(PipelinePlan { name: raw.name, sources, stages, sinks, runtime: raw.runtime })
    } else {
        ck.errors.sort_by_key(|e| (e.line, e.column));
        Err(ConfigErrors(ck.errors))
    }
}
