"""Real QLoRA runs on CPU with a tiny Llama (hidden 64, 2 layers, random weights): a
finished run through the command line, OOM recovery, a kill and a SIGTERM followed by
``--resume``, and merging. Faults come from QPLAN_FAILPOINTS (docs/runner.md).

Each training process takes ~10 s on 2 cores (mostly importing torch + transformers);
the file starts eight of them.
"""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from fixtures import tiny_llama as TL
from fixtures.run_checks import assert_each_step_once
from qplan.cli import cli
from qplan.errors import RunError
from qplan.planner.plan import load_plan
from qplan.runner import checkpoint as CK
from qplan.runner.run import run
from qplan.runner.types import RunRequest

pytestmark = pytest.mark.slow

STEPS = 6
# per-device batch 2 x accumulation 2 = 4 rows a step; no checkpointing, so the ladder's
# first move is to halve the batch
SETTINGS = dict(seq_len=32, batch_size=2, grad_accum=2, lora_rank=8, lora_alpha=16,
                grad_ckpt=False)


def request(model_dir, data, out, **kw) -> RunRequest:
    kw = {"save_steps": 2, **kw}
    return RunRequest(model=str(model_dir), data=str(data), output=str(out), cpu=True,
                      overrides=dict(SETTINGS), max_steps=STEPS, progress=False, **kw)


def adapter(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


# ---- a finished run through the command line --------------------------------------
@pytest.fixture(scope="module")
def finished(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    recs = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in zip(TL.sentences(30, seed=1), TL.sentences(30, seed=2))]
    data = TL.write_jsonl(tmp / "chat.jsonl", recs)
    out = tmp / "run"
    r = CliRunner().invoke(cli, [
        "run", "--model", str(model_dir), "--data", str(data), "--completion-only", "--cpu",
        "--seq", "48", "--batch", "2", "--grad-accum", "2", "--rank", "8", "--no-grad-ckpt",
        "--max-steps", "4", "--save-steps", "2", "--eval-split", "0.2", "--lr", "0.01",
        "--output", str(out), "--json"])
    return r, out


def test_cli_run_trains_and_writes_everything(finished):
    r, out = finished
    assert r.exit_code == 0, r.output
    for f in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json",
              "tokenizer_config.json", "plan.yaml", "report.json", "summary.md"):
        assert (out / f).is_file(), f
    rep = json.loads((out / "report.json").read_text())
    assert json.loads(r.stdout) == {"schema_version": 1, **rep}  # --json: the report, alone
    assert "attempt 1:" in r.stderr  # the progress went to stderr
    assert rep["status"] == "ok" and rep["steps_done"] == rep["total_steps"] == 4
    (a,) = rep["attempts"]
    assert a["ended"] == "ok" and a["measured"]["device"] == "cpu"
    assert a["estimated_peak_gib"] > 0 and a["tokens_per_s"] > 0
    assert rep["data"]["format"] == "chat" and rep["data"]["completion_only"]
    assert load_plan(out / "plan.yaml").config.to_dict() == a["settings"]
    summary = (out / "summary.md").read_text()
    assert "n/a on CPU" in summary and "| 1 |" in summary and "(ok)" in summary
    res = json.loads((out / "attempts" / "1" / "result.json").read_text())
    assert [e["step"] for e in res["evals"]] == [2, 4]  # eval at each checkpoint


