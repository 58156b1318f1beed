"""Training and evaluation data from Eclipse SUMO: families of roads unlike each other (free
speeds 50-130 km/h, 2-4 lanes, with and without ramps), each run as several seeded scenarios
with incidents of two kinds, slowdowns that are not incidents, demand from light to over
capacity, rain and failing detectors. Written in the layout of a pipeline run
(`lake/traffic_minutes`, `ground_truth/`), so train.py reads every source the same way.

    pip install -r models/train/requirements-sumo.txt      # eclipse-sumo, sumolib (PyPI)
    python models/train/sumo_scenarios.py --out models/train/data/sumo

A family is one road (`FAMILIES`): 8 detector segments of 500 m (segment ids `{family}-NN`),
an entry and an exit edge, and, where it has ramps, an on-ramp joining at the start of segment
3 and an off-ramp leaving at the end of segment 5. Scenario k of a family (seed from family and
k) lasts 4 hours from 06:00 UTC (the demand peaks at 08:00) on its own weekday of May 2026
(SUMO's demand does not depend on the day, and the models read a weekend flag) and has:
- demand scaled by a factor drawn from 0.45 (light) to 1.2 (over capacity at the peak);
- 3 incidents on segments 1-6, 12-35 minutes each, each either a **breakdown** (a stopped
  vehicle blocks one lane 150 m past the segment's loop) or a **closure** (1 to lanes-1 lanes
  closed from the left over the next segment; vehicles must merge before it): either way the
  queue starts downstream of the incident segment's loop;
- 1 **slowdown** without incident (a variable speed limit of 45-70% of the free speed over
  two segments for 10-25 minutes): a negative, as is the recurrent queue at an on-ramp;
- rain with probability 0.3 (drivers at 80-90% of their speed, longer headways);
- with probability 0.6 one failing loop: **silent** (no readings for 30-90 minutes),
  **stuck** (repeats one reading: the pipeline's `sensor_health` stage passes 9 of them, then
  keeps the loop out until it changes, so only the first 9 are written), or **noisy**
  (speed and occupancy with 20% noise).

Each lane of each segment has an induction loop at mid-segment reporting every 30 s (vehicle
count, occupancy, mean speed), aggregated per segment and minute exactly as the pipeline's
window stage does (count of readings, sum of vehicles, mean of the speeds that exist, mean
occupancy). Families in `TRAIN_FAMILIES` have 36 scenarios: 9-12 and 25-36 are held out for
evaluation, the other 20 train; the other families (`arterial50`, `freeway120`) have 24, held out
whole (never seen in training). History: the trained families had 12 scenarios (1-8 training)
until 2026-12-06, when 13-24 came to training with seeds of their own, so 1-12 stayed the same
runs. The held-out sets grew on 2026-12-06 too (25-36 of a trained road, 13-24 of an unseen one,
new seeds): 4 scenarios of a trained road had 2-8 detectable incidents, too few to tell a minute
to detect or 1-2 km/h apart on one road. `arterial60` came last (2026-12-06): with `urban70` the
slowest trained road, the unseen `arterial50` lay below every speed the models had seen.
`--first N` makes scenarios N and on of the families named, keeping their others (more
scenarios for a family without running the others again); `--last` stops early (or, past a
family's count, makes more held-out scenarios of it).
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
HOURS = 4
START_HOUR = 6
ON_RAMP_SEGMENT = 3   # the on-ramp joins at this segment's start
OFF_RAMP_SEGMENT = 5  # the off-ramp leaves at this segment's end
STUCK_PASSED = 9      # readings of a stuck loop the sensor_health stage lets through (stuck_after 10)

# road families: free speed (km/h), lanes, ramps, capacity per lane (veh/h), scenarios
FAMILIES = {
    "arterial50": {"free_kmh": 50, "lanes": 2, "ramps": False, "capacity_vphpl": 1500, "scenarios": 24},
    "urban70": {"free_kmh": 70, "lanes": 3, "ramps": False, "capacity_vphpl": 1800, "scenarios": 36},
    "highway100": {"free_kmh": 100, "lanes": 3, "ramps": True, "capacity_vphpl": 1900, "scenarios": 36},
    "freeway120": {"free_kmh": 120, "lanes": 4, "ramps": True, "capacity_vphpl": 2000, "scenarios": 24},
    "motorway130": {"free_kmh": 130, "lanes": 2, "ramps": True, "capacity_vphpl": 2000, "scenarios": 36},
    # last, so that the families before it keep their seeds (1000 * (index + 1) + scenario)
    "arterial60": {"free_kmh": 60, "lanes": 2, "ramps": False, "capacity_vphpl": 1600, "scenarios": 36},
}
# families the models see in training (every scenario but HELD_OUT_SCENARIOS); the others are held out whole
TRAIN_FAMILIES = ("arterial60", "urban70", "highway100", "motorway130")
HELD_OUT_SCENARIOS = frozenset(range(9, 13)) | frozenset(range(25, 37))


def in_training(family, k):
    """whether scenario k of `family` trains (its report's `split`): a trained family's scenarios
    up to its count but HELD_OUT_SCENARIOS; past the count, and a family held out whole, test"""
    return family in TRAIN_FAMILIES and k not in HELD_OUT_SCENARIOS and k <= FAMILIES[family]["scenarios"]


def seg_id(family, i):
    return f"{family}-{i:02d}"


def sumo_home():
    import sumo

    return pathlib.Path(sumo.SUMO_HOME)


def write_network(d: pathlib.Path, family: str, spec: dict):
    free_ms = spec["free_kmh"] / 3.6
    xs = [-300.0] + [i * SEG_LEN for i in range(SEGMENTS + 1)] + [SEGMENTS * SEG_LEN + 300.0]
    # the on-ramp's node merges in turn (zipper): as a minor link it let a tenth of the ramp's
    # vehicles in, the rest waiting for gaps that a busy right lane never had
    merge = ON_RAMP_SEGMENT + 1 if spec["ramps"] else -1
    nodes = ['<nodes>'] + [f'  <node id="n{k}" x="{x}" y="0" type="{"zipper" if k == merge else "priority"}"/>'
                           for k, x in enumerate(xs)]
    names = ["in"] + [seg_id(family, i) for i in range(SEGMENTS)] + ["out"]
    edges = ['<edges>'] + [f'  <edge id="{name}" from="n{k}" to="n{k + 1}" numLanes="{spec["lanes"]}" '
                           f'speed="{free_ms:.4f}" priority="2"/>' for k, name in enumerate(names)]
    if spec["ramps"]:
        # node n{i+1} is the start of segment i
        on, off = ON_RAMP_SEGMENT + 1, OFF_RAMP_SEGMENT + 2
        nodes += [f'  <node id="ron" x="{xs[on] - 400}" y="-120" type="priority"/>',
                  f'  <node id="roff" x="{xs[off] + 400}" y="-120" type="priority"/>']
        edges += [f'  <edge id="ramp_in" from="ron" to="n{on}" numLanes="1" speed="{0.6 * free_ms:.4f}" priority="1"/>',
                  f'  <edge id="ramp_out" from="n{off}" to="roff" numLanes="1" speed="{0.6 * free_ms:.4f}" priority="1"/>']
    # the on-ramp merges into the rightmost lane (netconvert leaves a ramp joining a road of as
    # many lanes unconnected unless told)
    cons = ['<connections>']
    if spec["ramps"]:
        before, after = seg_id(family, ON_RAMP_SEGMENT - 1), seg_id(family, ON_RAMP_SEGMENT)
        cons += [f'  <connection from="{before}" to="{after}" fromLane="{ln}" toLane="{ln}"/>' for ln in range(spec["lanes"])]
        cons.append(f'  <connection from="ramp_in" to="{after}" fromLane="0" toLane="0"/>')
    (d / "road.nod.xml").write_text("\n".join(nodes + ['</nodes>']))
    (d / "road.edg.xml").write_text("\n".join(edges + ['</edges>']))
    (d / "road.con.xml").write_text("\n".join(cons + ['</connections>']))
    subprocess.run([str(sumo_home() / "bin" / "netconvert"), "-n", "road.nod.xml", "-e", "road.edg.xml",
                    "-x", "road.con.xml", "-o", "road.net.xml", "--no-turnarounds", "true"], cwd=d, check=True,
                   capture_output=True)


def profile(hour):
    """share of capacity demanded at `hour` (morning peak around 08:00)"""
    return 0.3 + 0.7 * math.exp(-((hour - 8.0) / 1.1) ** 2)


def slot(rng: random.Random, busy, seg_end, start_end, durations):
    """a segment in 1..seg_end-1, a start in 900..start_end-1 s and a duration in `durations`
    (s) at least 15 minutes from every (start, end) in `busy` (after 100 draws, the last one)"""
    for _ in range(100):
        seg = rng.randrange(1, seg_end)
        start = rng.randrange(900, start_end)
        dur = rng.randrange(*durations)
        if all(start > e + 900 or start + dur + 900 < s for s, e in busy):
            break
    return seg, start, dur


def write_scenario(d: pathlib.Path, family: str, spec: dict, rng: random.Random):
    lanes, free_kmh = spec["lanes"], spec["free_kmh"]
    segs = [seg_id(family, i) for i in range(SEGMENTS)]
    scale = rng.uniform(0.45, 1.2)
    rain = rng.random() < 0.3
    speed_factor = rng.uniform(0.8, 0.9) if rain else 1.0
    tau = 1.4 if rain else 1.0
    capacity = spec["capacity_vphpl"] * lanes
    routes = ['<routes>',
              f'  <vType id="car" accel="2.6" decel="4.5" sigma="0.5" tau="{tau}" length="4.5" minGap="2.5" '
              f'maxSpeed="{free_kmh / 3.6 * 1.15:.3f}" speedFactor="normc({speed_factor:.3f},0.08,0.6,1.3)"/>',
              '  <vType id="broken" length="4.5" minGap="2.5"/>',
              '  <route id="main" edges="in ' + " ".join(segs) + ' out"/>']
    if spec["ramps"]:
        routes += ['  <route id="onramp" edges="ramp_in ' + " ".join(segs[ON_RAMP_SEGMENT:]) + ' out"/>',
                   '  <route id="offramp" edges="in ' + " ".join(segs[:OFF_RAMP_SEGMENT + 1]) + ' ramp_out"/>']
    vehicles = []
    for q in range(HOURS * 4):  # 15-minute demand steps
        vph = capacity * profile(START_HOUR + (q + 0.5) / 4) * scale
        shares = [("main", 1.0)] if not spec["ramps"] else [("main", 0.78), ("offramp", 0.1), ("onramp", 0.12)]
        for route, share in shares:
            if vph * share >= 1:
                vehicles.append((q * 900, f'  <flow id="f{route}{q}" type="car" route="{route}" begin="{q * 900}" '
                                          f'end="{(q + 1) * 900}" vehsPerHour="{vph * share:.0f}" departLane="best" '
                                          f'departSpeed="max"/>'))
    incidents, slowdowns, add = [], [], ['<additional>']
    busy = []
    for j in range(3):
        seg, start, dur = slot(rng, busy, SEGMENTS - 1, HOURS * 3600 - 2700, (720, 2100))
        busy.append((start, start + dur))
        kind = rng.choice(["breakdown", "closure"])
        closed = 1 if kind == "breakdown" else rng.randrange(1, lanes)
        incidents.append({"segment": seg, "start_s": start, "end_s": start + dur, "kind": kind, "lanes_closed": closed})
        # an incident of segment k blocks the road downstream of k's loop (as the project's
        # simulator cuts a segment's capacity at its end): the queue reaches k's loop first and
        # k+1's loop sees the thinned flow, the signature California #7 looks for on k
        if kind == "closure":
            # the next segment's leftmost lanes (the ramps join and leave the rightmost one,
            # which stays open): vehicles merge before the end of segment k
            lanes_xml = "".join(f'<closingLaneReroute id="{segs[seg + 1]}_{ln}" disallow="all"/>'
                                for ln in range(lanes - closed, lanes))
            add.append(f'  <rerouter id="inc{j}" edges="{segs[seg + 1]}"><interval begin="{start}" '
                       f'end="{start + dur}">{lanes_xml}</interval></rerouter>')
        else:
            # a vehicle inserted standing on one lane 150 m past the loop, stopped for the
            # duration (its insertion waits for a gap: the stop starts a few seconds after `start`)
            lane = rng.randrange(lanes)
            vehicles.append((start, f'  <vehicle id="breakdown{j}" type="broken" depart="{start}" departLane="{lane}" '
                                    f'departPos="395" departSpeed="0">'
                                    f'<route edges="{" ".join(segs[seg:])} out"/>'
                                    f'<stop lane="{segs[seg]}_{lane}" endPos="400" duration="{dur}"/></vehicle>'))
    seg, start, dur = slot(rng, busy, SEGMENTS - 2, HOURS * 3600 - 1800, (600, 1500))
    limit = free_kmh * rng.uniform(0.45, 0.7) / 3.6
    slowdowns.append({"segments": [seg, seg + 1], "start_s": start, "end_s": start + dur, "limit_kmh": round(limit * 3.6, 1)})
    vss_lanes = " ".join(f"{segs[s]}_{ln}" for s in (seg, seg + 1) for ln in range(lanes))
    add.append(f'  <variableSpeedSign id="slow" lanes="{vss_lanes}"><step time="{start}" speed="{limit:.3f}"/>'
               f'<step time="{start + dur}" speed="-1"/></variableSpeedSign>')
    for i in range(SEGMENTS):
        for ln in range(lanes):
            add.append(f'  <inductionLoop id="{segs[i]}-l{ln}" lane="{segs[i]}_{ln}" pos="{SEG_LEN / 2:.0f}" '
                       f'period="30" file="loops.xml"/>')
    add.append('</additional>')
    vehicles.sort(key=lambda v: v[0])
    (d / "demand.rou.xml").write_text("\n".join(routes + [v for _, v in vehicles] + ['</routes>']))
    (d / "scenario.add.xml").write_text("\n".join(add))
    fault = None
    if rng.random() < 0.6:
        fault = {"kind": rng.choice(["silent", "stuck", "noisy"]), "segment": rng.randrange(SEGMENTS),
                 "lane": rng.randrange(lanes), "start_s": rng.randrange(600, HOURS * 3600 - 5400),
                 "duration_s": rng.randrange(1800, 5400)}
    return {"demand_scale": round(scale, 3), "rain_speed_factor": round(speed_factor, 3), "incidents": incidents,
            "slowdowns": slowdowns, "detector_fault": fault}


def run_sumo(d: pathlib.Path, seed: int):
    subprocess.run([str(sumo_home() / "bin" / "sumo"), "-n", "road.net.xml", "-r", "demand.rou.xml",
                    "-a", "scenario.add.xml", "--begin", "0", "--end", str(HOURS * 3600), "--seed", str(seed),
                    "--no-step-log", "true", "--no-warnings", "true", "--time-to-teleport", "300"],
                   cwd=d, check=True, capture_output=True)


def readings(d: pathlib.Path, fault, rng: random.Random):
    """the loops' 30 s readings (segment index, lane, begin_s, vehicles, occupancy, speed km/h or
    None), with the scenario's detector fault applied"""
    out = []
    for _, el in ET.iterparse(d / "loops.xml"):
        if el.tag != "interval":
            continue
        seg, lane = el.get("id").rsplit("-l", 1)
        n = int(float(el.get("nVehContrib")))
        speed = float(el.get("speed"))
        out.append([int(seg.rsplit("-", 1)[1]), int(lane), float(el.get("begin")), n,
                    float(el.get("occupancy")) / 100.0, speed * 3.6 if speed >= 0 and n > 0 else None])
        el.clear()
    if not fault:
        return out
    lo, hi = fault["start_s"], fault["start_s"] + fault["duration_s"]
    hit = lambda r: r[0] == fault["segment"] and r[1] == fault["lane"] and lo <= r[2] < hi  # noqa: E731
    kept, stuck_value, passed = [], None, 0
    for r in out:
        if not hit(r):
            kept.append(r)
        elif fault["kind"] == "silent":
            continue
        elif fault["kind"] == "stuck":
            stuck_value = stuck_value or r[3:]
            passed += 1
            if passed <= STUCK_PASSED:
                kept.append(r[:3] + list(stuck_value))
        else:
            noisy = lambda v: None if v is None else max(0.0, v * rng.gauss(1.0, 0.2))  # noqa: E731
            kept.append(r[:3] + [r[3], min(1.0, noisy(r[4])), noisy(r[5])])
    return kept


