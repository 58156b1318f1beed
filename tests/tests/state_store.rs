//! Operator state on object storage (`runtime.state_url: s3://…`) against a real
//! S3-compatible server (moto's, started by `scripts/start-s3.sh`): the state protocol —
//! snapshots, manifests created only if absent, takeover at start, fencing of a process that
//! lost the state — holds there as on a local disk; and a whole pipeline process that was
//! paused while another took its state and lake over stops at its next commit, and the lake
//! they share holds exactly a calm run's rows.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Int64Array, RecordBatch};
use citystream_pipeline::task::{StateError, StateStore, StateUrl};
use common::tables::{Compare, assert_same_tables, table_rows};
use common::*;
use std::path::Path;

fn batch(v: i64) -> RecordBatch {
    RecordBatch::try_from_iter([("v", Arc::new(Int64Array::from(vec![v])) as _)]).unwrap()
}

fn at(offset: i64) -> BTreeMap<(String, i32), i64> {
    BTreeMap::from([(("traffic".to_owned(), 0), offset)])
}

#[test]
fn on_s3_state_is_restored_where_it_lands_and_a_process_that_lost_it_is_fenced() {
    let url = StateUrl::parse(&s3_state_url("protocol")).unwrap();
    assert_eq!(StateStore::inspect(&url).unwrap(), None, "a fresh prefix has no state");
    let a = StateStore::open(&url).unwrap();
    assert_eq!((a.restored_epoch(), a.first_epoch()), (0, 1));
    a.save(1, "windows", "window", &batch(1), 100).unwrap();
    a.commit(1, &at(10)).unwrap();
    a.save(2, "windows", "window", &batch(2), 200).unwrap();
    a.commit(2, &at(20)).unwrap();

    // another machine starts on the same URL: it restores epoch 2 and takes the state over
    let b = StateStore::open(&url).unwrap();
    assert_eq!((b.lineage(), b.restored_epoch(), b.first_epoch()), (a.lineage(), 2, 4));
    assert_eq!(b.load("windows", "window").unwrap().unwrap(), (batch(2), 200));
    assert_eq!(b.positions(), at(20));

    // the first process comes back: whatever it tries to commit is refused
    a.save(3, "windows", "window", &batch(666), 300).unwrap();
    let e = a.commit(3, &at(30)).unwrap_err();
    assert!(matches!(e, StateError::Fenced { taken: 3, .. }), "{e:?}");
    assert!(e.to_string().contains("another process owns the state at s3://"), "{e}");

    b.save(4, "windows", "window", &batch(4), 400).unwrap();
    b.commit(4, &at(40)).unwrap();
    let summary = StateStore::inspect(&url).unwrap().unwrap();
    assert_eq!((summary.epoch, summary.positions), (4, at(40)));
    // what the fenced process wrote under its own id is never what a restore reads
    let c = StateStore::open(&url).unwrap();
    assert_eq!(c.load("windows", "window").unwrap().unwrap(), (batch(4), 400));
}

#[test]
fn of_processes_starting_at_once_on_empty_s3_state_exactly_one_can_commit() {
    let url = StateUrl::parse(&s3_state_url("race")).unwrap();
    let opened: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4).map(|_| s.spawn(|| StateStore::open(&url))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let stores: Vec<StateStore> = opened
        .into_iter()
        .filter_map(|r| match r {
            Ok(s) => Some(s),
            // lost the race for a takeover manifest at start: also fenced
            Err(StateError::Fenced { .. }) => None,
            Err(e) => panic!("{e}"),
        })
        .collect();
    assert!(!stores.is_empty());
    let lineages: std::collections::BTreeSet<_> = stores.iter().map(|s| s.lineage().to_owned()).collect();
    assert_eq!(lineages.len(), 1, "one lineage for all: {lineages:?}");
    let won: Vec<bool> = stores.iter().map(|s| s.commit(s.first_epoch(), &at(1)).is_ok()).collect();
    assert_eq!(won.iter().filter(|w| **w).count(), 1, "exactly one commits: {won:?}");
}

