//! What the consumer thread shares with librdkafka's callbacks, which run inside its poll:
//! the assigned partitions and their event time, logs and statistics, and the rebalance
//! callbacks (on revocation: flush, make durable and commit what was read from the partitions
//! that go; on assignment: remove files a dead run wrote beyond the committed offsets).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use citystream_operators::{Gauge, Metrics};

use citystream_schemas::raw::RawBatchBuilder;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::{ClientContext, Offset, Statistics, TopicPartitionList};

use crate::task::{CheckpointAcks, Outputs};

use super::bounded_commit::Earlier;
use super::commit::{CommitError, checkpoint, commit};
use super::held::Held;
use super::queue::FetchQueue;
use super::{Positions, Tp};

/// What the source knows of one assigned partition.
#[derive(Debug, Clone)]
pub(super) struct Part {
    /// The next offset to read (where it started, then after the last message read).
    pub(super) position: i64,
    /// Whether a message was read since the assignment (only then is `position` committed).
    pub(super) read: bool,
    /// The last message, or the assignment.
    pub(super) active_at: Instant,
    /// Paused by watermark alignment: its messages are held (see [`Held`]).
    pub(super) paused: bool,
    /// With the native fetch: the next offset to fetch (past every record appended or held,
    /// and past transaction markers and aborted records) …
    pub(super) fetch_at: i64,
    /// … and the log end (high watermark) the last fetch response gave.
    pub(super) fetched_end: Option<i64>,
    /// The assignment it came with ([`Shared::generation`]): a message fetched before it
    /// belongs to an earlier assignment.
    pub(super) since: u64,
}

/// What the consumer loop and the rebalance callbacks share (one thread: never contended).
pub(super) struct Shared {
    pub(super) name: String,
    /// Topic → output port.
    pub(super) ports: BTreeMap<String, usize>,
    pub(super) builders: Vec<RawBatchBuilder>,
    pub(super) parts: BTreeMap<Tp, Part>,
    /// The messages read from paused partitions, not handed on yet.
    pub(super) held: BTreeMap<Tp, Held>,
    /// Their payload bytes, over all partitions.
    pub(super) held_bytes: usize,
    /// The source's own queue, where assigned partitions' messages are forwarded (the loop
    /// holds it: it must go before the consumer).
    pub(super) queue: Option<std::sync::Weak<FetchQueue>>,
    pub(super) epoch: u64,
    pub(super) outputs: Arc<Outputs>,
    pub(super) acks: CheckpointAcks,
    /// Roots of Parquet sinks whose uncommitted files are removed on assignment.
    pub(super) sink_roots: Vec<PathBuf>,
    pub(super) lag: BTreeMap<Tp, Gauge>,
    pub(super) metrics: Metrics,
    pub(super) error: Option<String>,
    /// Set once the final checkpoint is committed: the revocation on leaving needs no flush.
    pub(super) closing: bool,
    /// When partitions were last assigned (idleness counts from there at the earliest).
    pub(super) assigned_at: Option<Instant>,
    /// Bumped at every assignment: positions remembered before it may refer to files that the
    /// assignment removed, so they are never committed after it.
    pub(super) generation: u64,
    /// For blocking on the pipeline's async parts from this thread.
    pub(super) runtime: tokio::runtime::Handle,
    /// What the consumer thread is handing on and has not sent to every subscriber yet: a
    /// rebalance callback sends it before its checkpoint ([`super::handoff`]).
    pub(super) unsent: std::collections::VecDeque<super::handoff::Unsent>,
}

impl Shared {
    pub(super) fn take_batches(&mut self) -> Vec<(usize, arrow::array::RecordBatch)> {
        self.builders.iter_mut().enumerate().filter(|(_, b)| !b.is_empty()).map(|(p, b)| (p, b.finish())).collect()
    }

    /// Drops what is held for `tp` (it was revoked or assigned again: it is read again from
    /// its committed position).
    pub(super) fn drop_held(&mut self, tp: &Tp) {
        if let Some(h) = self.held.remove(tp) {
            self.held_bytes -= h.bytes;
        }
    }

    /// Every assigned partition's state, copied to be read outside the lock (flushes and
    /// alignment decide on it).
    pub(super) fn parts_snapshot(&self) -> Vec<(Tp, Part)> {
        self.parts.iter().map(|(k, p)| (k.clone(), p.clone())).collect()
    }

    /// The source's fetch queue while the source lives (it holds the queue; the shared state,
    /// reached from librdkafka's threads, only a weak reference).
    pub(super) fn fetch_queue(&self) -> Option<std::sync::Arc<FetchQueue>> {
        self.queue.as_ref().and_then(std::sync::Weak::upgrade)
    }

