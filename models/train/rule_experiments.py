"""Variants of the `incident_alerts` rule, tried on the deployed incident_fp32's scores. Each is
judged first on the training sets (the simulator's 21 days and the trained SUMO families'
training scenarios), where a variant has to pay its way, and shown on the held-out sets beside
the rule it varies. After train.py (it reads models/metrics.json and the data of generate.py
and sumo_scenarios.py):

    cd models/train && ../../.venv/bin/python rule_experiments.py [--sustain | --confirm | --evidence | --california]

`--evidence` (2026-12-07) chose the deployed rule, `open_on_evidence` (its docstring,
`evidence_grid`), and `--california` (the same day) the confirmation by California #7 deployed
with it (`T.MODEL_CONFIRM`, `confirm` in deploy/*.yaml; `california_grid`). The grids vary
`T.MODEL_RULE` on the scores alone, without that confirmation, except `--california`'s. Every other variant below, and the grid, varies the rule before it (3 raises
within 4 minutes or a score at `open_at_once`: `T.MODEL_RULE_BEFORE`), which was deployed when
they were tried ("the deployed rule" below); none of them was deployed.

Results dated before the card counted an alarm on a SUMO closure's closed segment as a detection
(later on 2026-12-06; `T.first_alarm_minutes`) count only the incident's own segment. The grid
below chose the same rule again after that change (3 within 4 minutes, 2.812 minutes over the
training sets).

The deployed rule joins an alarm that starts at most `T.RULE_JOIN` segments from an alarmed
one to that segment's alert (`join` in deploy/*.yaml); every variant below joins the same way.

- `without join` and `joined within 1`: the deployed rule, each alarm an alert of its own, or
  joined within 1 segment.
- `+ California agreement`: a raise while California #7 alarms on the same segment and minute
  opens at once (as a score at `open_at_once` does).
- `neighbour at L opens`: a raise while a segment next to it (one up- or downstream) scores
  at least L the same minute opens at once (L the raise level, 0.7 or 0.5). On 2026-12-06
  each was faster on some training sets (by up to 0.37, 0.46 and 0.75 minutes for the raise
  level, 0.7 and 0.5) and raised more false alarms there than the margin allows
  (`arterial60`'s training scenarios: 0.081, 0.136, 0.271 per corridor-hour against the
  deployed rule's 0.041).
- `sustained at L`: once an alert is pending, a later value at or above L counts as a raise
  too (only the first has to reach the raise level: hysteresis within `open_after`'s window;
  `T.alert_rule`'s `sustain`). With `--sustain`, only the deployed rule and this variant,
  for L 0.8, 0.7, 0.6, 0.5, 0.4 and `open_after` 3 within 4, 3 within 5, 4 within 5, 4
  within 6 minutes, at the deployed levels (about 4 minutes). On 2026-12-06 no variant was
  both admitted (at most MARGIN false alarms on every training set) and faster over the
  training sets than the deployed rule (2.830 minutes): with 3 within 4, L 0.8, 0.7, 0.6 and
  0.5 were 0.04-0.07 minutes faster and raised 0.054, 0.081, 0.095 and 0.163 per
  corridor-hour on `arterial60`'s training scenarios (the deployed rule 0.041); the only
  admitted ones, 4 within 5 or 6 with L 0.8, took 3.014 minutes. Held out, L 0.6 or lower finds
  one more `freeway120` incident (90% against 85%) at 0.157-0.27 false alarms per
  corridor-hour there (3 within 4).
- `--confirm` (the rule without it and this variant, each window): once an alert is pending, a
  minute whose segment speed is below S of its free speed counts as a raise and may open it
  whatever its score, and an open alert does not resolve on one, for S 0.4, 0.5, 0.6, 0.7 and
  the `--sustain` windows, at the deployed levels (about 3 minutes). It targets the misses
  `missed_incidents.py` shows: lane closures whose score peaks once at the queue's onset and
  falls while the speed stays low. On 2026-12-06 (the larger held-out sets) no variant was
  admitted. The least, S 0.4 with 4 within 5 minutes, raised 0.054 false alarms per
  corridor-hour on `arterial60`'s training scenarios against 0.027 for 4 within 5 without it
  (margin 0.05), and was no faster there (3.100 minutes over the training sets against 3.108;
  the deployed 3 within 4: 2.830). Held out it finds what it was meant to: 95.6% on
  `freeway120` (93.3% for 4 within 5 without it) and 96.2% on `highway100` (92.3%), at 0.068
  and 0 false alarms per corridor-hour there, but 0.171 on `arterial50` (0.137), which stays at
  94.1%, and 0.103 on `arterial60` (0.051). Higher S raise as many false alarms or more.
- `--california` (2026-12-07, the deployed `open_on_evidence` rule): California #7's alarm on a
  segment whose score reached a level within the last minutes opens at once (`california_grid`).
  Chosen on the training sets, it meets the detection and time targets on all seven held-out
  sets, and raises more false alarms on `arterial60` than the target allows; deployed the same
  day (`T.MODEL_CONFIRM`).
- `speed gate G`: a score counts only while the segment's speed (the lower of its 1- and
  5-minute means) is below G of its free speed; `..., open_at_once exempt`: a score at or above
  `open_at_once` counts whatever the speed.

Then the grid the deployed persistence test was chosen on (`GRID`): the raise level at a false
alarm rate of 0.002-0.004 on the training data, `open_at_once` at 5e-05 or 2e-05, `open_after`
2 within 3, 3 within 4, 3 within 5 or 4 within 5 minutes, each rule's levels calibrated on the
training data. The choice (`chosen`) looks at the training sets only: of the rules whose false
alarms per corridor-hour stay at or below MARGIN on every one of them, those within TIE of the
fastest (mean time to detect over them), and of those the one that holds a pending alert least
long (the shortest `open_after` window, then the fewest raises, then the stricter levels: the
lower false alarm rates of the raise level, then of `open_at_once`). Detection rates play no part (on
the training sets every rule of the grid finds as many). The held-out sets are shown beside it.
The tie-break came after a first pass that chose the fastest outright (3 within 5 minutes,
0.01 minutes faster over the training sets; held out one false alert more on `freeway120`).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

import train as T

KEYS = ("detection_rate", "false_alarms_per_corridor_hour", "mean_time_to_detect_min")
# the grid: raise level's false alarm rate, open_at_once's, open_after (raises, within minutes)
GRID = {"far": (0.002, 0.003, 0.004), "open_at_once_far": (5e-5, 2e-5), "open_after": ((2, 3), (3, 4), (3, 5), (4, 5))}
# false alarms per corridor-hour a rule may raise on any training set: half the target of 0.1,
# a margin for roads not trained on (the held-out roads raised about twice the training roads')
MARGIN = 0.05
# `sustain` levels tried: once pending, a value at or above it counts as a raise; with
# --sustain, over these and SUSTAIN_OPEN_AFTER
SUSTAIN = (0.7, 0.6, 0.5)
SUSTAIN_GRID = (0.8, 0.7, 0.6, 0.5, 0.4)
SUSTAIN_OPEN_AFTER = ((3, 4), (3, 5), (4, 5), (4, 6))
# `--confirm`: speed shares of the free speed below which a pending alert's minute counts as a raise
CONFIRM_SPEED = (0.4, 0.5, 0.6, 0.7)
# mean minutes to detect closer than this are a tie (rows are minutes; 3 s)
TIE = 0.05


def evaluation_sets(data, load=T.load):
    """{name: runs}: the training sets (the simulator's days, each trained SUMO family's training
    scenarios), then the held-out ones (`train: ...`, `held out: ...`)"""
    sumo_train, sumo_tests, _ = T.sumo_runs(data, load=load)
    sets = {"train: simulator": [load(data / "train")]}
    for family in sorted({r["family"] for r in sumo_train}):
        sets[f"train: {family}"] = [r for r in sumo_train if r["family"] == family]
    sets["held out: simulator"] = [load(data / "test")]
    sets.update({f"held out: {f}": runs for f, runs in sumo_tests.items()})
    return sets


def deployed_model():
    """the incident card's metrics (models/metrics.json), the deployed incident_fp32's raise level
    and `open_at_once`, and a session of it; (metrics, raise level, open_at_once, session)"""
    m = json.loads((T.MODELS / "metrics.json").read_text())["incident"]
    e = m["models"]["incident_fp32"]
    return m, e["threshold"], e["open_at_once"], T.session(T.MODELS / "onnx" / "incident_fp32.onnx")


def training_summary(cells):
    """a rule's most false alarms per corridor-hour on a training set, and its mean time to
    detect (minutes) over the training sets; `cells` its metrics by set name"""
    trained = [c for name, c in cells.items() if name.startswith("train")]
    return (max(c["false_alarms_per_corridor_hour"] for c in trained),
            float(np.mean([c["mean_time_to_detect_min"] for c in trained])))


def main():
    m, thr, at_once, sess = deployed_model()
    t = m["california7_thresholds"]
    cal_t = (t["t1_occdf"], t["t2_occrdf"], t["t3_docc"])
    sets = evaluation_sets(T.HERE / "data")
    s1, s5 = T.F.FEATURES.index("speed_1m"), T.F.FEATURES.index("speed_5m")

    def rule(d, score, sustain=None):
        return T.alert_rule(d, score, thr, **T.MODEL_RULE_BEFORE, open_at_once=at_once, sustain=sustain)

    print("detection rate, false alarms per corridor-hour, mean time to detect (min)")
    for name, runs in sets.items():
        d = T.combine(runs)
        score = T.run(sess, d["x"])[:, 0].astype(np.float64)
        deployed = rule(d, score)
        cells = {"deployed": T.detection_metrics(d, deployed, T.RULE_JOIN),
                 "without join": T.detection_metrics(d, deployed),
                 "joined within 1": T.detection_metrics(d, deployed, 1)}
        agreed = np.where(T.california7(d, *cal_t) & (score >= thr), 1.0, score)
        cells["+ California agreement"] = T.detection_metrics(d, rule(d, agreed), T.RULE_JOIN)
        for name_level, level in (("the raise level", thr), ("0.7", 0.7), ("0.5", 0.5)):
            agreed = np.where(neighbour_raised(d, score, level) & (score >= thr), 1.0, score)
            cells[f"neighbour at {name_level} opens"] = T.detection_metrics(d, rule(d, agreed), T.RULE_JOIN)
        for level in SUSTAIN:
            cells[f"sustained at {level}"] = T.detection_metrics(d, rule(d, score, level), T.RULE_JOIN)
        speed = np.minimum(d["x"][:, s1], d["x"][:, s5]) / np.maximum(d["x"][:, T.FREE_INDEX], 1.0)
        for gate in (0.9, 0.8, 0.7):
            gated = rule(d, np.where(speed < gate, score, 0.0))
            cells[f"speed gate {gate}"] = T.detection_metrics(d, gated, T.RULE_JOIN)
        for gate in (0.9, 0.85):
            gated = rule(d, np.where((speed < gate) | (score >= at_once), score, 0.0))
            cells[f"speed gate {gate}, open_at_once exempt"] = T.detection_metrics(d, gated, T.RULE_JOIN)
        line = [f"{k}: {' / '.join(str(v[key]) for key in KEYS)}" for k, v in cells.items()]
        print(f"{name}\n  " + "\n  ".join(line))
    print("\npersistence grid: detection rate / false alarms per corridor-hour / minutes to detect")
    grid(sets, lambda d: T.run(sess, d["x"])[:, 0].astype(np.float64))


def neighbour_raised(d, score, level):
    """Whether a segment next to each row's (one up- or downstream, `d`'s road graph) has a
    score at or above `level` in the same minute (each run of a combined set on its own)."""
    out = np.zeros(len(score), dtype=bool)
    bounds = d.get("bounds", np.array([0, len(score)]))
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        seg, t, high = d["seg"][lo:hi].tolist(), d["t"][lo:hi].tolist(), score[lo:hi] >= level
        raised = {(s, m) for s, m, h in zip(seg, t, high) if h}
        out[lo:hi] = [any((n, m) in raised for n in d["graph"].get(s, (None, None))[:2]) for s, m in zip(seg, t)]
    return out


def grid(sets, score, show=print):
    """The persistence grid (GRID) on every set (`sets` as `evaluation_sets` gives them) for a
    detector's scores (`score(d)` of a data set), each rule's line passed to `show`; returns the
    rule the training sets choose, (its line, its cells by set name), or None."""
    train = T.combine([r for name, runs in sets.items() if name.startswith("train") for r in runs])
    levels = score(train)
    data = {name: T.combine(runs) for name, runs in sets.items()}
    scores = {name: score(d) for name, d in data.items()}
    admitted = []
    for far in GRID["far"]:
        thr = round(T.calibrate_threshold(levels, train, far), 4)
        for at_once_far in GRID["open_at_once_far"]:
            at_once = round(T.calibrate_threshold(levels, train, at_once_far), 4)
            for open_after in GRID["open_after"]:
                rule = {**T.MODEL_RULE_BEFORE, "open_after": open_after}
                cells = rule_cells(data, scores, thr, **rule, open_at_once=at_once)
                worst, speed = training_summary(cells)
                head = f"raise {thr} (far {far}), open_at_once {at_once} ({at_once_far}), open_after {open_after}"
                head = f"{head}: training sets at most {worst} false alarms, {speed:.3f} minutes on average"
                if worst <= MARGIN:
                    admitted.append((speed, (open_after[1], open_after[0], far, at_once_far), head, cells))
                show(f"{head}\n  {cells_line(cells)}")
    picked = choose(admitted, show)
    return None if picked is None else picked[2:]


def choose(admitted, show=print):
    """Of the admitted rules, each (mean minutes over the training sets, tie-break key, its line,
    ...), the fastest within TIE, the least key among those tied, and its line passed to `show`
    (or that none was admitted); the rule's tuple, or None"""
    if not admitted:
        show(f"chosen: none within {MARGIN} on every training set")
        return None
    fastest = min(a[0] for a in admitted)
    tied = [a for a in admitted if a[0] - fastest < TIE]
    picked = min(tied, key=lambda a: a[1])
    show(f"chosen: {picked[2]} (within {TIE} minutes of the fastest: {len(tied)})")
    return picked


