"""A researcher's Python session against a running TrustQL demo, through ADBC Flight SQL.

Usage: python flight_sql_client.py INFO_JSON   (the file `trustql demo --serve --info` wrote)
Exits non-zero with a message if anything a researcher relies on does not work.
"""

import json
import sys

import adbc_driver_flightsql.dbapi as flight_sql
from adbc_driver_flightsql import DatabaseOptions


def main(info_path: str) -> None:
    with open(info_path) as f:
        info = json.load(f)
    with open(info["ca"]) as f:
        ca = f.read()
    uri = info["url"].replace("https://", "grpc+tls://")
    conn = flight_sql.connect(
        uri,
        db_kwargs={
            DatabaseOptions.TLS_ROOT_CERTS.value: ca,
            DatabaseOptions.AUTHORIZATION_HEADER.value: "Bearer " + info["token"],
            "adbc.flight.sql.rpc.call_header.x-trustql-project": info["project"],
        },
    )

    # Browse the shared schema.
    objects = conn.adbc_get_objects(depth="tables").read_all().to_pylist()
    tables = sorted(
        t["table_name"]
        for catalog in objects
        for schema in catalog["catalog_db_schemas"] or []
        for t in schema["db_schema_tables"] or []
    )
    assert "sim_av_tumour" in tables and len(tables) == 8, tables

    cur = conn.cursor()
    cur.execute(
        "SELECT stage_best AS stage, COUNT(*) AS tumours, AVG(age) AS mean_age "
        "FROM sim_av_tumour GROUP BY stage_best ORDER BY stage"
    )
    table = cur.fetch_arrow_table()
    assert table.num_rows > 0, "no rows"
    assert table.column_names == ["stage", "tumours", "mean_age"], table.column_names
    assert all(n % 5 == 0 for n in table.column("tumours").to_pylist()), "counts are rounded"

    cur.execute("SELECT COUNT(*) AS n FROM sim_av_patient")
    (n,) = cur.fetchone()
    assert n > 0

    try:
        cur.execute("SELECT patientid FROM sim_av_patient")
        cur.fetchall()
    except Exception as e:  # the driver raises its own error types
        assert "aggregate" in str(e), str(e)
    else:
        raise AssertionError("a row-level query was answered")

    cur.close()
    conn.close()
    print(f"python client ok: {len(tables)} tables, {table.num_rows} stages, {n} patients")


if __name__ == "__main__":
    main(sys.argv[1])
