"""Writes the model cards (models/congestion.md, models/incident.md) from models/metrics.json.

    python models/train/cards.py      # train.py runs it at the end

Each card lists every variant with its file's SHA-256: models/tests/onnx.rs checks that the
committed files still have those checksums and reach the stated metrics on the committed
evaluation sample.
"""

import json
import pathlib

import features as F
import sumo_scenarios as S

HERE = pathlib.Path(__file__).resolve().parent
MODELS = HERE.parent

FEATURE_DOC = {
    "speed_1m": ("km/h", "mean speed this minute; the free speed when no vehicle passed"),
    "speed_5m": ("km/h", "mean of the last 5 minutes (t-4..t)"),
    "speed_15m": ("km/h", "mean of t-14..t"),
    "speed_lag15": ("km/h", "mean of t-19..t-15, else speed_5m"),
    "speed_lag30": ("km/h", "mean of t-34..t-30, else speed_5m"),
    "speed_60m": ("km/h", "mean of t-59..t"),
    "flow_5m_vph": ("veh/h", "vehicles per minute over t-4..t, times 60 (all lanes)"),
    "occ_1m": ("0..1", "loop occupancy this minute"),
    "occ_5m": ("0..1", "mean occupancy t-4..t"),
    "up_speed_5m": ("km/h", "upstream segment's speed_5m, else own"),
    "down_speed_5m": ("km/h", "downstream segment's speed_5m, else own"),
    "up_occ_1m": ("0..1", "upstream occupancy this minute, else own"),
    "down_occ_1m": ("0..1", "downstream occupancy this minute, else own"),
    "occ_diff_1m": ("0..1", "occ_1m - down_occ_1m (California OCCDF)"),
    "occ_rdiff_1m": ("ratio", "occ_diff_1m / max(occ_1m, 0.01) (California OCCRDF)"),
    "speed_drop_5m": ("km/h", "mean of t-9..t-5 (else speed_5m) minus speed_5m"),
    "free_speed_kmh": ("km/h", "the segment's free-flow speed (road graph)"),
    "tod_sin": ("-1..1", "sin(2 pi minute_of_day / 1440), UTC"),
    "tod_cos": ("-1..1", "cos(2 pi minute_of_day / 1440), UTC"),
    "weekend": ("0/1", "Saturday or Sunday (UTC)"),
    **{f"speed_m{k}": ("km/h", f"speed of minute t-{k}; the free speed without a window row") for k in range(1, F.RECENT_MINUTES)},
    **{f"occ_m{k}": ("0..1", f"occupancy of minute t-{k}; 0 without a window row") for k in range(1, F.RECENT_MINUTES)},
    **{f"{side}_speed_1m": ("km/h", f"{side}stream segment's speed this minute, else own") for side in ("up", "down")},
    **{f"{side}_speed_m{k}": ("km/h", f"{side}stream segment's speed of minute t-{k}, else own speed_m{k}")
       for side in ("up", "down") for k in range(1, F.RECENT_MINUTES)},
    **{f"{side}_occ_m{k}": ("0..1", f"{side}stream segment's occupancy of minute t-{k}, else own occ_m{k}")
       for side in ("up", "down") for k in range(1, F.RECENT_MINUTES)},
}

