"""The parent/child protocol (versioned, validated dataclasses), the run folder's state and
lock, and the Trainer internals the runner relies on. No training here."""
from __future__ import annotations

import json
import os

import pytest

from qplan.planner.config import TrainConfig
from qplan.planner.plan import Reason
from qplan.runner import protocol as P
from qplan.runner import rundir
from qplan.runner.types import RunRequest

SPEC = P.AttemptSpec(
    attempt=3, run_dir="/r", attempt_dir="/r/attempts/3", model_path="/m", model_ref="/m",
    settings=TrainConfig(seq_len=64, batch_size=2, lora_targets=("q", "v")), total_steps=10,
    lr=1e-4, lr_scheduler="cosine", warmup_steps=1, max_grad_norm=1.0, save_steps=2,
    eval_steps=2, keep_checkpoints=2, seed=7, resume_from="/r/checkpoints/step-000004",
    resumed_from=4, load_optimizer=False, device="cuda",
    simulate=P.Simulation(name="rtx-4060", card_bytes=8, context_bytes=1, cap_bytes=7),
    change=Reason(("batch_size", "grad_accum"), "per-device batch 4 -> 2"),
    estimated_peak_gib=6.5)
RESULT = P.AttemptResult(
    status="oom", global_step=6, start_step=4, steps_done=2, tokens=512, train_seconds=2.0,
    tokens_per_s=256.0, steady_tokens_per_s=300.0, evals=[P.EvalRecord(step=6, eval_loss=1.5)],
    measured=P.Measured(device="NVIDIA H200", host_rss_peak_gib=3.2, peak_reserved_gib=6.1,
                        peak_allocated_gib=5.9, nvml_peak_gib=6.9, cuda_context_gib=0.8),
    error="CUDA out of memory", oom_phase="eval", oom_step=6, checkpoint_saved=True)


@pytest.mark.parametrize("obj", [SPEC, RESULT, P.AttemptExit(exit_code=-9, wall_s=1.5,
                                                            signal="SIGKILL")],
                         ids=["spec", "result", "exit"])
def test_round_trip(obj, tmp_path):
    P.write(tmp_path / "f.json", obj)
    assert P.read(type(obj), tmp_path / "f.json") == obj


@pytest.mark.parametrize("change, match", [
    (lambda d: d.update(protocol=2), "protocol version 2"),
    (lambda d: d.update(warp=9), "unknown field"),
    (lambda d: d.pop("total_steps"), "missing field.*total_steps"),
    (lambda d: d.update(total_steps="10"), "total_steps must be int"),
    (lambda d: d.update(seed=True), "seed must be int"),
    (lambda d: d["settings"].update(optim="sgd"), "optim 'sgd' is not one of"),
    (lambda d: d["simulate"].pop("cap_bytes"), "simulate: missing field"),
    (lambda d: d.update(change={"settings": "batch_size", "text": "x"}), "settings must be a list"),
], ids=["version", "unknown", "missing", "type", "bool-is-not-int", "settings", "nested", "reason"])
def test_a_malformed_spec_is_refused_naming_the_field(change, match, tmp_path):
    d = P.to_dict(SPEC)
    change(d)
    (tmp_path / "attempt.json").write_text(json.dumps(d))
    with pytest.raises(P.ProtocolError, match=match):
        P.read(P.AttemptSpec, tmp_path / "attempt.json")


def test_result_status_and_phase_are_checked():
    with pytest.raises(ValueError, match="status 'done'"):
        P.AttemptResult(status="done", global_step=0, start_step=0)
    with pytest.raises(ValueError, match="oom_phase 'backward'"):
        P.AttemptResult(status="oom", global_step=0, start_step=0, oom_phase="backward")


def test_unreadable_files_are_protocol_errors(tmp_path):
    with pytest.raises(P.ProtocolError, match="is missing"):
        P.read(P.AttemptResult, tmp_path / "result.json")
    (tmp_path / "result.json").write_text("{cut")
    with pytest.raises(P.ProtocolError, match="not valid JSON"):
        P.read(P.AttemptResult, tmp_path / "result.json")


def test_steps_file_stops_at_a_line_cut_by_a_kill(tmp_path):
    rec = P.StepRecord(step=1, attempt=1, positions=[0, 1], micro_batches=[[0], [1]],
                       rows=[5, 3], loss=2.5, tokens=40, seconds=0.1)
    line = json.dumps(rec.to_dict())
    (tmp_path / "steps.jsonl").write_text(line + "\n" + line.replace("1", "2", 1)[:20])
    assert P.read_steps(tmp_path / "steps.jsonl") == [rec]


@pytest.mark.parametrize("field, value, match", [
    ("lr", float("nan"), "--lr must be a number in"),
    ("lr", 3.0, "--lr must be a number in"),
    ("epochs", float("inf"), "--epochs must be a number"),
    ("eval_split", 0.99, "--eval-split must be a number in \\[0, 0.5\\)"),
    ("seed", -1, "--seed must be a number"),
    ("max_steps", 0, "--max-steps must be an integer >= 1"),
    ("keep_checkpoints", 0, "keep_checkpoints must be an integer >= 1"),
    ("lr_scheduler", "cosine_annealing", "lr_scheduler 'cosine_annealing' is not one of"),
])
def test_a_run_request_refuses_values_that_cannot_be_meant(field, value, match):
    """For library callers (the CLI's flags refuse most of these already)."""
    from qplan.errors import BadInputError

    with pytest.raises(BadInputError, match=match):
        RunRequest(model="m", data="d.jsonl", **{field: value}).check()
    RunRequest(model="m", data="d.jsonl").check()


