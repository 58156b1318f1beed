//! `citystream replay`: a pipeline config run over archived files instead of its source — a
//! backfill, or a re-run with another model — into a lake of its own, with progress and ETA.

use std::io::{IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use citystream_operators::Metrics;
use citystream_pipeline::config::{self, RawPipeline, SinkConfig, SourceConfig};
use citystream_pipeline::files::{FilesPaths, FilesSourceConfig};
use citystream_pipeline::primitives::EnvString;
use citystream_pipeline::runtime::{self, StopHandle};
use citystream_schemas::EventKind;

/// What `citystream replay` was asked.
pub(crate) struct Replay {
    pub(crate) config: PathBuf,
    pub(crate) files: PathBuf,
    pub(crate) out: Option<PathBuf>,
    pub(crate) state: Option<PathBuf>,
    pub(crate) rate: Option<f64>,
}

/// `raw` with its one source replaced by a files source over `files/{kind}*` (the names
/// `citystream simulate` writes, a directory per kind, or any extension after the kind), its
/// Parquet sinks, energy table and control center feedback moved to `out`, endpoints on free
/// ports, no `max_past` bound in `decode` (archived events are old by nature), and its state in
/// `state`.
fn rewrite(mut raw: RawPipeline, r: &Replay) -> anyhow::Result<RawPipeline> {
    anyhow::ensure!(
        raw.sources.len() == 1,
        "{} has {} sources; replay replaces exactly one",
        r.config.display(),
        raw.sources.len()
    );
    let (name, old) = raw.sources.pop_first().expect("one source");
    // every kind gets its pattern (a kind without files is a stream that ends at once, so the
    // config's stages all plan); at least one must match
    let mut paths = FilesPaths::default();
    let mut found = 0;
    for kind in EventKind::ALL {
        let pattern = format!("{}/{kind}*", glob_escape(&r.files));
        let n = citystream_pipeline::files::list(&pattern)?.len();
        if n == 0 {
            eprintln!("note: no {kind} files (`{kind}*`) in {}", r.files.display());
        }
        found += n;
        let p = Some(EnvString::literal(pattern));
        match kind {
            EventKind::Traffic => paths.traffic = p,
            EventKind::Camera => paths.camera = p,
            EventKind::Environment => paths.environment = p,
        }
    }
    anyhow::ensure!(found > 0, "{} holds no `traffic*`, `camera*` or `environment*` files", r.files.display());
    let mut files = FilesSourceConfig::new(paths);
    files.max_out_of_orderness = old.max_out_of_orderness();
    files.rate = r.rate;
    raw.sources.insert(name, SourceConfig::Files(Box::new(files)));
    // history: the files were written long after the events, so decode's bound on how far an
    // event may lie before its arrival (default 7 days) does not apply
    for st in raw.stages.values_mut() {
        if let config::OperatorSpec::Decode(d) = &mut st.op {
            d.max_past = None;
        }
    }
    let mut first_lake = None;
    for sink in raw.sinks.values_mut() {
        match sink {
            SinkConfig::Parquet(p) => {
                if let Some(out) = &r.out {
                    p.path = EnvString::literal(out.display().to_string());
                }
                first_lake.get_or_insert_with(|| PathBuf::from(p.path.as_str()));
            }
            SinkConfig::ControlCenter(c) => {
                // beside a live control center: a port of its own, decisions in the replay's lake
                c.addr = EnvString::literal("127.0.0.1:0");
                if let (Some(out), Some(f)) = (&r.out, c.feedback_path.as_mut()) {
                    *f = EnvString::literal(out.display().to_string());
                }
            }
            #[allow(unreachable_patterns)]
            _ => {}
        }
    }
    if let (Some(out), Some(e)) = (&r.out, raw.runtime.energy.as_mut()) {
        e.path = EnvString::literal(out.display().to_string());
    }
    raw.runtime.metrics_addr = None;
    raw.runtime.status_interval = None;
    let state = match (&r.state, &first_lake) {
        (Some(s), _) => s.clone(),
        (None, Some(lake)) => PathBuf::from(format!("{}.replay-state", lake.display())),
        (None, None) => anyhow::bail!("no Parquet sink: pass --state for the checkpoints"),
    };
    raw.runtime.state_dir = Some(EnvString::literal(state.display().to_string()));
    Ok(raw)
}

/// `path` with glob characters escaped.
fn glob_escape(path: &Path) -> String {
    glob::Pattern::escape(&path.display().to_string())
}

pub(crate) async fn replay(r: Replay) -> anyhow::Result<()> {
    let raw = rewrite(config::load_file(&r.config)?, &r)?;
    let plan = config::plan::plan(raw, &r.config.display().to_string())?;
    let state = plan.runtime.state_dir.as_ref().map(|s| s.as_str().to_owned()).unwrap_or_default();
    eprintln!("replaying {} through {} (state: {state})", r.files.display(), r.config.display());
    let metrics = Metrics::new();
    let (stop, stop_rx) = StopHandle::new();
    tokio::spawn(super::run::wait_for_signals(stop));
    let progress = tokio::spawn(progress(metrics.clone()));
    let report = runtime::run(plan, metrics.clone(), stop_rx).await.context("the replay failed")?;
    progress.abort();
    eprintln!();
    super::run::print_summary(&report, &metrics);
    Ok(())
}

/// Prints progress every second on a terminal (every 10 s otherwise): files, lines, rate, and
/// the time left at the rate stored bytes are read.
async fn progress(metrics: Metrics) {
    let tty = std::io::stderr().is_terminal();
    let every = Duration::from_secs(if tty { 1 } else { 10 });
    let t0 = Instant::now();
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        let listed = metrics.sum("citystream_source_file_bytes_listed");
        let done = metrics.sum("citystream_source_file_bytes_total");
        let files = (metrics.sum("citystream_source_files_total"), metrics.sum("citystream_source_files_listed"));
        let lines = metrics.sum("citystream_source_events_total");
        let secs = t0.elapsed().as_secs_f64();
        let share = if listed > 0.0 { done / listed } else { 0.0 };
        let eta = if done > 0.0 { format_secs((listed - done) / (done / secs)) } else { "?".into() };
        let width = 24;
        let filled = ((share * width as f64) as usize).min(width);
        let line = format!(
            "[{}{}] {:>3.0}%  {}/{} files  {:.0} lines  {:.0} lines/s  ETA {eta}",
            "=".repeat(filled),
            " ".repeat(width - filled),
            share * 100.0,
            files.0,
            files.1,
            lines,
            lines / secs.max(1e-9),
        );
        let mut err = std::io::stderr().lock();
        let _ = if tty { write!(err, "\r{line}") } else { writeln!(err, "{line}") };
        let _ = err.flush();
    }
}

