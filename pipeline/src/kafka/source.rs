//! The Kafka source.
//!
//! Delivery: offsets are committed only after every sink has made durable everything read
//! before a checkpoint barrier. Sinks name files after the source positions they hold, and when
//! a partition is assigned, files at or beyond its committed offset — written after the last
//! commit by a run that then died — are removed before consumption starts, so the replay does
//! not duplicate them. On revocation, everything read from the partitions that go is flushed,
//! made durable and committed before the callback returns. With operator state checkpoints
//! (`runtime.state_dir`) the state manifest is written before each commit, and a partition
//! resumes at the manifest's offset when that is further than the committed one.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use citystream_operators::{Barrier, Gauge, Message, Metrics};
use citystream_schemas::EventKind;
use citystream_schemas::raw::RawBatchBuilder;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::{ClientContext, Offset, Statistics, TopicPartitionList};
use tokio::sync::watch;

use super::{KafkaSourceConfig, client_config};
use crate::runtime::{CheckpointAcks, Outputs, PipelineError};

/// Next offset to read per (topic, partition).
type Positions = BTreeMap<(String, i32), i64>;

/// What the consumer thread and the rebalance callbacks share.
struct Shared {
    name: String,
    /// Topic → output port.
    ports: BTreeMap<String, usize>,
    builders: Vec<RawBatchBuilder>,
    /// Next offset to read per (topic, partition), for everything handed downstream.
    next: BTreeMap<(String, i32), i64>,
    /// Newest message timestamp per (topic, partition), and when it last had a message.
    max_ts: BTreeMap<(String, i32), (i64, Instant)>,
    epoch: u64,
    outputs: Arc<Outputs>,
    acks: CheckpointAcks,
    /// Roots of Parquet sinks whose uncommitted files are removed on assignment.
    sink_roots: Vec<PathBuf>,
    lag: BTreeMap<(String, i32), Gauge>,
    metrics: Metrics,
    error: Option<String>,
    /// Set once the final checkpoint is committed: the revocation on leaving needs no flush.
    closing: bool,
    /// When partitions were last assigned (idleness counts from there at the earliest).
    assigned_at: Option<Instant>,
    /// Bumped at every assignment: positions remembered before it may refer to files that the
    /// assignment removed, so they are never committed after it.
    generation: u64,
}

impl Shared {
    fn take_batches(&mut self) -> Vec<(usize, arrow::array::RecordBatch)> {
        self.builders.iter_mut().enumerate().filter(|(_, b)| !b.is_empty()).map(|(p, b)| (p, b.finish())).collect()
    }
}

struct Ctx {
    shared: Arc<Mutex<Shared>>,
    /// Offsets committed so far, shared with compaction.
    commits: crate::sink::compact::CommitLog,
    /// Operator state checkpoints: their manifest is written before offsets are committed.
    state: Option<crate::runtime::StateStore>,
}

impl Ctx {
    /// Records a fatal error from a callback; the source stops at its next step and no later
    /// revocation flushes or commits anything.
    fn fail(&self, message: String) {
        let mut s = self.shared.lock().expect("source state");
        s.closing = true;
        s.error.get_or_insert(message);
    }

