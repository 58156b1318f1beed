//! The Kafka source against the suite's broker (`CITYSTREAM_KAFKA_BROKERS`, as the Kafka
//! tests), handing on to a pipeline played by the test that stops taking anything for 16 s,
//! twice `max.poll.interval.ms`: the source keeps its group meanwhile ([`super::handoff`]), and
//! a second member that joins during the stall takes a partition over exactly where the source
//! committed it. Both fetch paths.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::{Int32Array, Int64Array};
use citystream_operators::{Message, Metrics};
use citystream_schemas::EventKind;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message as _;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use tokio::sync::{mpsc, watch};

use crate::kafka::KafkaSourceConfig;
use crate::task::{CheckpointAcks, Edge, Outputs, Recovery, Source, SourceContext};

/// Messages per partition (two partitions).
const PER_PARTITION: i64 = 1500;
/// How long the pipeline takes nothing, once it has taken [`ROWS_BEFORE_STALL`] rows.
const STALL: Duration = Duration::from_secs(16);
const ROWS_BEFORE_STALL: usize = 400;
/// When, into the stall, the second member joins.
const JOIN_AFTER: Duration = Duration::from_secs(11);

/// (partition, offset) of every message someone read.
type Offsets = Vec<(i32, i64)>;

/// A message the source handed on: its partition and offset, and the newest checkpoint
/// barrier the pipeline had taken before it.
struct Handed {
    partition: i32,
    offset: i64,
    after_barrier: u64,
}

