#!/usr/bin/env python3
"""Side by side: the same differentially private releases computed by citystream (the dp_*
tables of an embedded-default run) and by OpenDP (https://opendp.org, from PyPI) on the same
data, with the same contribution bounds, epsilon and delta. Prints the median relative error
of each against the exact (non-private) values, and the theoretical expectation.

    cargo run -p citystream-pipeline --bin citystream -- run --config deploy/local.yaml   # CITYSTREAM_DATA=data
    .venv/bin/pip install opendp==0.16.0
    .venv/bin/python benches/dp_compare.py data
"""
import math
import random
import statistics
import sys

import duckdb
import opendp.prelude as dp

dp.enable_features("contrib")


def rho_for(eps: float, delta: float) -> float:
    ln = math.log(1 / delta)
    return (math.sqrt(eps + ln) - math.sqrt(ln)) ** 2


def main(data: str) -> None:
    lake = f"{data}/lake"
    con = duckdb.connect()
    src = lambda t: f"read_parquet('{lake}/{t}/**/*.parquet', hive_partitioning = true)"
    rng = random.Random(1)

    # --- vehicles per zone and hour: count of plate reads, unit = vehicle pseudonym,
    # L0 = 2 zones per hour, L∞ = 1, discrete Laplace, epsilon 0.5 per release
    rows = con.execute(
        f"SELECT zone_id, date_trunc('hour', ts) AS h, plate_pseudonym FROM {src('camera')} WHERE kind = 'plate_read'"
    ).fetchall()
    truth, units = {}, {}
    for zone, h, unit in rows:
        truth[(zone, h)] = truth.get((zone, h), 0) + 1
        units.setdefault((h, unit), set()).add(zone)
    bounded = {}
    for (h, unit), zones in units.items():
        for z in rng.sample(sorted(zones), min(2, len(zones))):
            bounded[(z, h)] = bounded.get((z, h), 0) + 1
    eps, l0, linf = 0.5, 2, 1
    laplace = dp.m.make_laplace(dp.atom_domain(T=int), dp.absolute_distance(T=int), scale=l0 * linf / eps)
    odp = {k: laplace(bounded.get(k, 0)) for k in truth}
    ours = dict(
        ((z, h), v)
        for z, h, v in con.execute(f"SELECT zone_id, window_start, value FROM {src('dp_zone_vehicles')}").fetchall()
    )
    report("zone vehicles (count, discrete Laplace, eps 0.5, L0 2)", truth, ours, odp, (l0 * linf / eps) * math.log(2))

    # --- pedestrians per zone and hour: sum of detection counts clamped to [0, 5], event-level,
    # discrete Gaussian at (eps 1, delta 1e-7)
    rows = con.execute(
        f"SELECT zone_id, date_trunc('hour', ts) AS h, least(count, 5) FROM {src('camera')} "
        f"WHERE kind = 'detection' AND object_class = 'pedestrian'"
    ).fetchall()
    truth = {}
    for zone, h, c in rows:
        truth[(zone, h)] = truth.get((zone, h), 0) + c
    sigma = 5 / math.sqrt(2 * rho_for(1.0, 1e-7))
    gauss = dp.m.make_gaussian(dp.atom_domain(T=int), dp.absolute_distance(T=int), scale=sigma)
    odp = {k: gauss(v) for k, v in truth.items()}
    ours = dict(
        ((z, h), v)
        for z, h, v in con.execute(f"SELECT zone_id, window_start, value FROM {src('dp_zone_pedestrians')}").fetchall()
    )
    report("zone pedestrians (sum, discrete Gaussian, eps 1, delta 1e-7)", truth, ours, odp, 0.6745 * sigma)


def report(name, truth, ours, odp, median_abs_noise):
    keys = [k for k in truth if k in ours and truth[k] > 0]
    rel = lambda est: statistics.median(abs(est[k] - truth[k]) / truth[k] for k in keys)
    expect = median_abs_noise / statistics.median(truth[k] for k in keys)
    print(f"{name}: {len(keys)} releases, median true value {statistics.median(truth[k] for k in keys):.1f}")
    print(f"  median relative error: citystream {rel(ours):.3f}, OpenDP {rel(odp):.3f}, "
          f"noise alone (theory, median |noise| / median value) {expect:.3f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "data")
