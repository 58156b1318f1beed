"""The peer benchmark of issue 19: one workload through citystream and through DuckDB and
Polars, side by side, in one run.

Workload: `--events` traffic readings (default 1,000,000: about 200 MB of JSON lines), 2% of
them delivered twice, arrival order shuffled within +-30 s of event time. Each engine
deduplicates by `event_id`, aggregates 5-minute windows per segment (count, sum, mean and
85th percentile of speed, mean occupancy) and writes zstd Parquet.

- citystream: the files source -> decode -> dedup -> window -> Parquet (release binary,
  `citystream run`), every guarantee on (exact quantiles, dead letters, exactly-once files);
- DuckDB: one batch query over the JSON file (`read_json` -> `DISTINCT ON` -> `GROUP BY`);
- Polars: the same as a lazy query (`scan_ndjson` -> `unique` -> `group_by` -> `sink_parquet`);
- with `--kafka BROKERS`, citystream also from a Kafka topic holding the same lines (a backlog:
  produced before the runs, keyed by sensor; the source's idle wait at the end is taken off
  its wall time); with `--decode-only` as well, `citystream-kafka-decode`: the same backlog
  consumed, decoded and written to Parquet row by row (no dedup or windows), the issue's
  decode-only rate; with `--broker-pid PID` (the broker's JVM, e.g. `deploy/kafka/run/kafka.pid`),
  how busy the two cores were during Kafka runs: citystream's CPU and the broker's over twice
  the wall time; `--compression` picks the producer's codec (zstd by default: the fewest bytes
  on the wire and on the broker's disk, and the consumer decompresses them); `--baseline` runs a
  second citystream binary on the same backlog, interleaved (a change measured against the build
  before it, in the same run); `--librdkafka` adds `citystream-kafka-librdkafka`: the same
  binary with `fetch: librdkafka` (librdkafka's own fetch; `citystream-kafka` fetches natively,
  the default on plaintext); `--kcat` adds `kcat-consume`: Debian's `kcat` (`apt install kcat`,
  with its own librdkafka) reading the same backlog to /dev/null, one character per message, the
  Kafka client's own cost with no work on the events (a floor for any librdkafka consumer);
  `--fetch-floor BINARY` adds `fetch-floor`: `benches/src/bin/fetch_floor.rs` reading the same
  backlog with the native fetch's requests and reader alone (no group, commits or pipeline) into
  the source's raw batches, the floor of the native path (checked once, before the timed runs,
  to read exactly the produced lines).

Each run is a fresh process; wall time, CPU (user + system, from `wait4`) and peak RSS are
the child's. Medians of `--repeat` runs, interleaved engine by engine. The windows of the
three results are compared (their number and readings, up to the newest window citystream
closed: the stream keeps later ones open for data that may follow), so a faster wrong answer
does not pass unnoticed.

    .venv/bin/pip install -r benches/requirements.txt
    cargo build --release -p citystream-pipeline --bin citystream
    .venv/bin/python benches/peer_batch.py target/release/citystream --repeat 3 [--kafka 127.0.0.1:9092]
        [--decode-only] [--broker-pid PID] [--events 3000000] [--compression lz4] [--baseline OTHER_BINARY] [--kcat]
        [--librdkafka] [--fetch-floor target/release/fetch_floor]
    (fetch_floor: cargo build --release -p citystream-benches --features kafka --bin fetch_floor)
"""

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

DUCKDB = """
import duckdb, sys
con = duckdb.connect()
con.execute("SET threads TO 2")
con.execute(f'''
COPY (
  SELECT segment_id,
         time_bucket(INTERVAL 5 minute, epoch_ms(ts)) AS window_start,
         count(*) AS readings,
         sum(speed_kmh) AS speed_sum,
         avg(speed_kmh) AS mean_speed_kmh,
         quantile_cont(speed_kmh, 0.85) AS p85_speed_kmh,
         avg(occupancy) AS mean_occupancy
  FROM (SELECT DISTINCT ON (event_id) * FROM read_json('{sys.argv[1]}', format = 'newline_delimited'))
  GROUP BY ALL
) TO '{sys.argv[2]}' (FORMAT parquet, COMPRESSION zstd)
''')
"""

POLARS = """
import polars as pl, sys
(
    pl.scan_ndjson(sys.argv[1])
    .unique(subset=["event_id"], keep="first")
    .with_columns(pl.from_epoch("ts", time_unit="ms").dt.truncate("5m").alias("window_start"))
    .group_by("segment_id", "window_start")
    .agg(
        pl.len().alias("readings"),
        pl.col("speed_kmh").sum().alias("speed_sum"),
        pl.col("speed_kmh").mean().alias("mean_speed_kmh"),
        pl.col("speed_kmh").quantile(0.85, interpolation="linear").alias("p85_speed_kmh"),
        pl.col("occupancy").mean().alias("mean_occupancy"),
    )
    .sink_parquet(sys.argv[2], compression="zstd")
)
"""

