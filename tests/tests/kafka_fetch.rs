//! The Kafka source's native fetch (`fetch: native`, what `auto` picks on plaintext) against
//! librdkafka's own (`fetch: librdkafka`), on the real broker that `scripts/test.sh` starts:
//! every codec a producer may use, committed and aborted transactions, and a position that
//! retention deleted give the same tables both ways. The other Kafka tests (rebalances, kills,
//! broker outages, watermark alignment) run on the default, the native fetch.

mod common;

use std::time::Duration;

use common::tables::{Compare, assert_same_tables, event_ids, table_rows};
use common::*;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

/// A traffic reading as a detector sends it; `id` is its `event_id`.
fn reading(id: &str, i: usize) -> String {
    let ts = 1_772_409_600_000i64 + i as i64 * 1000;
    format!(
        r#"{{"event_id":"{id}","ts":{ts},"schema_version":1,"sensor_id":"det-{s}","segment_id":"seg-00-{seg:02}","lane":1,"interval_s":30,"flow":{f},"occupancy":0.05,"speed_kmh":61.0}}"#,
        s = i % 50,
        seg = i % 20,
        f = i % 17
    )
}

fn producer(extra: &[(&str, &str)]) -> FutureProducer {
    let mut c = rdkafka::ClientConfig::new();
    // idempotent: a batch retried (a topic just made, its leader not yet known) keeps its place
    // in the log; without, it may land after later readings, behind the watermark. Seen once,
    // on a broker just started: both fetch paths read all 8,600 readings and made the same
    // tables, with 342 of them not in `traffic`
    c.set("bootstrap.servers", brokers())
        .set("linger.ms", "5")
        .set("message.timeout.ms", "60000")
        .set("enable.idempotence", "true");
    for (k, v) in extra {
        c.set(*k, *v);
    }
    c.create().expect("producer")
}

/// Sends `n` readings named `prefix-i` (i from `first`), keyed by detector, and waits for them.
async fn send(p: &FutureProducer, topic: &str, prefix: &str, first: usize, n: usize) {
    let mut inflight = Vec::with_capacity(n);
    for i in first..first + n {
        let payload = reading(&format!("{prefix}-{i}"), i);
        let key = format!("det-{}", i % 50);
        let rec = FutureRecord::to(topic).key(&key).payload(&payload);
        inflight.push(p.send_result(rec).map_err(|(e, _)| e).expect("queued"));
    }
    for f in inflight {
        f.await.expect("delivery").expect("delivered");
    }
}