/// What the second member found committed for a partition it was given: the offset, and the
/// checkpoint epoch the source committed it at (the commit's metadata, `lineage:epoch`).
struct Committed {
    partition: i32,
    offset: i64,
    epoch: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_pipeline_keeps_the_native_source_in_its_group_and_a_rebalance_hands_over_exactly() {
    stalled_pipeline("native").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_pipeline_keeps_the_librdkafka_source_in_its_group_and_a_rebalance_hands_over_exactly() {
    stalled_pipeline("librdkafka").await;
}

async fn stalled_pipeline(fetch: &str) {
    if let Ok(filter) = std::env::var("CITYSTREAM_TEST_RUST_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
    }
    let brokers = crate::kafka::test_brokers();
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let topic = format!("handoff-{fetch}-{}-{stamp}", std::process::id());
    let group = format!("{topic}-group");
    let created = crate::kafka::ensure_topics(&brokers, &[topic.clone()].into(), &Default::default(), 2, 1)
        .await
        .unwrap_or_else(|e| panic!("needs a Kafka broker at {brokers} (CITYSTREAM_KAFKA_BROKERS): {e}"));
    assert_eq!(created.0, std::slice::from_ref(&topic));
    // record batches of 20 messages, fetched a few at a time (`max.partition.fetch.bytes`
    // below): the source reads both partitions on together
    let producer: BaseProducer =
        ClientConfig::new().set("bootstrap.servers", &brokers).set("batch.num.messages", "20").create().unwrap();
    for partition in 0..2 {
        for i in 0..PER_PARTITION {
            let payload = format!("{{\"n\":{i}}}");
            let mut record = BaseRecord::<(), str>::to(&topic).partition(partition).payload(payload.as_str());
            while let Err((e, back)) = producer.send(record) {
                assert!(matches!(e.rdkafka_error_code(), Some(rdkafka::types::RDKafkaErrorCode::QueueFull)), "{e}");
                producer.poll(Duration::from_millis(10));
                record = back;
            }
        }
    }
    producer.flush(Duration::from_secs(30)).unwrap();

    // the classic protocol's eager rebalance: a join revokes every partition, and the source is
    // given one of them again at once (from the offset it committed)
    let yaml = format!(
        "brokers: {brokers}\ngroup_id: {group}\ntopics: {{traffic: {topic}, camera: null, environment: null}}\n\
         batch_rows: 50\nbatch_wait: 20ms\ncheckpoint_interval: 200ms\ncommit_timeout: 2s\nstop_when_idle: 6s\n\
         max_drift: null\nfetch: {fetch}\nproperties:\n  session.timeout.ms: \"6000\"\n  \
         heartbeat.interval.ms: \"500\"\n  max.poll.interval.ms: \"8000\"\n  partition.assignment.strategy: range\n  \
         max.partition.fetch.bytes: \"2048\"\n"
    );
    let cfg: KafkaSourceConfig = serde_saphyr::from_str(&yaml).unwrap();
    let ports = EventKind::ALL.len();
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..ports).map(|_| mpsc::channel::<Message>(1)).unzip();
    let (mut sink_acks, acks) = CheckpointAcks::new(1);
    let (_stop_tx, stop) = watch::channel(false);
    let metrics = Metrics::new();
    let ctx = SourceContext {
        name: "kafka".into(),
        outputs: Outputs { ports: txs.into_iter().map(|tx| vec![Edge { tx }]).collect() },
        clocks: vec![None; ports],
        routing: vec![None; ports],
        stop,
        metrics: metrics.clone(),
        acks,
        recovery: Recovery { state: None, sink_roots: Vec::new(), commits: Default::default() },
    };
    let source = tokio::spawn(Box::new(cfg).run(ctx));

    let stalled_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let pipeline = tokio::spawn(take(rxs, sink_acks.pop().unwrap(), stalled_at.clone()));
    let joiner = std::thread::spawn({
        let (brokers, group, topic) = (brokers.clone(), group.clone(), topic.clone());
        move || {
            let start = Instant::now();
            let stalled = loop {
                if let Some(at) = *stalled_at.lock().unwrap() {
                    break at;
                }
                assert!(start.elapsed() < Duration::from_secs(120), "the pipeline stalled within 2 minutes");
                std::thread::sleep(Duration::from_millis(20));
            };
            std::thread::sleep((stalled + JOIN_AFTER).saturating_duration_since(Instant::now()));
            second_member(&brokers, &group, &topic)
        }
    });

    let report = tokio::time::timeout(Duration::from_secs(240), source)
        .await
        .expect("the source ended within 4 minutes")
        .unwrap()
        .unwrap_or_else(|e| panic!("the source went through the stall: {e}"));
    let handed = pipeline.await.unwrap();
    let (read, committed) = tokio::task::spawn_blocking(move || joiner.join().unwrap()).await.unwrap();
    assert!(report.messages >= handed.len() as u64, "{} read, {} handed on", report.messages, handed.len());
    let of = |p: i32| handed.iter().filter(|h| h.partition == p).count();
    eprintln!(
        "{fetch}: the source handed on {} + {} messages, the second member read {}, found committed {:?}",
        of(0),
        of(1),
        read.len(),
        committed.iter().map(|c| (c.partition, c.offset, c.epoch)).collect::<Vec<_>>()
    );
    assert!(!read.is_empty(), "the second member was given a partition with messages left");
    // what the source committed when the partition was revoked had reached the pipeline
    // before that checkpoint's barrier (what it was handing on when the rebalance came too)
    assert!(!committed.is_empty(), "the source committed the partition it gave up");
    for c in &committed {
        let late: Vec<i64> = handed
            .iter()
            .filter(|h| h.partition == c.partition && h.offset < c.offset && h.after_barrier >= c.epoch)
            .map(|h| h.offset)
            .collect();
        assert!(
            late.is_empty(),
            "partition {}: committed at offset {} with checkpoint {}, but offsets {:?}… reached the pipeline \
             after that checkpoint's barrier",
            c.partition,
            c.offset,
            c.epoch,
            &late[..late.len().min(10)]
        );
    }
    // the source waited out the stall in a hand-off (polling its group), not elsewhere
    let waited = metrics.value("citystream_kafka_backpressure_milliseconds_total", &[("source", "kafka")]);
    assert!(waited.is_some_and(|ms| ms >= 10_000.0), "the source waited on the stalled pipeline: {waited:?} ms");
    // every message of each partition, once, from the source or the second member
    let mut all: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    for (partition, offset) in handed.iter().map(|h| (h.partition, h.offset)).chain(read.iter().copied()) {
        all.entry(partition).or_default().push(offset);
    }
    for partition in 0..2 {
        let mut got = all.remove(&partition).unwrap_or_default();
        got.sort_unstable();
        let want: Vec<i64> = (0..PER_PARTITION).collect();
        if got != want {
            let mut seen = std::collections::BTreeSet::new();
            let twice: Vec<i64> = got.iter().copied().filter(|o| !seen.insert(*o)).take(10).collect();
            let missing: Vec<i64> = want.iter().copied().filter(|o| !seen.contains(o)).take(10).collect();
            panic!(
                "partition {partition}: {} messages for {PER_PARTITION}; twice (first ten) {twice:?}, missing \
                 {missing:?}; the second member read {} of this partition",
                got.len(),
                read.iter().filter(|(p, _)| *p == partition).count()
            );
        }
    }
}

/// The pipeline: takes what the source hands on (one message of room per port), acknowledging
/// each barrier once every port has brought it; after [`ROWS_BEFORE_STALL`] rows it takes
/// nothing for [`STALL`] (once; once it has rows of both partitions), noting when in
/// `stalled_at`. Returns the messages handed on.
async fn take(
    mut rxs: Vec<mpsc::Receiver<Message>>,
    ack: crate::task::SinkAck,
    stalled_at: Arc<Mutex<Option<Instant>>>,
) -> Vec<Handed> {
    let mut handed = Vec::new();
    // the newest barrier taken on the traffic port
    let traffic = EventKind::ALL.iter().position(|k| *k == EventKind::Traffic).unwrap();
    let mut after_barrier = 0;
    let mut barriers: BTreeMap<u64, usize> = BTreeMap::new();
    let ports = rxs.len();
    let mut ended = vec![false; ports];
    let mut stalled = false;
    while ended.iter().any(|e| !e) {
        let mut took = false;
        for (port, rx) in rxs.iter_mut().enumerate() {
            if ended[port] {
                continue;
            }
            match rx.try_recv() {
                Ok(Message::Batch(b)) => {
                    took = true;
                    let partitions = b.column_by_name("partition").unwrap().as_any().downcast_ref::<Int32Array>();
                    let offsets = b.column_by_name("offset").unwrap().as_any().downcast_ref::<Int64Array>();
                    let rows = partitions.unwrap().values().iter().zip(offsets.unwrap().values());
                    handed.extend(rows.map(|(&partition, &offset)| Handed { partition, offset, after_barrier }));
                }
                Ok(Message::Barrier(barrier)) => {
                    took = true;
                    if port == traffic {
                        after_barrier = barrier.epoch;
                    }
                    let seen = barriers.entry(barrier.epoch).or_default();
                    *seen += 1;
                    if *seen == ports {
                        ack.ack(barrier.epoch);
                    }
                }
                Ok(Message::End) | Err(mpsc::error::TryRecvError::Disconnected) => ended[port] = true,
                Ok(Message::Watermark(_)) | Err(mpsc::error::TryRecvError::Empty) => {}
            }
        }
        if !stalled && handed.len() >= ROWS_BEFORE_STALL && handed.iter().any(|h| h.partition != handed[0].partition) {
            stalled = true;
            eprintln!("the pipeline stalls after {} messages", handed.len());
            *stalled_at.lock().unwrap() = Some(Instant::now());
            tokio::time::sleep(STALL).await;
        } else if !took {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    handed
}

/// A member of `group` (librdkafka's, the classic protocol) reading `topic` from the committed
/// offsets until it has had nothing for 4 s, then committing and leaving. Returns what it
/// read, and what it found committed for the partitions it was given.
fn second_member(brokers: &str, group: &str, topic: &str) -> (Offsets, Vec<Committed>) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .set("partition.assignment.strategy", "range")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let joined = Instant::now();
    let mut committed = None;
    let mut read = Offsets::new();
    let mut last = None::<Instant>;
    while joined.elapsed() < Duration::from_secs(90) && last.is_none_or(|l| l.elapsed() < Duration::from_secs(4)) {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                read.push((m.partition(), m.offset()));
                last = Some(Instant::now());
            }
            Some(Err(e)) => eprintln!("second member: {e}"),
            None => {}
        }
        if committed.is_none() && consumer.assignment().is_ok_and(|a| a.count() > 0) {
            let offsets = consumer.committed(Duration::from_secs(10)).unwrap();
            let found = offsets.elements().into_iter().filter_map(|e| {
                let rdkafka::Offset::Offset(offset) = e.offset() else { return None };
                let epoch = e.metadata().rsplit(':').next()?.parse().ok()?;
                Some(Committed { partition: e.partition(), offset, epoch })
            });
            committed = Some(found.collect());
        }
    }
    if !read.is_empty() {
        consumer.commit_consumer_state(CommitMode::Sync).unwrap();
    }
    (read, committed.unwrap_or_default())
}
