"""Whether what train.py's `alert_rule` leaves out of the `alert` stage acts on the runs the cards
evaluate: the stage's staleness (a location `stale_after` without a row is resolved) and its storm
limit (`storm.max_open` alerts open at once), both read from deploy/local.yaml's incident rules
(`incident_alerts`, `california_alerts`; `stale_after` defaults to the stage's 15 minutes). For each held-out SUMO family and the simulator's test week, and each
deployed rule (`train.deployed_rules`): the longest gap between a segment's rows, and the most
alerts open at once in one run (alarms through `alert_rule`, joined as the stage joins them: rows
by minute, then segment; an alarm starting at most `RULE_JOIN` segments from an alarmed segment
joins that segment's alert; past `max_open`, the storm would have acted). Exits 1 if either
could act, as then the cards' `alert rule` rows would not count what the deployed stage does.

    cd models/train && ../../.venv/bin/python mirror_check.py   # after train.py (seconds)
"""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import yaml

import train as T

# train.deployed_rules' names of the rules, and the stages in deploy/local.yaml that run them
STAGES = {"incident_fp32": "incident_alerts", "California #7": "california_alerts"}
STALE_DEFAULT = "15m"  # the alert stage's default `stale_after` (operators/src/alert/config.rs)
UNITS_MIN = {"ms": 1 / 60_000, "s": 1 / 60, "m": 1, "h": 60, "d": 24 * 60}


def minutes(text):
    """A config duration (an integer and one unit: "15m", "250ms", "7d", as the stage reads
    them) in minutes."""
    m = re.fullmatch(r"(\d+)(ms|s|m|h|d)", text)
    if m is None:
        raise ValueError(f"a duration like 15m, 250ms or 7d, not {text!r}")
    return int(m[1]) * UNITS_MIN[m[2]]


def deployed_limits(path):
    """{rule name: (stale_after in minutes, storm.max_open or None)} of the incident rules `path`
    deploys."""
    stages = yaml.safe_load(path.read_text())["stages"]
    limits = {}
    for name, stage in STAGES.items():
        cfg = stages[stage]
        limits[name] = (minutes(str(cfg.get("stale_after", STALE_DEFAULT))), (cfg.get("storm") or {}).get("max_open"))
    return limits


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
    limits = deployed_limits(T.MODELS.parent / "deploy" / "local.yaml")
    sets = {"simulator": [T.load(T.HERE / "data" / "test")], **tests}
    acts = False
    for family, runs in sets.items():
        gap = max(longest_gap_min(r) for r in runs)
        most = {name.split(",")[0]: max(most_open(r, rule(r)) for r in runs) for name, rule in rules.items()}
        for name, n in most.items():
            stale_after, max_open = limits[name]
            acts |= gap > stale_after
            # with max_open open, the next alarm that would open one joins the storm summary instead
            acts |= max_open is not None and n > max_open
        cells = ", ".join(f"{name} {n}" for name, n in most.items())
        print(f"{family:12s} longest gap {gap:.1f} min; most alerts open at once: {cells}", flush=True)
    cells = "; ".join(f"{name}: stale_after {s:g} min, max_open {m}" for name, (s, m) in limits.items())
    print(f"deploy/local.yaml ({cells}): staleness and the storm limit "
          f"{'COULD ACT: the mirror is not exact' if acts else 'never act on these runs'}")
    sys.exit(1 if acts else 0)


if __name__ == "__main__":
    main()
