"""benchmarks/speed_grid.py's fresh-process repeat mode (``--repeat``) on the CPU dry-run path:
each configuration timed in its own process, rounds interleaved, the records complete; the
deadline starts nothing that would end past it; the per-configuration summary."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "speed_grid.py"
sys.path.insert(0, str(ROOT / "benchmarks"))
import speed_grid  # noqa: E402

ITEMS = [
    {"name": "plain", "model": "smollm2-360m", "settings": {"seq_len": 2048, "grad_ckpt": False}},
    {"name": "capped", "model": "smollm2-360m", "cap": "rtx-4090",
     "settings": {"seq_len": 2048, "batch_size": 2, "grad_ckpt": True}},
    {"name": "later", "model": "smollm2-360m", "tier": 2, "settings": {"seq_len": 1024}},
]


def _run(tmp_path, *extra):
    spec = tmp_path / "items.json"
    spec.write_text(json.dumps(ITEMS))
    out = tmp_path / "rep.jsonl"
    r = subprocess.run([sys.executable, str(SCRIPT), "--cpu-dry-run", "--repeat", str(spec),
                        "--out", str(out), "--log", str(tmp_path / "log.txt"), *extra],
                       capture_output=True, text=True, timeout=900,
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
    return recs, (tmp_path / "log.txt").read_text()


@pytest.mark.slow
def test_repeat_times_each_configuration_in_its_own_process(tmp_path):
    recs, log = _run(tmp_path, "--times", "2")
    # tier 1 interleaved (A B A B), then tier 2's rounds
    assert [(r["item"], r["repeat"]) for r in recs] == [
        ("plain", 0), ("capped", 0), ("plain", 1), ("capped", 1), ("later", 0), ("later", 1)]
    assert [r["order"] for r in recs] == list(range(6))
    assert len({r["pid"] for r in recs}) == 6  # a fresh process each
    assert [r["after_build"] for r in recs] == [True] + [False] * 5  # one model, built once
    from qplan import api
    from qplan.runner.planning import simulation

    cap = simulation(api.get_gpu("rtx-4090")).cap_bytes / 2**30
    for r in recs:
        assert r["status"] == "ok" and r["mode"] == "fresh" and r["device"] == "cpu"
        s = r["settings"]
        assert s["seq_len"] == 128 and r["layers"] == 2  # the dry run's tiny sizes
        assert len(r["step_s"]) == 2 and r["warmup"] == 1
        assert r["median_step_s"] == pytest.approx(statistics.median(r["step_s"]), abs=1e-5)
        assert r["tokens_per_s"] == pytest.approx(
            s["seq_len"] * s["batch_size"] / statistics.median(r["step_s"]), rel=1e-3)
        assert r["load_s"] > 0 and r["wall_s"] >= r["load_s"]
        assert r["cap_gib"] == (pytest.approx(cap) if r["item"] == "capped" else None)
        assert r["alloc_conf"] == "expandable_segments:True"  # as the trainer sets it
    assert {r["settings"]["batch_size"] for r in recs if r["item"] == "capped"} == {2}
    assert "capped | 22.76 |" in log  # the summary table


def test_deadline_starts_nothing_that_would_end_past_it(tmp_path):
    recs, log = _run(tmp_path, "--times", "3", "--deadline", "5")
    assert recs == []  # building a model alone is expected to take longer
    assert log.count("not started (deadline") == 9


def test_summary_spread_per_configuration():
    recs = [{"item": "a", "model": "m", "settings": {}, "repeat": i, "status": "ok",
             "tokens_per_s": t, "num_alloc_retries": 0} for i, t in enumerate([100.0, 120.0, 110.0])]
    recs.append({"item": "b", "model": "m", "settings": {}, "repeat": 0, "status": "timeout",
                 "tokens_per_s": None})
    a, b = speed_grid.repeat_summary(recs)
    assert a["tokens_per_s"] == [100.0, 120.0, 110.0]
    assert (a["min"], a["median"], a["max"]) == (100.0, 110.0, 120.0)
    assert a["cv"] == pytest.approx(10.0 / 110.0)
    assert b["tokens_per_s"] == [] and b["failed"] == ["timeout"] and b["cv"] is None


def test_noise_set_resolves():
    """The built-in set: full settings, the 4090's simulation cap, names unique, tier 1 first."""
    items = speed_grid.repeat_items("noise", small=False)
    caps = {it["cap_gib"] for it in items if it["cap"]}
    assert len(caps) == 1 and 20 < caps.pop() < 24
    assert items[0]["name"] == "4090-fused-capped" and items[0]["layers"] is None
    assert items[0]["settings"]["batch_size"] == 1 and items[0]["settings"]["loss"] == "fused"
    assert [it["tier"] for it in items] == sorted(it["tier"] for it in items)
