"""An experiment, not a deployed model: do the congestion forecasters gain from the last minutes
one by one (features.py's `*_m{k}` and the neighbours' `*_1m`, which the incident detector
reads), beside their 18 inputs? Both forecaster shapes (`congestion_small` 16, `congestion_fp32`
64-64) are trained as train.py trains them (the same weight seed, loss and epochs; the shuffles
drawn by a fresh generator of train.py's seed for each fit, so `congestion_small`'s numbers
differ a little from the deployed file's, whose generator continued from `congestion_fp32`'s), once on the 18
columns and once on the incident detector's 44, and scored on the held-out sets: MAE (km/h) at
+15 / +30 / +60 minutes over all minutes and over congested ones (below 70% of the free speed
now or at the horizon), beside the historical average and persistence in congested minutes.

    cd models/train && ../../.venv/bin/python congestion_inputs_experiment.py   # after sumo_scenarios.py, about 6 minutes
"""

import numpy as np

import train as T

SHUFFLE_SEED = 7  # train.py's generator's seed


def main():
    train, visit, (change, ok, r_mu, r_sd), tests, hist = T.congestion_experiment_data(T.HERE / "data")
    for label, kept in (("former 18", T.KEPT_INDEX), ("with recent", T.INCIDENT_KEPT_INDEX)):
        mu, sd = T.moments(T.transform(train["x"][visit], 0.0, kept))
        x_train = (T.transform(train["x"], 0.0, kept) - mu) / sd
        for sizes in ([len(kept), 16, 3], [len(kept), 64, 64, 3]):
            net = T.MLP(sizes, np.random.default_rng(11))
            T.fit(net, x_train[ok], (change[ok] - r_mu) / r_sd, T.huber, np.random.default_rng(SHUFFLE_SEED), epochs=10)
            for src, d in tests.items():
                d_ok, congested = T.scored_rows(d)
                pred = T.forecast(net, d, mu, sd, r_mu, r_sd, kept)
                print(f"{label:12} {str(sizes):16} {src:12} all {T.maes(pred, d, d_ok)} cong {T.maes(pred, d, congested)} | "
                      f"HA cong {T.maes(hist[src], d, congested)} pers cong {T.maes(T.persistence(d), d, congested)}", flush=True)


if __name__ == "__main__":
    main()
