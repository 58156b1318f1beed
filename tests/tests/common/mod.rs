//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod alerts;
pub mod tables;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use arrow::array::AsArray;
use arrow::datatypes::{DataType, Int32Type, Int64Type};
use citystream_operators::Metrics;
use citystream_pipeline::config::{self, plan::plan};
use citystream_pipeline::kafka::KafkaTopics;
use citystream_pipeline::kafka::produce::simulate_into;
use citystream_pipeline::runtime::{self, StopHandle};
use citystream_pipeline::simulator::{SimReport, SimulatorConfig};
use citystream_pipeline::sql;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;

/// The pipeline's log on stderr, filtered by `CITYSTREAM_TEST_RUST_LOG`, when that is set
/// (`CITYSTREAM_TEST_RUST_LOG=info cargo test ...`, to see why a test fails); nothing otherwise.
pub fn log_when_asked() {
    if let Ok(filter) = std::env::var("CITYSTREAM_TEST_RUST_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
    }
}

pub fn brokers() -> String {
    std::env::var("CITYSTREAM_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// A consumer of `topic` on the test broker, from its first message, in group `group`.
pub fn read_from_start(topic: &str, group: &str) -> rdkafka::consumer::StreamConsumer {
    use rdkafka::consumer::Consumer;
    let consumer: rdkafka::consumer::StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    consumer
}

/// A fresh `s3://` state URL on the test's S3-compatible server (`scripts/start-s3.sh`, which
/// `scripts/test.sh` runs and whose `AWS_*` environment the pipeline reads).
pub fn s3_state_url(name: &str) -> String {
    assert!(
        std::env::var_os("AWS_ENDPOINT_URL").is_some(),
        "no S3 server: run `eval \"$(scripts/start-s3.sh /tmp/s3)\"` first (scripts/test.sh does)"
    );
    let bucket = std::env::var("CITYSTREAM_S3_BUCKET").unwrap_or_else(|_| "citystate".into());
    format!("s3://{bucket}/{}", unique(name))
}

pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{prefix}-{:x}-{}", nanos % 0xffff_ffff, std::process::id())
}

/// Creates the three topics of a test with `partitions` each.
pub async fn create_topics(prefix: &str, partitions: i32) -> KafkaTopics {
    create_topics_on(&brokers(), prefix, partitions).await
}

/// [`create_topics`] on the cluster of `brokers`.
pub async fn create_topics_on(brokers: &str, prefix: &str, partitions: i32) -> KafkaTopics {
    create_topics_led_by(brokers, prefix, &vec![None; partitions as usize]).await
}

/// [`create_topics_on`] with one partition per entry of `leaders`: `Some(node)` places it on
/// that broker (one replica), `None` leaves the placement to the cluster.
pub async fn create_topics_led_by(brokers: &str, prefix: &str, leaders: &[Option<i32>]) -> KafkaTopics {
    let partitions = leaders.len() as i32;
    let placed: Option<Vec<[i32; 1]>> = leaders.iter().map(|l| l.map(|node| [node])).collect();
    let assignment: Option<Vec<&[i32]>> = placed.as_ref().map(|p| p.iter().map(|r| &r[..]).collect());
    let replication = || match &assignment {
        Some(a) => TopicReplication::Variable(a),
        None => TopicReplication::Fixed(1),
    };
    let topics = KafkaTopics {
        traffic: Some(format!("{prefix}.traffic")),
        camera: Some(format!("{prefix}.camera")),
        environment: Some(format!("{prefix}.environment")),
    };
    let admin: AdminClient<DefaultClientContext> =
        rdkafka::ClientConfig::new().set("bootstrap.servers", brokers).create().expect("admin client");
    let names = [topics.traffic.clone().unwrap(), topics.camera.clone().unwrap(), topics.environment.clone().unwrap()];
    // messages carry simulated event times as timestamps: never let time retention delete them
    let new: Vec<NewTopic> =
        names.iter().map(|n| NewTopic::new(n, partitions, replication()).set("retention.ms", "-1")).collect();
    let res = tokio::time::timeout(Duration::from_secs(30), admin.create_topics(&new, &AdminOptions::new()))
        .await
        .unwrap_or_else(|_| panic!("no Kafka broker answered at {brokers} within 30 s: start one with deploy/kafka/start.sh (scripts/test.sh does)"))
        .expect("create topics");
    for r in res {
        r.expect("topic created");
    }
    wait_for_metadata(brokers, &names, partitions).await;
    topics
}

/// Waits (30 s at most) until the broker's metadata shows every topic with all its partitions
/// led. A created topic reaches the broker's metadata cache a moment after the controller
/// acknowledged it: a consumer subscribing in between is told the topic does not exist and may
/// be assigned only part of it for a while (seen on a loaded machine).
async fn wait_for_metadata(brokers: &str, names: &[String], partitions: i32) {
    let names = names.to_vec();
    let brokers = brokers.to_owned();
    tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::Consumer;
        let client: rdkafka::consumer::BaseConsumer =
            rdkafka::ClientConfig::new().set("bootstrap.servers", &brokers).create().expect("metadata client");
        let t0 = Instant::now();
        for name in &names {
            loop {
                let ready = client.fetch_metadata(Some(name), Duration::from_secs(5)).is_ok_and(|m| {
                    m.topics().iter().any(|t| {
                        t.name() == name
                            && t.error().is_none()
                            && t.partitions().len() == partitions as usize
                            && t.partitions().iter().all(|p| p.leader() >= 0)
                    })
                });
                if ready {
                    break;
                }
                assert!(t0.elapsed() < Duration::from_secs(30), "topic {name} in the broker's metadata within 30 s");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    })
    .await
    .expect("metadata wait");
}

pub async fn produce(topics: &KafkaTopics, hours: u64, seed: u64) -> SimReport {
    produce_to(&brokers(), topics, hours, seed).await
}

/// [`produce`] to the cluster of `brokers`.
pub async fn produce_to(brokers: &str, topics: &KafkaTopics, hours: u64, seed: u64) -> SimReport {
    let cfg = SimulatorConfig {
        seed,
        duration: citystream_operators::Duration::from_secs(hours * 3600),
        ..SimulatorConfig::default()
    };
    let (report, _) = simulate_into(brokers, cfg, topics, None).await.expect("produce");
    report
}

pub fn yaml(topics: &KafkaTopics, group: &str, data: &Path, idle: &str) -> String {
    yaml_on(&brokers(), topics, group, data, idle)
}

/// [`yaml`] reading from the cluster of `brokers`.
pub fn yaml_on(brokers: &str, topics: &KafkaTopics, group: &str, data: &Path, idle: &str) -> String {
    format!(
        "\
name: kafka-test
sources:
  kafka:
    type: kafka
    brokers: {brokers}
    group_id: {group}
    topics: {{traffic: {t}, camera: {c}, environment: {e}}}
    batch_rows: 4096
    checkpoint_interval: 1s
    stop_when_idle: {idle}
    properties:
      session.timeout.ms: \"10000\"
      heartbeat.interval.ms: \"1000\"
stages:
  traffic: {{type: decode, input: kafka.traffic, kind: traffic, max_past: null, max_future: null}}
  camera: {{type: decode, input: kafka.camera, kind: camera, max_past: null, max_future: null}}
  environment: {{type: decode, input: kafka.environment, kind: environment, max_past: null, max_future: null}}
sinks:
  lake:
    type: parquet
    path: {data}
    tables:
      traffic: traffic
      camera: camera
      environment: environment
      dead_letters: [traffic.dead_letters, camera.dead_letters, environment.dead_letters]
      traffic_late: traffic.late_events
      camera_late: camera.late_events
      environment_late: environment.late_events
runtime:
  status_interval: null
",
        t = topics.traffic.as_ref().unwrap(),
        c = topics.camera.as_ref().unwrap(),
        e = topics.environment.as_ref().unwrap(),
        data = data.display()
    )
}

pub async fn run_in_process(yaml: &str) -> citystream_pipeline::RunReport {
    run_in_process_with(yaml, Metrics::new()).await
}

/// [`run_in_process`], its metrics recorded in `metrics`.
pub async fn run_in_process_with(yaml: &str, metrics: Metrics) -> citystream_pipeline::RunReport {
    let p = plan(config::load_str(yaml, "kafka.yaml").unwrap(), "kafka.yaml").unwrap();
    let (_stop, rx) = StopHandle::new();
    tokio::time::timeout(Duration::from_secs(600), runtime::run(p, metrics, rx))
        .await
        .expect("the pipeline finished within 10 minutes")
        .expect("the pipeline ran without error")
}

/// Per table, the sorted `(src_partition, src_offset)` of every stored row: the row content
/// is a function of the position, so equal positions mean equal rows. An event kind's rows are
/// those of its table and of its `_late` table (events behind their partition's watermark).
pub async fn positions(lake: &Path) -> BTreeMap<String, Vec<(i32, i64)>> {
    let (ctx, names) = if lake.exists() { sql::context(lake).await.unwrap() } else { Default::default() };
    let mut out = BTreeMap::new();
    for table in ["traffic", "camera", "environment", "dead_letters"] {
        let mut v = Vec::new();
        let late = format!("{table}_late");
        for t in [table, late.as_str()].into_iter().filter(|t| names.iter().any(|n| n == t)) {
            let q = if t == "dead_letters" {
                "SELECT src_partition + 1000 * (CASE WHEN source LIKE '%traffic' THEN 0 WHEN source LIKE '%camera' THEN 1 ELSE 2 END), src_offset FROM dead_letters".to_owned()
            } else {
                format!("SELECT src_partition, src_offset FROM {t}")
            };
            for b in ctx.sql(&q).await.unwrap().collect().await.unwrap() {
                let p = arrow::compute::cast(b.column(0), &DataType::Int32).unwrap();
                let p = p.as_primitive::<Int32Type>();
                let o = b.column(1).as_primitive::<Int64Type>();
                v.extend(p.values().iter().copied().zip(o.values().iter().copied()));
            }
        }
        v.sort_unstable();
        out.insert(table.to_owned(), v);
    }
    out
}

pub fn assert_complete(pos: &BTreeMap<String, Vec<(i32, i64)>>, report: &SimReport) {
    for kind in citystream_schemas::EventKind::ALL {
        let v = &pos[kind.as_str()];
        let mut dedup = v.clone();
        dedup.dedup();
        assert_eq!(dedup.len(), v.len(), "{kind}: no row is stored twice");
        assert_eq!(v.len() as u64, report.counts(kind).valid, "{kind}: every valid event is stored");
    }
    let malformed: u64 = report.kinds.values().map(|c| c.malformed).sum();
    assert_eq!(pos["dead_letters"].len() as u64, malformed, "dead letters equal malformed events");
}

pub fn citystream_bin() -> PathBuf {
    // target/debug/deps/kafka-… → target/debug/citystream (built by `cargo build --workspace`)
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("citystream");
    assert!(bin.exists(), "{} is missing: run `cargo build --workspace` first (scripts/test.sh does)", bin.display());
    bin
}

pub fn spawn(config: &Path, log: &Path) -> Child {
    Command::new(citystream_bin())
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", std::env::var("CITYSTREAM_TEST_RUST_LOG").unwrap_or_else(|_| "info".into()))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("start citystream")
}

pub fn wait_for_rows(lake: &Path, at_least: usize, limit: Duration) {
    let t0 = Instant::now();
    loop {
        let n = walk(lake).iter().filter(|p| p.ends_with(".parquet")).count();
        if n >= at_least || t0.elapsed() > limit {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits for `child` to exit, within `limit` (killed and a failure after it, with its `log`).
pub fn wait_status(child: &mut Child, limit: Duration, log: &Path) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            panic!("citystream did not finish within {limit:?}\n{}", std::fs::read_to_string(log).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn wait_exit(child: &mut Child, limit: Duration, log: &Path) {
    let status = wait_status(child, limit, log);
    assert!(status.success(), "citystream failed: {status}\n{}", std::fs::read_to_string(log).unwrap_or_default());
}

pub fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p.display().to_string());
            }
        }
    }
    out
}

