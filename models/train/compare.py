"""Checks the stream against the training code: recomputes the feature rows (features.py) and
the California #7 alarms (train.py) from a pipeline run's `traffic_minutes` table and compares
them with what the `features` and `california7` stages wrote.

    python models/train/compare.py LAKE ROAD_GRAPH_CSV T1 T2 T3

Prints one JSON line; exits 1 when they differ. Used by tests/tests/models.rs.
"""

import json
import sys

import numpy as np
import pyarrow.dataset as ds

import features as F
import train


def table(lake, name):
    return ds.dataset(f"{lake}/{name}", format="parquet", partitioning="hive").to_table()


def main():
    lake, graph_path = sys.argv[1], sys.argv[2]
    t1, t2, t3 = (float(v) for v in sys.argv[3:6])
    graph = F.read_graph(graph_path)
    m = F.read_minutes(f"{lake}/traffic_minutes")
    x, _ = F.features(m["window_end_ms"], m["segment_id"], m["vehicles"], m["speed"], m["occupancy"], graph)
    py = {(int(t), s): i for i, (t, s) in enumerate(zip(m["window_end_ms"], m["segment_id"]))}

    rs = table(lake, "features")
    rs_t = rs.column("window_end").cast("int64").to_numpy()
    rs_s = rs.column("segment_id").to_pylist()
    rs_x = np.asarray(rs.column("features").combine_chunks().flatten().to_numpy()).reshape(-1, len(F.FEATURES))
    problems = []
    if len(rs_t) != len(py):
        problems.append(f"{len(rs_t)} feature rows from the stream, {len(py)} from Python")
    idx = np.array([py.get((int(t), s), -1) for t, s in zip(rs_t, rs_s)])
    if (idx < 0).any():
        problems.append(f"{int((idx < 0).sum())} stream rows have no Python row")
    ok = idx >= 0
    a, b = rs_x[ok].astype(np.float64), x[idx[ok]].astype(np.float64)
    both_nan = np.isnan(a) & np.isnan(b)
    diff = np.where(both_nan, 0.0, np.abs(a - b) / np.maximum(np.abs(b), 1.0))
    diff = np.where(np.isnan(diff), np.inf, diff)
    worst = diff.max(axis=0)
    for name, w in zip(F.FEATURES, worst):
        if w > 1e-5:
            problems.append(f"{name}: largest relative difference {w:.3g}")

    # California #7 on the Python features, against the stage's `incident` column
    d = {"x": x, "seg": np.array(m["segment_id"]), "t": np.asarray(m["window_end_ms"], dtype=np.int64)}
    alarms = train.california7(d, t1, t2, t3)
    ca = table(lake, "california7")
    ca_key = zip(ca.column("window_end").cast("int64").to_numpy(), ca.column("segment_id").to_pylist())
    ca_alarm = np.array(ca.column("incident").to_pylist())
    ca_idx = np.array([py.get((int(t), s), -1) for t, s in ca_key])
    mismatched = int((alarms[ca_idx[ca_idx >= 0]] != ca_alarm[ca_idx >= 0]).sum())
    if mismatched or len(ca_idx) != len(py):
        problems.append(f"california7: {mismatched} alarms differ, {len(ca_idx)} rows vs {len(py)}")
    print(json.dumps({"rows": int(len(rs_t)), "worst_relative_difference": float(worst.max()),
                      "california7_alarm_minutes": int(ca_alarm.sum()), "python_alarm_minutes": int(alarms.sum()),
                      "problems": problems}))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