DATA = """## Data
Two sources, both in the pipeline's one-minute window format (`traffic_minutes`); the models
train on both together and each held-out set is reported on its own.

**Eclipse SUMO road families** (`models/train/sumo_scenarios.py`, PyPI `eclipse-sumo`):
microscopic simulations of six roads unlike each other, each 8 segments of 500 m with one
induction loop per lane and segment (30 s periods):

{families}

`arterial60` is the newest: before it trained, the slowest trained road was `urban70`, and the
unseen `arterial50` lay below every speed the models had seen (the README gives the incident
detector's held-out numbers before and after). It is close to `arterial50` (10 km/h faster, as many lanes), so
`arterial50` now tests a road near a trained one; `freeway120` lies between trained speeds.
Until the same day the trained families had 12 scenarios, 1-8 in training; scenarios 13-24 came
with seeds of their own, so 1-12, the held-out 9-12 among them, are the same runs as before.
Later that day the held-out sets grew (scenarios 25-36 of a trained road, 13-24 of an unseen
one, new seeds; the training scenarios and the models stayed the same): 4 held-out scenarios of
a trained road had 2-8 detectable incidents, too few to tell a minute to detect apart on one road.

A scenario is 4 h from 06:00 UTC (demand peaks at 08:00), demand scaled 0.45-1.2 of capacity,
3 incidents (a **breakdown**: a stopped vehicle blocking one lane; or a **closure** of 1 to
lanes-1 lanes, from the left, of the next segment), one **slowdown without incident** (a speed limit of 45-70% of the
free speed over two segments), rain in 30% of them (drivers at 80-90% of their speed, longer
headways) and a **failing loop** in 60% (silent, stuck as the `sensor_health` stage passes it, or
noisy). Incidents block the road downstream of their segment's loop, so the queue reaches
that loop first.

**The project's simulator** (`pipeline/src/simulator`): 24 road segments in 3 corridors of 8, a
cell-transmission traffic model (queues form and spread upstream), weekday and weekend demand
profiles, rain that lowers capacity, and 12 injected incidents per day (a segment's capacity cut
to 30-70% for 10-40 minutes). Loop detectors report every 30 s per lane with duplicates,
re-sends, out-of-order and malformed messages, which the pipeline decodes, deduplicates and
windows into one-minute rows per segment (`models/train/sim.yaml`). Training: 21 days from
Monday 2026-03-02, seed 1; held out: 7 days from Monday 2026-04-06, seed 2 (other incidents,
other noise, another draw of segment lengths). In training, SUMO's rows are repeated so that
they are half of what an epoch visits.

**Transfer.** The networks see speeds as shares of the segment's free speed, and neither the
free speed itself nor vehicles per hour (which depends on the lane count): a queue on a
50 km/h arterial and on a 120 km/h freeway look alike. The incident detector also scales its
occupancies by (free speed / 100 km/h) ^ {occ_scale}: a slow road's critical occupancy is higher, and
unscaled, the arterial's ordinary queues looked like incidents on faster roads. That arithmetic is the head of each ONNX
graph, so the model input stays the {n_features} features below (each model reads its own columns of them:
the congestion forecaster {congestion_inputs}, the incident detector {incident_inputs}, the same and the last
minutes one by one).

`generate.py`, `sumo_scenarios.py` and `train.py` regenerate data, models, metrics, fixtures and
these cards from scratch (seeded).
"""

FEATURES_MD = f"## Features (input `features`, float32 `[batch, {len(F.FEATURES)}]`, in this order)\n" + "\n".join(
    f"{i}. `{n}` ({FEATURE_DOC[n][0]}): {FEATURE_DOC[n][1]}" for i, n in enumerate(F.FEATURES)
) + "\n\nDefinition: `models/train/features.py`; the `features` stage (`models/src/features/`) computes the same rows in the stream (tested against the Python code).\n"


def spans(numbers):
    """sorted scenario numbers as runs: [9, 10, 11, 12, 25, 26] -> `9-12 and 25-26`"""
    runs = []
    for k in sorted(numbers):
        if runs and k == runs[-1][1] + 1:
            runs[-1][1] = k
        else:
            runs.append([k, k])
    return " and ".join(f"{a}-{b}" if a != b else str(a) for a, b in runs)


def held_out_scenarios(family):
    """a trained family's held-out scenario numbers (sumo_scenarios.py)"""
    return [k for k in range(1, S.FAMILIES[family]["scenarios"] + 1) if not S.in_training(family, k)]


def families_md():
    """the Data section's table of SUMO road families (sumo_scenarios.py)"""
    out = [row(["family", "free speed", "lanes", "ramps", "scenarios", "in training"]), row(["---"] * 6)]
    for name, spec in S.FAMILIES.items():
        trained = (f"all but {spans(held_out_scenarios(name))}" if name in S.TRAIN_FAMILIES
                   else "no: held out whole")
        out.append(row([f"`{name}`", f"{spec['free_kmh']} km/h", spec["lanes"],
                        "on- and off-ramp" if spec["ramps"] else "no", spec["scenarios"], trained]))
    return "\n".join(out)


