"""``qplan run --gpus N``: data-parallel training processes (DDP through transformers' Trainer
and accelerate; gloo on the CPU), real CPU runs of the tiny Llama. Each optimizer step's
accumulation is split across the ranks, so a 2-process run trains on the same rows of every
step as a 1-process run and matches its loss to rounding; an out-of-memory error on rank 1
stops both ranks and the next, safer attempt resumes from the last checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from qplan.cli import cli

pytestmark = pytest.mark.slow

ARGS = ["--cpu", "--seq", "32", "--batch", "1", "--grad-accum", "4", "--rank", "8",
        "--no-grad-ckpt", "--max-steps", "3", "--save-steps", "1", "--quiet"]


def _run(out: Path, model_dir, data, *extra: str, env: dict | None = None):
    r = CliRunner().invoke(cli, ["run", "--model", str(model_dir), "--data", str(data),
                                 "--output", str(out), *ARGS, *extra], env=env)
    assert r.exit_code == 0, r.output
    return json.loads((out / "report.json").read_text())


def _steps(out: Path) -> dict[int, dict]:
    recs = {}
    for f in sorted((out / "attempts").glob("*/steps.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            recs[r["step"]] = r
    return recs


@pytest.fixture(scope="module")
def single(tmp_path_factory, model_dir, text_data):
    out = tmp_path_factory.mktemp("one") / "run"
    _run(out, model_dir, text_data)
    return _steps(out)


def test_two_processes_match_one(tmp_path, model_dir, text_data, single):
    out = tmp_path / "run"
    _run(out, model_dir, text_data, "--gpus", "2")
    two = _steps(out)
    assert sorted(two) == [1, 2, 3]
    for k, r in two.items():  # the same rows, tokens and loss as one process
        assert r["positions"] == single[k]["positions"]
        assert r["tokens"] == single[k]["tokens"]
        assert r["loss"] == pytest.approx(single[k]["loss"], abs=1e-4)
    # transformers' accelerator wrapped the model in DDP over two processes
    assert json.loads((out / "attempts" / "1" / "result.json").read_text())["parallel"] == "ddp x2"
    assert (out / "attempts" / "1" / "rank1" / "result.json").exists()
    assert (out / "adapter_model.safetensors").exists()


def test_oom_on_rank_1_resumes_with_a_safer_plan(tmp_path, model_dir, text_data, single):
    out = tmp_path / "run"
    rep = _run(out, model_dir, text_data, "--gpus", "2",
               env={"QPLAN_FAILPOINTS": "oom@attempt=1,step=3,rank=1"})
    a1, a2 = rep["attempts"]
    assert a1["ended"] == "oom" and "rank 1" in a1["error"]
    assert a2["ended"] == "ok"
    steps = _steps(out)
    assert sorted(steps) == [1, 2, 3]
    assert steps[3]["attempt"] == 2  # resumed from the checkpoint of step 2
    for k, r in steps.items():
        assert r["loss"] == pytest.approx(single[k]["loss"], abs=1e-4)


def test_accumulation_must_split_across_the_processes(tmp_path, model_dir, text_data):
    r = CliRunner().invoke(cli, ["run", "--model", str(model_dir), "--data", str(text_data),
                                 "--output", str(tmp_path / "run"), *ARGS, "--gpus", "3"])
    assert r.exit_code == 2, r.output
    assert "multiple of 3" in r.output and "--grad-accum 6" in r.output
