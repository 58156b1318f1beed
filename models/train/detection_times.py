"""Each detectable held-out incident's time to detect, through the deployed rules, paired
between the incident detector and California #7: where the card's mean times differ, which
incidents make the difference. After train.py (it reads models/metrics.json):

    cd models/train && ../../.venv/bin/python detection_times.py   # about a minute

Two ways to count a detection, both printed:
- `card`: the first minute the incident's segment (or, for a SUMO closure, the segment whose
  lanes it closes: `T.first_alarm_minutes`) has an open alert while the incident lasts
  (train.py's `detection_metrics`, the cards' and the README's numbers). An alert that opened
  before the incident and is still open when it starts detects it at its first minute.
- `alert starts`: only an alarm that starts on those segments while the incident lasts
  detects it, so an alarm that was on before the incident (a queue at a ramp's merge, say)
  detects nothing; a detector whose alert stays open through the incident, or is in its quiet
  time after one, misses it. An alarm that starts then and joins a neighbour's open alert counts,
  as on the card (the alert it joins names its segment).

For each set: the incidents both detectors detect and their mean times there, the mean of the
paired differences (model minus California #7) with a 95% interval (a bootstrap over those
incidents, 2000 draws, seeded), on how many of them each is sooner, the incidents only one
detects, and the incidents where the two differ by more than 3 minutes.

On 2026-12-06 (the card's count), the paired differences where the card has the model later:
`arterial50` +0.56 minutes [95%: -0.69, +2.00] over the 16 incidents both detect (the card's
means, each over the incidents its detector finds, differ by 0.12), `motorway130` +0.88 [-2.38,
+5.25] over 8 (counting alert starts, -1.00 [-3.14, +0.43] over 7), `urban70` +1.00 over 2
(both 1 minute later: too few to test, whatever the interval). Neither of the first two is
shown later, nor sooner. Only the simulator's lead is outside the noise (-0.75 [-1.00, -0.50]
over 36); `freeway120`'s -0.94 [-2.35, +0.06] over 17 is not quite. The held-out roads have
too few incidents to tell a minute apart on one road; with 7-8 skewed differences a
percentile interval also covers less than 95%.

Later that day, on the larger held-out sets (16 scenarios of a trained road, 24 of an unseen
one; the card's count): `arterial50` +0.18 [-0.64, +1.11] over 28, `urban70` +0.22 [-0.11,
+0.56] over 18, `motorway130` -0.15 [-1.24, +1.06] over 34, `arterial60` -0.22 [-1.26, +0.61]
over 23, `freeway120` -0.71 [-1.83, +0.49] over 41, `highway100` -0.86 [-2.27, +0.00] over 22.
Still only the simulator's lead is outside the noise.

Both paragraphs above count only the incident's own segment. Later still that day, with an
alert on a closure's closed segment detecting it: `highway100` -0.67 [-2.08, +0.33] over 24,
`freeway120` -0.05 [-1.23, +1.34] over 44, `motorway130` +0.03 [-1.15, +1.32] over 34,
`arterial50` +0.19 [-0.58, +1.06] over 31, `urban70` +0.22 [-0.11, +0.56] over 18, `arterial60`
+0.26 [-1.26, +1.83] over 23; the simulator unchanged (it has no closures). California #7
often alarms on the closed segment first, so the model's leads of the count before shrink.

On 2026-12-07, with the deployed rule gathering evidence (`open_on_evidence`; the paragraphs
above had 3 raises within 4 minutes or one at `open_at_once`): the simulator -0.81 [-1.08,
-0.53] over 36 and `urban70` -0.44 [-0.67, -0.22] over 18 are sooner outside the noise;
`highway100` -0.83 [-2.42, +0.29] over 24, `freeway120` -0.52 [-1.64, +0.59] over 44,
`arterial60` -0.35 [-1.83, +1.09] over 23, `motorway130` -0.32 [-1.29, +0.76] over 34 and
`arterial50` +0.03 [-0.61, +0.77] over 31 are not.

Later on 2026-12-07, with California #7 confirming the scores (`T.MODEL_CONFIRM`): the
simulator -0.86 [-1.11, -0.64] over 36 and `urban70` -0.44 [-0.67, -0.22] over 18 are sooner
outside the noise; `highway100` -0.80 [-2.28, +0.28] over 25, `freeway120` -0.77 [-1.80,
+0.25] over 44, `arterial60` -0.43 [-1.87, +0.96] over 23, `motorway130` -0.35 [-1.38, +0.71]
over 34 and `arterial50` -0.32 [-0.77, +0.13] over 31 are not (counting alert starts,
`motorway130` -0.76 [-1.52, -0.09] over 33).
"""

