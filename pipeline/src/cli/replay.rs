//! `citystream replay`: a pipeline config run over archived files instead of its source — a
//! backfill, or a re-run with another model — into a lake of its own, with progress and ETA.

use std::io::{IsTerminal as _, Write as _};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use citystream_operators::Metrics;
use citystream_pipeline::config::{self, backfill::Backfill};
use citystream_pipeline::runtime::{self, StopHandle};

pub(crate) async fn replay(config_file: &Path, r: Backfill) -> anyhow::Result<()> {
    let raw = config::backfill::backfill(config::load_file(config_file)?, &r)
        .with_context(|| format!("backfilling with {}", config_file.display()))?;
    let plan = config::plan::plan(raw, &config_file.display().to_string())?;
    let state = plan.runtime.state().ok().flatten().map(|s| s.to_string()).unwrap_or_default();
    eprintln!("replaying {} through {} (state: {state})", r.files.display(), config_file.display());
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
