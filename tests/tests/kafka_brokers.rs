//! Two real brokers, one of which stops answering mid-stream: the other's partitions go on
//! flowing (unless watermark alignment holds them, by design), and once the stopped one answers
//! again the rest follows, every row stored once.
//!
//! Its own test binary and its own cluster (ports [`NODE1_PORT`], [`NODE1_CONTROLLER_PORT`],
//! [`NODE2_PORT`]; run dirs under `KAFKA_CLUSTER_DIR`, which `scripts/test.sh` sets and stops at
//! its exit, or the target dir's `tmp/`), started with `deploy/kafka/start.sh` and stopped at
//! the end, so the suite's broker is not involved. A cluster left by a run that was killed is
//! stopped and wiped by the next.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use citystream_operators::Metrics;
use citystream_pipeline::config::{self, plan::plan};
use citystream_pipeline::kafka::KafkaTopics;
use citystream_pipeline::runtime::{self, StopHandle};
use common::*;
use rdkafka::consumer::{BaseConsumer, Consumer};

/// Node 1: broker and the cluster's controller; node 2: a broker only.
const NODE1_PORT: u16 = 19094;
const NODE1_CONTROLLER_PORT: u16 = 19095;
const NODE2_PORT: u16 = 19096;

/// How long node 2 stands still: past the native fetch's I/O timeout (30 s, after which it
/// drops the connection and connects again) and the controller's fencing of a broker that
/// stopped heart-beating (9 s, after which node 2's partitions have no leader).
const STALL: Duration = Duration::from_secs(40);
/// With watermark alignment nothing moves during the stall (see the test): past the fencing.
const ALIGNED_STALL: Duration = Duration::from_secs(15);
/// The native fetch's I/O timeout (`kafka::fetch::IO_TIMEOUT`): node 1's partitions must be
/// read whole before it, or a response node 2 stopped halfway through would have held them
/// until it (SIGSTOP lands at a random moment, so whether one was cut off is chance: the fetch's
/// unit tests cover that case for sure).
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Node 2 (a broker leading about half of every topic's partitions, neither the controller nor
/// the group's coordinator) is stopped with SIGSTOP while the source reads a backlog: its
/// connections stay open and nothing comes back, as from a broker in a long GC pause or on a
/// stalled disk. Watermark alignment is off: while node 2 stands still, node 1's partitions are
/// read and stored whole (the native fetch waits on every broker at once). Once node 2 answers
/// again (fenced meanwhile, so its partitions were without a leader for a while), its partitions
/// are read too, and the lake holds every event once. Then the same on the same cluster with
/// alignment on ([`stall_with_alignment`]).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_stops_answering_holds_back_no_other_brokers_partitions() {
    log_when_asked();
    let cluster = Cluster::start();
    stall_node2(&cluster, Alignment::Off, "t6", "g6", 406).await;
    stall_with_alignment(&cluster).await;
}

/// The same stall with watermark alignment on, as deployed (`max_drift` 10 min): node 2's
/// partitions, behind with a backlog, hold the stream's watermark, and node 1's are paused once
/// they run more than `max_drift` ahead in event time (so that windows do not fill with their
/// events: the price of tables that do not depend on which broker was slow). So node 1's
/// partitions are not whole when node 2 answers again; then everything is stored once.
async fn stall_with_alignment(cluster: &Cluster) {
    stall_node2(cluster, Alignment::Default, "t7", "g7", 407).await;
}

/// Watermark alignment in the source during the stall.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Alignment {
    /// `max_drift: null`: every partition is read as fast as it comes.
    Off,
    /// The default `max_drift`.
    Default,
}

