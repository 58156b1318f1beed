"""An experiment, not a deployed model: do the congestion forecasters beat the historical
average in congested minutes if they train on more of the simulator's days? Both forecasters
(`congestion_fp32`, 64-64, and `congestion_small`, 16) are trained as train.py trains them (the
same inputs, weight seed, Huber loss, epochs, and a fresh shuffle generator of train.py's seed
for each), once on train.py's training set (the simulator's 21 days, seed 1) and once with the
simulator's 56 days before them added (`generate.py --only more`, seed 3: 77 days). SUMO's
training scenarios are the same in both, repeated to the same share of an epoch
(`T.epoch_rows`). MAE (km/h) at +15 / +30 / +60 minutes on each held-out set, over all minutes
and over congested ones, beside persistence and the historical average; the simulator's
historical average from the same days as the forecaster (21 or 77).

    .venv/bin/python models/train/generate.py --only more                   # about 3 minutes
    cd models/train && ../../.venv/bin/python congestion_days_experiment.py  # about 15 minutes

On 2026-12-07 (MAE in congested minutes at +15 / +30 / +60, 21 days -> 77 days; the historical
average from the same days in brackets): fp32 on the simulator 10.78 / 17.74 / 18.11 [18.48 /
18.35 / 17.95] -> 10.34 / 17.47 / 17.92 [18.10 / 17.97 / 17.73]: better, and so is the
historical average, which stays ahead at +60 (by 0.16 before, 0.18 after). Over all minutes the
simulator gains at every horizon (+60: 1.88 -> 1.73), but fp32 loses on every SUMO road at
+60 in congested minutes (`freeway120` 23.50 -> 24.30, now behind the historical average's
24.26; `highway100` 18.73 -> 19.05; SUMO's share of an epoch is the same, its rows repeated 17 times
instead of 5). small: the simulator +60 18.04 [17.95] -> 18.22 [17.73]. More simulator days do not
close the gap; not deployed.
"""

import numpy as np

import train as T

SHUFFLE_SEED = 7  # train.py's generator's seed


def fitted(sizes, train, visit):
    """a forecaster of `sizes` trained as train.py trains it on `train` (the rows `visit`);
    (net, mu, sd, r_mu, r_sd)"""
    change, ok, r_mu, r_sd = T.congestion_targets(train, visit)
    mu, sd = T.moments(T.transform(train["x"][visit]))
    x = (T.transform(train["x"]) - mu) / sd
    net = T.MLP(sizes, np.random.default_rng(11))
    T.fit(net, x[ok], (change[ok] - r_mu) / r_sd, T.huber, np.random.default_rng(SHUFFLE_SEED), epochs=10)
    return net, mu, sd, r_mu, r_sd


def main():
    data = T.HERE / "data"
    sim_train, sim_more, test = T.load(data / "train"), T.load(data / "more"), T.load(data / "test")
    sumo_train, sumo_tests, roads = T.sumo_runs(data)
    tests = {"simulator": test, **{f: T.combine(runs) for f, runs in sumo_tests.items()}}
    sim_all = T.combine([sim_more, sim_train])
    for label, sim in (("21 days", sim_train), ("77 days", sim_all)):
        train, visit, repeat = T.training_set(sim, sumo_train)
        print(f"== {label}: {len(train['x'])} rows, SUMO repeated {repeat}x", flush=True)
        history = {src: T.held_out_history(src, d, sim, sumo_tests, roads) for src, d in tests.items()}
        for name, sizes in (("fp32", [len(T.KEPT), 64, 64, 3]), ("small", [len(T.KEPT), 16, 3])):
            net, mu, sd, r_mu, r_sd = fitted(sizes, train, visit)
            for src, d in tests.items():
                d_ok, congested = T.scored_rows(d)
                pred = T.forecast(net, d, mu, sd, r_mu, r_sd)
                print(f"{label} {name:5} {src:12} all {T.maes(pred, d, d_ok)} "
                      f"(persistence {T.maes(T.persistence(d), d, d_ok)}, historical average "
                      f"{T.maes(history[src], d, d_ok)}) | congested {T.maes(pred, d, congested)} "
                      f"(historical average {T.maes(history[src], d, congested)})", flush=True)


if __name__ == "__main__":
    main()