def data_md(m):
    """the Data section, with the incident detector's occupancy exponent from the metrics; the
    family table comes from sumo_scenarios.py, which must describe the data `m` was trained on"""
    trained = sum(S.in_training(f, k) for f, spec in S.FAMILIES.items() for k in range(1, spec["scenarios"] + 1))
    if m["trained_on"]["sumo_scenarios"] != trained:
        raise SystemExit(f"models/metrics.json was trained on {m['trained_on']['sumo_scenarios']} SUMO scenarios, "
                         f"sumo_scenarios.py describes {trained}: run train.py on its data (or restore its counts)")
    return (DATA.replace("{families}", families_md()).replace("{occ_scale}", str(m["incident"]["occ_scale"])).replace("{n_features}", str(len(F.FEATURES)))
            .replace("{congestion_inputs}", str(m["congestion"]["inputs"])).replace("{incident_inputs}", str(m["incident"]["inputs"])))


def source(name, m):
    """a held-out set's title; `m` the metrics, which name the SUMO families trained on"""
    if name == "simulator":
        return "the project's simulator, 7 held-out days (seed 2)"
    if name in m["trained_on"]["sumo_families"]:
        held = held_out_scenarios(name)
        return (f"SUMO `{name}`, {len(held)} held-out scenarios: {spans(held)} "
                f"(the family's other {S.FAMILIES[name]['scenarios'] - len(held)} are in training)")
    return f"SUMO `{name}`, a family never seen in training"


def row(cells):
    return "| " + " | ".join(str(c) for c in cells) + " |"


def regression_table(block):
    out = [row(["predictor", "horizon", "MAE km/h", "RMSE km/h", "MAPE %"]), row(["---"] * 5)]
    for name, hs in block.items():
        for hz, v in hs.items():
            out.append(row([name, hz, v["mae"], v["rmse"], v["mape"]]))
    return out


def congestion(m):
    c = m["congestion"]
    out = ["# Model card: congestion forecaster", "",
           "Predicts each segment's mean speed (km/h, the mean over the 5 minutes ending at the horizon) "
           "at +15, +30 and +60 minutes, once per segment and minute. Output `speed_kmh`, float32 "
           "`[batch, 3]`. A multilayer perceptron on standardized features that predicts the change "
           "from `speed_5m`, trained with a Huber loss; the standardization, the residual and a floor "
           "at 0 km/h are inside the ONNX graph.", "",
           "## Files", "", row(["file", "sha256", "bytes", "layers", "latency µs (batch 1 / 64 / 1024, Python ORT, 1 thread)"]),
           row(["---"] * 5)]
    k = c["inputs"]
    layers = {"congestion_fp32": f"{k}-64-64-3 fp32", "congestion_int8": f"{k}-64-64-3, int8 weights and activations past the first layer (static quantization: scales fixed at export)",
              "congestion_small": f"{k}-16-3 fp32"}
    for name, e in c["models"].items():
        lat = e["latency_us"]
        out.append(row([f"`{e['file']}`", f"`{e['sha256']}`", e["bytes"], layers[name], f"{lat['1']} / {lat['64']} / {lat['1024']}"]))
    out += ["", data_md(m), FEATURES_MD]
    out += ["## Held-out summary: MAE (km/h) at +15 / +30 / +60 min", "",
            row(["held-out set", "persistence", "historical average", "congestion_fp32", "congestion_small",
                 "congested: historical average", "congested: congestion_fp32", "congested: congestion_small"]),
            row(["---"] * 8)]
    mae = lambda b, k: " / ".join(str(b[k][h]["mae"]) for h in ("+15m", "+30m", "+60m"))  # noqa: E731
    for src, h in c["held_out"].items():
        a, g = h["all"], h["congested"]
        out.append(row([source(src, m), mae(a, "baseline: persistence"), mae(a, "baseline: historical average"),
                        mae(a, "congestion_fp32"), mae(a, "congestion_small"), mae(g, "baseline: historical average"),
                        mae(g, "congestion_fp32"), mae(g, "congestion_small")]))
    out += ["", "The historical average of a SUMO family is the mean of the road's other scenarios (same segment, "
            "15-minute slot), whatever their demand and rain: it knows the road, which the models never saw for a "
            "held-out family, but not the day's demand. These MAEs are "
            "METR-LA-shaped: horizons 15, 30 and 60 minutes, each target the 5-minute mean speed ending there, and "
            "masked (a target with fewer than 3 of its 5 minutes present is left out, as METR-LA leaves out zeros).", ""]
    for src, h in c["held_out"].items():
        out += [f"## Held-out metrics: {source(src, m)}", "", f"{h['rows']} segment-minutes with a target.", ""]
        out += regression_table(h["all"])
        if h["congested_share"] > 0:
            out += ["", f"Congested minutes only ({h['congested_share'] * 100:.1f}%: below 70% of free speed now or at the horizon):", ""]
            out += regression_table(h["congested"])
        else:
            out += ["", "No minute of this set is below 70% of free speed now or at a horizon: "
                    "the lane closures slow traffic, but not that far for that long."]
        out.append("")
    out += ["## Evaluation sample", "",
            "`models/testdata/eval_sample.csv`: 512 held-out simulator rows (400 at random, 112 during incidents). "
            "MAE (km/h) at +15 / +30 / +60 on it, which the Rust tests reproduce:", ""]
    for name, e in c["models"].items():
        out.append(f"- `{name}`: " + " / ".join(str(v) for v in e["eval_sample_mae"]))
    out += ["", "## Limits", "",
            "- Trained on simulated traffic only (two simulators; the project's simulator's corridors and four SUMO road families); a real city needs retraining on its own detectors.",
            "- No weather input: rain lowers capacity in the project's simulator, but the features stage reads "
            "traffic only (a stage has one input schema), so rain shows only through speeds.",
            "- Segments of one road graph; a segment without neighbours uses its own values.",
            "- What a queue does an hour ahead is mostly the daily profile: where the historical average "
            "knows the road, it is hard to beat in congested minutes at +60 min (see the summary; "
            "`models/train/congestion_significance.py` gives each difference's interval: at +60 the "
            "forecasters tie it on the simulator, and lead within the noise on `freeway120` and `highway100`).",
            "- On the unseen roads neither the 16-unit `congestion_small` nor the 64-64 `congestion_fp32` wins "
            "everywhere (see the summary for where each wins); the small one costs about half the time per batch: "
            "the pipeline configs (`deploy/local.yaml`, `deploy/kafka.yaml`, the Helm chart) run it, and "
            "`deploy/local.yaml` runs fp32 beside it as the shadow candidate (`predictions_shadow`).", ""]
    return "\n".join(out)


