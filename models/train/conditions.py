"""The held-out SUMO scenarios grouped by the conditions they were generated with
(sumo_scenarios.py writes them to each scenario's report.json): weather, ramps, a failing
loop, demand, and the incident's kind. train.py scores every group with the deployed alert
rules, so the incident card says where the detectors fail, not only on which road.

A group pools the held-out scenarios of every family (whole unseen families and the held-out
scenarios of trained ones): per family, most groups would hold one to four incidents.
"""

from __future__ import annotations

# demand as a share of the road's capacity (sumo_scenarios.py draws 0.45-1.2)
LIGHT_BELOW = 0.7
OVER_CAPACITY_FROM = 1.0


def demand(meta):
    scale = meta["demand_scale"]
    if scale < LIGHT_BELOW:
        return 0, f"light (below {LIGHT_BELOW} of capacity)"
    if scale < OVER_CAPACITY_FROM:
        return 1, f"moderate ({LIGHT_BELOW}-{OVER_CAPACITY_FROM})"
    return 2, f"at or over capacity ({OVER_CAPACITY_FROM}-1.2)"


def weather(meta):
    return (1, "rain (drivers at 80-90% speed)") if meta["rain_speed_factor"] < 1.0 else (0, "dry")


def ramps(meta):
    return (1, "on- and off-ramps") if meta["ramps"] else (0, "no ramps")


def loop(meta):
    fault = meta["detector_fault"]
    return (1, f"one loop {fault['kind']}") if fault else (0, "every loop working")


# (what a row groups by, a scenario's group from its report: (rank, name)), in the card's order
SCENARIO_GROUPS = [("weather", weather), ("ramps", ramps), ("a failing loop", loop), ("demand", demand)]


def scenario_groups(runs):
    """[(condition, group, runs)] over the held-out runs (each with its report as `meta`), the
    groups of a condition in the order of their ranks"""
    out = []
    for condition, of in SCENARIO_GROUPS:
        groups = {}
        for r in runs:
            groups.setdefault(of(r["meta"]), []).append(r)
        out += [(condition, g[1], groups[g]) for g in sorted(groups)]
    return out


def incident_kinds(runs):
    """{kind: the set of incident ids of that kind}: `breakdown` (a stopped vehicle in one lane) or
    `closure` (1 to lanes-1 lanes). incidents.csv lists a scenario's incidents in its report's
    order, with ids `{family}-{scenario:02}-{index}`."""
    kinds = {}
    for r in runs:
        listed = r["meta"]["incidents"]
        for inc in r["incidents"]:
            kinds.setdefault(listed[int(inc["id"].rsplit("-", 1)[1])]["kind"], set()).add(inc["id"])
    return kinds