/// A folder for what a test binary makes once and its tests share (held by a `static`, which
/// is never dropped: a temporary folder there was left behind in /tmp at every run, keys and
/// all): `name` under cargo's scratch folder for integration tests (`target/tmp`), emptied
/// when first asked for in a run. One run of the binary at a time.
pub fn shared_scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => panic!("emptying {}: {e}", dir.display()),
        _ => {}
    }
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    dir
}

/// Runs a broker control script of `deploy/kafka/` on the broker `scripts/test.sh` started
/// (`KAFKA_RUN_DIR`, `KAFKA_PORT`, `KAFKA_CONTROLLER_PORT` from the environment).
pub fn broker_script(script: &str) {
    kafka_script(script, &["--dir", &test_broker_dir().display().to_string()]);
}

/// A broker control script of `deploy/kafka/` (`start.sh`, `stop.sh`).
pub fn kafka_script_path(script: &str) -> PathBuf {
    repo_root().join("deploy/kafka").join(script)
}

/// Runs `deploy/kafka/SCRIPT` with `args` and asserts it succeeded.
pub fn kafka_script(script: &str, args: &[&str]) {
    let path = kafka_script_path(script);
    let status = Command::new(&path).args(args).status().unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(status.success(), "{script} {args:?} failed: {status}");
}

