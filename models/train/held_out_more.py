"""The card's held-out comparisons again on more held-out SUMO scenarios: the card holds out 4
scenarios of each trained road and 12 of each unseen one, too few to tell a minute to detect or
1-2 km/h of congested-minute MAE apart on one road (detection_times.py and
congestion_significance.py give the intervals). Here each road gets 12 more held-out scenarios
(new seeds: 25-36 of a trained road, 13-24 of an unseen one), never trained on, and the deployed
models and rules are compared with the baselines on the card's held-out scenarios and these
together. An experiment: the card, metrics.json and train.py stay on the card's held-out sets.

    .venv/bin/python models/train/sumo_scenarios.py --out models/train/data/more/sumo --first 25 --last 36 \\
        --family arterial60 --family urban70 --family highway100 --family motorway130   # ~11 minutes
    .venv/bin/python models/train/sumo_scenarios.py --out models/train/data/more/sumo --first 13 --last 24 \\
        --family arterial50 --family freeway120                                          # ~6 minutes
    cd models/train && ../../.venv/bin/python held_out_more.py                                  # ~2 minutes

A held-out scenario's historical average is its road's other scenarios (train.py's
`held_out_history`); an added scenario's is the road's scenarios of the card (all of them).
For each road: the incident detector's and California #7's detection rate, false alarms per
corridor-hour and mean minutes to detect through the deployed rules, their paired difference in
minutes to detect (detection_times.py's interval), and each forecaster's MAE minus the
historical average's with congestion_significance.py's interval.

On 2026-12-06, the card's held-out scenarios and 12 more per road (detection rate / false
alarms per corridor-hour / mean minutes to detect, model [California #7]; paired minutes to
detect, model minus California #7; congested-minute MAE minus the historical average's at +15 /
+30 / +60, fp32):

| road | scenarios | detectable | model | California #7 | paired minutes | fp32 vs historical average |
|---|---|---|---|---|---|---|
| arterial50 | 24 | 34 | 0.941 / 0.148 / 5.31 | 0.853 / 1.401 / 5.25 | +0.18 [-0.61, +1.07] | -3.02 / -2.37 / -2.39 |
| arterial60 | 16 | 23 | 1.0 / 0.051 / 4.72 | 1.0 / 0.996 / 4.93 | -0.22 [-1.26, +0.65] | -4.12 / -3.27 / -3.34 |
| freeway120 | 24 | 45 | 0.933 / 0.034 / 3.81 | 0.911 / 0.78 / 4.44 | -0.71 [-1.78, +0.51] | -5.26 / -1.73 / -0.75 [-2.02, +0.48] |
| highway100 | 16 | 26 | 0.923 / 0.017 / 3.19 | 0.885 / 0.593 / 3.23 | -0.86 [-2.32, +0.05] | -2.78 / -1.30 / -1.14 [-2.24, -0.12] |
| motorway130 | 16 | 35 | 0.971 / 0.084 / 3.48 | 0.971 / 0.978 / 3.63 | -0.15 [-1.21, +1.03] | -7.54 / -3.90 / -3.38 |
| urban70 | 16 | 18 | 1.0 / 0.0 / 3.13 | 1.0 / 0.526 / 2.91 | +0.22 [-0.11, +0.56] | -3.25 / -2.41 / -1.78 |

- Congestion: with more scenarios, the card's gaps close. `congestion_fp32` has the lower
  congested-minute MAE than the historical average on every road at every horizon, with an
  interval below zero everywhere but `freeway120` +60. On the card's 4 `highway100`
  scenarios it was behind at +30 and +60 (+0.31, +0.92). `congestion_small` (deployed) leads
  everywhere too, but within the noise on `highway100` at +30 and +60 (-0.54 [-1.45, +0.26],
  -0.35 [-1.54, +0.79]) and `freeway120` at +60 (-0.52 [-1.79, +0.73]).
- Incidents: more scenarios make the detector look worse than the card does. On the card's 4
  scenarios of a trained road it found 100% of 2-8 detectable incidents. Here it finds 92.3%
  on `highway100`, 94.1% on `arterial50` and 93.3% on `freeway120`, under the issue's 95%
  (California #7 is lower on all three). `arterial50` raises 0.148 false alarms per
  corridor-hour, over the 0.1 target (California #7: 1.401). Its mean time to detect is later
  than California #7's on `arterial50` and `urban70`, sooner on the other four, and no paired
  difference is outside the noise.
"""

import numpy as np

import congestion_significance as S
import detection_times as D
import train as T

KEYS = ("detection_rate", "false_alarms_per_corridor_hour", "mean_time_to_detect_min")


def history(family, card, more, roads):
    """the historical average of `card`'s runs (the card's: `T.held_out_history`) then `more`'s
    (the road's scenarios of the card, all of them), as combine() orders them"""
    return np.concatenate([T.held_out_history(family, None, None, {family: card}, roads)]
                          + [T.historical_average(T.combine(roads[family]), r, by_weekend=False) for r in more])


def main():
    data = T.HERE / "data"
    _, card_tests, roads = T.sumo_runs(data)
    _, more_tests, _ = T.sumo_runs(data / "more")
    rules = D.deployed()
    forecasters = {n: T.session(T.MODELS / "onnx" / f"{n}.onnx") for n in ("congestion_fp32", "congestion_small")}
    rng = np.random.default_rng(0)
    for family in sorted(more_tests):
        card, more = card_tests[family], more_tests[family]
        for label, extra in (("card's held-out", []), ("with 12 more", more)):
            runs = card + extra
            d = T.combine(runs)
            n_inc = sum(i["detectable"] for i in d["incidents"])
            print(f"== {family}, {label}: {len(runs)} scenarios, {n_inc} detectable incidents", flush=True)
            opened = {name: rule(d) for name, rule in rules.items()}
            for name, o in opened.items():
                c = T.detection_metrics(d, o, T.RULE_JOIN)
                print(f"  {name}: {' / '.join(str(c[k]) for k in KEYS)}")
            _, _, both, difference = D.paired(d, *opened.values(), False, rng)
            if difference:
                diff, lo, hi = difference
                print(f"  minutes to detect, model minus California #7 over the {len(both)} both find: "
                      f"{diff:+.2f} [95%: {lo:+.2f}, {hi:+.2f}]")
            hist = history(family, card, extra, roads)
            _, congested = T.scored_rows(d)
            block = S.blocks(d)
            for name, sess in forecasters.items():
                pred = T.run(sess, d["x"]).astype(np.float64)
                diffs = S.differences(pred, hist, d, congested, block, rng)
                cells = [f"+{h} {mean:+.2f} [{lo:+.2f}, {hi:+.2f}]" for h, mean, lo, hi, _ in diffs]
                n = diffs[0][4]
                print(f"  {name} minus historical average, congested minutes ({n} segment-runs): {' | '.join(cells)}",
                      flush=True)


if __name__ == "__main__":
    main()