    /// The consumer lag gauge of partition `tp`.
    pub(super) fn lag_gauge(&mut self, tp: &Tp) -> &Gauge {
        let (metrics, source) = (&self.metrics, &self.name);
        self.lag.entry(tp.clone()).or_insert_with(|| {
            metrics.gauge(
                "citystream_kafka_consumer_lag",
                "Messages between a partition's end and the committed offset (librdkafka's fetch) or the position read (the native fetch).",
                &[("source", source.as_str()), ("topic", tp.0.as_str()), ("partition", tp.1.to_string().as_str())],
            )
        })
    }

    /// The next offset of every partition a message was read from.
    pub(super) fn positions(&self) -> Positions {
        self.parts.iter().filter(|(_, p)| p.read).map(|(k, p)| (k.clone(), p.position)).collect()
    }
}

pub(super) struct Ctx {
    pub(super) shared: Arc<Mutex<Shared>>,
    /// Offsets committed so far, shared with compaction.
    pub(super) commits: crate::sink::compact::CommitLog,
    /// Operator state checkpoints: their manifest is written before offsets are committed.
    pub(super) state: Option<crate::task::StateStore>,
    /// The source fetches natively ([`crate::kafka::fetch`]): librdkafka keeps every assigned
    /// partition paused.
    pub(super) native: bool,
    /// Offset commits wait for their answer for a bounded time; the one with no answer yet.
    pub(super) unanswered: Arc<super::bounded_commit::Unanswered>,
}

pub(super) fn lock(m: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Ctx {
    /// Records a fatal error from a callback; the source stops at its next step and no later
    /// revocation flushes or commits anything.
    pub(super) fn fail(&self, message: String) {
        let mut s = lock(&self.shared);
        s.closing = true;
        s.error.get_or_insert(message);
    }

    /// Before partitions are assigned: decides where each starts — its committed offset, or
    /// the state manifest's when that is further (a crash between the manifest and the
    /// commit) — sets it in the assignment, and removes the files written from there on.
    pub(super) fn assign(&self, consumer: &BaseConsumer<Self>, list: &TopicPartitionList) {
        let committed = match consumer.committed_offsets(list.clone(), Duration::from_secs(30)) {
            Ok(c) => c,
            Err(e) => return self.fail(format!("reading committed offsets: {e}")),
        };
        // where each partition's committed data ends; with nothing committed (a new group, or
        // a first run that died before its first commit) replay starts at the partition's low
        // watermark, so only files from there on will be written again
        let manifest = self.state.as_ref().map(|s| s.positions()).unwrap_or_default();
        // one deadline for all its asks: the callback does not poll (`Unanswered::wait`)
        let settled_by = Instant::now() + self.unanswered.wait();
        let mut starts = Vec::new();
        for e in committed.elements() {
            if let Err(err) = e.error() {
                return self.fail(format!("reading the committed offset of {}/{}: {err}", e.topic(), e.partition()));
            }
            let from = match e.offset() {
                Offset::Offset(o) => o,
                _ => match crate::kafka::watermarks::watermarks(consumer, e.topic(), e.partition(), settled_by) {
                    Ok((low, _)) => low,
                    Err(err) => {
                        return self.fail(format!(
                            "reading the low watermark of {}/{}: {err}",
                            e.topic(),
                            e.partition()
                        ));
                    }
                },
            };
            let from = match manifest.get(&(e.topic().to_owned(), e.partition())) {
                Some(&m) if m > from => {
                    tracing::info!(
                        topic = e.topic(),
                        partition = e.partition(),
                        committed = from,
                        checkpoint = m,
                        "resuming at the state checkpoint, past the committed offset"
                    );
                    m
                }
                Some(&m) if m < from => {
                    // another consumer moved the partition on: our state has not seen those rows
                    tracing::warn!(
                        topic = e.topic(),
                        partition = e.partition(),
                        committed = from,
                        checkpoint = m,
                        "the committed offset is past the state checkpoint (another member of the group \
                         consumed it): the operator state lacks those rows"
                    );
                    from
                }
                _ => from,
            };
            starts.push((e.topic().to_owned(), e.partition(), from));
        }
        for (topic, partition, from) in &starts {
            if let Some(mut e) = list.find_partition(topic, *partition)
                && let Err(err) = e.set_offset(Offset::Offset(*from))
            {
                return self.fail(format!("setting the start of {topic}/{partition}: {err}"));
            }
        }
        let mut s = lock(&self.shared);
        let now = Instant::now();
        s.assigned_at = Some(now);
        s.generation += 1;
        let since = s.generation;
        for (topic, partition, from) in starts {
            for root in s.sink_roots.clone() {
                match crate::sink::parquet::remove_uncommitted(&root, &topic, partition, from) {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(
                        topic,
                        partition,
                        committed = from,
                        removed = n,
                        "removed files written after the last commit"
                    ),
                    Err(err) => {
                        // consuming now would duplicate the rows of the files left behind
                        s.closing = true;
                        s.error.get_or_insert(format!(
                            "cannot remove files written after the last commit of {topic}/{partition} under {}: {err}",
                            root.display()
                        ));
                        return;
                    }
                }
            }
            if let Some(q) = s.fetch_queue()
                && !q.forward(&topic, partition)
            {
                tracing::warn!(
                    topic,
                    partition,
                    "could not forward the partition to the source's queue: polled instead"
                );
            }
            let tp = (topic, partition);
            s.drop_held(&tp);
            s.parts.insert(
                tp,
                Part {
                    position: from,
                    read: false,
                    active_at: now,
                    paused: false,
                    fetch_at: from,
                    fetched_end: None,
                    since,
                },
            );
        }
        tracing::info!(source = s.name, partitions = list.count(), "assigned");
    }
}

impl Ctx {
    /// After partitions are assigned (by the group or by hand): with the native fetch they are
    /// paused in librdkafka, which then fetches none of them (what it fetched before is
    /// dropped by the consumer thread); otherwise they start unpaused, whatever alignment did
    /// before they last left.
    pub(super) fn assigned(&self, consumer: &BaseConsumer<Self>, list: &TopicPartitionList) -> Result<(), String> {
        if self.native {
            return consumer
                .pause(list)
                .map_err(|e| format!("pausing assigned partitions in librdkafka (the source fetches them): {e}"));
        }
        if let Err(e) = consumer.resume(list) {
            tracing::warn!("resuming newly assigned partitions: {e}");
        }
        Ok(())
    }
}

/// Marks the source as closing when it exits, however it exits: dropping the consumer after an
/// error triggers a revocation, which must not flush and commit rows the error left unsettled.
pub(super) struct CloseGuard(pub(super) Arc<Mutex<Shared>>);

impl Drop for CloseGuard {
    fn drop(&mut self) {
        lock(&self.0).closing = true;
    }
}

impl ClientContext for Ctx {
    /// librdkafka's own log lines, into ours.
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => tracing::error!(target: "librdkafka", "{fac} {message}"),
            L::Warning => tracing::warn!(target: "librdkafka", "{fac} {message}"),
            L::Notice | L::Info => tracing::info!(target: "librdkafka", "{fac} {message}"),
            L::Debug => tracing::debug!(target: "librdkafka", "{fac} {message}"),
        }
    }

    fn stats(&self, stats: Statistics) {
        if self.native {
            // librdkafka fetches nothing: the source sets the lag from its own fetches
            return;
        }
        let mut s = lock(&self.shared);
        for (topic, t) in &stats.topics {
            for (p, part) in &t.partitions {
                if *p < 0 || part.consumer_lag < 0 {
                    continue;
                }
                s.lag_gauge(&(topic.clone(), *p)).set(part.consumer_lag as f64);
            }
        }
    }
}

