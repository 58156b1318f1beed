"""Each detectable held-out incident's time to detect, through the deployed rules, paired
between the incident detector and California #7: where the card's mean times differ, which
incidents make the difference. After train.py (it reads models/metrics.json):

    cd models/train && ../../.venv/bin/python detection_times.py   # about a minute

Two ways to count a detection, both printed:
- `card`: the first minute the incident's segment has an open alert while the incident lasts
  (train.py's `detection_metrics`, the cards' and the README's numbers). An alert that opened
  before the incident and is still open when it starts detects it at its first minute.
- `alert starts`: only an alarm that starts on the incident's segment while the incident lasts
  detects it, so an alarm that was on before the incident (a queue at a ramp's merge, say)
  detects nothing; a detector whose alert stays open through the incident, or is in its quiet
  time after one, misses it. An alarm that starts then and joins a neighbour's open alert counts,
  as on the card (the alert it joins names its segment).

For each set: the incidents both detectors detect and their mean times there, on how many of
them each is sooner, the incidents only one detects, and the incidents where the two differ by
more than 3 minutes.
"""

from __future__ import annotations

import json

import numpy as np

import train as T

FAR_APART_MIN = 3.0  # a difference worth listing


def first_alerts(d, opened, starts_only):
    """{detectable incident's id: minutes from its start to its first detecting row, or None}: a
    row of its segment while it lasts with an open alert (`starts_only`: one whose alert opens
    there), as `T.first_alarm_minutes` counts the card's"""
    if starts_only:
        opened = T.alert_onsets(d, opened)
    return {inc["id"]: m for inc, m in zip(d["incidents"], T.first_alarm_minutes(d, opened)) if inc["detectable"]}


def main():
    m = json.loads((T.MODELS / "metrics.json").read_text())["incident"]
    e = m["models"]["incident_fp32"]
    t = m["california7_thresholds"]
    sess = T.session(T.MODELS / "onnx" / "incident_fp32.onnx")
    rules = T.deployed_rules(lambda r: T.run(sess, r["x"])[:, 0], e["threshold"], e["open_at_once"],
                             (t["t1_occdf"], t["t2_occrdf"], t["t3_docc"]))
    (model_name, model_rule), (cal_name, cal_rule) = rules.items()
    _, sumo_tests, _ = T.sumo_runs(T.HERE / "data")
    tests = {"simulator": T.load(T.HERE / "data" / "test"), **{f: T.combine(runs) for f, runs in sumo_tests.items()}}
    print(f"model: {model_name}; California #7: {cal_name}")
    for name, d in tests.items():
        opened = {"model": model_rule(d), "California #7": cal_rule(d)}
        for how, starts_only in (("card", False), ("alert starts", True)):
            a, b = (first_alerts(d, o, starts_only) for o in opened.values())
            both = [k for k in a if a[k] is not None and b[k] is not None]
            line = (f"{name} ({how}): {len(a)} detectable; both detect {len(both)}")
            if both:
                line += (f", mean minutes there model {np.mean([a[k] for k in both]):.2f} / California #7 "
                         f"{np.mean([b[k] for k in both]):.2f}, model sooner on {sum(a[k] < b[k] for k in both)}, "
                         f"later on {sum(a[k] > b[k] for k in both)}")
            only_a = [k for k in a if a[k] is not None and b[k] is None]
            only_b = [k for k in a if a[k] is None and b[k] is not None]
            line += f"; only the model {len(only_a)}, only California #7 {len(only_b)}"
            print(line)
            for k in both:
                if abs(a[k] - b[k]) > FAR_APART_MIN:
                    print(f"    {k}: model {a[k]:.2f}, California #7 {b[k]:.2f}")
            for k in only_a + only_b:
                print(f"    {k}: model {a[k] if a[k] is None else round(a[k], 2)}, California #7 "
                      f"{b[k] if b[k] is None else round(b[k], 2)}")


if __name__ == "__main__":
    main()
