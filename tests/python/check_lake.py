"""Reads a citystream data folder with pyarrow and DuckDB (not DataFusion) and checks it
against the simulator's ground truth: every Parquet file opens, is zstd-compressed with
statistics, and row counts per table equal what the simulator says it emitted.

usage: check_lake.py DATA_DIR   (DATA_DIR holds lake/ and ground_truth/)
"""

import glob
import json
import os
import sys

import duckdb
import pyarrow.dataset as ds
import pyarrow as pa
import pyarrow.parquet as pq


def main(data: str) -> int:
    lake = os.path.join(data, "lake")
    truth = json.load(open(os.path.join(data, "ground_truth", "report.json")))
    passed, failed = 0, 0

    def check(name: str, ok: bool, detail: str) -> None:
        nonlocal passed, failed
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
        if ok:
            passed += 1
        else:
            failed += 1

    files = sorted(glob.glob(os.path.join(lake, "**", "*.parquet"), recursive=True))
    check("files exist", len(files) > 0, f"{len(files)} parquet files")
    bad = []
    for f in files:
        meta = pq.ParquetFile(f).metadata
        col = meta.row_group(0).column(0)
        if col.compression != "ZSTD" or not col.is_stats_set:
            bad.append(f)
    check("zstd with statistics (pyarrow)", not bad, f"{len(files) - len(bad)}/{len(files)} files")
    tmp = glob.glob(os.path.join(lake, "**", ".*.tmp"), recursive=True)
    check("no temporary files", not tmp, f"{len(tmp)} left")

    con = duckdb.connect()

    def q(sql: str):
        return con.execute(sql).fetchone()

    def src(table: str) -> str:
        return f"read_parquet('{lake}/{table}/**/*.parquet', hive_partitioning = true)"

    for kind, counts in sorted(truth["kinds"].items()):
        table = ds.dataset(os.path.join(lake, kind), format="parquet", partitioning="hive")
        n_arrow = table.count_rows()
        n_duck = q(f"SELECT count(*) FROM {src(kind)}")[0]
        late = q(f"SELECT count(*) FROM {src(kind + '_late')}")[0] if os.path.isdir(f"{lake}/{kind}_late") else 0
        unique = counts["valid"] - counts["duplicates"] - counts["resent"]
        # deduplicated; traffic and environment are also compressed (fewer rows, within tolerance)
        ok = n_arrow == n_duck and 0 < n_arrow <= unique and (kind == "camera") <= (n_arrow + late >= unique)
        check(f"{kind} rows", ok, f"pyarrow {n_arrow}, duckdb {n_duck}, late {late}, simulator unique readings {unique}")
        ids, distinct = q(f"SELECT count(*), count(DISTINCT event_id) FROM {src(kind)}")
        check(f"{kind} deduplicated", ids == distinct, f"{ids} rows, {distinct} distinct event ids")
    w_readings, w_rows, segs = q(f"SELECT sum(readings), count(*), count(DISTINCT segment_id) FROM {src('traffic_windows')}")
    t = truth["kinds"]["traffic"]
    t_unique = t["valid"] - t["duplicates"] - t["resent"]
    check(
        "traffic windows",
        w_rows == segs * 288 and t_unique - t["late"] - t["out_of_order"] <= w_readings <= t_unique,
        f"{w_rows} windows over {segs} segments, {w_readings} readings of {t_unique} unique",
    )
    p85_ok = q(f"SELECT count(*) FILTER (WHERE p85_speed_kmh < p50_speed_kmh) FROM {src('traffic_windows')}")[0]
    check("p85 >= p50 speed", p85_ok == 0, f"{p85_ok} windows with p85 below p50")
    env = q(f"SELECT count(*) FROM {src('environment_windows')}")[0]
    check("environment windows", env == 6 * 24, f"{env} station-hours")
    malformed = sum(c["malformed"] for c in truth["kinds"].values())
    dl, no_reason, decode_rejects = q(
        f"SELECT count(*), count(*) FILTER (WHERE reason IS NULL OR reason = ''), "
        f"count(*) FILTER (WHERE reason_code <> 'rate_limited') FROM {src('dead_letters')}"
    )
    check(
        "dead letters",
        decode_rejects == malformed and no_reason == 0,
        f"duckdb {dl} ({decode_rejects} rejected by decode), simulator malformed {malformed}, without reason {no_reason}",
    )
    hours = q(f"SELECT count(DISTINCT hour) FROM {src('traffic')}")[0]
    check("hive partitions", hours == 24, f"{hours} hour partitions in traffic")
    # privacy: no raw plate the simulator emitted appears in any value of any table, nor in
    # any line the run logged
    plates = set(open(os.path.join(data, "ground_truth", "plates.txt")).read().split())
    width = len(next(iter(plates)))
    hits, values = 0, 0
    for f in files:
        t = pq.read_table(f)
        for col in t.columns:
            if pa.types.is_string(col.type) or pa.types.is_binary(col.type):
                for v in col.to_pylist():
                    if v is None:
                        continue
                    b = v.encode() if isinstance(v, str) else v
                    values += 1
                    hits += sum(1 for i in range(len(b) - width + 1) if b[i : i + width].decode("latin-1") in plates)
    check("no raw plate in any table", hits == 0 and values > 0, f"{hits} hits in {values} values, {len(plates)} plates")
    log = os.path.join(data, "run.log")
    if os.path.exists(log):
        text = open(log, encoding="utf-8", errors="replace").read()
        log_hits = sum(text.count(p) for p in plates)
        check("no raw plate in the run's log", log_hits == 0, f"{log_hits} hits in {len(text.splitlines())} lines")
    pseud = q(f"SELECT count(*), count(plate_pseudonym) FROM {src('camera')} WHERE kind = 'plate_read'")
    check("plate reads pseudonymized", pseud[0] > 0 and pseud[0] == pseud[1], f"{pseud[1]} pseudonyms for {pseud[0]} plate reads")
    ped = q(f"SELECT count(thumbnail) FROM {src('camera')} WHERE object_class = 'pedestrian'")[0]
    check("no pedestrian thumbnail", ped == 0, f"{ped} stored")
    for table, partitions in [("dp_zone_vehicles", 6), ("dp_segment_speed", 24), ("dp_zone_pedestrians", 6)]:
        n, bad = q(
            f"SELECT count(*), count(*) FILTER (WHERE epsilon <= 0 OR noise_scale <= 0 OR error_bound_95 <= 0 "
            f"OR mechanism NOT IN ('discrete_laplace', 'discrete_gaussian')) FROM {src(table)}"
        )
        check(f"{table} released", n == partitions * 24 and bad == 0, f"{n} rows ({partitions} partitions x 24 h), {bad} without their account")
    budget = json.load(open(os.path.join(data, "privacy", "zone_vehicles.json")))
    check("privacy budget persisted", abs(budget["epsilon"] - 12.0) < 1e-9 and budget["releases"] == 24, str(budget))

    # models: one prediction, shadow prediction, incident score and California #7 state per
    # segment-minute, each stamped with the checksum the model card states
    minutes = q(f"SELECT count(*) FROM {src('traffic_minutes')}")[0]
    check("minute windows", minutes >= 24 * 1430, f"{minutes} segment-minutes (24 segments x 1440)")
    cards = open(os.path.join(os.path.dirname(__file__), "..", "..", "models", "congestion.md")).read() + \
        open(os.path.join(os.path.dirname(__file__), "..", "..", "models", "incident.md")).read()
    for table, model in [("predictions", "congestion_small"), ("predictions_shadow", "congestion_fp32"),
                         ("incident_scores", "incident_fp32")]:
        n, shas, sha, names = q(f"SELECT count(*), count(DISTINCT model_sha256), min(model_sha256), "
                                f"string_agg(DISTINCT model, ',') FROM {src(table)}")
        check(f"{table}", n == minutes and shas == 1 and sha in cards and names == model,
              f"{n} rows of {names}, model checksum in its card: {sha in cards}")
    bad = q(f"SELECT count(*) FILTER (WHERE NOT (speed_15m_kmh BETWEEN 0 AND 150) OR isnan(speed_60m_kmh)) FROM {src('predictions')}")[0]
    check("predicted speeds plausible", bad == 0, f"{bad} outside 0..150 km/h")
    n = q(f"SELECT count(*) FROM {src('california7')}")[0]
    check("california7 states", n == minutes, f"{n} rows")

    # alerts: lifecycle invariants, and the incident rules against the injected incidents
    dup_open, orphan = q(
        f"WITH a AS (SELECT * FROM {src('alerts')}) SELECT "
        "(SELECT count(*) FROM (SELECT alert_id FROM a WHERE status = 'open' GROUP BY alert_id HAVING count(*) > 1)), "
        "(SELECT count(*) FROM a r WHERE status <> 'open' AND NOT EXISTS "
        " (SELECT 1 FROM a o WHERE o.status = 'open' AND o.alert_id = r.alert_id))"
    )
    check("alerts open once and change only after opening", dup_open == 0 and orphan == 0, f"{dup_open} opened twice, {orphan} orphan events")
    overlap = q(
        f"WITH o AS (SELECT rule, location, alert_id, ts AS opened, "
        f"  (SELECT min(r.ts) FROM {src('alerts')} r WHERE r.alert_id = a.alert_id AND r.status = 'resolved') AS closed "
        f"  FROM {src('alerts')} a WHERE status = 'open') "
        "SELECT count(*) FROM o x JOIN o y ON x.rule = y.rule AND x.location = y.location AND x.alert_id < y.alert_id "
        "AND y.opened < coalesce(x.closed, TIMESTAMPTZ '9999-01-01') AND x.opened < coalesce(y.closed, TIMESTAMPTZ '9999-01-01')"
    )[0]
    check("one open alert per rule and location", overlap == 0, f"{overlap} overlapping pairs")
    import alert_report

    rep = alert_report.main(data)
    inc = rep.get("incident_model", {})
    check("incident alerts find injected incidents", inc.get("detected", 0) >= 1, str(inc))
    # the energy account: per task, CPU, joules, rows and bytes in and out
    e = dict(
        (r[0], r[1:])
        for r in con.execute(
            f"SELECT stage, sum(cpu_s), sum(joules), sum(events_in), sum(bytes_in), sum(bytes_out) FROM {src('energy')} GROUP BY stage"
        ).fetchall()
    )
    city, traffic = e.get("city"), e.get("traffic")
    check(
        "energy account with bytes",
        city is not None and traffic is not None and city[4] > 0 and traffic[2] > 0 and traffic[3] > traffic[2] and traffic[4] > 0,
        f"city {city}, traffic {traffic} (cpu_s, joules, events_in, bytes_in, bytes_out)",
    )
    print(f"lake check: {passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