def incident(m):
    c = m["incident"]
    out = ["# Model card: incident detector", "",
           "Scores the probability that an incident (a stopped vehicle or closed lane) blocks a segment "
           "in the current minute. Output `incident_prob`, float32 `[batch, 1]`: the mean of the probabilities of "
           f"{c['networks']} multilayer perceptrons of one recipe (seeds {', '.join(map(str, c['seed_spread']['seeds'][0]))}; their "
           "first layers are one product in the graph), each "
           f"({c['inputs']}-{'-'.join(str(h) for h in c['hidden'])}-1 over {c['inputs']} of the {len(F.FEATURES)} features: the "
           f"congestion forecaster's {m['congestion']['inputs']} and the last {F.RECENT_MINUTES} minutes one by one, of the segment and its "
           "neighbours; sigmoid) trained with class-balanced cross-entropy "
           "(the minutes of incidents that leave no trace, and those while an incident's queue clears, weigh nothing); an alarm is `incident_prob >= "
           "threshold`, the threshold set on the training data for a false alarm rate of "
           f"{c['target_false_alarm_rate']} (share of incident-free segment-minutes). Speeds enter as shares "
           f"of the free speed, occupancies times (free speed / 100 km/h) ^ {c['occ_scale']} (see Data).", "",
           "## Files", "", row(["file", "sha256", "bytes", "threshold", "open_at_once (the rule before)", "latency µs (batch 1 / 64 / 1024, Python ORT, 1 thread)"]),
           row(["---"] * 6)]
    for name, e in c["models"].items():
        lat = e["latency_us"]
        out.append(row([f"`{e['file']}`", f"`{e['sha256']}`", e["bytes"], e["threshold"], e["open_at_once"],
                        f"{lat['1']} / {lat['64']} / {lat['1024']}"]))
    t = c["california7_thresholds"]
    r, b = c["alert_rules"]["incident_alerts"], c["alert_rules"]["incident_alerts_before"]
    out += ["", data_md(m), FEATURES_MD,
            "## Held-out metrics", "",
            "An incident is **detectable** when, while it lasts, a detector at most "
            f"{c['detectable']['reach_segments']} segments from it has its 5-minute mean speed "
            f"{int(c['detectable']['speed_drop'] * 100)}% (and 5 km/h) below its mean of the 15 minutes before: "
            "a breakdown at light demand often leaves no trace at all. Detection rate: share of detectable incidents "
            "with an alarm while they last on their segment or, for a SUMO closure, on the segment downstream whose lanes it "
            "closes (its detector is in the closure, so an alarm there is at the incident; earlier cards counted it "
            "as neither a detection nor a false alarm) (`all`: of every incident). False alarms: alarm onsets "
            "in incident-free segment-minutes (excluding 10 minutes after an incident, while its queue clears, and a closure's "
            "closed segment while it lasts and clears; training still counts those minutes calm: with no weight on them, every seed raised more false "
            "alarms on `arterial50`), per "
            "corridor-hour (8 segment-hours); the false alarm rate is the alarmed share of those minutes. Time to "
            "detect: first alarm minus the incident's start, minutes, over the detected detectable incidents (the "
            "one-minute windows close on the minute, so it includes up to a minute of windowing). California #7 runs "
            f"with thresholds t1={t['t1_occdf']}, t2={t['t2_occrdf']}, t3={t['t3_docc']}, calibrated on the training "
            "data for the same false alarm rate (best detection rate on a grid); the `california7` stage "
            "(`models/src/california.rs`) runs them. Rows without a suffix count every alarmed minute; the "
            "rows `, alert rule` count what a control center sees: the alerts the deployed rules open "
            "(`deploy/local.yaml`; train.py's `alert_rule` is the `alert` stage's state machine): "
            "`incident_alerts` raises at the model's threshold; a pending alert gathers the log-odds of its "
            "scores over that level (ln(p / (1 - p)) minus the threshold's, per minute, the sum never below 0, "
            f"where it lapses, nor above the sum that opens it) and opens once they sum to {r['open_on_evidence']} (`open_on_evidence`: one very "
            "sure minute opens at once, middling ones in a row later; a score below "
            f"`clear: {r['clear']}` never opens it, and ends an open alert; a minute in which California #7 alarms on "
            f"a segment whose score reached {r['confirm']['after']} within the last {r['confirm']['within_min']} minutes, "
            "that one included, counts as a sure one, a score of 1, which opens at once: `confirm`, since 2026-12-07), "
            f"`california_alerts` at the first alarmed minute, both with {r['cooldown_min']} minutes of quiet "
            "after a resolve, and both joining: an alarm that starts while a segment at most "
            f"{c['alert_rules']['join_within']} segments up- or downstream is alarmed joins that segment's alert "
            "(`join`), so it is no alert and no false alarm of its own, and the alert it joined detects its "
            "incident; the row `without California #7's confirmation` is the incident rule without `confirm` "
            "(deployed until 2026-12-07); the row `before (3 within 4 minutes)` is the rule deployed before `open_on_evidence` "
            f"(until 2026-12-07): it opened once {b['open_after'][0]} scores at or above the threshold fell within "
            f"{b['open_after'][1]} minutes, or at once on a score at or above `open_at_once` (the level with a false "
            f"alarm rate of {c['open_at_once_far']} on the training data). The false alarms `near an incident` are those on another segment at most "
            f"{c['detectable']['reach_segments']} segments from an incident while it lasts or clears (its queue): "
            "counted as false alarms, and shown apart because they point at a real incident. "
            "`incident_int8` has unsigned 8-bit weights and 8-bit activations past its first layer, their scales "
            f"fixed at export (static quantization, calibrated on {c['calibration_rows']:,} training rows): a row's score does not "
            "depend on the rows scored with it.", "",
            row(["held-out set", "detector", "incidents (detectable)", "detection rate (all)", "false alarms / corridor-hour",
                 "of them near an incident", "false alarm rate", "mean time to detect (min)"]), row(["---"] * 8)]
    for src, dets in c["held_out"].items():
        label = source(src, m)
        for name, v in dets.items():
            out.append(row([label, name, f"{v['incidents']} ({v['detectable']})", f"{v['detection_rate']} ({v['detection_rate_all']})",
                            v["false_alarms_per_corridor_hour"], v["near_incident_per_corridor_hour"], v["false_alarm_rate"],
                            v["mean_time_to_detect_min"]]))
    out += by_condition_md(c["by_condition"])
    out += held_out_conditions_md(c["held_out_conditions"])
    spread = c["seed_spread"]
    out += ["", "### How much the seed decides", "",
            f"The detector again with the seeds {'; '.join(', '.join(map(str, s)) for s in spread['seeds'])} (the deployed file's "
            f"are {', '.join(map(str, spread['seeds'][0]))}; each detector the mean of {len(spread['seeds'][0])} networks), each "
            "calibrated on the training data, through the deployed rule: lowest and highest over the detectors. One network's "
            "false alarms moved more with its seed (five seeds of the former 18-input network, trained before `arterial60`: `arterial50` 0.55-1.02 "
            "per corridor-hour, `highway100` 0.07-0.47), its times to detect less (`motorway130` 2.04-3.41 minutes). A difference between two detectors smaller than this spread says "
            "little; the detector's design (its hidden sizes, the occupancy exponent) was chosen on single seeds.", "",
            row(["held-out set", "detection rate", "false alarms / corridor-hour", "mean time to detect (min)"]),
            row(["---"] * 4)]
    for src, v in spread["held_out"].items():
        out.append(row([source(src, m), *(f"{lo} - {hi}" for lo, hi in (v["detection_rate"], v["false_alarms_per_corridor_hour"],
                                                                          v["mean_time_to_detect_min"]))]))
    out.append("")
    out += ["## Evaluation sample", "",
            "`models/testdata/eval_sample.csv` (512 held-out simulator rows, 112 of them during incidents): log loss "
            "and alarms at the threshold, which the Rust tests reproduce:", ""]
    for name, e in c["models"].items():
        out.append(f"- `{name}`: log loss {e['eval_sample_log_loss']}, {e['eval_sample_alarms']} alarms")
    out += ["", "## Limits", "",
            "- Simulated incidents only: capacity drops (project simulator), breakdowns and lane closures (SUMO).",
            "- No camera input yet: stalled-vehicle detections are a separate stream with its own schema, "
            "and the features stage reads traffic only (the `stalled_vehicle` alert rule covers them).",
            "- A segment at the end of a corridor has no downstream neighbour, so its occupancy "
            "difference is 0 and California #7 never fires there.",
            "- Mild incidents at low demand leave no trace in the detectors: no detector here finds them.",
            "- Each SUMO held-out set has 48 to 72 incidents, of which 18 to 45 are detectable: its rates are coarse "
            "(one detectable incident is 100 / that count points of detection rate), and a minute to detect on "
            "one road is within the noise (`models/train/detection_times.py` gives the paired intervals).",
            "- Without California #7's confirmation it misses lane closures whose score peaks once at the queue's onset "
            "and falls as the queue settles (`models/train/missed_incidents.py`): one minute short of the sure level "
            "gathers less than the alert rule's sum needs, and the minutes after take it back. The confirmation "
            f"catches those that California #7 alarms on within {r['confirm']['within_min']} minutes of the peak (one of "
            "the two on `highway100`; the other it alarms on 3 minutes in), not the `motorway130` closure that both "
            "miss; it also opens one or two false alarms more on some roads, where California #7 alarms near a sure "
            "minute without an incident.",
            "- `detectable` is a speed drop near the incident; a slowdown from another cause at the same time "
            "(the morning peak, a ramp queue) can make an incident count as detectable too.", ""]
    return "\n".join(out)


