"""Federated Kaplan–Meier against lifelines, through ADBC Flight SQL (issue 18).

Usage: python survival_lifelines.py INFO_JSON   (an unprotected `trustql demo --serve`)

The federated curve per stage must equal lifelines' KaplanMeierFitter fitted on every trust's
rows, each duration rounded up to the 30-day grid (0 or less into the first interval), at every
interval end: survival within 1e-9, the 95% log-log interval within 1e-9 where it is defined.
Exits non-zero with a message otherwise.
"""

import json
import math
import os
import sys

import adbc_driver_flightsql.dbapi as flight_sql
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from adbc_driver_flightsql import DatabaseOptions
from lifelines import KaplanMeierFitter

INTERVAL, HORIZON = 30, 1825
SQL = (
    "SELECT t.stage_best, unnest(km_curve(t.diagnosisdatebest, p.vitalstatusdate, "
    "p.vitalstatus = 'D', 30, 1825)) AS step FROM sim_av_tumour t JOIN sim_av_patient p "
    "ON t.patientid = p.patientid GROUP BY t.stage_best"
)


def connect(info):
    with open(info["ca"]) as f:
        ca = f.read()
    return flight_sql.connect(
        info["url"].replace("https://", "grpc+tls://"),
        db_kwargs={
            DatabaseOptions.TLS_ROOT_CERTS.value: ca,
            DatabaseOptions.AUTHORIZATION_HEADER.value: "Bearer " + info["token"],
            "adbc.flight.sql.rpc.call_header.x-trustql-project": info["project"],
        },
    )


def union_rows(info):
    """(stage, duration in days, died) for every trust's tumour rows with all three known."""
    rows = []
    for trust in info["trusts"]:
        site = os.path.join(info["data_dir"], trust)
        tumours = pq.read_table(os.path.join(site, "sim_av_tumour.parquet"),
                                columns=["patientid", "stage_best", "diagnosisdatebest"])
        patients = pq.read_table(os.path.join(site, "sim_av_patient.parquet"),
                                 columns=["patientid", "vitalstatus", "vitalstatusdate"])
        # Patient IDs are local to a trust: join within it.
        joined = tumours.join(patients, "patientid", join_type="inner").to_pylist()
        for r in joined:
            start, end, status = r["diagnosisdatebest"], r["vitalstatusdate"], r["vitalstatus"]
            if start is None or end is None or status is None:
                continue
            stage = "null" if r["stage_best"] is None else r["stage_best"]
            rows.append((stage, (end - start).days, status == "D"))
    return rows


def on_grid(days):
    return INTERVAL if days <= 0 else math.ceil(days / INTERVAL) * INTERVAL


def main(info_path):
    with open(info_path) as f:
        info = json.load(f)
    cur = connect(info).cursor()
    cur.execute(SQL)
    table = cur.fetch_arrow_table()
    got = {}
    for stage, step in zip(table.column(0).to_pylist(), table.column(1).to_pylist()):
        got.setdefault("null" if stage is None else stage, []).append(step)
    rows = union_rows(info)
    stages = sorted({r[0] for r in rows})
    assert sorted(got) == stages, (sorted(got), stages)
    ends = [k * INTERVAL for k in range(1, math.ceil(HORIZON / INTERVAL) + 1)]
    checked = 0
    for stage in stages:
        durations = [on_grid(d) for s, d, _ in rows if s == stage]
        events = [e for s, _, e in rows if s == stage]
        kmf = KaplanMeierFitter().fit(durations, events)
        steps = sorted(got[stage], key=lambda s: s["interval_end_days"])
        assert [s["interval_end_days"] for s in steps] == ends, stage
        want = kmf.survival_function_at_times(ends).to_numpy()
        ci = kmf.confidence_interval_survival_function_
        for step, end, s in zip(steps, ends, want):
            assert abs(step["survival"] - s) < 1e-9, (stage, end, step["survival"], s)
            # The interval at the last event time at or before `end`, where lifelines has one.
            at = ci.index[ci.index <= end]
            if len(at) and 0.0 < s < 1.0:
                lower, upper = ci.loc[at[-1]].to_numpy()
                if np.isfinite(lower) and np.isfinite(upper):
                    assert abs(step["lower_95"] - lower) < 1e-9, (stage, end, step, lower)
                    assert abs(step["upper_95"] - upper) < 1e-9, (stage, end, step, upper)
            checked += 1
    print(f"lifelines agrees on {checked} interval ends over {len(stages)} stages")
    print("survival ok")


if __name__ == "__main__":
    main(sys.argv[1])
