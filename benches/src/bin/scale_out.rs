//! Scale-out harness (feature `kafka`, a broker from `deploy/kafka/start.sh`): several
//! `citystream run` processes in one consumer group on this machine.
//!
//! - **Throughput with 1, 2, 3… instances**: simulated days produced once into topics of
//!   `--partitions` partitions; per run, N processes (Kafka → decode → Parquet, each its own
//!   lake) drain the backlog; wall time from the first start until their metrics show every
//!   event read, and until the last exit (less the idle wait that ends them: with tasks, a
//!   process that leaves hands its idle tasks to the others, which wait again), and the
//!   children's CPU time.
//! - **Handover**: two instances on a live stream (`--rate` events/s), static membership and the
//!   session timeout of `deploy/kafka.yaml` (10 s); one is killed with SIGKILL. Measured: kill
//!   to the first file of one of its partitions written by the survivor (no restart), and kill
//!   to the first file written by a replacement started at once with the same
//!   `group.instance.id` (a Kubernetes restart). Files are closed at every checkpoint (1 s
//!   here), so each figure includes up to a second of it.
//!
//! With `--tasks`, the instances run per-partition tasks (`runtime.tasks: partition`) on one
//! shared state directory; `--global` adds a city-wide DP release that runs in the global task.
//!
//! `cargo run --release -p citystream-benches --features kafka --bin scale_out -- --brokers 127.0.0.1:9092 --citystream target/release/citystream`
//! (`--tasks --global --handovers 0` for the global task's cost)

#[cfg(feature = "kafka")]
fn main() -> anyhow::Result<()> {
    harness::main()
}

#[cfg(not(feature = "kafka"))]
fn main() {
    eprintln!("build with `--features kafka`");
    std::process::exit(2);
}