def by_condition_md(rows):
    """the held-out SUMO scenarios by condition (train.py's `by_condition`), both deployed rules
    side by side"""
    cal, model = "California #7, alert rule", "incident_fp32, alert rule"
    out = ["", "### Held-out SUMO scenarios by condition", "",
           "Every held-out SUMO scenario (the two unseen families and the held-out scenarios of the four "
           "trained ones), grouped by what `sumo_scenarios.py` drew for it (`models/train/conditions.py`), through "
           "the deployed rules (`, alert rule` above): where the detectors fail, whatever the road. A group pools "
           "roads of different speeds, and the draws are not spread evenly over the families (see each group's "
           "scenarios by family: a condition met mostly on an unseen road is confounded with that road); the "
           "incident kinds share every scenario's minutes, so their false alarms are those of the whole set.", "",
           row(["condition", "group", "scenarios (by family)", "incidents (detectable)", "detection rate: California #7 / incident_fp32",
                "false alarms / corridor-hour: California #7 / incident_fp32",
                "mean time to detect (min): California #7 / incident_fp32"]), row(["---"] * 7)]
    dash = lambda v: "-" if v is None else v  # noqa: E731
    for r in rows:
        a, b = r[cal], r[model]
        by_family = ", ".join(f"{f} {n}" for f, n in sorted(r["families"].items())) if r["families"] else "all"
        out.append(row([r["condition"], r["group"], f"{r['scenarios']} ({by_family})", f"{b['incidents']} ({b['detectable']})",
                        f"{dash(a['detection_rate'])} / {dash(b['detection_rate'])}",
                        f"{dash(a['false_alarms_per_corridor_hour'])} / {dash(b['false_alarms_per_corridor_hour'])}",
                        f"{dash(a['mean_time_to_detect_min'])} / {dash(b['mean_time_to_detect_min'])}"]))
    return out


