"""The memory model against every GPU measurement committed in benchmarks/results/raw/.

The accuracy bar of issue 2 over the earlier harnesses' records (median absolute error <= 8%,
no configuration under-estimated by more than 10%), and issue 9's over the runner grid
(benchmarks/grid_report.py): the held-out points of counted architectures, and every point
inside the estimate's band. Checked on each change of the model.
"""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("accuracy_report", ROOT / "benchmarks" / "accuracy_report.py")
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)


@pytest.fixture(scope="module")
def rows():
    return report.evaluate(report.load_records())


def test_grid_covers_what_issue_2_asks(rows):
    assert len({r["model"] for r in rows}) >= 4
    seqs = {r["seq"] for r in rows}
    assert min(seqs) <= 512 and max(seqs) >= 16384
    assert {1, 8} <= {r["batch"] for r in rows}
    assert {16, 64} <= {r["rank"] for r in rows}
    assert {True, False} == {r["grad_ckpt"] for r in rows}
    assert {0.0, 0.05} <= {r["dropout"] for r in rows}
    assert {"kbit", "lean"} == {r["prepare"] for r in rows}
    assert {"standard", "fused"} == {r["loss"] for r in rows}


def test_median_error_within_8_percent(rows):
    s = report.summary(rows)
    assert s["median_abs_error"] <= 0.08, s


def test_no_underestimate_beyond_10_percent(rows):
    current = [r for r in rows if not r["superseded"]]
    worst = min(current, key=lambda r: r["error"])
    assert worst["error"] >= -0.10, worst


def test_superseded_rows_are_only_old_implementations_or_the_old_harness(rows):
    for r in rows:
        if r["superseded"]:
            assert (r["offload"] or r["mlp_chunk"] or r["embed_on_cpu"] or r["remeasured_fresh"]
                    or r["old_attention"]), r
    again = [r for r in rows if r["remeasured_fresh"]]
    assert len(again) <= 10, "fresh-process re-measurements stand in for a few points, not a grid"
    assert sum(not r["superseded"] for r in rows) >= 140


def test_committed_report_is_current(rows):
    """benchmarks/results/memory_accuracy.json matches the model (regenerate with --write)."""
    import json

    committed = json.loads((ROOT / "benchmarks" / "results" / "memory_accuracy.json").read_text())
    assert committed["summary"] == report.summary(rows), (
        "run `python benchmarks/accuracy_report.py --write` and commit the result")


# ---- the runner grid: qplan run's own NVML peaks, split into fit and held-out points ----
grid_spec = importlib.util.spec_from_file_location("grid_report", ROOT / "benchmarks" / "grid_report.py")
grid = importlib.util.module_from_spec(grid_spec)
grid_spec.loader.exec_module(grid)


@pytest.fixture(scope="module")
def grid_rows():
    recs = grid.load()
    return grid.evaluate(recs), grid.evaluate(recs, analytic=True)


def test_grid_held_out_counted_points_meet_the_bar(grid_rows):
    """Held-out points (architectures and settings nothing was fitted on) whose architecture
    is counted: no under-estimate beyond -5%, median |error| within 5%."""
    rows, _ = grid_rows
    s = grid.summary(rows, "heldout", "counted")
    assert s["points"] >= 3, s
    assert s["worst_under"] >= -0.05, s
    assert s["median_abs_error"] <= 0.05, s


def test_grid_every_point_lies_inside_its_band(grid_rows):
    """What the search keeps under the card (estimate + band) covers every measured peak,
    counted or not, and the analytic fallback covers them too."""
    rows, fallback = grid_rows
    assert grid.summary(rows)["above_band"] == 0, [r["name"] for r in rows if not r["covered"]]
    assert grid.summary(fallback)["above_band"] == 0


def test_grid_covers_the_architectures_issue_9_asks(grid_rows):
    rows, _ = grid_rows
    models = {r["model"] for r in rows if r["split"] == "heldout"}
    assert len(models) >= 12
    for family in ("qwen3", "gemma-3", "phi-4", "mistral-nemo", "llama-3", "qwen2.5"):
        assert any(m.startswith(family) for m in models), family
    assert any(m.startswith(("olmo-2", "granite")) for m in models)


def test_committed_grid_report_is_current(grid_rows):
    import json

    rows, fallback = grid_rows
    committed = json.loads((ROOT / "benchmarks" / "results" / "grid_report.json").read_text())
    got = grid.results(rows, fallback)
    assert {k: committed.get(k) for k in got} == got, (
        "run `python benchmarks/grid_report.py --write` and commit the result")


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _runs(pattern: str) -> list[dict]:
    import json

    return [json.loads(line) for p in sorted((ROOT / "benchmarks/results/raw").glob(pattern))
            for line in p.read_text().splitlines()]


@pytest.mark.parametrize("pattern", ["h200_e2e*.jsonl", "h200_longest_run*.jsonl"])
def test_end_to_end_runs_against_todays_model(pattern):
    """The committed end-to-end runs (suggest --save, run --plan, --simulate-gpu, H200): today's
    estimate of what ran is not under the measured nvidia-smi peak by more than 5%, nor over
    it by more than 10% (a plan that far over leaves a tenth of the card unused)."""
    e2e = _bench("e2e_unmeasured")
    checked = 0
    for r in _runs(pattern):
        est, nv = e2e.todays_estimate(r), (r.get("measured") or {}).get("nvml_peak_gib")
        if est is None or not nv:
            continue
        checked += 1
        assert -0.05 <= (est - nv) / nv <= 0.10, (r["model"], r["card"], r.get("plan"), est, nv)
    assert checked >= 2


def test_longest_sequence_table_trains_with_qplan_run():
    """Issue 9: the README's longest-sequence table, measured with qplan run itself: every
    card (8/12/16/24 GB) with packed and unpacked rows trained, and the report is current."""
    runs = _runs("h200_longest_run*.jsonl")
    done = {(r["card"], r["data"]) for r in runs if r.get("status") == "ok"}
    lr = _bench("longest_run")
    assert done >= set(lr.cases()), set(lr.cases()) - done
    committed = (ROOT / "benchmarks/results/longest_run.md").read_text()
    assert committed == lr.report(sorted((ROOT / "benchmarks/results/raw").glob(
        "h200_longest_run*.jsonl"))), "run `python benchmarks/longest_run.py --report`"
