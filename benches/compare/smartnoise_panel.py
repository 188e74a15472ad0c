"""Runs the differential-privacy comparison panel through SmartNoise SQL over the union of the
trusts' Parquet, at the same ε and with the same per-patient row bounds and clamping bounds as
TrustQL's nodes.

Usage: python smartnoise_panel.py DATA_DIR PANEL_JSON REPEATS
PANEL_JSON: {"epsilon", "delta", "trusts", "tables": {table: {"pid", "max_ids", "columns"}},
             "queries": [[name, table, sql], ...]}
Prints one JSON object: {name: {"seconds": [...], "runs": [[[key, n], ...], ...]}} (the rows of
every run; the key is null for a query without GROUP BY).
"""

import json
import sys
import time

import pandas as pd
import snsql
from snsql import Privacy


def load(data_dir, trusts, table, spec):
    frames = []
    for trust in trusts:
        df = pd.read_parquet(f"{data_dir}/{trust}/{table}.parquet")
        # Patient ids are local to a trust: make them unique across the union.
        df["pid"] = trust + ":" + df[spec["pid"]].astype(str)
        frames.append(df[["pid"] + list(spec["columns"])])
    return pd.concat(frames, ignore_index=True)


def main(data_dir, panel_path, repeats):
    with open(panel_path) as f:
        panel = json.load(f)
    privacy = Privacy(epsilon=panel["epsilon"], delta=panel["delta"])
    readers = {}
    for table, spec in panel["tables"].items():
        columns = {"pid": {"type": "string", "private_id": True}}
        columns.update(spec["columns"])
        metadata = {
            "cancer": {
                "cancer": {
                    table: {"row_privacy": False, "max_ids": spec["max_ids"], **columns}
                }
            }
        }
        df = load(data_dir, panel["trusts"], table, spec)
        readers[table] = snsql.from_df(df, privacy=privacy, metadata=metadata)
    out = {}
    for name, table, sql in panel["queries"]:
        sql = sql.replace(f"FROM {table}", f"FROM cancer.{table}")
        seconds = []
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            result = readers[table].execute(sql)
            seconds.append(time.perf_counter() - start)
            header, body = result[0], result[1:]
            n = header.index("n")
            key = 0 if n > 0 else None
            runs.append([[None if key is None else r[key], r[n]] for r in body])
        out[name] = {"seconds": seconds, "runs": runs}
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
