"""Where the deployed incident rules' false alarms on the held-out SUMO scenarios come from: each
false alert (an onset in incident-free minutes, as train.py's detection_metrics counts them) is
given the first of these causes that applies, from what sumo_scenarios.py drew for its scenario:

- a slowdown without incident (a variable speed limit) on its segments or up to 2 upstream, while
  it lasts and 15 minutes after (its queue);
- a failing loop on the alarmed segment, while it fails and 15 minutes after;
- near an incident: at most 2 segments from one while it lasts or clears (its queue, or an alert
  that opened before the incident's segment alarmed);
- at the on-ramp's merge (segments 2-4 of a road with ramps);
- demand at or over capacity elsewhere;
- none of these.

    cd models/train && ../../.venv/bin/python false_alarm_causes.py   # after train.py (about a minute)
"""

from __future__ import annotations

import collections
import json
import pathlib

import numpy as np

import train as T

HERE = pathlib.Path(T.__file__).resolve().parent  # the data sits beside train.py
AFTER_S = 900  # a slowdown's or a failing loop's queue: 15 minutes after it ends


def cause(r, i, near):
    meta = r["meta"]
    seg = int(r["seg"][i].rsplit("-", 1)[1])
    t = (r["t"][i] - meta["start_ms"]) / 1000  # seconds from the scenario's start to the window's end
    for s in meta["slowdowns"]:
        if s["start_s"] <= t <= s["end_s"] + AFTER_S and min(s["segments"]) - 2 <= seg <= max(s["segments"]):
            return "a slowdown without incident, or its queue"
    f = meta["detector_fault"]
    if f and f["segment"] == seg and f["start_s"] <= t <= f["start_s"] + f["duration_s"] + AFTER_S:
        return f"a failing loop ({f['kind']})"
    if near[i]:
        return "near an incident"
    if meta["ramps"] and 2 <= seg <= 4:
        return "at the on-ramp's merge"
    if meta["demand_scale"] >= 1.0:
        return "demand at or over capacity"
    return "none of these"


def main():
    metrics = json.loads((T.MODELS / "metrics.json").read_text())
    e = metrics["incident"]["models"]["incident_fp32"]
    t1, t2, t3 = (metrics["incident"]["california7_thresholds"][k] for k in ("t1_occdf", "t2_occrdf", "t3_docc"))
    sess = T.session(T.MODELS / "onnx" / "incident_fp32.onnx")
    rules = T.deployed_rules(lambda r: T.run(sess, r["x"])[:, 0], e["threshold"], e["open_at_once"], (t1, t2, t3))
    _, tests, _ = T.sumo_runs(HERE / "data")
    for name, rule in rules.items():
        counts = collections.defaultdict(collections.Counter)
        for family, runs in tests.items():
            for r in runs:
                onset = T.alert_onsets(r, rule(r), T.RULE_JOIN) & ~r["grace"] & ~r["closure_site"]
                near = T.near_incident(r)
                for i in np.flatnonzero(onset):
                    counts[cause(r, i, near)][family] += 1
        total = sum(sum(c.values()) for c in counts.values())
        print(f"{name}: {total} false alerts on the held-out SUMO scenarios")
        for c, by_family in sorted(counts.items(), key=lambda kv: -sum(kv[1].values())):
            print(f"  {sum(by_family.values()):4d}  {c}  ({', '.join(f'{f} {n}' for f, n in sorted(by_family.items()))})")


if __name__ == "__main__":
    main()