    /// Before partitions are assigned: decides where each starts — its committed offset, or
    /// the state manifest's when that is further (a crash between the manifest and the
    /// commit) — sets it in the assignment, and removes the files written from there on.
    fn assign(&self, consumer: &BaseConsumer<Self>, list: &TopicPartitionList) {
        let committed = match consumer.committed_offsets(list.clone(), Duration::from_secs(30)) {
            Ok(c) => c,
            Err(e) => {
                self.shared
                    .lock()
                    .expect("source state")
                    .error
                    .get_or_insert(format!("reading committed offsets: {e}"));
                return;
            }
        };
        // where each partition's committed data ends; with nothing committed (a new group, or
        // a first run that died before its first commit) replay starts at the partition's low
        // watermark, so only files from there on will be written again
        let manifest = self.state.as_ref().map(|s| s.positions()).unwrap_or_default();
        let mut starts = Vec::new();
        for e in committed.elements() {
            if let Err(err) = e.error() {
                self.fail(format!("reading the committed offset of {}/{}: {err}", e.topic(), e.partition()));
                return;
            }
            let from = match e.offset() {
                Offset::Offset(o) => o,
                _ => match consumer.fetch_watermarks(e.topic(), e.partition(), Duration::from_secs(30)) {
                    Ok((low, _)) => low,
                    Err(err) => {
                        self.fail(format!("reading the low watermark of {}/{}: {err}", e.topic(), e.partition()));
                        return;
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
                self.fail(format!("setting the start of {topic}/{partition}: {err}"));
                return;
            }
        }
        let mut s = self.shared.lock().expect("source state");
        s.assigned_at = Some(Instant::now());
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
        }
        tracing::info!(source = s.name, partitions = list.count(), "assigned");
    }
}

/// Marks the source as closing when it exits, however it exits: dropping the consumer after an
/// error triggers a revocation, which must not flush and commit rows the error left unsettled.
struct CloseGuard(Arc<Mutex<Shared>>);

impl Drop for CloseGuard {
    fn drop(&mut self) {
        if let Ok(mut s) = self.0.lock() {
            s.closing = true;
        }
    }
}

impl ClientContext for Ctx {
    fn stats(&self, stats: Statistics) {
        let mut s = self.shared.lock().expect("source state");
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
/// returns the positions to commit. Runs from async code or, blocking, from a callback.
async fn checkpoint(shared: &Arc<Mutex<Shared>>) -> Option<(u64, BTreeMap<(String, i32), i64>)> {
    let (batches, epoch, positions, outputs, mut acks) = {
        let mut s = shared.lock().expect("source state");
        s.epoch += 1;
        (s.take_batches(), s.epoch, s.next.clone(), s.outputs.clone(), s.acks.clone())
    };
    for (p, b) in batches {
        outputs.send(p, Message::Batch(b)).await.ok()?;
    }
    outputs.broadcast(Message::Barrier(Barrier { epoch })).await.ok()?;
    acks.wait(epoch).await.then_some((epoch, positions))
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
fn commit<C: Consumer<Ctx>>(
    consumer: &C,
    epoch: u64,
    positions: &BTreeMap<(String, i32), i64>,
    owned: &TopicPartitionList,
) -> Result<(), CommitError> {
    let log = consumer.context().commits.clone();
    if let Some(state) = &consumer.context().state {
        crate::runtime::cpu(|| state.commit(epoch, positions)).map_err(CommitError::Manifest)?;
    }
    let mut tpl = TopicPartitionList::new();
    for ((topic, p), next) in positions {
        if owned.find_partition(topic, *p).is_some() {
            tpl.add_partition_offset(topic, *p, Offset::Offset(*next))
                .map_err(|e| CommitError::Kafka(e.to_string()))?;
        }
    }
    if tpl.count() > 0 {
        crate::runtime::cpu(|| consumer.commit(&tpl, CommitMode::Sync))
            .map_err(|e| CommitError::Kafka(format!("committing offsets: {e}")))?;
    }
    // what compaction may now merge
    let mut l = log.lock().expect("commit log");
    for e in tpl.elements() {
        if let Offset::Offset(o) = e.offset() {
            l.offsets.insert((e.topic().to_owned(), e.partition()), o);
        }
    }
    l.epoch = l.epoch.max(epoch);
    Ok(())
}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            self.assign(consumer, list);
            return;
        }
        let Rebalance::Revoke(list) = rebalance else { return };
        if list.count() == 0 || self.shared.lock().expect("source state").closing {
            return;
        }
        if consumer.assignment_lost() {
            // the group moved on without us (session timeout): another member may already be
            // writing these partitions, so flushing or committing now could duplicate rows.
            // Stop; a restart rejoins and replays from the last commit.
            let mut s = self.shared.lock().expect("source state");
            s.closing = true;
            s.error.get_or_insert(
                "the consumer group revoked our partitions after a session timeout (assignment lost); \
                 stopping so the replay from the last commit stays exactly-once"
                    .into(),
            );
            return;
        }
        // Flush and commit what we own before the partitions go. This callback runs inside
        // the source task's poll, so it blocks that worker while the stages and sinks, on the
        // other workers, drain the barrier.
        let shared = self.shared.clone();
        let done = tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(checkpoint(&shared)));
        let mut s = self.shared.lock().expect("source state");
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
            let key = (e.topic().to_owned(), e.partition());
            s.next.remove(&key);
            s.max_ts.remove(&key);
        }
    }
}

/// What the source shares with the sinks' files for exactly-once recovery.
pub(crate) struct Recovery {
    /// Operator state checkpoints, when configured.
    pub(crate) state: Option<crate::runtime::StateStore>,
    /// Roots of Parquet sinks whose uncommitted files are removed on assignment.
    pub(crate) sink_roots: Vec<PathBuf>,
    /// Offsets committed so far, shared with compaction.
    pub(crate) commits: crate::sink::compact::CommitLog,
}

