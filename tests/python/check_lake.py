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
    for kind, counts in sorted(truth["kinds"].items()):
        table = ds.dataset(os.path.join(lake, kind), format="parquet", partitioning="hive")
        n_arrow = table.count_rows()
        n_duck = con.execute(
            f"SELECT count(*) FROM read_parquet('{lake}/{kind}/**/*.parquet', hive_partitioning = true)"
        ).fetchone()[0]
        check(f"{kind} rows", n_arrow == n_duck == counts["valid"], f"pyarrow {n_arrow}, duckdb {n_duck}, simulator valid {counts['valid']}")
    malformed = sum(c["malformed"] for c in truth["kinds"].values())
    dl, no_reason = con.execute(
        f"SELECT count(*), count(*) FILTER (WHERE reason IS NULL OR reason = '') "
        f"FROM read_parquet('{lake}/dead_letters/**/*.parquet', hive_partitioning = true)"
    ).fetchone()
    check("dead letters", dl == malformed and no_reason == 0, f"duckdb {dl}, simulator malformed {malformed}, without reason {no_reason}")
    hours = con.execute(
        f"SELECT count(DISTINCT hour) FROM read_parquet('{lake}/traffic/**/*.parquet', hive_partitioning = true)"
    ).fetchone()[0]
    check("hive partitions", hours == 24, f"{hours} hour partitions in traffic")
    print(f"lake check: {passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