# ---- the run folder -----------------------------------------------------------------------
def test_run_state_round_trip(tmp_path):
    state = rundir.RunState(
        request=RunRequest(model="m", data="d.jsonl", overrides={"seq_len": 64}), model="m",
        model_path="/m", model_ref="/m", settings=TrainConfig(), effective_batch=16,
        total_steps=10, save_steps=2, eval_steps=2, warmup_steps=1, device="cpu",
        device_name="CPU", planned_for="rtx-4090", data={"rows": 20}, notes=["n"],
        next_change=Reason(("grad_ckpt",), "checkpointing on"))
    rundir.write_state(tmp_path, state)
    assert rundir.read_state(tmp_path) == state


def test_attempt_numbers_are_never_reused(tmp_path):
    (tmp_path / "attempts" / "1").mkdir(parents=True)  # started, then the parent died
    (tmp_path / "attempts" / "3").mkdir()
    assert rundir.next_attempt_number(tmp_path) == 4
    assert rundir.load_attempts(tmp_path) == []  # no attempt.json: nothing ran


def test_the_lock_names_its_holder_and_is_released(tmp_path):
    with rundir.RunLock(tmp_path) as lock:
        lock.update(child_pid=12345)
        with pytest.raises(rundir.RunFolderError) as e:
            rundir.RunLock(tmp_path).acquire()
        msg = str(e.value)
        assert f"pid {os.getpid()}" in msg and "training process is pid 12345" in msg
        assert f"kill {os.getpid()}" in msg
    again = rundir.RunLock(tmp_path).acquire()  # released: and no stale record left
    assert again.stale is None
    again.release()


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / rundir.LOCK_FILE).write_text(json.dumps({"pid": int(dead), "host": "h"}))
    lock = rundir.RunLock(tmp_path).acquire()
    try:
        assert f"pid {dead} (no longer running)" in lock.stale_note()
    finally:
        lock.release()


# ---- what of Trainer the runner relies on ---------------------------------------------------
def test_the_installed_transformers_has_what_the_runner_uses():
    pytest.importorskip("transformers")
    from qplan.runner.trainer_compat import check, missing

    assert missing() == []
    check()


def test_a_transformers_without_them_is_refused_before_training(monkeypatch):
    pytest.importorskip("transformers")
    from transformers import Trainer

    from qplan.errors import RunError
    from qplan.runner.trainer_compat import check

    monkeypatch.delattr(Trainer, "_save_rng_state")
    with pytest.raises(RunError, match="lacks what qplan's runner uses: Trainer._save_rng_state"):
        check()


# ---- the speed prediction set against the measured one ----------------------------------
def _run_on(monkeypatch, device: str, planned: str, detected: str | None):
    """A Run planned for ``planned`` whose machine detects ``detected`` (None: no GPU)."""
    import types

    from qplan import api
    from qplan.runner import planning
    from qplan.runner import run as run_mod

    fake = None if detected is None else types.SimpleNamespace(
        name=detected, profile=api.get_gpu(detected))
    monkeypatch.setattr(planning, "_detected", lambda cpu, pm=None: None if cpu else fake)
    state = rundir.RunState(
        request=RunRequest(model="llama-3.1-8b", data="d.jsonl", use_calibration=False),
        model="llama-3.1-8b", model_path="llama-3.1-8b", model_ref="llama-3.1-8b",
        settings=TrainConfig(seq_len=2048, batch_size=1, grad_accum=16), effective_batch=16,
        total_steps=10, save_steps=2, eval_steps=2, warmup_steps=1, device=device,
        device_name=detected or "CPU", planned_for=planned, data={"rows": 20})
    from pathlib import Path

    return run_mod._context(Path("/nonexistent"), state, state.request, None, print, None)


def test_simulated_card_predicts_the_speed_of_the_gpu_that_trains(monkeypatch):
    """Under --simulate-gpu the settings are the card's but the steps run on the real GPU:
    the prediction set against them is the real GPU's (an rtx-4060's would be ~6x low)."""
    from qplan import api
    from qplan.planner.speed import estimate_speed
    from qplan.runner import run as run_mod

    r = _run_on(monkeypatch, "cuda", planned="rtx-4060", detected="h200")
    assert r.runs_on is not None and r.runs_on.name == "h200"
    got = run_mod.predicted_speed(r, r.cfg)
    cfg = r.cfg
    h200 = estimate_speed(r.profile, cfg, api.get_gpu("h200")).tokens_per_s
    card = estimate_speed(r.profile, cfg, api.get_gpu("rtx-4060")).tokens_per_s
    assert got == pytest.approx(h200, rel=1e-3)
    assert got > 2 * card


def test_same_card_and_cpu_predictions(monkeypatch):
    from qplan import api
    from qplan.planner.speed import estimate_speed
    from qplan.runner import run as run_mod

    r = _run_on(monkeypatch, "cuda", planned="h200", detected="h200")
    assert r.runs_on is None
    assert run_mod.predicted_speed(r, r.cfg) == pytest.approx(
        estimate_speed(r.profile, r.cfg, api.get_gpu("h200")).tokens_per_s, rel=1e-3)
    r = _run_on(monkeypatch, "cpu", planned="rtx-4090", detected=None)
    assert r.runs_on is None and run_mod.predicted_speed(r, r.cfg) is None
