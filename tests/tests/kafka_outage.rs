//! The broker goes away for 20 seconds in the middle of a stream: the pipeline waits, recovers
//! and loses nothing. Its own test binary, so stopping the broker cannot disturb other tests
//! (cargo runs test binaries one after another).

mod common;

use std::time::Duration;

use citystream_operators::Metrics;
use citystream_pipeline::config::{self, plan::plan};
use citystream_pipeline::runtime::{self, StopHandle};
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_of_20_seconds_loses_nothing() {
    let topics = create_topics(&unique("t4"), 3).await;
    let report = produce(&topics, 26, 404).await;
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    // small batches and a slow start so the outage lands mid-stream; idle end well after it
    // The session outlives the outage, so the group keeps our assignment. (With a shorter
    // session the assignment is lost and the source stops on purpose: another member may have
    // taken the partitions, and a restart replays exactly-once from the last commit.)
    let text = yaml(&topics, &unique("g4"), &lake, "40s")
        .replace("batch_rows: 4096", "batch_rows: 256")
        .replace("session.timeout.ms: \"10000\"", "session.timeout.ms: \"45000\"");
    let p = plan(config::load_str(&text, "outage.yaml").unwrap(), "outage.yaml").unwrap();
    let (_stop, rx) = StopHandle::new();
    let run = tokio::spawn(runtime::run(p, Metrics::new(), rx));
    tokio::task::spawn_blocking({
        let lake = lake.clone();
        move || wait_for_rows(&lake, 6, Duration::from_secs(60))
    })
    .await
    .unwrap();
    let before: usize = positions(&lake).await.values().map(Vec::len).sum();
    tokio::task::spawn_blocking(|| broker_script("stop.sh")).await.unwrap();
    tokio::time::sleep(Duration::from_secs(20)).await;
    tokio::task::spawn_blocking(|| broker_script("start.sh")).await.unwrap();
    let result = tokio::time::timeout(Duration::from_secs(600), run).await.expect("finished after the outage").unwrap();
    let report_run = result.expect("the pipeline survived the outage");
    let total: u64 = report.kinds.values().map(|c| c.valid + c.malformed).sum();
    assert!((before as u64) < total, "the outage began mid-stream ({before} of {total} rows stored before it)");
    assert!(report_run.source_messages["kafka"] >= total, "everything was read at least once");
    assert_complete(&positions(&lake).await, &report);
}
