"""Operator labels from a running pipeline's lake, for retraining the incident detector.

The control center stores every decision in the `feedback` table (alert id, rule, type,
location, decision, operator, when the alert opened). For incident alerts on road segments, the
last decision per alert is a label for the segment-minutes the alert covered:

- `acknowledged` or `resolved`: an operator confirmed an incident -> label 1;
- `false_alarm`: an operator rejected it -> label 0 (a hard negative the detector got wrong).

An alert of a rule with `join` also covers the segments that joined it (the rule's events in
the `alerts` table name them in their evidence). A rejection labels each of them 0 too, from
the minute it joined (a verdict on an alert the segment opened itself takes precedence); a confirmation labels only the segment the alert opened at (the verdict
does not say which of its segments the incident was on, and a queue's segments are no
incident).

The feature rows come from the same lake's `traffic_minutes` table through `features.py` (THE
feature definition the stream uses), so a label lands on exactly the rows the model scored.

    python models/train/feedback.py LAKE_DIR [ROAD_GRAPH_CSV]   # prints what it would add
    python models/train/train.py --feedback-lake LAKE_DIR ...     # adds it to the training set
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np

import features as F

HERE = pathlib.Path(__file__).resolve().parent
COVER_MS = 15 * 60_000  # the minutes after an alert opened that its verdict labels
CONFIRMED = {"acknowledged", "resolved"}


def verdicts(lake):
    """alert_id -> (segment_id, opened_at_ms, label) from the last decision per incident alert."""
    import pyarrow.dataset as ds

    root = pathlib.Path(lake) / "feedback"
    if not root.exists():
        return {}
    t = ds.dataset(root, format="parquet", partitioning="hive").to_table(
        columns=["ts", "alert_id", "alert_type", "location", "decision", "opened_at"]
    )
    last = {}
    for r in sorted(t.to_pylist(), key=lambda r: (r["ts"], r["alert_id"])):
        if r["alert_type"] != "incident" or r["location"] == "*":
            continue
        opened = int(r["opened_at"].timestamp() * 1000)
        last[r["alert_id"]] = (r["location"], opened, 1.0 if r["decision"] in CONFIRMED else 0.0)
    return last


def joins(events):
    """(alert_id, segment_id, ts) of each join in `events`, a rule's alert events as (ts,
    alert_id, location, evidence) in time order: with `join`, every event names the segment
    whose row made it (evidence `location`) and the alert's segments after it (`members`), so a
    segment joins at an event it made that has it among the members while its own previous
    event did not (the segment an alert opened at starts as a member). Each segment is judged
    by its own events only: the order of other segments' events in the same minute does not
    matter, and an alert whose first events are missing loses only those."""
    member, out = {}, []
    for ts, alert_id, location, evidence in events:
        try:
            e = json.loads(evidence)
            seg, now = e.get("location"), e.get("members")
        except (TypeError, ValueError, AttributeError):
            continue
        if not isinstance(seg, str) or not isinstance(now, list):
            continue
        key = (alert_id, seg)
        inside = seg in now
        if inside and not member.get(key, seg == location):
            out.append((alert_id, seg, ts))
        member[key] = inside
    return out


def joined(lake, alert_ids):
    """alert_id -> [(segment_id, joined_at_ms)] for the segments that joined those alerts (their
    rule's events in the lake's `alerts` table, `joins`)."""
    import pyarrow.dataset as ds

    root = pathlib.Path(lake) / "alerts"
    if not alert_ids or not root.exists():
        return {}
    t = ds.dataset(root, format="parquet", partitioning="hive").to_table(
        columns=["ts", "alert_id", "location", "evidence", "actor"]
    )
    rows = sorted((int(r["ts"].timestamp() * 1000), r["alert_id"], r["location"], r["evidence"])
                  for r in t.to_pylist() if r["alert_id"] in alert_ids and r["actor"] == "rule")
    out = {}
    for alert_id, seg, at in joins(rows):
        out.setdefault(alert_id, []).append((seg, at))
    return out


def operator_labels(lake, road_graph=None):
    """Feature rows and labels from the operators' verdicts in `lake` (a pipeline's lake dir).

    Returns {"x": float32 [n, len(F.FEATURES)], "label": float32 [n], "seg": [n], "t": int64 [n],
    "alerts": {"confirmed": k, "false_alarm": m}}; rows a later verdict also covers take it.
    """
    lake = pathlib.Path(lake)
    graph = F.read_graph(road_graph or HERE.parent.parent / "deploy" / "road_graph.csv")
    v = verdicts(lake)
    empty = {"x": np.zeros((0, len(F.FEATURES)), np.float32), "label": np.zeros(0, np.float32),
             "seg": np.array([], dtype=object), "t": np.zeros(0, np.int64),
             "alerts": {"confirmed": 0, "false_alarm": 0}}
    if not v:
        return empty
    m = F.read_minutes(lake / "traffic_minutes")
    x, _ = F.features(m["window_end_ms"], m["segment_id"], m["vehicles"], m["speed"], m["occupancy"], graph)
    t = np.asarray(m["window_end_ms"], dtype=np.int64)
    seg = np.array(m["segment_id"], dtype=object)
    label = np.full(len(t), np.nan, dtype=np.float32)
    # a rejected alert's joined segments are rejected with it; a verdict on an alert a segment
    # opened itself then takes precedence over one it only joined
    by_join = [(s, at, 0.0) for segs in joined(lake, {a for a, r in v.items() if r[2] == 0.0}).values() for s, at in segs]
    for covered in (by_join, list(v.values())):
        for seg_id, opened, y in sorted(covered, key=lambda r: r[1]):
            label[(seg == seg_id) & (t >= opened) & (t < opened + COVER_MS)] = y
    keep = ~np.isnan(label)
    counts = {"confirmed": sum(1 for r in v.values() if r[2] == 1.0),
              "false_alarm": sum(1 for r in v.values() if r[2] == 0.0)}
    return {"x": x[keep], "label": label[keep], "seg": seg[keep], "t": t[keep], "alerts": counts}


def main():
    lake = sys.argv[1]
    graph = sys.argv[2] if len(sys.argv) > 2 else None
    d = operator_labels(lake, graph)
    print(f"{lake}: {d['alerts']['confirmed']} confirmed and {d['alerts']['false_alarm']} rejected incident alerts "
          f"-> {len(d['label'])} labelled rows ({int(d['label'].sum())} positive)")


if __name__ == "__main__":
    main()