CITYSTREAM = """
sources:
  archive:
    type: files
    paths: {{traffic: {events}}}
    max_out_of_orderness: 1m
stages:
  traffic: {{type: decode, input: archive.traffic, kind: traffic, max_past: null, max_future: null}}
  unique: {{type: dedup, input: traffic, horizon: 10m, content: "off"}}
  windows:
    type: window
    input: unique
    key: [segment_id]
    size: 5m
    allowed_lateness: 1m
    aggregates:
      - {{fn: count, as: readings}}
      - {{fn: sum, column: speed_kmh, as: speed_sum}}
      - {{fn: mean, column: speed_kmh, as: mean_speed_kmh}}
      - {{fn: quantile, column: speed_kmh, q: 0.85, as: p85_speed_kmh}}
      - {{fn: mean, column: occupancy, as: mean_occupancy}}
sinks:
  lake:
    type: parquet
    path: {out}
    tables:
      traffic_windows: windows
      dead_letters: traffic.dead_letters
      traffic_late: [traffic.late_events, unique.late_events, windows.late_events]
    daily: [dead_letters, traffic_late]
runtime:
  state_dir: {state}
  status_interval: null
"""


CITYSTREAM_KAFKA_SOURCE = """
  archive:
    type: kafka
    brokers: {brokers}
    group_id: {group}
    topics: {{traffic: {topic}}}
    max_out_of_orderness: 1m
    stop_when_idle: {idle}s
"""

# how long the Kafka source waits for more before it ends: not work, taken off its wall time
KAFKA_IDLE_S = 1


def decode_only(text):
    """A citystream config that decodes and stores every row instead of deduplicating and
    windowing (the tables are those of `CITYSTREAM` otherwise)."""
    text = text[: text.index("  unique:")] + text[text.index("sinks:") :]
    text = text.replace("      traffic_windows: windows\n", "      traffic: traffic\n")
    return text.replace("[traffic.late_events, unique.late_events, windows.late_events]", "traffic.late_events")


def stored(out):
    """Rows of a decode-only run's lake: its `traffic` and `traffic_late` tables."""
    import duckdb

    glob = [f"{out}/{t}/**/*.parquet" for t in ("traffic", "traffic_late") if os.path.isdir(f"{out}/{t}")]
    return duckdb.connect().execute(f"SELECT count(*) FROM read_parquet({glob})").fetchone()[0]


def process_cpu(pid):
    """CPU seconds (user + system) that process `pid` has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def produce(brokers, topic, events, partitions, compression):
    """Creates `topic` and produces the lines of `events` to it, keyed by sensor, compressed
    with `compression`."""
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": brokers})
    for f in admin.create_topics([NewTopic(topic, partitions, 1)]).values():
        f.result()
    p = Producer({"bootstrap.servers": brokers, "linger.ms": 20, "compression.type": compression,
                  "enable.idempotence": True, "queue.buffering.max.messages": 500000})
    with open(events, "rb") as f:
        for line in f:
            line = line.rstrip(b"\n")
            key = line[line.index(b'"sensor_id":"') + 13:].split(b'"', 1)[0]
            while True:
                try:
                    p.produce(topic, line, key)
                    break
                except BufferError:
                    p.poll(0.05)
    p.flush(120)


def generate(path, n, seed):
    """`n` readings of 30-s loop detectors, 2% delivered twice, shuffled within +-30 s."""
    rng = random.Random(seed)
    sensors = 2000
    t0 = 1772409600000  # 2026-03-02T00:00:00Z
    unique = int(n / 1.02)
    rows = []
    for i in range(unique):
        s, k = i % sensors, i // sensors
        ts = t0 + k * 30_000 + rng.randrange(0, 1000)
        speed = max(0.0, rng.gauss(55.0 if (k // 40) % 3 else 25.0, 12.0))
        row = {
            "event_id": f"ev-{i:09d}",
            "ts": ts,
            "schema_version": 1,
            "sensor_id": f"loop-{s:05d}",
            "segment_id": f"seg-{s // 4:04d}",
            "lane": s % 4 + 1,
            "interval_s": 30,
            "flow": rng.randrange(0, 25),
            "occupancy": round(min(1.0, rng.random() * 0.4), 3),
            "speed_kmh": round(speed, 1),
        }
        line = json.dumps(row, separators=(",", ":"))
        # arrival: event time plus up to 30 s either way; a duplicate arrives up to 30 s later
        rows.append((ts + rng.uniform(-30_000, 30_000), line))
        if len(rows) < n and rng.random() < 0.02 * 1.02:
            rows.append((ts + rng.uniform(0, 30_000), line))
    rows.sort(key=lambda r: r[0])
    with open(path, "w") as f:
        for _, line in rows[:n]:
            f.write(line)
            f.write("\n")
    return min(n, len(rows))


def run(cmd):
    """Runs `cmd`; (wall s, CPU s, peak RSS MiB) of the child."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    err = p.stderr.read().decode(errors="replace")
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        sys.exit(f"{cmd[0]} failed ({p.returncode}):\n{err[-3000:]}")
    return wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024


