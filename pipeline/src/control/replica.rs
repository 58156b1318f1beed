//! A book kept by the alerts topic, so that several control centers serve one book.
//!
//! - Every instance reads every partition of `alerts_topic` from its beginning (no consumer
//!   group: nothing is committed, nothing is shared but the topic) and applies the events in
//!   the topic's order through [`Book::apply_log`]. Rule events and operators' decisions are
//!   keyed by location, so one alert's events are in one partition, in one order, for all.
//! - Until it has read up to the ends the partitions had when it started, an instance is
//!   *catching up*: `/api/ready` answers 503 and decisions are refused.
//! - A decision is produced to the topic first and applied when it is read back, by every
//!   instance alike; the one that made it waits for its outcome (by `decision_id`) to answer.
//!   Two rooms deciding on one alert at once: the topic orders them, the first is applied
//!   everywhere, the second refused everywhere.
//! - Runs on a thread of its own (a `BaseConsumer` polled in a loop) until stopped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
#[cfg(feature = "kafka")]
use std::time::Duration;

use citystream_operators::{Counter, Metrics};
#[cfg(feature = "kafka")]
use rdkafka::consumer::{BaseConsumer, Consumer};
#[cfg(feature = "kafka")]
use rdkafka::error::KafkaError;
#[cfg(feature = "kafka")]
use rdkafka::message::Message;
#[cfg(feature = "kafka")]
use rdkafka::types::RDKafkaErrorCode;
#[cfg(feature = "kafka")]
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{broadcast, oneshot};

use super::ControlError;
use super::book::{AlertView, Book};
use super::config::ControlKafka;

/// The outcome of a decision read back from the topic: the alert after it, or why the book
/// refused it.
pub(crate) type Outcome = Result<AlertView, String>;

/// What the thread and the request handlers share.
#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    caught_up: AtomicBool,
    /// Decisions made here and not yet read back, by id.
    waiting: Mutex<HashMap<String, oneshot::Sender<Outcome>>>,
}

/// The thread that applies the alerts topic to the book (see the module docs).
pub(crate) struct Replica {
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica").field("caught_up", &self.caught_up()).finish_non_exhaustive()
    }
}

/// What the thread applies events to.
pub(crate) struct Target {
    pub(crate) book: Arc<Mutex<Book>>,
    pub(crate) events: broadcast::Sender<String>,
}

impl Replica {
    /// Starts following `k.alerts_topic` into `target`.
    pub(crate) fn start(name: &str, k: &ControlKafka, target: Target, metrics: &Metrics) -> Result<Self, ControlError> {
        let bad = |problem: String| ControlError::Config { key: "kafka", problem };
        let topic = k
            .alerts_topic
            .clone()
            .ok_or_else(|| bad("a shared book is read from the alerts topic: set `kafka.alerts_topic`".into()))?;
        #[cfg(not(feature = "kafka"))]
        {
            let _ = (name, topic, target, metrics);
            Err(bad("this build has no Kafka support (feature `kafka`)".into()))
        }
        #[cfg(feature = "kafka")]
        Self::follow_topic(name, k, topic, target, metrics)
    }

