"""``qplan calibrate``: what ``qplan run`` measured on this machine, and how plans use it."""
from __future__ import annotations

import click

from qplan.commands.common import handles_errors, json_option

CALIBRATE_EXAMPLES = """
\b
Examples:
  qplan calibrate --show
  qplan calibrate --show --json
  qplan calibrate --reset
"""


@click.command(epilog=CALIBRATE_EXAMPLES)
@click.option("--show", "action", flag_value="show", default=True,
              help="list the recorded runs and the corrections they give (default)")
@click.option("--reset", "action", flag_value="reset", help="delete every record")
@json_option
@handles_errors
def calibrate(action: str, as_json: bool) -> None:
    """The local calibration store: every attempt of `qplan run` on a GPU records its
    estimate and what it measured (memory without the CUDA context, steady-state tokens/s).
    Later estimates for the same GPU, architecture and regime use the largest memory ratio
    measured (never below the model) and the median speed ratio. Plans say when they do;
    --no-calibration (or QPLAN_NO_CALIBRATION=1) plans without them. The store lives in
    $QPLAN_HOME (default ~/.cache/qplan)."""
    from qplan import render
    from qplan.planner.store import Store

    st = Store()
    if action == "reset":
        n = st.reset()
        d = {"schema_version": render.SCHEMA_VERSION,
                 "command": "calibrate", "action": "reset", "path": str(st.path), "removed": n}
        if as_json:
            render.print_json(d)
        else:
            render.print_lines([f"removed {n} record(s) from {st.path}"])
        return
    recs = st.records()
    groups: dict = {}
    for r in recs:
        groups.setdefault((r.get("gpu"), r.get("arch"), r.get("regime")), []).append(r)
    rows = []
    for (gpu, arch, regime), rs in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        c = st.correction(gpu, arch, regime)
        rows.append({"gpu": gpu, "arch": arch, "model": rs[-1].get("model"), "regime": regime,
                     "runs": len(rs), "memory_factor": c.memory_factor,
                     "speed_factor": c.speed_factor})
    d = {"schema_version": render.SCHEMA_VERSION,
             "command": "calibrate", "action": "show", "path": str(st.path), "records": len(recs),
         "corrections": rows}
    if as_json:
        render.print_json(d)
        return
    if not recs:
        render.print_lines([f"no runs recorded yet in {st.path}: `qplan run` on a GPU adds one "
                            "per attempt"])
        return
    render.print_lines([f"{len(recs)} run(s) recorded in {st.path}"])
    render.print_rows("Corrections used by later plans on this machine",
                      ("GPU", "model", "regime", "runs", "memory x", "speed x"),
                      [(r["gpu"], r["model"], r["regime"], str(r["runs"]),
                        f"{r['memory_factor']:.2f}", f"{r['speed_factor']:.2f}") for r in rows])
