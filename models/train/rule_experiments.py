"""Variants of the `incident_alerts` rule, tried on the deployed incident_fp32's scores: none of
them is deployed. Each is judged first on the training sets (the simulator's 21 days and the
trained SUMO families' training scenarios), where a variant has to pay its way, and shown on the
held-out sets beside the deployed rule. After train.py (it reads models/metrics.json and the
data of generate.py and sumo_scenarios.py):

    cd models/train && ../../.venv/bin/python rule_experiments.py

The deployed rule joins an alarm that starts at most `T.RULE_JOIN` segments from an alarmed
one to that segment's alert (`join` in deploy/*.yaml); every variant below joins the same way.

- `without join` and `joined within 1`: the deployed rule, each alarm an alert of its own, or
  joined within 1 segment.
- `+ California agreement`: a raise while California #7 alarms on the same segment and minute
  opens at once (as a score at `open_at_once` does).
- `speed gate G`: a score counts only while the segment's speed (the lower of its 1- and
  5-minute means) is below G of its free speed; `..., open_at_once exempt`: a score at or above
  `open_at_once` counts whatever the speed.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

import train as T

KEYS = ("detection_rate", "false_alarms_per_corridor_hour", "mean_time_to_detect_min")


def main():
    data = T.HERE / "data"
    m = json.loads((T.MODELS / "metrics.json").read_text())["incident"]
    thr, at_once = m["models"]["incident_fp32"]["threshold"], m["models"]["incident_fp32"]["open_at_once"]
    t = m["california7_thresholds"]
    cal_t = (t["t1_occdf"], t["t2_occrdf"], t["t3_docc"])
    sumo_train, sumo_tests, _ = T.sumo_runs(data)
    sets = {"train: simulator": [T.load(data / "train")]}
    for family in sorted({r["family"] for r in sumo_train}):
        sets[f"train: {family}"] = [r for r in sumo_train if r["family"] == family]
    sets["held out: simulator"] = [T.load(data / "test")]
    sets.update({f"held out: {f}": runs for f, runs in sumo_tests.items()})
    sess = T.session(T.MODELS / "onnx" / "incident_fp32.onnx")
    s1, s5 = T.F.FEATURES.index("speed_1m"), T.F.FEATURES.index("speed_5m")

    def rule(d, score):
        return T.alert_rule(d, score, thr, **T.MODEL_RULE, open_at_once=at_once)

    print("detection rate, false alarms per corridor-hour, mean time to detect (min)")
    for name, runs in sets.items():
        d = T.combine(runs)
        score = T.run(sess, d["x"])[:, 0].astype(np.float64)
        deployed = rule(d, score)
        cells = {"deployed": T.detection_metrics(d, deployed, T.RULE_JOIN),
                 "without join": T.detection_metrics(d, deployed),
                 "joined within 1": T.detection_metrics(d, deployed, 1)}
        agreed = np.where(T.california7(d, *cal_t) & (score >= thr), 1.0, score)
        cells["+ California agreement"] = T.detection_metrics(d, rule(d, agreed), T.RULE_JOIN)
        speed = np.minimum(d["x"][:, s1], d["x"][:, s5]) / np.maximum(d["x"][:, T.FREE_INDEX], 1.0)
        for gate in (0.9, 0.8, 0.7):
            gated = rule(d, np.where(speed < gate, score, 0.0))
            cells[f"speed gate {gate}"] = T.detection_metrics(d, gated, T.RULE_JOIN)
        for gate in (0.9, 0.85):
            gated = rule(d, np.where((speed < gate) | (score >= at_once), score, 0.0))
            cells[f"speed gate {gate}, open_at_once exempt"] = T.detection_metrics(d, gated, T.RULE_JOIN)
        line = [f"{k}: {' / '.join(str(v[key]) for key in KEYS)}" for k, v in cells.items()]
        print(f"{name}\n  " + "\n  ".join(line))


if __name__ == "__main__":
    main()
