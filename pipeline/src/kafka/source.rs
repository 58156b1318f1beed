//! The Kafka source.
//!
//! It runs on a thread of its own: a `BaseConsumer` polled in a loop appends messages to raw
//! batches without a lock or an `await` per message, and the rebalance callbacks — which run
//! inside that poll — may wait on the broker and the disk without blocking an async worker.
//!
//! Delivery: offsets are committed only after every sink has made durable everything read
//! before a checkpoint barrier. Sinks name files after the source positions they hold, and when
//! a partition is assigned, files at or beyond its committed offset — written after the last
//! commit by a run that then died — are removed before consumption starts, so the replay does
//! not duplicate them. On revocation, everything read from the partitions that go is flushed,
//! made durable and committed before the callback returns. With operator state checkpoints
//! (`runtime.state_dir`) the state manifest is written before each commit, and a partition
//! resumes at the manifest's offset when that is further than the committed one.
//!
//! Event time: each topic's watermark is the minimum, over the partitions that hold it back, of
//! their watermarks on the topic's [`EventClock`] (published by `decode`, which reads the event
//! times). Every assigned partition holds it back — also one that has not delivered anything
//! yet — until it is caught up with its log end *and* silent for `idle_partition_timeout`. While
//! catching up, a partition whose event time runs more than `max_drift` ahead of the slowest is
//! paused, and resumed once the slowest is within half of that ([`Alignment`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use citystream_operators::event_time::EventClock;
use citystream_operators::{Barrier, Gauge, Message, Metrics};
use citystream_schemas::EventKind;
use citystream_schemas::raw::RawBatchBuilder;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::Message as _;
use rdkafka::{ClientContext, Offset, Statistics, TopicPartitionList};
use tokio::sync::watch;

use super::{KafkaSourceConfig, client_config};
use crate::task::{CheckpointAcks, Outputs, PipelineError};

/// A topic partition.
type Tp = (String, i32);

/// Next offset to read per (topic, partition).
type Positions = BTreeMap<Tp, i64>;

/// What the source knows of one assigned partition.
#[derive(Debug, Clone)]
struct Part {
    /// The next offset to read (where it started, then after the last message read).
    position: i64,
    /// Whether a message was read since the assignment (only then is `position` committed).
    read: bool,
    /// The last message, or the assignment.
    active_at: Instant,
    /// Paused by watermark alignment.
    paused: bool,
    /// The log end asked of the broker (when librdkafka had none cached) and when.
    queried_end: Option<(i64, Instant)>,
}

/// What the consumer loop and the rebalance callbacks share (one thread: never contended).
struct Shared {
    name: String,
    /// Topic → output port.
    ports: BTreeMap<String, usize>,
    builders: Vec<RawBatchBuilder>,
    parts: BTreeMap<Tp, Part>,
    epoch: u64,
    outputs: Arc<Outputs>,
    acks: CheckpointAcks,
    /// Roots of Parquet sinks whose uncommitted files are removed on assignment.
    sink_roots: Vec<PathBuf>,
    lag: BTreeMap<Tp, Gauge>,
    metrics: Metrics,
    error: Option<String>,
    /// Set once the final checkpoint is committed: the revocation on leaving needs no flush.
    closing: bool,
    /// When partitions were last assigned (idleness counts from there at the earliest).
    assigned_at: Option<Instant>,
    /// Bumped at every assignment: positions remembered before it may refer to files that the
    /// assignment removed, so they are never committed after it.
    generation: u64,
    /// For blocking on the pipeline's async parts from this thread.
    runtime: tokio::runtime::Handle,
}

impl Shared {
    fn take_batches(&mut self) -> Vec<(usize, arrow::array::RecordBatch)> {
        self.builders.iter_mut().enumerate().filter(|(_, b)| !b.is_empty()).map(|(p, b)| (p, b.finish())).collect()
    }

    /// The next offset of every partition a message was read from.
    fn positions(&self) -> Positions {
        self.parts.iter().filter(|(_, p)| p.read).map(|(k, p)| (k.clone(), p.position)).collect()
    }
}