def held_out_conditions_md(conditions):
    """train.py's `held_out_conditions`: the recipe trained without a condition against the same
    recipe trained on everything, on the held-out scenarios with and without the condition"""
    out = ["", "### Conditions held out of training", "",
           "Rain is drawn in every family and ramps are on two of the four trained ones, so the families held "
           "out whole do not test them. Here one network of the detector's recipe is trained three more times for each (the deployed "
           "detector is the mean of three): on every training row "
           "(the control: seed 13, with its own shuffling seed), without the rows "
           "in the condition (the SUMO training scenarios with it; for rain also the project's simulator's "
           "showers and the hour after each, from its `ground_truth/weather.csv`) and without as many rows chosen without regard to the condition "
           "(described below). Each is calibrated on its "
           "own training rows as the deployed file is and runs through the deployed rule on the held-out "
           "SUMO scenarios with the condition and without it, beside the deployed rules. The control and "
           "the model trained without the condition differ in the rows left out; compare their "
           "difference with the seed spread below. Leaving the condition out also leaves less to learn from "
           "(rain: 30% of the SUMO training scenarios and a fifth of the simulator's rows; ramps: half "
           "of the SUMO scenarios): where the model trained without it also loses on the scenarios without the "
           "condition, part of its loss is the smaller training set, not the condition. The rest of the recipe "
           "adapts to what is left: SUMO's rows are repeated to half of what an epoch visits, the classes "
           "balanced and the levels calibrated anew, so the models compared may sit at different false alarm "
           "levels (read the rates together). The size-matched control (`recipe trained without as many rows, "
           "at random`) separates the smaller training set from the condition as far as row counts go: it "
           "leaves out as many SUMO training scenarios, drawn at random from all of them, and as many of the "
           "simulator's rows, those of the condition's minutes moved 12 hours later. It matches neither the "
           "incident minutes left out (the moved minutes may hold more or fewer) nor the operating point, and "
           "it keeps some of the condition. One draw: its difference from the control is no more certain "
           "than the seed spread below.", "",
           *[f"- {cond}, size-matched control: {c['size_matched']['sumo_scenarios']} SUMO scenarios "
             f"({c['size_matched']['sumo_scenarios_with_condition'][cond]} with {cond}), "
             f"{c['size_matched']['simulator_rows']:,} simulator rows "
             f"({c['size_matched']['simulator_rows_with_condition'][cond]:,} with {cond})"
             for cond, c in conditions.items()], "",
           row(["held out", "trained without it", "held-out scenarios (by family)", "detector", "incidents (detectable)",
                "detection rate (all)", "false alarms / corridor-hour", "mean time to detect (min)"]), row(["---"] * 8)]
    for cond, c in conditions.items():
        t = c["trained_without"]
        trained = (f"{t['sumo_scenarios']} of {c['trained_on_everything']['sumo_scenarios']} SUMO scenarios, "
                   f"{t['simulator_rows']:,} of {c['trained_on_everything']['simulator_rows']:,} simulator rows")
        for group, g in c["held_out"].items():
            by_family = ", ".join(f"{f} {n}" for f, n in sorted(g["families"].items()))
            for name, v in g["detectors"].items():
                out.append(row([c["what"], trained, f"{group}: {g['scenarios']} ({by_family})", name,
                                f"{v['incidents']} ({v['detectable']})", f"{v['detection_rate']} ({v['detection_rate_all']})",
                                v["false_alarms_per_corridor_hour"], v["mean_time_to_detect_min"]]))
    return out


def main():
    m = json.loads((MODELS / "metrics.json").read_text())
    (MODELS / "congestion.md").write_text(congestion(m))
    (MODELS / "incident.md").write_text(incident(m))


if __name__ == "__main__":
    main()
