//! The Kafka source.
//!
//! It runs on a thread of its own: every assigned partition's messages are forwarded to a
//! librdkafka queue of the source's own ([`queue`]) and taken from it a thousand at a time,
//! appended to raw batches without an `await` per message; the `BaseConsumer` is polled in the
//! same loop for rebalances and errors, and its rebalance callbacks — which run inside that
//! poll — may wait on the broker and the disk without blocking an async worker.
//!
//! Delivery: offsets are committed only after every sink has made durable everything read
//! before a checkpoint barrier. Sinks name files after the source positions they hold, and when
//! a partition is assigned, files at or beyond its committed offset — written after the last
//! commit by a run that then died — are removed before consumption starts, so the replay does
//! not duplicate them. On revocation, everything read from the partitions that go is flushed,
//! made durable and committed before the callback returns. A commit waits for the group
//! coordinator's answer for `commit_timeout` at most, and none starts while an earlier one has
//! had no answer ([`bounded_commit`]): a coordinator that stops answering does not stop the
//! source. With operator state checkpoints
//! (`runtime.state_dir` or `state_url`) the state manifest is created before each commit, and a partition
//! resumes at the manifest's offset when that is further than the committed one.
//!
//! Event time: each topic's watermark is the minimum, over the partitions that hold it back, of
//! their watermarks on the topic's [`EventClock`] (published by `decode`, which reads the event
//! times). Every assigned partition holds it back — also one that has not delivered anything
//! yet — until it is caught up with its log end *and* silent for `idle_partition_timeout`. While
//! catching up, a partition whose event time runs more than `max_drift` ahead of the slowest is
//! paused, and resumed once the slowest is within half of that ([`Alignment`]); a paused
//! partition's messages are still read, and held until it resumes ([`held`]).
//!
//! Files: this one runs the consumer thread ([`run_kafka_source`]); [`context`] holds what it
//! shares with librdkafka's callbacks (partitions, logs, statistics, rebalances); [`commit`] takes
//! a checkpoint and commits it, through [`bounded_commit`] (its answer on a
//! [`ReplyQueue`](crate::kafka::reply_queue::ReplyQueue), as [`log_ends`]'s); [`alignment`] decides
//! which partitions to pause, and [`held`] keeps what is read from them meanwhile, with the log
//! ends of [`log_ends`] (the librdkafka fetch path); [`queue`] is the source's own fetch queue;
//! [`Rebootstrap`] gives librdkafka its bootstrap servers again when it has forgotten every broker;
//! [`handoff`] hands what is read on to the pipeline, polling the group while it has no room.
mod alignment;
mod bounded_commit;
mod commit;
mod context;
#[cfg(test)]
mod full_pipeline_tests;
mod handoff;
mod held;
mod log_ends;
mod native;
mod queue;

pub use alignment::{AlignInput, Alignment, AlignmentWait};
use log_ends::LogEnds;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use citystream_operators::event_time::{EventClock, stream_watermark};
use citystream_operators::partitioning::Routing;
use citystream_operators::{Gauge, Message, Metrics};
use citystream_schemas::EventKind;
use citystream_schemas::raw::RawBatchBuilder;
use rdkafka::TopicPartitionList;
use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio::sync::watch;

use super::fetch::{Decoders, FetchLimits, Fetcher};
use super::rebootstrap::Rebootstrap;
use super::{KafkaSourceConfig, client_config};
use crate::task::{CheckpointAcks, Outputs, PipelineError, Recovery, Source, SourceContext, SourceReport};

use bounded_commit::{Earlier, ForgetUnanswered, Unanswered};
use commit::{checkpoint, commit, park_checkpoint};
use context::{CloseGuard, Ctx, Part, Shared, lock};
use held::Held;
use queue::{FetchQueue, Taken, TopicNames};

/// A topic partition.
type Tp = (String, i32);

/// Next offset to read per (topic, partition).
type Positions = BTreeMap<Tp, i64>;

/// librdkafka settings of the source's consumer, for a backlog caught up at CPU speed with
/// bounded memory; the source's `properties` override them.
pub const CONSUMER_DEFAULTS: &[(&str, &str)] = &[
    // the prefetched messages librdkafka holds in the consumer's queue (all partitions
    // together, plus at most one fetch response per broker): 64 MiB by default
    ("queued.max.messages.kbytes", "16384"),
    // once the prefetch queue is full, librdkafka waits this long before fetching again
    // (default 1 s): a backlog drained the queue in a fraction of that and then sat idle, at
    // less than half the rate (README, "Benchmarks")
    ("fetch.queue.backoff.ms", "10"),
    // a fetch that finds nothing new waits this long on the broker (default 500 ms); a
    // partition resumed by watermark alignment is not fetched before that fetch comes back
    ("fetch.wait.max.ms", "100"),
    // while no broker connection is up, librdkafka picks a broker to connect to at most every
    // half of this (11 ms at least; default 100 ms): at start, the connection to the broker
    // the metadata names came 50 ms after the bootstrap's, and the group join waited for it.
    // A broker's reconnects after a failure back off from here (with jitter) up to
    // `reconnect.backoff.max.ms` (10 s)
    ("reconnect.backoff.ms", "20"),
];

/// Payload bytes per message that a raw batch's builder (and a paused partition's hold) starts
/// with room for.
const PAYLOAD_BYTES_PER_ROW: usize = 256;

/// How long the final commit is retried, every 2 s, while the broker is unreachable or does not
/// answer; then the source ends with the error (the next run replays from the last commit that
/// landed, as after a crash).
const FINAL_COMMIT_RETRIES: Duration = Duration::from_secs(60);

/// A message read, from the consumer's queue or from the source's own ([`queue`]).
struct Read<'a> {
    topic: &'a str,
    partition: i32,
    offset: i64,
    /// The message's timestamp, ms.
    timestamp: Option<i64>,
    payload: &'a [u8],
    /// The assignment it was fetched under ([`Shared::generation`] when it was taken).
    generation: u64,
}

/// What a message read did besides being appended.
enum Step {
    /// It filled its port's batch, to hand on.
    Full(usize, arrow::array::RecordBatch),
    /// It was held and filled the hold: its partition is to be paused in librdkafka too.
    FetchPause,
}

