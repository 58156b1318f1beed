"""Scores the incident alerts of a pipeline run against the simulator's injected incidents.

usage: alert_report.py DATA_DIR [--json]   (DATA_DIR holds lake/ and ground_truth/)

Per incident-type rule: incidents detected (an alert opened on the incident's segment, or for
camera rules by a camera on it, or the segment joined an open alert (a rule with `join`: the
rule's events name each alert's members, models/train/feedback.py `joins`), between its start and its
end + 10 min), mean and median time to detect (alert open or join minus incident start,
minutes), and false alerts (opens that match no incident) per day. Alert events carry
`emitted_at` (processing time): the report also prints the spread between an alert's event time
and when it was emitted, for the record.
"""

import csv
import datetime as dt
import json
import os
import sys

import duckdb

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "models", "train"))
import feedback as FB  # noqa: E402

GRACE_MS = 10 * 60_000


def ms(s):
    return int(dt.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp() * 1000)


def main(data, as_json=False):
    truth = os.path.join(data, "ground_truth")
    incidents = [dict(r, start=ms(r["start"]), end=ms(r["end"])) for r in csv.DictReader(open(os.path.join(truth, "incidents.csv")))]
    segments = sorted(r["segment_id"] for r in csv.DictReader(open(os.path.join(truth, "road_graph.csv"))))
    camera_segment = {r["camera_id"]: segments[int(r["segment_index"])] for r in csv.DictReader(open(os.path.join(truth, "cameras.csv")))}
    report = json.load(open(os.path.join(truth, "report.json")))
    days = (report["end_ms"] - report["start_ms"]) / 86_400_000 if "end_ms" in report else 1.0
    con = duckdb.connect()
    rows = con.execute(
        f"SELECT rule, alert_type, location, epoch_ms(ts), locations FROM read_parquet('{data}/lake/alerts/**/*.parquet', hive_partitioning = true) "
        "WHERE status = 'open' ORDER BY ts"
    ).fetchall()
    # (rule, segment, time) of each segment's joining an alert (a rule with `join`; feedback.py
    # `joins` reads the members from the rule's events)
    events = con.execute(
        f"SELECT epoch_ms(ts), alert_id, location, evidence, rule FROM read_parquet('{data}/lake/alerts/**/*.parquet', hive_partitioning = true) "
        "WHERE actor = 'rule' AND evidence LIKE '%\"members\"%' ORDER BY ts"
    ).fetchall()
    rule_of = {e[1]: e[4] for e in events}
    joined = [(rule_of[a], seg, t) for a, seg, t in FB.joins([e[:4] for e in events])]
    out = {}
    for rule in sorted({r[0] for r in rows if r[1] in ("incident", "stalled_vehicle")}):
        opens = [r for r in rows if r[0] == rule]
        detected, ttd, matched = 0, [], set()
        for inc in incidents:
            first = None
            for i, (_, kind, loc, t, n) in enumerate(opens):
                seg = camera_segment.get(loc, loc) if kind == "stalled_vehicle" else loc
                if seg == inc["segment_id"] and inc["start"] <= t <= inc["end"] + GRACE_MS:
                    matched.add(i)
                    first = t if first is None else min(first, t)
            for r, seg, t in joined:
                if r == rule and seg == inc["segment_id"] and inc["start"] <= t <= inc["end"] + GRACE_MS:
                    first = t if first is None else min(first, t)
            if first is not None:
                detected += 1
                ttd.append((first - inc["start"]) / 60_000)
        false = [o for i, o in enumerate(opens) if i not in matched and o[2] != "*"]
        ttd.sort()
        out[rule] = {
            "incidents": len(incidents),
            "detected": detected,
            "detection_rate": round(detected / max(len(incidents), 1), 3),
            "mean_time_to_detect_min": round(sum(ttd) / len(ttd), 2) if ttd else None,
            "median_time_to_detect_min": round(ttd[len(ttd) // 2], 2) if ttd else None,
            "alerts": len(opens),
            "joined": sum(1 for j in joined if j[0] == rule),
            "storm_summaries": sum(1 for o in opens if o[2] == "*"),
            "false_alerts_per_day": round(len(false) / days, 2),
        }
    if as_json:
        print(json.dumps(out))
    else:
        for rule, m in out.items():
            print(f"{rule}: {m}")
    return out


if __name__ == "__main__":
    main(sys.argv[1], "--json" in sys.argv)
