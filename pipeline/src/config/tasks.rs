//! Cutting a plan into the tasks of `runtime.tasks: partition`: one plan per partition number,
//! and, when stages hold city-wide state, the plan of the global task they run in (see
//! `kafka::global`).

// the global task and per-partition tasks need a Kafka source
#![cfg_attr(not(feature = "kafka"), allow(dead_code, unused_imports))]

use std::collections::{BTreeMap, BTreeSet};

use citystream_operators::OutputSpec;

use super::plan::{SinkNode, SourceNode, StreamRef};
use super::{OperatorSpec, PipelinePlan, SinkConfig, SourceConfig, TaskMode};
use crate::primitives::EnvString;

/// The name of the global task's source, and of the tasks' sink feeding it (YAML names cannot
/// start with `_`).
pub(crate) const GLOBAL: &str = "_global";

impl PipelinePlan {
    /// The stages of the global task: those holding city-wide state and every stage reading
    /// what they make. Empty unless `runtime.tasks: partition` with `global_task: true`.
    pub(crate) fn global_stages(&self) -> BTreeSet<String> {
        let mut global = BTreeSet::new();
        if self.runtime.tasks != TaskMode::Partition || !self.runtime.global_task {
            return global;
        }
        // stages are in topological order: a reader comes after what it reads
        for st in &self.stages {
            if self.city_wide_state.iter().any(|(s, _)| *s == st.name)
                || st.inputs.iter().any(|r| global.contains(&r.node))
            {
                global.insert(st.name.clone());
            }
        }
        global
    }

    /// The streams of per-partition stages the global task reads, in a stable order (the ports
    /// of its source, the inputs of the tasks' publisher).
    fn global_inputs(&self, global: &BTreeSet<String>) -> Vec<StreamRef> {
        let mut out: Vec<StreamRef> = Vec::new();
        for st in self.stages.iter().filter(|s| global.contains(&s.name)) {
            for r in &st.inputs {
                if !global.contains(&r.node) && !out.contains(r) {
                    out.push(r.clone());
                }
            }
        }
        out
    }

    fn output_spec(&self, r: &StreamRef) -> Option<OutputSpec> {
        let st = self.stages.iter().find(|s| s.name == r.node)?;
        Some(OutputSpec::new(r.to_string(), st.outputs.get(r.port)?.schema.clone()))
    }

    /// This plan with its state under `dir` of the runtime's `state_url` (and only there).
    fn with_state_under(&self, dir: &str) -> Result<PipelinePlan, String> {
        let mut p = self.clone();
        p.runtime.tasks = TaskMode::Process;
        // one process runs each part once: nothing city-wide is split any more
        p.city_wide_state.clear();
        match p.runtime.state()? {
            Some(crate::task::StateUrl::Local(root)) => {
                p.runtime.state_dir = Some(EnvString::literal(root.join(dir).display().to_string()));
                p.runtime.state_url = None;
            }
            Some(url @ crate::task::StateUrl::S3 { .. }) => {
                p.runtime.state_url = Some(EnvString::literal(url.child(dir).to_string()));
                p.runtime.state_dir = None;
            }
            None => return Err("per-partition tasks need `runtime.state_url`".into()),
        }
        // a DP release's privacy units lie on one partition (the planner proves it), so each
        // task spends its own budget on its own units (parallel composition), in a file of its own
        for st in &mut p.stages {
            if let OperatorSpec::DpAggregate(dp) = &mut st.op {
                let d = std::path::Path::new(dp.budget_dir.as_str()).join(dir);
                dp.budget_dir = EnvString::literal(d.display().to_string());
            }
        }
        Ok(p)
    }

    /// The plan of task `task` of `runtime.tasks: partition`: its source reads partition
    /// `task` of every topic, its state lives under `task-{task}` of the runtime's, and the
    /// streams the global task reads go to the global topic instead of the global stages.
    pub(crate) fn task_plan(&self, task: i32) -> Result<PipelinePlan, String> {
        #[cfg(not(feature = "kafka"))]
        {
            let _ = task;
            Err("per-partition tasks need a kafka source".into())
        }
        #[cfg(feature = "kafka")]
        {
            let mut p = self.with_state_under(&format!("task-{task}"))?;
            let mut kafka = None;
            for src in &mut p.sources {
                match &mut src.config {
                    SourceConfig::Kafka(k) => {
                        k.task = Some(task);
                        kafka = Some(k.clone());
                    }
                    _ => return Err(format!("source `{}` has no partitions to cut into tasks", src.name)),
                }
            }
            let global = self.global_stages();
            if global.is_empty() {
                return Ok(p);
            }
            let inputs = self.global_inputs(&global);
            p.stages.retain(|s| !global.contains(&s.name));
            p.sinks = self.sinks.iter().filter_map(|sk| sink_part(sk, |r| !global.contains(&r.node))).collect();
            let k = kafka.ok_or("the global task needs a kafka source")?;
            let config = SinkConfig::Global(crate::kafka::global::PublishConfig {
                brokers: k.brokers.clone(),
                properties: crate::kafka::global::client_properties(&k.properties),
                topic: crate::kafka::global::topic(k.group_id.as_str()),
                task,
            });
            let tables = inputs
                .iter()
                .filter_map(|r| Some((r.to_string(), self.output_spec(r)?.schema)))
                .collect::<BTreeMap<_, _>>();
            p.sinks.push(SinkNode {
                name: GLOBAL.into(),
                config,
                inputs: inputs.iter().map(|r| (r.to_string(), r.clone())).collect(),
                tables,
                origins: vec![String::new(); inputs.len()],
            });
            Ok(p)
        }
    }

