"""Writes the model cards (models/congestion.md, models/incident.md) from models/metrics.json.

    python models/train/cards.py      # train.py runs it at the end

Each card lists every variant with its file's SHA-256: models/tests/onnx.rs checks that the
committed files still have those checksums and reach the stated metrics on the committed
evaluation sample.
"""

import json
import pathlib

import features as F

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
}

DATA = """## Data
Two sources, both in the pipeline's one-minute window format (`traffic_minutes`); the models
train on both together and each is evaluated on its own held-out part.

**Eclipse SUMO** (`models/train/sumo_corridor.py`, PyPI `eclipse-sumo`): a microscopic
simulation of a 4 km, 3-lane corridor of 8 segments with one induction loop per lane and
segment (30 s periods), a morning demand profile scaled per scenario, and 2 lane closures per
scenario (1 or 2 of 3 lanes for 10-30 min; vehicles merge past them). 16 scenarios of 6 h from
05:00 UTC on consecutive days of May 2026: 1-12 train, 13-16 held out.

**The project's simulator** (`pipeline/src/simulator`): 24 road segments in 3 corridors of 8, a
cell-transmission traffic model (queues form and spread upstream), weekday and weekend demand
profiles, rain that lowers capacity, and 12 injected incidents per day (a segment's capacity cut
to 30-70% for 10-40 minutes). Loop detectors report every 30 s per lane with duplicates,
re-sends, out-of-order and malformed messages, which the pipeline decodes, deduplicates and
windows into one-minute rows per segment (`models/train/sim.yaml`). Training: 21 days from
Monday 2026-03-02, seed 1; held out: 7 days from Monday 2026-04-06, seed 2 (other incidents,
other noise, another draw of segment lengths).

`generate.py`, `sumo_corridor.py` and `train.py` regenerate data, models, metrics, fixtures and
these cards from scratch (seeded).
"""

FEATURES_MD = "## Features (input `features`, float32 `[batch, 20]`, in this order)\n" + "\n".join(
    f"{i}. `{n}` ({FEATURE_DOC[n][0]}): {FEATURE_DOC[n][1]}" for i, n in enumerate(F.FEATURES)
) + "\n\nDefinition: `models/train/features.py`; the `features` stage (`models/src/features.rs`) computes the same rows in the stream (tested against the Python code).\n"

SOURCES = {"simulator": "the project's simulator, 7 days (seed 2)",
           "sumo": "Eclipse SUMO, 4 scenarios of 6 h (seeds 13-16)"}


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
    layers = {"congestion_fp32": "20-64-64-3 fp32", "congestion_int8": "20-64-64-3, int8 weights (dynamic quantization)",
              "congestion_small": "20-16-3 fp32"}
    for name, e in c["models"].items():
        lat = e["latency_us"]
        out.append(row([f"`{e['file']}`", f"`{e['sha256']}`", e["bytes"], layers[name], f"{lat['1']} / {lat['64']} / {lat['1024']}"]))
    out += ["", DATA, FEATURES_MD]
    for src, h in c["held_out"].items():
        out += [f"## Held-out metrics: {SOURCES[src]}", "", f"{h['rows']} segment-minutes with a target.", ""]
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
            "- Trained on simulated traffic only (two simulators); a real city needs retraining on its own detectors.",
            "- No weather input: rain lowers capacity in the project's simulator, but the features stage reads "
            "traffic only (a stage has one input schema), so rain shows only through speeds.",
            "- Segments of one road graph; a segment without neighbours uses its own values.",
            "- In congested minutes at +30 and +60 min the model is about as good as the historical "
            "average: what a queue does half an hour ahead is mostly the daily profile.", ""]
    return "\n".join(out)


def incident(m):
    c = m["incident"]
    out = ["# Model card: incident detector", "",
           "Scores the probability that an incident (a stopped vehicle or closed lane) blocks a segment "
           "in the current minute. Output `incident_prob`, float32 `[batch, 1]`. A multilayer perceptron "
           "(20-32-16-1, sigmoid) trained with class-balanced cross-entropy; an alarm is `incident_prob >= "
           "threshold`, the threshold set on the training data for a false alarm rate of "
           f"{c['target_false_alarm_rate']} (share of incident-free segment-minutes).", "",
           "## Files", "", row(["file", "sha256", "bytes", "threshold", "latency µs (batch 1 / 64 / 1024, Python ORT, 1 thread)"]),
           row(["---"] * 5)]
    for name, e in c["models"].items():
        lat = e["latency_us"]
        out.append(row([f"`{e['file']}`", f"`{e['sha256']}`", e["bytes"], e["threshold"], f"{lat['1']} / {lat['64']} / {lat['1024']}"]))
    t = c["california7_thresholds"]
    out += ["", DATA, FEATURES_MD,
            "## Held-out metrics", "",
            "Detection rate: share of incidents with an alarm on their segment while they last. False alarm "
            "rate: share of incident-free segment-minutes (excluding 10 minutes after an incident, while its "
            "queue clears) with an alarm. False alarms per day: alarm onsets there. Time to detect: first "
            "alarm minus the incident's start, minutes (the one-minute windows close on the minute, so "
            "it includes up to a minute of windowing). California #7 runs with thresholds "
            f"t1={t['t1_occdf']}, t2={t['t2_occrdf']}, t3={t['t3_docc']}, calibrated on the training data "
            "for the same false alarm rate (best detection rate on a grid); the `california7` stage "
            "(`models/src/california.rs`) runs them.", ""]
    for src, dets in c["held_out"].items():
        out += [f"### {SOURCES[src]}", "",
                row(["detector", "incidents", "detection rate", "false alarm rate", "false alarms/day", "mean time to detect (min)"]),
                row(["---"] * 6)]
        for name, v in dets.items():
            out.append(row([name, v["incidents"], v["detection_rate"], v["false_alarm_rate"], v["false_alarms_per_day"], v["mean_time_to_detect_min"]]))
        out.append("")
    out += ["## Evaluation sample", "",
            "`models/testdata/eval_sample.csv` (512 held-out simulator rows, 112 of them during incidents): log loss "
            "and alarms at the threshold, which the Rust tests reproduce:", ""]
    for name, e in c["models"].items():
        out.append(f"- `{name}`: log loss {e['eval_sample_log_loss']}, {e['eval_sample_alarms']} alarms")
    out += ["", "## Limits", "",
            "- Simulated incidents only: capacity drops (project simulator) and lane closures (SUMO).",
            "- No camera input yet: stalled-vehicle detections are a separate stream with its own schema, "
            "and the features stage reads traffic only (the `stalled_vehicle` alert rule covers them).",
            "- A segment at the end of a corridor has no downstream neighbour, so its occupancy "
            "difference is 0 and California #7 never fires there.",
            "- Mild incidents at low demand leave no trace in the detectors: no detector here finds them.",
            "- The SUMO held-out set has 8 incidents: its rates are coarse (one incident is 12.5 points of detection rate).", ""]
    return "\n".join(out)


def main():
    m = json.loads((MODELS / "metrics.json").read_text())
    (MODELS / "congestion.md").write_text(congestion(m))
    (MODELS / "incident.md").write_text(incident(m))


if __name__ == "__main__":
    main()