/// Runs the Kafka source until stopped (or idle for `stop_when_idle`).
pub(crate) async fn run_kafka_source(
    name: &str,
    cfg: KafkaSourceConfig,
    outputs: Outputs,
    acks: CheckpointAcks,
    recovery: Recovery,
    mut stop: watch::Receiver<bool>,
    metrics: &Metrics,
) -> Result<u64, PipelineError> {
    let Recovery { sink_roots, commits, state } = recovery;
    let err = |message: String| PipelineError::Source { source_name: name.to_owned(), message };
    let ports: BTreeMap<String, usize> =
        EventKind::ALL.iter().enumerate().filter_map(|(p, k)| cfg.topic(*k).map(|t| (t.to_owned(), p))).collect();
    let batch_rows = cfg.batch_rows.get();
    let outputs = Arc::new(outputs);
    let shared = Arc::new(Mutex::new(Shared {
        name: name.to_owned(),
        ports: ports.clone(),
        builders: EventKind::ALL.iter().map(|_| RawBatchBuilder::with_capacity(batch_rows, batch_rows * 256)).collect(),
        next: BTreeMap::new(),
        max_ts: BTreeMap::new(),
        // epochs go on from the restored checkpoint: derived files are named after them
        epoch: state.as_ref().map_or(0, |s| s.epoch()),
        outputs: outputs.clone(),
        acks: acks.clone(),
        sink_roots,
        lag: BTreeMap::new(),
        metrics: metrics.clone(),
        error: None,
        closing: false,
        assigned_at: None,
        generation: 0,
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
    let consumer: StreamConsumer<Ctx> = cc
        .create_with_context(Ctx { shared: shared.clone(), commits, state })
        .map_err(|e| err(format!("creating the consumer: {e}")))?;
    // declared after the consumer, so it is dropped (and marks closing) before the consumer is
    let _close_guard = CloseGuard(shared.clone());
    let topics: Vec<&str> = ports.keys().map(String::as_str).collect();
    consumer.subscribe(&topics).map_err(|e| err(format!("subscribing to {topics:?}: {e}")))?;
    tracing::info!(source = name, ?topics, group = cfg.group_id.as_str(), "consuming");

    let events: Vec<_> = EventKind::ALL
        .iter()
        .map(|k| {
            metrics.counter(
                "citystream_source_events_total",
                "Messages read by a source.",
                &[("source", name), ("stream", k.as_str())],
            )
        })
        .collect();
    let bytes: Vec<_> = EventKind::ALL
        .iter()
        .map(|k| {
            metrics.counter(
                "citystream_source_bytes_total",
                "Payload bytes read by a source.",
                &[("source", name), ("stream", k.as_str())],
            )
        })
        .collect();
    let lag_ms = cfg.max_out_of_orderness.as_millis_i64();
    let idle_after = cfg.idle_partition_timeout.to_std();
    let mut total = 0u64;
    let mut last_message = Instant::now();
    let mut last_wm = i64::MIN;
    let mut batch_tick = tokio::time::interval(cfg.batch_wait.to_std().max(Duration::from_millis(1)));
    let mut checkpoint_tick = tokio::time::interval(cfg.checkpoint_interval.to_std().max(Duration::from_millis(10)));
    checkpoint_tick.tick().await;
    // (epoch, generation, positions) of the newest checkpoint not yet committed
    let mut pending_commit: Option<(u64, u64, Positions)> = None;
    let mut stop_open = true;

    loop {
        if let Some(e) = shared.lock().expect("source state").error.take() {
            return Err(err(e));
        }
        tokio::select! {
            biased;
            changed = stop.changed(), if stop_open => {
                match changed {
                    Ok(()) if *stop.borrow() => break,
                    Ok(()) => {}
                    // nobody can ask us to stop any more: keep consuming
                    Err(_) => stop_open = false,
                }
            }
            _ = checkpoint_tick.tick() => {
                // commit the previous checkpoint if every sink acknowledged it, then start the next
                let generation = shared.lock().expect("source state").generation;
                if let Some((epoch, gen_at, positions)) = pending_commit.take() {
                    if gen_at != generation {
                        // a rebalance happened since: its own checkpoint covered these rows
                    } else if acks.acked() >= epoch {
                        if let Err(e) = owned(&consumer).and_then(|o| commit(&consumer, epoch, &positions, &o).map_err(|e| err(e.to_string()))) {
                            // an unreachable broker: keep the positions and try again next tick
                            tracing::warn!(source = name, "{e}; retrying at the next checkpoint");
                            pending_commit = Some((epoch, gen_at, positions));
                        }
                    } else {
                        pending_commit = Some((epoch, gen_at, positions));
                    }
                }
                if pending_commit.is_none() {
                    let (batches, epoch, positions, generation) = {
                        let mut s = shared.lock().expect("source state");
                        s.epoch += 1;
                        (s.take_batches(), s.epoch, s.next.clone(), s.generation)
                    };
                    let had_data = !batches.is_empty();
                    for (p, b) in batches {
                        outputs.send(p, Message::Batch(b)).await?;
                    }
                    outputs.broadcast(Message::Barrier(Barrier { epoch })).await?;
                    pending_commit = Some((epoch, generation, positions));
                    if had_data {
                        // time spent waiting on a busy pipeline is not idleness
                        last_message = Instant::now();
                    }
                }
                if let Some(idle) = cfg.stop_when_idle {
                    let assigned_at = shared.lock().expect("source state").assigned_at;
                    let quiet_since = assigned_at.map(|a| a.max(last_message));
                    if quiet_since.is_some_and(|q| q.elapsed() >= idle.to_std()) {
                        tracing::info!(source = name, "no message for {idle}: ending");
                        break;
                    }
                }
            }
            _ = batch_tick.tick() => {
                let (batches, wm) = {
                    let mut s = shared.lock().expect("source state");
                    // the slowest partition that is not idle holds the watermark
                    let wm = s.max_ts.values().filter(|(_, seen)| seen.elapsed() < idle_after).map(|(ts, _)| *ts).min();
                    (s.take_batches(), wm)
                };
                if !batches.is_empty() {
                    for (p, b) in batches {
                        outputs.send(p, Message::Batch(b)).await?;
                    }
                    last_message = Instant::now();
                }
                if let Some(ts) = wm {
                    let wm = ts - lag_ms;
                    if wm > last_wm {
                        last_wm = wm;
                        outputs.broadcast(Message::Watermark(wm)).await?;
                    }
                }
            }
            msg = consumer.recv() => {
                let msg = match msg {
                    Ok(m) => m,
                    Err(e) => {
                        // transient broker errors: librdkafka reconnects by itself
                        tracing::warn!(source = name, "kafka: {e}");
                        continue;
                    }
                };
                last_message = Instant::now();
                let full = {
                    let mut s = shared.lock().expect("source state");
                    if let Some(e) = s.error.take() {
                        // a callback inside this poll failed (e.g. cleanup on assignment)
                        return Err(err(e));
                    }
                    let topic = msg.topic();
                    let Some(&port) = s.ports.get(topic) else { continue };
                    let payload = msg.payload().unwrap_or_default();
                    let now = chrono::Utc::now().timestamp_millis();
                    s.builders[port].append(topic, msg.partition(), msg.offset(), now, payload);
                    events[port].inc();
                    bytes[port].inc_by(payload.len() as u64);
                    total += 1;
                    let key = (topic.to_owned(), msg.partition());
                    s.next.insert(key.clone(), msg.offset() + 1);
                    if let Some(ts) = msg.timestamp().to_millis() {
                        let e = s.max_ts.entry(key).or_insert((ts, Instant::now()));
                        *e = (e.0.max(ts), Instant::now());
                    }
                    (s.builders[port].len() >= batch_rows).then(|| (port, s.builders[port].finish()))
                };
                if let Some((port, b)) = full {
                    outputs.send(port, Message::Batch(b)).await?;
                    last_message = Instant::now();
                }
            }
        }
    }
    // final checkpoint: hand on the rest, wait until it is durable, commit, then end
    let Some((epoch, positions)) = checkpoint(&shared).await else { return Err(PipelineError::Disconnected) };
    // the data is durable; commit, retrying while the broker is unreachable (bounded)
    let mut attempt = 0;
    loop {
        match owned(&consumer).and_then(|o| commit(&consumer, epoch, &positions, &o).map_err(|e| err(e.to_string()))) {
            Ok(()) => break,
            Err(e) if attempt < 30 => {
                attempt += 1;
                tracing::warn!(source = name, "final commit: {e}; retrying in 2 s ({attempt}/30)");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Err(e) => return Err(e),
        }
    }
    shared.lock().expect("source state").closing = true;
    outputs.broadcast(Message::End).await?;
    // leave the group promptly, bounded: librdkafka's destroy can hang (known race)
    let unsubscribe = tokio::task::spawn_blocking(move || {
        consumer.unsubscribe();
        drop(consumer);
    });
    if tokio::time::timeout(Duration::from_secs(10), unsubscribe).await.is_err() {
        tracing::warn!(source = name, "closing the consumer took longer than 10 s; leaving it behind");
    }
    Ok(total)
}

fn owned(c: &StreamConsumer<Ctx>) -> Result<TopicPartitionList, PipelineError> {
    c.assignment().map_err(|e| PipelineError::Source {
        source_name: "kafka".into(),
        message: format!("reading the assignment: {e}"),
    })
}