    /// The global topic of this plan, created unless it exists (for `citystream topics`): its
    /// brokers, its name and whether it was created; `None` when the plan has no global task.
    #[cfg(feature = "kafka")]
    pub async fn ensure_global_topic(&self) -> Result<Option<(String, String, bool)>, String> {
        let Some(global) = self.global_plan()? else { return Ok(None) };
        let Some(SourceConfig::Global(r)) = global.sources.first().map(|s| &s.config) else {
            return Ok(None);
        };
        let props = crate::kafka::global::client_properties(&r.source.properties);
        let created = crate::kafka::global::ensure_topic(&r.source.brokers, &props, &r.topic).await?;
        Ok(Some((r.source.brokers.as_str().to_owned(), r.topic.clone(), created)))
    }

    /// The plan of the global task (`None` without city-wide stages or without tasks): its
    /// source reads the tasks' streams from the global topic, its stages are the global ones,
    /// its sinks get what those make, and its state lives under `global` of the runtime's.
    pub(crate) fn global_plan(&self) -> Result<Option<PipelinePlan>, String> {
        let global = self.global_stages();
        if global.is_empty() {
            return Ok(None);
        }
        #[cfg(feature = "kafka")]
        {
            let mut p = self.with_state_under("global")?;
            let Some(SourceConfig::Kafka(k)) = self.sources.first().map(|s| &s.config) else {
                return Err("the global task needs a kafka source".into());
            };
            let inputs = self.global_inputs(&global);
            let outputs: Vec<OutputSpec> =
                inputs.iter().map(|r| self.output_spec(r).ok_or(format!("no stream {r}"))).collect::<Result<_, _>>()?;
            let schemas = outputs.iter().map(|o| o.schema.clone()).collect();
            let topic = crate::kafka::global::topic(k.group_id.as_str());
            p.sources = vec![SourceNode {
                name: GLOBAL.into(),
                config: SourceConfig::Global(Box::new(crate::kafka::global::ReceiveConfig {
                    source: (**k).clone(),
                    topic,
                    schemas,
                    names: inputs.iter().map(ToString::to_string).collect(),
                })),
                outputs,
            }];
            p.stages.retain(|s| global.contains(&s.name));
            for st in &mut p.stages {
                // the tasks' epochs interleave as they come: a storm summary follows event time
                if let OperatorSpec::Alert(a) = &mut st.op
                    && let Some(storm) = &mut a.storm
                {
                    storm.order = citystream_operators::alert::StormOrder::EventTime;
                }
                for r in &mut st.inputs {
                    if let Some(port) = inputs.iter().position(|i| i == r) {
                        *r = StreamRef { node: GLOBAL.into(), port, port_name: r.to_string() };
                    }
                }
            }
            p.sinks = self.sinks.iter().filter_map(|sk| sink_part(sk, |r| global.contains(&r.node))).collect();
            p.topic_keys = BTreeMap::new();
            Ok(Some(p))
        }
        #[cfg(not(feature = "kafka"))]
        Err("the global task needs a kafka source".into())
    }
}

/// The part of sink `sk` whose inputs `keep` says, if any: a table fed from both the tasks and
/// the global task gets files from each (their state lineages name them apart).
fn sink_part(sk: &SinkNode, keep: impl Fn(&StreamRef) -> bool) -> Option<SinkNode> {
    let (inputs, origins): (Vec<_>, Vec<_>) =
        sk.inputs.iter().zip(&sk.origins).filter(|((_, r), _)| keep(r)).map(|(i, o)| (i.clone(), o.clone())).unzip();
    if inputs.is_empty() {
        return None;
    }
    let tables = sk
        .tables
        .iter()
        .filter(|(t, _)| inputs.iter().any(|(i, _)| i == *t))
        .map(|(t, s)| (t.clone(), s.clone()))
        .collect();
    Some(SinkNode { name: sk.name.clone(), config: sk.config.clone(), inputs, tables, origins })
}