from __future__ import annotations

import json

import numpy as np

import train as T

FAR_APART_MIN = 3.0  # a difference worth listing
DRAWS = 2000


def paired_interval(diffs, rng):
    """the mean of `diffs` and its 95% bootstrap interval"""
    diffs = np.asarray(diffs, dtype=np.float64)
    means = diffs[rng.integers(0, len(diffs), (DRAWS, len(diffs)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(diffs.mean()), float(lo), float(hi)


def first_alerts(d, opened, starts_only):
    """{detectable incident's id: minutes from its start to its first detecting row, or None}: a
    row of its segment (or a closure's closed segment) while it lasts with an open alert
    (`starts_only`: one whose alert opens there), as `T.first_alarm_minutes` counts the card's"""
    if starts_only:
        opened = T.alert_onsets(d, opened)
    return {inc["id"]: m for inc, m in zip(d["incidents"], T.first_alarm_minutes(d, opened)) if inc["detectable"]}


def deployed_levels():
    """the deployed rules' levels in models/metrics.json: incident_fp32's raise level and
    `open_at_once`, and California #7's thresholds (t1, t2, t3)"""
    m = json.loads((T.MODELS / "metrics.json").read_text())["incident"]
    e, t = m["models"]["incident_fp32"], m["california7_thresholds"]
    return e["threshold"], e["open_at_once"], (t["t1_occdf"], t["t2_occrdf"], t["t3_docc"])


def deployed(score=None):
    """the deployed rules (`T.deployed_rules`: the incident detector's, then California #7's) at
    the levels of models/metrics.json; `score(d)` the detector's scores of a data set (default:
    incident_fp32.onnx run on it)"""
    if score is None:
        sess = T.session(T.MODELS / "onnx" / "incident_fp32.onnx")
        score = lambda d: T.run(sess, d["x"])[:, 0]  # noqa: E731
    return T.deployed_rules(score, *deployed_levels())


def paired(d, model, california, starts_only, rng):
    """The detectable incidents' first detections by the model's alerts `model` and California
    #7's `california` (`first_alerts`), the incidents both detect, and the paired difference in
    minutes there, model minus California #7, with its interval (`paired_interval`; None if
    both detect none); (a, b, both, interval)."""
    a, b = first_alerts(d, model, starts_only), first_alerts(d, california, starts_only)
    both = [k for k in a if a[k] is not None and b[k] is not None]
    return a, b, both, paired_interval([a[k] - b[k] for k in both], rng) if both else None


def main():
    (model_name, model_rule), (cal_name, cal_rule) = deployed().items()
    _, sumo_tests, _ = T.sumo_runs(T.HERE / "data")
    tests = {"simulator": T.load(T.HERE / "data" / "test"), **{f: T.combine(runs) for f, runs in sumo_tests.items()}}
    print(f"model: {model_name}; California #7: {cal_name}")
    rng = np.random.default_rng(0)
    for name, d in tests.items():
        model, california = model_rule(d), cal_rule(d)
        for how, starts_only in (("card", False), ("alert starts", True)):
            a, b, both, difference = paired(d, model, california, starts_only, rng)
            line = (f"{name} ({how}): {len(a)} detectable; both detect {len(both)}")
            if difference:
                diff, lo, hi = difference
                line += (f", mean minutes there model {np.mean([a[k] for k in both]):.2f} / California #7 "
                         f"{np.mean([b[k] for k in both]):.2f}, model minus California #7 {diff:+.2f} "
                         f"[95%: {lo:+.2f}, {hi:+.2f}], model sooner on {sum(a[k] < b[k] for k in both)}, "
                         f"later on {sum(a[k] > b[k] for k in both)}")
            only_a = [k for k in a if a[k] is not None and b[k] is None]
            only_b = [k for k in a if a[k] is None and b[k] is not None]
            line += f"; only the model {len(only_a)}, only California #7 {len(only_b)}"
            print(line)
            for k in both:
                if abs(a[k] - b[k]) > FAR_APART_MIN:
                    print(f"    {k}: model {a[k]:.2f}, California #7 {b[k]:.2f}")
            for k in only_a + only_b:
                print(f"    {k}: model {a[k] if a[k] is None else round(a[k], 2)}, California #7 "
                      f"{b[k] if b[k] is None else round(b[k], 2)}")


if __name__ == "__main__":
    main()
