//! Co-partitioning: on a keyed topic (a Kafka source's `keys`), every stage whose state is per
//! key must keep each key's rows on one partition, so that several instances in one group,
//! each reading some partitions, hold whole keys and produce what one instance produces.
//!
//! The proof follows column names downstream: on a source stream, the key's column
//! *determines* the partition (a lookup's group is a function of it), and so do the columns
//! the source declares `determined_by` (a detector's id: it lies on one segment). A stage's output keeps
//! that for the determining columns it still carries under the same name (`project` renames
//! lose it); a stage reading several streams keeps only what every input has, and only if they
//! all come from one topic (joining topics across instances is not supported). A stage state per `[k]` is then fine when `k` names a determining column;
//! a stage reading neighbours (`features`) also needs every neighbour pair under one key; a
//! city-wide part of a stage (a storm limit, DP public partitions) is listed in the plan
//! (`PipelinePlan::city_wide_state`), not refused: each instance applies it to its own partitions until a global stage exists.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use citystream_operators::partitioning::{StateScope, TopicKey};

use super::super::OperatorSpec;
use super::{Planner, SourceNode, StageNode};

/// How a stream is keyed: the topic key (its description) and the columns that determine it.
#[derive(Clone)]
struct Keyed {
    key: Arc<TopicKey>,
    /// Where it was declared, for errors: `sources.kafka.keys.traffic`.
    declared: String,
    determining: BTreeSet<String>,
}

/// A stream is unkeyed (`None`), keyed, or a merge of streams keyed differently.
#[derive(Clone)]
enum Keying {
    Keyed(Keyed),
    Mixed(Vec<String>),
}

type Streams = BTreeMap<(String, usize), Keying>;

/// The keying of every source stream that declares a key; errors for keys that do not load.
fn source_keys(sources: &[SourceNode]) -> (Streams, Vec<(String, String)>) {
    let mut streams = Streams::new();
    let mut errors = Vec::new();
    for src in sources {
        for (p, out) in src.outputs.iter().enumerate() {
            let Some(spec) = src.config.topic_key(p) else { continue };
            let declared = format!("sources.{}.keys.{}", src.name, out.name);
            match spec.load() {
                Ok(key) => {
                    let determining = spec.determining().map(str::to_owned).collect();
                    streams.insert(
                        (src.name.clone(), p),
                        Keying::Keyed(Keyed { key: Arc::new(key), declared, determining }),
                    );
                }
                Err(e) => errors.push((declared, e)),
            }
        }
    }
    (streams, errors)
}

/// The keying of a stage's input: `None` when no input is keyed.
fn input_keying(st: &StageNode, streams: &Streams) -> Option<Keying> {
    let ins: Vec<Option<&Keying>> = st.inputs.iter().map(|r| streams.get(&(r.node.clone(), r.port))).collect();
    if ins.iter().all(Option::is_none) {
        return None;
    }
    let mut keyed: Vec<&Keyed> = Vec::new();
    let mut describe = Vec::new();
    for (r, k) in st.inputs.iter().zip(&ins) {
        match k {
            Some(Keying::Keyed(k)) => {
                keyed.push(k);
                describe.push(format!("`{r}` by {}", k.key.describe()));
            }
            Some(Keying::Mixed(d)) => describe.extend(d.iter().cloned()),
            None => describe.push(format!("`{r}` by nothing declared")),
        }
    }
    // two topics keyed alike still need equal partition counts and an assignor that gives one
    // instance the same partitions of both: not supported, so only one topic's streams merge
    let alike = keyed.len() == ins.len() && keyed.windows(2).all(|w| w[0].declared == w[1].declared);
    if !alike {
        return Some(Keying::Mixed(describe));
    }
    let mut out = keyed[0].clone();
    for k in &keyed[1..] {
        out.determining = out.determining.intersection(&k.determining).cloned().collect();
    }
    Some(Keying::Keyed(out))
}

/// Columns of output `port` that still determine the key: those the stage passes through
/// unchanged (`OperatorConfig::passes_through`; a column a stage makes under the same name, a
/// window's `as: segment_id`, holds other values). `decode` reads the raw stream and writes the
/// key's columns.
fn carried(st: &StageNode, port: usize, determining: &BTreeSet<String>) -> BTreeSet<String> {
    let schema = &st.outputs[port].schema;
    let through: BTreeSet<String> = match &st.op {
        OperatorSpec::Decode(_) => schema.fields().iter().map(|f| f.name().clone()).collect(),
        op => op.config().passes_through(&st.input_schema, port).into_iter().collect(),
    };
    determining.iter().filter(|c| through.contains(*c) && schema.column_with_name(c).is_some()).cloned().collect()
}

/// What the check found, kept in the plan: how each keyed source stream is keyed (the runtime
/// routes rows by it, `citystream topics` counts its partitions), and the city-wide state
/// reading a keyed stream (named by `citystream validate` and at start).
pub(super) struct Found {
    pub(super) topic_keys: BTreeMap<(String, usize), Arc<TopicKey>>,
    pub(super) city_wide_state: Vec<(String, String)>,
}