def cells_line(cells):
    """one line of a rule's metrics (KEYS) on every set"""
    return " | ".join(f"{name.split(': ')[1]}{' (train)' if name.startswith('train') else ''} "
                      f"{' / '.join(str(c[k]) for k in KEYS)}" for name, c in cells.items())


def rule_cells(data, scores, raise_at, per_set=lambda d: {}, **rule):
    """{set name: detection metrics} of `T.alert_rule` raising at `raise_at` with `rule` (and
    `per_set(d)`'s arguments for data set `d`) on each set's `scores`, joined as deployed"""
    return {name: T.detection_metrics(d, T.alert_rule(d, scores[name], raise_at, **rule, **per_set(d)), T.RULE_JOIN)
            for name, d in data.items()}


def scored_sets():
    """The deployed model's threshold, `open_at_once` level and session, the evaluation sets
    (their runs), each set's runs combined, and the model's scores on each"""
    _, thr, at_once, sess = deployed_model()
    sets = evaluation_sets(T.HERE / "data")
    data = {name: T.combine(runs) for name, runs in sets.items()}
    scores = {name: T.run(sess, d["x"])[:, 0].astype(np.float64) for name, d in data.items()}
    return thr, at_once, sess, sets, data, scores


def window_grid(label, levels, variant):
    """At the deployed raise and `open_at_once` levels, with each SUSTAIN_OPEN_AFTER window, the
    rule without a variant (level None) and with it at each of `levels`, on every set;
    `variant(d, level)` gives `T.alert_rule`'s arguments for it on data set `d`"""
    thr, at_once, _, _, data, scores = scored_sets()
    for level in (None, *levels):
        for open_after in SUSTAIN_OPEN_AFTER:
            rule = {**T.MODEL_RULE_BEFORE, "open_after": open_after}
            cells = rule_cells(data, scores, thr, lambda d: variant(d, level), **rule, open_at_once=at_once)
            worst, speed = training_summary(cells)
            print(f"{label} {level}, open_after {open_after}: training sets at most {worst} false alarms "
                  f"({'admitted' if worst <= MARGIN else 'over the margin'}), {speed:.3f} minutes on average\n"
                  f"  {cells_line(cells)}", flush=True)


