"""Whether what train.py's `alert_rule` leaves out of the `alert` stage acts on the runs the cards
evaluate: the stage's staleness (a location `stale_after` without a row is resolved; 15 minutes,
the default, in deploy/local.yaml's incident rules) and its storm limit (`storm.max_open` alerts
open at once; 6 there). For each held-out SUMO family and the simulator's test week, and each
deployed rule (`train.deployed_rules`): the longest gap between a segment's rows, and the most
alerts open at once in one run (alarms through `alert_rule`, joined as the stage joins them: rows
by minute, then segment; an alarm starting at most `RULE_JOIN` segments from an alarmed segment
joins that segment's alert; past `max_open`, the storm would have acted). Exits 1 if either
could act, as then the cards' `alert rule` rows would not count what the deployed stage does.

    cd models/train && ../../.venv/bin/python mirror_check.py   # after train.py (seconds)
"""

from __future__ import annotations

import json
import sys

import numpy as np

import train as T

STALE_AFTER_MIN = 15  # the alert stage's default `stale_after`
STORM_MAX_OPEN = 6  # deploy/local.yaml's `storm.max_open` of the incident rules


def longest_gap_min(r):
    """The longest time between two rows of one segment, minutes."""
    order = np.lexsort((r["t"], r["seg"]))
    t, seg = r["t"][order], r["seg"][order]
    same = seg[1:] == seg[:-1]
    return float((np.diff(t)[same]).max(initial=0) / 60_000)


def most_open(r, alarm):
    """The most alerts open at once in run `r` whose rows are alarmed as `alarm` says."""
    seg, near, member, alerts, opened, most = r["seg"], {}, {}, {}, 0, 0
    for i in np.lexsort((seg, r["t"])):  # by minute, then segment
        s, a = seg[i], bool(alarm[i])
        if a and s not in member:
            if s not in near:
                near[s] = sorted(T.neighbourhood(s, r["graph"], T.RULE_JOIN) - {s})
            joined = next((member[n] for n in near[s] if n in member), None)
            if joined is None:
                opened += 1
                joined = opened
                alerts[joined] = set()
            alerts[joined].add(s)
            member[s] = joined
        elif not a and s in member:
            alert = member.pop(s)
            alerts[alert].discard(s)
            if not alerts[alert]:
                del alerts[alert]
        most = max(most, len(alerts))
    return most


def main():
    metrics = json.loads((T.MODELS / "metrics.json").read_text())
    e = metrics["incident"]["models"]["incident_fp32"]
    c = metrics["incident"]["california7_thresholds"]
    sess = T.session(T.MODELS / "onnx" / "incident_fp32.onnx")
    rules = T.deployed_rules(lambda r: T.run(sess, r["x"])[:, 0], e["threshold"], e["open_at_once"],
                             (c["t1_occdf"], c["t2_occrdf"], c["t3_docc"]))
    _, tests, _ = T.sumo_runs(T.HERE / "data")
    sets = {"simulator": [T.load(T.HERE / "data" / "test")], **tests}
    acts = False
    for family, runs in sets.items():
        gap = max(longest_gap_min(r) for r in runs)
        acts |= gap > STALE_AFTER_MIN
        most = {name.split(",")[0]: max(most_open(r, rule(r)) for r in runs) for name, rule in rules.items()}
        # with max_open open, the next alarm that would open one joins the storm summary instead
        acts |= max(most.values()) > STORM_MAX_OPEN
        cells = ", ".join(f"{name} {n}" for name, n in most.items())
        print(f"{family:12s} longest gap {gap:.1f} min; most alerts open at once: {cells}", flush=True)
    print(f"staleness ({STALE_AFTER_MIN} min) and the storm limit ({STORM_MAX_OPEN}) "
          f"{'COULD ACT: the mirror is not exact' if acts else 'never act on these runs'}")
    sys.exit(1 if acts else 0)


if __name__ == "__main__":
    main()