impl Planner<'_> {
    /// Refuses keyed stages whose key does not determine the topic's key (see the module docs).
    pub(super) fn check_copartitioning(&mut self, sources: &[SourceNode], stages: &[StageNode]) -> Found {
        let raw = self.raw;
        let (mut streams, errors) = source_keys(sources);
        for (at, e) in errors {
            self.ck.error(serde_saphyr::Location::UNKNOWN, at, e, None);
        }
        let topic_keys = streams
            .iter()
            .filter_map(|(at, k)| match k {
                Keying::Keyed(k) => Some((at.clone(), k.key.clone())),
                Keying::Mixed(_) => None,
            })
            .collect();
        let mut city_wide_state = Vec::new();
        // with per-partition tasks, stages holding city-wide state and their readers run in the
        // global task, which reads every partition: their keys need not follow the topics'
        let tasks = raw.runtime.tasks == super::super::TaskMode::Partition && raw.runtime.global_task;
        let mut global: BTreeSet<&str> = BTreeSet::new();
        for st in stages {
            let Some(keying) = input_keying(st, &streams) else { continue };
            let at = raw.stages[&st.name].location;
            if let (OperatorSpec::Decode(_), Keying::Keyed(k)) = (&st.op, &keying) {
                // the key is read from the decoded rows: a text column of the event kind
                for c in &k.determining {
                    let ty = st.outputs[0].schema.field_with_name(c).map(|f| f.data_type().clone());
                    if !matches!(ty, Ok(arrow::datatypes::DataType::Utf8)) {
                        let what = ty.map_or("not a column".to_owned(), |t| format!("{t}, not text"));
                        self.ck.error(
                            at,
                            k.declared.clone(),
                            format!("`{c}` of `{}`'s rows is {what}", st.name),
                            Some(format!("name text columns of the rows `{}` decodes", st.name)),
                        );
                    }
                }
            }
            let scopes = st.op.config().state_scopes(&st.input_schema);
            city_wide_state.extend(scopes.iter().filter_map(|s| match s {
                StateScope::City(why) => Some((st.name.clone(), why.clone())),
                _ => None,
            }));
            if tasks
                && (scopes.iter().any(|s| matches!(s, StateScope::City(_)))
                    || st.inputs.iter().any(|r| global.contains(r.node.as_str())))
            {
                global.insert(&st.name);
            }
            match &keying {
                _ if global.contains(st.name.as_str()) => {}
                Keying::Mixed(how) => {
                    if scopes.iter().any(|s| !matches!(s, StateScope::City(_))) {
                        self.ck.error(
                            at,
                            format!("stages.{}.input", st.name),
                            format!(
                                "`{}` keeps state per key over streams of different topics ({}): one key's rows \
                                 can sit on partitions that different instances read",
                                st.name,
                                how.join("; ")
                            ),
                            Some(
                                "give the stage inputs from one topic: joining two topics across instances (same \
                                 key, same partition count, partitions co-located by the assignor) is not supported"
                                    .into(),
                            ),
                        );
                    }
                }
                Keying::Keyed(k) => {
                    for scope in &scopes {
                        if let Some((message, help)) = refusal(&st.name, scope, k) {
                            self.ck.error(at, format!("stages.{}", st.name), message, Some(help));
                        }
                    }
                }
            }
            for p in 0..st.outputs.len() {
                let out = match &keying {
                    Keying::Keyed(k) => {
                        Keying::Keyed(Keyed { determining: carried(st, p, &k.determining), ..k.clone() })
                    }
                    Keying::Mixed(d) => Keying::Mixed(d.clone()),
                };
                streams.insert((st.name.clone(), p), out);
            }
        }
        Found { topic_keys, city_wide_state }
    }
}

/// Why `scope` of stage `stage` does not split with `k`'s partitions: (message, help).
fn refusal(stage: &str, scope: &StateScope, k: &Keyed) -> Option<(String, String)> {
    let cols = || k.determining.iter().map(|c| format!("`{c}`")).collect::<Vec<_>>().join(", ");
    let not_determined = |state: String| {
        let message = format!(
            "`{stage}` keeps state per {state}, which does not determine its topic's key ({}, `{}`): with several \
             instances, one value's rows can sit on two partitions, and each instance would hold part of its state",
            k.key.describe(),
            k.declared
        );
        let help = if k.determining.is_empty() {
            "no column that determines the topic's key reaches this stage under its name: keep one (a `project` \
             that renames it loses it)"
                .to_owned()
        } else {
            format!(
                "add one of {} to the stage's key (a `dedup`: `within: [{}]`), or key the topic by a column of it",
                cols(),
                k.determining.iter().next().expect("not empty")
            )
        };
        Some((message, help))
    };
    match scope {
        StateScope::Keys(key) => {
            let ok = key.iter().any(|c| k.determining.contains(c));
            if ok { None } else { not_determined(format!("[{}]", key.join(", "))) }
        }
        StateScope::Neighbours { key, pairs } => {
            if !k.determining.contains(key) {
                return not_determined(format!("[{key}] and its neighbours"));
            }
            if *key != k.key.column {
                // neighbours are compared through the topic's key: only its own column maps
                return Some((
                    format!(
                        "`{stage}` reads each `{key}` with its neighbours, and its topic is keyed by {}: whether a \
                         `{key}` and its neighbours share a key cannot be checked",
                        k.key.describe()
                    ),
                    format!("key the topic by `{key}` or a lookup's group of it"),
                ));
            }
            let mut apart: Vec<String> = pairs
                .iter()
                .filter(|(a, b)| k.key.key_of(a) != k.key.key_of(b))
                .map(|(a, b)| format!("{a} ({}) next to {b} ({})", k.key.key_of(a), k.key.key_of(b)))
                .collect();
            if apart.is_empty() {
                return None;
            }
            let n = apart.len();
            apart.truncate(3);
            Some((
                format!(
                    "`{stage}` reads each `{key}` with its neighbours, and the topic's key ({}) puts {n} neighbour \
                     pair(s) on different keys: {}",
                    k.key.describe(),
                    apart.join("; ")
                ),
                "key the topic by a group that holds every segment with its neighbours (`{column: segment_id, \
                 lookup: <road graph>, group: corridor}`)"
                    .to_owned(),
            ))
        }
        StateScope::City(_) => None,
    }
}