/// The consumer thread's settings and handles.
struct Loop {
    name: String,
    cfg: KafkaSourceConfig,
    /// Where assigned partitions' messages are taken in batches (`None`: librdkafka could not
    /// make one; every message then comes through `poll`). The one strong reference: declared
    /// before `consumer`, so that it goes first however the loop ends (a panic too).
    queue: Option<Arc<FetchQueue>>,
    /// Likewise before `consumer`: the queue of a commit with no answer yet goes first.
    unanswered: ForgetUnanswered,
    /// Likewise before `consumer`: the log ends asked of the brokers, and the queue of an ask
    /// with no answer yet (the librdkafka fetch path).
    log_ends: std::cell::RefCell<LogEnds>,
    /// Watches librdkafka's learned brokers.
    rebootstrap: std::cell::RefCell<Rebootstrap>,
    /// The native fetch path (`None`: librdkafka fetches). Likewise before `consumer`: the
    /// queue of its leader ask goes first.
    native: Option<std::cell::RefCell<Native>>,
    /// Messages polled while a send waited for room, to read once it is done ([`handoff`]),
    /// with the assignment they were fetched under.
    kept: std::cell::RefCell<std::collections::VecDeque<(rdkafka::message::OwnedMessage, u64)>>,
    consumer: BaseConsumer<Ctx>,
    shared: Arc<Mutex<Shared>>,
    clocks: Vec<Option<EventClock>>,
    /// How each port's topic is keyed: its partition count is read from the broker at start
    /// and after every assignment (partitions added to a topic move keys).
    routing: Vec<(String, Routing)>,
    acks: CheckpointAcks,
    stop: watch::Receiver<bool>,
    events: Vec<citystream_operators::Counter>,
    bytes: Vec<citystream_operators::Counter>,
    /// Messages and payload bytes read per port, not yet added to `events` and `bytes`: two
    /// atomic adds per message were over half of [`Loop::accept`]'s time on a backlog, so they
    /// are added per batch of messages taken (see [`Loop::count`]).
    tally: std::cell::RefCell<Tally>,
    paused: Gauge,
    /// Messages read from paused partitions and held.
    held: citystream_operators::Counter,
    /// Partitions paused in librdkafka (their hold full).
    fetch_pauses: citystream_operators::Counter,
    /// Payload bytes held now.
    held_bytes: Gauge,
    /// How long alignment has waited on a partition that does not move, and its gauge.
    alignment_wait: std::cell::RefCell<AlignmentWait<Tp, (Option<i64>, i64)>>,
    alignment_stalled: Gauge,
    /// How long hand-offs waited for room in a full pipeline ([`handoff`]), and what is under
    /// a millisecond not counted yet.
    backpressure_ms: citystream_operators::Counter,
    backpressure_rest: std::cell::Cell<Duration>,
    /// When the consumer was last polled (a hand-off that waits polls it again after
    /// [`handoff::KEEP_GROUP_EVERY`]).
    last_polled: std::cell::Cell<Instant>,
    /// Payload bytes in `kept`.
    kept_bytes: std::cell::Cell<usize>,
}

/// The native fetch path's state ([`crate::kafka::fetch`]).
struct Native {
    fetcher: Fetcher,
    decoders: Decoders,
    /// Record batches (or their rest) it could not decompress or parse, skipped.
    skipped: citystream_operators::Counter,
}

/// What the loop read since it last added to its counters.
struct Tally {
    /// Messages and payload bytes appended, per port.
    read: Vec<(u64, u64)>,
    /// Messages held (their partition paused).
    held: u64,
}

/// Counts the loop's tally when dropped.
struct CountOnDrop<'a>(&'a Loop);

impl Drop for CountOnDrop<'_> {
    fn drop(&mut self) {
        self.0.count();
    }
}

impl Source for KafkaSourceConfig {
    fn run(
        self: Box<Self>,
        ctx: SourceContext,
    ) -> futures_util::future::BoxFuture<'static, Result<SourceReport, PipelineError>> {
        Box::pin(async move {
            let SourceContext { name, outputs, clocks, routing, stop, metrics, acks, recovery } = ctx;
            let streams = Streams { clocks, routing };
            let messages = run_kafka_source(&name, *self, outputs, acks, recovery, streams, stop, &metrics).await?;
            Ok(SourceReport { messages, account: None })
        })
    }
}