#[test]
fn a_paused_pipeline_whose_state_another_took_over_stops_and_publishes_nothing() {
    // a Kafka-free pipeline (the simulator's events as files) with its state on S3, paced so it
    // is still running when it is paused; its replacement shares its state and its lake
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive");
    // recent events, which decode's default bounds accept against the file's modification time
    let start = chrono::Utc::now() - chrono::Duration::hours(3);
    let start = start.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let status = std::process::Command::new(citystream_bin())
        .args(["simulate", "--out"])
        .arg(&archive)
        .args(["--duration", "2h", "--seed", "5", "--start", &start])
        .status()
        .expect("citystream simulate");
    assert!(status.success());
    let config = |name: &str, lake: &Path, url: &str| {
        let path = dir.path().join(format!("{name}.yaml"));
        std::fs::write(
            &path,
            format!(
                "name: zombie-test
sources:
  city:
    type: files
    paths:
      traffic: {a}/traffic.jsonl
    checkpoint_interval: 200ms
    rate: 2000
stages:
  decode:
    type: decode
    input: city.traffic
    kind: traffic
sinks:
  lake:
    type: parquet
    path: {lake}
    tables:
      traffic: decode
      dead_letters: decode.dead_letters
      traffic_late: decode.late_events
runtime:
  status_interval: null
  state_url: {url}
",
                a = archive.display(),
                lake = lake.display(),
            ),
        )
        .unwrap();
        path
    };
    // the reference: one calm run
    let reference = dir.path().join("reference");
    let ref_cfg = config("reference", &reference, &s3_state_url("zombie-ref"));
    let ref_log = dir.path().join("reference.log");
    wait_exit(&mut spawn(&ref_cfg, &ref_log), Duration::from_secs(300), &ref_log);

    let url = s3_state_url("zombie");
    let lake = dir.path().join("lake");
    let (a_cfg, b_cfg) = (config("a", &lake, &url), config("b", &lake, &url));
    let (a_log, b_log) = (dir.path().join("a.log"), dir.path().join("b.log"));
    let mut a = spawn(&a_cfg, &a_log);
    let state = StateUrl::parse(&url).unwrap();
    let t0 = Instant::now();
    while StateStore::inspect(&state).unwrap().is_none_or(|c| c.epoch < 2) {
        assert!(a.try_wait().unwrap().is_none(), "ended early:\n{}", std::fs::read_to_string(&a_log).unwrap());
        assert!(t0.elapsed() < Duration::from_secs(60), "no checkpoint within a minute");
        std::thread::sleep(Duration::from_millis(20));
    }
    unsafe { libc::kill(a.id() as i32, libc::SIGSTOP) };
    let paused_at = StateStore::inspect(&state).unwrap().unwrap().epoch;
    let mut b = spawn(&b_cfg, &b_log);
    // the replacement has taken the state over once it numbered past the paused one
    let t0 = Instant::now();
    while StateStore::inspect(&state).unwrap().unwrap().epoch <= paused_at {
        assert!(t0.elapsed() < Duration::from_secs(60), "{}", std::fs::read_to_string(&b_log).unwrap());
        std::thread::sleep(Duration::from_millis(20));
    }
    unsafe { libc::kill(a.id() as i32, libc::SIGCONT) };
    let a_status = wait_status(&mut a, Duration::from_secs(60), &a_log);
    let a_text = std::fs::read_to_string(&a_log).unwrap();
    assert!(!a_status.success(), "the paused process must stop with an error:\n{a_text}");
    // at its next commit; or before it, if its replacement's recovery removed a file it had
    // open (a crashed run's temporary files go at start), or if its replacement already wrote
    // the file of the offsets it was closing (a file never replaces another)
    let fenced = a_text.contains("another process owns the state");
    let beaten = a_text.contains("a file with this offset range exists");
    assert!(
        fenced || beaten || a_text.contains(".parquet.tmp: No such file"),
        "{a_text}\n--- the replacement:\n{}",
        std::fs::read_to_string(&b_log).unwrap_or_default()
    );
    eprintln!(
        "the paused process stopped {}",
        match (fenced, beaten) {
            (true, _) => "fenced at its commit",
            (_, true) => "closing a file its replacement had written",
            _ => "on a removed file",
        }
    );
    wait_exit(&mut b, Duration::from_secs(300), &b_log);
    // the replacement read everything, from where the paused process's last commit left it
    let end = StateStore::inspect(&state).unwrap().unwrap();
    assert_eq!(end.positions.values().sum::<i64>(), archive_lines(&archive.join("traffic.jsonl")));
    // and the shared lake holds exactly the calm run's rows: what the paused process closed
    // after it lost the state stayed hidden
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let c = Compare { skip_tables: &[], skip_columns: &["received_at", "date"], until_ms: None };
    let (got, want) = rt.block_on(async { (table_rows(&lake, &c).await, table_rows(&reference, &c).await) });
    let rows = want.get("traffic").map_or(0, Vec::len);
    assert!(rows > 1000, "{rows} traffic rows; tables: {:?}", want.keys().collect::<Vec<_>>());
    assert_same_tables("paused, replaced and resumed vs calm", &got, &want);
}

/// Lines of a JSON-lines file.
fn archive_lines(path: &std::path::Path) -> i64 {
    use std::io::BufRead as _;
    std::io::BufReader::new(std::fs::File::open(path).unwrap()).lines().count() as i64
}
