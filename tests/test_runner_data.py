"""The runner without training: data formats and masking, bad input, packing, the data
order, failpoints, checkpoints, the OOM policy (plugins first) and the commands' errors.

The tiny model and tokenizer come from tests/fixtures/tiny_llama.py (built in a second).
"""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from fixtures import tiny_llama as TL
from qplan.cli import cli
from qplan.errors import BadInputError
from qplan.planner.config import TrainConfig
from qplan.planner.plan import Plan
from qplan.plugins.hookspecs import hookimpl
from qplan.plugins.manager import make_plugin_manager
from qplan.runner import checkpoint as CK
from qplan.runner import data as D
from qplan.runner import failpoints as F
from qplan.runner import planning
from qplan.runner.report import assemble_steps
from qplan.runner import protocol as P
from qplan.runner.rundir import AttemptRecord

SEQ = 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return TL.build(tmp_path_factory.mktemp("tiny") / "tiny")


@pytest.fixture(scope="module")
def tok(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def labelled(ids, labels, tok) -> list[str]:
    return tok.convert_ids_to_tokens([i for i, y in zip(ids, labels) if y != -100])


# ---- formats and masking ----------------------------------------------------
def test_text_records_learn_every_token_and_end_with_eos(tok):
    ids, labels = D.tokenize({"text": "the quick fox"}, "text", tok, completion_only=False)
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "the", "quick", "fox", "</s>"]
    assert labels == [-100] + ids[1:]  # the first token is never a target


@pytest.mark.parametrize("rec, fmt, answer", [
    ({"instruction": "what is two plus two", "input": "", "output": "four"}, "alpaca", ["four"]),
    ({"instruction": "what is", "input": "two plus three", "output": "five apples"}, "alpaca",
     ["five", "apples"]),
    ({"prompt": "what is two plus two ", "completion": "four"}, "prompt_completion", ["four"]),
])
def test_completion_only_learns_the_answer_and_eos_only(tok, rec, fmt, answer):
    ids, labels = D.tokenize(rec, fmt, tok, completion_only=True)
    assert labelled(ids, labels, tok) == answer + ["</s>"]
    ids2, labels2 = D.tokenize(rec, fmt, tok, completion_only=False)
    assert ids2 == ids and labels2 == [-100] + ids[1:]  # same tokens; only the mask differs


def test_alpaca_prompt_includes_instruction_and_input(tok):
    ids, _ = D.tokenize({"instruction": "what is", "input": "two plus three", "output": "five"},
                        "alpaca", tok, completion_only=True)
    words = tok.convert_ids_to_tokens(ids)
    assert words[words.index("Instruction:") + 1:][:2] == ["what", "is"]
    assert "Input:" in words and "Response:" in words


def test_chat_completion_only_learns_every_assistant_turn_and_its_end(tok):
    rec = {"messages": [{"role": "system", "content": "warm days"},
                        {"role": "user", "content": "what is two plus two"},
                        {"role": "assistant", "content": "four"},
                        {"role": "user", "content": "and three plus two"},
                        {"role": "assistant", "content": "five apples"}]}
    ids, labels = D.tokenize(rec, "chat", tok, completion_only=True)
    assert labelled(ids, labels, tok) == ["four", "<|end|>", "five", "apples", "<|end|>"]
    words = tok.convert_ids_to_tokens(ids)
    assert words[:3] == ["<s>", "<|system|>", "warm"]  # the template's rendering, BOS once
    assert words.count("<|user|>") == 2 and words.count("<s>") == 1


def test_chat_without_template_is_refused(tmp_path, tok):
    import copy

    bare = copy.deepcopy(tok)
    bare.chat_template = None
    p = TL.write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                               {"role": "assistant", "content": "b"}]}])
    with pytest.raises(BadInputError, match="no chat template"):
        D.prepare(p, bare, seq_len=SEQ)


