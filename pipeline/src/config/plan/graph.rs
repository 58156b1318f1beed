//! The graph of a pipeline: names, sources, the order of stages (cycles are errors), and
//! resolving stream references (`node` or `node.port`) to a port and its schema.

use std::collections::{BTreeMap, BTreeSet};

use arrow::datatypes::SchemaRef;
use citystream_operators::did_you_mean;
use citystream_schemas::EventKind;
use serde_saphyr::Location;

use super::super::SourceConfig;
use super::{Planner, SourceNode, StreamRef, any_committing, source_outputs, valid_name};

impl<'a> Planner<'a> {
    /// Every name valid and used once; at least one source and one sink.
    pub(super) fn check_names(&mut self) {
        let raw = self.raw;
        let nowhere = Location::UNKNOWN;
        let sections = [
            ("sources", raw.sources.keys().collect::<Vec<_>>()),
            ("stages", raw.stages.keys().collect()),
            ("sinks", raw.sinks.keys().collect()),
        ];
        for (section, names) in &sections {
            for name in names {
                let at = raw.stages.get(*name).filter(|_| *section == "stages").map_or(nowhere, |s| s.location);
                if !valid_name(name) {
                    self.ck.error(
                        at,
                        format!("{section}.{name}"),
                        format!("`{name}` is not a valid name"),
                        Some("names use lower-case letters, digits and `_`, starting with a letter".into()),
                    );
                }
                if let Some(prev) = self.owners.insert(name, section) {
                    self.ck.error(
                        at,
                        format!("{section}.{name}"),
                        format!("`{name}` is also defined in `{prev}`"),
                        Some("every source, stage and sink needs its own name".into()),
                    );
                }
            }
        }
        if raw.sources.is_empty() {
            self.ck.error(nowhere, "sources", "at least one source is needed", None);
        }
        if raw.sinks.is_empty() {
            self.ck.error(nowhere, "sinks", "at least one sink is needed", None);
        }
    }

    /// The source nodes, their outputs registered as streams.
    pub(super) fn sources(&mut self) -> Vec<SourceNode> {
        let mut out = Vec::new();
        for (name, config) in &self.raw.sources {
            let outputs = source_outputs(config);
            self.ports.insert(name.clone(), outputs.clone());
            out.push(SourceNode { name: name.clone(), config: config.clone(), outputs });
        }
        out
    }

    /// The rules of sources that commit positions (Kafka, files): the only source of their
    /// pipeline, reading the kinds they name; state checkpoints need one, and a files source
    /// needs state checkpoints.
    pub(super) fn check_sources(&mut self, sources: &[SourceNode]) {
        let raw = self.raw;
        let nowhere = Location::UNKNOWN;
        let committing = any_committing(sources);

        // Checkpoints and position commits are per pipeline: one source's barriers and sink
        // acknowledgements would interleave with another source's, committing too early.
        if sources.len() > 1 && committing {
            self.ck.error(
                nowhere,
                "sources",
                format!(
                    "a pipeline with a kafka or files source must have exactly one source (it has {})",
                    sources.len()
                ),
                Some("run one pipeline per source; one source can read every event kind".into()),
            );
        }

        // a files source reads exactly the kinds its `paths` names, and records how far it read
        for (name, src) in &raw.sources {
            let SourceConfig::Files(f) = src else { continue };
            if EventKind::ALL.iter().all(|kind| f.paths.get(*kind).is_none()) {
                self.ck.error(nowhere, format!("sources.{name}.paths"), "a files source needs at least one path", None);
            }
            if f.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
                self.ck.error(
                    nowhere,
                    format!("sources.{name}.rate"),
                    "`rate` must be a positive number of lines per second",
                    Some("leave it out to read as fast as the pipeline takes lines".into()),
                );
            }
            if !raw.runtime.has_state() {
                self.ck.error(
                    nowhere,
                    format!("sources.{name}"),
                    "a files source needs `runtime.state_dir` (or `state_url`): it records there how far it read, \
                     so a killed backfill resumes without writing a row twice",
                    Some("add `runtime: {state_dir: <a directory of its own>}`".into()),
                );
            }
            self.check_source_kinds(name, |kind| f.paths.get(kind).is_some(), ("paths", "path"));
        }

        // a Kafka source reads exactly the kinds its `topics` names: reading another is a mistake
        #[cfg(feature = "kafka")]
        for (name, src) in &raw.sources {
            let SourceConfig::Kafka(k) = src else { continue };
            if EventKind::ALL.iter().all(|kind| k.topic(*kind).is_none()) {
                self.ck.error(
                    nowhere,
                    format!("sources.{name}.topics"),
                    "a kafka source needs at least one topic",
                    None,
                );
            }
            self.check_source_kinds(name, |kind| k.topic(kind).is_some(), ("topics", "topic"));
        }

