"""A simulated control-center operator for retraining experiments: judges every incident alert of
a simulator run against the ground truth and writes the verdicts as the control center would
(the `feedback` table's columns), so `train.py --feedback-lake` can be measured end to end.

    python models/train/simulated_operator.py DATA_DIR [--miss 0.1] [--seed 1]

DATA_DIR holds lake/ and ground_truth/ of a `citystream run` on the simulator. An alert is
confirmed (`acknowledged`) when it opened on the segment of an injected incident between its
start and 10 minutes after its end, else rejected (`false_alarm`); with `--miss p` the operator
gets a share p of verdicts wrong (people do). Writes DATA_DIR/lake/feedback/simulated-operator.parquet.
"""

import argparse
import csv
import datetime as dt
import pathlib
import random

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

GRACE_MS = 10 * 60_000


def ms(s):
    return int(dt.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp() * 1000)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data")
    ap.add_argument("--miss", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    data = pathlib.Path(a.data)
    rng = random.Random(a.seed)
    incidents = [(r["segment_id"], ms(r["start"]), ms(r["end"])) for r in csv.DictReader(open(data / "ground_truth" / "incidents.csv"))]
    rows = duckdb.connect().execute(
        f"SELECT alert_id, rule, alert_type, location, epoch_ms(opened_at), value, threshold "
        f"FROM read_parquet('{data}/lake/alerts/**/*.parquet', hive_partitioning = true) "
        "WHERE status = 'open' AND alert_type = 'incident' AND location <> '*' ORDER BY opened_at"
    ).fetchall()
    out = []
    for alert_id, rule, alert_type, loc, opened, value, threshold in rows:
        true = any(s == loc and start <= opened <= end + GRACE_MS for s, start, end in incidents)
        if rng.random() < a.miss:
            true = not true
        out.append((opened + 5 * 60_000, alert_id, rule, alert_type, loc, "acknowledged" if true else "false_alarm",
                    opened, value, threshold))
    ts = pa.timestamp("ms", tz="UTC")
    t = pa.table({
        "ts": pa.array([o[0] for o in out], pa.int64()).cast(ts),
        "alert_id": [o[1] for o in out], "rule": [o[2] for o in out], "alert_type": [o[3] for o in out],
        "location": [o[4] for o in out], "decision": [o[5] for o in out],
        "operator": ["simulated"] * len(out), "comment": [""] * len(out),
        "opened_at": pa.array([o[6] for o in out], pa.int64()).cast(ts),
        "value": [o[7] for o in out], "threshold": [o[8] for o in out],
    })
    dest = data / "lake" / "feedback"
    dest.mkdir(parents=True, exist_ok=True)
    pq.write_table(t, dest / "simulated-operator.parquet", compression="zstd")
    confirmed = sum(1 for o in out if o[5] == "acknowledged")
    print(f"{len(out)} incident alerts judged: {confirmed} confirmed, {len(out) - confirmed} false alarms -> {dest}")


if __name__ == "__main__":
    main()
