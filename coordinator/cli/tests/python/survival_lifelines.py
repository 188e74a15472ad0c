"""Federated Kaplan–Meier against lifelines, through ADBC Flight SQL (issue 18).

Usage: python survival_lifelines.py INFO_JSON   (an unprotected `trustql demo --serve`)

The federated curve per stage must equal lifelines' KaplanMeierFitter fitted on every trust's
rows, each duration rounded up to the 30-day grid (0 or less into the first interval), at every
interval end: survival within 1e-9, the 95% log-log interval within 1e-9 where it is defined.
The federated log-rank test between genders, per stage, must equal lifelines'
multivariate_logrank_test on the same rows (those past the grid's last interval censored
after it, as the grid counts them at risk throughout): χ² and p-value within 1e-9.
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
from lifelines.statistics import multivariate_logrank_test

INTERVAL, HORIZON = 30, 1825
SQL = (
    "SELECT t.stage_best, unnest(km_curve(t.diagnosisdatebest, p.vitalstatusdate, "
    "p.vitalstatus = 'D', 30, 1825)) AS step FROM sim_av_tumour t JOIN sim_av_patient p "
    "ON t.patientid = p.patientid GROUP BY t.stage_best"
)
LOGRANK_SQL = (
    "SELECT t.stage_best, logrank(t.diagnosisdatebest, p.vitalstatusdate, "
    "p.vitalstatus = 'D', p.gender, 30, 1825) AS test FROM sim_av_tumour t "
    "JOIN sim_av_patient p ON t.patientid = p.patientid GROUP BY t.stage_best"
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
    """(stage, duration in days, died, gender) for every trust's tumour rows with the first
    three known."""
    rows = []
    for trust in info["trusts"]:
        site = os.path.join(info["data_dir"], trust)
        tumours = pq.read_table(os.path.join(site, "sim_av_tumour.parquet"),
                                columns=["patientid", "stage_best", "diagnosisdatebest"])
        patients = pq.read_table(os.path.join(site, "sim_av_patient.parquet"),
                                 columns=["patientid", "vitalstatus", "vitalstatusdate", "gender"])
        # Patient IDs are local to a trust: join within it.
        joined = tumours.join(patients, "patientid", join_type="inner").to_pylist()
        for r in joined:
            start, end, status = r["diagnosisdatebest"], r["vitalstatusdate"], r["vitalstatus"]
            if start is None or end is None or status is None:
                continue
            stage = "null" if r["stage_best"] is None else r["stage_best"]
            rows.append((stage, (end - start).days, status == "D", r["gender"]))
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
        durations = [on_grid(d) for s, d, _, _ in rows if s == stage]
        events = [e for s, _, e, _ in rows if s == stage]
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
    check_logrank(cur, rows)


def check_logrank(cur, rows):
    """The log-rank test between genders per stage, against lifelines."""
    last = math.ceil(HORIZON / INTERVAL) * INTERVAL
    cur.execute(LOGRANK_SQL)
    table = cur.fetch_arrow_table()
    got = {("null" if s is None else s): t
           for s, t in zip(table.column(0).to_pylist(), table.column(1).to_pylist())}
    compared = 0
    for stage, test in sorted(got.items()):
        mine = [r for r in rows if r[0] == stage and r[3] is not None]
        # Past the last interval a row is at risk throughout and leaves after the grid.
        durations = [on_grid(d) if d <= last else last + 1 for _, d, _, _ in mine]
        events = [e and d <= last for _, d, e, _ in mine]
        genders = [g for _, _, _, g in mine]
        assert test["arms"] == len(set(genders)), (stage, test, sorted(set(genders)))
        if len(set(genders)) < 2 or not any(events):
            assert test["chi_square"] is None, (stage, test)
            continue
        want = multivariate_logrank_test(durations, genders, events)
        assert test["degrees_of_freedom"] == len(set(genders)) - 1, (stage, test)
        assert abs(test["chi_square"] - want.test_statistic) < 1e-9 * max(1.0, want.test_statistic), \
            (stage, test, want.test_statistic)
        assert abs(test["p_value"] - want.p_value) < 1e-9, (stage, test, want.p_value)
        compared += 1
    assert compared >= 4, f"only {compared} stages had a test to compare"
    print(f"lifelines agrees on the log-rank test of {compared} stages")
    print("logrank ok")


if __name__ == "__main__":
    main(sys.argv[1])
