//! Kafka in and out against the real Apache Kafka broker that `scripts/test.sh` starts
//! (`deploy/kafka/start.sh`), at `CITYSTREAM_KAFKA_BROKERS` (default `127.0.0.1:9092`).
//!
//! Each test uses its own topics and consumer group, so they can run side by side.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulator_through_kafka_to_parquet_exactly_once() {
    let topics = create_topics(&unique("t1"), 3).await;
    let report = produce(&topics, 26, 101).await;
    let total: u64 = report.kinds.values().map(|c| c.valid + c.malformed).sum();
    assert!(total >= 300_000, "at least 300k events through Kafka, got {total}");
    let dir = tempfile::tempdir().unwrap();
    let run = run_in_process(&yaml(&topics, &unique("g1"), &dir.path().join("lake"), "3s")).await;
    assert_eq!(run.source_messages["kafka"], total, "every message was consumed once");
    let pos = positions(&dir.path().join("lake")).await;
    assert_complete(&pos, &report);
    // files are named after their source positions
    let names = walk(&dir.path().join("lake"));
    assert!(
        names.iter().all(|n| n.contains(".traffic-p") || n.contains(".camera-p") || n.contains(".environment-p")),
        "{names:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_then_restart_gives_the_same_output() {
    let topics = create_topics(&unique("t2"), 3).await;
    let report = produce(&topics, 26, 202).await;
    // the reference: an uninterrupted run
    let reference = tempfile::tempdir().unwrap();
    run_in_process(&yaml(&topics, &unique("g2ref"), &reference.path().join("lake"), "3s")).await;
    let expected = positions(&reference.path().join("lake")).await;
    assert_complete(&expected, &report);

    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let cfg = dir.path().join("pipeline.yaml");
    std::fs::write(&cfg, yaml(&topics, &unique("g2"), &lake, "5s").replace("batch_rows: 4096", "batch_rows: 512"))
        .unwrap();
    let log = dir.path().join("run1.log");
    let mut first = spawn(&cfg, &log);
    wait_for_rows(&lake, 6, Duration::from_secs(60));
    first.kill().expect("SIGKILL");
    first.wait().unwrap();
    let at_kill: usize = positions(&lake).await.values().map(Vec::len).sum();
    let total: usize = expected.values().map(Vec::len).sum();
    assert!(at_kill > 0 && at_kill < total, "killed mid-stream: {at_kill} of {total} rows were on disk");
    let log2 = dir.path().join("run2.log");
    let mut second = spawn(&cfg, &log2);
    wait_exit(&mut second, Duration::from_secs(300), &log2);
    let got = positions(&lake).await;
    for (table, rows) in &expected {
        assert_eq!(got[table].len(), rows.len(), "{table}: row count after kill and restart");
        assert!(got[table] == *rows, "{table}: the same rows as the uninterrupted run");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_split_partitions_and_one_takes_over() {
    let topics = create_topics(&unique("t3"), 3).await;
    let report = produce(&topics, 26, 303).await;
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let cfg = dir.path().join("pipeline.yaml");
    std::fs::write(&cfg, yaml(&topics, &unique("g3"), &lake, "8s").replace("batch_rows: 4096", "batch_rows: 256"))
        .unwrap();
    let (log_a, log_b) = (dir.path().join("a.log"), dir.path().join("b.log"));
    let mut a = spawn(&cfg, &log_a);
    let mut b = spawn(&cfg, &log_b);
    // both must be members with partitions before one leaves
    let t0 = std::time::Instant::now();
    let joined = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default().contains("assigned");
    while !(joined(&log_a) && joined(&log_b)) {
        assert!(t0.elapsed() < Duration::from_secs(60), "both instances got partitions within 60 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_for_rows(&lake, 10, Duration::from_secs(60));
    // stop one instance gracefully (SIGTERM): it flushes, commits and leaves the group
    // SAFETY: kill(2) on a child we spawned.
    unsafe { libc::kill(a.id() as i32, libc::SIGTERM) };
    wait_exit(&mut a, Duration::from_secs(120), &log_a);
    wait_exit(&mut b, Duration::from_secs(300), &log_b);
    let a_log = std::fs::read_to_string(&log_a).unwrap();
    let b_log = std::fs::read_to_string(&log_b).unwrap();
    assert!(a_log.contains("assigned") && b_log.contains("assigned"), "both instances joined the group");
    // the rebalances flushed and committed before partitions moved
    assert!(
        a_log.contains("revoked: flushed and committed") || b_log.contains("revoked: flushed and committed"),
        "a revocation flushed and committed:\n{a_log}\n{b_log}"
    );
    let got = positions(&lake).await;
    if std::env::var("CITYSTREAM_TEST_LOGS").is_ok() {
        eprintln!("=== a\n{a_log}\n=== b\n{b_log}");
    }
    assert_complete(&got, &report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_sink_delivers_every_row_as_keyed_json() {
    use rdkafka::message::Message;
    let prefix = unique("t5");
    let topics = create_topics(&prefix, 3).await;
    let out_topic = topics.environment.clone().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // the simulator's environment stream, decoded, produced to Kafka keyed by station
    let text = format!(
        "\
sources:
  city: {{type: simulator, seed: 5, duration: 6h, faults: {{malformed_rate: 0.0}}}}
stages:
  environment: {{type: decode, input: city.environment, kind: environment}}
sinks:
  out:
    type: kafka
    brokers: {brokers}
    topics:
      {out_topic}: {{input: environment, key: station_id}}
  lake:
    type: parquet
    path: {lake}
    tables: {{dead_letters: environment.dead_letters, late: environment.late_events}}
runtime: {{status_interval: null}}
",
        brokers = brokers(),
        lake = dir.path().join("lake").display()
    );
    let report = run_in_process(&text).await;
    let late = report.tables["lake"].get("late").map_or(0, |t| t.rows);
    let expected = report.simulations["city"].counts(citystream_schemas::EventKind::Environment).valid - late;
    let consumer = read_from_start(&out_topic, &unique("g5"));
    let mut seen = 0u64;
    while seen < expected {
        let m =
            tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await.expect("every row arrives").unwrap();
        let row: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
        let station = row["station_id"].as_str().unwrap();
        assert_eq!(m.key(), Some(station.as_bytes()), "keyed by the station");
        assert_eq!(
            m.partition(),
            citystream_pipeline::kafka::partition::partition_of(station.as_bytes(), 3),
            "in the partition a Java producer would choose for the key"
        );
        assert!(row["event_id"].is_string() && row["ts"].is_string(), "{row}");
        seen += 1;
    }
    // and no more than that
    assert!(tokio::time::timeout(Duration::from_secs(3), consumer.recv()).await.is_err(), "no extra messages");
    assert_eq!(seen, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grid_intensity_is_read_live_from_a_kafka_topic() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let topic = format!("{}.grid", unique("carbon"));
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        rdkafka::ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
    for r in admin
        .create_topics(&[NewTopic::new(&topic, 1, TopicReplication::Fixed(1))], &AdminOptions::new())
        .await
        .unwrap()
    {
        r.unwrap();
    }
    let producer: FutureProducer = rdkafka::ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
    let send = |payload: String| {
        let (producer, topic) = (producer.clone(), topic.clone());
        async move {
            producer.send(FutureRecord::<(), _>::to(&topic).payload(&payload), Duration::from_secs(10)).await.unwrap();
        }
    };
    // one message before the reader starts (it reads from the start), a bad one, then live ones
    send(r#"{"hour": "2026-03-02T08:00:00Z", "g_per_kwh": 512}"#.into()).await;
    send("not json".into()).await;
    let cfg: citystream_pipeline::energy::EnergyConfig = serde_saphyr::from_str(&format!(
        "path: /tmp/unused\ncarbon_g_per_kwh: 300\ncarbon_topic: {{brokers: {}, topic: {topic}}}\n",
        brokers()
    ))
    .unwrap();
    let metrics = citystream_operators::Metrics::new();
    let intensity = citystream_pipeline::energy::Intensity::from_config(&cfg).unwrap();
    let reader = intensity.follow(cfg.carbon_topic.as_ref().unwrap(), &metrics).unwrap();
    let h8 = 1_772_438_400_000;
    let until = |what: &str, f: &dyn Fn() -> bool| {
        let t0 = std::time::Instant::now();
        while !f() {
            assert!(t0.elapsed() < Duration::from_secs(30), "{what} within 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    until("the series' hour", &|| intensity.at(h8) == 512.0);
    send(r#"{"g_per_kwh": 95}"#.into()).await;
    until("the live value", &|| intensity.at(h8 + 3_600_000) == 95.0);
    assert_eq!(intensity.at(h8), 512.0, "an hour of the series outranks the live value");
    let count = |o: &str| metrics.value("citystream_carbon_messages_total", &[("outcome", o)]);
    assert_eq!((count("applied"), count("invalid")), (Some(2.0), Some(1.0)));
    reader.abort();
}

/// `citystream topics` creates the global task's topic too: one partition, whatever the
/// input topics have (the global task reads it in order), and only when the plan has a global
/// task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_task_topic_is_created_with_one_partition() {
    let p = unique("global-topic");
    let yaml = |global: bool| {
        format!(
            "name: t\nsources:\n  k: {{type: kafka, brokers: {b}, group_id: {p}, topics: {{traffic: {p}.in, camera: null, environment: null}}, keys: {{traffic: {{column: segment_id, determined_by: [sensor_id]}}}}}}\n\
             stages:\n  traffic: {{type: decode, input: k.traffic, kind: traffic}}\n\
             \x20 alerts: {{type: alert, input: traffic, rule: r, alert_type: slow, severity: warning, value: speed_kmh, location: sensor_id, time: ts, raise: 1, storm: {{max_open: 2}}}}\n\
             sinks:\n  lake: {{type: parquet, path: /tmp/{p}, tables: {{t: traffic, a: alerts, d: traffic.dead_letters, l: traffic.late_events}}}}\n\
             runtime: {{tasks: partition, global_task: {global}, state_url: \"file:///tmp/{p}-state\"}}\n",
            b = brokers()
        )
    };
    let plan = |global| {
        citystream_pipeline::config::plan::plan(
            citystream_pipeline::config::load_str(&yaml(global), "t.yaml").unwrap(),
            "t.yaml",
        )
        .unwrap()
    };
    let none = plan(false).ensure_global_topic().await.unwrap();
    assert_eq!(none, None, "no global task, no global topic");
    let first = plan(true).ensure_global_topic().await.unwrap();
    assert_eq!(first, Some((brokers(), format!("{p}.global"), true)));
    let again = plan(true).ensure_global_topic().await.unwrap();
    assert_eq!(again, Some((brokers(), format!("{p}.global"), false)), "a second run changes nothing");
    let consumer: rdkafka::consumer::BaseConsumer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
    let topic = format!("{p}.global");
    let md = rdkafka::consumer::Consumer::fetch_metadata(&consumer, Some(&topic), Duration::from_secs(10)).unwrap();
    assert_eq!(md.topics()[0].partitions().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_topics_a_config_uses_are_created_once() {
    let p = unique("topics");
    let yaml = format!(
        "name: t\nsources:\n  k: {{type: kafka, brokers: {b}, topics: {{traffic: {p}.in, camera: null, environment: null}}, stop_when_idle: 1s}}\n\
         stages:\n  traffic: {{type: decode, input: k.traffic, kind: traffic}}\n\
         sinks:\n  out: {{type: kafka, brokers: {b}, topics: {{{p}.out: {{input: traffic}}, {p}.dead: {{input: traffic.dead_letters}}, {p}.late: {{input: traffic.late_events}}}}}}\n",
        b = brokers()
    );
    let plan = citystream_pipeline::config::plan::plan(
        citystream_pipeline::config::load_str(&yaml, "t.yaml").unwrap(),
        "t.yaml",
    )
    .unwrap();
    let all = plan.kafka_topics();
    let topics = &all[&brokers()];
    assert_eq!(
        topics.iter().cloned().collect::<Vec<_>>(),
        [format!("{p}.dead"), format!("{p}.in"), format!("{p}.late"), format!("{p}.out")]
    );
    let none = Default::default();
    let (created, existing) = citystream_pipeline::kafka::ensure_topics(&brokers(), topics, &none, 2, 1).await.unwrap();
    assert_eq!((created.len(), existing.len()), (4, 0));
    let (created, existing) = citystream_pipeline::kafka::ensure_topics(&brokers(), topics, &none, 2, 1).await.unwrap();
    assert_eq!((created.len(), existing.len()), (0, 4), "a second run changes nothing");
    // a control center's alerts topic keeps every message: its book is rebuilt from it
    let alerts = std::collections::BTreeSet::from([format!("{p}.alerts")]);
    let (created, _) = citystream_pipeline::kafka::ensure_topics(&brokers(), &alerts, &alerts, 2, 1).await.unwrap();
    assert_eq!(created.len(), 1);
    // (retention.ms, retention.bytes), each with whether it is set on the topic itself
    let retention = |topic: String| async move {
        use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
        let admin: AdminClient<rdkafka::client::DefaultClientContext> =
            rdkafka::ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
        let r = admin.describe_configs(&[ResourceSpecifier::Topic(&topic)], &AdminOptions::new()).await.unwrap();
        let r = r.into_iter().next().unwrap().unwrap();
        let of = |name: &str| {
            let e = r.get(name).unwrap();
            (e.value.clone().unwrap(), e.source == rdkafka::admin::ConfigSource::DynamicTopic)
        };
        (of("retention.ms"), of("retention.bytes"))
    };
    let kept = ("-1".to_owned(), true);
    assert_eq!(retention(format!("{p}.alerts")).await, (kept.clone(), kept));
    let (ms, bytes) = retention(format!("{p}.out")).await;
    assert!(!ms.1 && !bytes.1, "other topics keep the broker's retention");
}

/// The window of `persistent_alerts`' `open_after` (minutes): its raises count that long.
const PERSISTENT_WITHIN_MIN: i64 = 30;

/// A pipeline whose tables come from stateful stages: one-minute windows, features (an hour of
/// history per segment), the incident model, California #7, an alert rule on each that joins
/// neighbours' alarms to an open alert, and a rule on the model whose `open_after` keeps
/// alerts pending for many minutes. Checkpoints every `checkpoint_ms`.
fn stateful_yaml(
    topic: &str,
    group: &str,
    data: &std::path::Path,
    graph: &std::path::Path,
    checkpoint_ms: u32,
) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    format!(
        "\
name: kafka-state
sources:
  kafka:
    type: kafka
    brokers: {brokers}
    group_id: {group}
    topics: {{traffic: {topic}, camera: null, environment: null}}
    batch_rows: 256
    checkpoint_interval: {checkpoint_ms}ms
    stop_when_idle: 5s
    max_out_of_orderness: 2m
    properties:
      session.timeout.ms: \"10000\"
      heartbeat.interval.ms: \"1000\"
stages:
  traffic: {{type: decode, input: kafka.traffic, kind: traffic, max_past: null, max_future: null}}
  traffic_minutes:
    type: window
    input: traffic
    key: [segment_id]
    size: 1m
    allowed_lateness: 1m
    aggregates:
      - {{fn: count, as: readings}}
      - {{fn: sum, column: flow, as: vehicles}}
      - {{fn: mean, column: speed_kmh, as: mean_speed_kmh}}
      - {{fn: mean, column: occupancy, as: mean_occupancy}}
  features: {{type: features, input: traffic_minutes, road_graph: {graph}}}
  incident_scores:
    type: infer
    input: features
    model: {root}/models/onnx/incident_fp32.onnx
    features: features
    outputs: {{incident_prob: [incident_prob]}}
    keep: [segment_id, window_end]
    providers: [cpu]
  california: {{type: california7, input: features, t1: 0.01, t2: 0.1, t3: 0.1}}
  incident_alerts:
    type: alert
    input: incident_scores
    rule: incident_model
    alert_type: incident
    severity: critical
    value: incident_prob
    raise: 0.8
    clear: 0.5
    open_after: {{raises: 2, within: 3m}}
    cooldown: 10m
    join: {{road_graph: {graph}, within: 2}}
    evidence: [model]
  persistent_alerts:              # long pending states: opens on the tenth raise in 30 minutes
    type: alert
    input: incident_scores
    rule: incident_persistent
    alert_type: incident
    severity: warning
    value: incident_prob
    raise: 0.05
    clear: 0.01
    open_after: {{raises: 10, within: {persistent_within_min}m}}
    cooldown: 10m
  california_alerts:
    type: alert
    input: california
    rule: california7
    alert_type: incident
    severity: warning
    value: incident
    raise: 1
    cooldown: 10m
    join: {{road_graph: {graph}, within: 2}}
sinks:
  lake:
    type: parquet
    path: {lake}
    tables:
      traffic: traffic
      dead_letters: traffic.dead_letters
      traffic_minutes: traffic_minutes
      traffic_late: [traffic.late_events, traffic_minutes.late_events]
      unmatched: features.unmatched
      incident_scores: incident_scores
      california: california
      alerts: [incident_alerts, persistent_alerts, california_alerts]
runtime:
  status_interval: null
  state_dir: {state}
",
        brokers = brokers(),
        graph = graph.display(),
        root = root.display(),
        lake = data.join("lake").display(),
        state = data.join("state").display(),
        persistent_within_min = PERSISTENT_WITHIN_MIN,
    )
}

/// Every derived table as text, rows in a fixed order (wall-clock columns left out; model
/// scores rounded, as micro-batches of another size may differ in the last bits).
async fn derived_tables(lake: &std::path::Path) -> std::collections::BTreeMap<&'static str, String> {
    let (ctx, names) = citystream_pipeline::sql::context(lake).await.unwrap();
    let queries = [
        ("traffic_minutes", "SELECT * FROM traffic_minutes ORDER BY segment_id, window_start"),
        (
            "incident_scores",
            "SELECT segment_id, window_end, round(incident_prob, 4) AS p FROM incident_scores ORDER BY segment_id, window_end",
        ),
        ("california", "SELECT * FROM california ORDER BY segment_id, window_end"),
        (
            "alerts",
            "SELECT ts, alert_id, location, status, opened_at, round(peak, 4) AS peak, locations FROM alerts ORDER BY ts, alert_id, status, locations, location, peak",
        ),
        ("traffic_late", "SELECT count(*) FROM traffic_late"),
        ("unmatched", "SELECT count(*) FROM unmatched"),
    ];
    let mut out = std::collections::BTreeMap::new();
    for (table, q) in queries {
        let text = if names.iter().any(|n| n == table) {
            let b = ctx.sql(q).await.unwrap().collect().await.unwrap();
            arrow::util::pretty::pretty_format_batches(&b).unwrap().to_string()
        } else {
            String::new()
        };
        out.insert(table, text);
    }
    out
}

/// A child process that is killed (SIGKILL, stopped or not) and reaped when dropped: a failed
/// assertion does not leave it behind.
struct KilledOnDrop(std::process::Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Where and when `rule` opened alerts in `lake` (location, opened_at in ms).
async fn opened_alerts(lake: &std::path::Path, rule: &str) -> Vec<(String, i64)> {
    let (ctx, _) = citystream_pipeline::sql::context(lake).await.unwrap();
    // (`opened_at` is in milliseconds)
    let q = format!(
        "SELECT location, CAST(opened_at AS BIGINT) AS t FROM alerts \
         WHERE rule = '{rule}' AND status = 'open' ORDER BY t"
    );
    let batches = ctx.sql(&q).await.unwrap().collect().await.unwrap();
    let mut out = Vec::new();
    for b in &batches {
        let loc = arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Utf8).unwrap();
        let loc = arrow::array::cast::AsArray::as_string::<i32>(&loc);
        let t = arrow::array::cast::AsArray::as_primitive::<arrow::datatypes::Int64Type>(b.column(1));
        out.extend((0..b.num_rows()).map(|i| (loc.value(i).to_string(), t.value(i))));
    }
    out
}

/// A pending `open_after` in an alert rule's snapshot (`phase` 1 with its raising times in
/// `id`) with at least two raises, at a location whose alert `opened` lists later, within
/// `within_ms` of the oldest of them (so the alert opened with those raises counted: a restore
/// that lost any of them would open it later): described, or `None`.
fn pending_open_after(snapshot: &std::path::Path, opened: &[(String, i64)], within_ms: i64) -> Option<String> {
    use arrow::array::{Array, cast::AsArray};
    let f = std::fs::File::open(snapshot).ok()?;
    for b in arrow::ipc::reader::FileReader::try_new(f, None).ok()? {
        let b = b.ok()?;
        let col = |name: &str| b.column(b.schema().index_of(name).unwrap()).clone();
        let (loc, phase, raised) = (col("location"), col("phase"), col("id"));
        let (loc, phase, raised) =
            (loc.as_string::<i32>(), phase.as_primitive::<arrow::datatypes::UInt8Type>(), raised.as_string::<i32>());
        for i in 0..b.num_rows() {
            if phase.value(i) != 1 || raised.is_null(i) || loc.is_null(i) {
                continue;
            }
            let Ok(times) = serde_json::from_str::<Vec<i64>>(raised.value(i)) else { continue };
            let (Some(&first), Some(&last)) = (times.iter().min(), times.iter().max()) else { continue };
            // the rule keeps raises in (t - within, t]
            if times.len() >= 2 && opened.iter().any(|(l, t)| l == loc.value(i) && *t > last && *t - first < within_ms)
            {
                return Some(format!("{} pending with {} raises, {first}..{last} ms", loc.value(i), times.len()));
            }
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_operator_state_gives_the_same_windows_scores_and_alerts() {
    let topics = create_topics(&unique("t7"), 1).await;
    // no late or reordered delivery: which rows are late must not depend on timing
    let cfg = citystream_pipeline::simulator::SimulatorConfig {
        seed: 707,
        duration: citystream_operators::Duration::from_secs(26 * 3600),
        faults: citystream_pipeline::simulator::FaultConfig::none(),
        ..Default::default()
    };
    let work = tempfile::tempdir().unwrap();
    let graph_dir = work.path().join("graph");
    citystream_pipeline::simulator::Simulation::new(cfg.clone(), 0).write_ground_truth(&graph_dir).unwrap();
    let graph = graph_dir.join("road_graph.csv");
    citystream_pipeline::kafka::produce::simulate_into(&brokers(), cfg, &topics, None).await.expect("produce");
    let topic = topics.traffic.as_deref().unwrap();

    // the reference: an uninterrupted run
    let reference = work.path().join("reference");
    run_in_process(&stateful_yaml(topic, &unique("g7ref"), &reference, &graph, 250)).await;
    let expected = derived_tables(&reference.join("lake")).await;
    // a stop keeps what the stages hold in the last checkpoint instead of flushing it
    // (the snapshots of the last checkpoint: older ones are gone)
    let held: usize = std::fs::read_dir(reference.join("state/snapshots"))
        .unwrap()
        .flatten()
        .map(|d| {
            let f = std::fs::File::open(d.path().join("traffic_minutes.arrow")).unwrap();
            arrow::ipc::reader::FileReader::try_new(f, None).unwrap().map(|b| b.unwrap().num_rows()).sum::<usize>()
        })
        .sum();
    assert!(held > 0, "the open windows are in the last checkpoint");
    assert!(expected["alerts"].lines().count() > 4, "the stream raises alerts:\n{}", expected["alerts"]);
    // alarms near an open alert join it (their alerts' state is in the checkpoints too)
    let joined = expected["alerts"].lines().any(|l| {
        let cells: Vec<&str> = l.split('|').map(str::trim).filter(|c| !c.is_empty()).collect();
        cells.get(3) == Some(&"update") && cells.last().and_then(|n| n.parse::<i32>().ok()).is_some_and(|n| n > 1)
    });
    assert!(joined, "an alarm joins a neighbour's alert:\n{}", expected["alerts"]);
    assert!(expected["california"].contains("incident"), "California #7 declares incidents");
    let late = &expected["traffic_late"];
    assert!(late.is_empty() || late.contains("| 0 "), "nothing is late:\n{late}");

    // the alerts the reference opened through `open_after` (a tenth raise within 30 minutes)
    let opened = opened_alerts(&reference.join("lake"), "incident_persistent").await;
    assert!(!opened.is_empty(), "the persistent rule opens alerts");
    let produced = report_traffic_messages(&topics).await;

    // the run to kill checkpoints as often as it can (which must not change its tables either)
    // Killed at the first checkpoint in the topic's first three quarters, with window files on
    // disk, whose persistent rule holds a pending `open_after`: a location with raises whose
    // alert the reference opened on a later raise. Each new checkpoint is looked at with the
    // process stopped (SIGSTOP, waited for), so the newest checkpoint cannot change before the
    // kill. Which moments the checkpoints catch is the machine's: a run that ends before one
    // held such a state is run again, on a state and a group of its own, with another checkpoint
    // interval and batch size (`RUNS`: the checkpoints then fall elsewhere in the stream). Under
    // the load of the suite every run could miss, with the old offset commit as with the new
    // one, each looking at 53 checkpoints; after `RUNS` the last run is killed at its first
    // checkpoint past a third of the topic (with window files on disk) whatever its persistent
    // rule holds, and says so: the tables must still be the reference's. The raising times'
    // own restore is tested in operators/tests (the snapshot cut at six points).
    const RUNS: [(u32, usize); 6] = [(10, 256), (10, 256), (30, 97), (10, 512), (50, 61), (20, 173)];
    let newest =
        |m: &citystream_pipeline::task::StateUrl| citystream_pipeline::task::StateStore::inspect(m).ok().flatten();
    let resume_at =
        |c: &citystream_pipeline::task::CheckpointSummary| c.positions.values().next().copied().unwrap_or(0);
    let mut looked_at_per_run = Vec::new();
    let (data, cfg_path, manifest, seen, pending) = 'runs: loop {
        let run = looked_at_per_run.len();
        assert!(run <= RUNS.len(), "the fallback run ended before a checkpoint past a third of the topic");
        let fallback = run == RUNS.len();
        let (checkpoint_ms, batch_rows) = RUNS.get(run).copied().unwrap_or(RUNS[0]);
        let data = work.path().join(format!("killed-{run}"));
        let cfg_path = work.path().join(format!("killed-{run}.yaml"));
        let text = stateful_yaml(topic, &unique("g7"), &data, &graph, checkpoint_ms)
            .replace("batch_rows: 256", &format!("batch_rows: {batch_rows}"));
        std::fs::write(&cfg_path, text).unwrap();
        let log = work.path().join(format!("run1-{run}.log"));
        let mut first = KilledOnDrop(spawn(&cfg_path, &log));
        let pid = first.0.id() as i32;
        let manifest = citystream_pipeline::task::StateUrl::Local(data.join("state"));
        let (mut seen, mut looked_at, t0) = (0, 0, std::time::Instant::now());
        loop {
            assert!(t0.elapsed() < Duration::from_secs(300), "no checkpoint to kill at within 5 minutes");
            if let Some(status) = first.0.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "the run to kill failed: {status}\n{}",
                    std::fs::read_to_string(&log).unwrap()
                );
                eprintln!("run {run} ended before a checkpoint held a pending open_after ({looked_at} looked at)");
                looked_at_per_run.push(looked_at);
                continue 'runs;
            }
            let windows = || walk(&data.join("lake/traffic_minutes")).iter().any(|p| p.ends_with(".parquet"));
            if newest(&manifest).is_some_and(|c| c.seq > seen && !c.snapshots.is_empty()) && windows() {
                let mut status = 0;
                // SAFETY: kill(2) and waitpid(2) on a child we spawned and have not reaped;
                // WUNTRACED returns once every thread of it has stopped
                unsafe {
                    libc::kill(pid, libc::SIGSTOP);
                    libc::waitpid(pid, &mut status, libc::WUNTRACED);
                }
                let c = newest(&manifest).unwrap();
                seen = c.seq;
                looked_at += 1;
                let snapshot = data.join("state").join(&c.snapshots).join("persistent_alerts.arrow");
                let pending = match fallback {
                    false => pending_open_after(&snapshot, &opened, PERSISTENT_WITHIN_MIN * 60_000),
                    true => (resume_at(&c) > produced / 3).then(|| {
                        format!(
                            "no pending open_after looked for (fallback after {} runs that caught none: {looked_at_per_run:?} checkpoints)",
                            RUNS.len()
                        )
                    }),
                };
                if let Some(p) = pending.filter(|_| resume_at(&c) < produced * 3 / 4) {
                    drop(first);
                    eprintln!("run {run} killed at checkpoint {looked_at} looked at, with {p}");
                    break 'runs (data, cfg_path, manifest, seen, p);
                }
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGCONT) };
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    };
    assert_eq!(newest(&manifest).unwrap().seq, seen, "the checkpoint looked at is the newest ({pending})");
    let at_kill = derived_tables(&data.join("lake")).await;
    assert!(
        at_kill["traffic_minutes"].lines().count() < expected["traffic_minutes"].lines().count(),
        "killed mid-stream"
    );
    // the checkpoint it resumes from lies well inside the topic: the rest is replayed
    let resume_at = newest(&manifest).as_ref().map_or(0, resume_at);
    assert!(resume_at > 0 && resume_at < produced * 3 / 4, "resumes at offset {resume_at} of {produced}");
    let log2 = work.path().join("run2.log");
    let mut second = spawn(&cfg_path, &log2);
    wait_exit(&mut second, Duration::from_secs(300), &log2);
    let log2 = std::fs::read_to_string(&log2).unwrap();
    eprintln!(
        "killed with the checkpoint at offset {resume_at} of {produced}; derived files removed on restart: {}",
        log2.lines().filter(|l| l.contains("removed derived files")).count()
    );
    let got = derived_tables(&data.join("lake")).await;
    for (table, text) in &expected {
        assert!(
            got[table] == *text,
            "{table}: after SIGKILL and restart the table differs from the uninterrupted run's\n--- got\n{}\n--- expected\n{}",
            got[table].lines().take(40).collect::<Vec<_>>().join("\n"),
            text.lines().take(40).collect::<Vec<_>>().join("\n")
        );
    }
    assert!(log2.contains("restored state"), "the second run restored operator state:\n{log2}");
}

/// Messages in the (one-partition) traffic topic.
async fn report_traffic_messages(topics: &citystream_pipeline::kafka::KafkaTopics) -> i64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let c: BaseConsumer = rdkafka::ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
    let (low, high) = c.fetch_watermarks(topics.traffic.as_deref().unwrap(), 0, Duration::from_secs(10)).unwrap();
    high - low
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_manifest_ahead_of_the_committed_offsets_decides_where_reading_starts() {
    // a crash between writing the manifest and committing to Kafka leaves the manifest ahead:
    // the source must start at the manifest's offsets, not at Kafka's (the manifest is in the
    // layout of stores from before numbered manifests, which is read and taken over too)
    let topics = create_topics(&unique("t8"), 1).await;
    let report = produce(&topics, 2, 808).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let t = topics.traffic.as_deref().unwrap();
    let manifest = serde_json::json!({
        "lineage": "00c0ffee00c0ffee",
        "epoch": 7,
        "positions": [{"topic": t, "partition": 0, "next": 1000}],
    });
    std::fs::write(state.join("CHECKPOINT.json"), manifest.to_string()).unwrap();
    let lake = dir.path().join("lake");
    let text = yaml(&topics, &unique("g8"), &lake, "3s").replace(
        "runtime:\n  status_interval: null\n",
        &format!("runtime:\n  status_interval: null\n  state_dir: {}\n", state.display()),
    );
    run_in_process(&text).await;
    let pos = positions(&lake).await;
    let traffic = &pos["traffic"];
    let valid = report.counts(citystream_schemas::EventKind::Traffic).valid as usize;
    assert!(traffic.iter().all(|(_, o)| *o >= 1000), "nothing before the manifest's offset was read again");
    assert!(traffic.len() < valid && !traffic.is_empty(), "{} of {valid} traffic rows", traffic.len());
    // the other kinds had no position in the manifest: read from the start
    assert_eq!(pos["environment"].len() as u64, report.counts(citystream_schemas::EventKind::Environment).valid);
    // the manifest moved on, with the epochs continuing after 7
    use citystream_pipeline::task::{StateStore, StateUrl};
    let after = StateStore::inspect(&StateUrl::Local(state.clone())).unwrap().unwrap();
    assert_eq!(after.lineage, "00c0ffee00c0ffee");
    assert!(after.epoch > 8, "{after:?}");
    assert!(!state.join("CHECKPOINT.json").exists(), "the old layout is gone");
}

/// Messages no decoder may choke on, each a dead letter with its reason: extreme event times
/// (the one that used to panic the decoder on every restart), a plate sent as a number and
/// under an escaped key, broken JSON. The digits `31415926` and `QPLATE` mark identifiers.
const POISON: [&str; 7] = [
    r#"{"event_id":"p1","ts":-9223372036854775808,"schema_version":1,"sensor_id":"loop-1","segment_id":"seg-1","lane":1,"interval_s":30,"flow":3,"occupancy":0.1,"speed_kmh":50}"#,
    r#"{"event_id":"p2","ts":9223372036854775807,"schema_version":1,"sensor_id":"loop-1","segment_id":"seg-1","lane":1,"interval_s":30,"flow":3,"occupancy":0.1,"speed_kmh":50}"#,
    r#"{"event_id":"p3","ts":"+275760-09-13T00:00:00Z","schema_version":1,"sensor_id":"loop-1","segment_id":"seg-1","lane":1,"interval_s":30,"flow":3,"occupancy":0.1,"speed_kmh":50}"#,
    r#"{"event_id":"p4","ts":18446744073709551615,"schema_version":1,"sensor_id":"loop-1","segment_id":"seg-1","lane":1,"interval_s":30,"flow":2147483648,"occupancy":1e400,"speed_kmh":50}"#,
    r#"{"event_id":"p5","ts":0,"schema_version":1,"sensor_id":"loop-1","plate":31415926001,"segment_id":"seg-1"}"#,
    r#"{"event_id":"p6","ts":0,"schema_version":1,"pl\u0061te":"ZQPLATE6","sensor_id":"loop-1"}"#,
    r#"{"event_id":"p7","ts":0,"schema_version":1,"plate":["ZQPLATE7","ZQPLATE8"],"sensor_id":"lo"#,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_letters_once_across_a_sigkill_and_the_pipeline_goes_on() {
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let topics = create_topics(&unique("t9"), 3).await;
    let traffic = topics.traffic.clone().unwrap();
    let producer: FutureProducer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", brokers()).create().expect("producer");
    for payload in POISON {
        producer
            .send(FutureRecord::<(), str>::to(&traffic).partition(0).payload(payload), Duration::from_secs(10))
            .await
            .expect("poison delivered");
    }
    let report = produce(&topics, 3, 909).await;
    let with_state = |yaml: String, data: &std::path::Path| {
        let stages = concat!(
            "  traffic_unique: {type: dedup, input: traffic, horizon: 10m}\n",
            "  traffic_windows:\n",
            "    type: window\n",
            "    input: traffic_unique\n",
            "    key: [segment_id]\n",
            "    size: 5m\n",
            "    aggregates: [{fn: count, as: n}, {fn: sum, column: flow, as: vehicles}, ",
            "{fn: quantile, column: speed_kmh, q: 0.85, as: p85}]\n",
            "sinks:\n",
        );
        yaml.replacen("sinks:\n", stages, 1)
            .replace(
                "      traffic: traffic\n",
                "      traffic: traffic\n      traffic_windows: traffic_windows\n      \
                 windows_late: [traffic_unique.late_events, traffic_windows.late_events]\n",
            )
            .replace("runtime:\n", &format!("runtime:\n  state_dir: {}/state\n", data.display()))
    };

    let reference = tempfile::tempdir().unwrap();
    run_in_process(&with_state(
        yaml(&topics, &unique("g9ref"), &reference.path().join("lake"), "3s"),
        reference.path(),
    ))
    .await;

    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let cfg = dir.path().join("pipeline.yaml");
    std::fs::write(
        &cfg,
        with_state(yaml(&topics, &unique("g9"), &lake, "5s"), dir.path())
            .replace("batch_rows: 4096", "batch_rows: 256"),
    )
    .unwrap();
    let log = dir.path().join("run1.log");
    let mut first = spawn(&cfg, &log);
    wait_for_rows(&lake, 4, Duration::from_secs(60));
    first.kill().expect("SIGKILL");
    first.wait().unwrap();
    let log2 = dir.path().join("run2.log");
    let mut second = spawn(&cfg, &log2);
    wait_exit(&mut second, Duration::from_secs(300), &log2);

    // every poison message is one dead letter, with its reason; the rest of the input is whole
    let (ctx, _) = citystream_pipeline::sql::context(&lake).await.unwrap();
    let q = "SELECT src_offset, reason_code, reason, CAST(payload AS VARCHAR) AS payload FROM dead_letters \
             WHERE source LIKE '%traffic' AND src_partition = 0 AND src_offset < 7 ORDER BY src_offset";
    let rows = ctx.sql(q).await.unwrap().collect().await.unwrap();
    let text = arrow::util::pretty::pretty_format_batches(&rows).unwrap().to_string();
    let offsets: Vec<i64> = rows
        .iter()
        .flat_map(|b| b.column(0).as_any().downcast_ref::<arrow::array::Int64Array>().unwrap().values().to_vec())
        .collect();
    assert_eq!(offsets, (0..7).collect::<Vec<_>>(), "each poison message once in dead_letters:\n{text}");
    for code in ["timestamp_out_of_bounds", "bad_json"] {
        assert!(text.contains(code), "{code} among the reasons:\n{text}");
    }
    let pos = positions(&lake).await;
    for kind in citystream_schemas::EventKind::ALL {
        let v = &pos[kind.as_str()];
        assert_eq!(v.len() as u64, report.counts(kind).valid, "{kind}: every valid event once");
    }
    let malformed: u64 = report.kinds.values().map(|c| c.malformed).sum();
    assert_eq!(pos["dead_letters"].len() as u64, malformed + POISON.len() as u64, "dead letters");

    // the windows equal those of the uninterrupted run, up to an hour before the end
    let end_ms: i64 = {
        let b = ctx.sql("SELECT CAST(max(ts) AS BIGINT) FROM traffic").await.unwrap().collect().await.unwrap();
        b[0].column(0).as_any().downcast_ref::<arrow::array::Int64Array>().unwrap().value(0)
    };
    let compare = common::tables::Compare {
        skip_tables: &["energy"],
        skip_columns: &[],
        until_ms: Some(end_ms / 1000 * 1000 - 3_600_000),
    };
    let expected = common::tables::table_rows(&reference.path().join("lake"), &compare).await;
    let got = common::tables::table_rows(&lake, &compare).await;
    common::tables::assert_same_tables("killed and restarted with poison", &got, &expected);

    // no identifier on disk or in a log line
    let mut everything = text.clone();
    for l in [&log, &log2] {
        everything.push_str(&std::fs::read_to_string(l).unwrap());
    }
    for marker in ["31415926", "QPLATE"] {
        assert!(!everything.contains(marker), "an identifier reached a dead letter or a log:\n{everything}");
    }
}

/// `citystream simulate --kafka` (and every producer here) puts a key in the partition a Java
/// producer would choose (murmur2), so topics shared with Java services agree on keys; traffic
/// is keyed by corridor (`deploy/kafka.yaml`'s `keys`), so a segment and its neighbours share a
/// partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_streams_are_partitioned_as_java_producers_partition() {
    use rdkafka::message::Message;
    let topics = create_topics(&unique("t-murmur"), 3).await;
    produce(&topics, 1, 11).await;
    let consumer = read_from_start(topics.traffic.as_deref().unwrap(), &unique("g-murmur"));
    let mut per_key: std::collections::BTreeMap<String, u64> = Default::default();
    while let Ok(m) = tokio::time::timeout(Duration::from_secs(5), consumer.recv()).await {
        let m = m.unwrap();
        let key = m.key().expect("keyed");
        assert_eq!(m.partition(), citystream_pipeline::kafka::partition::partition_of(key, 3));
        let row: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap_or_default();
        if let Some(seg) = row["segment_id"].as_str() {
            // `seg-CC-II`: corridor CC, as in road_graph.csv's `corridor` column
            let corridor: u32 = seg[4..6].parse().unwrap();
            assert_eq!(std::str::from_utf8(key).unwrap(), corridor.to_string(), "keyed by the corridor of {seg}");
        }
        *per_key.entry(String::from_utf8_lossy(key).into_owned()).or_default() += 1;
    }
    assert!(per_key.values().sum::<u64>() > 1000, "an hour of traffic: {per_key:?}");
    assert_eq!(per_key.keys().collect::<Vec<_>>(), ["0", "1", "2"], "the three corridors");
}

/// Under the KIP-848 group protocol the broker holds a static member's `group.instance.id`
/// until that member's session expires, so a replacement started at once (a pod restarted
/// after a crash) is refused with a fatal error. The source stops with the reason, so the pod
/// is restarted, instead of polling a consumer that will never read again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replacement_refused_its_group_instance_id_stops_with_the_reason() {
    let topics = create_topics(&unique("t848"), 2).await;
    produce(&topics, 1, 848).await;
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let text = yaml(&topics, &unique("g848"), &lake, "600s").replace(
        "      session.timeout.ms: \"10000\"\n      heartbeat.interval.ms: \"1000\"\n",
        "      group.protocol: consumer\n      group.instance.id: worker-0\n",
    );
    assert!(text.contains("group.protocol: consumer"));
    let cfg = dir.path().join("kip848.yaml");
    std::fs::write(&cfg, text).unwrap();
    let (first_log, second_log) = (dir.path().join("first.log"), dir.path().join("second.log"));
    let mut first = spawn(&cfg, &first_log);
    tokio::task::spawn_blocking({
        let lake = lake.clone();
        move || wait_for_rows(&lake, 1, Duration::from_secs(60))
    })
    .await
    .unwrap();
    first.kill().unwrap();
    first.wait().unwrap();
    let mut second = spawn(&cfg, &second_log);
    let status = tokio::task::spawn_blocking({
        let log = second_log.clone();
        move || wait_status(&mut second, Duration::from_secs(40), &log)
    })
    .await
    .unwrap();
    let log = std::fs::read_to_string(&second_log).unwrap();
    assert!(!status.success(), "{log}");
    assert!(log.contains("failed for good") && log.contains("instance"), "{log}");
}