/// The run dir of the broker `scripts/test.sh` started (`KAFKA_RUN_DIR`).
pub fn test_broker_dir() -> PathBuf {
    std::env::var("KAFKA_RUN_DIR")
        .expect("KAFKA_RUN_DIR names the test broker's run dir (scripts/test.sh sets it)")
        .into()
}

/// A broker, stopped with SIGSTOP until this is dropped (SIGCONT, a panic included: the
/// tests after must find it running). Its connections stay open and nothing comes back.
pub struct Stopped(String);

impl Stopped {
    /// Stops the broker started from run dir `dir` (`deploy/kafka/start.sh --dir`).
    pub fn broker(dir: &Path) -> Self {
        let pid = std::fs::read_to_string(dir.join("kafka.pid")).expect("the broker's pid file");
        let pid = pid.trim().to_owned();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert!(
            String::from_utf8_lossy(&cmdline).contains("kafka.Kafka"),
            "pid {pid} of {} is a running broker",
            dir.display()
        );
        let status = Command::new("kill").args(["-STOP", &pid]).status().unwrap();
        assert!(status.success(), "kill -STOP the broker: {status}");
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let status = Command::new("kill").args(["-CONT", &self.0]).status();
        if !status.as_ref().is_ok_and(|s| s.success()) {
            eprintln!("kill -CONT {} failed: {status:?}", self.0);
        }
    }
}

