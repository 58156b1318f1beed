"""The feature rows of the congestion and incident models, from one-minute traffic windows.

This is the reference definition: the Rust `features` stage (models/src/features/) must emit
the same rows, and tests/tests/models.rs compares the two on the same input. Keep them in step;
the order of FEATURES is the order of the model input.

Input: rows of the pipeline's one-minute window table per segment (window_end, segment_id,
vehicles, mean_speed_kmh, mean_occupancy) and the road graph (segment_id, upstream, downstream,
free_speed_kmh). One feature row is made for each (segment, minute) that has a window row.

Per minute and segment the series are:
  speed: mean_speed_kmh, or the free speed when the window had no speed (no vehicle passed)
  veh:   vehicles in the minute
  occ:   mean occupancy (0..1)
and a minute without a window row is missing (not zero). `mean(x, a..b)` is the mean of the
present values of minutes t-b .. t-a (inclusive); when none is present a stated fallback is used.
All arithmetic is float64; the row is cast to float32 at the end.
"""

from __future__ import annotations

import csv
import math

import numpy as np

RECENT_MINUTES = 5  # minute t and the 4 before it, one by one
# the last minutes one by one (the incident detector's; temporal_experiment.py): `at(x, k)` is
# minute t-k's value; a minute without a window row has the free speed and occupancy 0, and a
# neighbour missing or without a row that minute has the segment's own value
RECENT_FEATURES = [
    *[f"speed_m{k}" for k in range(1, RECENT_MINUTES)],      # at(speed, k), else free_speed_kmh
    *[f"occ_m{k}" for k in range(1, RECENT_MINUTES)],        # at(occ, k), else 0
    "up_speed_1m",                                           # upstream at(speed, 0), else speed_1m
    *[f"up_speed_m{k}" for k in range(1, RECENT_MINUTES)],   # upstream at(speed, k), else speed_m{k}
    *[f"up_occ_m{k}" for k in range(1, RECENT_MINUTES)],     # upstream at(occ, k), else occ_m{k}
    "down_speed_1m",                                         # downstream: the same
    *[f"down_speed_m{k}" for k in range(1, RECENT_MINUTES)],
    *[f"down_occ_m{k}" for k in range(1, RECENT_MINUTES)],
]

FEATURES = [
    "speed_1m",          # km/h, this minute
    "speed_5m",          # mean(speed, 0..4)
    "speed_15m",         # mean(speed, 0..14)
    "speed_lag15",       # mean(speed, 15..19), else speed_5m
    "speed_lag30",       # mean(speed, 30..34), else speed_5m
    "speed_60m",         # mean(speed, 0..59)
    "flow_5m_vph",       # mean(veh, 0..4) * 60, vehicles per hour (all lanes)
    "occ_1m",            # occupancy this minute (0..1)
    "occ_5m",            # mean(occ, 0..4)
    "up_speed_5m",       # upstream segment's mean(speed, 0..4), else speed_5m
    "down_speed_5m",     # downstream segment's mean(speed, 0..4), else speed_5m
    "up_occ_1m",         # upstream occupancy this minute, else occ_1m
    "down_occ_1m",       # downstream occupancy this minute, else occ_1m
    "occ_diff_1m",       # occ_1m - down_occ_1m (California OCCDF)
    "occ_rdiff_1m",      # occ_diff_1m / max(occ_1m, 0.01) (California OCCRDF)
    "speed_drop_5m",     # mean(speed, 5..9) (else speed_5m) - speed_5m
    "free_speed_kmh",    # the segment's free-flow speed (road graph)
    "tod_sin",           # sin(2 pi minute_of_day / 1440), minute of window_end, UTC
    "tod_cos",           # cos(...)
    "weekend",           # 1 on Saturday and Sunday (UTC), else 0
    *RECENT_FEATURES,
]
MINUTE_MS = 60_000
HISTORY_MINUTES = 60  # the longest look-back above


def read_graph(path):
    """segment_id -> (upstream or None, downstream or None, free_speed_kmh)"""
    graph = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            graph[row["segment_id"]] = (
                row["upstream"] or None,
                row["downstream"] or None,
                float(row["free_speed_kmh"]),
            )
    return graph