fn format_secs(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    if s >= 3600 { format!("{}h{:02}m", s / 3600, s % 3600 / 60) } else { format!("{}m{:02}s", s / 60, s % 60) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_reads_the_files_simulate_writes_into_its_own_lake() {
        let dir = tempfile::tempdir().unwrap();
        let files = dir.path().join("sim");
        std::fs::create_dir_all(&files).unwrap();
        std::fs::write(files.join("traffic.jsonl"), "{}\n").unwrap();
        std::fs::write(files.join("camera.jsonl.zst"), zstd::encode_all(&b"{}\n"[..], 1).unwrap()).unwrap();
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let text = std::fs::read_to_string(root.join("deploy/local.yaml"))
            .unwrap()
            .replace("deploy/road_graph.csv", &format!("{}/deploy/road_graph.csv", root.display()))
            .replace("models/onnx/", &format!("{}/models/onnx/", root.display()));
        let raw = config::load_str(&text, "local.yaml").unwrap();
        let out = dir.path().join("backfill");
        let r = Replay {
            config: "local.yaml".into(),
            files: files.clone(),
            out: Some(out.clone()),
            state: None,
            rate: None,
        };
        let raw = rewrite(raw, &r).unwrap();
        let SourceConfig::Files(f) = &raw.sources["city"] else { panic!("a files source") };
        assert!(f.paths.traffic.as_ref().unwrap().as_str().ends_with("sim/traffic*"));
        assert!(f.paths.camera.is_some() && f.paths.environment.is_some(), "a kind without files reads nothing");
        for s in raw.sinks.values() {
            if let SinkConfig::Parquet(p) = s {
                assert_eq!(p.path.as_str(), out.display().to_string());
            }
        }
        assert_eq!(raw.runtime.state_dir.as_ref().unwrap().as_str(), format!("{}.replay-state", out.display()));
        assert!(raw.runtime.metrics_addr.is_none());
        let decoders: Vec<_> = raw
            .stages
            .values()
            .filter_map(|s| match &s.op {
                config::OperatorSpec::Decode(d) => Some(d.max_past),
                _ => None,
            })
            .collect();
        assert_eq!(decoders, [None, None, None], "archived events are old: no max_past");
    }

    #[test]
    fn replay_without_files_says_where_it_looked() {
        let dir = tempfile::tempdir().unwrap();
        let raw = config::load_str(
            "sources: {city: {type: simulator}}\nsinks: {lake: {type: parquet, path: x, tables: {t: city.traffic}}}",
            "x.yaml",
        )
        .unwrap();
        let r = Replay { config: "x.yaml".into(), files: dir.path().into(), out: None, state: None, rate: None };
        let err = rewrite(raw, &r).unwrap_err().to_string();
        assert!(err.contains("no `traffic*`"), "{err}");
    }
}