    #[cfg(feature = "kafka")]
    fn follow_topic(
        name: &str,
        k: &ControlKafka,
        topic: String,
        target: Target,
        metrics: &Metrics,
    ) -> Result<Self, ControlError> {
        let bad = |problem: String| ControlError::Config { key: "kafka", problem };
        let mut cc = crate::kafka::client_config(&k.brokers, &k.properties);
        for (key, v) in [
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("enable.partition.eof", "true"),
            ("auto.offset.reset", "earliest"),
            // librdkafka wants a group even for assigned partitions; this one never joins or commits
            ("group.id", "citystream-control-replica"),
            // decisions come back within a tenth of a second: the topic is small
            ("fetch.wait.max.ms", "100"),
        ] {
            cc.set(key, v);
        }
        let consumer: BaseConsumer = cc.create().map_err(|e| bad(e.to_string()))?;
        let counters = Counters {
            applied: metrics.counter(
                "citystream_control_topic_events_total",
                "Events of the alerts topic applied to the shared book.",
                &[("control", name)],
            ),
            refused: metrics.counter(
                "citystream_control_topic_refused_total",
                "Decisions on the alerts topic the shared book refused (another came first).",
                &[("control", name)],
            ),
            bad: metrics.counter(
                "citystream_control_topic_bad_events_total",
                "Messages on the alerts topic that are not alert events (skipped).",
                &[("control", name)],
            ),
        };
        let mut watch = crate::kafka::rebootstrap::Rebootstrap::new(format!("the control center `{name}`'s replica"));
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("{name}-replica"))
            .spawn(move || follow(&consumer, &mut watch, &topic, &s, &target, &counters))
            .map_err(|e| bad(format!("starting the thread that reads the alerts topic: {e}")))?;
        Ok(Self { shared, thread: Mutex::new(Some(thread)) })
    }

    /// Whether the book has read the topic up to where it ended at start.
    pub(crate) fn caught_up(&self) -> bool {
        self.shared.caught_up.load(Ordering::Acquire)
    }

    /// Registers a decision about to be produced; the receiver gets its outcome once read back.
    pub(crate) fn expect(&self, decision_id: &str) -> oneshot::Receiver<Outcome> {
        let (tx, rx) = oneshot::channel();
        self.shared.waiting.lock().unwrap_or_else(|e| e.into_inner()).insert(decision_id.to_owned(), tx);
        rx
    }

    /// Stops waiting for a decision (it was not produced, or the request gave up).
    pub(crate) fn forget(&self, decision_id: &str) {
        self.shared.waiting.lock().unwrap_or_else(|e| e.into_inner()).remove(decision_id);
    }

    /// Stops the thread and waits for it.
    pub(crate) fn stop(&self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How often the alerts topic's partitions are listed again.
#[cfg(feature = "kafka")]
const PARTITIONS_EVERY: Duration = Duration::from_secs(30);

/// The largest message applied (the broker's default `message.max.bytes`): an alert event is
/// a few hundred bytes, a city-wide storm summary listing every location a few tens of KiB;
/// anything larger is not one, and is skipped.
const MAX_EVENT_BYTES: usize = 1024 * 1024;

#[cfg_attr(not(feature = "kafka"), allow(dead_code))]
struct Counters {
    applied: Counter,
    refused: Counter,
    bad: Counter,
}

#[cfg(feature = "kafka")]
/// The partitions of `topic`.
fn partitions(consumer: &BaseConsumer, topic: &str) -> Result<Vec<i32>, String> {
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).map_err(|e| e.to_string())?;
    let t = md.topics().first().ok_or("no metadata")?;
    if let Some(e) = t.error() {
        return Err(format!("{:?}", RDKafkaErrorCode::from(e)));
    }
    if t.partitions().is_empty() {
        return Err("the topic has no partitions".into());
    }
    Ok(t.partitions().iter().map(|p| p.id()).collect())
}

#[cfg(feature = "kafka")]
/// Adds the partitions of `topic` not in `known` to the assignment, from their beginning;
/// returns the end each had then (those with messages only).
fn assign_new(consumer: &BaseConsumer, topic: &str, known: &mut Vec<i32>) -> Result<HashMap<i32, i64>, String> {
    let mut list = TopicPartitionList::new();
    let mut ends = HashMap::new();
    let fresh: Vec<i32> = partitions(consumer, topic)?.into_iter().filter(|p| !known.contains(p)).collect();
    for &p in &fresh {
        let (low, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10)).map_err(|e| e.to_string())?;
        list.add_partition_offset(topic, p, Offset::Beginning).map_err(|e| e.to_string())?;
        if high > low {
            ends.insert(p, high);
        }
    }
    if !fresh.is_empty() {
        consumer.incremental_assign(&list).map_err(|e| e.to_string())?;
        known.extend(fresh);
    }
    Ok(ends)
}