def test_completion_only_on_plain_text_is_refused(tmp_path, tok):
    p = TL.write_jsonl(tmp_path / "t.jsonl", [{"text": "the fox"}])
    with pytest.raises(BadInputError, match="completion-only needs"):
        D.prepare(p, tok, seq_len=SEQ, completion_only=True)


def test_datasets_directory_is_read(tmp_path, tok):
    from datasets import Dataset

    Dataset.from_list(TL.alpaca_records(6)).save_to_disk(str(tmp_path / "ds"))
    rows, _, summary, _ = D.prepare(tmp_path / "ds", tok, seq_len=SEQ)
    assert summary.format == "alpaca" and summary.records == 6 and rows


# ---- bad input ----------------------------------------------------------------
BAD_LINES = [
    {"text": "the fox"},
    '{"text": "the fox"',  # line 2: broken JSON
    {"text": "a dog"},
    {"txt": "typo"},  # line 4: no known field
    {"text": ""},  # line 5: empty
    {"messages": [{"role": "user", "content": "x"}]},  # line 6: other format
]


def test_bad_lines_are_reported_with_file_and_line_and_nothing_starts(tmp_path, tok):
    p = TL.write_jsonl(tmp_path / "train.jsonl", BAD_LINES)
    with pytest.raises(BadInputError) as e:
        D.prepare(p, tok, seq_len=SEQ)
    msg = str(e.value)
    assert "4 bad record(s)" in msg and "--skip-bad-lines" in msg
    assert "train.jsonl:2: not valid JSON" in msg
    assert "train.jsonl:4: no known fields" in msg
    assert "train.jsonl:5: 'text' is empty" in msg
    assert "train.jsonl:6: a chat record in a text file" in msg
    assert "train.jsonl:1" not in msg and "train.jsonl:3" not in msg


def test_skip_bad_lines_keeps_the_good_ones(tmp_path, tok):
    p = TL.write_jsonl(tmp_path / "train.jsonl", BAD_LINES)
    rows, _, summary, bad = D.prepare(p, tok, seq_len=SEQ, skip_bad_lines=True)
    assert summary.records == 2 and summary.bad_skipped == 4 and len(bad) == 4
    assert summary.examples == 2


@pytest.mark.parametrize("name, content, match", [
    ("missing.jsonl", None, "does not exist"),
    ("data.csv", "a,b\n", "unknown format '.csv'"),
    ("empty.jsonl", "\n\n", "no usable records"),
    ("latin1.jsonl", b'{"text": "caf\xe9"}\n', "not UTF-8"),
])
def test_unusable_data_files(tmp_path, tok, name, content, match):
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    elif content is not None:
        p.write_text(content)
    with pytest.raises(BadInputError, match=match):
        D.prepare(p, tok, seq_len=SEQ)


def test_a_plain_directory_is_not_a_dataset(tmp_path, tok):
    (tmp_path / "d").mkdir()
    with pytest.raises(BadInputError, match="not a saved `datasets` dataset"):
        D.prepare(tmp_path / "d", tok, seq_len=SEQ)


# ---- rows, packing, order -----------------------------------------------------
def test_packing_keeps_examples_whole_and_restarts_positions(tok, tmp_path):
    recs = [{"text": s} for s in TL.sentences(40, seed=3)]
    p = TL.write_jsonl(tmp_path / "t.jsonl", recs)
    packed, _, s1, _ = D.prepare(p, tok, seq_len=SEQ, packing=True)
    single, _, s2, _ = D.prepare(p, tok, seq_len=SEQ, packing=False)
    assert len(single) == 40 and len(packed) < 40
    assert s1.tokens == s2.tokens and s1.label_tokens == s2.label_tokens
    for r in packed:
        assert len(r["input_ids"]) <= SEQ
        starts = [i for i, x in enumerate(r["position_ids"]) if x == 0]
        assert all(r["input_ids"][i] == tok.bos_token_id for i in starts)
    padded = D.pad_row(packed[0], SEQ, 3)
    n = len(packed[0]["input_ids"])
    assert len(padded["input_ids"]) == SEQ and padded["labels"][n:] == [-100] * (SEQ - n)
    assert padded["position_ids"][n:] == list(range(SEQ - n))


