"""Training data from Eclipse SUMO: a microscopic simulation of a three-lane corridor with
induction-loop detectors, time-varying demand and injected lane closures, written in the same
layout as a pipeline run (`lake/traffic_minutes`, `ground_truth/`), so train.py reads both
sources the same way.

    pip install -r models/train/requirements-sumo.txt      # eclipse-sumo, sumolib (PyPI)
    python models/train/sumo_corridor.py --out models/train/data/sumo

Scenario k (seed k): 6 hours from 05:00 UTC on a day of May 2026 (weekdays and weekends),
demand following a morning profile scaled by a random factor, 2 incidents that close 1 or 2 of
the 3 lanes of one segment for 10-30 minutes (SUMO `closingLaneReroute`: vehicles must merge
past the closure, so a queue builds upstream). Each segment has one induction loop per lane
reporting every 30 s (vehicle count, occupancy, mean speed), aggregated per segment and minute
exactly as the pipeline's window stage does (count of readings, sum of vehicles, mean of the
speeds that exist, mean occupancy).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import os
import pathlib
import random
import shutil
import subprocess
import xml.etree.ElementTree as ET

HERE = pathlib.Path(__file__).resolve().parent
SEGMENTS = 8
SEG_LEN = 500.0
LANES = 3
FREE_MS = 70 / 3.6
HOURS = 6
START_HOUR = 5


def seg_id(i):
    return f"sumo-{i:02d}"


def sumo_home():
    import sumo

    return pathlib.Path(sumo.SUMO_HOME)


def write_network(d: pathlib.Path):
    nodes = ['<nodes>']
    # an entry edge, the 8 detector segments, an exit edge
    xs = [-300.0] + [i * SEG_LEN for i in range(SEGMENTS + 1)] + [SEGMENTS * SEG_LEN + 300.0]
    for k, x in enumerate(xs):
        nodes.append(f'  <node id="n{k}" x="{x}" y="0" type="priority"/>')
    nodes.append('</nodes>')
    edges = ['<edges>']
    names = ["in"] + [seg_id(i) for i in range(SEGMENTS)] + ["out"]
    for k, name in enumerate(names):
        edges.append(f'  <edge id="{name}" from="n{k}" to="n{k + 1}" numLanes="{LANES}" speed="{FREE_MS:.4f}"/>')
    edges.append('</edges>')
    (d / "corridor.nod.xml").write_text("\n".join(nodes))
    (d / "corridor.edg.xml").write_text("\n".join(edges))
    subprocess.run([str(sumo_home() / "bin" / "netconvert"), "-n", "corridor.nod.xml", "-e", "corridor.edg.xml",
                    "-o", "corridor.net.xml", "--no-turnarounds", "true"], cwd=d, check=True, capture_output=True)


def profile(hour):
    """share of capacity demanded at `hour` (morning peak around 08:00)"""
    return 0.25 + 0.7 * math.exp(-((hour - 8.0) / 1.2) ** 2)


def write_scenario(d: pathlib.Path, k: int, rng: random.Random):
    scale = rng.uniform(0.75, 1.0)
    capacity = 1900 * LANES  # veh/h for the corridor
    flows = ['<routes>', '  <vType id="car" accel="2.6" decel="4.5" sigma="0.5" length="4.5" minGap="2.5" maxSpeed="33"/>',
             '  <route id="r" edges="in ' + " ".join(seg_id(i) for i in range(SEGMENTS)) + ' out"/>']
    for q in range(HOURS * 4):  # 15-minute demand steps
        hour = START_HOUR + q / 4
        vph = capacity * profile(hour + 0.125) * scale
        flows.append(f'  <flow id="f{q}" type="car" route="r" begin="{q * 900}" end="{(q + 1) * 900}" '
                     f'vehsPerHour="{vph:.0f}" departLane="best" departSpeed="max"/>')
    flows.append('</routes>')
    (d / "demand.rou.xml").write_text("\n".join(flows))
    incidents, add = [], ['<additional>']
    for j in range(2):
        seg = rng.randrange(1, SEGMENTS - 1)
        start = rng.randrange(600, HOURS * 3600 - 2400)
        dur = rng.randrange(600, 1800)
        closed = rng.choice([1, 2])
        incidents.append({"segment": seg, "start_s": start, "end_s": start + dur, "lanes_closed": closed})
        lanes = "".join(f'<closingLaneReroute id="{seg_id(seg)}_{ln}" disallow="all"/>' for ln in range(closed))
        add.append(f'  <rerouter id="inc{j}" edges="{seg_id(seg)}"><interval begin="{start}" end="{start + dur}">{lanes}</interval></rerouter>')
    for i in range(SEGMENTS):
        for ln in range(LANES):
            add.append(f'  <inductionLoop id="{seg_id(i)}-l{ln}" lane="{seg_id(i)}_{ln}" pos="{SEG_LEN / 2:.0f}" period="30" file="loops.xml"/>')
    add.append('</additional>')
    (d / "scenario.add.xml").write_text("\n".join(add))
    return incidents, scale


def run_sumo(d: pathlib.Path, seed: int):
    subprocess.run([str(sumo_home() / "bin" / "sumo"), "-n", "corridor.net.xml", "-r", "demand.rou.xml",
                    "-a", "scenario.add.xml", "--begin", "0", "--end", str(HOURS * 3600), "--seed", str(seed),
                    "--no-step-log", "true", "--no-warnings", "true", "--time-to-teleport", "300"],
                   cwd=d, check=True, capture_output=True)


def minutes_from_loops(d: pathlib.Path, t0_ms: int):
    """one-minute windows per segment, the window stage's way: readings by their interval's start"""
    acc = {}
    for ev, el in ET.iterparse(d / "loops.xml"):
        if el.tag != "interval":
            continue
        seg = el.get("id").rsplit("-l", 1)[0]
        begin = float(el.get("begin"))
        n = int(float(el.get("nVehContrib")))
        occ = float(el.get("occupancy")) / 100.0
        speed = float(el.get("speed"))
        minute = int(begin // 60)
        a = acc.setdefault((minute, seg), [0, 0.0, [], []])
        a[0] += 1
        a[1] += n
        if speed >= 0 and n > 0:
            a[2].append(speed * 3.6)
        a[3].append(occ)
        el.clear()
    rows = []
    for (minute, seg), (readings, veh, speeds, occs) in sorted(acc.items()):
        rows.append({
            "window_start": t0_ms + minute * 60_000,
            "window_end": t0_ms + (minute + 1) * 60_000,
            "segment_id": seg,
            "readings": readings,
            "vehicles": veh,
            "mean_speed_kmh": sum(speeds) / len(speeds) if speeds else None,
            "mean_occupancy": sum(occs) / len(occs),
        })
    return rows


def write_outputs(out: pathlib.Path, rows, incidents, t0_ms, meta):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table_dir = out / "lake" / "traffic_minutes"
    table_dir.mkdir(parents=True, exist_ok=True)
    ts = pa.timestamp("ms", tz="UTC")
    schema = pa.schema([("window_start", ts), ("window_end", ts), ("segment_id", pa.string()), ("readings", pa.int64()),
                        ("vehicles", pa.float64()), ("mean_speed_kmh", pa.float64()), ("mean_occupancy", pa.float64())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), table_dir / "part-sumo.parquet", compression="zstd")
    gt = out / "ground_truth"
    gt.mkdir(parents=True, exist_ok=True)
    with open(gt / "road_graph.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["segment_id", "corridor", "upstream", "downstream", "lat", "lon", "length_m", "lanes",
                    "free_speed_kmh", "capacity_vphpl", "zone_id"])
        for i in range(SEGMENTS):
            w.writerow([seg_id(i), 0, seg_id(i - 1) if i > 0 else "", seg_id(i + 1) if i < SEGMENTS - 1 else "",
                        f"{52.5:.6f}", f"{13.4 + i * 0.007:.6f}", SEG_LEN, LANES, 70, 1900, "zone-00"])
    iso = lambda ms: dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")  # noqa: E731
    with open(gt / "incidents.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["incident_id", "segment_id", "start", "end", "capacity_factor"])
        for j, inc in enumerate(incidents):
            w.writerow([f"sumo-{meta['scenario']:02d}-{j}", seg_id(inc["segment"]), iso(t0_ms + inc["start_s"] * 1000),
                        iso(t0_ms + inc["end_s"] * 1000), f"{(LANES - inc['lanes_closed']) / LANES:.3f}"])
    (gt / "report.json").write_text(json.dumps({**meta, "start_ms": t0_ms, "end_ms": t0_ms + HOURS * 3_600_000}, indent=2))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "data" / "sumo"))
    ap.add_argument("--scenarios", type=int, default=16)
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    work = out / "_work"
    work.mkdir(parents=True)
    write_network(work)
    for k in range(1, args.scenarios + 1):
        rng = random.Random(k)
        day = dt.datetime(2026, 5, 4, START_HOUR, tzinfo=dt.timezone.utc) + dt.timedelta(days=k - 1)
        t0_ms = int(day.timestamp() * 1000)
        incidents, scale = write_scenario(work, k, rng)
        run_sumo(work, k)
        rows = minutes_from_loops(work, t0_ms)
        write_outputs(out / f"s{k:02d}", rows, incidents, t0_ms, {"scenario": k, "seed": k, "demand_scale": round(scale, 3),
                                                                   "source": "eclipse-sumo", "incidents": incidents})
        os.remove(work / "loops.xml")
        print(f"scenario {k}: {day:%a %Y-%m-%d}, demand x{scale:.2f}, {len(rows)} segment-minutes, incidents {incidents}", flush=True)


if __name__ == "__main__":
    main()