/// The repository's root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// deploy/local.yaml text made runnable from a test: its data under `data`, shared `secrets`
/// (pseudonym and DP noise keys) when given, endpoints on free ports, repository paths
/// absolute, no status line.
pub fn local_yaml_in(text: &str, data: &Path, secrets: Option<&Path>) -> String {
    let root = repo_root();
    let mut text = text.to_owned();
    if let Some(s) = secrets {
        for key in ["pseudonym.key", "dp_noise.key"] {
            text =
                text.replace(&format!("${{CITYSTREAM_DATA:-data}}/secrets/{key}"), &s.join(key).display().to_string());
        }
    }
    text.replace("${CITYSTREAM_DATA:-data}", &data.display().to_string())
        .replace("${CITYSTREAM_METRICS_ADDR:-127.0.0.1:9464}", "127.0.0.1:0")
        .replace("${CITYSTREAM_CONTROL_ADDR:-127.0.0.1:8088}", "127.0.0.1:0")
        .replace("road_graph: deploy/", &format!("road_graph: {}/deploy/", root.display()))
        .replace("sites: deploy/", &format!("sites: {}/deploy/", root.display()))
        .replace("models/onnx/", &format!("{}/models/onnx/", root.display()))
        .replace("  status_interval: 5s\n", "  status_interval: null\n")
}
