//! The files source (`type: files`): a simulated span written as archive files — traffic as
//! hourly `.jsonl.zst`, camera as `.jsonl.gz`, environment as plain `.jsonl` — and replayed
//! through the embedded default's stages (deploy/local.yaml) gives the same derived tables as
//! the simulator source of the same seed; a backfill killed with SIGKILL at random moments and
//! restarted gives them too, with no row twice.

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use citystream_pipeline::simulator::{SimMessage, Simulation, SimulatorConfig};
use citystream_schemas::EventKind;
use common::tables::{Compare, assert_same_tables, table_rows};
use common::*;

/// Simulated hours (`CITYSTREAM_FILES_HOURS`, default 4).
fn hours() -> i64 {
    std::env::var("CITYSTREAM_FILES_HOURS").ok().and_then(|h| h.parse().ok()).unwrap_or(4)
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// The span, the archive written from it and the simulator run's tables, made once.
struct Archive {
    /// deploy/local.yaml's simulator, over the span.
    simulator: SimulatorConfig,
    /// One directory per kind.
    files: PathBuf,
    /// Where the runs' shared secrets (pseudonyms, DP noise) live.
    secrets: PathBuf,
    messages: usize,
    /// Where it all lives ([`shared_scratch`]).
    dir: PathBuf,
}

fn archive() -> &'static Archive {
    static A: OnceLock<Archive> = OnceLock::new();
    A.get_or_init(|| {
        let raw = citystream_pipeline::config::load_str(&local_yaml(), "local.yaml").unwrap();
        let mut cfg: SimulatorConfig = match raw.sources.into_values().next().unwrap() {
            citystream_pipeline::config::SourceConfig::Simulator(s) => *s,
            _ => panic!("local.yaml reads the simulator"),
        };
        // ending at the latest 04:00 UTC at least two hours ago: the hours before it are night,
        // when the night-noise rule raises alerts, so the tables hold alerts whatever the hour
        // the tests run at (a window of morning hours has none, and the tests that look for
        // alert files failed then); and recent, which decode's default bounds (7 days) accept
        // against the files' modification time
        let now = now_ms();
        let (hour, day) = (3_600_000, 86_400_000);
        let latest = now - 2 * hour;
        let end = latest - (latest - 4 * hour).rem_euclid(day);
        cfg.start = citystream_pipeline::simulator::StartTime(Some(end - hours() * 3_600_000));
        cfg.duration = citystream_operators::Duration::from_secs(hours() as u64 * 3600);
        cfg.ground_truth = None;
        let dir = shared_scratch("files_source-archive");
        let files = dir.join("archive");
        let secrets = dir.join("secrets");
        std::fs::create_dir_all(&secrets).unwrap();
        for (i, f) in ["pseudonym.key", "dp_noise.key"].into_iter().enumerate() {
            std::fs::write(secrets.join(f), [23 + i as u8; 32]).unwrap();
            std::fs::set_permissions(secrets.join(f), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        }
        let mut sim = Simulation::new(cfg.clone(), now);
        let mut messages: Vec<SimMessage> = Vec::new();
        while sim.step(&mut messages) {}
        write_archive(&files, &messages);
        Archive { simulator: cfg, files, secrets, messages: messages.len(), dir }
    })
}

/// Writes `messages` as an archive would hold them, in arrival order: traffic in hourly
/// zstd files (by arrival hour), camera in one gzip file, environment in one plain file.
fn write_archive(dir: &Path, messages: &[SimMessage]) {
    for k in EventKind::ALL {
        std::fs::create_dir_all(dir.join(k.as_str())).unwrap();
    }
    let mut traffic: std::collections::BTreeMap<i64, Vec<u8>> = Default::default();
    let mut camera = Vec::new();
    let mut environment = Vec::new();
    for m in messages {
        let out = match m.kind {
            EventKind::Traffic => traffic.entry(m.arrival_ms.div_euclid(3_600_000)).or_default(),
            EventKind::Camera => &mut camera,
            EventKind::Environment => &mut environment,
        };
        out.extend_from_slice(&m.payload);
        out.push(b'\n');
    }
    for (hour, lines) in traffic {
        let name = format!("traffic/{hour:08}.jsonl.zst");
        std::fs::write(dir.join(name), zstd::encode_all(lines.as_slice(), 3).unwrap()).unwrap();
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&camera).unwrap();
    std::fs::write(dir.join("camera/all.jsonl.gz"), gz.finish().unwrap()).unwrap();
    std::fs::write(dir.join("environment/all.jsonl"), environment).unwrap();
}

fn local_yaml() -> String {
    std::fs::read_to_string(root().join("deploy/local.yaml")).unwrap()
}

/// deploy/local.yaml with `sources` replaced, its data under `data`, and the shared secrets.
fn pipeline_yaml(sources: &str, data: &Path, state: bool) -> String {
    let text = local_yaml();
    let sources_at = text.find("\nsources:\n").unwrap();
    let stages_at = text.find("\nstages:\n").unwrap();
    let text = local_yaml_in(
        &format!("{}\nsources:\n{sources}{}", &text[..sources_at], &text[stages_at..]),
        data,
        Some(&archive().secrets),
    );
    if state { format!("{text}  state_dir: {}/state\n", data.display()) } else { text }
}

/// The files source over the archive, named like the simulator source (`city`), so lineage
/// columns (`source`, `src_offset`) match too.
fn files_source(extra: &str) -> String {
    let d = archive().files.display();
    format!(
        "  city:
    type: files
    paths:
      traffic: {d}/traffic
      camera: {d}/camera/*.jsonl.gz
      environment: {d}/environment/all.jsonl
    batch_rows: 2048
    checkpoint_interval: 300ms
    max_out_of_orderness: 2m
{extra}"
    )
}

fn simulator_source() -> String {
    let c = &archive().simulator;
    let start = chrono::DateTime::from_timestamp_millis(c.start.0.unwrap())
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let text = local_yaml();
    let sim = &text[text.find("\nsources:\n").unwrap() + 10..text.find("\nstages:\n").unwrap()];
    let start_line = sim.lines().find(|l| l.trim_start().starts_with("start:")).unwrap();
    let duration_line = sim.lines().find(|l| l.trim_start().starts_with("duration:")).unwrap();
    let gt_line = sim.lines().find(|l| l.trim_start().starts_with("ground_truth:")).unwrap();
    format!("{sim}\n")
        .replace(start_line, &format!("    start: {start}"))
        .replace(duration_line, &format!("    duration: {}h", hours()))
        .replace(&format!("{gt_line}\n"), "")
}

/// Every table of a lake up to an hour before the end of the span, `received_at` (the
/// simulator's arrival time, the files' modification time), the `date` partition column (of
/// `dead_letters`, by arrival; elsewhere a function of the compared event time) and
/// wall-clock columns left out.
/// With a state directory the end of the files is not the end of the stream: what is still
/// open then (an alert not yet resolved) stays in the last checkpoint for the next files.
async fn tables(data: &Path) -> std::collections::BTreeMap<String, Vec<String>> {
    let c = &archive().simulator;
    let end_ms = c.start.0.unwrap() + c.duration.as_millis_i64();
    table_rows(
        &data.join("lake"),
        &Compare {
            skip_tables: &["energy"],
            skip_columns: &["emitted_at", "received_at", "date"],
            until_ms: Some(end_ms - 3_600_000),
        },
    )
    .await
}

fn expected() -> &'static std::collections::BTreeMap<String, Vec<String>> {
    static T: OnceLock<std::collections::BTreeMap<String, Vec<String>>> = OnceLock::new();
    T.get_or_init(|| {
        std::thread::spawn(|| {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async {
                let data = archive().dir.join("simulator-run");
                let report = run_in_process(&pipeline_yaml(&simulator_source(), &data, false)).await;
                assert_eq!(report.source_messages["city"] as usize, archive().messages);
                tables(&data).await
            })
        })
        .join()
        .unwrap()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_archive_replayed_from_files_gives_the_simulator_runs_tables() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let report = run_in_process(&pipeline_yaml(&files_source(""), &data, true)).await;
    assert_eq!(report.source_messages["city"] as usize, archive().messages, "every line read once");
    let got = tables(&data).await;
    let want = expected();
    assert!(want["traffic"].len() > 5_000, "a real span: {} traffic rows", want["traffic"].len());
    assert_same_tables("files vs simulator", &got, want);

    // a second run over the same state directory finds everything read: no row twice
    let again = run_in_process(&pipeline_yaml(&files_source(""), &data, true)).await;
    assert_eq!(again.source_messages["city"], 0, "a finished backfill reads nothing again");
    assert_same_tables("files, run again", &tables(&data).await, want);
}

#[test]
fn a_backfill_killed_at_random_moments_resumes_without_a_row_twice() {
    killed_backfill(|data| format!("  state_dir: {}/state\n", data.display()));
}

#[test]
fn a_backfill_with_its_state_on_s3_killed_at_random_moments_resumes_without_a_row_twice() {
    let url = s3_state_url("files-killed");
    killed_backfill(|_| format!("  state_url: {url}\n"));
    // the state is where it was asked to be, and it covers every line of the archive
    let state = citystream_pipeline::task::StateUrl::parse(&url).unwrap();
    let c = citystream_pipeline::task::StateStore::inspect(&state).unwrap().expect("a manifest on S3");
    assert_eq!(c.positions.values().sum::<i64>(), archive().messages as i64, "{c:?}");
}

/// The archive replayed paced, SIGKILLed a few times at random moments and run to the end, with
/// the state where `state` (the `runtime:` line for a data directory) puts it.
fn killed_backfill(state: impl Fn(&Path) -> String) {
    let want = expected();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // paced, so that kills land in the middle of the backfill
    let config = dir.path().join("files.yaml");
    let text = pipeline_yaml(&files_source("    rate: 6000\n"), &data, false) + &state(&data);
    std::fs::write(&config, text).unwrap();
    let log = dir.path().join("run.log");
    let seed = now_ms() as u64;
    let mut kills = Vec::new();
    for i in 0..3u64 {
        let mut child = spawn(&config, &log);
        // after at least one checkpoint, at a moment that differs run to run
        let wait = 1500 + (seed.rotate_left(i as u32 * 13) % 2500);
        std::thread::sleep(Duration::from_millis(wait));
        if let Some(status) = child.try_wait().unwrap() {
            assert!(
                status.success(),
                "citystream failed: {status}\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            break;
        }
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        child.wait().unwrap();
        kills.push(wait);
    }
    eprintln!("killed after {kills:?} ms");
    let mut child = spawn(&config, &log);
    wait_exit(&mut child, Duration::from_secs(600), &log);
    assert!(!kills.is_empty(), "the backfill was killed at least once");
    assert_same_tables("killed and resumed vs simulator", &rt_tables(&data), want);
}

fn rt_tables(data: &Path) -> std::collections::BTreeMap<String, Vec<String>> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(tables(data))
}

#[test]
fn a_files_source_without_a_state_dir_is_refused_with_help() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = pipeline_yaml(&files_source(""), &dir.path().join("data"), false);
    let raw = citystream_pipeline::config::load_str(&yaml, "files.yaml").unwrap();
    let errs = citystream_pipeline::config::plan::plan(raw, "files.yaml").unwrap_err();
    let text = errs.to_string();
    assert!(text.contains("sources.city") && text.contains("runtime.state_dir"), "{text}");
}

/// `citystream simulate --out` then `citystream replay` as the README gives them: the backfill
/// lands in its own lake, its dead letters are exactly the malformed messages the simulator
/// wrote, and replaying again finds everything done.
#[test]
fn citystream_replay_backfills_what_simulate_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let sim = dir.path().join("sim");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(citystream_bin())
            .args(args)
            .current_dir(root())
            .env("CITYSTREAM_DATA", dir.path().join("data"))
            .env("CITYSTREAM_CONTROL_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let report: serde_json::Value =
        serde_json::from_str(&run(&["simulate", "--duration", "3h", "--out", sim.to_str().unwrap()])).unwrap();
    let malformed: u64 = report["kinds"].as_object().unwrap().values().map(|k| k["malformed"].as_u64().unwrap()).sum();
    let lake = dir.path().join("backfill");
    let args = ["replay", "--files", sim.to_str().unwrap(), "--out", lake.to_str().unwrap()];
    let summary = run(&args);
    assert!(summary.contains("lake/traffic:"), "{summary}");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let count = |table: &str| {
        rt.block_on(async {
            let (ctx, _) = citystream_pipeline::sql::context(&lake).await.unwrap();
            let b = ctx.sql(&format!("SELECT count(*) FROM {table}")).await.unwrap().collect().await.unwrap();
            arrow::array::AsArray::as_primitive::<arrow::datatypes::Int64Type>(b[0].column(0)).value(0) as u64
        })
    };
    assert_eq!(count("dead_letters"), malformed, "dead letters are the simulator's malformed messages");
    let traffic = count("traffic_windows");
    assert!(traffic > 0);
    let again = run(&args);
    assert!(again.contains(": 0 events in"), "a finished replay reads nothing again: {again}");
    assert_eq!(count("traffic_windows"), traffic);

    // one hour of the three, into a lake of its own: only windows of that hour
    let hour = dir.path().join("hour");
    let (from, until) = ("2026-03-02T01:00:00Z", "2026-03-02T02:00:00Z");
    run(&[
        "replay",
        "--files",
        sim.to_str().unwrap(),
        "--out",
        hour.to_str().unwrap(),
        "--from",
        from,
        "--until",
        until,
    ]);
    let span = rt.block_on(async {
        let (ctx, _) = citystream_pipeline::sql::context(&hour).await.unwrap();
        let q = "SELECT CAST(min(window_start) AS VARCHAR), CAST(max(window_end) AS VARCHAR), count(*) FROM traffic_windows";
        let b = ctx.sql(q).await.unwrap().collect().await.unwrap();
        let s = |i: usize| arrow::util::display::array_value_to_string(b[0].column(i), 0).unwrap();
        (s(0), s(1), s(2))
    });
    assert!(span.0.starts_with("2026-03-02T01:00:00"), "{span:?}");
    assert!(span.1.as_str() <= "2026-03-02T02:00:00Z", "{span:?}");
    assert!(span.2.parse::<u64>().unwrap() > 0 && span.2.parse::<u64>().unwrap() < traffic, "{span:?}");
}

/// A truncated `.zst` among the traffic files: by default it is skipped (its readable lines
/// delivered, the rest logged and counted) and the backfill goes on; with `on_bad_file: stop`
/// the run ends with an error naming the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_file_is_skipped_or_stops_the_run_as_configured() {
    let dir = tempfile::tempdir().unwrap();
    let traffic = dir.path().join("traffic");
    std::fs::create_dir_all(&traffic).unwrap();
    let mut names: Vec<_> =
        std::fs::read_dir(archive().files.join("traffic")).unwrap().map(|e| e.unwrap().path()).collect();
    names.sort();
    for (i, f) in names.iter().enumerate() {
        let mut bytes = std::fs::read(f).unwrap();
        if i == 1 {
            bytes.truncate(bytes.len() / 2);
        }
        std::fs::write(traffic.join(f.file_name().unwrap()), bytes).unwrap();
    }
    let bad = traffic.join(names[1].file_name().unwrap());
    let source = |extra: &str| {
        format!(
            "  city:\n    type: files\n    paths: {{traffic: {}, camera: {}/camera, environment: {}/environment}}\n{extra}",
            traffic.display(),
            archive().files.display(),
            archive().files.display()
        )
    };
    let run = |yaml: String| async move {
        let p = citystream_pipeline::config::plan::plan(
            citystream_pipeline::config::load_str(&yaml, "files.yaml").unwrap(),
            "files.yaml",
        )
        .unwrap();
        let (_stop, rx) = citystream_pipeline::StopHandle::new();
        citystream_pipeline::runtime::run(p, citystream_operators::Metrics::new(), rx).await
    };
    let skipped = run(pipeline_yaml(&source(""), &dir.path().join("skip"), true)).await.expect("a bad file is skipped");
    let read = skipped.source_messages["city"] as usize;
    assert!(read < archive().messages && read > archive().messages / 2, "{read} of {} lines", archive().messages);
    let err = run(pipeline_yaml(&source("    on_bad_file: stop\n"), &dir.path().join("stop"), true))
        .await
        .expect_err("on_bad_file: stop ends the run");
    let text = err.to_string();
    assert!(text.contains(&bad.display().to_string()) && text.contains("after line"), "{text}");
}

/// A resumed run removes the files an earlier run wrote past its last checkpoint before any
/// sink starts: the control center, which rebuilds its book from the `alerts` table when it
/// starts, never sees an alert that the replay is about to write again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_past_the_restored_checkpoint_are_gone_before_the_control_center_reads_the_lake() {
    use arrow::array::{AsArray, RecordBatch, StringArray};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    run_in_process(&pipeline_yaml(&files_source(""), &data, true)).await;
    use citystream_pipeline::task::{StateStore, StateUrl};
    let state = StateStore::inspect(&StateUrl::Local(data.join("state"))).unwrap().expect("a checkpoint");
    let (lineage, epoch) = (state.lineage, state.epoch);
    // what a run killed after that checkpoint left: alert rows in a file of the next epoch
    let alerts = data.join("lake/alerts");
    let mut files = Vec::new();
    let mut stack = vec![alerts.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else if e.file_name().to_string_lossy().starts_with(&format!("part-{lineage}-e")) {
                files.push(e.path());
            }
        }
    }
    let source = files.first().expect("the run wrote alerts named by epoch");
    let reader =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(source).unwrap())
            .unwrap()
            .build()
            .unwrap();
    let batch = reader.map(Result::unwrap).next().expect("rows");
    let id = batch.schema().index_of("alert_id").unwrap();
    let mut columns = batch.columns().to_vec();
    columns[id] = std::sync::Arc::new(StringArray::from_iter_values(
        batch.column(id).as_string::<i32>().iter().map(|_| "planted-past-the-checkpoint"),
    ));
    let planted = RecordBatch::try_new(batch.schema(), columns).unwrap();
    let name = format!("part-{lineage}-e{:012}-planted-000001.parquet", epoch + 1);
    let path = source.parent().unwrap().join(name);
    let mut w =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), planted.schema(), None).unwrap();
    w.write(&planted).unwrap();
    w.close().unwrap();

    // run again, polling for new files, with the control center on a known port
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let yaml = pipeline_yaml(&files_source("    stop_when_done: false\n"), &data, true)
        .replace("    addr: 127.0.0.1:0", &format!("    addr: 127.0.0.1:{port}"));
    let plan = citystream_pipeline::config::plan::plan(
        citystream_pipeline::config::load_str(&yaml, "files.yaml").unwrap(),
        "files.yaml",
    )
    .unwrap();
    let (stop, rx) = citystream_pipeline::StopHandle::new();
    let run = tokio::spawn(citystream_pipeline::runtime::run(plan, citystream_operators::Metrics::new(), rx));
    let viewer = std::fs::read_to_string(data.join("secrets/control_tokens"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("viewer ").map(|r| r.split_whitespace().last().unwrap().to_owned()))
        .expect("a viewer token");
    let get = |path: &'static str| {
        let viewer = viewer.clone();
        async move {
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
            let req = format!(
                "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {viewer}\r\nConnection: close\r\n\r\n"
            );
            s.write_all(req.as_bytes()).await.ok()?;
            let mut out = String::new();
            s.read_to_string(&mut out).await.ok()?;
            Some(out)
        }
    };
    let mut listing = None;
    for _ in 0..300 {
        if let Some(r) = get("/api/alerts?limit=100000").await {
            listing = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let listing = listing.expect("the control center answered");
    let planted = get("/api/alerts/planted-past-the-checkpoint").await.unwrap();
    stop.stop();
    run.await.unwrap().expect("the resumed run ended cleanly");
    assert!(listing.starts_with("HTTP/1.1 200"), "{listing}");
    assert!(listing.contains("\"alert_id\""), "the book holds the alerts of the first run: {listing:.300}");
    assert!(!listing.contains("planted-past-the-checkpoint"), "the book read a file past the checkpoint");
    assert!(planted.starts_with("HTTP/1.1 404"), "{planted:.300}");
    assert!(!path.exists(), "the file past the checkpoint was removed");
}