/// Runs the Kafka source until stopped (or idle for `stop_when_idle`), on a thread of its own.
#[allow(clippy::too_many_arguments)]
async fn run_kafka_source(
    name: &str,
    cfg: KafkaSourceConfig,
    outputs: Outputs,
    acks: CheckpointAcks,
    recovery: Recovery,
    streams: Streams,
    stop: watch::Receiver<bool>,
    metrics: &Metrics,
) -> Result<u64, PipelineError> {
    let Streams { clocks, routing } = streams;
    let err = |message: String| PipelineError::Source { source_name: name.to_owned(), message };
    let Recovery { sink_roots, commits, state } = recovery;
    let ports: BTreeMap<String, usize> =
        EventKind::ALL.iter().enumerate().filter_map(|(p, k)| cfg.topic(*k).map(|t| (t.to_owned(), p))).collect();
    let batch_rows = cfg.batch_rows.get();
    let shared = Arc::new(Mutex::new(Shared {
        name: name.to_owned(),
        ports: ports.clone(),
        builders: EventKind::ALL
            .iter()
            .map(|_| RawBatchBuilder::with_capacity(batch_rows, batch_rows * PAYLOAD_BYTES_PER_ROW))
            .collect(),
        parts: BTreeMap::new(),
        held: BTreeMap::new(),
        held_bytes: 0,
        queue: None,
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
        unsent: std::collections::VecDeque::new(),
    }));
    let mut cc = client_config(&cfg.brokers, &cfg.properties);
    cc.set("group.id", cfg.group_id.as_str())
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("statistics.interval.ms", "1000");
    for (k, v) in CONSUMER_DEFAULTS {
        cc.set(*k, *v);
    }
    for (k, v) in &cfg.properties {
        cc.set(k, v.as_str());
    }
    // an end-of-partition notice would move librdkafka's resume position like a message
    // (`rd_kafka_consume_batch_queue`), past one it never handed over
    cc.set("enable.partition.eof", "false");
    if cfg.task.is_some() {
        for k in super::MEMBERSHIP_PROPERTIES {
            cc.remove(k);
        }
    }
    let native = cfg.native_fetch().map_err(err)?;
    let native = match native {
        true => Some(std::cell::RefCell::new(Native {
            fetcher: Fetcher::new(
                cfg.properties.get("client.id").map_or("citystream", |v| v.as_str()),
                fetch_limits(&cc).map_err(err)?,
            ),
            decoders: Decoders::new().map_err(|e| err(format!("creating a zstd decoder: {e}")))?,
            skipped: metrics.counter(
                "citystream_kafka_skipped_batches_total",
                "Record batches the native fetch could not decompress, or whose records did not parse, skipped (logged with their offsets).",
                &[("source", name)],
            ),
        })),
        false => None,
    };
    let unanswered = Arc::new(Unanswered::new(
        cfg.commit_wait().map_err(err)?,
        metrics.counter(
            "citystream_kafka_commit_timeouts_total",
            "Offset commits with no answer from the group coordinator within commit_timeout (retried at a later checkpoint once answered).",
            &[("source", name)],
        ),
    ));
    let consumer: BaseConsumer<Ctx> = cc
        .create_with_context(Ctx {
            shared: shared.clone(),
            commits,
            state,
            native: native.is_some(),
            unanswered: unanswered.clone(),
        })
        .map_err(|e| err(format!("creating the consumer: {e}")))?;
    // every assigned partition's messages go to a queue of the source's own, taken in batches
    // (not with the native fetch: librdkafka fetches nothing then)
    let queue = match native {
        Some(_) => None,
        None => FetchQueue::new(consumer.client().native_ptr()).map(Arc::new),
    };
    if queue.is_none() && native.is_none() {
        tracing::warn!(source = name, "librdkafka made no queue for the source: messages are polled one by one");
    }
    lock(&shared).queue = queue.as_ref().map(Arc::downgrade);
    let topics: Vec<&str> = ports.keys().map(String::as_str).collect();
    // a task's partitions are assigned on the consumer thread (`Loop::consume`): it waits on
    // the broker and removes files
    if cfg.task.is_none() {
        consumer.subscribe(&topics).map_err(|e| err(format!("subscribing to {topics:?}: {e}")))?;
    }
    let routing: Vec<(String, Routing)> =
        ports.iter().filter_map(|(topic, &port)| Some((topic.clone(), routing[port].clone()?))).collect();
    tracing::info!(
        source = name,
        ?topics,
        group = cfg.group_id.as_str(),
        fetch = if native.is_some() { "native" } else { "librdkafka" },
        "consuming"
    );
    let counter = |metric: &str, help: &'static str, k: &EventKind| {
        metrics.counter(metric, help, &[("source", name), ("stream", k.as_str())])
    };
    // (before `cfg` moves into the loop)
    let rebootstrap = Rebootstrap::new(format!("the source `{name}`"));
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
        tally: std::cell::RefCell::new(Tally { read: vec![(0, 0); EventKind::ALL.len()], held: 0 }),
        paused: metrics.gauge(
            "citystream_kafka_partitions_paused",
            "Partitions paused by watermark alignment (running ahead in event time).",
            &[("source", name)],
        ),
        held: metrics.counter(
            "citystream_kafka_alignment_held_messages_total",
            "Messages read from partitions paused by watermark alignment, held until they resume.",
            &[("source", name)],
        ),
        fetch_pauses: metrics.counter(
            "citystream_kafka_alignment_fetch_pauses_total",
            "Partitions paused in librdkafka by watermark alignment (their held messages reached max_held_bytes).",
            &[("source", name)],
        ),
        held_bytes: metrics.gauge(
            "citystream_kafka_alignment_held_bytes",
            "Payload bytes read from partitions paused by watermark alignment and held (about max_held_bytes at most).",
            &[("source", name)],
        ),
        alignment_wait: std::cell::RefCell::new(AlignmentWait::default()),
        alignment_stalled: metrics.gauge(
            "citystream_kafka_alignment_stalled_seconds",
            "How long partitions paused by watermark alignment have waited on a slowest partition whose watermark has not moved (0 while none is paused or it moves).",
            &[("source", name)],
        ),
        backpressure_ms: metrics.counter(
            "citystream_kafka_backpressure_milliseconds_total",
            "Time the Kafka source waited for room in a full pipeline (a stage or sink slower than the stream), ms; it polls its consumer group meanwhile.",
            &[("source", name)],
        ),
        backpressure_rest: std::cell::Cell::default(),
        last_polled: std::cell::Cell::new(Instant::now()),
        kept_bytes: std::cell::Cell::default(),
        native,
        cfg,
        kept: std::cell::RefCell::default(),
        consumer,
        shared,
        queue,
        unanswered: ForgetUnanswered(unanswered),
        log_ends: std::cell::RefCell::new(LogEnds::default()),
        rebootstrap: std::cell::RefCell::new(rebootstrap),
        clocks,
        routing,
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

/// The native fetch's limits, from the consumer's properties (librdkafka's names and meaning;
/// `fetch.max.bytes` 16 MiB unless set, the prefetch bound of [`CONSUMER_DEFAULTS`]).
fn fetch_limits(cc: &rdkafka::ClientConfig) -> Result<FetchLimits, String> {
    let int = |key: &str, default: i32| -> Result<i32, String> {
        cc.get(key).map_or(Ok(default), |v| {
            v.trim().parse::<i32>().ok().filter(|n| *n >= 0).ok_or_else(|| format!("`{key}`: {v:?} is not a count"))
        })
    };
    let read_committed = match cc.get("isolation.level").unwrap_or("read_committed") {
        "read_committed" => true,
        "read_uncommitted" => false,
        v => return Err(format!("`isolation.level`: {v:?} (read_committed or read_uncommitted)")),
    };
    Ok(FetchLimits {
        max_wait_ms: int("fetch.wait.max.ms", 500)?,
        max_bytes: int("fetch.max.bytes", 16 << 20)?.max(1),
        partition_bytes: int("fetch.message.max.bytes", int("max.partition.fetch.bytes", 1 << 20)?)?.max(1),
        read_committed,
    })
}

/// Assigns partition `partition` of every topic in `topics` that has it, starting where the
/// task's checkpoint or commit left it (the same decision and cleanup as a group assignment).
fn assign_task(consumer: &BaseConsumer<Ctx>, topics: &[&str], partition: i32) -> Result<(), String> {
    let mut list = TopicPartitionList::new();
    for topic in topics {
        if partition < partition_count(consumer, topic)? {
            list.add_partition(topic, partition);
        }
    }
    consumer.context().assign(consumer, &list);
    if let Some(e) = lock(&consumer.context().shared).error.take() {
        return Err(e);
    }
    consumer.assign(&list).map_err(|e| format!("assigning partition {partition} of {topics:?}: {e}"))?;
    // no rebalance callback runs for an assignment by hand
    consumer.context().assigned(consumer, &list)
}

/// What the runtime shares with the source per output port: the event clocks its `decode`
/// stages publish to, and how each stream is keyed.
struct Streams {
    clocks: Vec<Option<EventClock>>,
    routing: Vec<Option<Routing>>,
}

