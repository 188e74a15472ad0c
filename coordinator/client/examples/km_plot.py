"""Kaplan–Meier curves by stage from a federated query, drawn with matplotlib.

Usage: python km_plot.py INFO_JSON OUT.png   (the file `trustql demo --serve --info` wrote)

Connects with ADBC Flight SQL like any researcher, asks the federation for one curve per
stage, loads it into a pandas DataFrame and draws survival with its 95% interval. The README's
figure (km_by_stage.png, next to this script) is its output on the default demo:
    trustql demo --serve --info info.json &
    python km_plot.py info.json km_by_stage.png
"""

import json
import sys

import adbc_driver_flightsql.dbapi as flight_sql
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from adbc_driver_flightsql import DatabaseOptions  # noqa: E402

SQL = """
SELECT t.stage_best AS stage,
       unnest(km_curve(t.diagnosisdatebest, p.vitalstatusdate, p.vitalstatus = 'D')) AS step
FROM sim_av_tumour t JOIN sim_av_patient p ON t.patientid = p.patientid
WHERE t.stage_best IN ('1', '2', '3', '4')
GROUP BY t.stage_best
"""


def main(info_path: str, out: str) -> None:
    with open(info_path) as f:
        info = json.load(f)
    with open(info["ca"]) as f:
        ca = f.read()
    conn = flight_sql.connect(
        info["url"].replace("https://", "grpc+tls://"),
        db_kwargs={
            DatabaseOptions.TLS_ROOT_CERTS.value: ca,
            DatabaseOptions.AUTHORIZATION_HEADER.value: "Bearer " + info["token"],
            "adbc.flight.sql.rpc.call_header.x-trustql-project": info["project"],
        },
    )
    cur = conn.cursor()
    cur.execute(SQL)
    table = cur.fetch_arrow_table()
    # One row per stage and interval: the struct's fields become columns.
    frame = pd.concat(
        [table.column("stage").to_pandas().rename("stage"),
         pd.DataFrame(table.column("step").to_pylist())],
        axis=1,
    )
    assert not frame.empty, "no curve came back"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for stage, curve in frame.sort_values("interval_end_days").groupby("stage"):
        years = [0.0] + list(curve["interval_end_days"] / 365.25)
        survival = [1.0] + list(curve["survival"])
        line = ax.step(years, survival, where="post", label=f"Stage {stage}")[0]
        ax.fill_between(years, [1.0] + list(curve["lower_95"]), [1.0] + list(curve["upper_95"]),
                        step="post", alpha=0.15, color=line.get_color())
    ax.set_xlabel("Years since diagnosis")
    ax.set_ylabel("Survival (Kaplan–Meier, 95% interval)")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(0, 5)
    ax.grid(alpha=0.3)
    ax.legend(title="Stage at diagnosis")
    ax.set_title(f"Federated over {len(info['trusts'])} trusts, protected at each")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}: {frame['stage'].nunique()} stages, {len(frame)} intervals")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