#[cfg(feature = "kafka")]
/// The thread's loop: assign, then apply every message until stopped; `watch` keeps a broker
/// known to the consumer.
fn follow(
    consumer: &BaseConsumer,
    watch: &mut crate::kafka::rebootstrap::Rebootstrap,
    topic: &str,
    shared: &Shared,
    target: &Target,
    counters: &Counters,
) {
    let stopped = || shared.stop.load(Ordering::Acquire);
    let mut warned = false;
    let mut known = Vec::new();
    // partitions not yet read up to their end at start
    let mut behind = loop {
        if stopped() {
            return;
        }
        watch.keep_known(consumer.client().native_ptr());
        match assign_new(consumer, topic, &mut known) {
            Ok(ends) => break ends,
            Err(e) => {
                if !warned {
                    tracing::warn!(topic, "control center: cannot read the alerts topic yet ({e}); retrying");
                    warned = true;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    };
    let announce = |behind: &HashMap<i32, i64>| {
        if behind.is_empty() && !shared.caught_up.swap(true, Ordering::AcqRel) {
            let alerts = target.book.lock().unwrap_or_else(|e| e.into_inner()).alerts.len();
            tracing::info!(topic, alerts, "control center: the shared book has caught up with the alerts topic");
        }
    };
    announce(&behind);
    let schema = citystream_operators::alert::alert_schema();
    let mut looked = std::time::Instant::now();
    while !stopped() {
        // partitions added to the topic are read from their beginning too
        if looked.elapsed() > PARTITIONS_EVERY {
            looked = std::time::Instant::now();
            match assign_new(consumer, topic, &mut known) {
                // still catching up: the new partitions' ends count too
                Ok(ends) if !shared.caught_up.load(Ordering::Acquire) => behind.extend(ends),
                Ok(ends) if !ends.is_empty() => tracing::warn!(
                    topic,
                    partitions = known.len(),
                    "control center: the alerts topic has more partitions: a location's events may now be split \
                     across two of them, in no agreed order; keep its partition count fixed"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(topic, "control center: looking for new partitions of the alerts topic: {e}"),
            }
        }
        watch.keep_known(consumer.client().native_ptr());
        let Some(m) = consumer.poll(Duration::from_millis(100)) else { continue };
        let m = match m {
            Ok(m) => m,
            Err(KafkaError::PartitionEOF(p)) => {
                behind.remove(&p);
                announce(&behind);
                continue;
            }
            Err(e) => {
                tracing::warn!(topic, "control center: reading the alerts topic: {e}");
                continue;
            }
        };
        let (p, offset) = (m.partition(), m.offset());
        if behind.get(&p).is_some_and(|end| offset + 1 >= *end) {
            behind.remove(&p);
        }
        match decode(&schema, m.payload().unwrap_or_default()) {
            Ok(batch) => apply(&batch, shared, target, counters),
            Err(e) => {
                counters.bad.inc();
                tracing::warn!(
                    topic,
                    partition = p,
                    offset,
                    "control center: skipped a message that is not an alert event: {e}"
                );
            }
        }
        announce(&behind);
    }
}

#[cfg_attr(not(feature = "kafka"), allow(dead_code))]
/// One message (a JSON object in the alert schema, as the Kafka sink writes it) as a batch.
fn decode(schema: &arrow::datatypes::SchemaRef, payload: &[u8]) -> Result<arrow::array::RecordBatch, String> {
    if payload.len() > MAX_EVENT_BYTES {
        return Err(format!("{} bytes, over {MAX_EVENT_BYTES}", payload.len()));
    }
    let mut d = arrow::json::ReaderBuilder::new(schema.clone()).build_decoder().map_err(|e| e.to_string())?;
    let used = d.decode(payload).map_err(|e| e.to_string())?;
    if used != payload.len() && payload[used..].iter().any(|b| !b.is_ascii_whitespace()) {
        return Err("more than one JSON object".into());
    }
    let batch = d.flush().map_err(|e| e.to_string())?.ok_or("empty message")?;
    if batch.num_rows() != 1 {
        return Err(format!("{} rows in one message", batch.num_rows()));
    }
    Ok(batch)
}

#[cfg_attr(not(feature = "kafka"), allow(dead_code))]
fn apply(batch: &arrow::array::RecordBatch, shared: &Shared, target: &Target, counters: &Counters) {
    let applied = match target.book.lock().unwrap_or_else(|e| e.into_inner()).apply_log(batch) {
        Ok(a) => a,
        Err(e) => {
            counters.bad.inc();
            tracing::warn!("control center: an alert event the book cannot apply: {e}");
            return;
        }
    };
    for a in applied {
        counters.applied.inc();
        if let Some(m) = a.message {
            let _ = target.events.send(m);
        }
        if let Some((id, outcome)) = a.decision {
            if outcome.is_err() {
                counters.refused.inc();
            }
            if let Some(tx) = shared.waiting.lock().unwrap_or_else(|e| e.into_inner()).remove(&id) {
                let _ = tx.send(outcome);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alert_events_as_the_kafka_sink_writes_them_decode_back_to_the_same_rows() {
        let schema = citystream_operators::alert::alert_schema();
        let view = AlertView {
            alert_id: "incident_model:seg-00-03:600000".into(),
            rule: "incident_model".into(),
            alert_type: "incident".into(),
            severity: "critical".into(),
            location: "seg-00-03".into(),
            state: "open".into(),
            active: true,
            opened_at: 600_000,
            updated_at: 600_000,
            emitted_at: 1_764_000_000_123,
            value: None,
            threshold: 0.9,
            peak: Some(0.97),
            locations: 1,
            joined: Default::default(),
            evidence: serde_json::Value::Null,
            decisions: vec![],
        };
        let event =
            super::super::decisions::decision_event(1_764_000_000_456, &view, "acknowledged", "op", "é \"x\"", "d1");
        let mut w = arrow::json::LineDelimitedWriter::new(Vec::new());
        w.write(&event).unwrap();
        w.finish().unwrap();
        let line = w.into_inner();
        let back = decode(&schema, line.trim_ascii_end()).unwrap();
        assert_eq!(back, event, "{}", String::from_utf8_lossy(&line));
        let oversized = [b" ".repeat(MAX_EVENT_BYTES), line.clone()].concat();
        for bad in [
            &b"{}"[..],
            b"not json",
            b"{\"alert_id\": 3}",
            b"",
            &[line.as_slice(), line.as_slice()].concat(),
            &oversized,
        ] {
            assert!(decode(&schema, bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