/// The partition count of `topic`, from the broker: `decode` checks keyed rows against it.
/// Retried for 10 s (a topic just created may have no leader yet); a topic that does not exist
/// is an error (create it first: `citystream topics`).
pub(crate) fn partition_count<C: rdkafka::consumer::ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
) -> Result<i32, String> {
    let mut last = String::new();
    for attempt in 0..10 {
        if attempt > 0 {
            std::thread::sleep(Duration::from_secs(1));
        }
        match consumer.fetch_metadata(Some(topic), Duration::from_secs(10)) {
            Err(e) => last = format!("reading the partition count of {topic}: {e}"),
            Ok(md) => match md.topics().iter().find(|t| t.name() == topic) {
                Some(t) if t.error().is_none() && !t.partitions().is_empty() => return Ok(t.partitions().len() as i32),
                Some(t) => {
                    last = match t.error() {
                        Some(e) => format!("topic {topic}: {e:?}"),
                        None => format!("topic {topic} has no partitions"),
                    }
                }
                None => last = format!("the broker did not describe topic {topic}"),
            },
        }
    }
    Err(format!("{last} (its rows are checked against its `keys`: create it first, `citystream topics`)"))
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
        // librdkafka's queues go before their client
        drop(self.queue);
        drop(self.unanswered);
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

    /// Reads the partition count of every keyed topic into its routing.
    fn read_partition_counts(&self) -> Result<(), PipelineError> {
        for (topic, r) in &self.routing {
            let n = partition_count(&self.consumer, topic).map_err(|e| self.err(e))?;
            if r.partitions() != 0 && r.partitions() != n {
                tracing::warn!(
                    source = self.name,
                    topic,
                    from = r.partitions(),
                    to = n,
                    "the topic's partition count changed: keys hash to other partitions now"
                );
            }
            r.set_partitions(n);
        }
        Ok(())
    }

    fn consume(&self) -> Result<u64, PipelineError> {
        // what was read is counted however the loop ends (an error included)
        let _counted = CountOnDrop(self);
        if let Some(partition) = self.cfg.task {
            let topics: Vec<String> = lock(&self.shared).ports.keys().cloned().collect();
            let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
            assign_task(&self.consumer, &topics, partition).map_err(|e| self.err(e))?;
        }
        self.read_partition_counts()?;
        let mut counted_generation = lock(&self.shared).generation;
        let batch_wait = self.cfg.batch_wait.to_std().max(Duration::from_millis(1));
        let checkpoint_every = self.cfg.checkpoint_interval.to_std().max(Duration::from_millis(10));
        let mut next_flush = Instant::now() + batch_wait;
        let mut next_checkpoint = Instant::now() + checkpoint_every;
        let mut last_message = Instant::now();
        let mut last_wm: Vec<i64> = vec![i64::MIN; self.clocks.len()];
        // (epoch, generation, positions) of the newest checkpoint not yet committed
        let mut pending_commit: Option<(u64, u64, Positions)> = None;
        let mut total = 0u64;
        // the partition of the message at hand, as a key of `parts` (reused: no allocation)
        let mut key: Tp = (String::new(), 0);
        // messages taken from the source's queue, destroyed at the next take
        let mut taken = Taken::new();
        // a wall-clock reading no later than now: read again only for a message stamped after it
        let mut wall = chrono::Utc::now().timestamp_millis();
        // the clock, the stop flag and the callbacks' errors are read after every wait and every
        // CHECK_EVERY messages read without one (a backlog), not for each message
        const CHECK_EVERY: u32 = 64;
        let mut now = Instant::now();
        let mut unchecked = CHECK_EVERY;
        loop {
            if unchecked >= CHECK_EVERY {
                unchecked = 0;
                let generation = {
                    let mut s = lock(&self.shared);
                    if let Some(e) = s.error.take() {
                        return Err(self.err(e));
                    }
                    s.generation
                };
                // a new assignment: partitions may have been added to a keyed topic
                if generation != counted_generation && !self.routing.is_empty() {
                    counted_generation = generation;
                    self.read_partition_counts()?;
                }
                if *self.stop.borrow() {
                    break;
                }
                now = Instant::now();
                // a message stamped before this reading still gets its own time, capped by it
                wall = chrono::Utc::now().timestamp_millis();
                if now >= next_checkpoint {
                    next_checkpoint = now + checkpoint_every;
                    let handed_on = self.periodic_checkpoint(&mut pending_commit)?;
                    // it may have waited (a commit, a busy pipeline): the messages read next
                    // arrived after that
                    now = Instant::now();
                    if handed_on {
                        // time spent waiting on a busy pipeline is not idleness
                        last_message = now;
                    }
                }
                // after a KRaft broker was fenced, the group's commits would wait otherwise
                self.rebootstrap.borrow_mut().keep_known(self.consumer.client().native_ptr());
                if now >= next_flush {
                    next_flush = now + batch_wait;
                    let (handed_on, released) = self.flush(&mut last_wm)?;
                    total += released;
                    now = Instant::now();
                    if handed_on {
                        last_message = now;
                    }
                }
            }
            // messages polled while a send waited, first: they were fetched before any taken now
            if let Some(served) = self.read_kept(&mut key, &mut wall, &mut last_message, &mut total) {
                unchecked += 1;
                if served? {
                    now = Instant::now();
                    last_message = now;
                    unchecked = CHECK_EVERY;
                }
                continue;
            }
            // the consumer's queue: rebalances and errors (served inside the poll), and the
            // messages of a partition not forwarded to the source's queue (none, normally)
            if let Some(polled) = self.poll(Duration::ZERO) {
                unchecked += 1;
                if self.serve_polled(polled, &mut key, &mut wall, &mut last_message, &mut total)? {
                    // the pipeline may have held the send back: look at the timers next
                    now = Instant::now();
                    last_message = now;
                    unchecked = CHECK_EVERY;
                }
                continue;
            }
            if let Some(native) = &self.native {
                unchecked = CHECK_EVERY;
                // the round waits for its brokers no later than the next timer, at most 100 ms
                // (a broker that does not answer for 30 s holds no checkpoint, flush, stop or
                // poll of the group: librdkafka leaves the group after max.poll.interval.ms
                // without one), its requests staying in flight for the next round
                let until = next_flush.min(next_checkpoint).min(now + Duration::from_millis(100));
                let (fetched, read, waiting) = self.fetch_round(native, until, &mut key, &mut wall, &mut total)?;
                now = Instant::now();
                if read > 0 {
                    last_message = now;
                    continue;
                }
                if fetched == 0 && !waiting {
                    // nothing to fetch (none assigned, all paused, no leader reachable): wait
                    // for an event, at most 100 ms
                    let wait = next_flush.min(next_checkpoint).saturating_duration_since(now);
                    if let Some(polled) = self.poll(wait.min(Duration::from_millis(100))) {
                        self.serve_polled(polled, &mut key, &mut wall, &mut last_message, &mut total)?;
                    }
                    now = Instant::now();
                }
                // a round that read nothing waited for its responses (up to `until`)
                if self.idle_long_enough(&mut last_message) {
                    break;
                }
                continue;
            }
            let Some(queue) = &self.queue else {
                // no queue of our own: wait on the consumer's
                unchecked = CHECK_EVERY;
                let wait = next_flush.min(next_checkpoint).saturating_duration_since(Instant::now());
                if let Some(polled) = self.poll(wait.min(Duration::from_millis(100))) {
                    self.serve_polled(polled, &mut key, &mut wall, &mut last_message, &mut total)?;
                    now = Instant::now();
                } else if self.idle_long_enough(&mut last_message) {
                    break;
                }
                continue;
            };
            queue.take(Duration::ZERO, &mut taken);
            if taken.len() == 0 {
                unchecked = CHECK_EVERY;
                if queue.events_waiting() {
                    // the consumer's queue first (an assignment may wait behind logs)
                    continue;
                }
                // nothing anywhere: wait for messages, at most 100 ms (an event on the
                // consumer's queue, such as an assignment, ends the wait: `FetchQueue`)
                let wait = next_flush.min(next_checkpoint).saturating_duration_since(Instant::now());
                queue.take(wait.min(Duration::from_millis(100)), &mut taken);
                if taken.len() == 0 {
                    // checked whenever a wait comes back empty: at most 100 ms past `stop_when_idle`
                    if self.idle_long_enough(&mut last_message) {
                        break;
                    }
                    continue;
                }
                now = Instant::now();
            }
            unchecked += taken.len() as u32;
            last_message = now;
            let mut i = 0;
            let mut names = TopicNames::default();
            // taken under this assignment (a send below may serve a rebalance)
            let generation = lock(&self.shared).generation;
            while i < taken.len() {
                let mut step = None;
                {
                    let mut s = lock(&self.shared);
                    if let Some(e) = s.error.take() {
                        // a callback in the last poll failed (e.g. cleanup on assignment)
                        return Err(self.err(e));
                    }
                    while i < taken.len() && step.is_none() {
                        let m = taken.get(i);
                        i += 1;
                        if let Some(e) = m.error() {
                            // end of a partition (if asked for) or a fetch error librdkafka retries
                            if e != rdkafka::types::RDKafkaErrorCode::PartitionEOF {
                                tracing::warn!(source = self.name, "kafka: {e}");
                            }
                            continue;
                        }
                        let Some(topic) = names.of(&m) else { continue };
                        let read = Read {
                            topic,
                            partition: m.partition(),
                            offset: m.offset(),
                            timestamp: m.timestamp(),
                            payload: m.payload(),
                            generation,
                        };
                        step = self.accept(&mut s, &read, &mut key, &mut wall, last_message, &mut total);
                    }
                }
                if self.step(step, &key, &mut total)? {
                    now = Instant::now();
                    last_message = now;
                    unchecked = CHECK_EVERY;
                }
            }
            self.count();
        }
        // final checkpoint: hand on the rest, wait until it is durable, commit, then end
        let Some((epoch, positions)) = checkpoint(&self.shared) else { return Err(PipelineError::Disconnected) };
        // the data is durable; commit, retrying for FINAL_COMMIT_RETRIES while the broker is
        // unreachable or silent. The first try waits for an unanswered earlier commit (up to
        // commit_timeout, then up to as long for its own); the retries do not wait for one, so
        // the whole stays bounded however long the coordinator says nothing.
        let retry_until = Instant::now() + FINAL_COMMIT_RETRIES;
        let mut earlier = Earlier::Wait;
        loop {
            match self.commit_owned(epoch, &positions, earlier) {
                Ok(()) => break,
                Err(e) if e.0 => return Err(e.1),
                Err((_, e)) if Instant::now() < retry_until => {
                    tracing::warn!(source = self.name, "final commit: {e}; retrying in 2 s");
                    std::thread::sleep(Duration::from_secs(2));
                    earlier = Earlier::GiveUp;
                }
                Err((_, e)) => return Err(e),
            }
        }
        // (not a hand-off: with everything committed, the group no longer matters)
        let outputs = {
            let mut s = lock(&self.shared);
            s.closing = true;
            s.outputs.clone()
        };
        outputs.blocking_broadcast(Message::End)?;
        Ok(total)
    }

    /// Whether `stop_when_idle` has passed since the assignment and `last_message` (a paused
    /// partition still has messages to read: waiting on it is not idleness).
    fn idle_long_enough(&self, last_message: &mut Instant) -> bool {
        let Some(idle) = self.cfg.stop_when_idle else { return false };
        let (assigned_at, paused) = {
            let s = lock(&self.shared);
            (s.assigned_at, s.parts.values().any(|p| p.paused))
        };
        if paused {
            *last_message = Instant::now();
        }
        let ended = assigned_at.map(|a| a.max(*last_message)).is_some_and(|q| q.elapsed() >= idle.to_std());
        if ended {
            tracing::info!(source = self.name, "no message for {idle}: ending");
        }
        ended
    }

    /// Commits checkpoint `epoch` for the partitions this member owns; on failure, whether
    /// another process took the state over (stop: retrying cannot help) and the error.
    fn commit_owned(&self, epoch: u64, positions: &Positions, earlier: Earlier) -> Result<(), (bool, PipelineError)> {
        let owned = self.owned().map_err(|e| (false, e))?;
        commit(&self.consumer, epoch, positions, &owned, earlier).map_err(|e| (e.is_fenced(), self.err(e.to_string())))
    }

    /// Commits the previous checkpoint if every sink acknowledged it, then starts the next.
    /// Returns whether it handed on data.
    fn periodic_checkpoint(&self, pending: &mut Option<(u64, u64, Positions)>) -> Result<bool, PipelineError> {
        let generation = lock(&self.shared).generation;
        if let Some((epoch, gen_at, positions)) = pending.take() {
            if gen_at != generation {
                // a rebalance happened since: its own checkpoint covered these rows
            } else if self.acks.acked() >= epoch {
                if let Err((fenced, e)) = self.commit_owned(epoch, &positions, Earlier::GiveUp) {
                    if fenced {
                        return Err(e);
                    }
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
        let (epoch, positions, had_data, generation) = {
            let mut s = lock(&self.shared);
            let (epoch, positions, had_data) = park_checkpoint(&mut s);
            (epoch, positions, had_data, s.generation)
        };
        self.hand_on_parked()?;
        *pending = Some((epoch, generation, positions));
        Ok(had_data)
    }

    /// Serves what `poll` returned: a message (see [`Self::accept`]), a transient error
    /// (logged: librdkafka reconnects by itself) or a fatal one (the source stops). Returns
    /// whether it handed a batch on.
    fn serve_polled(
        &self,
        msg: rdkafka::error::KafkaResult<rdkafka::message::BorrowedMessage<'_>>,
        key: &mut Tp,
        wall: &mut i64,
        last_message: &mut Instant,
        total: &mut u64,
    ) -> Result<bool, PipelineError> {
        let msg = match msg {
            Ok(m) => m,
            Err(e) => return self.polled_error(e).map(|()| false),
        };
        if self.native.is_some() {
            // fetched by librdkafka before the assignment's pause: the source fetches it itself
            return Ok(false);
        }
        self.serve_message(&msg, None, key, wall, last_message, total)
    }

    /// An error `poll` returned: a fatal one stops the source, another is logged (librdkafka
    /// reconnects by itself).
    fn polled_error(&self, e: rdkafka::error::KafkaError) -> Result<(), PipelineError> {
        match e {
            // a fatal error ends the consumer for good (e.g. KIP-848 refusing a
            // `group.instance.id` the group still holds for a member that died): stop, so
            // that a restart (a pod's) joins again instead of polling a dead consumer
            e @ rdkafka::error::KafkaError::MessageConsumptionFatal(_) => Err(self.err(format!(
                "the Kafka consumer failed for good: {e}; a restart joins the group again (with \
                 static membership, once the broker released the member that held this group.instance.id)"
            ))),
            e => {
                tracing::warn!(source = self.name, "kafka: {e}");
                Ok(())
            }
        }
    }

    /// Serves a message librdkafka fetched (see [`Self::accept`]) under assignment
    /// `generation` (`None`: the current one, it was just polled). Returns whether it handed a
    /// batch on.
    fn serve_message(
        &self,
        msg: &impl rdkafka::message::Message,
        generation: Option<u64>,
        key: &mut Tp,
        wall: &mut i64,
        last_message: &mut Instant,
        total: &mut u64,
    ) -> Result<bool, PipelineError> {
        *last_message = Instant::now();
        let step = {
            let mut s = lock(&self.shared);
            if let Some(e) = s.error.take() {
                // a callback inside this poll failed (e.g. cleanup on assignment)
                return Err(self.err(e));
            }
            let read = Read {
                topic: msg.topic(),
                partition: msg.partition(),
                offset: msg.offset(),
                timestamp: msg.timestamp().to_millis(),
                payload: msg.payload().unwrap_or_default(),
                generation: generation.unwrap_or(s.generation),
            };
            self.accept(&mut s, &read, key, wall, *last_message, total)
        };
        self.count();
        self.step(step, key, total)
    }

    /// Adds the messages and bytes tallied since the last call to the source's counters.
    fn count(&self) {
        let mut tally = self.tally.borrow_mut();
        for (port, (messages, bytes)) in tally.read.iter_mut().enumerate() {
            if *messages > 0 {
                self.events[port].inc_by(std::mem::take(messages));
                self.bytes[port].inc_by(std::mem::take(bytes));
            }
        }
        self.held.inc_by(std::mem::take(&mut tally.held));
    }

    /// Appends message `m` to its port's batch, or holds it if its partition is paused; a
    /// message of a partition not assigned (outdated: revoked) is dropped. `key` is set to its
    /// partition.
    fn accept(
        &self,
        s: &mut Shared,
        m: &Read<'_>,
        key: &mut Tp,
        wall: &mut i64,
        at: Instant,
        total: &mut u64,
    ) -> Option<Step> {
        let &port = s.ports.get(m.topic)?;
        // when the message reached Kafka (its log time), unless that lies ahead of our
        // clock: part of the topic's content, so the event-time bounds checked against
        // it give the same verdict on every replay
        let arrived = match m.timestamp {
            Some(t) if t <= *wall => t,
            t => {
                *wall = chrono::Utc::now().timestamp_millis();
                t.map_or(*wall, |t| t.min(*wall))
            }
        };
        // most messages are of the same partition as the one before
        if key.1 != m.partition || key.0 != m.topic {
            key.0.clear();
            key.0.push_str(m.topic);
            key.1 = m.partition;
        }
        let Some(p) = s.parts.get_mut(key) else {
            // every assigned partition is in `parts` before it is fetched: this one was
            // revoked, and its next owner reads it from the commit
            tracing::debug!(
                source = self.name,
                topic = m.topic,
                partition = m.partition,
                "a revoked partition's message, dropped"
            );
            return None;
        };
        if p.since > m.generation {
            // fetched for an earlier assignment of the partition, before a revocation and an
            // assignment inside a send that waited ([`handoff`]): read again from its start
            tracing::debug!(
                source = self.name,
                topic = m.topic,
                partition = m.partition,
                offset = m.offset,
                "a message fetched before the partition's assignment, dropped"
            );
            return None;
        }
        if p.paused {
            return self.hold(s, key, port, m, arrived);
        }
        p.position = m.offset.saturating_add(1);
        p.read = true;
        p.active_at = at;
        s.builders[port].append(m.topic, m.partition, m.offset, arrived, m.payload);
        let mut tally = self.tally.borrow_mut();
        tally.read[port].0 += 1;
        tally.read[port].1 += m.payload.len() as u64;
        *total += 1;
        (s.builders[port].len() >= self.cfg.batch_rows.get()).then(|| Step::Full(port, s.builders[port].finish()))
    }

    /// Does what [`Self::accept`] asked for: pauses the partition of `key` in librdkafka, or
    /// hands a full batch on (and then looks at alignment again). Returns whether it handed a
    /// batch on (the pipeline may have held the send back).
    fn step(&self, step: Option<Step>, key: &Tp, total: &mut u64) -> Result<bool, PipelineError> {
        match step {
            None => Ok(false),
            Some(Step::FetchPause) => {
                // the hold is full: librdkafka goes on after the last message read at resume
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition(&key.0, key.1);
                self.consumer.pause(&tpl).map_err(|e| self.err(format!("pausing {}/{}: {e}", key.0, key.1)))?;
                self.fetch_pauses.inc();
                Ok(false)
            }
            Some(Step::Full(port, b)) => {
                // counted before they leave (the send may wait on a busy pipeline): the sinks
                // never show more rows than the source read
                self.count();
                self.hand_on([(port, Message::Batch(b))])?;
                if let Some(drift) = self.cfg.max_drift {
                    *total += self.realign(drift.as_millis_i64())?;
                }
                Ok(true)
            }
        }
    }

    /// Holds a message of a paused partition ([`held`]); past `max_held_bytes`, asks for the
    /// partition to be paused in librdkafka as well (not with the native fetch, which no longer
    /// asks for it).
    fn hold(&self, s: &mut Shared, key: &Tp, port: usize, m: &Read<'_>, arrived: i64) -> Option<Step> {
        let payload = m.payload;
        if !s.held.contains_key(key) {
            // room for a batch, as the port's own builder starts with (grown from nothing,
            // each pause's first batch was copied a dozen times; pages not written to stay
            // unused address space)
            let rows = self.cfg.batch_rows.get();
            s.held.insert(
                key.clone(),
                Held::new(port, rows, (rows * PAYLOAD_BYTES_PER_ROW).min(self.cfg.max_held_bytes)),
            );
        }
        let h = s.held.get_mut(key)?;
        h.push(&key.0, key.1, m.offset, arrived, payload, self.cfg.batch_rows.get());
        s.held_bytes += payload.len();
        self.tally.borrow_mut().held += 1;
        // the native fetch leaves a paused partition out of its requests: nothing to pause
        (self.native.is_none() && s.held_bytes > self.cfg.max_held_bytes && !h.fetch_paused).then(|| {
            h.fetch_paused = true;
            Step::FetchPause
        })
    }

    /// Hands on partial batches, emits each topic's watermark where it moved, and pauses or
    /// resumes partitions for alignment. Returns whether it handed on data, and how many held
    /// messages it handed on.
    fn flush(&self, last_wm: &mut [i64]) -> Result<(bool, u64), PipelineError> {
        let batches = {
            let mut s = lock(&self.shared);
            // again: a revocation's fetch stop, on librdkafka's thread, may have cleared the
            // forwarding an assignment of the same partition set after it (see `queue`)
            if let Some(q) = s.fetch_queue() {
                for (topic, partition) in s.parts.keys() {
                    q.forward(topic, *partition);
                }
            }
            s.take_batches()
        };
        let had_data = !batches.is_empty();
        self.hand_on(batches.into_iter().map(|(p, b)| (p, Message::Batch(b))))?;
        // after the hand-off, which may have served a rebalance
        let (parts, ports, generation) = {
            let s = lock(&self.shared);
            self.held_bytes.set(s.held_bytes as f64);
            (s.parts_snapshot(), s.ports.clone(), s.generation)
        };
        self.paused.set(parts.iter().filter(|(_, p)| p.paused).count() as f64);
        let view = self.view(&parts, &ports, true);
        let mut watermarks = Vec::new();
        for (topic, &port) in &ports {
            let Some(clock) = &self.clocks[port] else { continue };
            let of_topic: Vec<(i32, &AlignInput)> =
                parts.iter().zip(&view).filter(|((tp, _), _)| &tp.0 == topic).map(|((tp, _), v)| (tp.1, v)).collect();
            // none holds it: the global task does not wait for this task's stream (see `kafka::global`)
            clock.set_idle(!of_topic.iter().any(|(_, v)| v.holding));
            let wm = stream_watermark(of_topic.iter().map(|(_, v)| (v.holding, v.watermark)));
            tracing::trace!(source = self.name, topic, ?of_topic, ?wm, "watermark");
            if let Some(wm) = wm.filter(|w| *w > last_wm[port]) {
                last_wm[port] = wm;
                watermarks.push((port, Message::Watermark(wm)));
            }
        }
        // all decided on the same view, then handed on
        self.hand_on(watermarks)?;
        // alignment decides on the view too: not if an assignment came during the hand-off
        // (the next flush decides on a new one)
        let assigned = lock(&self.shared).generation != generation;
        let released = match self.cfg.max_drift {
            Some(_) if assigned => 0,
            Some(drift) => {
                let released = self.align(&parts, &view, Alignment { max_drift_ms: drift.as_millis_i64() })?;
                self.watch_alignment(&parts, &view);
                released
            }
            None => 0,
        };
        Ok((had_data || released > 0, released))
    }

    /// After alignment decided, at a flush: how long the paused partitions have waited on a
    /// slowest partition that does not move (neither read on nor its watermark moving:
    /// `citystream_kafka_alignment_stalled_seconds`), with a warning naming it once that is
    /// longer than a quiet partition holds the watermark (twice `idle_partition_timeout`, 10 s
    /// at least): its broker stalled or its leader gone, every paused partition waits for it.
    fn watch_alignment(&self, parts: &[(Tp, Part)], view: &[AlignInput]) {
        let paused = lock(&self.shared).parts.values().filter(|p| p.paused).count();
        let slowest = (paused > 0).then(|| Alignment::slowest(view)).flatten();
        let waited_on = slowest.map(|i| (parts[i].0.clone(), (view[i].watermark, parts[i].1.position)));
        let warn_after = (self.cfg.idle_partition_timeout.to_std() * 2).max(Duration::from_secs(10));
        let mut wait = self.alignment_wait.borrow_mut();
        let was_warned = wait.warned;
        let stood = wait.observe(waited_on, Instant::now(), warn_after / 2);
        self.alignment_stalled.set(stood.as_secs_f64());
        if stood >= warn_after && !wait.warned {
            wait.warned = true;
            if let Some((topic, partition)) = slowest.map(|i| &parts[i].0) {
                tracing::warn!(
                    source = self.name,
                    topic,
                    partition,
                    paused,
                    "watermark alignment has waited {}s on a partition that is not read on and whose watermark \
                     does not move (its broker stalled, or its leader gone?): the partitions paused for it go on \
                     once it moves; `max_drift: null` reads them on meanwhile",
                    stood.as_secs()
                );
            }
        } else if was_warned && !wait.warned {
            tracing::info!(source = self.name, "watermark alignment: the wait on a partition that did not move ended");
        }
    }

    /// Watermark alignment between flushes (after a full batch): a backlog reads more in one
    /// `batch_wait` than `max_drift` spans, so deciding only at flushes let a paused
    /// partition's hold fill. Returns how many held messages it handed on.
    fn realign(&self, max_drift_ms: i64) -> Result<u64, PipelineError> {
        let (parts, ports) = {
            let s = lock(&self.shared);
            (s.parts_snapshot(), s.ports.clone())
        };
        // only log ends librdkafka or an earlier query knows: no broker request per batch
        let view = self.view(&parts, &ports, false);
        self.align(&parts, &view, Alignment { max_drift_ms })
    }

    /// Per partition: its watermark, whether it holds the stream back, its backlog.
    /// `ask`: ask the brokers for the log ends librdkafka does not know, without waiting
    /// ([`LogEnds`]: at most once a second per partition, the answer used once it has come);
    /// a partition whose end neither knows counts as having a backlog.
    fn view(&self, parts: &[(Tp, Part)], ports: &BTreeMap<String, usize>, ask: bool) -> Vec<AlignInput> {
        let idle_after = self.cfg.idle_partition_timeout.to_std();
        // the librdkafka fetch path: log ends librdkafka has, else those asked for
        let cached: Vec<Option<i64>> = match self.native {
            Some(_) => Vec::new(),
            None => parts.iter().map(|((topic, partition), _)| self.cached_log_end(topic, *partition)).collect(),
        };
        if ask && self.native.is_none() {
            let unknown: Vec<Tp> =
                parts.iter().zip(&cached).filter(|(_, end)| end.is_none()).map(|((tp, _), _)| tp.clone()).collect();
            let mut log_ends = self.log_ends.borrow_mut();
            log_ends.refresh(self.consumer.client().native_ptr(), &unknown);
            log_ends.retain(|tp| parts.binary_search_by(|(t, _)| t.cmp(tp)).is_ok());
        }
        let log_ends = self.log_ends.borrow();
        parts
            .iter()
            .enumerate()
            .map(|(i, (tp, p))| {
                let backlog = match self.native {
                    // past the records handed on, held, skipped as aborted and the markers; a
                    // paused partition is not fetched, so counts as behind
                    Some(_) => p.paused || p.fetched_end.is_none_or(|end| p.fetch_at < end),
                    None => cached[i].or_else(|| log_ends.known(tp)).is_none_or(|end| p.position < end),
                };
                let watermark = ports.get(&tp.0).and_then(|&port| self.clocks[port].as_ref()?.watermark(tp.1));
                let idle = !backlog && p.active_at.elapsed() >= idle_after;
                AlignInput { watermark, holding: !idle, backlog, paused: p.paused }
            })
            .collect()
    }

    /// Pauses and resumes partitions as `alignment` decides. A paused partition is read on
    /// into its hold (with `max_held_bytes: 0`, paused in librdkafka at once; with the native
    /// fetch, left out of the requests, so only what was on its way is held); a resumed one
    /// hands its held messages on first. Returns how many held messages it handed on.
    fn align(&self, parts: &[(Tp, Part)], view: &[AlignInput], alignment: Alignment) -> Result<u64, PipelineError> {
        let (pause, resume) = alignment.decide(view);
        if pause.is_empty() && resume.is_empty() {
            return Ok(0);
        }
        let mut fetch_pause = TopicPartitionList::new();
        let mut fetch_resume: Vec<(Tp, i64)> = Vec::new();
        let mut released = Vec::new();
        let mut guard = lock(&self.shared);
        // the fields themselves, not through the guard: a partition and its hold at once
        let s: &mut Shared = &mut guard;
        let now = Instant::now();
        for &i in &pause {
            let tp = &parts[i].0;
            let Some(p) = s.parts.get_mut(tp) else { continue };
            p.paused = true;
            if self.cfg.max_held_bytes == 0 && self.native.is_none() {
                let mut h = Held::new(s.ports.get(&tp.0).copied().unwrap_or_default(), 0, 0);
                h.fetch_paused = true;
                s.held.insert(tp.clone(), h);
                fetch_pause.add_partition(&tp.0, tp.1);
            }
        }
        let mut handed = 0u64;
        for &i in &resume {
            let tp = &parts[i].0;
            let Some(p) = s.parts.get_mut(tp) else { continue };
            p.paused = false;
            let Some(h) = s.held.remove(tp) else { continue };
            if h.fetch_paused {
                // from where this source goes on, not librdkafka's position: an error it
                // passed on in a batch moved that as a message would
                let next = if h.messages > 0 { h.next } else { p.position };
                fetch_resume.push((tp.clone(), next));
            }
            if h.messages > 0 {
                p.position = h.next;
                p.read = true;
                p.active_at = now;
            }
            s.held_bytes -= h.bytes;
            // what its port read before the pause goes first (`realign` runs between flushes)
            if h.messages > 0 && !s.builders[h.port].is_empty() {
                released.push((h.port, s.builders[h.port].finish()));
            }
            handed += h.messages;
            self.events[h.port].inc_by(h.messages);
            self.bytes[h.port].inc_by(h.bytes as u64);
            let port = h.port;
            released.extend(h.into_batches().into_iter().map(|b| (port, b)));
        }
        let n = s.parts.values().filter(|p| p.paused).count();
        let held_bytes = s.held_bytes;
        drop(guard);
        // librdkafka is told before the held messages are sent: a send into a full pipeline
        // polls the consumer, and a revocation inside that poll may take these partitions
        // away (nothing is read meanwhile: what librdkafka fetches after the resume is read
        // after the held messages, which are the partitions' next)
        if fetch_pause.count() > 0 {
            self.consumer.pause(&fetch_pause).map_err(|e| self.err(format!("pausing partitions: {e}")))?;
            self.fetch_pauses.inc_by(fetch_pause.count() as u64);
        }
        if !fetch_resume.is_empty() {
            let mut tpl = TopicPartitionList::new();
            for ((topic, partition), next) in &fetch_resume {
                // asynchronous (no wait): librdkafka applies it before the resume below
                self.consumer
                    .seek(topic, *partition, rdkafka::Offset::Offset(*next), Duration::ZERO)
                    .map_err(|e| self.err(format!("seeking {topic}/{partition} to {next}: {e}")))?;
                tpl.add_partition(topic, *partition);
            }
            self.consumer.resume(&tpl).map_err(|e| self.err(format!("resuming partitions: {e}")))?;
        }
        self.hand_on(released.into_iter().map(|(port, b)| (port, Message::Batch(b))))?;
        self.paused.set(n as f64);
        self.held_bytes.set(held_bytes as f64);
        let slowest = view.iter().filter(|v| v.holding).filter_map(|v| v.watermark).min();
        // a backlog pauses and resumes every few batches: the metrics count them
        tracing::debug!(
            source = self.name,
            paused = pause.len(),
            resumed = resume.len(),
            now_paused = n,
            released = handed,
            held_bytes,
            slowest = slowest.map(crate::simulator::rfc3339),
            "watermark alignment"
        );
        Ok(handed)
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