def test_packed_examples_do_not_attend_to_each_other(model_dir, tok):
    """A packed row gives each example the logits it gets alone (block-diagonal attention
    from the position ids)."""
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    a = D.tokenize({"text": "the quick brown fox"}, "text", tok, completion_only=False)[0]
    b = D.tokenize({"text": "seven small cats sing"}, "text", tok, completion_only=False)[0]
    (row,) = D.pack_rows([(a, a), (b, b)], SEQ, packing=True)
    row = D.pad_row(row, 16, 3)
    with torch.no_grad():
        packed = m(input_ids=torch.tensor([row["input_ids"]]),
                   position_ids=torch.tensor([row["position_ids"]]), use_cache=False).logits[0]
        alone_b = m(input_ids=torch.tensor([b])).logits[0]
    torch.testing.assert_close(packed[len(a):len(a) + len(b)], alone_b, atol=1e-5, rtol=1e-4)


def test_step_order_is_seeded_epochs_of_permutations():
    o = D.step_order(10, 25, seed=7)
    assert len(o) == 25 and sorted(o[:10]) == list(range(10)) == sorted(o[10:20])
    assert o == D.step_order(10, 25, seed=7) and o != D.step_order(10, 25, seed=8)
    assert o[:10] != o[10:20]


def test_eval_split_holds_out_examples(tmp_path, tok):
    p = TL.write_jsonl(tmp_path / "a.jsonl", TL.alpaca_records(20))
    rows, ev, s, _ = D.prepare(p, tok, seq_len=SEQ, packing=False, eval_fraction=0.25)
    assert len(ev) == 5 and len(rows) == 15 == s.examples


# ---- failpoints -----------------------------------------------------------------
def test_failpoints_parse_and_match():
    fps = F.parse("oom@attempt=1,step=3; kill@step=4,phase=save;sigterm")
    assert fps[0] == F.Failpoint("oom", attempt=1, step=3)
    assert fps[1].matches(phase="save", attempt=9, step=4)
    assert not fps[1].matches(phase="train", attempt=9, step=4)
    assert fps[2].matches(phase="train", attempt=2, step=1)


@pytest.mark.parametrize("spec, match", [("boom@step=1", "unknown action"),
                                         ("oom@when=1", "bad key"),
                                         ("oom@step=x", "must be an integer"),
                                         ("oom@phase=later", "phase 'later'")])
def test_bad_failpoints_are_reported(spec, match):
    with pytest.raises(BadInputError, match=match):
        F.parse(spec)


def test_oom_failpoint_raises_torchs_oom_error_on_cpu():
    import torch

    with pytest.raises(torch.cuda.OutOfMemoryError, match="injected"):
        F.Failpoints(F.parse("oom@attempt=2,step=5"), attempt=2).fire("train", 5)
    F.Failpoints(F.parse("oom@attempt=2,step=5"), attempt=1).fire("train", 5)  # no match


# ---- checkpoints ------------------------------------------------------------------
def _fill(tmp):
    (tmp / "weights.bin").write_bytes(b"x" * 100)


def test_checkpoint_is_written_atomically_and_marked(tmp_path):
    p = CK.write(tmp_path, 4, _fill, {"step": 4})
    assert p.name == "step-000004" and CK.is_complete(p)
    assert CK.read_state(p)["step"] == 4 and not list(tmp_path.glob(".tmp-*"))
    assert CK.latest(tmp_path) == p


def test_a_checkpoint_without_marker_is_never_trusted(tmp_path):
    CK.write(tmp_path, 2, _fill, {"step": 2})

    def crash():
        raise RuntimeError("killed before the marker")

    with pytest.raises(RuntimeError):
        CK.write(tmp_path, 4, _fill, {"step": 4}, before_marker=crash)
    (tmp_path / ".tmp-step-000006-123").mkdir()  # a crash while writing
    assert (tmp_path / "step-000004" / "weights.bin").exists()
    assert CK.step_of(CK.latest(tmp_path)) == 2
    assert sorted(CK.remove_incomplete(tmp_path)) == [".tmp-step-000006-123", "step-000004"]
    assert [p.name for p in tmp_path.iterdir()] == ["step-000002"]