#[cfg(feature = "kafka")]
mod harness {
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant, SystemTime};

    use anyhow::Context as _;
    use citystream_benches::median;
    use citystream_pipeline::kafka::KafkaTopics;
    use citystream_pipeline::simulator::SimulatorConfig;
    use clap::Parser;

    #[derive(Parser)]
    struct Args {
        /// Kafka brokers.
        #[arg(long)]
        brokers: String,
        /// The `citystream` binary (a release build).
        #[arg(long)]
        citystream: PathBuf,
        /// Partitions of each topic.
        #[arg(long, default_value_t = 6)]
        partitions: i32,
        /// Simulated days in the backlog (about 290k events per day).
        #[arg(long, default_value_t = 2)]
        days: u64,
        /// Instance counts to measure.
        #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
        instances: Vec<usize>,
        /// Runs per instance count; the median is reported.
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        /// Events per second of the live stream in the handover runs.
        #[arg(long, default_value_t = 3000)]
        rate: u32,
        /// Handover runs per scenario.
        #[arg(long, default_value_t = 3)]
        handovers: usize,
        /// A librdkafka consumer property for every instance (`key=value`, repeatable), e.g.
        /// `group.protocol=consumer` (KIP-848; its session timeout is the broker's
        /// `group.consumer.session.timeout.ms`, so `session.timeout.ms` is then not set).
        #[arg(long = "consumer-property")]
        consumer_properties: Vec<String>,
        /// Run per-partition tasks (`runtime.tasks: partition`), the instances of a run sharing
        /// one state directory: a moved partition restores its task's state where it lands.
        #[arg(long)]
        tasks: bool,
        /// With `--tasks`: a city-wide stage too (a DP mean speed per segment and hour over
        /// public partitions, reading every traffic row), run once in the global task
        /// (`runtime.global_task`): the tasks also publish their decoded traffic to the topic
        /// `{group}.global`.
        #[arg(long, requires = "tasks")]
        global: bool,
    }

    /// The source's `properties` map as YAML: `session.timeout.ms` of `deploy/kafka.yaml`
    /// (classic protocol only), the instance id, and `--consumer-property`.
    fn properties(args: &Args, instance: &str) -> String {
        let given: Vec<(&str, &str)> = args.consumer_properties.iter().filter_map(|p| p.split_once('=')).collect();
        let kip848 = given.iter().any(|(k, v)| *k == "group.protocol" && *v == "consumer");
        let mut all: Vec<String> = given.iter().map(|(k, v)| format!("{k}: \"{v}\"")).collect();
        if !kip848 {
            all.push("session.timeout.ms: \"10000\"".into());
        }
        all.push(format!("group.instance.id: {instance}"));
        format!("{{{}}}", all.join(", "))
    }

    /// Kafka → decode → Parquet into `lake`, as group member `instance`; with `--tasks`, one
    /// task per partition with its state under `state`.
    fn config(
        args: &Args,
        t: &KafkaTopics,
        group: &str,
        (instance, lake, state): (&str, &Path, &Path),
        checkpoint: &str,
    ) -> String {
        // instance `wN` serves its metrics on METRICS_PORT + N (the harness counts what it read)
        let port =
            METRICS_PORT + instance.trim_start_matches(|c: char| !c.is_ascii_digit()).parse::<u16>().unwrap_or(0);
        let (brokers, props) = (&args.brokers, properties(args, instance));
        let source = format!(
            "  kafka:\n    type: kafka\n    brokers: {brokers}\n    group_id: {group}\n    topics: {{traffic: {}, camera: {}, environment: {}}}\n    stop_when_idle: {IDLE_S}s\n    checkpoint_interval: {checkpoint}\n    properties: {props}\n",
            t.traffic.as_deref().unwrap_or_default(),
            t.camera.as_deref().unwrap_or_default(),
            t.environment.as_deref().unwrap_or_default(),
        );
        let mut runtime = format!(", metrics_addr: \"127.0.0.1:{port}\"");
        if args.tasks {
            runtime += &format!(", tasks: partition, state_url: \"file://{}\"", state.display());
        }
        if args.global {
            runtime += ", global_task: true";
        }
        let yaml = citystream_benches::decode_to_parquet("kafka", &source, lake, &runtime);
        if !args.global {
            return yaml;
        }
        // every instance of a run shares the state, the budgets and the noise key
        let shared = state.parent().unwrap_or(state);
        let public: Vec<String> = (0..3).flat_map(|c| (0..8).map(move |s| format!("seg-{c:02}-{s:02}"))).collect();
        let dp = format!(
            "  dp_speed:\n    type: dp_aggregate\n    input: traffic\n    release: segment_speed\n    privacy_unit: event_id\n    partition: segment_id\n    aggregate: mean\n    column: speed_kmh\n    bounds: [0, 130]\n    window: 1h\n    mechanism: gaussian\n    epsilon: 1.0\n    delta: 1.0e-7\n    budget: {{epsilon: 100, delta: 1.0e-6, period: 1d}}\n    budget_dir: {b}\n    noise_key: {{secret_file: {k}, create_secret_file: true}}\n    partitions: {{public: [{p}]}}\nsinks:\n",
            b = shared.join("privacy").display(),
            k = shared.join("dp_noise.key").display(),
            p = public.join(", "),
        );
        yaml.replacen("sinks:\n", &dp, 1).replacen("tables: {", "tables: {dp_speed: dp_speed, ", 1).replacen(
            "traffic_late: traffic.late_events",
            "traffic_late: [traffic.late_events, dp_speed.late_events]",
            1,
        )
    }

    /// The idle wait that ends a run (`stop_when_idle`).
    const IDLE_S: u64 = 3;

    /// The metrics port of instance `w0`; `wN` has this plus N.
    const METRICS_PORT: u16 = 19_640;

    /// Messages the instance serving metrics on `port` has read so far
    /// (`citystream_source_events_total`, all streams), if it answers.
    fn events_counted(port: u16) -> Option<f64> {
        use std::io::{Read as _, Write as _};
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        conn.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
        conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
        let mut text = String::new();
        conn.read_to_string(&mut text).ok()?;
        let values = text
            .lines()
            .filter(|l| l.starts_with("citystream_source_events_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
        Some(values.sum())
    }

    /// Watches `n` instances' metrics from now until they have read `events` together; the
    /// seconds that took (each instance counted at the most it showed: one that left shows
    /// nothing).
    fn time_to_read(n: usize, events: u64) -> std::thread::JoinHandle<Option<f64>> {
        let t0 = Instant::now();
        std::thread::spawn(move || {
            let mut seen = vec![0.0f64; n];
            while t0.elapsed() < Duration::from_secs(600) {
                for (i, s) in seen.iter_mut().enumerate() {
                    if let Some(v) = events_counted(METRICS_PORT + i as u16) {
                        *s = s.max(v);
                    }
                }
                if seen.iter().sum::<f64>() >= events as f64 {
                    return Some(t0.elapsed().as_secs_f64());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            None
        })
    }

    /// A started instance, killed when dropped (an error path leaves no process behind).
    struct Instance(Child);

    impl Drop for Instance {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn spawn(bin: &Path, dir: &Path, name: &str, yaml: &str) -> anyhow::Result<Instance> {
        let cfg = dir.join(format!("{name}.yaml"));
        std::fs::write(&cfg, yaml)?;
        let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
        Command::new(bin)
            .args(["run", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "warn,citystream_pipeline=info")
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .map(Instance)
            .with_context(|| format!("starting {}", bin.display()))
    }

    /// The events a finished run reports (`done in … s: N events in`).
    fn events_read(log: &Path) -> u64 {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        text.lines()
            .find_map(|l| l.split_once(" s: ").and_then(|(_, r)| r.split(' ').next()?.parse().ok()))
            .unwrap_or(0)
    }

    /// The source partitions (`{topic}-p{partition}`, of any kind) with a file of the three
    /// event tables in `lake` modified after `after` (file names:
    /// `{topic}-p{partition}-o{first}-{last}.parquet`). A member may own no partition of some
    /// topic: the assignor spreads partitions of all topics together.
    fn files_by_partition(lake: &Path, after: SystemTime) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack: Vec<PathBuf> = ["traffic", "camera", "environment"].iter().map(|t| lake.join(t)).collect();
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                    continue;
                }
                let name = e.file_name().to_string_lossy().to_string();
                if name.starts_with('.') || !name.ends_with(".parquet") {
                    continue;
                }
                let fresh = e.metadata().and_then(|m| m.modified()).is_ok_and(|m| m > after);
                let part = name.rsplit_once("-o").map(|(tp, _)| tp.to_owned());
                if let (true, Some(tp)) = (fresh, part)
                    && !out.contains(&tp)
                {
                    out.push(tp);
                }
            }
        }
        out
    }

    fn throughput(args: &Args, rt: &tokio::runtime::Runtime, prefix: &str) -> anyhow::Result<()> {
        let topics = rt.block_on(citystream_benches::kafka::create_topics(&args.brokers, prefix, args.partitions))?;
        let cfg = SimulatorConfig {
            duration: citystream_operators::Duration::from_secs(args.days * 86_400),
            ..SimulatorConfig::default()
        };
        let (_, produced) =
            rt.block_on(citystream_pipeline::kafka::produce::simulate_into(&args.brokers, cfg, &topics, None))?;
        eprintln!("produced {produced} messages into {} partitions per topic", args.partitions);
        let mut rows = Vec::new();
        for &n in &args.instances {
            let (mut rates, mut cpus, mut read_rates) = (Vec::new(), Vec::new(), Vec::new());
            for run in 0..args.repeat {
                let dir = tempfile::tempdir()?;
                let group = format!("{prefix}-n{n}-r{run}");
                let cpu0 = citystream_benches::children_usage().cpu_s;
                let t0 = Instant::now();
                let reading = time_to_read(n, produced);
                let mut children = (0..n)
                    .map(|i| {
                        let (name, lake) = (format!("w{i}"), dir.path().join(format!("lake{i}")));
                        let yaml = config(args, &topics, &group, (&name, &lake, &dir.path().join("state")), "5s");
                        spawn(&args.citystream, dir.path(), &format!("w{i}"), &yaml)
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?;
                for (i, c) in children.iter_mut().enumerate() {
                    if !c.0.wait()?.success() {
                        let log = std::fs::read_to_string(dir.path().join(format!("w{i}.log"))).unwrap_or_default();
                        anyhow::bail!("instance {i} failed:\n{}", &log[log.len().saturating_sub(3000)..]);
                    }
                }
                let secs = t0.elapsed().as_secs_f64() - IDLE_S as f64;
                let cpu = citystream_benches::children_usage().cpu_s - cpu0;
                let events: u64 = (0..n).map(|i| events_read(&dir.path().join(format!("w{i}.log")))).sum();
                anyhow::ensure!(events >= produced, "{events} events read of {produced}");
                // the backlog's events (a re-read after a rebalance is work, not progress)
                let (rate, per_m) = (produced as f64 / secs, cpu / produced as f64 * 1e6);
                let read_rate = reading.join().ok().flatten().map_or(0.0, |s| produced as f64 / s);
                eprintln!(
                    "{n} instance(s), run {run}: {read_rate:.0} events/s until all read, {rate:.0} until the last \
                     exit, {per_m:.2} CPU-s per million ({events} read)"
                );
                rates.push(rate);
                cpus.push(per_m);
                read_rates.push(read_rate);
            }
            rows.push((n, median(read_rates), median(rates), median(cpus)));
        }
        let base = rows.first().map_or(1.0, |r| r.1);
        println!(
            "| instances | events/s until all read (median of {}) | vs 1 | events/s until the last exit | CPU-s per million events |",
            args.repeat
        );
        println!("|---|---|---|---|---|");
        for (n, read, rate, cpu) in rows {
            println!("| {n} | {read:.0} | {:.2}x | {rate:.0} | {cpu:.2} |", read / base);
        }
        Ok(())
    }

    /// Kill to the first new file of one of the killed instance's partitions, written by the
    /// survivor (`restart: false`) or by a replacement with the same instance id.
    fn handover(args: &Args, rt: &tokio::runtime::Runtime, prefix: &str, restart: bool) -> anyhow::Result<f64> {
        let topics = rt.block_on(citystream_benches::kafka::create_topics(&args.brokers, prefix, args.partitions))?;
        let cfg = SimulatorConfig {
            duration: citystream_operators::Duration::from_secs(86_400),
            ..SimulatorConfig::default()
        };
        let rate = std::num::NonZeroU32::new(args.rate);
        let (b, t) = (args.brokers.clone(), topics.clone());
        let feed = rt.spawn(async move { citystream_pipeline::kafka::produce::simulate_into(&b, cfg, &t, rate).await });
        let dir = tempfile::tempdir()?;
        let lake = |i: usize| dir.path().join(format!("lake{i}"));
        let state = dir.path().join("state");
        let yaml = |i: usize| config(args, &topics, prefix, (&format!("w{i}"), &lake(i), &state), "1s");
        let mut a = spawn(&args.citystream, dir.path(), "w0", &yaml(0))?;
        let b = spawn(&args.citystream, dir.path(), "w1", &yaml(1))?;
        let started = SystemTime::now();
        // both running and writing their own partitions
        let t0 = Instant::now();
        while files_by_partition(&lake(0), started).is_empty() || files_by_partition(&lake(1), started).is_empty() {
            if t0.elapsed() > Duration::from_secs(60) {
                let logs: Vec<String> = ["w0", "w1"]
                    .iter()
                    .map(|n| {
                        let l = std::fs::read_to_string(dir.path().join(format!("{n}.log"))).unwrap_or_default();
                        format!("{n}:\n{}", &l[l.len().saturating_sub(2000)..])
                    })
                    .collect();
                anyhow::bail!("the instances did not both start writing within 60 s:\n{}", logs.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_secs(3));
        let owned = files_by_partition(&lake(0), SystemTime::now() - Duration::from_secs(2));
        let t_kill = Instant::now();
        a.0.kill()?;
        a.0.wait()?;
        // files it closed before it died are older than this
        let killed_at = SystemTime::now();
        let replacement = if restart { Some(spawn(&args.citystream, dir.path(), "w0b", &yaml(0))?) } else { None };
        let watch = if restart { lake(0) } else { lake(1) };
        let took = loop {
            let fresh = files_by_partition(&watch, killed_at);
            if fresh.iter().any(|p| owned.contains(p)) {
                break t_kill.elapsed().as_secs_f64();
            }
            if t_kill.elapsed() > Duration::from_secs(120) {
                let name = if restart { "w0b" } else { "w1" };
                let l = std::fs::read_to_string(dir.path().join(format!("{name}.log"))).unwrap_or_default();
                anyhow::bail!(
                    "no handover within 120 s (partitions {owned:?}); {name}:\n{}",
                    &l[l.len().saturating_sub(3000)..]
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        drop((b, replacement));
        feed.abort();
        Ok(took)
    }

    pub fn main() -> anyhow::Result<()> {
        let args = Args::parse();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let stamp = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH)?.as_secs();
        if !args.instances.is_empty() {
            throughput(&args, &rt, &format!("scale-{stamp}"))?;
        }
        for restart in [false, true] {
            let mut took = Vec::new();
            for run in 0..args.handovers {
                let s = handover(&args, &rt, &format!("handover-{stamp}-{restart}-{run}"), restart)?;
                eprintln!("handover ({}), run {run}: {s:.2} s", if restart { "restarted" } else { "survivor" });
                took.push(s);
            }
            if !took.is_empty() {
                println!(
                    "handover, kill to first file of a moved partition, {}: median {:.2} s (min {:.2}, max {:.2}, {} runs)",
                    if restart { "replacement with the same group.instance.id" } else { "taken over by the survivor" },
                    median(took.clone()),
                    took.iter().copied().fold(f64::INFINITY, f64::min),
                    took.iter().copied().fold(0.0, f64::max),
                    took.len()
                );
            }
        }
        Ok(())
    }
}