        if raw.runtime.has_state() && !committing {
            let field = if raw.runtime.state_dir.is_some() { "state_dir" } else { "state_url" };
            self.ck.error(
                nowhere,
                format!("runtime.{field}"),
                "state checkpoints need a kafka or files source: only they can resume from a checkpoint",
                Some(format!("remove `{field}`; a simulator run is all or nothing")),
            );
        }
        // only a `state_url` can be wrong: bad, or given beside `state_dir`
        if let Err(e) = raw.runtime.state() {
            self.ck.error(
                nowhere,
                "runtime.state_url",
                e,
                Some("`state_url: s3://bucket/prefix` or `state_dir: <a directory>`".into()),
            );
        }
        self.check_partition_tasks();
    }

    /// `runtime.tasks: partition` cuts one Kafka source's partitions into tasks whose state
    /// moves with them: it needs that source, a state store, and no process-wide sink.
    fn check_partition_tasks(&mut self) {
        let raw = self.raw;
        let nowhere = Location::UNKNOWN;
        if raw.runtime.tasks != super::super::TaskMode::Partition {
            return;
        }
        #[cfg(feature = "kafka")]
        let one_kafka = raw.sources.len() == 1 && matches!(raw.sources.values().next(), Some(SourceConfig::Kafka(_)));
        #[cfg(not(feature = "kafka"))]
        let one_kafka = false;
        if !one_kafka {
            self.ck.error(
                nowhere,
                "runtime.tasks",
                "`tasks: partition` runs one task per partition of a Kafka source: it needs exactly one source, of \
                 type kafka",
                Some("use `tasks: process` (the default) for other sources".into()),
            );
        }
        if raw.runtime.state_url.is_none() {
            self.ck.error(
                nowhere,
                "runtime.tasks",
                "`tasks: partition` needs `runtime.state_url`, the same for every instance: each task keeps its \
                 state there, under `task-{partition}`, where whichever instance runs it next restores it, and its \
                 checkpoints fence the last owner (a `state_dir` of each machine's own would let two owners \
                 publish)",
                Some("`state_url: s3://bucket/prefix`, or `file:///dir` on a disk every instance shares".into()),
            );
        }
        for (name, sink) in &raw.sinks {
            if matches!(sink, super::super::SinkConfig::ControlCenter(_)) {
                self.ck.error(
                    nowhere,
                    format!("sinks.{name}"),
                    "a control center serves one book per process, not one per task: with `runtime.tasks: \
                     partition` it runs as a process of its own",
                    Some(
                        "remove this sink, publish the alerts to Kafka, and run `citystream control` on that topic"
                            .into(),
                    ),
                );
            }
        }
    }

    /// Stages read only the kinds source `name` has (`reads`), each named under its `key` by
    /// one `what` (`("topics", "topic")`).
    fn check_source_kinds(&mut self, name: &str, reads: impl Fn(EventKind) -> bool, (key, what): (&str, &str)) {
        for (stage, st) in &self.raw.stages {
            for r in &st.input.0 {
                let Some((node, port)) = r.value.split_once('.') else { continue };
                let kind = EventKind::ALL.iter().find(|k| k.as_str() == port);
                if node == name && kind.is_some_and(|kd| !reads(*kd)) {
                    self.ck.error(
                        r.referenced,
                        format!("stages.{stage}.input"),
                        format!("`{}` has no {what}: source `{name}` reads only the kinds its `{key}` names", r.value),
                        Some(format!("add `{port}: <{what}>` to `sources.{name}.{key}`")),
                    );
                }
            }
        }
    }

    /// The stages in topological order (Kahn); stages on a cycle are left out, with an error.
    pub(super) fn stage_order(&mut self) -> Vec<&'a str> {
        let raw = self.raw;
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
            self.ck.error(
                at,
                format!("stages.{}", cyclic[0]),
                format!("stages form a cycle: {}", cyclic.join(" -> ")),
                Some("a stage cannot read, directly or not, its own output".into()),
            );
        }
        order
    }

    /// The port and schema `text` (`node` or `node.port`) names, or an error at `at`/`path`.
    pub(super) fn resolve(&mut self, text: &str, at: Location, path: &str) -> Option<(StreamRef, SchemaRef)> {
        let raw = self.raw;
        let (node, port_name) = match text.split_once('.') {
            Some((n, p)) => (n, Some(p)),
            None => (text, None),
        };
        let Some(outs) = self.ports.get(node) else {
            let known =
                self.owners.keys().copied().filter(|n| raw.sources.contains_key(*n) || raw.stages.contains_key(*n));
            let help = did_you_mean(node, known).map(|s| format!("did you mean `{s}`?"));
            if !raw.stages.contains_key(node) {
                self.ck.error(at, path, format!("unknown stream `{text}`: no source or stage is named `{node}`"), help);
            }
            return None;
        };
        let port = match port_name {
            None if raw.sources.contains_key(node) => {
                let names: Vec<_> = outs.iter().map(|o| format!("`{node}.{}`", o.name)).collect();
                self.ck.error(
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
                    self.ck.error(
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
    }
}