struct Ctx {
    shared: Arc<Mutex<Shared>>,
    /// Offsets committed so far, shared with compaction.
    commits: crate::sink::compact::CommitLog,
    /// Operator state checkpoints: their manifest is written before offsets are committed.
    state: Option<crate::task::StateStore>,
}

fn lock(m: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Ctx {
    /// Records a fatal error from a callback; the source stops at its next step and no later
    /// revocation flushes or commits anything.
    fn fail(&self, message: String) {
        let mut s = lock(&self.shared);
        s.closing = true;
        s.error.get_or_insert(message);
    }

    /// Before partitions are assigned: decides where each starts — its committed offset, or
    /// the state manifest's when that is further (a crash between the manifest and the
    /// commit) — sets it in the assignment, and removes the files written from there on.
    fn assign(&self, consumer: &BaseConsumer<Self>, list: &TopicPartitionList) {
        let committed = match consumer.committed_offsets(list.clone(), Duration::from_secs(30)) {
            Ok(c) => c,
            Err(e) => return self.fail(format!("reading committed offsets: {e}")),
        };
        // where each partition's committed data ends; with nothing committed (a new group, or
        // a first run that died before its first commit) replay starts at the partition's low
        // watermark, so only files from there on will be written again
        let manifest = self.state.as_ref().map(|s| s.positions()).unwrap_or_default();
        let mut starts = Vec::new();
        for e in committed.elements() {
            if let Err(err) = e.error() {
                return self.fail(format!("reading the committed offset of {}/{}: {err}", e.topic(), e.partition()));
            }
            let from = match e.offset() {
                Offset::Offset(o) => o,
                _ => match consumer.fetch_watermarks(e.topic(), e.partition(), Duration::from_secs(30)) {
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
            s.parts.insert(
                (topic, partition),
                Part { position: from, read: false, active_at: now, paused: false, queried_end: None },
            );
        }
        tracing::info!(source = s.name, partitions = list.count(), "assigned");
    }
}

/// Marks the source as closing when it exits, however it exits: dropping the consumer after an
/// error triggers a revocation, which must not flush and commit rows the error left unsettled.
struct CloseGuard(Arc<Mutex<Shared>>);

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
        let mut s = lock(&self.shared);
        for (topic, t) in &stats.topics {
            for (p, part) in &t.partitions {
                if *p < 0 || part.consumer_lag < 0 {
                    continue;
                }
                let key = (topic.clone(), *p);
                let metrics = s.metrics.clone();
                let source = s.name.clone();
                let g = s.lag.entry(key).or_insert_with(|| {
                    metrics.gauge(
                        "citystream_kafka_consumer_lag",
                        "Messages between a partition's end and the committed offset.",
                        &[
                            ("source", source.as_str()),
                            ("topic", topic.as_str()),
                            ("partition", p.to_string().as_str()),
                        ],
                    )
                });
                g.set(part.consumer_lag as f64);
            }
        }
    }
}

/// Hands on what was read, sends a barrier, waits until every sink made it durable, and
/// returns the positions to commit. Blocks the calling (consumer) thread.
fn checkpoint(shared: &Arc<Mutex<Shared>>) -> Option<(u64, Positions)> {
    let (batches, epoch, positions, outputs, mut acks, rt) = {
        let mut s = lock(shared);
        s.epoch += 1;
        (s.take_batches(), s.epoch, s.positions(), s.outputs.clone(), s.acks.clone(), s.runtime.clone())
    };
    for (p, b) in batches {
        outputs.blocking_send(p, Message::Batch(b)).ok()?;
    }
    outputs.blocking_broadcast(Message::Barrier(Barrier { epoch })).ok()?;
    rt.block_on(acks.wait(epoch)).then_some((epoch, positions))
}

/// Why a checkpoint could not be committed.
#[derive(Debug, thiserror::Error)]
enum CommitError {
    /// The state manifest could not be written: the operators' state in memory is ahead of
    /// every durable record.
    #[error("writing the state manifest: {0}")]
    Manifest(String),
    /// The broker did not take the offsets (the manifest, if any, is written).
    #[error("{0}")]
    Kafka(String),
}

/// Commits checkpoint `epoch`: records it in the state manifest (all `positions`), then
/// commits `positions` to Kafka, restricted to `owned` (never a partition another member now
/// owns).
fn commit(
    consumer: &BaseConsumer<Ctx>,
    epoch: u64,
    positions: &Positions,
    owned: &TopicPartitionList,
) -> Result<(), CommitError> {
    let log = consumer.context().commits.clone();
    if let Some(state) = &consumer.context().state {
        state.commit(epoch, positions).map_err(CommitError::Manifest)?;
    }
    let mut tpl = TopicPartitionList::new();
    for ((topic, p), next) in positions {
        if owned.find_partition(topic, *p).is_some() {
            tpl.add_partition_offset(topic, *p, Offset::Offset(*next))
                .map_err(|e| CommitError::Kafka(e.to_string()))?;
        }
    }
    if tpl.count() > 0 {
        consumer.commit(&tpl, CommitMode::Sync).map_err(|e| CommitError::Kafka(format!("committing offsets: {e}")))?;
    }
    // what compaction may now merge
    let mut l = log.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    for e in tpl.elements() {
        if let Offset::Offset(o) = e.offset() {
            l.offsets.insert((e.topic().to_owned(), e.partition()), o);
        }
    }
    l.epoch = l.epoch.max(epoch);
    Ok(())
}

impl ConsumerContext for Ctx {
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        // a partition assigned again starts unpaused, whatever alignment did before it left
        if let Rebalance::Assign(list) = rebalance
            && list.count() > 0
            && let Err(e) = consumer.resume(list)
        {
            tracing::warn!("resuming newly assigned partitions: {e}");
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
                match commit(consumer, epoch, &positions, list) {
                    Ok(()) => {
                        tracing::info!(source = s.name, partitions = list.count(), "revoked: flushed and committed")
                    }
                    // the broker is unreachable (the group may have expired): the next owner starts
                    // from the last commit and removes what was written after it, so nothing is lost
                    Err(e @ CommitError::Kafka(_)) => tracing::warn!(
                        source = s.name,
                        "revoked: flushed, but {e}; the next owner replays from the last commit"
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
            s.parts.remove(&(e.topic().to_owned(), e.partition()));
        }
    }
}

/// What the source shares with the sinks' files for exactly-once recovery.
pub(crate) struct Recovery {
    /// Operator state checkpoints, when configured.
    pub(crate) state: Option<crate::task::StateStore>,
    /// Roots of Parquet sinks whose uncommitted files are removed on assignment.
    pub(crate) sink_roots: Vec<PathBuf>,
    /// Offsets committed so far, shared with compaction.
    pub(crate) commits: crate::sink::compact::CommitLog,
}

/// One partition as watermark alignment sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AlignInput {
    /// Its watermark on the event clock (`None`: no valid event seen yet).
    pub watermark: Option<i64>,
    /// Whether it holds the stream's watermark back (assigned, and not caught up and idle).
    pub holding: bool,
    /// Whether it has messages left to read (position below its log end).
    pub backlog: bool,
    /// Whether it is paused now.
    pub paused: bool,
}

/// Watermark alignment (Flink's FLIP-182, on rdkafka's pause/resume): while partitions catch
/// up, one whose event time runs more than `max_drift` ahead of the slowest partition that
/// holds the watermark back is paused, so windows and deduplication do not fill with the
/// events of the fast ones; it resumes once the slowest is within `max_drift / 2` of it. A
/// partition with a backlog that has not spoken yet counts as the slowest of all. Only
/// partitions with a backlog are paused: a caught-up one has nothing to read.
#[derive(Debug, Clone, Copy)]
pub struct Alignment {
    /// The largest lead in event time, ms.
    pub max_drift_ms: i64,
}

impl Alignment {
    /// Which of `parts` to pause and which to resume (indices into `parts`).
    pub fn decide(&self, parts: &[AlignInput]) -> (Vec<usize>, Vec<usize>) {
        // a caught-up partition that has not spoken has nothing to read: waiting for it
        // would not make it speak sooner
        let slowest = parts
            .iter()
            .filter(|p| p.holding && (p.backlog || p.watermark.is_some()))
            .map(|p| p.watermark.unwrap_or(i64::MIN))
            .min();
        let (mut pause, mut resume) = (Vec::new(), Vec::new());
        for (i, p) in parts.iter().enumerate() {
            let lead = match (slowest, p.watermark) {
                (Some(s), Some(w)) => w.saturating_sub(s),
                _ => 0,
            };
            if !p.paused && p.backlog && lead > self.max_drift_ms {
                pause.push(i);
            } else if p.paused && (!p.backlog || lead <= self.max_drift_ms / 2) {
                resume.push(i);
            }
        }
        (pause, resume)
    }
}

/// The consumer thread's settings and handles.
struct Loop {
    name: String,
    cfg: KafkaSourceConfig,
    consumer: BaseConsumer<Ctx>,
    shared: Arc<Mutex<Shared>>,
    clocks: Vec<Option<EventClock>>,
    acks: CheckpointAcks,
    stop: watch::Receiver<bool>,
    events: Vec<citystream_operators::Counter>,
    bytes: Vec<citystream_operators::Counter>,
    paused: Gauge,
}

/// Runs the Kafka source until stopped (or idle for `stop_when_idle`), on a thread of its own.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run_kafka_source(
    name: &str,
    cfg: KafkaSourceConfig,
    outputs: Outputs,
    acks: CheckpointAcks,
    recovery: Recovery,
    clocks: Vec<Option<EventClock>>,
    stop: watch::Receiver<bool>,
    metrics: &Metrics,
) -> Result<u64, PipelineError> {
    let err = |message: String| PipelineError::Source { source_name: name.to_owned(), message };
    let Recovery { sink_roots, commits, state } = recovery;
    let ports: BTreeMap<String, usize> =
        EventKind::ALL.iter().enumerate().filter_map(|(p, k)| cfg.topic(*k).map(|t| (t.to_owned(), p))).collect();
    let batch_rows = cfg.batch_rows.get();
    let shared = Arc::new(Mutex::new(Shared {
        name: name.to_owned(),
        ports: ports.clone(),
        builders: EventKind::ALL.iter().map(|_| RawBatchBuilder::with_capacity(batch_rows, batch_rows * 256)).collect(),
        parts: BTreeMap::new(),
        // epochs go on from the restored checkpoint: derived files are named after them
        epoch: state.as_ref().map_or(0, |s| s.epoch()),
        outputs: Arc::new(outputs),
        acks: acks.clone(),
        sink_roots,
        lag: BTreeMap::new(),
        metrics: metrics.clone(),
        error: None,
        closing: false,
        assigned_at: None,
        generation: 0,
        runtime: tokio::runtime::Handle::current(),
    }));
    let mut cc = client_config(&cfg.brokers, &cfg.properties);
    cc.set("group.id", cfg.group_id.as_str())
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("statistics.interval.ms", "1000")
        // librdkafka prefetches up to 64 MiB per partition by default: bound memory
        .set("queued.max.messages.kbytes", "16384");
    for (k, v) in &cfg.properties {
        cc.set(k, v.as_str());
    }
    let consumer: BaseConsumer<Ctx> = cc
        .create_with_context(Ctx { shared: shared.clone(), commits, state })
        .map_err(|e| err(format!("creating the consumer: {e}")))?;
    let topics: Vec<&str> = ports.keys().map(String::as_str).collect();
    consumer.subscribe(&topics).map_err(|e| err(format!("subscribing to {topics:?}: {e}")))?;
    tracing::info!(source = name, ?topics, group = cfg.group_id.as_str(), "consuming");
    let counter = |metric: &str, help: &'static str, k: &EventKind| {
        metrics.counter(metric, help, &[("source", name), ("stream", k.as_str())])
    };
    let l = Loop {
        name: name.to_owned(),
        events: EventKind::ALL
            .iter()
            .map(|k| counter("citystream_source_events_total", "Messages read by a source.", k))
            .collect(),
        bytes: EventKind::ALL
            .iter()
            .map(|k| counter("citystream_source_bytes_total", "Payload bytes read by a source.", k))
            .collect(),
        paused: metrics.gauge(
            "citystream_kafka_partitions_paused",
            "Partitions paused by watermark alignment (running ahead in event time).",
            &[("source", name)],
        ),
        cfg,
        consumer,
        shared,
        clocks,
        acks,
        stop,
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("kafka-{name}"))
        .spawn(move || {
            let _ = tx.send(l.run());
        })
        .map_err(|e| err(format!("starting the consumer thread: {e}")))?;
    rx.await.map_err(|_| err("the consumer thread died".into()))?
}

