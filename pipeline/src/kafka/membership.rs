//! The process's member of the consumer group under `runtime.tasks: partition`.
//!
//! It joins group `{group_id}.members` subscribed to one topic only, the *lead* topic (the
//! source's topic with the most partitions): each partition of it the group assigns is a task,
//! partition `p` of every topic. The member reads nothing (it pauses what it is assigned); its
//! rebalance callbacks start and stop tasks through the runtime's [`Assignments`]. Kafka's coordinator thus
//! decides which process runs which task, fences members that fell out of the group, and, with
//! `group.instance.id`, gives a restarted pod its tasks back.
//!
//! The tasks' own consumers are assigned by hand and commit their offsets to `group_id`
//! itself, which has no members (a group with members refuses commits from outside them), so
//! `group_id`'s offsets and lag read as before.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::{ClientContext, TopicPartitionList};

use super::rebootstrap::Rebootstrap;
use super::{KafkaSourceConfig, client_config};
use crate::task::{Assignments, Membership};

/// The consumer group the members of `cfg`'s group join.
fn members_group(cfg: &KafkaSourceConfig) -> String {
    format!("{}.members", cfg.group_id.as_str())
}

/// The process's member of the group sharing the tasks of a Kafka source.
pub(crate) struct GroupMember(pub(crate) KafkaSourceConfig);

/// The topic whose partitions are the tasks of source `cfg`: the one with the most partitions
/// (the first in event-kind order among equals), and how many it has.
pub(crate) fn lead_topic(cfg: &KafkaSourceConfig) -> Result<(String, i32), String> {
    let probe: BaseConsumer = client_config(&cfg.brokers, &cfg.properties)
        .create()
        .map_err(|e| format!("creating a metadata client: {e}"))?;
    let mut lead: Option<(String, i32)> = None;
    for kind in citystream_schemas::EventKind::ALL {
        let Some(topic) = cfg.topic(kind) else { continue };
        let n = super::source::partition_count(&probe, topic)?;
        if lead.as_ref().is_none_or(|(_, m)| n > *m) {
            lead = Some((topic.to_owned(), n));
        }
    }
    lead.ok_or_else(|| "the source reads no topic".into())
}

impl Membership for GroupMember {
    fn run(self: Box<Self>, tasks: Arc<dyn Assignments>, leave: Box<dyn Fn() -> bool + Send>) -> Result<(), String> {
        let (lead, count) = lead_topic(&self.0)?;
        tracing::info!(lead, tasks = count, "one task per partition of the lead topic");
        run_member(&self.0, &lead, tasks, leave)
    }

    fn session_timeout(&self) -> Duration {
        let ms = self.0.properties.get("session.timeout.ms").and_then(|v| v.as_str().parse::<u64>().ok());
        // librdkafka's default (the broker's with KIP-848)
        Duration::from_millis(ms.unwrap_or(45_000))
    }
}

struct MemberCtx {
    tasks: Arc<dyn Assignments>,
}

fn partitions(list: &TopicPartitionList) -> Vec<i32> {
    let mut ps: Vec<i32> = list.elements().iter().map(|e| e.partition()).collect();
    ps.sort_unstable();
    ps
}

impl ClientContext for MemberCtx {}

impl ConsumerContext for MemberCtx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(list) = rebalance else { return };
        if list.count() == 0 {
            return;
        }
        if consumer.assignment_lost() {
            self.tasks.lost(&partitions(list));
        } else {
            self.tasks.revoked(&partitions(list));
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Assign(list) = rebalance else { return };
        if list.count() == 0 {
            return;
        }
        // the member only holds the partitions: the tasks' own consumers read them
        if let Err(e) = consumer.pause(list) {
            tracing::warn!("pausing the member's partitions: {e}");
        }
        self.tasks.assigned(&partitions(list));
    }
}

/// Joins the group on `lead` and serves its rebalances until `leave` says so, then gives its
/// tasks back (revoked: checkpointed and stopped) and leaves.
fn run_member(
    cfg: &KafkaSourceConfig,
    lead: &str,
    tasks: Arc<dyn Assignments>,
    leave: Box<dyn Fn() -> bool + Send>,
) -> Result<(), String> {
    let mut cc = client_config(&cfg.brokers, &cfg.properties);
    let kip848 = cfg.properties.get("group.protocol").is_some_and(|p| p.as_str() == "consumer");
    cc.set("group.id", members_group(cfg))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "latest")
        // it fetches nothing it keeps: the smallest prefetch
        .set("queued.max.messages.kbytes", "64");
    if !kip848 && !cfg.properties.contains_key("partition.assignment.strategy") {
        // a revocation stops only the tasks that move
        cc.set("partition.assignment.strategy", "cooperative-sticky");
    }
    if !kip848 && !cfg.properties.contains_key("heartbeat.interval.ms") {
        // a member learns of a rebalance at its next heartbeat, and a cooperative one takes
        // two: librdkafka's 3 s default kept a joining process without tasks for about 6 s
        cc.set("heartbeat.interval.ms", "500");
    }
    let consumer: BaseConsumer<MemberCtx> =
        cc.create_with_context(MemberCtx { tasks }).map_err(|e| format!("creating the group member: {e}"))?;
    consumer.subscribe(&[lead]).map_err(|e| format!("subscribing the group member to {lead}: {e}"))?;
    tracing::info!(
        group = members_group(cfg),
        lead,
        "joined the group: its partitions of the lead topic are our tasks"
    );
    let mut last_warning = Instant::now() - Duration::from_secs(60);
    // after a KRaft broker was fenced, the member would miss its heartbeats for good otherwise
    let mut watch = Rebootstrap::new("the group member");
    while !leave() {
        watch.keep_known(consumer.client().native_ptr());
        match consumer.poll(Duration::from_millis(100)) {
            None | Some(Ok(_)) => {}
            Some(Err(e @ rdkafka::error::KafkaError::MessageConsumptionFatal(_))) => {
                return Err(format!("the group member failed for good: {e}"));
            }
            Some(Err(e)) if last_warning.elapsed() >= Duration::from_secs(10) => {
                last_warning = Instant::now();
                tracing::warn!("group member: {e}");
            }
            Some(Err(_)) => {}
        }
    }
    // give the tasks back through the revocation callback, served by this poll: each
    // checkpoints and stops before the group may hand its partition to another process
    consumer.unsubscribe();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(60) && consumer.assignment().is_ok_and(|a| a.count() > 0) {
        let _ = consumer.poll(Duration::from_millis(100));
    }
    // then leave, bounded: librdkafka's destroy can hang (known race)
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(consumer);
        let _ = tx.send(());
    });
    if rx.recv_timeout(Duration::from_secs(10)).is_err() {
        tracing::warn!("leaving the group took longer than 10 s; leaving the member behind");
    }
    Ok(())
}
