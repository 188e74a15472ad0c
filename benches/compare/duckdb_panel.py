"""Times the comparison panel in DuckDB over the union of the trusts' Parquet.

Usage: python duckdb_panel.py DATA_DIR PANEL_JSON REPEATS
Prints one JSON object: {query name: [seconds, ...]}.
"""

import json
import sys
import time

import duckdb


def main(data_dir: str, panel_path: str, repeats: int) -> None:
    with open(panel_path) as f:
        panel = json.load(f)
    con = duckdb.connect()
    for table in panel["tables"]:
        con.execute(
            f"CREATE VIEW {table} AS SELECT * FROM read_parquet('{data_dir}/*/{table}.parquet')"
        )
    times = {name: [] for name, _ in panel["queries"]}
    for _ in range(repeats):
        for name, sql in panel["queries"]:
            start = time.perf_counter()
            con.execute(sql).fetchall()
            times[name].append(time.perf_counter() - start)
    print(json.dumps(times))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
