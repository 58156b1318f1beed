"""The experiment that made the deployed incident detector temporal: does it gain from seeing the
last WINDOW minutes of its segment and of its neighbours, minute by minute, beside the features'
1-, 5- and 15-minute means and lags? (It now does, with 5 minutes: features.py's `*_m{k}`.)

The temporal detector's input is the former detector's (train.py's `transform` of the
congestion forecaster's columns, occupancies scaled by OCC_SCALE) plus, for each of the last WINDOW minutes (this one included), the segment's
speed as a share of its free speed and its scaled occupancy, and the same of its upstream and
downstream neighbours (a neighbour missing or silent that minute: the segment's own; a minute
without a window: free speed, no occupancy), flattened into more inputs of the deployed recipe's
64-32 network (no weights shared over time, as a temporal convolution's would be), trained as
train.py trains the detector (`fit_detector`: the same epochs, class weights and SUMO repeat), its levels calibrated on its training rows as the deployed file's are, through
the deployed alert rule. The former recipe is trained again beside it with the same seeds
(SEEDS; the shuffles' seed 1000 more, as the held-out-condition experiments' are), so that the
two differ only in their input.

    cd models/train && ../../.venv/bin/python temporal_experiment.py [--window 15]   # after sumo_scenarios.py, about 5 minutes

It prints each held-out set's detection rate, false alarms per corridor-hour and mean time to
detect per seed and their medians, and those of the mean of the seeds' scores (one detector,
calibrated as one; the deployed detector is such a mean), and writes them to data/temporal_experiment_<window>m.json.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

import features as F
import train as T

WINDOW = 15  # minutes; --window
SEEDS = (13, 14, 15)
ROW_KEYS = (*T.ROW_KEYS, "xw")  # the window rows too


def window_rows(g):
    """The temporal input's window part of each row of a run, from the grid its features were
    made of (`Grid`: rows in the run's order)."""
    share = g.speed / g.free[:, None]
    occ = g.occ * (g.free[:, None] / 100.0) ** T.OCC_SCALE

    def of(idx, own):  # a neighbour's series, the segment's own where it has none or it is silent
        out = own.copy()
        has = idx >= 0
        theirs = own[np.where(has, idx, 0)]
        ok = has[:, None] & ~np.isnan(theirs)
        out[ok] = theirs[ok]
        return out

    series = [share, occ, of(g.up, share), of(g.up, occ), of(g.down, share), of(g.down, occ)]
    fill = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    cols = []
    for s, f in zip(series, fill):
        for k in range(WINDOW):
            c = g.cols - k
            v = np.where(c >= 0, s[g.rows, np.maximum(c, 0)], np.nan)
            cols.append(np.where(np.isnan(v), f, v))
    return np.stack(cols, axis=1).astype(np.float32)


def load(run_dir, family=None):
    d = T.load(run_dir, family)
    d["xw"] = window_rows(d["grid"])
    # the window's first column is this minute's speed share: the features' speed_1m / free speed
    own = d["x"][:, F.FEATURES.index("speed_1m")] / d["x"][:, T.FREE_INDEX]
    assert np.allclose(d["xw"][:, 0], own, rtol=1e-5), "window rows out of line with the feature rows"
    return d


def deployed_california():
    """California #7's thresholds in models/metrics.json (t1, t2, t3): they confirm the scores
    in the deployed rule (`T.incident_rule`)"""
    t = json.loads((T.MODELS / "metrics.json").read_text())["incident"]["california7_thresholds"]
    return t["t1_occdf"], t["t2_occrdf"], t["t3_docc"]


def recipe(train, visit, inputs, seed, what):
    """the detector's recipe on `inputs(d)` (rows of a data set; an epoch visits rows `visit`),
    seeded: its rule(d) and levels"""
    print(f"== {what}, seed {seed}", flush=True)
    score = T.fit_detector(train, visit, inputs, seed, seed + 1000)
    rule, levels = T.calibrated_rule(score, train, deployed_california())
    return rule, {**levels, "inputs": int(inputs({k: train[k][:1] for k in ("x", "xw")}).shape[1])}, score


def main():
    global WINDOW
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--window", type=int, default=WINDOW, help="minutes of each series the temporal detector sees")
    WINDOW = ap.parse_args().window
    data = T.HERE / "data"
    sim_train, sim_test = load(data / "train"), load(data / "test")
    sumo_train, tests, _ = T.sumo_runs(data, load)
    tests = {"simulator": [sim_test], **tests}
    train, visit, _ = T.training_set(sim_train, sumo_train, ROW_KEYS)
    former = lambda d: T.transform(d["x"], T.OCC_SCALE)  # noqa: E731
    temporal_inputs = lambda d: np.concatenate([former(d), d["xw"]], axis=1)  # noqa: E731
    inputs = {"former inputs": former, f"temporal ({WINDOW} minutes)": temporal_inputs}
    detectors = {(name, seed): recipe(train, visit, f, seed, name) for seed in SEEDS for name, f in inputs.items()}
    # each recipe's seeds as one detector: the mean of their scores, its levels calibrated as one
    for name in inputs:
        scores = [detectors[(name, seed)][2] for seed in SEEDS]
        rule, levels = T.calibrated_rule(lambda d, scores=scores: np.mean([s(d) for s in scores], axis=0), train,
                                         deployed_california())
        detectors[(name, "mean of seeds")] = (rule, {**levels, "inputs": detectors[(name, SEEDS[0])][1]["inputs"]}, None)
    results = {"window_min": WINDOW, "seeds": SEEDS,
               "detectors": {f"{n}, {s if isinstance(s, str) else f'seed {s}'}": v[1] for (n, s), v in detectors.items()}, "held_out": {}}
    keys = ("detection_rate", "false_alarms_per_corridor_hour", "mean_time_to_detect_min")
    print(f"\n{'held-out set':<12} {'detector':<22} " + "  ".join(f"{k:>28}" for k in ("detection", "FA/corridor-hour", "MTTD min")))
    for family, runs in tests.items():
        d = T.combine(runs, ROW_KEYS)
        out = results["held_out"][family] = {}
        for (name, seed), (rule, *_) in detectors.items():
            out.setdefault(name, {})[seed] = T.detection_metrics(d, rule(d), T.RULE_JOIN)
        for name, by_seed in out.items():
            cells = []
            for k in keys:
                v = [m[k] for s, m in by_seed.items() if s in SEEDS]
                ok = [x for x in v if x is not None]
                cells.append(f"{' '.join(f'{x!s:>6}' for x in v)} (med {np.median(ok) if ok else None!s:>5.5})")
            print(f"{family:<12} {name:<22} " + "  ".join(f"{c:>28}" for c in cells), flush=True)
            mean = by_seed["mean of seeds"]
            print(f"{family:<12} {name + ', mean of seeds':<22} " + "  ".join(f"{mean[k]!s:>28}" for k in keys), flush=True)
    print(json.dumps(results["detectors"], indent=2))
    (T.HERE / "data" / f"temporal_experiment_{WINDOW}m.json").write_text(json.dumps(results, indent=2, default=str) + "\n")

if __name__ == "__main__":
    main()
