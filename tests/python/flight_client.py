"""Runs queries against `citystream serve` through ADBC's Flight SQL driver, as an analyst's
notebook would, and writes what happened as JSON (for tests/tests/flight_sql.rs).

usage: flight_client.py URI TOKEN PLAN.json OUT_DIR

PLAN.json: {"queries": [sql, ...], "params": [[sql, [values...]], ...],
            "bad_token": str, "over_limit": sql}, or {"queries": [...], "tls_root": PEM file}
           (over TLS, the queries only)
Each result is written to OUT_DIR/{n}.arrow (Arrow IPC file); OUT_DIR/report.json says the rest.
"""

import json
import sys

import adbc_driver_flightsql.dbapi as flightsql
import pyarrow as pa
from adbc_driver_flightsql import DatabaseOptions


def connect(uri, token, tls_root=None):
    kwargs = {DatabaseOptions.AUTHORIZATION_HEADER.value: f"Bearer {token}"}
    if tls_root:
        kwargs[DatabaseOptions.TLS_ROOT_CERTS.value] = open(tls_root).read()
    return flightsql.connect(uri, db_kwargs=kwargs)


def write(table, path):
    with pa.OSFile(path, "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)


def error_of(cur, sql):
    """The error `sql` fails with, or "no error"."""
    try:
        cur.execute(sql)
        cur.fetch_arrow_table()
        return "no error"
    except Exception as e:  # noqa: BLE001 (the message is what is checked)
        return str(e)


def main():
    uri, token, plan_path, out = sys.argv[1:5]
    plan = json.load(open(plan_path))
    if plan.get("tls_root") or plan.get("queries_only"):
        # the queries only (over TLS with `tls_root`)
        with connect(uri, token, plan.get("tls_root")) as conn, conn.cursor() as cur:
            for n, q in enumerate(plan["queries"]):
                cur.execute(q)
                write(cur.fetch_arrow_table(), f"{out}/{n}.arrow")
        return
    report = {}
    if plan.get("heavy"):
        # a query over the server's memory limit fails; the server answers the next one
        with connect(uri, token) as conn, conn.cursor() as cur:
            report["heavy"] = error_of(cur, plan["heavy"])
            cur.execute(plan["light"])
            write(cur.fetch_arrow_table(), f"{out}/0.arrow")
        json.dump(report, open(f"{out}/report.json", "w"), indent=1, default=str)
        return
    with connect(uri, token) as conn:
        n = 0
        with conn.cursor() as cur:
            for q in plan["queries"]:
                cur.execute(q)
                write(cur.fetch_arrow_table(), f"{out}/{n}.arrow")
                n += 1
            # prepared statements with bound parameters
            for q, values in plan["params"]:
                cur.execute(q, parameters=tuple(values))
                write(cur.fetch_arrow_table(), f"{out}/{n}.arrow")
                n += 1
            report["over_limit"] = error_of(cur, plan["over_limit"])
            cur.execute("EXPLAIN " + plan["queries"][0])
            report["explain"] = cur.fetch_arrow_table().to_pylist()
        # what a BI tool browses
        objects = conn.adbc_get_objects(depth="tables").read_all().to_pylist()
        report["tables"] = sorted(
            t["table_name"]
            for c in objects
            for s in c["catalog_db_schemas"] or []
            for t in s["db_schema_tables"] or []
        )
        report["catalogs"] = sorted(c["catalog_name"] for c in objects)
        report["traffic_windows_columns"] = conn.adbc_get_table_schema("traffic_windows").names
        report["vendor"] = conn.adbc_get_info().get("vendor_name")
    try:
        with connect(uri, plan["bad_token"]) as bad, bad.cursor() as cur:
            cur.execute("SELECT 1")
            cur.fetch_arrow_table()
        report["bad_token"] = "no error"
    except Exception as e:  # noqa: BLE001
        report["bad_token"] = str(e)
    json.dump(report, open(f"{out}/report.json", "w"), indent=1, default=str)


if __name__ == "__main__":
    main()
