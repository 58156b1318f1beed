"""Query latency through `citystream serve` (Arrow Flight SQL, ADBC client) against
`citystream sql` (a process per query) on the same queries: the README's analyst queries.

usage: .venv/bin/python benches/flight_latency.py CITYSTREAM_BIN LAKE TOKENS_FILE [RUNS]

Starts the server on a free port, runs each query RUNS times (default 7) each way, and prints
median milliseconds per query and way.
"""

import re
import statistics
import subprocess
import sys
import time

import adbc_driver_flightsql.dbapi as flightsql
from adbc_driver_flightsql import DatabaseOptions


def readme_queries():
    text = open("README.md").read()
    section = text[text.index("## Queries for analysts"):]
    section = section[: section.index("\n## ", 3)]
    return [q.strip() for q in re.findall(r"```sql\n(.*?)```", section, re.S)]


def main():
    binary, lake, tokens = sys.argv[1:4]
    runs = int(sys.argv[4]) if len(sys.argv) > 4 else 7
    token = next(l.split()[-1] for l in open(tokens) if l.startswith("viewer "))
    server = subprocess.Popen(
        [binary, "serve", "--data", lake, "--addr", "127.0.0.1:0", "--tokens-file", tokens],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        uri = next(w for w in server.stdout.readline().split() if w.startswith("grpc://"))
        kwargs = {DatabaseOptions.AUTHORIZATION_HEADER.value: f"Bearer {token}"}
        with flightsql.connect(uri, db_kwargs=kwargs) as conn, conn.cursor() as cur:
            print(f"{'query':<60} {'flight ms':>10} {'sql CLI ms':>11} {'rows':>6}")
            for q in readme_queries():
                flight, cli = [], []
                for _ in range(runs):
                    t0 = time.perf_counter()
                    cur.execute(q)
                    rows = cur.fetch_arrow_table().num_rows
                    flight.append((time.perf_counter() - t0) * 1000)
                    t0 = time.perf_counter()
                    subprocess.run([binary, "sql", "--data", lake, "--format", "csv", q], check=True, capture_output=True)
                    cli.append((time.perf_counter() - t0) * 1000)
                name = " ".join(q.split())[:58]
                print(f"{name:<60} {statistics.median(flight):>10.1f} {statistics.median(cli):>11.1f} {rows:>6}")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