/// Produces a backlog to topics named after `prefix`, reads it with group `group`, stops node 2
/// for [`STALL`] ([`ALIGNED_STALL`] with alignment) once the first rows are stored, and checks
/// the lake (see the tests).
async fn stall_node2(cluster: &Cluster, alignment: Alignment, prefix: &str, group: &str, seed: u64) {
    let brokers = cluster.brokers();
    // node 2 leads partitions 1 and 3 of each topic: placed, not left to the controller, whose
    // choice could give node 2 only partitions the keyed streams leave empty or nearly (it read
    // them whole before it stopped, and the stall showed nothing)
    let topics = create_topics_led_by(&brokers, &unique(prefix), &[Some(1), Some(2), Some(1), Some(2)]).await;
    let report = produce_to(&brokers, &topics, 8, seed).await;
    let parts = partitions(&brokers, &topics);
    for node in [1, 2] {
        assert!(parts.iter().any(|p| p.leader == node), "node {node} leads some partition: {parts:?}");
    }
    let on = |node: i32| parts.iter().filter(move |p| p.leader == node);

    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    // small batches and fetches (64 KiB a partition: many rounds, little read ahead) so the
    // stall lands mid-stream; the idle end is a backstop only (the run is stopped once the lake
    // is whole)
    let drift = match alignment {
        Alignment::Off => "\n    max_drift: null",
        Alignment::Default => "",
    };
    let text = yaml_on(&brokers, &topics, &unique(group), &lake, "180s")
        .replace("batch_rows: 4096", &format!("batch_rows: 256{drift}"))
        .replace("      session.timeout.ms", "      max.partition.fetch.bytes: \"65536\"\n      session.timeout.ms");
    assert!(text.contains("max.partition.fetch.bytes"));
    let p = plan(config::load_str(&text, "brokers.yaml").unwrap(), "brokers.yaml").unwrap();
    let (stop, rx) = StopHandle::new();
    let metrics = Metrics::new();
    let run = tokio::spawn(runtime::run(p, metrics.clone(), rx));
    tokio::task::spawn_blocking({
        let lake = lake.clone();
        move || wait_for_rows(&lake, 6, Duration::from_secs(60))
    })
    .await
    .unwrap();
    let files = walk(&lake).iter().filter(|f| f.ends_with(".parquet")).count();
    assert!(files >= 6, "the first rows stored within 60 s ({files} files)");

    let stall = match alignment {
        Alignment::Off => STALL,
        Alignment::Default => ALIGNED_STALL,
    };
    let stopped = Stopped::broker(&cluster.node_dir(2));
    let t0 = Instant::now();
    let at_stop = stored(&lake, &parts).await;
    assert!(
        on(1).any(|p| at_stop[&p.key()] < p.end),
        "node 1's partitions had rows left to store when node 2 stopped (else the stall shows nothing): {}",
        progress(&parts, &at_stop, &at_stop)
    );
    // (seconds into the stall, rows of node 1's partitions, of node 2's)
    let mut timeline = Vec::new();
    loop {
        let now = stored(&lake, &parts).await;
        let rows = |node| on(node).map(|p| now[&p.key()]).sum::<usize>();
        timeline.push(format!("{:.1}s {} {}", t0.elapsed().as_secs_f64(), rows(1), rows(2)));
        let done = match alignment {
            Alignment::Off => on(1).all(|p| now[&p.key()] == p.end),
            Alignment::Default => t0.elapsed() >= stall / 2,
        };
        if done {
            break;
        }
        assert!(
            alignment != Alignment::Off || t0.elapsed() < IO_TIMEOUT,
            "node 1's partitions were not stored whole within {IO_TIMEOUT:?} of node 2 standing still: {}\n\
             (seconds, rows of node 1's partitions, of node 2's): {timeline:?}",
            progress(&parts, &at_stop, &now)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let node1_whole = t0.elapsed();
    // the stall's second half: nothing of node 1's may move there with alignment (below)
    tokio::time::sleep((stall / 2).saturating_sub(t0.elapsed())).await;
    let halfway = stored(&lake, &parts).await;
    tokio::time::sleep(stall.saturating_sub(t0.elapsed())).await;
    let at_resume = stored(&lake, &parts).await;
    assert!(
        on(2).any(|p| at_resume[&p.key()] < p.end),
        "the stall held node 2's partitions back (else it began too late to show anything): {}",
        progress(&parts, &at_stop, &at_resume)
    );
    let mut stalled = None;
    if alignment == Alignment::Default {
        // paused, not slow: not whole, and not a row more in the stall's second half
        assert!(
            on(1).any(|p| at_resume[&p.key()] < p.end) && on(1).all(|p| at_resume[&p.key()] == halfway[&p.key()]),
            "alignment held node 1's partitions within max_drift of node 2's (8 hours of events) \
             from the stall's first half on: {}\nhalfway: {}",
            progress(&parts, &at_stop, &at_resume),
            progress(&parts, &at_stop, &halfway)
        );
        // and says so: the paused partitions have waited on one that has not moved since at
        // least halfway through the stall
        stalled = metrics.value("citystream_kafka_alignment_stalled_seconds", &[("source", "kafka")]);
        assert!(
            stalled.is_some_and(|s| s >= (stall / 2).as_secs_f64() - 1.0),
            "the alignment gauge counted the wait on node 2's partitions: {stalled:?} s after a {stall:?} stall"
        );
    }
    drop(stopped);

    let t1 = Instant::now();
    loop {
        let now = stored(&lake, &parts).await;
        // at least: a row stored twice ends the wait too, for `assert_complete` to report
        if parts.iter().all(|p| now[&p.key()] >= p.end) {
            break;
        }
        assert!(
            t1.elapsed() < Duration::from_secs(150),
            "{alignment:?}: the lake was not whole 150 s after node 2 answered again: {}",
            progress(&parts, &at_resume, &now)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let all_whole = t1.elapsed();
    stop.stop();
    let result = tokio::time::timeout(Duration::from_secs(120), run).await.expect("stopped within 2 minutes").unwrap();
    result.expect("the pipeline ran through the stall");
    assert_complete(&positions(&lake).await, &report);
    eprintln!(
        "{alignment:?}: watched {node1_whole:?} of node 2's {stall:?} stall (without alignment: until node 1's \
         partitions were whole; with it: the first half, the alignment gauge at {stalled:?} s when node 2 \
         resumed); everything whole {all_whole:?} after the stall\n\
         (seconds, rows of node 1's partitions, of node 2's): {timeline:?}"
    );
}

/// A partition of a test topic: its table, leader and number of messages.
#[derive(Debug)]
struct Part {
    /// The event kind's table (`traffic`, `camera`, `environment`) …
    table: &'static str,
    /// … and its index in that list (dead letters carry the partition plus 1000 times it:
    /// `positions`).
    kind: i32,
    partition: i32,
    leader: i32,
    /// Messages in it: its log end (the topics are new, the producer idempotent, not
    /// transactional: no control records).
    end: usize,
}

impl Part {
    fn key(&self) -> (&'static str, i32) {
        (self.table, self.partition)
    }
}

/// Every partition of `topics` with its leader and log end.
fn partitions(brokers: &str, topics: &KafkaTopics) -> Vec<Part> {
    let client: BaseConsumer = rdkafka::ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
    let named = [("traffic", &topics.traffic), ("camera", &topics.camera), ("environment", &topics.environment)];
    let mut out = Vec::new();
    for (kind, (table, topic)) in (0..).zip(named) {
        let topic = topic.as_deref().unwrap();
        let meta = client.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
        for p in meta.topics()[0].partitions() {
            let (low, high) = client.fetch_watermarks(topic, p.id(), Duration::from_secs(10)).unwrap();
            assert_eq!(low, 0, "{topic} {}: a new topic's log starts at 0", p.id());
            out.push(Part { table, kind, partition: p.id(), leader: p.leader(), end: high as usize });
        }
    }
    out
}

/// Rows stored per partition: its table's (with `_late`) and its dead letters.
async fn stored(lake: &Path, parts: &[Part]) -> BTreeMap<(&'static str, i32), usize> {
    let pos = positions(lake).await;
    parts
        .iter()
        .map(|p| {
            let rows = pos[p.table].iter().filter(|(q, _)| *q == p.partition).count();
            let dead = pos["dead_letters"].iter().filter(|(q, _)| *q == p.partition + 1000 * p.kind).count();
            (p.key(), rows + dead)
        })
        .collect()
}

/// Per partition, `leader: from -> to of end`, for failure messages.
fn progress(
    parts: &[Part],
    from: &BTreeMap<(&'static str, i32), usize>,
    to: &BTreeMap<(&'static str, i32), usize>,
) -> String {
    parts
        .iter()
        .map(|p| {
            format!(
                "{} {} (node {}): {} -> {} of {}",
                p.table,
                p.partition,
                p.leader,
                from[&p.key()],
                to[&p.key()],
                p.end
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// A two-node cluster of real brokers, stopped when dropped.
struct Cluster {
    /// The nodes' run dirs are `node1/` and `node2/` in it.
    dir: PathBuf,
}

impl Cluster {
    /// Node 1 first, then the group coordinator's topic (`__consumer_offsets`) made while node 1
    /// is alone, so every group's coordinator is on node 1 and stopping node 2 tests the fetch,
    /// not a coordinator's failover; then node 2.
    fn start() -> Self {
        let dir = std::env::var_os("KAFKA_CLUSTER_DIR")
            .map_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("kafka_brokers"), PathBuf::from);
        let cluster = Cluster { dir };
        // what a killed run left: its nodes stopped (node 2 perhaps still SIGSTOPped), then
        // wiped by `--fresh`
        cluster.stop_nodes();
        kafka_script(
            "start.sh",
            &[
                "--fresh",
                "--port",
                &NODE1_PORT.to_string(),
                "--controller-port",
                &NODE1_CONTROLLER_PORT.to_string(),
                "--dir",
                &cluster.node_dir(1).display().to_string(),
            ],
        );
        let node1 = format!("127.0.0.1:{NODE1_PORT}");
        // asking a group's committed offsets looks up its coordinator: the broker creates the
        // offsets topic on the brokers it has
        let client: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &node1)
            .set("group.id", unique("coordinator"))
            .create()
            .unwrap();
        let mut none = rdkafka::TopicPartitionList::new();
        none.add_partition("no-such-topic", 0);
        client.committed_offsets(none, Duration::from_secs(60)).expect("the group coordinator answered");
        let meta = client.fetch_metadata(Some("__consumer_offsets"), Duration::from_secs(10)).unwrap();
        let offsets = meta.topics()[0].partitions();
        assert!(
            !offsets.is_empty() && offsets.iter().all(|p| p.leader() == 1),
            "__consumer_offsets made on node 1 alone: {:?}",
            offsets.iter().map(|p| p.leader()).collect::<Vec<_>>()
        );
        kafka_script(
            "start.sh",
            &[
                "--fresh",
                "--port",
                &NODE2_PORT.to_string(),
                "--dir",
                &cluster.node_dir(2).display().to_string(),
                "--join",
                &cluster.node_dir(1).display().to_string(),
                "--node-id",
                "2",
            ],
        );
        let t0 = Instant::now();
        while client.fetch_metadata(None, Duration::from_secs(5)).map(|m| m.brokers().len()).unwrap_or(0) < 2 {
            assert!(t0.elapsed() < Duration::from_secs(30), "node 2 in the cluster's metadata within 30 s");
            std::thread::sleep(Duration::from_millis(200));
        }
        cluster
    }

    fn brokers(&self) -> String {
        format!("127.0.0.1:{NODE1_PORT},127.0.0.1:{NODE2_PORT}")
    }

    fn node_dir(&self, node: u32) -> PathBuf {
        self.dir.join(format!("node{node}"))
    }

    /// Stops both nodes if they run: node 2 first (a broker stopping asks the controller, node
    /// 1, to let it go), let go of a SIGSTOP first.
    fn stop_nodes(&self) {
        for node in [2, 1] {
            let dir = self.node_dir(node);
            if let Ok(pid) = std::fs::read_to_string(dir.join("kafka.pid")) {
                let _ = Command::new("kill").args(["-CONT", pid.trim()]).status();
            }
            // not asserted: it runs when dropped, perhaps while a failed test unwinds
            let path = kafka_script_path("stop.sh");
            if let Err(e) = Command::new(&path).arg("--dir").arg(&dir).args(["--timeout", "10"]).status() {
                eprintln!("{} --dir {}: {e}", path.display(), dir.display());
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_nodes();
    }
}
