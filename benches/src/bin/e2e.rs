//! End-to-end throughput harness: runs the embedded default pipeline (simulator → decode →
//! zstd Parquet) over a simulated span and prints events/s, CPU-seconds per million events and
//! peak RSS. The simulator's own cost is measured separately (`--generate-only`) so the
//! pipeline's share can be read as a difference.
//!
//! Run: `cargo run --release -p citystream-benches --bin e2e -- --days 1 --repeat 3`

use std::time::Instant;

use citystream_benches::usage;
use citystream_operators::Metrics;
use citystream_pipeline::config::{self, plan::plan};
use citystream_pipeline::runtime::{self, StopHandle};
use citystream_pipeline::simulator::{Simulation, SimulatorConfig};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Simulated days (about 300k events per day with the default city).
    #[arg(long, default_value_t = 1)]
    days: u64,
    /// Runs; the median is reported.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Only run the simulator (no pipeline): the cost of generating the events.
    #[arg(long)]
    generate_only: bool,
    /// Pipeline config to run (its `sinks.*.path` is replaced by a temporary folder).
    #[arg(long, default_value = "deploy/local.yaml")]
    config: std::path::PathBuf,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let mut rates = Vec::new();
    let mut cpu_per_m = Vec::new();
    let mut events = 0u64;
    for run in 0..args.repeat {
        let before = usage();
        let t0 = Instant::now();
        if args.generate_only {
            let cfg = SimulatorConfig {
                duration: citystream_operators::Duration::from_secs(args.days * 86_400),
                ..SimulatorConfig::default()
            };
            let mut sim = Simulation::new(cfg, 0);
            let mut buf = Vec::new();
            let mut n = 0u64;
            while sim.step(&mut buf) {
                n += buf.len() as u64;
                buf.clear();
            }
            events = n;
        } else {
            let dir = tempfile::tempdir()?;
            let text = std::fs::read_to_string(&args.config)?;
            // SAFETY: single-threaded at this point; the variables are read by the config loader below.
            unsafe {
                std::env::set_var("CITYSTREAM_DATA", dir.path());
                std::env::set_var("CITYSTREAM_METRICS_ADDR", "127.0.0.1:0");
            }
            let text = text.replace("duration: 1d", &format!("duration: {}d", args.days));
            let mut raw = config::load_str(&text, &args.config.display().to_string())?;
            raw.runtime.status_interval = None;
            raw.runtime.metrics_addr = None;
            let p = plan(raw, "bench")?;
            let (_stop, rx) = StopHandle::new();
            let report = rt.block_on(runtime::run(p, Metrics::new(), rx))?;
            events = report.source_messages.values().sum();
        }
        let secs = t0.elapsed().as_secs_f64();
        let after = usage();
        let cpu = after.cpu_s - before.cpu_s;
        rates.push(events as f64 / secs);
        cpu_per_m.push(cpu / events as f64 * 1e6);
        eprintln!(
            "run {run}: {events} events in {secs:.2} s, {:.0} events/s, {:.2} CPU-s per million events",
            events as f64 / secs,
            cpu / events as f64 * 1e6
        );
    }
    let mode = if args.generate_only { "simulator only" } else { "pipeline" };
    println!(
        "{mode}: {events} events/run, median {:.0} events/s, median {:.2} CPU-s per million events, peak RSS {:.0} MiB ({} runs)",
        median(rates),
        median(cpu_per_m),
        usage().peak_rss_mib,
        args.repeat
    );
    Ok(())
}