impl ConsumerContext for Ctx {
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance
            && list.count() > 0
            && let Err(e) = self.assigned(consumer, list)
        {
            self.fail(e);
        }
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            self.assign(consumer, list);
            return;
        }
        let Rebalance::Revoke(list) = rebalance else { return };
        if list.count() == 0 || lock(&self.shared).closing {
            return;
        }
        if consumer.assignment_lost() {
            // the group moved on without us (session timeout): another member may already be
            // writing these partitions, so flushing or committing now could duplicate rows.
            // Stop; a restart rejoins and replays from the last commit.
            return self.fail(
                "the consumer group revoked our partitions after a session timeout (assignment lost); \
                 stopping so the replay from the last commit stays exactly-once"
                    .into(),
            );
        }
        // Flush and commit what we own before the partitions go. This callback runs inside the
        // consumer thread's poll: it waits here while the stages and sinks drain the barrier.
        let done = checkpoint(&self.shared);
        let mut s = lock(&self.shared);
        match done {
            Some((epoch, positions)) => {
                match commit(consumer, epoch, &positions, list, Earlier::Wait) {
                    Ok(()) => {
                        tracing::info!(source = s.name, partitions = list.count(), "revoked: flushed and committed")
                    }
                    // the broker is unreachable or does not answer (the group may have expired):
                    // the next owner starts from the last commit that landed and removes what was
                    // written after it, so nothing is lost
                    Err(e @ CommitError::Kafka(_)) => tracing::warn!(
                        source = s.name,
                        "revoked: flushed, but {e}; the next owner replays from the last commit that landed"
                    ),
                    // the state in memory is ahead of every durable record: this process must
                    // stop (a restart resumes from the last manifest) rather than go on with it
                    Err(e @ CommitError::Manifest(_)) => {
                        s.closing = true;
                        s.error.get_or_insert(format!("at a revocation: {e}"));
                    }
                }
            }
            None => {
                s.error.get_or_insert("a sink went away during a revocation checkpoint".into());
            }
        }
        for e in list.elements() {
            let tp = (e.topic().to_owned(), e.partition());
            s.parts.remove(&tp);
            s.drop_held(&tp);
        }
    }
}