def windows(path, until=None):
    """(windows, readings, newest window start in UTC ms) of a result (a Parquet file or a
    directory of them), counting windows that start at or before `until` (UTC ms)."""
    import duckdb

    glob = f"{path}/**/*.parquet" if os.path.isdir(path) else path
    where = "" if until is None else f"WHERE epoch_ms(window_start) <= {until}"
    q = f"SELECT count(*), sum(readings), max(epoch_ms(window_start)) FROM read_parquet('{glob}') {where}"
    return duckdb.connect().execute(q).fetchone()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("citystream", help="the citystream binary (a release build)")
    ap.add_argument("--generate", metavar="PATH", help=argparse.SUPPRESS)
    ap.add_argument("--produce", nargs=2, metavar=("TOPIC", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--kafka", metavar="BROKERS", help="also run citystream from a Kafka topic on BROKERS")
    ap.add_argument("--partitions", type=int, default=2, help="partitions of that topic")
    ap.add_argument("--decode-only", action="store_true", help="with --kafka: also decode -> Parquet alone")
    ap.add_argument("--broker-pid", type=int, help="with --kafka: the broker's pid, for how busy the cores were")
    ap.add_argument("--compression", default="zstd", choices=["zstd", "lz4", "snappy", "gzip", "none"],
                    help="with --kafka: the producer's codec")
    ap.add_argument("--baseline", metavar="BINARY",
                    help="with --kafka: another citystream binary (e.g. the build before a change) run on the "
                         "same backlog, interleaved with the others (`citystream-kafka-baseline`)")
    ap.add_argument("--librdkafka", action="store_true",
                    help="with --kafka: also the Kafka source with `fetch: librdkafka` (librdkafka fetches; "
                         "the default, `auto`, fetches natively on plaintext: `citystream-kafka-librdkafka`)")
    ap.add_argument("--kcat", action="store_true",
                    help="with --kafka: also kcat reading the backlog to /dev/null (`kcat-consume`)")
    ap.add_argument("--fetch-floor", metavar="BINARY",
                    help="with --kafka: also fetch_floor (benches/src/bin/fetch_floor.rs) reading the backlog "
                         "without librdkafka (`fetch-floor`; the first broker must lead every partition)")
    args = ap.parse_args()
    if args.fetch_floor and not args.kafka:
        ap.error("--fetch-floor reads the Kafka backlog: it needs --kafka")
    if args.librdkafka and not args.kafka:
        ap.error("--librdkafka runs on the Kafka backlog: it needs --kafka")
    if args.baseline and not args.kafka:
        ap.error("--baseline runs on the Kafka backlog: it needs --kafka")
    if args.kcat and not (args.kafka and shutil.which("kcat")):
        ap.error("--kcat needs --kafka and kcat on the PATH (apt install kcat)")
    if args.generate:
        print(generate(args.generate, args.events, args.seed))
        return
    if args.produce:
        produce(args.kafka, args.produce[0], args.produce[1], args.partitions, args.compression)
        return
    with tempfile.TemporaryDirectory() as d:
        events = os.path.join(d, "traffic.jsonl")
        # in a process of its own: a child's peak RSS starts at its parent's (fork), so the
        # parent stays small
        gen = [sys.executable, __file__, args.citystream, "--generate", events]
        gen += ["--events", str(args.events), "--seed", str(args.seed)]
        n = int(subprocess.run(gen, check=True, capture_output=True, text=True).stdout)
        mib = os.path.getsize(events) / 2**20
        print(f"workload: {n} traffic events, {mib:.0f} MiB of JSON lines")
        results = {"citystream": [], "duckdb": [], "polars": []}
        tables = {}
        if args.kafka:
            topic = f"peer-{int(time.time())}"
            t0 = time.perf_counter()
            # in a process of its own too (the producer's buffers)
            cmd = [sys.executable, __file__, args.citystream, "--kafka", args.kafka]
            cmd += ["--partitions", str(args.partitions), "--compression", args.compression, "--produce", topic, events]
            subprocess.run(cmd, check=True)
            print(f"produced to {topic} ({args.partitions} partitions, {args.compression}) in {time.perf_counter() - t0:.1f} s")
            results["citystream-kafka"] = []
            if args.decode_only:
                results["citystream-kafka-decode"] = []
            if args.baseline:
                results["citystream-kafka-baseline"] = []
            if args.librdkafka:
                results["citystream-kafka-librdkafka"] = []
            if args.kcat:
                results["kcat-consume"] = []
                version = subprocess.run(["kcat", "-V"], capture_output=True, text=True).stdout
                print("kcat:", next((line.strip() for line in version.splitlines() if "librdkafka" in line), "?"))
            if args.fetch_floor:
                floor = [args.fetch_floor, "--broker", args.kafka.split(",")[0], "--topic", topic,
                         "--partitions", str(args.partitions)]
                # once with the check of every value against the produced lines, untimed
                subprocess.run(floor + ["--check", events], check=True, stdout=subprocess.DEVNULL)
                results["fetch-floor"] = []
        busy = {}
        for r in range(args.repeat):
            for engine in results:
                out = os.path.join(d, f"{engine}-{r}")
                if engine.startswith("citystream"):
                    cfg = os.path.join(d, f"{engine}-{r}.yaml")
                    text = CITYSTREAM.format(events=events, out=out, state=os.path.join(d, f"state-{engine}-{r}"))
                    if engine.startswith("citystream-kafka"):
                        source = CITYSTREAM_KAFKA_SOURCE.format(
                            brokers=args.kafka, group=f"{topic}-{engine}-{r}", topic=topic, idle=KAFKA_IDLE_S
                        )
                        if engine == "citystream-kafka-librdkafka":
                            source += "    fetch: librdkafka\n"
                        start = text.index("  archive:")
                        text = text[:start] + source.lstrip("\n") + text[text.index("stages:"):]
                    if engine == "citystream-kafka-decode":
                        text = decode_only(text)
                    with open(cfg, "w") as f:
                        f.write(text)
                    binary = args.baseline if engine == "citystream-kafka-baseline" else args.citystream
                    cmd = [binary, "run", "--config", cfg]
                    table = os.path.join(out, "traffic_windows")
                elif engine == "fetch-floor":
                    cmd = floor
                    table = None
                elif engine == "kcat-consume":
                    cmd = ["kcat", "-C", "-b", args.kafka, "-t", topic, "-o", "beginning", "-e", "-q", "-f", "%p"]
                    table = None
                else:
                    cmd = [sys.executable, "-c", DUCKDB if engine == "duckdb" else POLARS, events, out + ".parquet"]
                    table = out + ".parquet"
                broker0 = process_cpu(args.broker_pid) if args.broker_pid else None
                wall, cpu, rss = run(cmd)
                note = ""
                if engine.startswith("citystream-kafka"):
                    wall -= KAFKA_IDLE_S
                    if broker0 is not None:
                        broker = process_cpu(args.broker_pid) - broker0
                        busy.setdefault(engine, []).append((cpu + broker) / (2 * wall))
                        note = f" (broker {broker:.2f} CPU-s; cores {busy[engine][-1] * 100:.0f}% busy)"
                results[engine].append((wall, cpu, rss))
                if engine == "citystream-kafka-decode":
                    if stored(out) != n:
                        sys.exit(f"{engine} stored {stored(out)} of {n} rows")
                elif table is not None:
                    tables[engine] = table
                print(f"run {r} {engine:<10} {wall:6.2f} s wall {cpu / n * 1e6:5.2f} CPU-s/M {rss:6.0f} MiB{note}", flush=True)
        # a stream keeps its newest windows open for the data that may follow (with a state
        # directory, the end of the files is not the end of the stream): compare the windows
        # citystream closed
        closed = windows(tables["citystream"])[2]
        counts = {e: windows(t, closed)[:2] for e, t in tables.items()}
        print(f"\n{'engine':<10} {'events/s':>10} {'wall s':>8} {'CPU-s/M':>8} {'peak MiB':>9} {'windows':>8} {'readings':>9}")
        for engine, rs in results.items():
            wall = statistics.median(r[0] for r in rs)
            cpu = statistics.median(r[1] for r in rs)
            rss = statistics.median(r[2] for r in rs)
            w, readings = counts.get(engine, ("-", "-"))
            line = f"{engine:<10} {n / wall:>10.0f} {wall:>8.2f} {cpu / n * 1e6:>8.2f} {rss:>9.0f} {w:>8} {readings:>9}"
            if engine in busy:
                line += f"  cores busy {statistics.median(busy[engine]) * 100:.0f}%"
            print(line)
        if len({c for c in counts.values()}) != 1:
            sys.exit(f"the engines disagree on the windows: {counts}")


if __name__ == "__main__":
    main()
