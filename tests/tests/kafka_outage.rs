//! The broker goes away for 20 seconds in the middle of a stream, or stops answering for 30:
//! the pipeline waits, recovers and loses nothing. Its own test binary, so stopping the broker
//! cannot disturb other tests (cargo runs test binaries one after another); its tests take
//! turns ([`BROKER`]).

mod common;

use std::path::Path;
use std::time::Duration;

use citystream_operators::Metrics;
use citystream_pipeline::config::{self, plan::plan};
use citystream_pipeline::runtime::{self, StopHandle};
use common::*;

/// Held by a test while it stops the broker or makes it stop answering.
static BROKER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_of_20_seconds_loses_nothing() {
    let _turn = BROKER.lock().await;
    let topics = create_topics(&unique("t4"), 3).await;
    let report = produce(&topics, 26, 404).await;
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    // small batches and a slow start so the outage lands mid-stream; idle end well after it
    // The session outlives the outage, so the group keeps our assignment. (With a shorter
    // session the assignment is lost and the source stops on purpose: another member may have
    // taken the partitions, and a restart replays exactly-once from the last commit.) The
    // outage is the 20 s below plus the broker's stop and restart: 4 s alone, but 22 s beside
    // the suite's other tests on 2 cores, where 45 s of session ran out twice.
    let text = yaml(&topics, &unique("g4"), &lake, "40s")
        .replace("batch_rows: 4096", "batch_rows: 256")
        .replace("session.timeout.ms: \"10000\"", "session.timeout.ms: \"90000\"");
    run_through(&text, &lake, &report, Metrics::new(), || {
        broker_script("stop.sh");
        std::thread::sleep(Duration::from_secs(20));
        broker_script("start.sh");
    })
    .await;
}

/// The group coordinator stops answering for 30 seconds (the broker is SIGSTOPped: its
/// connections stay open, nothing comes back) while offsets are being committed. A commit
/// waited for its answer without bound: the consumer thread stood still, stopped polling,
/// and librdkafka left the group once `max.poll.interval.ms` (12 s here) passed, so the
/// source lost its assignment and stopped. Committing with a bounded wait, the thread goes on
/// polling, keeps its partitions, and commits once the broker answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_that_stops_answering_does_not_stall_the_source() {
    stall_for_30_seconds("librdkafka", "t5", 405).await;
}

/// As above with the native fetch (the default), whose unanswered Fetch waited up to its 30 s
/// I/O timeout inside a round: the consumer thread stopped polling as with the unbounded
/// commit. A round now waits no longer than the source's next timer (at most 100 ms), the
/// request staying in flight across rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_stops_answering_does_not_stall_the_native_fetch() {
    stall_for_30_seconds("native", "t6", 406).await;
}

/// A Kafka sink writing to the broker that stalls: its producer's deliveries wait out the
/// stall (and a stall can leave it knowing no broker: `kafka/rebootstrap.rs`), then every
/// traffic row stored reaches its topic, once (the producer is idempotent). The pipeline waits
/// on the sink meanwhile, and the source with it, with a `max.poll.interval.ms` of 12 s: its
/// sends into the full pipeline poll the group while they wait (`kafka/source/handoff.rs`).
/// When they did not, the group once took the partitions back and the run stopped
/// ("assignment lost"); `kafka::source::full_pipeline_tests` holds a pipeline for longer than
/// that every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_sink_on_a_broker_that_stops_answering_delivers_every_row() {
    // the broker is ours from the output topic's making to its reading
    let _turn = BROKER.lock().await;
    let out = create_topics(&unique("t7-out"), 3).await.traffic.unwrap();
    let sink = format!(
        "  out:\n    type: kafka\n    brokers: {}\n    topics:\n      {out}: {{input: traffic, key: segment_id}}\nruntime:\n",
        brokers()
    );
    let (lake, _dir, metrics) =
        stall_for_30_seconds_with("native", "t7", 407, |text| text.replace("runtime:\n", &sink)).await;
    assert_delivered(&out, &lake).await;
    // how long depends on what the pipeline held when the broker stopped (the source's own
    // fetches stop too): 4.1 s in one run
    let waited = metrics.value("citystream_kafka_backpressure_milliseconds_total", &[("source", "kafka")]);
    assert!(waited.is_some_and(|ms| ms > 0.0), "the source waited on the sink: {waited:?} ms");
}

/// A stream read with `fetch`, its broker SIGSTOPped for 30 s mid-stream (KIP-848 protocol,
/// `max.poll.interval.ms` 12 s, `commit_timeout` 2 s): everything stored once, and a commit
/// went unanswered during the stall.
async fn stall_for_30_seconds(fetch: &str, prefix: &str, seed: u64) {
    let _turn = BROKER.lock().await;
    let (_, _dir, metrics) = stall_for_30_seconds_with(fetch, prefix, seed, |text| text.to_owned()).await;
    let timeouts = metrics.value("citystream_kafka_commit_timeouts_total", &[("source", "kafka")]).unwrap_or(0.0);
    assert!(timeouts >= 1.0, "a commit went unanswered during the stall ({timeouts} timed out)");
}

