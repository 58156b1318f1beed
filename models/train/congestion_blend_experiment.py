"""An experiment, not a deployed model: does a blend of the deployed `congestion_fp32` and the
historical average, w * model + (1 - w) * historical average, beat the historical average in
congested minutes where the forecaster alone loses to it (`highway100` at +30 and +60, the
simulator at +60)? Two ways of choosing w:

- on the training rows, per horizon: one w for every row (`fixed`), or one for rows congested
  now (speed_5m below 70% of the free speed) and one for the others (`by state`), each the w of
  the grid (0, 0.1, ..., 1) with the least MAE there. A training row's historical average is
  never built from its own day or scenario (congestion_profile_experiment.py's folds), but the
  forecaster's error there is in-sample, which favours the forecaster;
- in hindsight on a held-out set (`--hindsight`): every w of the grid, scored on that set. No
  deployable rule can do better than the best of these.

    cd models/train && ../../.venv/bin/python congestion_blend_experiment.py [--hindsight]   # after sumo_scenarios.py, ~3 minutes

On 2026-12-06 the training rows chose w = 1 at every horizon (the forecaster alone) and, by
state, 0.9 at +30 and +60 for rows congested now: `highway100`'s congested MAE at +30 / +60
went from 20.51 / 20.72 to 20.48 / 20.65, against the historical average's 20.20 / 19.80 (the
simulator's +60: 18.11 -> 18.08 against 17.95). In hindsight, the best w on `highway100`'s
congested minutes is 0.4-0.5 at +30 (20.12, just below the historical average's 20.20) and 0
at +60: every blend of the grid there is worse than the historical average alone (19.84 at w = 0.1, 20.72
at 1). On the simulator's congested minutes the best is 0.3-0.4 at +60 (17.90 against 17.95).
So a linear blend does not close the gap at +60: what the forecaster adds there makes the
historical average worse. Not deployed (the stream has no historical-average table either:
congestion_profile_experiment.py).
"""

import sys

import numpy as np

import congestion_profile_experiment as P
import train as T

GRID = np.round(np.arange(0, 1.01, 0.1), 2)


def congested_now(d):
    return d["x"][:, 1] < 0.7 * np.maximum(d["x"][:, T.FREE_INDEX], 1.0)


def blend(model, history, w):
    return w * model + (1 - w) * history


def least(model, history, y, rows):
    """the w of GRID with the least MAE over `rows`, per horizon"""
    errors = np.array([np.abs(blend(model[rows], history[rows], w) - y[rows]).mean(axis=0) for w in GRID])
    return GRID[errors.argmin(axis=0)]


def main(hindsight):
    sess = T.session(T.MODELS / "onnx" / "congestion_fp32.onnx")
    train, _, _, tests, hist, (sim_train, sumo_train) = T.congestion_experiment_data(T.HERE / "data", with_runs=True)
    train_hist = P.training_history(sim_train, sumo_train)
    model = T.run(sess, train["x"]).astype(np.float64)
    ok, _ = T.scored_rows(train)
    now = congested_now(train)
    fixed = least(model, train_hist, train["y"], ok)
    w_free, w_congested = least(model, train_hist, train["y"], ok & ~now), least(model, train_hist, train["y"], ok & now)
    print(f"chosen on the training rows: fixed {fixed}; by state: free now {w_free}, congested now {w_congested}")
    for src, d in tests.items():
        d_ok, congested = T.scored_rows(d)
        m = T.run(sess, d["x"]).astype(np.float64)
        by_state = np.where(congested_now(d)[:, None], blend(m, hist[src], w_congested), blend(m, hist[src], w_free))
        preds = {"forecaster": m, "historical average": hist[src], "persistence": T.persistence(d),
                 "blend, fixed": blend(m, hist[src], fixed), "blend, by state": by_state}
        if hindsight:
            preds.update({f"blend, w {w}": blend(m, hist[src], w) for w in GRID[1:-1]})
        for name, p in preds.items():
            print(f"{src:12} {name:20} all {T.maes(p, d, d_ok)} | congested {T.maes(p, d, congested)}", flush=True)


if __name__ == "__main__":
    main("--hindsight" in sys.argv[1:])