def sustain_grid():
    """`--sustain`: `window_grid` over the SUSTAIN_GRID levels (a pending alert's later values at
    or above the level count as raises)"""
    window_grid("sustain", SUSTAIN_GRID, lambda d, level: {"sustain": level})


def confirm_grid():
    """`--confirm`: `window_grid` over the CONFIRM_SPEED shares: once an alert is pending, a minute
    whose segment speed (the minute's mean) is below that share of the free speed counts as a
    raise and may open it, and an open alert does not resolve on one"""
    s1 = T.F.FEATURES.index("speed_1m")

    def below(d, level):
        return {"confirm": None if level is None else d["x"][:, s1] / np.maximum(d["x"][:, T.FREE_INDEX], 1.0) < level}

    window_grid("confirm below", CONFIRM_SPEED, below)


# `--california`: the deployed rule without its confirmation (`T.MODEL_RULE`), and California #7's
# alarm opening at once where the segment's score reached AGREE_AFTER within the last
# AGREE_WITHIN minutes (this one included), at the deployed raise level, with the sum that
# opens at AGREE_OPENS
AGREE_AFTER = (0.95, 0.97, 0.99, 0.995)
AGREE_WITHIN = (2, 3, 5)
AGREE_OPENS = (3.98, 4.5, 5.3)


