"""What a caught-up Kafka source costs while nothing arrives: the peer benchmark's pipeline
(`peer_batch.py`: decode -> dedup -> 5-minute windows -> Parquet) on an empty topic, for
`--seconds` of silence (`stop_when_idle`), its CPU (user + system, from `wait4`) over its wall
time. A live source spends most of a city's night like this, so its idle cost is part of the
energy account; the native fetch's rounds wake at the source's timers (at most every 100 ms).

Each run is a fresh process with a fresh consumer group; with `--baseline`, a second binary
runs interleaved with the first (a change measured against the build before it, in the same
run). Medians of `--repeat` runs, with the range.

    .venv/bin/pip install -r benches/requirements.txt
    cargo build --release -p citystream-pipeline --bin citystream
    .venv/bin/python benches/idle_source.py target/release/citystream --kafka 127.0.0.1:9092
        [--seconds 20] [--repeat 3] [--baseline OTHER_BINARY] [--librdkafka]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peer_batch import CITYSTREAM, CITYSTREAM_KAFKA_SOURCE, run  # noqa: E402


def create_topic(brokers, topic, partitions):
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": brokers})
    for f in admin.create_topics([NewTopic(topic, partitions, 1)]).values():
        f.result()


def config(d, name, brokers, topic, seconds, librdkafka):
    """The peer pipeline reading `topic` (empty), ending after `seconds` without a message."""
    out = os.path.join(d, name)
    text = CITYSTREAM.format(events="unused", out=out, state=os.path.join(d, f"state-{name}"))
    source = CITYSTREAM_KAFKA_SOURCE.format(brokers=brokers, group=f"{topic}-{name}", topic=topic, idle=seconds)
    if librdkafka:
        source += "    fetch: librdkafka\n"
    text = text[: text.index("  archive:")] + source.lstrip("\n") + text[text.index("stages:") :]
    path = os.path.join(d, f"{name}.yaml")
    with open(path, "w") as f:
        f.write(text)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("citystream", help="the citystream binary (a release build)")
    ap.add_argument("--kafka", required=True, metavar="BROKERS")
    ap.add_argument("--seconds", type=int, default=20, help="how long each run waits idle (default 20)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--partitions", type=int, default=2)
    ap.add_argument("--baseline", metavar="BINARY", help="a second binary, run interleaved")
    ap.add_argument("--librdkafka", action="store_true", help="`fetch: librdkafka` for every binary")
    args = ap.parse_args()

    topic = f"idle-{int(time.time())}"
    create_topic(args.kafka, topic, args.partitions)
    binaries = {"citystream": args.citystream}
    if args.baseline:
        binaries["baseline"] = args.baseline
    results = {name: [] for name in binaries}
    with tempfile.TemporaryDirectory() as d:
        for r in range(args.repeat):
            for name, binary in binaries.items():
                cfg = config(d, f"{name}-{r}", args.kafka, topic, args.seconds, args.librdkafka)
                wall, cpu, rss = run([binary, "run", "--config", cfg])
                results[name].append((wall, cpu))
                print(f"run {r} {name:<10} {wall:6.2f} s wall  {cpu:5.2f} CPU-s  {100 * cpu / wall:5.2f}% of a core"
                      f"  {rss:4.0f} MiB", flush=True)
    print(f"\n{args.seconds} s idle on an empty {args.partitions}-partition topic, medians of {args.repeat} runs:")
    print(f"{'binary':<10} {'wall s':>7} {'CPU-s':>14} {'% of a core':>18}")
    for name, runs in results.items():
        cpus = [c for _, c in runs]
        shares = [100 * c / w for w, c in runs]
        print(f"{name:<10} {statistics.median(w for w, _ in runs):7.2f} "
              f"{statistics.median(cpus):6.2f} ({min(cpus):.2f}-{max(cpus):.2f}) "
              f"{statistics.median(shares):7.2f} ({min(shares):.2f}-{max(shares):.2f})")


if __name__ == "__main__":
    main()