def test_rotation_keeps_the_newest(tmp_path):
    for s in (1, 2, 3, 4):
        CK.write(tmp_path, s, _fill, {"step": s})
    CK.rotate(tmp_path, 2)
    assert [p.name for p in CK.complete_checkpoints(tmp_path)] == ["step-000003", "step-000004"]


def record(n: int, resumed_from: int, steps) -> AttemptRecord:
    """An attempt as read from disk, with the fields the step accounting reads."""
    spec = P.AttemptSpec(
        attempt=n, run_dir="r", attempt_dir=f"r/attempts/{n}", model_path="m", model_ref="m",
        settings=TrainConfig(), total_steps=10, lr=1e-4, lr_scheduler="cosine", warmup_steps=0,
        max_grad_norm=1.0, save_steps=1, eval_steps=1, keep_checkpoints=2, seed=0,
        resume_from=None, resumed_from=resumed_from, load_optimizer=True, device="cpu")
    return AttemptRecord(spec, None, None, [
        P.StepRecord(step=s, attempt=n, positions=[], micro_batches=[], rows=[], loss=0.0,
                     tokens=0, seconds=0.0) for s in steps])


def test_steps_that_count_across_attempts():
    a = [record(1, 0, (1, 2, 3)), record(2, 2, (3, 4, 5, 6)), record(3, 5, (6, 7))]
    kept, lost = assemble_steps(a)
    assert [s["step"] for s in kept] == [1, 2, 3, 4, 5, 6, 7]
    assert [s["step"] for s in lost] == [3, 6]
    kept, lost = assemble_steps(a, last_checkpoint=6)
    assert [s["step"] for s in lost] == [3, 6, 7]


# ---- what comes after an OOM: plugins first, then the ladder -------------------------
class Proposer:
    def __init__(self, make):
        self.make, self.calls = make, []

    @hookimpl
    def on_out_of_memory(self, plan, model, gpu, attempt, error):
        self.calls.append((plan.config, attempt, str(error)))
        return self.make(plan.config)


def _next(pm, cfg, **kw):
    from qplan import api

    model, gpu = api.get_model("llama-3.2-1b"), api.get_gpu("rtx-4060")
    plan = Plan(model=model.name, gpu=gpu.name, config=cfg)
    return planning.next_config(plan, model, gpu, attempt=1, error=RuntimeError("CUDA out of memory"),
                                pm=pm, **kw)


def test_a_proposal_that_changes_the_strategy_is_set_aside():
    cfg = TrainConfig(seq_len=512, batch_size=4, grad_accum=2, gpus=2, strategy="fsdp",
                      optim="adamw_torch")
    p = Proposer(lambda c: c.with_(strategy="ddp", batch_size=2, grad_accum=4))
    pm = make_plugin_manager(entry_points=False, plugins={"proposer": p})
    new, why = _next(pm, cfg, allow_shorter_seq=False)
    assert new.strategy == "fsdp" and new.optim == "adamw_torch"
    assert "proposed strategy ddp" in why.text and why.source == "qplan"


def test_the_on_out_of_memory_hook_is_asked_first():
    p = Proposer(lambda c: c.with_(batch_size=1, grad_accum=c.effective_batch, loss="fused"))
    pm = make_plugin_manager(entry_points=False, plugins={"proposer": p})
    cfg = TrainConfig(seq_len=512, batch_size=4, grad_accum=2)
    new, why = _next(pm, cfg, allow_shorter_seq=False)
    assert (new.batch_size, new.grad_accum, new.loss) == (1, 8, "fused")
    assert why.source == "proposer" and set(why.settings) == {"batch_size", "grad_accum", "loss"}
    assert "'proposer'" in why.text and p.calls[0][0] == cfg and "out of memory" in p.calls[0][2]