def california_grid():
    """`--california`: once California #7 alarms on a segment whose score reached `after` within
    the last `within` minutes, the minute counts as a sure one (a score of 1: the sum reaches
    the level that opens at once), for AGREE_AFTER, AGREE_WITHIN and AGREE_OPENS at the deployed
    raise level, each admitted or not as `grid` admits, and the choice as `grid` makes it
    (fastest admitted over the training sets, within TIE: the higher `after`, then the shorter
    window, then the higher sum). It targets what the rule without it misses: `highway100`'s two
    lane closures, whose score peaks once (0.997 and 0.972) in the second minute and falls
    away the next, while California #7 alarms 2.5-3 minutes in (`missed_incidents.py`).
    Deployed since 2026-12-07 (`T.MODEL_CONFIRM`; the alert stage's `confirm`, reading the
    `california7` stage's `incident` column beside the score). About 9 minutes.

    On 2026-12-07, before it was deployed ("the deployed rule" below is the rule without it;
    detection rate / false alarms per corridor-hour / minutes to detect; the
    deployed rule: 2.794 minutes over the training sets, at most 0.041 false alarms on one):
    with the sum at 3.98, `after` 0.95 and 0.97 with every window were admitted at 2.726
    minutes (at most 0.041); 0.99 and 0.995 at 2.776 and 2.782, a tie with the deployed rule.
    Chosen: 0.97 within 2 minutes. Held out, against the deployed rule: simulator 0.976 /
    0.008 / 1.81 (0.976 / 0.008 / 1.86), `arterial50` 1.0 / 0.216 / 4.64 (1.0 / 0.205 / 4.96),
    `arterial60` 1.0 / 0.12 / 3.63 (1.0 / 0.086 / 3.72), `freeway120` 1.0 / 0.034 / 3.67 (1.0 /
    0.057 / 3.92), `highway100` 0.962 / 0.017 / 3.0 (0.923 / 0.017 / 3.02), `motorway130`
    0.971 / 0.051 / 3.1 (0.971 / 0.067 / 3.13), `urban70` unchanged. Against issue 21's
    targets: detection at least 95% on all seven (`highway100` 96.2%), sooner than California
    #7 on all seven (`arterial50` 4.64 against 4.90), but at most 0.1 false alarms per
    corridor-hour on five (`arterial60` 0.12, two false alarms more there; `arterial50`
    0.216), against six of seven for each target with the deployed rule. A higher sum trades
    them back and is slower on the training sets (not chosen): at 5.3 with 0.97, 2.918
    minutes, `arterial60` 0.103 and `arterial50` 0.171-0.182 at 4.70-4.78 minutes, `highway100` still
    96.2%; with `after` 0.99 or more `highway100` stays at 92.3% whatever the sum. No cell
    meets the false alarm target on `arterial50` (0.148 at best)."""
    thr, _, _, _, data, scores = scored_sets()
    m, _, _, _ = deployed_model()
    t = m["california7_thresholds"]
    alarms = {name: T.california7(d, t["t1_occdf"], t["t2_occrdf"], t["t3_docc"]) for name, d in data.items()}
    cells = rule_cells(data, scores, thr, **T.MODEL_RULE)
    worst, speed = training_summary(cells)
    print(f"without the confirmation: training sets at most {worst} false alarms, {speed:.3f} minutes\n  {cells_line(cells)}",
          flush=True)
    admitted = []
    for h in AGREE_OPENS:
        for after in AGREE_AFTER:
            for within in AGREE_WITHIN:
                agreed = {name: np.where(alarms[name] & T.recently_reached(d, scores[name], after, within), 1.0,
                                         scores[name]) for name, d in data.items()}
                cells = rule_cells(data, agreed, thr, **{**T.MODEL_RULE, "open_on_evidence": h})
                worst, speed = training_summary(cells)
                ok = worst <= MARGIN
                head = (f"opens at {h}, California #7 within {within} minutes of a score at {after}: training sets "
                        f"at most {worst} false alarms ({'admitted' if ok else 'over the margin'}), {speed:.3f} minutes")
                if ok:
                    admitted.append((speed, (-after, within, -h), head))
                print(f"{head}\n  {cells_line(cells)}", flush=True)
    choose(admitted)