/// [`stall_for_30_seconds`]'s run, its pipeline's YAML changed by `change`; returns the lake
/// (in the folder returned), and the run's metrics. The caller holds [`BROKER`].
async fn stall_for_30_seconds_with(
    fetch: &str,
    prefix: &str,
    seed: u64,
    change: impl FnOnce(&str) -> String,
) -> (std::path::PathBuf, tempfile::TempDir, Metrics) {
    let topics = create_topics(&unique(prefix), 3).await;
    let report = produce(&topics, 26, seed).await;
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    // the KIP-848 protocol, whose session (45 s, the broker's) outlives the stall and leaves
    // max.poll.interval.ms free to be short
    let text = yaml(&topics, &unique(&format!("g-{prefix}")), &lake, "40s")
        .replace("batch_rows: 4096", &format!("batch_rows: 256\n    fetch: {fetch}\n    commit_timeout: 2s"))
        .replace(
            "      session.timeout.ms: \"10000\"\n      heartbeat.interval.ms: \"1000\"\n",
            "      group.protocol: consumer\n      max.poll.interval.ms: \"12000\"\n",
        );
    assert!(text.contains("group.protocol: consumer") && text.contains("commit_timeout: 2s"));
    assert!(text.contains(&format!("fetch: {fetch}")));
    let changed = change(&text);
    let metrics = Metrics::new();
    run_through(&changed, &lake, &report, metrics.clone(), || {
        let _resumed = Stopped::broker(&test_broker_dir());
        std::thread::sleep(Duration::from_secs(30));
    })
    .await;
    (lake, dir, metrics)
}

/// Every traffic row of `lake` is on topic `out`, once (the simulator sends some readings
/// twice, and the raw table keeps both: so does the topic).
async fn assert_delivered(out: &str, lake: &Path) {
    use rdkafka::message::Message;
    let stored = common::tables::event_ids(lake).await;
    assert!(!stored.is_empty());
    let consumer = read_from_start(out, &unique("outage-out"));
    let mut delivered = Vec::with_capacity(stored.len());
    // until no message for 5 s once as many as stored have come (60 s before); a consumer
    // error (logged by librdkafka) is read past, within 5 minutes in all
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(300) {
        let wait = if delivered.len() >= stored.len() { 5 } else { 60 };
        let Ok(m) = tokio::time::timeout(Duration::from_secs(wait), consumer.recv()).await else { break };
        let Ok(m) = m else { continue };
        let row: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
        delivered.push(row["event_id"].as_str().unwrap().to_owned());
    }
    delivered.sort_unstable();
    if delivered != stored {
        let distinct = |v: &[String]| v.iter().collect::<std::collections::BTreeSet<_>>().len();
        panic!(
            "{} rows stored ({} event ids), {} messages delivered ({} event ids)",
            stored.len(),
            distinct(&stored),
            delivered.len(),
            distinct(&delivered)
        );
    }
}

/// Runs `text`'s pipeline; once it has stored rows, does `disrupt` to the broker (blocking);
/// then asserts that the run ended without error and stored every row of `report` once, and
/// that the disruption began mid-stream.
async fn run_through(
    text: &str,
    lake: &Path,
    report: &citystream_pipeline::simulator::SimReport,
    metrics: Metrics,
    disrupt: impl FnOnce() + Send + 'static,
) {
    log_when_asked();
    let p = plan(config::load_str(text, "outage.yaml").unwrap(), "outage.yaml").unwrap();
    let (_stop, rx) = StopHandle::new();
    let run = tokio::spawn(runtime::run(p, metrics, rx));
    tokio::task::spawn_blocking({
        let lake = lake.to_path_buf();
        move || wait_for_rows(&lake, 6, Duration::from_secs(60))
    })
    .await
    .unwrap();
    let before: usize = positions(lake).await.values().map(Vec::len).sum();
    tokio::task::spawn_blocking(disrupt).await.unwrap();
    let result =
        tokio::time::timeout(Duration::from_secs(600), run).await.expect("finished after the disruption").unwrap();
    let report_run = result.expect("the pipeline ran through the disruption");
    let total: u64 = report.kinds.values().map(|c| c.valid + c.malformed).sum();
    assert!((before as u64) < total, "the disruption began mid-stream ({before} of {total} rows stored before it)");
    assert!(report_run.source_messages["kafka"] >= total, "everything was read at least once");
    assert_complete(&positions(lake).await, report);
}