@pytest.mark.parametrize("make, reason", [
    (lambda c: c.with_(batch_size=1, grad_accum=1), "effective batch"),
    (lambda c: c.with_(seq_len=256), "--allow-shorter-seq"),
    (lambda c: c, "same settings"),
    (lambda c: None, ""),
    (lambda c: c.with_(gpus=2, strategy="fsdp", optim="adamw_torch"), "proposed 2 GPU(s)"),
])
def test_proposals_that_break_the_rules_fall_back_to_the_ladder(make, reason):
    pm = make_plugin_manager(entry_points=False, plugins={"proposer": Proposer(make)})
    cfg = TrainConfig(seq_len=512, batch_size=4, grad_accum=2)
    new, why = _next(pm, cfg, allow_shorter_seq=False)
    assert (new.batch_size, new.grad_accum) == (2, 4)  # qplan's ladder: halve, keep 8
    assert reason in why.text and "effective batch stays 8" in why.text and why.source == "qplan"


def test_nothing_left_to_try_is_none():
    pm = make_plugin_manager(entry_points=False)
    safest = TrainConfig(seq_len=256, batch_size=1, grad_ckpt=True, optim="paged_adamw_8bit",
                         loss="fused", prepare="lean", expandable_segments=True,
                         offload_activations=True, recompute_norms=True)
    assert _next(pm, safest, allow_shorter_seq=True) is None


def test_simulating_a_gpu_needs_a_gpu(model_dir):
    from qplan import api

    with pytest.raises(BadInputError, match="--simulate-gpu rtx-4060 caps a real GPU"):
        planning.choose(model_ref=str(model_dir), profile=api.get_model(str(model_dir)),
                        plan_file=None, overrides={}, effective_batch=None, gpu_name=None,
                        simulate_gpu="rtx-4060", cpu=True)


# ---- the commands' messages: no tracebacks ----------------------------------------------
def invoke(*args):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    out = r.output + (r.stderr if hasattr(r, "stderr") and r.stderr_bytes is not None else "")
    assert "Traceback" not in out
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, out


def test_run_without_config_json_says_so(tmp_path):
    (tmp_path / "m").mkdir()
    TL.write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    code, out = invoke("run", "--model", tmp_path / "m", "--data", tmp_path / "d.jsonl", "--cpu",
                       "--output", tmp_path / "o")
    assert code == 2 and "has no config.json" in out


def test_run_with_bad_data_names_the_lines(tmp_path, model_dir):
    p = TL.write_jsonl(tmp_path / "train.jsonl", BAD_LINES)
    code, out = invoke("run", "--model", model_dir, "--data", p, "--cpu", "--seq", 32,
                       "--output", tmp_path / "o")
    assert code == 2 and "train.jsonl:2" in out and "--skip-bad-lines" in out
    assert not (tmp_path / "o").exists()  # nothing started


@pytest.mark.parametrize("text, match", [
    ("model: [unclosed\n", "not valid YAML"),
    ("model: x\nsettings: {seq_len: 64}\nbatch: 3\n", "unknown field"),
    ("model: x\nsettings: {seq_len: 64, warp_speed: 9}\n", "unknown setting"),
    ("model: x\nsettings: {seq_len: 64, optim: sgd}\n", "optim 'sgd' is not one of"),
])
def test_run_with_a_bad_plan_file(tmp_path, model_dir, text, match):
    (tmp_path / "plan.yaml").write_text(text)
    TL.write_jsonl(tmp_path / "d.jsonl", [{"text": "the fox"}])
    code, out = invoke("run", "--model", model_dir, "--plan", tmp_path / "plan.yaml", "--data",
                       tmp_path / "d.jsonl", "--cpu", "--output", tmp_path / "o")
    assert code == 2 and match in out


