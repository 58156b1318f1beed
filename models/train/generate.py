"""Regenerates the training and held-out data from scratch with the project's simulator.

    python models/train/generate.py [--citystream PATH] [--out models/train/data]

Runs `citystream run` on sim.yaml twice, with fixed seeds: 21 training days (seed 1, from
Monday 2026-03-02) and 7 held-out days (seed 2, from Monday 2026-04-06), 12 injected incidents
per day. Each run writes `lake/traffic_minutes` (one-minute windows per segment) and
`ground_truth/` (road graph, incidents). The data stays out of git.
"""

import argparse
import os
import pathlib
import shutil
import subprocess

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RUNS = {
    "train": {"SIM_SEED": "1", "SIM_START": "2026-03-02T00:00:00Z", "SIM_DURATION": "21d"},
    "test": {"SIM_SEED": "2", "SIM_START": "2026-04-06T00:00:00Z", "SIM_DURATION": "7d"},
    # congestion_days_experiment.py's extra training days (the 8 weeks before "train"); only
    # with --only more
    "more": {"SIM_SEED": "3", "SIM_START": "2026-01-05T00:00:00Z", "SIM_DURATION": "56d"},
}
OPTIONAL = {"more"}
INCIDENTS_PER_DAY = "12"


def default_binary():
    target = os.environ.get("CARGO_TARGET_DIR", str(pathlib.Path.home() / ".cache/citystream/target"))
    return str(pathlib.Path(target) / "debug" / "citystream")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--citystream", default=default_binary())
    ap.add_argument("--out", default=str(HERE / "data"))
    ap.add_argument("--only", choices=sorted(RUNS))
    args = ap.parse_args()
    template = (HERE / "sim.yaml").read_text()
    for name, values in RUNS.items():
        if (args.only and name != args.only) or (not args.only and name in OPTIONAL):
            continue
        out = pathlib.Path(args.out) / name
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        values = dict(values, SIM_INCIDENTS_PER_DAY=INCIDENTS_PER_DAY, SIM_OUT=str(out))
        text = template
        for k, v in values.items():
            text = text.replace("${" + k + "}", v)
        cfg = out / "sim.yaml"
        cfg.write_text(text)
        print(f"== {name}: {values['SIM_DURATION']} from {values['SIM_START']}, seed {values['SIM_SEED']}", flush=True)
        subprocess.run([args.citystream, "run", "--config", str(cfg)], check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
