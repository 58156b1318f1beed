"""How sure the congestion card's comparisons with the historical average are: for each
held-out set and horizon, a forecaster's MAE (`congestion_fp32`, then `congestion_small`, which
deploy/*.yaml run) minus the historical average's,
over all scored minutes and over congested ones (train.py's `scored_rows`), with a 95% interval
from a paired block bootstrap. A block is one segment of one run (a SUMO scenario, or one day of
the simulator's test week): minutes of a segment in a run are not independent (one incident's
queue fills many), so whole blocks are drawn with replacement (2000 draws, seeded). Neighbouring
segments of a run share queues and demand too, so the intervals are if anything too narrow,
and there are 84 of them, uncorrected for their number: "within the noise" is the firmer
reading, "outside it" the weaker.

    cd models/train && ../../.venv/bin/python congestion_significance.py   # after sumo_scenarios.py, ~2 minutes

On 2026-12-06, in congested minutes (model minus historical average, km/h, [95% interval]),
`congestion_fp32`: `highway100` +15 -2.08 [-3.50, -0.60], +30 +0.31 [-0.91, +1.40], +60 +0.92
[-1.19, +2.65] (congested minutes in 19 segment-runs); the simulator +60 +0.16 [-0.21, +0.55]
(84). `congestion_small`: `highway100` +30 +1.03 [-0.26, +2.00], +60 +1.26 [-0.98, +2.99]; the
simulator +60 -0.00 [-0.38, +0.41]. The places where the card then showed a forecaster behind the
historical average are within the noise of the held-out data: neither is shown to beat the
other there. Some of the leads at +60 are within it too (`freeway120`, `motorway130`: both
forecasters). Every other comparison, over all minutes and in congested ones, favours the
forecasters with an interval below zero.

Later that day, on the larger held-out sets (16 scenarios of a trained road, 24 of an unseen
one), in congested minutes: `congestion_fp32` is ahead on every SUMO road at every horizon,
within the noise only at +60 on `freeway120` (-0.75 [-1.97, +0.40]) and `highway100` (-1.09
[-2.28, +0.06]; 77 segment-runs); `congestion_small` within it on `highway100` at +30 and +60
and `freeway120` at +60; the simulator is unchanged.
"""

import numpy as np

import train as T

DRAWS = 2000


def blocks(d):
    """each row's block: its segment in its run (a combined set's run, and the day)"""
    idx = np.arange(len(d["x"]))
    run = np.searchsorted(d["bounds"], idx, side="right") if "bounds" in d else np.zeros(len(idx), dtype=int)
    day = d["t"] // 86_400_000
    return np.unique(np.char.add(np.char.add(d["seg"].astype(str), "|"), (run * 100_000 + day).astype(str)),
                     return_inverse=True)[1]


def interval(diff, block, rng):
    """the mean of `diff` and its 95% paired block-bootstrap interval"""
    sums, counts = np.bincount(block, diff), np.bincount(block)
    keep = counts > 0
    sums, counts = sums[keep], counts[keep]
    draws = rng.integers(0, len(sums), (DRAWS, len(sums)))
    means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(lo), float(hi), len(sums)


def differences(pred, hist, d, rows, block, rng):
    """per horizon, (horizon, mean, lo, hi, blocks): forecasts `pred`'s absolute error minus the
    historical average `hist`'s over `rows` of data set `d`, with its interval (`interval`)"""
    return [(h, *interval(np.abs(pred[rows, k] - d["y"][rows, k]) - np.abs(hist[rows, k] - d["y"][rows, k]),
                          block[rows], rng)) for k, h in enumerate(T.HORIZONS)]


def main():
    _, _, _, tests, hist = T.congestion_experiment_data(T.HERE / "data")
    for name in ("congestion_fp32", "congestion_small"):
        report(name, tests, hist)


def report(name, tests, hist):
    sess = T.session(T.MODELS / "onnx" / f"{name}.onnx")
    rng = np.random.default_rng(0)
    print(f"MAE of {name} minus the historical average's (km/h), [95% block-bootstrap interval]")
    for src, d in tests.items():
        model = T.run(sess, d["x"]).astype(np.float64)
        scored, congested = T.scored_rows(d)
        block = blocks(d)
        for minutes, rows in (("all", scored), ("congested", congested)):
            cells = []
            for h, mean, lo, hi, n in differences(model, hist[src], d, rows, block, rng):
                verdict = "model better" if hi < 0 else "historical better" if lo > 0 else "not resolved"
                cells.append(f"+{h} {mean:+.2f} [{lo:+.2f}, {hi:+.2f}] {verdict}")
            print(f"{src:12} {minutes:9} ({n} segment-runs): " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