impl Loop {
    fn err(&self, message: String) -> PipelineError {
        PipelineError::Source { source_name: self.name.clone(), message }
    }

    fn run(self) -> Result<u64, PipelineError> {
        // dropped before the consumer: a revocation while leaving must not flush or commit
        let guard = CloseGuard(self.shared.clone());
        let result = self.consume();
        drop(guard);
        let consumer = self.consumer;
        // leave the group promptly, bounded: librdkafka's destroy can hang (known race)
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            consumer.unsubscribe();
            drop(consumer);
            let _ = tx.send(());
        });
        if rx.recv_timeout(Duration::from_secs(10)).is_err() {
            tracing::warn!(source = self.name, "closing the consumer took longer than 10 s; leaving it behind");
        }
        result
    }

    fn consume(&self) -> Result<u64, PipelineError> {
        let batch_rows = self.cfg.batch_rows.get();
        let batch_wait = self.cfg.batch_wait.to_std().max(Duration::from_millis(1));
        let checkpoint_every = self.cfg.checkpoint_interval.to_std().max(Duration::from_millis(10));
        let mut next_flush = Instant::now() + batch_wait;
        let mut next_checkpoint = Instant::now() + checkpoint_every;
        let mut last_message = Instant::now();
        let mut last_wm: Vec<i64> = vec![i64::MIN; self.clocks.len()];
        // (epoch, generation, positions) of the newest checkpoint not yet committed
        let mut pending_commit: Option<(u64, u64, Positions)> = None;
        let mut total = 0u64;
        loop {
            if let Some(e) = lock(&self.shared).error.take() {
                return Err(self.err(e));
            }
            if *self.stop.borrow() {
                break;
            }
            let now = Instant::now();
            if now >= next_checkpoint {
                next_checkpoint = now + checkpoint_every;
                if self.periodic_checkpoint(&mut pending_commit)? {
                    // time spent waiting on a busy pipeline is not idleness
                    last_message = Instant::now();
                }
                if let Some(idle) = self.cfg.stop_when_idle {
                    let (assigned_at, paused) = {
                        let s = lock(&self.shared);
                        (s.assigned_at, s.parts.values().any(|p| p.paused))
                    };
                    // a paused partition still has messages to read: waiting is not idleness
                    if paused {
                        last_message = Instant::now();
                    }
                    if assigned_at.map(|a| a.max(last_message)).is_some_and(|q| q.elapsed() >= idle.to_std()) {
                        tracing::info!(source = self.name, "no message for {idle}: ending");
                        break;
                    }
                }
            }
            if now >= next_flush {
                next_flush = now + batch_wait;
                if self.flush(&mut last_wm)? {
                    last_message = Instant::now();
                }
            }
            let wait = next_flush.min(next_checkpoint).saturating_duration_since(Instant::now());
            let Some(msg) = self.consumer.poll(wait.min(Duration::from_millis(100))) else { continue };
            let msg = match msg {
                Ok(m) => m,
                Err(e) => {
                    // transient broker errors: librdkafka reconnects by itself
                    tracing::warn!(source = self.name, "kafka: {e}");
                    continue;
                }
            };
            last_message = Instant::now();
            let full = {
                let mut s = lock(&self.shared);
                if let Some(e) = s.error.take() {
                    // a callback inside this poll failed (e.g. cleanup on assignment)
                    return Err(self.err(e));
                }
                let topic = msg.topic();
                let Some(&port) = s.ports.get(topic) else { continue };
                let payload = msg.payload().unwrap_or_default();
                // when the message reached Kafka (its log time), unless that lies ahead of our
                // clock: part of the topic's content, so the event-time bounds checked against
                // it give the same verdict on every replay
                let now = chrono::Utc::now().timestamp_millis();
                let arrived = msg.timestamp().to_millis().map_or(now, |t| t.min(now));
                s.builders[port].append(topic, msg.partition(), msg.offset(), arrived, payload);
                self.events[port].inc();
                self.bytes[port].inc_by(payload.len() as u64);
                total += 1;
                if let Some(p) = s.parts.get_mut(&(topic.to_owned(), msg.partition())) {
                    p.position = msg.offset() + 1;
                    p.read = true;
                    p.active_at = last_message;
                }
                (s.builders[port].len() >= batch_rows).then(|| (port, s.builders[port].finish(), s.outputs.clone()))
            };
            if let Some((port, b, outputs)) = full {
                outputs.blocking_send(port, Message::Batch(b))?;
                last_message = Instant::now();
            }
        }
        // final checkpoint: hand on the rest, wait until it is durable, commit, then end
        let Some((epoch, positions)) = checkpoint(&self.shared) else { return Err(PipelineError::Disconnected) };
        // the data is durable; commit, retrying while the broker is unreachable (bounded)
        let mut attempt = 0;
        loop {
            match self
                .owned()
                .and_then(|o| commit(&self.consumer, epoch, &positions, &o).map_err(|e| self.err(e.to_string())))
            {
                Ok(()) => break,
                Err(e) if attempt < 30 => {
                    attempt += 1;
                    tracing::warn!(source = self.name, "final commit: {e}; retrying in 2 s ({attempt}/30)");
                    std::thread::sleep(Duration::from_secs(2));
                }
                Err(e) => return Err(e),
            }
        }
        let outputs = {
            let mut s = lock(&self.shared);
            s.closing = true;
            s.outputs.clone()
        };
        outputs.blocking_broadcast(Message::End)?;
        Ok(total)
    }

    /// Commits the previous checkpoint if every sink acknowledged it, then starts the next.
    /// Returns whether it handed on data.
    fn periodic_checkpoint(&self, pending: &mut Option<(u64, u64, Positions)>) -> Result<bool, PipelineError> {
        let generation = lock(&self.shared).generation;
        if let Some((epoch, gen_at, positions)) = pending.take() {
            if gen_at != generation {
                // a rebalance happened since: its own checkpoint covered these rows
            } else if self.acks.acked() >= epoch {
                if let Err(e) = self
                    .owned()
                    .and_then(|o| commit(&self.consumer, epoch, &positions, &o).map_err(|e| self.err(e.to_string())))
                {
                    // an unreachable broker: keep the positions and try again next time
                    tracing::warn!(source = self.name, "{e}; retrying at the next checkpoint");
                    *pending = Some((epoch, gen_at, positions));
                }
            } else {
                *pending = Some((epoch, gen_at, positions));
            }
        }
        if pending.is_some() {
            return Ok(false);
        }
        let (batches, epoch, positions, generation, outputs) = {
            let mut s = lock(&self.shared);
            s.epoch += 1;
            (s.take_batches(), s.epoch, s.positions(), s.generation, s.outputs.clone())
        };
        let had_data = !batches.is_empty();
        for (p, b) in batches {
            outputs.blocking_send(p, Message::Batch(b))?;
        }
        outputs.blocking_broadcast(Message::Barrier(Barrier { epoch }))?;
        *pending = Some((epoch, generation, positions));
        Ok(had_data)
    }

    /// Hands on partial batches, emits each topic's watermark where it moved, and pauses or
    /// resumes partitions for alignment. Returns whether it handed on data.
    fn flush(&self, last_wm: &mut [i64]) -> Result<bool, PipelineError> {
        let idle_after = self.cfg.idle_partition_timeout.to_std();
        let (batches, outputs, parts, ports) = {
            let mut s = lock(&self.shared);
            let parts: Vec<(Tp, Part)> = s.parts.iter().map(|(k, p)| (k.clone(), p.clone())).collect();
            (s.take_batches(), s.outputs.clone(), parts, s.ports.clone())
        };
        let had_data = !batches.is_empty();
        for (p, b) in batches {
            outputs.blocking_send(p, Message::Batch(b))?;
        }
        // per partition: its watermark, whether it holds the stream back, its backlog
        let view: Vec<AlignInput> = parts
            .iter()
            .map(|((topic, partition), p)| {
                let backlog = self.log_end(topic, *partition, p).is_none_or(|end| p.position < end);
                let watermark = ports.get(topic).and_then(|&port| self.clocks[port].as_ref()?.watermark(*partition));
                let idle = !backlog && p.active_at.elapsed() >= idle_after;
                AlignInput { watermark, holding: !idle, backlog, paused: p.paused }
            })
            .collect();
        for (topic, &port) in &ports {
            if self.clocks[port].is_none() {
                continue;
            }
            let holding: Vec<(i32, Option<i64>)> = parts
                .iter()
                .zip(&view)
                .filter(|((tp, _), v)| &tp.0 == topic && v.holding)
                .map(|((tp, _), v)| (tp.1, v.watermark))
                .collect();
            // no watermark while a partition that holds it back has not spoken, or none holds it
            let silent: Vec<i32> = holding.iter().filter(|(_, w)| w.is_none()).map(|(p, _)| *p).collect();
            let wm = if silent.is_empty() { holding.iter().filter_map(|(_, w)| *w).min() } else { None };
            tracing::trace!(source = self.name, topic, ?holding, ?silent, "watermark");
            if let Some(wm) = wm.filter(|w| *w > last_wm[port]) {
                last_wm[port] = wm;
                outputs.blocking_send(port, Message::Watermark(wm))?;
            }
        }
        if let Some(drift) = self.cfg.max_drift {
            self.align(&parts, &view, Alignment { max_drift_ms: drift.as_millis_i64() })?;
        }
        Ok(had_data)
    }

    fn align(&self, parts: &[(Tp, Part)], view: &[AlignInput], alignment: Alignment) -> Result<(), PipelineError> {
        let (pause, resume) = alignment.decide(view);
        if pause.is_empty() && resume.is_empty() {
            return Ok(());
        }
        let list = |idx: &[usize]| {
            let mut tpl = TopicPartitionList::new();
            for &i in idx {
                tpl.add_partition(&parts[i].0.0, parts[i].0.1);
            }
            tpl
        };
        if !pause.is_empty() {
            self.consumer.pause(&list(&pause)).map_err(|e| self.err(format!("pausing partitions: {e}")))?;
        }
        if !resume.is_empty() {
            self.consumer.resume(&list(&resume)).map_err(|e| self.err(format!("resuming partitions: {e}")))?;
        }
        let mut s = lock(&self.shared);
        for (&i, paused) in pause.iter().map(|i| (i, true)).chain(resume.iter().map(|i| (i, false))) {
            if let Some(p) = s.parts.get_mut(&parts[i].0) {
                p.paused = paused;
            }
        }
        let n = s.parts.values().filter(|p| p.paused).count();
        drop(s);
        self.paused.set(n as f64);
        let slowest = view.iter().filter(|v| v.holding).filter_map(|v| v.watermark).min();
        tracing::info!(
            source = self.name,
            paused = pause.len(),
            resumed = resume.len(),
            now_paused = n,
            slowest = slowest.map(crate::simulator::rfc3339),
            "watermark alignment"
        );
        Ok(())
    }

    /// The partition's log end: as librdkafka last saw it, or — when it has none (a partition
    /// it has not fetched from yet) — asked of the broker, at most once a second.
    fn log_end(&self, topic: &str, partition: i32, part: &Part) -> Option<i64> {
        if let Some(end) = self.cached_log_end(topic, partition) {
            return Some(end);
        }
        if let Some((end, at)) = part.queried_end
            && at.elapsed() < Duration::from_secs(1)
        {
            return Some(end);
        }
        let end =
            self.consumer.fetch_watermarks(topic, partition, Duration::from_secs(5)).ok().map(|(_, high)| high)?;
        if let Some(p) = lock(&self.shared).parts.get_mut(&(topic.to_owned(), partition)) {
            p.queried_end = Some((end, Instant::now()));
        }
        Some(end)
    }

    /// The partition's log end as librdkafka last saw it (no request to the broker).
    fn cached_log_end(&self, topic: &str, partition: i32) -> Option<i64> {
        let topic = std::ffi::CString::new(topic).ok()?;
        let (mut low, mut high) = (-1i64, -1i64);
        // SAFETY: the client pointer is valid while the consumer lives; librdkafka reads the
        // NUL-terminated topic name and writes the two offsets we own.
        let rc = unsafe {
            rdkafka::bindings::rd_kafka_get_watermark_offsets(
                self.consumer.client().native_ptr(),
                topic.as_ptr(),
                partition,
                &mut low,
                &mut high,
            )
        };
        (rc == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0).then_some(high)
    }

    fn owned(&self) -> Result<TopicPartitionList, PipelineError> {
        self.consumer.assignment().map_err(|e| self.err(format!("reading the assignment: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3_600_000;

    fn part(wm: Option<i64>, backlog: bool, paused: bool) -> AlignInput {
        AlignInput { watermark: wm, holding: true, backlog, paused }
    }

    #[test]
    fn a_partition_an_hour_ahead_is_paused_and_resumed_when_the_others_catch_up() {
        let a = Alignment { max_drift_ms: 10 * 60_000 };
        // partition 1 runs an hour ahead of partitions 0 and 2
        let mut parts = vec![part(Some(0), true, false), part(Some(H), true, false), part(Some(60_000), true, false)];
        let (pause, resume) = a.decide(&parts);
        assert_eq!((pause, resume), (vec![1], vec![]));
        parts[1].paused = true;
        // the others move up, but not yet within half the drift
        parts[0].watermark = Some(H - 6 * 60_000);
        parts[2].watermark = Some(H - 5 * 60_000);
        assert_eq!(a.decide(&parts), (vec![], vec![]), "still 6 minutes behind: stays paused");
        parts[0].watermark = Some(H - 4 * 60_000);
        assert_eq!(a.decide(&parts), (vec![], vec![1]), "within half the drift: resumed");
    }

    #[test]
    fn a_silent_partition_holds_the_others_and_a_caught_up_one_is_never_paused() {
        let a = Alignment { max_drift_ms: 60_000 };
        // partition 0 has not spoken yet: the others wait for it
        let parts = [part(None, true, false), part(Some(H), true, false), part(Some(2 * H), false, false)];
        assert_eq!(a.decide(&parts), (vec![1], vec![]), "the one without a backlog has nothing to pause");
        // an empty partition (caught up, silent) does not stop the others while it waits to be idle
        let parts = [part(None, false, false), part(Some(H), true, false), part(Some(H + 1000), true, false)];
        assert_eq!(a.decide(&parts), (vec![], vec![]));
        // an idle partition does not hold anyone back
        let parts = [
            AlignInput { watermark: Some(0), holding: false, backlog: false, paused: false },
            part(Some(H), true, false),
            part(Some(H + 1000), true, false),
        ];
        assert_eq!(a.decide(&parts), (vec![], vec![]));
        // a paused partition whose backlog is gone is resumed
        let parts = [part(Some(0), true, false), part(Some(H), false, true)];
        assert_eq!(a.decide(&parts), (vec![], vec![1]));
    }
}
