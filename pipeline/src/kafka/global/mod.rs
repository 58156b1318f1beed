//! The global task of `runtime.tasks: partition`: city-wide stages behind one Kafka topic.
//!
//! A stage whose state spans the city (alert storm limits, per-stream rate limits, DP public
//! partitions: `StateScope::City`) cannot run per partition. With per-partition tasks the
//! planner cuts the graph in two (`PipelinePlan::global_plan`): the city-wide stages and every
//! stage after them form the *global task*; the streams they read from the per-partition tasks
//! go through the topic `{group_id}.global` (partition 0).
//!
//! **Exactly once, by committed epochs.** A task's [`publish::GlobalPublisher`] (a sink) keeps
//! the rows of each epoch; at the epoch's barrier it stores them, encoded, beside the task's
//! operator state (`StateStore::save`), and only once the task's state manifest commits that
//! epoch does it publish them: the epoch's row chunks, then a marker with the chunk count and
//! each stream's watermark at the barrier. A task restored from epoch `e` publishes `e` again
//! (its previous owner may have died while publishing it). So every epoch on the topic is a
//! committed one and complete once its marker is there; a fenced process commits nothing, so it
//! publishes nothing new. The global task's [`receive::GlobalReceiver`] (a source) applies an
//! epoch of task `p` once all its chunks and its marker are read, and only if it is newer than
//! the last epoch of `p` it applied (copies and replays are skipped); it keeps, per task, that
//! epoch and the watermarks in its own state, and its manifest records the offset to read on
//! from (the first chunk of an epoch not yet complete).
//!
//! **Event time.** A stream's watermark in the global task is the minimum of that stream's
//! watermark over every task (the partitions of the source's lead topic): a task not heard
//! from yet holds it, as a partition does in one process. A marker also says which streams
//! were idle in the task at the barrier (none of its partitions holds them back: each caught
//! up and silent for `idle_partition_timeout`, or the task has no partition of the topic; the
//! source sets it on the stream's event clock): such a task is left out of that stream's
//! minimum until a marker says otherwise, and a stream idle in every task moves up to the
//! slowest watermark among the tasks where it spoke, as in one process whose partitions all
//! went idle. So the global stages see the rows and
//! watermarks one process would give them, in another interleaving, which event-time stages do
//! not depend on.
//!
//! **Where it runs.** The process that runs task 0 runs the global task too, and hands it on
//! with task 0 (`runtime/tasks.rs`): its state at `{state}/global` moves like a task's.

mod publish;
mod receive;
mod wire;

use std::collections::BTreeMap;

use crate::primitives::EnvString;

pub(crate) use publish::GlobalPublisher;

/// The topic between the tasks and the global task of consumer group `group_id`.
pub(crate) fn topic(group_id: &str) -> String {
    format!("{group_id}.global")
}

/// What a task's publisher needs (built by the planner, never written in YAML).
#[derive(Debug, Clone)]
pub struct PublishConfig {
    /// `bootstrap.servers`.
    pub brokers: EnvString,
    /// The source's client properties that apply to a producer (`security.*`, `sasl.*`, `ssl.*`).
    pub properties: BTreeMap<String, EnvString>,
    /// The topic.
    pub topic: String,
    /// The task (partition number) publishing.
    pub task: i32,
}

/// What the global task's receiver needs (built by the planner, never written in YAML).
#[derive(Debug, Clone)]
pub struct ReceiveConfig {
    /// The tasks' Kafka source: its brokers, properties, topics (the lead topic's partition
    /// count is the number of tasks), checkpoint interval and `stop_when_idle`.
    pub source: crate::kafka::KafkaSourceConfig,
    /// The topic.
    pub topic: String,
    /// The schema of each stream (the source's ports), in port order: a chunk of another
    /// schema is skipped.
    pub schemas: Vec<arrow::datatypes::SchemaRef>,
    /// The name of each stream (`stage.port`), in port order: chunks and markers name their
    /// streams, so a config that adds, removes or reorders them never sends rows to another
    /// stream's port.
    pub names: Vec<String>,
}

/// Creates `topic` (one partition, the broker's default replication and retention) unless it
/// exists, with the client `properties` (security) of the source; true when it created it.
pub(crate) async fn ensure_topic(
    brokers: &EnvString,
    properties: &BTreeMap<String, EnvString>,
    topic: &str,
) -> Result<bool, String> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = crate::kafka::client_config(brokers, properties)
        .create()
        .map_err(|e| format!("creating an admin client: {e}"))?;
    let new = NewTopic::new(topic, 1, TopicReplication::Fixed(-1));
    let results =
        admin.create_topics(&[new], &AdminOptions::new()).await.map_err(|e| format!("creating {topic}: {e}"))?;
    let mut created = false;
    for r in results {
        match r {
            Ok(_) => created = true,
            Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => return Err(format!("creating {t}: {code}")),
        }
    }
    Ok(created)
}

/// The properties of a consumer config that also apply to a producer or an admin client.
pub(crate) fn client_properties(properties: &BTreeMap<String, EnvString>) -> BTreeMap<String, EnvString> {
    properties
        .iter()
        .filter(|(k, _)| ["security.", "sasl.", "ssl.", "client.dns", "socket."].iter().any(|p| k.starts_with(p)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}
