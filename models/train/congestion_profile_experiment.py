"""An experiment, not a deployed model: does the congestion forecaster beat the historical
average in congested minutes when it is told the road's daily profile? The historical average
knows each segment's usual speed at each 15-minute slot, which the forecaster, reading only the
last minutes of the segment and its neighbours, never sees. Here `congestion_fp32`'s shape
(64-64) is trained as train.py trains it (the same inputs, weight seed, Huber loss and epochs;
the shuffles from a fresh generator of train.py's seed) twice: on its 18 inputs (the control),
and on those plus the profile, three more: the historical average at each horizon's target
time, as a change from speed_5m and a share of the free speed (as the targets are).

The profile a training row sees is never built from its own day or scenario, nor from
held-out data; a held-out row's is the baseline's own table:
- the simulator's training days: the historical average of the other training days (seven
  folds of three consecutive days; each day's from the other 18);
- a SUMO training scenario: its road's other training scenarios;
- a held-out set: the historical-average baseline's own table (train.py's
  `held_out_history`: the simulator's 21 training days; a SUMO road's other scenarios).

MAE (km/h) at +15 / +30 / +60 minutes on each held-out set over all minutes and over congested
ones (below 70% of the free speed now or at a horizon), beside the historical average and
persistence.

    cd models/train && ../../.venv/bin/python congestion_profile_experiment.py   # after sumo_scenarios.py, about 4 minutes

On 2026-12-06 (MAE in congested minutes, control -> with the profile; the historical average
in brackets): `highway100` 17.76 / 20.51 / 20.72 -> 17.87 / 20.52 / 20.08 [19.83 / 20.20 /
19.80], still behind the historical average at +30 and +60; the simulator at +60 18.11 -> 18.10
[17.95]. In congested minutes it gains at +60 on `freeway120` (21.82 -> 21.43), `motorway130`
and `urban70` and loses on both arterials; over all minutes it is worse on `arterial50`,
`arterial60` and `freeway120` at every horizon (`freeway120` +30: 10.15 -> 10.80) and better
on `highway100`. Knowing the profile does not make the forecaster match the historical average
where it loses to it. Not deployed. (A first run's folds were days of one weekday each, which
left a weekend row's profile only the other weekend day; its numbers were within 0.75 km/h of
these and led to the same reading.)

To deploy it, the stream would need the profile too: a table of each segment's mean speed per
15-minute slot (and weekend flag), built from the lake's history, read by the `features` stage
beside the road graph, with the feature parity test covering it. Not built.
"""

import numpy as np

import train as T

SHUFFLE_SEED = 7  # train.py's generator's seed
FOLDS = 7


def profile(d, history):
    """The profile inputs of data set `d` given its historical average `history` (km/h at each
    horizon), as the targets are (`speed_change`)."""
    return T.speed_change(d, history)


def simulator_history(sim):
    """Each simulator training row's historical average from the other days: FOLDS folds of
    consecutive days (three of the 21), so that every fold leaves days of each weekday and of
    the weekend to the others (the average keeps weekends apart)."""
    day = sim["t"] // 86_400_000
    days = np.unique(day)
    fold = np.searchsorted(days, day) * FOLDS // len(days)
    out = np.zeros((len(sim["x"]), len(T.HORIZONS)))
    for f in range(FOLDS):
        mine = fold == f
        out[mine] = T.historical_average(T.subset(sim, ~mine), T.subset(sim, mine))
    return out


def training_history(sim_train, sumo_train):
    """The historical average of every training row, in combine()'s order (the simulator, then
    each SUMO scenario), never from the row's own day or scenario: the simulator's from the
    other folds (`simulator_history`), a SUMO scenario's from its road's other training
    scenarios."""
    parts = [simulator_history(sim_train)]
    for run in sumo_train:
        others = [o for o in sumo_train if o["family"] == run["family"] and o is not run]
        parts.append(T.historical_average(T.combine(others), run, by_weekend=False))
    return np.concatenate(parts)


def main():
    train, visit, (change, ok, r_mu, r_sd), tests, hist, (sim_train, sumo_train) = \
        T.congestion_experiment_data(T.HERE / "data", with_runs=True)
    train_profile = profile(train, training_history(sim_train, sumo_train))
    assert len(train_profile) == len(train["x"])
    for label, extra in (("control (18)", None), ("with profile (21)", train_profile)):
        inputs = T.transform(train["x"]) if extra is None else np.hstack([T.transform(train["x"]), extra])
        mu, sd = T.moments(inputs[visit])
        net = T.MLP([inputs.shape[1], 64, 64, 3], np.random.default_rng(11))
        T.fit(net, (inputs[ok] - mu) / sd, (change[ok] - r_mu) / r_sd, T.huber, np.random.default_rng(SHUFFLE_SEED),
              epochs=10)
        for src, d in tests.items():
            d_ok, congested = T.scored_rows(d)
            pred = T.forecast(net, d, mu, sd, r_mu, r_sd, extra=None if extra is None else profile(d, hist[src]))
            print(f"{label:18} {src:12} all {T.maes(pred, d, d_ok)} (persistence {T.maes(T.persistence(d), d, d_ok)}, "
                  f"historical {T.maes(hist[src], d, d_ok)}) | congested {T.maes(pred, d, congested)} "
                  f"(historical {T.maes(hist[src], d, congested)}, persistence {T.maes(T.persistence(d), d, congested)})",
                  flush=True)


if __name__ == "__main__":
    main()