def test_merge_gives_the_adapters_outputs(finished, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, out = finished
    r = CliRunner().invoke(cli, ["merge", "--adapter", str(out), "--output", str(tmp_path / "m"),
                                 "--dtype", "fp32", "--json"])
    assert r.exit_code == 0, r.output
    done = json.loads(r.stdout)
    assert done["output"] == str(tmp_path / "m") and done["dtype"] == "fp32"
    assert done["parameters"] > 0
    base_path = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    x = torch.tensor([[1, 10, 11, 12, 13, 14, 15, 16]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)(x).logits
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        plain = base(x).logits
        lora = PeftModel.from_pretrained(base, str(out))(x).logits
    torch.testing.assert_close(merged, lora, atol=1e-4, rtol=1e-4)
    assert (merged - plain).abs().max() > 1e-2  # the adapter did change the model
    assert (tmp_path / "m" / "tokenizer.json").is_file()


# ---- out of memory -----------------------------------------------------------------
def test_oom_at_step_3_is_recovered_with_the_same_effective_batch(model_dir, text_data,
                                                                   tmp_path, monkeypatch):
    monkeypatch.setenv("QPLAN_FAILPOINTS", "oom@attempt=1,step=3")
    messages = []
    # no regular checkpoint before step 4: the child saves step 2 after the OOM
    rep = run(request(model_dir, text_data, tmp_path / "o", save_steps=4), notify=messages.append)
    assert rep.status == "ok" and len(rep.attempts) == 2
    a1, a2 = rep.attempts
    assert (a1.ended, a1.last_step, a2.ended, a2.resumed_from) == ("oom", 2, "ok", 2)
    assert (a1.settings["batch_size"], a1.settings["grad_accum"]) == (2, 2)
    assert (a2.settings["batch_size"], a2.settings["grad_accum"]) == (1, 4)
    assert "effective batch stays 4" in a2.change.text and a2.change.settings == ("batch_size", "grad_accum")
    assert any("ran out of GPU memory in training at step 3" in m for m in messages)
    assert any(m.startswith("next attempt: per-device batch 2 -> 1") for m in messages)
    assert_each_step_once(rep)
    assert rep.discarded_steps == []
    assert all(len(mb) == 2 for s in rep.steps if s["step"] <= 2 for mb in s["micro_batches"])
    assert all(len(mb) == 1 for s in rep.steps if s["step"] > 2 for mb in s["micro_batches"])
    assert load_plan(tmp_path / "o" / "plan.yaml").config.batch_size == 1


def test_oom_in_evaluation_names_the_step_it_came_after(model_dir, text_data, tmp_path,
                                                       monkeypatch):
    monkeypatch.setenv("QPLAN_FAILPOINTS", "oom@attempt=1,step=2,phase=eval")
    messages = []
    rep = run(request(model_dir, text_data, tmp_path / "o", eval_split=0.2),
              notify=messages.append)
    assert rep.status == "ok"
    a1 = rep.attempts[0]
    assert (a1.ended, a1.oom_phase, a1.oom_step, a1.last_step) == ("oom", "eval", 2, 2)
    assert any("ran out of GPU memory in evaluation after step 2" in m for m in messages)
    assert rep.attempts[1].resumed_from == 2  # saved after the OOM: step 2 was complete
    assert_each_step_once(rep)


# ---- kill, SIGTERM, resume -------------------------------------------------------------
@pytest.fixture(scope="module")
def killed_then_resumed(model_dir, text_data, tmp_path_factory):
    """Killed while writing the checkpoint of step 4 (renamed, no COMPLETE marker yet)."""
    out = tmp_path_factory.mktemp("kill") / "o"
    mp = pytest.MonkeyPatch()
    mp.setenv("QPLAN_FAILPOINTS", "kill@attempt=1,step=4,phase=save")
    try:
        with pytest.raises(RunError, match="killed") as e:
            run(request(model_dir, text_data, out), notify=lambda m: None)
    finally:
        mp.undo()
    half = out / "checkpoints" / "step-000004"
    state = {"killed": e.value.report, "half_written": half.is_dir() and not CK.is_complete(half),
             "complete": [p.name for p in CK.complete_checkpoints(out / "checkpoints")]}
    messages = []
    state["resumed"] = run(RunRequest(resume=str(out), progress=False), notify=messages.append)
    state["messages"] = messages
    return out, state


def test_kill_leaves_a_half_written_checkpoint_that_resume_ignores(killed_then_resumed):
    out, s = killed_then_resumed
    killed = s["killed"]
    assert killed.status == "killed" and "SIGKILL" in killed.message and "--resume" in killed.message
    assert s["half_written"] and s["complete"] == ["step-000002"]
    assert [x["step"] for x in killed.steps] == [1, 2]  # what the checkpoint holds
    assert "ignored incomplete checkpoint(s): step-000004" in s["messages"]


def test_resume_after_a_kill_loses_only_the_steps_after_the_checkpoint(killed_then_resumed):
    _, s = killed_then_resumed
    rep = s["resumed"]
    assert rep.status == "ok" and [a.ended for a in rep.attempts] == ["killed", "ok"]
    assert rep.attempts[1].resumed_from == 2 and rep.total_steps == STEPS
    assert_each_step_once(rep)
    assert [(x["step"], x["attempt"]) for x in rep.discarded_steps] == [(3, 1), (4, 1)]


def test_sigterm_saves_and_resume_matches_an_uninterrupted_run(model_dir, text_data, tmp_path,
                                                               monkeypatch, killed_then_resumed):
    monkeypatch.setenv("QPLAN_FAILPOINTS", "sigterm@attempt=1,step=3")
    first = run(request(model_dir, text_data, tmp_path / "o"), notify=lambda m: None)
    assert first.status == "interrupted" and "--resume" in first.message
    assert CK.step_of(CK.latest(tmp_path / "o" / "checkpoints")) == 3  # saved on SIGTERM
    monkeypatch.delenv("QPLAN_FAILPOINTS")
    rep = run(RunRequest(resume=str(tmp_path / "o"), progress=False), notify=lambda m: None)
    assert rep.status == "ok" and rep.attempts[1].resumed_from == 3 and rep.discarded_steps == []
    assert_each_step_once(rep)
    # Same settings and seed, resumed from step 3 here and from step 2 after the kill:
    # both end with the adapter (and losses) of a run that was never stopped.
    other_out, other = killed_then_resumed
    assert [x["loss"] for x in rep.steps] == [x["loss"] for x in other["resumed"].steps]
    a, b = adapter(tmp_path / "o"), adapter(other_out)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_oom_while_loading_ends_the_run_with_a_clear_message(model_dir, text_data, tmp_path,
                                                              monkeypatch):
    monkeypatch.setenv("QPLAN_FAILPOINTS", "oom@phase=load")
    with pytest.raises(RunError, match="while loading and preparing the model") as e:
        run(request(model_dir, text_data, tmp_path / "o"), notify=lambda m: None)
    (a,) = e.value.report.attempts
    assert a.ended == "oom" and a.last_step == 0
