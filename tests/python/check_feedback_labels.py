"""Operator verdicts become incident labels for retraining (models/train/feedback.py), checked on
a real pipeline run: the main job's traffic_minutes and ground truth, plus a feedback table with
the control center's columns holding crafted decisions, and the rule events (`join`) of a
rejected alert that two segments joined, one of them twice, its same-minute events stored out of
order, and of a rejected alert whose opening event is missing.

usage: check_feedback_labels.py DATA_DIR   (DATA_DIR holds lake/ and ground_truth/)
"""

import csv
import datetime as dt
import json
import os
import pathlib
import sys
import tempfile

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "models" / "train"))
import feedback as FB  # noqa: E402

MIN = 60_000


def ms(s):
    return int(dt.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp() * 1000)


def main(data):
    data = pathlib.Path(data)
    incidents = [dict(r, start=ms(r["start"]), end=ms(r["end"])) for r in csv.DictReader(open(data / "ground_truth" / "incidents.csv"))]
    assert incidents, "the main job injects incidents"
    inc = incidents[0]
    busy = {i["segment_id"] for i in incidents}
    free = [s for s in sorted(r["segment_id"] for r in csv.DictReader(open(data / "ground_truth" / "road_graph.csv"))) if s not in busy]
    quiet, joiner, rejoiner, host5, joiner5, host9, joiner9 = free[:7]
    t_quiet = inc["start"] + 3 * 3_600_000  # an hour with no incident on that segment
    other = incidents[1] if len(incidents) > 1 else inc
    ts = lambda v: dt.datetime.fromtimestamp(v / 1000, dt.timezone.utc)  # noqa: E731
    # (ts, alert_id, alert_type, location, decision, opened_at): a confirmed incident (two
    # decisions, the last wins), a rejected alarm, one acknowledged then rejected, a camera alert
    decisions = [
        (inc["start"] + 10 * MIN, "incident_model:A1", "incident", inc["segment_id"], "acknowledged", inc["start"] + 2 * MIN),
        (inc["start"] + 40 * MIN, "incident_model:A1", "incident", inc["segment_id"], "resolved", inc["start"] + 2 * MIN),
        (t_quiet + 5 * MIN, "incident_model:A2", "incident", quiet, "false_alarm", t_quiet),
        (other["start"] + 5 * MIN, "california7:A3", "incident", other["segment_id"], "acknowledged", other["start"] + 20 * MIN),
        (other["start"] + 9 * MIN, "california7:A3", "incident", other["segment_id"], "false_alarm", other["start"] + 20 * MIN),
        (inc["start"] + 5 * MIN, "stalled_vehicle:A4", "stalled_vehicle", "cam-001", "acknowledged", inc["start"]),
        (t_quiet + 45 * MIN, "incident_model:A5", "incident", host5, "false_alarm", t_quiet + 30 * MIN),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        lake = pathlib.Path(tmp)
        os.symlink(data / "lake" / "traffic_minutes", lake / "traffic_minutes")
        (lake / "feedback").mkdir()
        ts_type = pa.timestamp("ms", tz="UTC")
        table = pa.table({
            "ts": pa.array([ts(d[0]) for d in decisions], ts_type),
            "alert_id": [d[1] for d in decisions], "rule": [d[1].split(":")[0] for d in decisions],
            "alert_type": [d[2] for d in decisions], "location": [d[3] for d in decisions],
            "decision": [d[4] for d in decisions], "operator": ["op.test"] * len(decisions),
            "comment": [""] * len(decisions),
            "opened_at": pa.array([ts(d[5]) for d in decisions], ts_type),
            "value": [0.97] * len(decisions), "threshold": [0.96] * len(decisions),
        })
        pq.write_table(table, lake / "feedback" / "part-0.parquet")
        # the rule's events (ts, alert, where it opened, the segment that made it, members after):
        # A2 opens at `quiet`; `joiner` joins at +2; `rejoiner` joins at +4, leaves at +6 and
        # joins again at +20, in the minute `joiner` leaves (stored before it, as if taken in
        # the other order); A5's opening event is missing, `joiner5` joins at +40; A9 is judged
        # by nobody
        a2 = "incident_model:A2"
        events = [
            (t_quiet, a2, quiet, quiet, [quiet]),
            (t_quiet + 2 * MIN, a2, quiet, joiner, [quiet, joiner]),
            (t_quiet + 4 * MIN, a2, quiet, rejoiner, [quiet, joiner, rejoiner]),
            (t_quiet + 6 * MIN, a2, quiet, rejoiner, [quiet, joiner]),
            (t_quiet + 20 * MIN, a2, quiet, joiner, [quiet, rejoiner]),
            (t_quiet + 20 * MIN, a2, quiet, rejoiner, [quiet, joiner, rejoiner]),
            (t_quiet + 40 * MIN, "incident_model:A5", host5, joiner5, [host5, joiner5]),
            (t_quiet + 2 * MIN, "incident_model:A9", host9, joiner9, [host9, joiner9]),
        ]
        (lake / "alerts").mkdir()
        pq.write_table(pa.table({
            "ts": pa.array([ts(e[0]) for e in events], ts_type), "alert_id": [e[1] for e in events],
            "location": [e[2] for e in events], "status": ["update"] * len(events),
            "evidence": [json.dumps({"location": e[3], "members": e[4]}) for e in events],
            "actor": ["rule"] * len(events),
        }), lake / "alerts" / "part-0.parquet")
        got = FB.operator_labels(lake, data / "ground_truth" / "road_graph.csv")

    assert got["alerts"] == {"confirmed": 1, "false_alarm": 3}, got["alerts"]
    con = duckdb.connect()
    q = f"SELECT segment_id, epoch_ms(window_end) FROM read_parquet('{data}/lake/traffic_minutes/**/*.parquet', hive_partitioning = true) WHERE segment_id = ? AND epoch_ms(window_end) >= ? AND epoch_ms(window_end) < ?"
    expect = {}
    covered = [(inc["segment_id"], inc["start"] + 2 * MIN, 1.0), (quiet, t_quiet, 0.0), (joiner, t_quiet + 2 * MIN, 0.0),
               (rejoiner, t_quiet + 4 * MIN, 0.0), (rejoiner, t_quiet + 20 * MIN, 0.0), (host5, t_quiet + 30 * MIN, 0.0),
               (joiner5, t_quiet + 40 * MIN, 0.0), (other["segment_id"], other["start"] + 20 * MIN, 0.0)]
    for seg, opened, y in covered:
        for s, t in con.execute(q, [seg, opened, opened + FB.COVER_MS]).fetchall():
            expect[(s, t)] = y
    rows = {(s, int(t)): float(y) for s, t, y in zip(got["seg"], got["t"], got["label"])}
    assert rows == expect, f"labelled rows differ: {len(rows)} vs {len(expect)}"
    assert 10 <= len(rows) <= 8 * 15, len(rows)
    assert any(s == rejoiner and t >= t_quiet + 20 * MIN for s, t in rows), "a segment that joined again is labelled again"
    assert any(s == joiner for s, _ in rows) and any(s == joiner5 for s, _ in rows), "joined segments are labelled"
    assert got["x"].shape == (len(rows), len(FB.F.FEATURES))
    # the confirmed rows lie within the injected incident (the operator was right)
    pos = [t for (s, t), y in rows.items() if y == 1.0]
    assert pos and all(inc["start"] < t <= inc["end"] + 60_000 for t in pos), (inc, pos[:3])
    print(f"feedback labels ok: {len(pos)} confirmed and {len(rows) - len(pos)} rejected segment-minutes from 4 verdicts")


if __name__ == "__main__":
    main(sys.argv[1])
