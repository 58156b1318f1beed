//! The `citystream` command line.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use citystream_operators::Metrics;
use citystream_pipeline::config::{self, SourceConfig};
use citystream_pipeline::runtime::{self, RunReport, StopHandle};
use citystream_pipeline::simulator::{Simulation, SimulatorConfig};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "citystream", version, about = "Smart-city sensor streams: decode, clean, window, predict, store.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pipeline until its sources end (or SIGINT/SIGTERM: drain, flush, exit).
    Run {
        /// The pipeline config.
        #[arg(long, short, default_value = "deploy/local.yaml", env = "CITYSTREAM_CONFIG")]
        config: PathBuf,
    },
    /// Check a config (syntax, references, schema flow) without running it; prints the plan.
    Validate {
        /// The pipeline config.
        file: PathBuf,
    },
    /// Run the city simulator alone and write its streams as JSON lines, plus the ground truth.
    Simulate {
        /// Take the simulator settings from this pipeline config's first simulator source.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Override the seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Override the simulated span, e.g. `6h`, `2d`.
        #[arg(long)]
        duration: Option<citystream_operators::Duration>,
        /// First simulated instant: RFC 3339 text or `now`. Default: the config's start, or with
        /// `--kafka` the span that ends at the current minute (so the events are recent and none
        /// lies in the future: the shipped configs accept them on any date).
        #[arg(long)]
        start: Option<String>,
        /// Output folder: `traffic.jsonl`, `camera.jsonl`, `environment.jsonl` and the ground truth.
        #[arg(long, default_value = "data/sim")]
        out: PathBuf,
        /// Produce into Kafka at these brokers instead (topics `city.traffic`, `city.camera`,
        /// `city.environment`, keyed by device id); the ground truth still goes to `--out`.
        #[cfg(feature = "kafka")]
        #[arg(long)]
        kafka: Option<String>,
        /// With `--kafka`: messages per second (default: as fast as possible).
        #[cfg(feature = "kafka")]
        #[arg(long)]
        rate: Option<std::num::NonZeroU32>,
    },
    /// Create the Kafka topics a pipeline reads and writes (sources, Kafka sinks, the control
    /// center's decision topics, the grid-intensity topic) where they do not exist yet.
    #[cfg(feature = "kafka")]
    Topics {
        /// The pipeline config.
        #[arg(long, short)]
        config: PathBuf,
        /// Partitions of each new topic.
        #[arg(long, default_value_t = 3)]
        partitions: i32,
        /// Replication factor of each new topic.
        #[arg(long, default_value_t = 1)]
        replication: i32,
    },
    /// Train a zstd dictionary for camera thumbnails on simulator output, and measure it on
    /// held-out thumbnails against plain zstd.
    TrainDict {
        /// Take the simulator settings from this pipeline config's first simulator source.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Override the seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Simulated span to sample, e.g. `6h`.
        #[arg(long, default_value = "6h")]
        duration: citystream_operators::Duration,
        /// Largest dictionary size in bytes.
        #[arg(long, default_value_t = 65536)]
        max_bytes: usize,
        /// zstd level for the comparison.
        #[arg(long, default_value_t = 3)]
        level: i32,
        /// Where to write the dictionary.
        #[arg(long)]
        out: PathBuf,
    },
    /// Merge small Parquet files of each partition into larger ones, atomically (readers never
    /// see a row twice or miss one; offset-range names are kept for Kafka recovery).
    Compact {
        /// The data folder (the Parquet sink's `path`).
        #[arg(long)]
        data: PathBuf,
        /// Target size of merged files, MiB.
        #[arg(long, default_value_t = 128)]
        target_mb: u64,
        /// Leave files younger than this alone (a running sink may be closing them).
        #[arg(long, default_value = "5m")]
        min_age: citystream_operators::Duration,
        /// Also merge files named after Kafka offsets. Only when every file is committed: the
        /// pipeline stopped cleanly (or its source is the simulator). A running Kafka pipeline
        /// compacts these itself (`runtime.carbon_policy`), knowing its commits.
        #[arg(long)]
        all_committed: bool,
    },
    /// Reports from the tables: `energy` prints joules and CO2e per task and per million
    /// events, and draws them as SVG.
    #[cfg(feature = "sql")]
    Report {
        /// What to report: `energy`.
        what: String,
        /// The data folder (the energy table's `path`).
        #[arg(long)]
        data: PathBuf,
        /// Also draw a bar chart of joules per task to this SVG file.
        #[arg(long)]
        svg: Option<PathBuf>,
    },
    /// Run SQL over the Parquet tables under a data folder.
    #[cfg(feature = "sql")]
    Sql {
        /// The data folder (the Parquet sink's `path`).
        #[arg(long, default_value = "data/lake")]
        data: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: citystream_pipeline::sql::Format,
        /// Write the result to this Parquet file instead of printing it.
        #[arg(long)]
        out: Option<PathBuf>,
        /// The query.
        query: String,
    },
    /// List the tables under a data folder with their columns and row counts.
    #[cfg(feature = "sql")]
    Tables {
        /// The data folder.
        #[arg(long, default_value = "data/lake")]
        data: PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(dispatch(cli.command));
    // do not wait for blocking work left behind (e.g. a Kafka client whose close hangs): the
    // bounds applied inside the run would be undone by an unbounded wait here
    rt.shutdown_timeout(std::time::Duration::from_secs(10));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // config errors print as a list with locations; others as a chain of causes
            if let Some(ce) = e.downcast_ref::<config::ConfigErrors>() {
                eprint!("{ce}");
            } else {
                eprintln!("error: {e:#}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

async fn dispatch(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Run { config } => run(&config).await,
        #[cfg(feature = "kafka")]
        Command::Topics { config: file, partitions, replication } => {
            let raw = config::load_file(&file)?;
            let plan = config::plan::plan(raw, &file.display().to_string())?;
            let all = plan.kafka_topics();
            anyhow::ensure!(!all.is_empty(), "{} uses no Kafka topic", file.display());
            for (brokers, topics) in all {
                let (created, existing) =
                    citystream_pipeline::kafka::ensure_topics(&brokers, &topics, partitions, replication).await?;
                for t in &created {
                    println!("created {t} on {brokers} ({partitions} partitions)");
                }
                for t in &existing {
                    println!("exists  {t} on {brokers}");
                }
            }
            Ok(())
        }
        Command::Validate { file } => {
            let raw = config::load_file(&file)?;
            let plan = config::plan::plan(raw, &file.display().to_string())?;
            print!("{}", plan.describe());
            println!("ok: {} is valid", file.display());
            Ok(())
        }
        #[cfg(feature = "kafka")]
        Command::Simulate { config, seed, duration, start, out, kafka: Some(brokers), rate } => {
            let mut cfg = simulator_config(config.as_deref(), seed, duration, start.as_deref())?;
            if start.is_none() {
                // the span that ends now: recent events, none in the future
                let now = chrono::Utc::now().timestamp_millis();
                let end = now - now.rem_euclid(60_000);
                cfg.start = citystream_pipeline::simulator::StartTime(Some(end - cfg.duration.as_millis_i64()));
            }
            eprintln!(
                "simulating {} to {} into Kafka at {brokers}",
                citystream_pipeline::simulator::rfc3339(cfg.start.0.unwrap_or_default()),
                citystream_pipeline::simulator::rfc3339(cfg.start.0.unwrap_or_default() + cfg.duration.as_millis_i64())
            );
            let t0 = std::time::Instant::now();
            let (report, produced) = citystream_pipeline::kafka::produce::simulate_into(
                &brokers,
                cfg.clone(),
                &citystream_pipeline::kafka::KafkaTopics::default(),
                rate,
            )
            .await?;
            let secs = t0.elapsed().as_secs_f64();
            // the same seed regenerates the ground truth deterministically
            let mut sim = Simulation::new(cfg, chrono::Utc::now().timestamp_millis());
            let mut sink = Vec::new();
            while sim.step(&mut sink) {
                sink.clear();
            }
            sim.write_ground_truth(&out)?;
            eprintln!("produced {produced} messages to {brokers} in {secs:.1} s ({:.0}/s)", produced as f64 / secs);
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        #[cfg(feature = "kafka")]
        Command::Simulate { config, seed, duration, start, out, .. } => {
            simulate(simulator_config(config.as_deref(), seed, duration, start.as_deref())?, &out)
        }
        #[cfg(not(feature = "kafka"))]
        Command::Simulate { config, seed, duration, start, out } => {
            simulate(simulator_config(config.as_deref(), seed, duration, start.as_deref())?, &out)
        }
        Command::Compact { data, target_mb, min_age, all_committed } => {
            use citystream_pipeline::sink::compact::{CompactOptions, Positioned};
            let opts = CompactOptions {
                target_bytes: target_mb << 20,
                min_age: min_age.to_std(),
                positioned: if all_committed { Positioned::All } else { Positioned::Skip },
                ..Default::default()
            };
            let t0 = std::time::Instant::now();
            let r = tokio::task::spawn_blocking(move || citystream_pipeline::sink::compact::compact(&data, &opts))
                .await??;
            println!(
                "compacted {} partitions in {:.1} s: {} files ({:.1} MiB) -> {} files ({:.1} MiB), {} rows",
                r.partitions,
                t0.elapsed().as_secs_f64(),
                r.files_in,
                r.bytes_in as f64 / 1048576.0,
                r.files_out,
                r.bytes_out as f64 / 1048576.0,
                r.rows
            );
            Ok(())
        }
        Command::TrainDict { config, seed, duration, max_bytes, level, out } => {
            train_dict(config.as_deref(), seed, duration, max_bytes, level, &out)
        }
        #[cfg(feature = "sql")]
        Command::Report { what, data, svg } => {
            anyhow::ensure!(what == "energy", "unknown report `{what}` (known: energy)");
            report_energy(&data, svg.as_deref()).await
        }
        #[cfg(feature = "sql")]
        Command::Sql { data, format, out, query } => {
            use citystream_pipeline::sql;
            match out {
                Some(path) => {
                    let rows = sql::query_to_parquet(&data, &query, &path).await?;
                    println!("wrote {rows} rows to {}", path.display());
                }
                None => print!("{}", sql::render(&sql::query(&data, &query).await?, format)?),
            }
            Ok(())
        }
        #[cfg(feature = "sql")]
        Command::Tables { data } => {
            print!("{}", citystream_pipeline::sql::describe_tables(&data).await?);
            Ok(())
        }
    }
}

/// Re-reads the configuration on SIGHUP or when the file changes (checked every 2 s) and hands
/// valid plans to the runtime, which applies what can change live. A file that does not load
/// or plan is reported with every error and changes nothing.
async fn watch_config(path: std::path::PathBuf, tx: tokio::sync::mpsc::Sender<config::PipelinePlan>, metrics: Metrics) {
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

async fn run(path: &Path) -> anyhow::Result<()> {
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

async fn wait_for_signals(stop: StopHandle) {
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

fn print_summary(report: &RunReport, metrics: &Metrics) {
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

#[cfg(feature = "sql")]
async fn report_energy(data: &Path, svg: Option<&Path>) -> anyhow::Result<()> {
    use arrow::array::{AsArray, Float64Array};
    use arrow::datatypes::Int64Type;
    let q = "SELECT stage, SUM(cpu_s) AS cpu_s, SUM(joules) AS joules, SUM(gco2e) AS gco2e, \
             SUM(events_in)::BIGINT AS events_in, SUM(events_out)::BIGINT AS events_out, MIN(source) AS source, \
             SUM(bytes_in)::BIGINT AS bytes_in, SUM(bytes_out)::BIGINT AS bytes_out \
             FROM energy GROUP BY stage ORDER BY joules DESC";
    let batches = citystream_pipeline::sql::query(data, q).await.context("reading the energy table")?;
    let mut rows = Vec::new();
    for b in &batches {
        let f = |i: usize| b.column(i).as_any().downcast_ref::<Float64Array>().expect("float").clone();
        let (cpu, j, g) = (f(1), f(2), f(3));
        let (ein, eout) = (b.column(4).as_primitive::<Int64Type>(), b.column(5).as_primitive::<Int64Type>());
        // DataFusion may hand back string views
        let text = |i: usize| arrow::compute::cast(b.column(i), &arrow::datatypes::DataType::Utf8);
        let (names, sources) = (text(0)?, text(6)?);
        let (bin, bout) = (b.column(7).as_primitive::<Int64Type>(), b.column(8).as_primitive::<Int64Type>());
        for i in 0..b.num_rows() {
            rows.push((
                names.as_string::<i32>().value(i).to_owned(),
                cpu.value(i),
                j.value(i),
                g.value(i),
                ein.value(i),
                eout.value(i),
                sources.as_string::<i32>().value(i).to_owned(),
                (bin.value(i), bout.value(i)),
            ));
        }
    }
    anyhow::ensure!(!rows.is_empty(), "the energy table is empty");
    // the pipeline's events: what the sources handed on (tasks with no input)
    let events: i64 = rows.iter().filter(|r| r.4 == 0).map(|r| r.5).sum::<i64>().max(1);
    println!(
        "{:<28} {:>10} {:>12} {:>12} {:>14} {:>7} {:>9} {:>9}",
        "task", "cpu_s", "joules", "gCO2e", "J per M events", "source", "MiB in", "MiB out"
    );
    let mib = |b: i64| b as f64 / (1u64 << 20) as f64;
    for (stage, cpu, j, g, _, _, source, (bin, bout)) in &rows {
        println!(
            "{stage:<28} {cpu:>10.3} {j:>12.3} {g:>12.5} {:>14.2} {source:>7} {:>9.1} {:>9.1}",
            j / events as f64 * 1e6,
            mib(*bin),
            mib(*bout)
        );
    }
    let (tj, tg, tc): (f64, f64, f64) = rows.iter().fold((0.0, 0.0, 0.0), |a, r| (a.0 + r.2, a.1 + r.3, a.2 + r.1));
    println!(
        "total: {tc:.3} CPU-s, {tj:.3} J, {tg:.5} gCO2e for {events} events: {:.2} J and {:.4} gCO2e per million events",
        tj / events as f64 * 1e6,
        tg / events as f64 * 1e6
    );
    if let Some(path) = svg {
        let max = rows.iter().map(|r| r.2).fold(0.0, f64::max).max(1e-9);
        let mut out = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"760\" height=\"{}\" font-family=\"sans-serif\" font-size=\"12\">\n\
             <text x=\"10\" y=\"18\" font-size=\"14\">Energy per task: {tj:.1} J, {tg:.4} gCO2e for {events} events</text>\n",
            40 + rows.len() * 22
        );
        for (i, (stage, _, j, ..)) in rows.iter().enumerate() {
            let y = 30 + i * 22;
            let w = (j / max * 480.0).max(1.0);
            out += &format!(
                "<text x=\"10\" y=\"{}\">{stage}</text><rect x=\"200\" y=\"{y}\" width=\"{w:.1}\" height=\"16\" fill=\"#2e7d32\"/>\
                 <text x=\"{:.1}\" y=\"{}\">{j:.2} J</text>\n",
                y + 12,
                205.0 + w,
                y + 12
            );
        }
        out += "</svg>\n";
        std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))?;
        println!("chart: {}", path.display());
    }
    Ok(())
}

/// Thumbnails the simulator's cameras emit, decoded as the pipeline decodes them.
fn simulated_thumbnails(cfg: SimulatorConfig) -> anyhow::Result<Vec<Vec<u8>>> {
    use arrow::array::{Array, AsArray};
    use citystream_operators::{BuildContext, Collector, OperatorConfig};
    let decode: citystream_operators::decode::DecodeConfig =
        serde_saphyr::from_str("kind: camera\nmax_past: null\nmax_future: null\n")?;
    let mut op = decode
        .build(&citystream_schemas::raw::schema(), &BuildContext::default())
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let mut sim = Simulation::new(cfg, chrono::Utc::now().timestamp_millis());
    let mut msgs = Vec::new();
    let mut raw = citystream_schemas::raw::RawBatchBuilder::with_capacity(4096, 1 << 20);
    let mut out = Collector::new(op.outputs().len());
    let mut offset = 0;
    let mut thumbs = Vec::new();
    let mut more = true;
    while more {
        more = sim.step(&mut msgs);
        for m in msgs.drain(..).filter(|m| m.kind == citystream_schemas::EventKind::Camera) {
            raw.append("sim.camera", 0, offset, m.arrival_ms, &m.payload);
            offset += 1;
        }
        if raw.len() >= 4096 || (!more && !raw.is_empty()) {
            op.process_batch(raw.finish(), &mut out)?;
            for (port, b) in out.drain() {
                if port != 0 {
                    continue;
                }
                let col = b.column_by_name("thumbnail").context("camera rows have a thumbnail column")?;
                let bin = col.as_binary::<i32>();
                thumbs.extend((0..bin.len()).filter(|i| bin.is_valid(*i)).map(|i| bin.value(i).to_vec()));
            }
        }
    }
    Ok(thumbs)
}

fn train_dict(
    config: Option<&Path>,
    seed: Option<u64>,
    duration: citystream_operators::Duration,
    max_bytes: usize,
    level: i32,
    out: &Path,
) -> anyhow::Result<()> {
    let cfg = simulator_config(config, seed, Some(duration), None)?;
    let thumbs = simulated_thumbnails(cfg)?;
    anyhow::ensure!(thumbs.len() >= 100, "only {} thumbnails in {duration}: simulate longer", thumbs.len());
    // train on every 5th thumbnail but one; measure on the rest it never saw
    let (train, test): (Vec<_>, Vec<_>) = thumbs.into_iter().enumerate().partition(|(i, _)| i % 5 != 4);
    let train: Vec<Vec<u8>> = train.into_iter().map(|(_, t)| t).collect();
    let test: Vec<Vec<u8>> = test.into_iter().map(|(_, t)| t).collect();
    let dict = citystream_operators::zstd_column::train_dictionary(&train, max_bytes)?;
    std::fs::write(out, &dict).with_context(|| format!("writing {}", out.display()))?;
    let raw: usize = test.iter().map(Vec::len).sum();
    let mut plain = zstd::bulk::Compressor::new(level)?;
    let mut with_dict = zstd::bulk::Compressor::with_dictionary(level, &dict)?;
    let (mut p, mut d) = (0usize, 0usize);
    for t in &test {
        p += plain.compress(t)?.len();
        d += with_dict.compress(t)?.len();
    }
    println!(
        "dictionary: {} bytes from {} thumbnails -> {}\nheld-out {} thumbnails, {raw} bytes: plain zstd-{level} {p} bytes \
         ({:.2}x), with dictionary {d} bytes ({:.2}x): {:.2}x smaller",
        dict.len(),
        train.len(),
        out.display(),
        test.len(),
        raw as f64 / p as f64,
        raw as f64 / d as f64,
        p as f64 / d as f64
    );
    Ok(())
}

fn simulator_config(
    config: Option<&Path>,
    seed: Option<u64>,
    duration: Option<citystream_operators::Duration>,
    start: Option<&str>,
) -> anyhow::Result<SimulatorConfig> {
    let mut cfg = match config {
        Some(path) => {
            let raw = config::load_file(path)?;
            raw.sources
                .into_values()
                .find_map(|s| match s {
                    SourceConfig::Simulator(s) => Some(*s),
                    #[allow(unreachable_patterns)]
                    _ => None,
                })
                .with_context(|| format!("{} has no simulator source", path.display()))?
        }
        None => SimulatorConfig::default(),
    };
    if let Some(s) = seed {
        cfg.seed = s;
    }
    if let Some(d) = duration {
        cfg.duration = d;
    }
    if let Some(s) = start {
        cfg.start = citystream_pipeline::simulator::StartTime::parse(s).map_err(anyhow::Error::msg)?;
    }
    Ok(cfg)
}

fn simulate(cfg: SimulatorConfig, out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut files = citystream_schemas::EventKind::ALL.map(|k| {
        let p = out.join(format!("{k}.jsonl"));
        std::fs::File::create(&p).map(std::io::BufWriter::new).with_context(|| format!("creating {}", p.display()))
    });
    for f in &files {
        if let Err(e) = f {
            anyhow::bail!("{e:#}");
        }
    }
    let mut sim = Simulation::new(cfg, chrono::Utc::now().timestamp_millis());
    let mut batch = Vec::new();
    while sim.step(&mut batch) {
        for m in batch.drain(..) {
            let i = citystream_schemas::EventKind::ALL.iter().position(|k| *k == m.kind).expect("kind");
            let f = files[i].as_mut().expect("checked");
            f.write_all(&m.payload)?;
            f.write_all(b"\n")?;
        }
    }
    for f in files.iter_mut() {
        f.as_mut().expect("checked").flush()?;
    }
    sim.write_ground_truth(out)?;
    println!("{}", serde_json::to_string_pretty(&sim.report())?);
    Ok(())
}