def minutes(rows, family, t0_ms):
    """one-minute windows per segment, the window stage's way: readings by their interval's start"""
    acc = {}
    for seg, _lane, begin, n, occ, speed in rows:
        a = acc.setdefault((int(begin // 60), seg), [0, 0.0, [], []])
        a[0] += 1
        a[1] += n
        if speed is not None:
            a[2].append(speed)
        a[3].append(occ)
    return [{"window_start": t0_ms + m * 60_000, "window_end": t0_ms + (m + 1) * 60_000, "segment_id": seg_id(family, seg),
             "readings": k, "vehicles": veh, "mean_speed_kmh": sum(sp) / len(sp) if sp else None,
             "mean_occupancy": sum(oc) / len(oc)}
            for (m, seg), (k, veh, sp, oc) in sorted(acc.items())]


def write_outputs(out: pathlib.Path, rows, family, spec, t0_ms, meta):
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
            w.writerow([seg_id(family, i), 0, seg_id(family, i - 1) if i > 0 else "",
                        seg_id(family, i + 1) if i < SEGMENTS - 1 else "", f"{52.5:.6f}", f"{13.4 + i * 0.007:.6f}",
                        SEG_LEN, spec["lanes"], spec["free_kmh"], spec["capacity_vphpl"], "zone-00"])
    iso = lambda ms: dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")  # noqa: E731
    lanes = spec["lanes"]
    with open(gt / "incidents.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["incident_id", "segment_id", "start", "end", "capacity_factor"])
        for j, inc in enumerate(meta["incidents"]):
            w.writerow([f"{family}-{meta['scenario']:02d}-{j}", seg_id(family, inc["segment"]),
                        iso(t0_ms + inc["start_s"] * 1000), iso(t0_ms + inc["end_s"] * 1000),
                        f"{(lanes - inc['lanes_closed']) / lanes:.3f}"])
    (gt / "report.json").write_text(json.dumps({**meta, "start_ms": t0_ms, "end_ms": t0_ms + HOURS * 3_600_000}, indent=2))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "data" / "sumo"))
    ap.add_argument("--family", action="append", choices=sorted(FAMILIES), help="only these families (repeatable)")
    ap.add_argument("--first", type=int, default=1,
                    help="only scenarios from this one on, keeping the family's others (more scenarios for a family)")
    ap.add_argument("--last", type=int, default=None,
                    help="up to this scenario (default: the family's count; past it, more held-out scenarios)")
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    day0 = dt.datetime(2026, 5, 4, START_HOUR, tzinfo=dt.timezone.utc)
    for f_index, (family, spec) in enumerate(FAMILIES.items()):
        if args.family and family not in args.family:
            continue
        if args.first == 1:
            shutil.rmtree(out / family, ignore_errors=True)
        work = out / family / "_work"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        write_network(work, family, spec)
        for k in range(args.first, (args.last or spec["scenarios"]) + 1):
            seed = 1000 * (f_index + 1) + k
            rng = random.Random(seed)
            day = day0 + dt.timedelta(days=(k - 1) // 5 * 7 + (k - 1) % 5)  # the k-th weekday from Monday
            t0_ms = int(day.timestamp() * 1000)
            meta = write_scenario(work, family, spec, rng)
            run_sumo(work, seed)
            rows = minutes(readings(work, meta["detector_fault"], rng), family, t0_ms)
            split = "train" if in_training(family, k) else "test"
            meta = {"family": family, "scenario": k, "seed": seed, "split": split, "source": "eclipse-sumo",
                    **{key: spec[key] for key in ("free_kmh", "lanes", "ramps")}, **meta}
            write_outputs(out / family / f"s{k:02d}", rows, family, spec, t0_ms, meta)
            os.remove(work / "loops.xml")
            kinds = ",".join(i["kind"] for i in meta["incidents"])
            fault = (meta["detector_fault"] or {}).get("kind", "-")
            print(f"{family} s{k:02d} ({split}): {day:%a %Y-%m-%d}, demand x{meta['demand_scale']:.2f}, "
                  f"rain {meta['rain_speed_factor']}, incidents {kinds}, fault {fault}, {len(rows)} segment-minutes",
                  flush=True)
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
