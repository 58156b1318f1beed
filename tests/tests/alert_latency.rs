//! Alert latency through real components: camera events produced to the real Kafka broker
//! (`scripts/test.sh` starts it) with the current time as event time, a pipeline in this
//! process (Kafka source with the deployed `batch_wait`, decode, dedup, filter, the stalled-
//! vehicle `alert` rule; sinks: Kafka `alerts` topic, control center, Parquet), and two
//! observers: a Kafka consumer of the alerts topic and a Server-Sent Events client of the
//! control center (what the page listens to). Every injected stalled vehicle must come out as
//! exactly one `open` alert on both, and its evidence must name the event; the latencies from
//! the moment the event was handed to Kafka to each observer are printed as p50/p99 (for the
//! record: the numbers are not asserted, the machine is noisy).

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use citystream_operators::Metrics;
use citystream_pipeline::config::{self, plan::plan};
use citystream_pipeline::runtime::{self, StopHandle};
use common::*;
use rdkafka::Message;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const TOKEN: &str = "latency-viewer-token-0123456789";
const CAMERAS: usize = 60;

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_vehicle_alerts_reach_kafka_and_the_page_and_their_latency_is_measured() {
    let prefix = unique("lat");
    let (camera, alerts) = (format!("{prefix}.camera"), format!("{prefix}.alerts"));
    let admin: AdminClient<DefaultClientContext> =
        rdkafka::ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
    let new =
        [NewTopic::new(&camera, 3, TopicReplication::Fixed(1)), NewTopic::new(&alerts, 1, TopicReplication::Fixed(1))];
    for r in tokio::time::timeout(Duration::from_secs(30), admin.create_topics(&new, &AdminOptions::new()))
        .await
        .expect("a Kafka broker answered within 30 s (scripts/test.sh starts one)")
        .unwrap()
    {
        r.unwrap();
    }

    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // SAFETY: set before the pipeline reads it; no other test in this binary uses it
    unsafe { std::env::set_var("CITYSTREAM_LATENCY_TOKENS", format!("viewer {TOKEN}")) };
    let yaml = format!(
        "\
name: alert-latency
sources:
  kafka:
    type: kafka
    brokers: {brokers}
    group_id: {prefix}-pipeline
    topics: {{traffic: null, camera: {camera}, environment: null}}
    batch_wait: 100ms
    checkpoint_interval: 5s
    max_out_of_orderness: 10s
stages:
  camera: {{type: decode, input: kafka.camera, kind: camera}}
  camera_unique: {{type: dedup, input: camera, horizon: 10m}}
  stalled: {{type: filter, input: camera_unique, where: [{{column: kind, op: eq, value: stalled_vehicle}}]}}
  stalled_alerts:
    type: alert
    input: stalled
    rule: stalled_vehicle
    alert_type: stalled_vehicle
    severity: warning
    value: confidence
    location: camera_id
    time: ts
    raise: 0.75
    stale_after: 5m
    evidence: [event_id]
sinks:
  out:
    type: kafka
    brokers: {brokers}
    topics: {{{alerts}: {{input: stalled_alerts, key: location}}}}
  control:
    type: control_center
    addr: 127.0.0.1:{port}
    alerts: [stalled_alerts]
    tokens_env: CITYSTREAM_LATENCY_TOKENS
  lake:
    type: parquet
    path: {lake}
    tables:
      alerts: stalled_alerts
      dead_letters: camera.dead_letters
      late: [camera.late_events, camera_unique.late_events]
runtime:
  status_interval: null
",
        brokers = brokers(),
        lake = dir.path().join("lake").display()
    );
    let p = plan(config::load_str(&yaml, "latency.yaml").unwrap(), "latency.yaml").unwrap();
    let (stop, rx) = StopHandle::new();
    let pipeline = tokio::spawn(runtime::run(p, Metrics::new(), rx));

    // observer 1: the page's event stream
    let sse = tokio::spawn(async move {
        let t0 = Instant::now();
        let stream = loop {
            match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                Ok(s) => break s,
                Err(_) if t0.elapsed() < Duration::from_secs(30) => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => panic!("control center at port {port}: {e}"),
            }
        };
        let mut stream = BufReader::new(stream);
        let req = format!("GET /api/stream?token={TOKEN} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n");
        stream.get_mut().write_all(req.as_bytes()).await.unwrap();
        let mut seen: HashMap<String, i64> = HashMap::new();
        let mut line = String::new();
        while seen.len() < CAMERAS {
            line.clear();
            if stream.read_line(&mut line).await.unwrap() == 0 {
                break;
            }
            let Some(data) = line.trim_end().strip_prefix("data: ") else { continue };
            let v: serde_json::Value = serde_json::from_str(data).unwrap();
            if v["kind"] == "alert" && v["status"] == "open" {
                let ev: serde_json::Value =
                    serde_json::from_str(v["alert"]["evidence"].as_str().unwrap_or("null")).unwrap_or_default();
                let ev = if ev.is_null() { v["alert"]["evidence"].clone() } else { ev };
                seen.entry(ev["event_id"].as_str().unwrap_or_default().to_owned()).or_insert_with(now_ms);
            }
        }
        seen
    });
    // observer 2: the alerts topic
    let consumer = read_from_start(&alerts, &format!("{prefix}-observer"));
    let kafka = tokio::spawn(async move {
        let mut seen: HashMap<String, (i64, String)> = HashMap::new();
        let mut opens = 0;
        while seen.len() < CAMERAS {
            let m = tokio::time::timeout(Duration::from_secs(120), consumer.recv())
                .await
                .expect("alerts within 120 s")
                .unwrap();
            let at = now_ms();
            let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
            if v["status"] == "open" {
                opens += 1;
                let ev: serde_json::Value = serde_json::from_str(v["evidence"].as_str().unwrap()).unwrap();
                let key = String::from_utf8_lossy(m.key().unwrap()).into_owned();
                seen.insert(ev["event_id"].as_str().unwrap().to_owned(), (at, key));
            }
        }
        (seen, opens)
    });

    // give the consumer group and the source time to join, then inject: one stalled vehicle per
    // camera, 200 ms apart, between ordinary detections (which must not alert)
    tokio::time::sleep(Duration::from_secs(8)).await;
    let producer: FutureProducer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", brokers()).set("linger.ms", "0").create().unwrap();
    let mut sent: HashMap<String, (i64, String)> = HashMap::new();
    for i in 0..CAMERAS {
        let cam = format!("cam-lat-{i:03}");
        for (kind, conf) in [("detection", 0.95), ("stalled_vehicle", 0.9)] {
            let id = format!("{prefix}-{i}-{kind}");
            let ts = now_ms();
            let payload = format!(
                r#"{{"event_id":"{id}","ts":{ts},"schema_version":1,"camera_id":"{cam}","zone_id":"zone-01","kind":"{kind}","object_class":"car","count":1,"track_id":null,"plate":null,"confidence":{conf},"thumbnail":null}}"#
            );
            producer
                .send(FutureRecord::to(&camera).key(&cam).payload(&payload).timestamp(ts), Duration::from_secs(10))
                .await
                .unwrap();
            if kind == "stalled_vehicle" {
                sent.insert(id, (ts, cam.clone()));
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let (on_kafka, opens) = tokio::time::timeout(Duration::from_secs(180), kafka).await.unwrap().unwrap();
    let on_page = tokio::time::timeout(Duration::from_secs(60), sse).await.unwrap().unwrap();
    stop.stop();
    tokio::time::timeout(Duration::from_secs(120), pipeline).await.unwrap().unwrap().unwrap();

    // every injected stalled vehicle is one open alert, keyed by its camera, on both observers
    assert_eq!(opens, CAMERAS, "one open alert per injected stalled vehicle, none for ordinary detections");
    let mut lat_kafka = Vec::new();
    let mut lat_page = Vec::new();
    for (id, (ts, cam)) in &sent {
        let (at, key) = on_kafka.get(id).unwrap_or_else(|| panic!("no alert on Kafka for {id}"));
        assert_eq!(key, cam, "alerts are keyed by location");
        lat_kafka.push((at - ts) as f64);
        lat_page
            .push((on_page.get(id).unwrap_or_else(|| panic!("no alert on the page's stream for {id}")) - ts) as f64);
    }
    lat_kafka.sort_by(f64::total_cmp);
    lat_page.sort_by(f64::total_cmp);
    println!(
        "alert latency, event handed to Kafka -> alert (n = {CAMERAS}): on the alerts topic p50 {:.0} ms, p99 {:.0} ms; on the page's event stream p50 {:.0} ms, p99 {:.0} ms",
        percentile(&lat_kafka, 0.5),
        percentile(&lat_kafka, 0.99),
        percentile(&lat_page, 0.5),
        percentile(&lat_page, 0.99)
    );
}