@pytest.mark.parametrize("args, code, match", [
    (["run", "--resume", "/nonexistent/run"], 2, "no such folder"),
    (["run", "--data", "x.jsonl"], 2, "--model is required"),
    (["merge", "--adapter", "/nonexistent", "--output", "o"], 2, "has no adapter_config.json"),
])
def test_command_errors(args, code, match):
    got, out = invoke(*args)
    assert got == code and match in out


def test_simulate_gpu_on_cpu_is_refused_by_the_command(tmp_path, model_dir):
    TL.write_jsonl(tmp_path / "d.jsonl", [{"text": "the fox"}])
    code, out = invoke("run", "--model", model_dir, "--data", tmp_path / "d.jsonl", "--cpu",
                       "--simulate-gpu", "rtx-4060", "--output", tmp_path / "o")
    assert code == 2 and "caps a real GPU" in out


def test_output_folder_of_an_earlier_run_is_not_reused(tmp_path, model_dir):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "run.json").write_text(json.dumps({}))
    TL.write_jsonl(tmp_path / "d.jsonl", [{"text": "the fox"}])
    code, out = invoke("run", "--model", model_dir, "--data", tmp_path / "d.jsonl", "--cpu",
                       "--output", tmp_path / "o")
    assert code == 2 and "--resume" in out


# ---- the starting plan ------------------------------------------------------------------
def _choose(model_dir, **kw):
    from qplan import api

    args = dict(model_ref=str(model_dir), profile=api.get_model(str(model_dir)), plan_file=None,
                overrides={}, effective_batch=None, gpu_name=None, simulate_gpu=None, cpu=True)
    return planning.choose(**{**args, **kw})


def test_a_saved_plan_is_used_with_flags_overriding_it(model_dir, tmp_path):
    from qplan import api
    from qplan.planner.plan import save_plan

    cfg = TrainConfig(seq_len=48, batch_size=4, grad_accum=2, lora_rank=4, compute_dtype="fp16",
                      attn="flash_attention_2", loss="fused")
    prof, gpu = api.get_model(str(model_dir)), api.get_gpu("rtx-4090")
    save_plan(api.make_plan(prof, gpu, cfg, target=8), tmp_path / "plan.yaml")
    s = _choose(model_dir, plan_file=str(tmp_path / "plan.yaml"), overrides={"lora_rank": 8})
    got = s.plan.config
    assert (got.seq_len, got.batch_size, got.grad_accum, got.loss, got.lora_rank) == (48, 4, 2, "fused", 8)
    assert (got.compute_dtype, got.attn) == ("bf16", "sdpa")  # what CPU can run
    assert s.device == "cpu" and any("on CPU" in n for n in s.notes)
    assert got.packed_rows  # the runner's rows restart positions: the mask is counted


def test_without_a_plan_the_planner_chooses_with_flags_held(model_dir):
    s = _choose(model_dir, overrides={"seq_len": 64, "lora_rank": 8}, effective_batch=8)
    c = s.plan.config
    assert c.seq_len == 64 and c.lora_rank == 8 and c.effective_batch == 8
    assert s.gpu.name == planning.CPU_PLANNING_GPU and s.simulate is None
    assert c.packed_rows
    assert s.plan.memory.term("attention_mask").bytes == c.batch_size * 64 * 64


def test_run_without_the_training_stack_says_what_to_install(monkeypatch, tmp_path):
    """The core install has no torch: `qplan run` names the missing libraries and the extra."""
    import importlib.util

    from click.testing import CliRunner

    from qplan.cli import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("peft", "bitsandbytes") else real(name, *a))
    data = tmp_path / "t.jsonl"
    data.write_text('{"text": "hello"}\n')
    r = CliRunner().invoke(cli, ["run", "--model", "llama-3.1-8b", "--data", str(data),
                                 "--gpu", "rtx-4060"])
    assert r.exit_code != 0
    assert "peft, bitsandbytes" in r.output and "pip install 'qplan[train]'" in r.output
    assert "Traceback" not in r.output
