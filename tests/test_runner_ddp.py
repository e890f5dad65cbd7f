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


def test_fused_loss_and_checkpointing_sync_through_ddp(tmp_path, model_dir, text_data):
    """The fused loss calls the decoder itself: under DDP it must still pass through the
    wrapper's forward, or the ranks' gradients are never averaged (or it fails outright:
    seen on 2 H200s). Two processes match one process's losses, step by step."""
    extra = ("--loss", "fused", "--grad-ckpt")
    one, two = tmp_path / "one", tmp_path / "two"
    _run(one, model_dir, text_data, *extra)
    rep = _run(two, model_dir, text_data, *extra, "--gpus", "2")
    a, b = _steps(one), _steps(two)
    assert sorted(b) == [1, 2, 3]
    for k in a:
        assert b[k]["loss"] == pytest.approx(a[k]["loss"], abs=1e-4)
    assert len(rep["attempts"][0]["rank_measured"]) == 2


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
    assert "multiple of 3" in r.output and "grad_accum 3 or 6" in r.output


@pytest.mark.parametrize("seen, gpus, want", [
    (None, 1, "0"), (None, 2, "0,1"), ("3,5", 1, "3"), ("3, 5,6", 2, "3,5"), ("", 1, "")])
def test_training_processes_see_only_their_gpus(monkeypatch, seen, gpus, want):
    """A 1-GPU plan on a machine with 2 GPUs: transformers' Trainer would otherwise run
    DataParallel over both with twice the per-device batch (seen on 2 H200s: twice the
    estimated peak); with --gpus N the first N visible GPUs, rank k on the k-th."""
    from qplan.planner.config import TrainConfig
    from qplan.runner.run import _child_env

    if seen is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", seen)
    cfg = TrainConfig(gpus=gpus, grad_accum=2)
    assert _child_env(cfg, {}, "cuda")["CUDA_VISIBLE_DEVICES"] == want
    assert _child_env(cfg, {}, "cpu")["CUDA_VISIBLE_DEVICES"] == ""


def test_a_plan_for_two_gpus_runs_two_processes(tmp_path, model_dir, text_data):
    """`suggest --gpus 2 --save`, then `run --plan`: the plan's GPUs start as many
    processes, with no --gpus at run time; the report has each process's measurements."""
    plan = tmp_path / "plan.yaml"
    r = CliRunner().invoke(cli, ["suggest", "--model", str(model_dir), "--gpu", "rtx-4090",
                                 "--seq", "32", "--gpus", "2", "--batch", "1",
                                 "--target-batch", "4", "--rank", "8", "--save", str(plan)])
    assert r.exit_code == 0, r.output
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["run", "--plan", str(plan), "--model", str(model_dir),
                                 "--data", str(text_data), "--output", str(out), "--cpu",
                                 "--max-steps", "2", "--quiet"])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    (a,) = rep["attempts"]
    assert a["settings"]["gpus"] == 2 and a["settings"]["grad_accum"] == 4
    assert len(a["rank_measured"]) == 2 and all(m["device"] == "cpu" for m in a["rank_measured"])
    assert json.loads((out / "attempts" / "1" / "result.json").read_text())["parallel"] == "ddp x2"
    assert "rank 1" in (out / "summary.md").read_text()


def _rank_stand_in(tmp_path: Path, code: str) -> "subprocess.Popen":
    """A process standing in for a training rank (the life-line attribute wait_ranks closes)."""
    import os
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path)
    r, _w = os.pipe()
    p.qplan_lifeline = r  # type: ignore[attr-defined]
    return p


@pytest.mark.parametrize("status,stopped", [("oom", True), ("error", True), ("ok", False)])
def test_a_rank_whose_result_says_it_failed_stops_the_others_even_if_it_hangs(
        tmp_path, monkeypatch, status, stopped):
    """A rank whose result says it failed counts as ended, should its process linger (its
    teardown waiting on collectives): after the grace, all are killed. A result that says
    ok does not (the rank is about to exit)."""
    import time

    from qplan.runner import supervise

    monkeypatch.setattr(supervise, "RANK_GRACE_S", 0.5)
    res = [tmp_path / "r0.json", tmp_path / "r1.json"]
    waits = "import time; time.sleep(4)"
    hangs_after_result = (f"import json, time; open({str(res[1])!r}, 'w').write("
                          f"json.dumps({{'status': {status!r}}})); time.sleep(4)")
    procs = [_rank_stand_in(tmp_path, waits), _rank_stand_in(tmp_path, hangs_after_result)]
    t0 = time.monotonic()
    codes, first = supervise.wait_ranks(procs, res)
    took = time.monotonic() - t0
    if stopped:
        assert first == 1 and codes == [-9, -9] and took < 3.5
    else:
        assert first is None and codes == [0, 0] and took >= 3.5


def test_a_rank_that_exits_badly_stops_the_others_after_the_grace(tmp_path, monkeypatch):
    """Rank 1 ends (out of memory), rank 0 waits in a collective that never fails (NCCL's):
    the H200 hang. The supervisor looked only at rank 0 while it ran, never saw rank 1 end;
    failed before the fix (codes [0, 17]: rank 0 ran its 8 s)."""
    from qplan.runner import supervise

    monkeypatch.setattr(supervise, "RANK_GRACE_S", 0.2)
    procs = [_rank_stand_in(tmp_path, "import time; time.sleep(8)"),
             _rank_stand_in(tmp_path, "import sys; sys.exit(17)")]
    codes, first = supervise.wait_ranks(procs)
    assert first == 1 and codes == [-9, 17]


@pytest.mark.parametrize("strategy,hint", [
    ("ddp", "the effective batch stays"),
    ("fsdp", "plan again for 1 with `qplan suggest --gpus 1`")])
def test_a_plan_for_more_gpus_than_visible_says_what_to_do(monkeypatch, strategy, hint):
    """A plan saved for 2 GPUs, run where one is visible: the refusal names --gpus 1 and
    what that changes (nothing for the effective batch of a data-parallel plan; a sharded
    plan must be planned again)."""
    import types

    from qplan.errors import BadInputError
    from qplan.planner import hardware
    from qplan.runner import newrun

    monkeypatch.setattr(hardware, "probe", lambda **_: types.SimpleNamespace(gpus=[object()]))
    with pytest.raises(BadInputError) as e:
        newrun._check_gpus(2, "cuda", strategy)
    msg = str(e.value)
    assert "1 GPU(s) are visible" in msg and "give --gpus 1 or fewer" in msg and hint in msg
    newrun._check_gpus(1, "cuda", strategy)  # fits what is visible: no error
    newrun._check_gpus(4, "cpu", strategy)  # CPU processes need no GPUs


@pytest.mark.parametrize("value,want", [(None, 0.02), ("2.0", 2.0), ("abc", 0.02), ("-1", 0.02),
                                        ("0", 0.02), ("nan", 0.02), ("inf", 0.02)])
def test_period_settings_from_the_environment_never_fail_a_run(monkeypatch, value, want):
    """QPLAN_SAMPLE_INTERVAL_S / QPLAN_HANG_DUMP_S are for measuring: a wrong value falls
    back to the default instead of failing the training process."""
    from qplan.runner.child import _env_seconds

    if value is None:
        monkeypatch.delenv("QPLAN_SAMPLE_INTERVAL_S", raising=False)
    else:
        monkeypatch.setenv("QPLAN_SAMPLE_INTERVAL_S", value)
    assert _env_seconds("QPLAN_SAMPLE_INTERVAL_S", 0.02) == want
