//! The `citystream` command line.

use std::path::PathBuf;

use citystream_pipeline::config;
#[cfg(feature = "kafka")]
use citystream_pipeline::simulator::Simulation;
use clap::{Parser, Subcommand};
mod cli;

#[cfg(feature = "sql")]
use cli::report::report_energy;
use cli::run::run;
use cli::simulate::{simulate, simulator_config, train_dict};

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
    /// Run a pipeline config over archived files instead of its source (a backfill, or a
    /// re-run with another model): JSON lines (plain, .gz, .zst) or Parquet named
    /// `traffic*`, `camera*`, `environment*` (or directories so named) under `--files`, as
    /// `citystream simulate` writes them. A killed replay resumes where it was.
    Replay {
        /// The pipeline config whose stages and sinks run.
        #[arg(long, short, default_value = "deploy/local.yaml")]
        config: PathBuf,
        /// The folder of archived files.
        #[arg(long)]
        files: PathBuf,
        /// Write every Parquet table here instead of the config's lake (side by side with the
        /// live tables).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Checkpoints (to resume). Default: `<lake>.replay-state`.
        #[arg(long)]
        state: Option<PathBuf>,
        /// Lines per second at most (default: as fast as the pipeline takes them).
        #[arg(long)]
        rate: Option<f64>,
        /// Only events at or after this time (RFC 3339, e.g. 2026-03-02T00:00:00Z).
        #[arg(long)]
        from: Option<String>,
        /// Only events before this time (RFC 3339).
        #[arg(long)]
        until: Option<String>,
    },
    /// Serve the lake over Arrow Flight SQL (ADBC, JDBC, BI tools): read-only, bearer tokens
    /// from the control center's tokens file, row and time limits per query.
    #[cfg(feature = "sql")]
    Serve(cli::serve::Serve),
    /// Run a control center on its own, its book read from the alerts topic: several of them
    /// behind one address serve one book, and a decision made on one is seen on all.
    Control(cli::control::Control),
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
        /// `city.environment`, keyed as `deploy/kafka.yaml`'s `keys` say: traffic by corridor,
        /// cameras by zone, stations by id); the ground truth still goes to `--out`.
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
        Command::Control(args) => cli::control::control(args).await,
        #[cfg(feature = "sql")]
        Command::Serve(args) => cli::serve::serve(args).await,
        Command::Replay { config, files, out, state, rate, from, until } => {
            let event_time = citystream_pipeline::files::EventTimeRange::parse(from.as_deref(), until.as_deref())
                .map_err(|e| anyhow::anyhow!("--from/--until: {e}"))?;
            cli::replay::replay(&config, config::backfill::Backfill { files, out, state, rate, event_time }).await
        }
        #[cfg(feature = "kafka")]
        Command::Topics { config: file, partitions, replication } => {
            let raw = config::load_file(&file)?;
            let plan = config::plan::plan(raw, &file.display().to_string())?;
            let all = plan.kafka_topics();
            anyhow::ensure!(!all.is_empty(), "{} uses no Kafka topic", file.display());
            let keep = plan.kept_topics();
            for (brokers, topics) in all {
                let (created, existing) =
                    citystream_pipeline::kafka::ensure_topics(&brokers, &topics, &keep, partitions, replication)
                        .await?;
                for t in &created {
                    println!("created {t} on {brokers} ({partitions} partitions)");
                }
                for t in &existing {
                    println!("exists  {t} on {brokers}");
                }
            }
            // the global task's topic: one partition, whatever --partitions says
            if let Some((brokers, topic, created)) = plan.ensure_global_topic().await.map_err(anyhow::Error::msg)? {
                let what = if created { "created" } else { "exists " };
                println!("{what} {topic} on {brokers} (the global task's, 1 partition)");
            }
            // a topic keyed by a lookup's group uses only the partitions its groups hash to
            for (topic, key) in plan.keyed_topics() {
                let Some(g) = &key.group else { continue };
                let groups: std::collections::BTreeSet<&String> = g.map.values().collect();
                let used: std::collections::BTreeSet<i32> = groups
                    .iter()
                    .map(|v| citystream_pipeline::kafka::partition::partition_of(v.as_bytes(), partitions))
                    .collect();
                if (used.len() as i32) < partitions {
                    println!(
                        "note: {topic} is keyed by `{}` ({} values in {}): they hash to {} of its {partitions} \
                         partitions, so at most {} instances share its work",
                        g.group,
                        groups.len(),
                        g.name,
                        used.len(),
                        used.len()
                    );
                }
            }
            Ok(())
        }
        Command::Validate { file } => {
            let raw = config::load_file(&file)?;
            let plan = config::plan::plan(raw, &file.display().to_string())?;
            print!("{}", plan.describe());
            let global = plan.runtime.tasks == config::TaskMode::Partition && plan.runtime.global_task;
            for (stage, what) in &plan.city_wide_state {
                if global {
                    println!("note: stage {stage}: {what}: it runs in the global task, with the task of partition 0");
                } else {
                    println!(
                        "note: stage {stage}: {what}: with several instances in one group, each does this on its own \
                         partitions (`runtime.tasks: partition` with `global_task: true` does it once, in the global task)"
                    );
                }
            }
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