class Grid:
    """Dense [segment, minute] arrays of the input, NaN where a minute is missing."""

    def __init__(self, window_end_ms, segment_id, vehicles, speed, occupancy, graph):
        window_end_ms = np.asarray(window_end_ms, dtype=np.int64)
        self.segments = sorted(graph)
        self.index = {s: i for i, s in enumerate(self.segments)}
        self.t0 = int(window_end_ms.min())
        self.minutes = int((window_end_ms.max() - self.t0) // MINUTE_MS) + 1
        shape = (len(self.segments), self.minutes)
        self.speed = np.full(shape, np.nan)
        self.veh = np.full(shape, np.nan)
        self.occ = np.full(shape, np.nan)
        self.free = np.array([graph[s][2] for s in self.segments])
        self.up = np.array([self.index.get(graph[s][0], -1) for s in self.segments])
        self.down = np.array([self.index.get(graph[s][1], -1) for s in self.segments])
        rows = np.array([self.index[s] for s in segment_id])
        cols = (window_end_ms - self.t0) // MINUTE_MS
        speed = np.array([np.nan if v is None else v for v in speed], dtype=np.float64)
        speed = np.where(np.isnan(speed), self.free[rows], speed)
        self.speed[rows, cols] = speed
        self.veh[rows, cols] = np.asarray(vehicles, dtype=np.float64)
        self.occ[rows, cols] = np.asarray(occupancy, dtype=np.float64)
        self.rows, self.cols = rows, cols

    @staticmethod
    def window_mean(a, lo, hi):
        """mean of the present values of minutes t-hi..t-lo for every t, NaN where none."""
        present = ~np.isnan(a)
        vals = np.where(present, a, 0.0)
        n = a.shape[1]
        csum = np.concatenate([np.zeros((a.shape[0], 1)), np.cumsum(vals, axis=1)], axis=1)
        ccnt = np.concatenate([np.zeros((a.shape[0], 1)), np.cumsum(present, axis=1)], axis=1)
        t = np.arange(n)
        end = np.clip(t - lo + 1, 0, n)  # exclusive
        start = np.clip(t - hi, 0, n)
        s = csum[:, end] - csum[:, start]
        c = ccnt[:, end] - ccnt[:, start]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(c > 0, s / np.maximum(c, 1), np.nan), c


def features(window_end_ms, segment_id, vehicles, speed, occupancy, graph):
    """Feature rows (float32 [n, len(FEATURES)]) in input order, one per input row."""
    g = Grid(window_end_ms, segment_id, vehicles, speed, occupancy, graph)
    wm = lambda a, lo, hi: Grid.window_mean(a, lo, hi)[0]  # noqa: E731
    r, c = g.rows, g.cols

    def fb(x, fallback):
        return np.where(np.isnan(x), fallback, x)

    speed_1m = g.speed[r, c]
    speed_5m_all = wm(g.speed, 0, 4)
    speed_5m = speed_5m_all[r, c]
    speed_15m = wm(g.speed, 0, 14)[r, c]
    lag15 = fb(wm(g.speed, 15, 19)[r, c], speed_5m)
    lag30 = fb(wm(g.speed, 30, 34)[r, c], speed_5m)
    speed_60m = wm(g.speed, 0, 59)[r, c]
    flow = wm(g.veh, 0, 4)[r, c] * 60.0
    occ_1m = g.occ[r, c]
    occ_5m = wm(g.occ, 0, 4)[r, c]

    def at(values, k):  # minute t-k of each row's segment, NaN where missing
        return np.where(c >= k, values[r, np.maximum(c - k, 0)], np.nan)

    def neighbour_at(idx, values, k, own):  # minute t-k of a neighbour, else `own`
        has = (idx[r] >= 0) & (c >= k)
        vals = np.where(has, values[np.where(idx[r] >= 0, idx[r], 0), np.maximum(c - k, 0)], np.nan)
        return np.where(np.isnan(vals), own, vals)

    up_speed = neighbour_at(g.up, speed_5m_all, 0, speed_5m)
    down_speed = neighbour_at(g.down, speed_5m_all, 0, speed_5m)
    up_occ = neighbour_at(g.up, g.occ, 0, occ_1m)
    down_occ = neighbour_at(g.down, g.occ, 0, occ_1m)
    occ_diff = occ_1m - down_occ
    occ_rdiff = occ_diff / np.maximum(occ_1m, 0.01)
    drop = fb(wm(g.speed, 5, 9)[r, c], speed_5m) - speed_5m
    free = g.free[r]
    t_ms = np.asarray(window_end_ms, dtype=np.int64)
    minute_of_day = (t_ms // MINUTE_MS) % 1440
    angle = 2.0 * math.pi * minute_of_day / 1440.0
    weekday = ((t_ms // 86_400_000) + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
    weekend = (weekday >= 5).astype(np.float64)
    recent = range(1, RECENT_MINUTES)
    own_speed = {k: fb(at(g.speed, k), free) for k in recent}
    own_occ = {k: fb(at(g.occ, k), 0.0) for k in recent}
    near = []
    for idx in (g.up, g.down):
        near += [neighbour_at(idx, g.speed, 0, speed_1m)]
        near += [neighbour_at(idx, g.speed, k, own_speed[k]) for k in recent]
        near += [neighbour_at(idx, g.occ, k, own_occ[k]) for k in recent]
    cols = [
        speed_1m, speed_5m, speed_15m, lag15, lag30, speed_60m, flow, occ_1m, occ_5m,
        up_speed, down_speed, up_occ, down_occ, occ_diff, occ_rdiff, drop, free,
        np.sin(angle), np.cos(angle), weekend,
        *[own_speed[k] for k in recent], *[own_occ[k] for k in recent], *near,
    ]
    return np.stack(cols, axis=1).astype(np.float32), g


def speed_targets(g, horizons):
    """For each input row, mean(speed, 0..4) at t + h for each horizon (minutes); NaN where
    fewer than 3 of those 5 minutes are present."""
    mean, count = Grid.window_mean(g.speed, 0, 4)
    out = np.full((len(g.rows), len(horizons)), np.nan)
    for k, h in enumerate(horizons):
        cols = g.cols + h
        ok = cols < g.minutes
        cc = np.where(ok, cols, 0)
        vals = np.where(ok & (count[g.rows, cc] >= 3), mean[g.rows, cc], np.nan)
        out[:, k] = vals
    return out


def read_minutes(lake_table_dir):
    """The one-minute window table written by the pipeline (Parquet, hive partitions)."""
    import pyarrow.dataset as ds

    t = ds.dataset(lake_table_dir, format="parquet", partitioning="hive").to_table(
        columns=["window_end", "segment_id", "vehicles", "mean_speed_kmh", "mean_occupancy"]
    )
    t = t.sort_by([("window_end", "ascending"), ("segment_id", "ascending")])
    return {
        "window_end_ms": t.column("window_end").cast("int64").to_numpy(),
        "segment_id": t.column("segment_id").to_pylist(),
        "vehicles": t.column("vehicles").to_numpy(zero_copy_only=False),
        "speed": t.column("mean_speed_kmh").to_pylist(),
        "occupancy": t.column("mean_occupancy").to_numpy(zero_copy_only=False),
    }


def main():
    """python features.py LAKE_TABLE_DIR ROAD_GRAPH_CSV OUT_CSV: feature rows as CSV
    (window_end_ms, segment_id, then FEATURES), for the Rust parity test."""
    import sys

    src, graph_path, out = sys.argv[1:4]
    m = read_minutes(src)
    x, _ = features(m["window_end_ms"], m["segment_id"], m["vehicles"], m["speed"], m["occupancy"],
                    read_graph(graph_path))
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["window_end_ms", "segment_id", *FEATURES])
        for t, s, row in zip(m["window_end_ms"], m["segment_id"], x):
            w.writerow([int(t), s, *(repr(float(v)) for v in row)])


if __name__ == "__main__":
    main()