# `--evidence`: the raise level at these training false alarm rates, and the evidence that opens
# as shares of log_odds(open_at_once) - log_odds(raise level) (1: one minute at open_at_once opens)
EVIDENCE_FAR = (0.002, 0.004, 0.01, 0.02)
EVIDENCE_OPENS_AT = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)


def evidence_grid():
    """`--evidence`: the deployed rule, then `open_on_evidence` (`T.alert_rule`: a pending alert
    gathers the log-odds of its values over the raise level and opens once they sum to the
    level) over EVIDENCE_FAR and EVIDENCE_OPENS_AT, each admitted or not as `grid` admits (at
    most MARGIN false alarms per corridor-hour on every training set), and the fastest admitted
    one over the training sets (about 6 minutes).

    On 2026-12-07 (detection rate / false alarms per corridor-hour / minutes to detect): the
    rule before took 2.812 minutes over the training sets, at most 0.041 false alarms on one.
    Admitted: the raise level at 0.002 (0.8919, the rule before's) with the sum at 0.75-2 times
    5.308 (3.981: 2.794 minutes, at most 0.041; 1: 3.044) and at 0.004 (0.7457) with 1.25-2
    times (2.976 minutes or more). The fastest, 0.8919 and 3.981, is deployed (3.98). Held out,
    against the rule before: simulator 0.976 / 0.008 / 1.86 (0.976 / 0 / 1.98), `arterial50`
    1.0 / 0.205 / 4.96 (1.0 / 0.148 / 5.14), `arterial60` 1.0 / 0.086 / 3.72 (1.0 / 0.051 /
    4.32), `freeway120` 1.0 / 0.057 / 3.92 (1.0 / 0.034 / 4.41), `highway100` 0.923 / 0.017 /
    3.02 (0.923 / 0.017 / 3.19), `motorway130` 0.971 / 0.067 / 3.13 (0.971 / 0.084 / 3.48),
    `urban70` 1.0 / 0 / 2.47 (1.0 / 0 / 3.13): as fast on the training sets, sooner on every
    held-out set, and more false alarms on four of them. The sum at half the span (2.654) was
    faster still (2.522 minutes) and raised 0.095 on `arterial60`'s training scenarios.

    Again after the sum was capped at the sum that opens (a pending alert no longer carries
    evidence gathered in a cooldown past it, so the cooldown's end opens no alert on a weak
    score): the same choice, every cell of it unchanged, and four other cells with fewer false
    alarms on held-out `arterial60` (0.154, 0.086, 0.069, 0.069 against 0.172, 0.103, 0.086,
    0.086); nothing else moved."""
    thr, at_once, sess, sets, data, scores = scored_sets()
    train = T.combine([r for name, runs in sets.items() if name.startswith("train") for r in runs])
    levels = T.run(sess, train["x"])[:, 0].astype(np.float64)
    cells = rule_cells(data, scores, thr, **T.MODEL_RULE_BEFORE, open_at_once=at_once)
    worst, speed = training_summary(cells)
    print(f"the rule before (3 within 4 minutes, open_at_once): training sets at most {worst} false alarms, {speed:.3f} minutes\n  {cells_line(cells)}",
          flush=True)
    admitted = []
    for far in EVIDENCE_FAR:
        ref = round(T.calibrate_threshold(levels, train, far), 4)
        span = float(T.log_odds(at_once) - T.log_odds(ref))
        for share in EVIDENCE_OPENS_AT:
            h = round(span * share, 3)
            rule = {**T.MODEL_RULE, "open_on_evidence": h}
            cells = rule_cells(data, scores, ref, **rule)
            worst, speed = training_summary(cells)
            ok = worst <= MARGIN
            head = (f"reference {ref} (far {far}), opens at {h} ({share} of {span:.3f}): training sets at most "
                    f"{worst} false alarms ({'admitted' if ok else 'over the margin'}), {speed:.3f} minutes")
            if ok:
                admitted.append((speed, head))
            print(f"{head}\n  {cells_line(cells)}", flush=True)
    print(f"fastest admitted: {min(admitted)[1] if admitted else 'none'}")


if __name__ == "__main__":
    import sys

    if "--evidence" in sys.argv[1:]:
        evidence_grid()
    elif "--sustain" in sys.argv[1:]:
        sustain_grid()
    elif "--confirm" in sys.argv[1:]:
        confirm_grid()
    elif "--california" in sys.argv[1:]:
        california_grid()
    else:
        main()
