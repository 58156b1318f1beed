//! `citystream run`: the pipeline with live config reload, signals and the closing summary.

use std::io::Write as _;
use std::path::Path;

use anyhow::Context as _;
use citystream_operators::Metrics;
use citystream_pipeline::config;
use citystream_pipeline::runtime::{self, RunReport, StopHandle};

/// Re-reads the configuration on SIGHUP or when the file changes (checked every 2 s) and hands
/// valid plans to the runtime, which applies what can change live. A file that does not load
/// or plan is reported with every error and changes nothing.
pub(crate) async fn watch_config(
    path: std::path::PathBuf,
    tx: tokio::sync::mpsc::Sender<config::PipelinePlan>,
    metrics: Metrics,
) {
    let stamp = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut last = stamp(&path);
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let hangup = async {
            match hup.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hangup = std::future::pending::<Option<()>>();
        tokio::select! {
            _ = hangup => tracing::info!("SIGHUP: reloading {}", path.display()),
            _ = tick.tick() => {
                let now = stamp(&path);
                if now == last {
                    continue;
                }
                tracing::info!("{} changed: reloading", path.display());
            }
        }
        last = stamp(&path);
        let planned = config::load_file(&path).and_then(|raw| config::plan::plan(raw, &path.display().to_string()));
        match planned {
            Ok(plan) => {
                if tx.send(plan).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                runtime::reload::count_invalid(&metrics);
                tracing::error!("the new configuration is invalid; the running one stays:\n{e}");
            }
        }
    }
}

pub(crate) async fn run(path: &Path) -> anyhow::Result<()> {
    let raw = config::load_file(path)?;
    let plan = config::plan::plan(raw, &path.display().to_string())?;
    let metrics = Metrics::new();
    let (stop, stop_rx) = StopHandle::new();
    let timeout = plan.runtime.shutdown_timeout;
    let mut stopping = stop_rx.clone();
    tokio::spawn(wait_for_signals(stop));
    if let Some(addr) = &plan.runtime.metrics_addr {
        let addr = addr
            .as_str()
            .parse()
            .with_context(|| format!("runtime.metrics_addr `{}` is not host:port", addr.as_str()))?;
        let m = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = citystream_pipeline::serve::metrics_endpoint(addr, m).await {
                tracing::error!("metrics endpoint on {addr} failed: {e}");
            }
        });
    }
    let status = plan
        .runtime
        .status_interval
        .map(|every| tokio::spawn(citystream_pipeline::serve::status_loop(metrics.clone(), every.to_std())));
    tracing::info!("running pipeline `{}` from {}", plan.name, path.display());
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(4);
    let watcher = tokio::spawn(watch_config(path.to_owned(), reload_tx, metrics.clone()));
    let run = runtime::run_with_reload(plan, metrics.clone(), stop_rx, Some(reload_rx));
    tokio::pin!(run);
    let report = tokio::select! {
        r = &mut run => r?,
        _ = async {
            let _ = stopping.wait_for(|s| *s).await;
            tokio::time::sleep(timeout.to_std()).await;
        } => return Err(runtime::PipelineError::ShutdownTimeout(timeout).into()),
    };
    watcher.abort();
    if let Some(s) = status {
        s.abort();
    }
    print_summary(&report, &metrics);
    Ok(())
}

pub(crate) async fn wait_for_signals(stop: StopHandle) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            tracing::warn!("cannot install signal handlers");
            return;
        };
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::info!("signal received: draining and flushing (a second signal exits at once)");
        stop.stop();
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        std::process::exit(130);
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        stop.stop();
    }
}

pub(crate) fn print_summary(report: &RunReport, metrics: &Metrics) {
    let events: u64 = report.source_messages.values().sum();
    let json_bytes = metrics.sum("citystream_source_bytes_total");
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "done in {:.2} s: {events} events in ({:.0} events/s)",
        report.elapsed_s,
        events as f64 / report.elapsed_s.max(1e-9)
    );
    let mut disk = 0u64;
    for (sink, tables) in &report.tables {
        for (table, s) in tables {
            disk += s.bytes;
            let input = report.table_inputs.get(sink).and_then(|t| t.get(table)).filter(|i| i.bytes > 0);
            let account = match input {
                Some(i) if s.bytes > 0 => format!(
                    " <- {} events, {:.1} MiB JSON: {:.1}x",
                    i.events,
                    i.bytes as f64 / 1048576.0,
                    i.bytes as f64 / s.bytes as f64
                ),
                _ => String::new(),
            };
            let _ = writeln!(
                out,
                "  {sink}/{table}: {} rows in {} files, {:.1} KiB{account}",
                s.rows,
                s.files,
                s.bytes as f64 / 1024.0
            );
        }
    }
    let dead = metrics.sum("citystream_dead_letters_total");
    let _ = writeln!(out, "  dead letters: {dead}");
    if disk > 0 {
        let _ = writeln!(
            out,
            "  bytes in (JSON) {:.1} MiB, on disk (Parquet) {:.1} MiB: ratio {:.1}x",
            json_bytes / 1048576.0,
            disk as f64 / 1048576.0,
            json_bytes / disk as f64
        );
    }
    for (name, sim) in &report.simulations {
        let _ = writeln!(out, "  simulator {name}: {}", serde_json::to_string(&sim.kinds).unwrap_or_default());
    }
}