/// A pipeline that decodes the traffic topic into a table, fetching as `fetch` says, with the
/// source properties `properties` (indented YAML lines) besides.
fn decode_yaml(topic: &str, group: &str, lake: &std::path::Path, fetch: &str, properties: &str) -> String {
    format!(
        "\
name: fetch-test
sources:
  kafka:
    type: kafka
    brokers: {brokers}
    group_id: {group}
    topics: {{traffic: {topic}, camera: null, environment: null}}
    batch_rows: 512
    checkpoint_interval: 500ms
    stop_when_idle: 3s
    fetch: {fetch}
    properties:
      session.timeout.ms: \"10000\"
      heartbeat.interval.ms: \"1000\"
{properties}stages:
  traffic: {{type: decode, input: kafka.traffic, kind: traffic, max_past: null, max_future: null}}
sinks:
  lake:
    type: parquet
    path: {lake}
    tables:
      traffic: traffic
      traffic_late: traffic.late_events
      dead_letters: traffic.dead_letters
runtime:
  status_interval: null
",
        brokers = brokers(),
        lake = lake.display(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_codec_and_aborted_transactions_are_read_as_librdkafka_reads_them() {
    let topics = create_topics(&unique("fetch-codecs"), 3).await;
    let topic = topics.traffic.clone().unwrap();
    let mut sent = 0;
    for codec in ["none", "gzip", "snappy", "lz4", "zstd"] {
        let p = producer(&[("compression.type", codec), ("batch.size", "65536")]);
        send(&p, &topic, codec, sent, 1500).await;
        sent += 1500;
    }
    // a transaction committed, one aborted, and plain messages after both
    let tx = producer(&[("transactional.id", &unique("fetch-tx")), ("compression.type", "lz4")]);
    tx.init_transactions(Duration::from_secs(30)).unwrap();
    tx.begin_transaction().unwrap();
    send(&tx, &topic, "committed", sent, 700).await;
    tx.commit_transaction(Duration::from_secs(30)).unwrap();
    sent += 700;
    tx.begin_transaction().unwrap();
    send(&tx, &topic, "aborted", sent, 600).await;
    tx.abort_transaction(Duration::from_secs(30)).unwrap();
    let aborted = 600;
    sent += aborted;
    send(&producer(&[("compression.type", "zstd")]), &topic, "after", sent, 400).await;
    sent += 400;

    let work = tempfile::tempdir().unwrap();
    let run = |fetch: &'static str, properties: &'static str| {
        let lake = work.path().join(format!("{fetch}-{}", properties.len()));
        let yaml = decode_yaml(&topic, &unique("fetch-codecs"), &lake, fetch, properties);
        async move {
            let report = run_in_process(&yaml).await;
            (lake, report.source_messages["kafka"])
        }
    };
    let (librdkafka, read_lib) = run("librdkafka", "").await;
    let (native, read_native) = run("native", "").await;
    assert_eq!(read_lib, (sent - aborted) as u64, "librdkafka reads every committed message once");
    assert_eq!(read_native, read_lib, "the native fetch reads as many");
    let expected = table_rows(&librdkafka, &Compare::default()).await;
    assert_same_tables(
        "native vs librdkafka: every codec, transactions",
        &table_rows(&native, &Compare::default()).await,
        &expected,
    );
    let ids = event_ids(&native).await;
    assert_eq!(ids.len(), sent - aborted);
    assert!(!ids.iter().any(|i| i.starts_with("aborted")), "no record of the aborted transaction");
    for prefix in ["none-", "gzip-", "snappy-", "lz4-", "zstd-", "committed-", "after-"] {
        assert!(ids.iter().any(|i| i.starts_with(prefix)), "{prefix} records read");
    }
    // reading uncommitted data as well: the aborted records are there (the filter is real)
    let (uncommitted, read) = run("native", "      isolation.level: read_uncommitted\n").await;
    assert_eq!(read, sent as u64, "read_uncommitted reads the aborted transaction too");
    assert_eq!(event_ids(&uncommitted).await.iter().filter(|i| i.starts_with("aborted")).count(), aborted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_position_that_retention_deleted_restarts_at_the_log_start_as_librdkafka_does() {
    use rdkafka::admin::{AdminClient, AdminOptions};
    let topics = create_topics(&unique("fetch-range"), 1).await;
    let topic = topics.traffic.clone().unwrap();
    let p = producer(&[("compression.type", "zstd")]);
    send(&p, &topic, "first", 0, 300).await;
    let work = tempfile::tempdir().unwrap();
    let groups = [unique("fetch-range-native"), unique("fetch-range-lib")];
    let lakes = [work.path().join("native"), work.path().join("librdkafka")];
    let modes = ["native", "librdkafka"];
    // both groups commit offset 300
    for i in 0..2 {
        let report = run_in_process(&decode_yaml(&topic, &groups[i], &lakes[i], modes[i], "")).await;
        assert_eq!(report.source_messages["kafka"], 300);
    }
    // 300 more, then the log's first 450 deleted: both commits point before the log start
    send(&p, &topic, "second", 300, 300).await;
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        rdkafka::ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, rdkafka::Offset::Offset(450)).unwrap();
    let deleted = admin.delete_records(&tpl, &AdminOptions::new()).await.unwrap();
    assert_eq!(deleted.elements()[0].offset(), rdkafka::Offset::Offset(450), "the log starts at 450");
    for i in 0..2 {
        let report = run_in_process(&decode_yaml(&topic, &groups[i], &lakes[i], modes[i], "")).await;
        assert_eq!(report.source_messages["kafka"], 150, "{}: read from the log start on", modes[i]);
    }
    let native = positions(&lakes[0]).await;
    assert_eq!(native, positions(&lakes[1]).await, "the same rows both ways");
    let expected: Vec<(i32, i64)> = (0..300).chain(450..600).map(|o| (0, o)).collect();
    assert_eq!(native["traffic"], expected);
}
