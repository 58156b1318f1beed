"""An experiment, not a deployed model: does the congestion forecaster beat the historical
average in congested minutes if training weighs those minutes more? `congestion_fp32` (64-64)
is trained as train.py trains it (the same inputs, weight seed, Huber loss and epochs; the
shuffles from a fresh generator of train.py's seed, so weight 1 is the deployed file's network),
with the rows congested now or at a horizon (below 70% of the free speed, as the held-out
scoring defines them) weighted `W` times a free-flowing row. MAE (km/h) at +15 / +30 / +60
minutes on each held-out set, over all minutes and over congested ones, beside the historical
average and persistence.

    cd models/train && ../../.venv/bin/python congestion_weight_experiment.py [W ...]   # default 1 3 6; about 2 minutes per W

On 2026-12-06 (all minutes / congested minutes, fp32; the historical average in congested
minutes in brackets): weight 3 beats the historical average in congested minutes on
`highway100` at +30 (19.74 [20.20]; 20.51 at weight 1) but still not at +60 (19.95 [19.80];
20.72), and ties it on the simulator at +60 (17.93 [17.95]); it pays 4-50% more error over all
minutes on every set and horizon (the simulator +60: 2.19 against 1.88, persistence 2.29), and
at weight 6 it loses to persistence over all minutes on five sets at some horizon. So the
deployed forecasters keep their unweighted loss.
"""

import sys

import numpy as np

import train as T

SHUFFLE_SEED = 7  # train.py's generator's seed


def weighted_huber(out, y, w, delta=1.0):
    """train.py's Huber loss with a weight per row (`w`, shape [rows, 1])"""
    d = out - y
    a = np.abs(d)
    w = np.ones((len(d), 1)) if w is None else w
    norm = w.sum() * d.shape[1]
    value = float((w * np.where(a <= delta, 0.5 * d * d, delta * (a - 0.5 * delta))).sum() / norm)
    return value, w * np.clip(d, -delta, delta) / norm


def main():
    weights_tried = [float(w) for w in sys.argv[1:]] or [1.0, 3.0, 6.0]
    train, visit, (change, ok, r_mu, r_sd), tests, hist = T.congestion_experiment_data(T.HERE / "data")
    mu, sd = T.moments(T.transform(train["x"][visit]))
    x_train = (T.transform(train["x"]) - mu) / sd
    _, congested_train = T.scored_rows(train)
    for w in weights_tried:
        net = T.MLP([len(T.KEPT), 64, 64, 3], np.random.default_rng(11))
        T.fit(net, x_train[ok], (change[ok] - r_mu) / r_sd, weighted_huber, np.random.default_rng(SHUFFLE_SEED),
              epochs=10, weights=np.where(congested_train[ok], w, 1.0))
        for src, d in tests.items():
            d_ok, congested = T.scored_rows(d)
            pred = T.forecast(net, d, mu, sd, r_mu, r_sd)
            print(f"weight {w:4} {src:12} all {T.maes(pred, d, d_ok)} (persistence {T.maes(T.persistence(d), d, d_ok)}) | "
                  f"congested {T.maes(pred, d, congested)} (historical average {T.maes(hist[src], d, congested)})", flush=True)


if __name__ == "__main__":
    main()
