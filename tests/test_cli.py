"""The command line: every command, every bad input, exit codes and messages.

Estimate numbers are never hard-coded here (the memory model is being calibrated); the
tests check structure, consistency and the cases that hold for any sane model (an 8B
model's 4-bit weights alone exceed 2 GiB; a 1B model fits the largest card).
"""
from __future__ import annotations

import json
import math
import sys

import pytest
import yaml
from click.testing import CliRunner

from qplan import api
from qplan.cli import cli
from qplan.commands.common import KNOBS, config_defaults
from qplan.errors import BadInputError, DoesNotFitError
from qplan.planner.config import TrainConfig
from qplan.profiles.gpus import GIB

from fake_nvml import fake_pynvml

SMALL = "llama-3.2-1b"
BIG = "llama-3.1-8b"


@pytest.fixture(scope="module")
def largest_gpu() -> str:
    return max(api.catalog().gpus, key=lambda g: g.memory_gib).name


def run(*args: str, code: int | None = 0):
    r = CliRunner().invoke(cli, list(args))
    assert "Traceback" not in r.output
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    if code is not None:
        assert r.exit_code == code, r.output
    return r


def run_json(*args: str, code: int = 0) -> dict:
    r = run(*args, "--json", code=code)
    return json.loads(r.stdout)


@pytest.fixture
def no_gpu(monkeypatch):
    """A machine without NVML (and without torch in sys.modules)."""
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.delitem(sys.modules, "torch", raising=False)


@pytest.fixture
def two_4090s(monkeypatch):
    nv = fake_pynvml([("NVIDIA GeForce RTX 4090", 24 * GIB, 23 * GIB, (8, 9)),
                      ("NVIDIA GeForce RTX 4090", 24 * GIB, 24 * GIB, (8, 9))])
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    monkeypatch.delitem(sys.modules, "torch", raising=False)


# ---------------------------------------------------------------------------
# help
@pytest.mark.parametrize("cmd", ["suggest", "estimate", "run", "merge", "gpus", "models", "hw",
                                 "doctor"])
def test_help_ends_with_examples(cmd):
    out = run(cmd, "--help").output
    tail = out[out.index("Examples:"):]
    lines = [ln.strip() for ln in tail.splitlines()[1:] if ln.strip()]
    assert lines and all(ln.startswith("qplan ") for ln in lines), tail
    assert any(ln.split()[1] in (cmd, "hw") for ln in lines)


def test_top_level_help_lists_commands():
    out = run("--help").output
    for cmd in ("suggest", "estimate", "run", "merge", "gpus", "models", "hw", "doctor", "plugins"):
        assert cmd in out


@pytest.mark.parametrize("line", ["suggest", "estimate"])
def test_examples_in_help_run(line, tmp_path, monkeypatch):
    """Every example with an explicit --gpu parses and exits 0 or 3 (no bad input)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text('{"text": "hello world"}\n')
    out = run(line, "--help").output
    for ex in out[out.index("Examples:"):].splitlines()[1:]:
        args = ex.split()[1:]
        if "--gpu" not in args or "./my-model/config.json" in args:
            continue
        r = run(*args, code=None)
        assert r.exit_code in (0, 3), (ex, r.output)


# ---------------------------------------------------------------------------
# estimate
def test_estimate_flag_defaults_are_trainconfig_defaults():
    params = {p.name: p for p in
              __import__("qplan.commands.planner", fromlist=["x"]).estimate.params}
    dflt = config_defaults()
    assert {k.field for k in KNOBS} == set(dflt), "every TrainConfig field needs a flag"
    for k in KNOBS:
        want = dflt[k.field]
        got = params[k.field].default
        if k.field == "lora_targets":
            assert (want is None and got == "all") or got == ",".join(want)
        elif k.field == "attn":  # the model's default: sdpa, eager where it has none
            assert got is None and "eager" in params[k.field].help
        else:
            assert got == want, k.field


def test_estimate_default_settings_are_trainconfig(largest_gpu):
    d = run_json("estimate", "--model", SMALL, "--gpu", largest_gpu)
    assert d["settings"] == TrainConfig().to_dict()


def test_estimate_json_schema_and_consistency(largest_gpu):
    d = run_json("estimate", "--model", SMALL, "--gpu", largest_gpu, "--seq", "512",
                 "--batch", "2", "--rank", "32", "--alpha", "64", "--targets", "q,v",
                 "--no-grad-ckpt", "--optim", "adamw_torch", "--prepare", "kbit",
                 "--loss", "fused", "--attn", "eager", "--quant", "fp4", "--no-double-quant",
                 "--no-expandable-segments", "--lora-dropout", "0.05", "--grad-accum", "8")
    for key in ("schema_version", "model", "gpu", "settings", "peak_gib", "breakdown", "fits",
                "headroom_gib", "capacity_gib", "tokens_per_s", "terms", "largest_term"):
        assert key in d
    s = d["settings"]
    assert (s["seq_len"], s["batch_size"], s["grad_accum"], s["lora_rank"], s["lora_alpha"]) == \
        (512, 2, 8, 32, 64)
    assert s["lora_targets"] == ["q", "v"] and s["lora_dropout"] == 0.05
    assert (s["grad_ckpt"], s["double_quant"], s["expandable_segments"]) == (False, False, False)
    assert (s["optim"], s["prepare"], s["loss"], s["attn"], s["quant"]) == \
        ("adamw_torch", "kbit", "fused", "eager", "fp4")
    assert d["model"] == SMALL and d["gpu"] == largest_gpu and d["fits"] is True
    assert math.isclose(sum(d["breakdown"].values()), d["peak_gib"], abs_tol=0.01)
    assert math.isclose(d["capacity_gib"] - d["peak_gib"], d["headroom_gib"], abs_tol=0.002)
    assert math.isclose(sum(t["share"] for t in d["terms"]), 1.0, abs_tol=0.01)
    # the same numbers as the library
    cfg = TrainConfig.from_dict(d["settings"])
    est = api.estimate(api.get_model(SMALL), api.get_gpu(largest_gpu), cfg)
    assert d["peak_gib"] == round(est.memory.peak_gib, 3)


def test_estimate_text_output(largest_gpu):
    out = run("estimate", "--model", SMALL, "--gpu", largest_gpu).output
    for s in ("Settings", "Memory", "base weights", "total peak", "fits", "headroom",
              "tokens/s"):
        assert s in out


def test_estimate_does_not_fit_exit_3_with_breakdown():
    r = run("estimate", "--model", BIG, "--gpu", "2GB", code=3)
    assert "does not fit" in r.output and "total peak" in r.output
    d = run_json("estimate", "--model", BIG, "--gpu", "2GB", code=3)
    assert d["fits"] is False and d["headroom_gib"] < 0
    assert d["largest_term"] == max(d["breakdown"], key=d["breakdown"].get)
    label = next(t["label"] for t in d["terms"] if t["key"] == d["largest_term"])
    assert f"largest term: {label}" in r.output


def test_estimate_vram_caps_the_card(largest_gpu):
    d = run_json("estimate", "--model", SMALL, "--gpu", largest_gpu, "--vram", "10")
    assert d["capacity_gib"] == 10.0


def test_estimate_pre_ampere_warns_about_bf16(pre_ampere_gpu):
    d = run_json("estimate", "--model", SMALL, "--gpu", pre_ampere_gpu.name, code=None)
    assert any("has no bf16" in n and "--compute-dtype fp16" in n for n in d["notes"])


# ---------------------------------------------------------------------------
# suggest
def test_suggest_json_schema(largest_gpu):
    d = run_json("suggest", "--model", SMALL, "--gpu", largest_gpu, "--seq", "1024")
    for key in ("schema_version", "model", "gpu", "settings", "peak_gib", "breakdown", "fits",
                "headroom_gib", "capacity_gib", "tokens_per_s", "plan", "wall_time_s"):
        assert key in d
    assert d["fits"] is True and d["settings"]["seq_len"] == 1024
    p = d["plan"]
    for key in ("settings", "grad_accum", "target_effective_batch", "env", "device_map",
                "reasons"):
        assert key in p
    assert p["settings"] == d["settings"]
    assert p["target_effective_batch"] == 16
    assert p["settings"]["batch_size"] * p["grad_accum"] >= 16
    assert d["wall_time_s"] is None and d["gpu_detected"] is False


def test_suggest_text_output(largest_gpu):
    out = run("suggest", "--model", SMALL, "--gpu", largest_gpu).output
    for s in ("Settings", "why", "batch_size", "effective batch", "Memory", "total peak",
              "headroom", "tokens/s", "device_map"):
        assert s in out


def test_suggest_holds_given_knobs_fixed(largest_gpu):
    d = run_json("suggest", "--model", SMALL, "--gpu", largest_gpu, "--seq", "512",
                 "--batch", "2", "--rank", "32", "--alpha", "16", "--no-grad-ckpt",
                 "--loss", "standard", "--optim", "adamw_8bit", "--targets", "q,k,v,o",
                 "--target-batch", "8")
    s = d["settings"]
    assert (s["batch_size"], s["lora_rank"], s["lora_alpha"], s["grad_ckpt"], s["loss"],
            s["optim"], s["lora_targets"]) == (2, 32, 16, False, "standard", "adamw_8bit",
                                               ["q", "k", "v", "o"])
    assert s["grad_accum"] == 4 and d["plan"]["target_effective_batch"] == 8
    out = run("suggest", "--model", SMALL, "--gpu", largest_gpu, "--rank", "32").output
    assert "fixed by --rank" in out


def test_suggest_wall_time_from_tokens(largest_gpu):
    d = run_json("suggest", "--model", SMALL, "--gpu", largest_gpu, "--tokens", "1000000",
                 "--epochs", "2")
    assert d["dataset"]["approximate"] is False
    assert math.isclose(d["wall_time_s"], 2e6 / d["tokens_per_s"], rel_tol=1e-3)
    out = run("suggest", "--model", SMALL, "--gpu", largest_gpu, "--tokens", "1000000").output
    assert "estimated wall time" in out


def test_suggest_wall_time_from_data_is_approximate(largest_gpu, tmp_path):
    f = tmp_path / "train.jsonl"
    recs = [{"text": "x" * 400}, {"messages": [{"role": "user", "content": "y" * 40}]}]
    f.write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    d = run_json("suggest", "--model", SMALL, "--gpu", largest_gpu, "--data", str(f),
                 "--epochs", "3")
    ds = d["dataset"]
    assert ds["approximate"] is True and ds["records"] == 2
    assert ds["tokens_per_epoch"] == 100 + math.ceil((4 + 40) / 4)
    assert math.isclose(d["wall_time_s"], ds["tokens_per_epoch"] * 3 / d["tokens_per_s"],
                        rel_tol=1e-2, abs_tol=1e-3)
    out = run("suggest", "--model", SMALL, "--gpu", largest_gpu, "--data", str(f)).output
    assert "approximate" in out and "characters/4" in out


def test_suggest_longest(largest_gpu):
    d = run_json("suggest", "--model", SMALL, "--gpu", "rtx-4060", "--longest")
    s = d["settings"]["seq_len"]
    assert s % 256 == 0 and d["fits"]
    m, g = api.get_model(SMALL), api.get_gpu("rtx-4060")
    if s + 256 <= m.max_position_embeddings:
        with pytest.raises(DoesNotFitError):
            api.suggest(m, g, seq_len=s + 256, fixed={"batch_size": 1})
    assert "longest sequence" in run("suggest", "--model", SMALL, "--gpu", "rtx-4060",
                                     "--longest").output


def test_suggest_save_writes_a_loadable_plan(largest_gpu, tmp_path):
    from qplan.planner.plan import load_plan

    path = tmp_path / "plans" / "plan.yaml"
    d = run_json("suggest", "--model", SMALL, "--gpu", largest_gpu, "--save", str(path))
    assert d["saved_to"] == str(path)
    plan = load_plan(path)
    assert plan.config.to_dict() == d["settings"] and plan.model == SMALL
    assert yaml.safe_load(path.read_text())["gpu"] == largest_gpu


def test_suggest_vram_alone_without_gpu(no_gpu):
    d = run_json("suggest", "--model", SMALL, "--vram", "12")
    assert d["gpu"] == "12gb" and d["capacity_gib"] == 12.0


# ---------------------------------------------------------------------------
# detected hardware
def test_suggest_without_gpu_says_how_to_name_one(no_gpu):
    r = run("suggest", "--model", SMALL, code=2)
    for s in ("no NVIDIA GPU", "--gpu rtx-4060", "--gpu 8GB", "qplan gpus"):
        assert s in r.output
    d = run_json("suggest", "--model", SMALL, code=2)
    assert d["error"]["type"] == "NoGpuError" and d["error"]["exit_code"] == 2


def test_suggest_plans_for_gpu0_of_several(two_4090s):
    d = run_json("suggest", "--model", SMALL)
    assert d["gpu_detected"] is True and d["gpu"] == "rtx-4090"
    assert any("2 GPUs detected; planning for GPU 0" in n for n in d["notes"])
    assert d["plan"]["device_map"] == {"": 0}
    assert "planning for GPU 0" in run("suggest", "--model", SMALL).output
    assert any("--gpus N plans data-parallel" in n and "2 are rtx-4090" in n for n in d["notes"])
    two = run_json("suggest", "--model", SMALL, "--gpus", "2")
    assert two["settings"]["gpus"] == 2 and "ddp_buckets" in two["breakdown"]


def test_unknown_detected_gpu_still_plans(monkeypatch):
    nv = fake_pynvml([("NVIDIA Quadro Mystery 9000", 20 * GIB, 20 * GIB, (8, 6))])
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    d = run_json("suggest", "--model", SMALL)
    assert d["capacity_gib"] == pytest.approx(20.0)
    assert any("not in the catalogue" in n for n in d["notes"])


def test_hw_and_doctor(two_4090s):
    d = run_json("hw")
    assert [g["profile"] for g in d["gpus"]] == ["rtx-4090", "rtx-4090"]
    assert d["gpus"][0]["free_gib"] == 23.0 and d["gpus"][0]["compute_capability"] == "8.9"
    for key in ("ram_gib", "ram_available_gib", "cgroup_memory_limit_gib", "ram_limit_gib",
                "cpu_count", "usable_cpus", "cpu_model", "flash_attn", "liger_kernel",
                "packages"):
        assert key in d
    assert {"torch", "transformers", "peft", "bitsandbytes"} <= set(d["packages"])
    doctor = run_json("doctor")
    for x in (doctor, d):
        x.pop("ram_available_gib")  # changes between two calls
    assert doctor == d
    out = run("doctor").output
    assert "RTX 4090" in out and "RAM" in out and "flash-attn" in out


def test_hw_without_gpu(no_gpu):
    out = run("hw").output
    assert "none detected" in out


# ---------------------------------------------------------------------------
# catalogues
def test_gpus_lists_the_catalogue():
    d = run_json("gpus")
    assert {g["name"] for g in d["gpus"]} == set(api.catalog().gpus.names())
    g = d["gpus"][0]
    for key in ("memory_gib", "compute_capability", "tflops_16bit", "bandwidth_gbs", "kind"):
        assert key in g
    out = run("gpus").output
    assert "rtx-4060" in out and "TFLOP/s" in out


def test_models_lists_the_catalogue():
    d = run_json("models")
    assert {m["name"] for m in d["models"]} == set(api.catalog().models.names())
    m = next(m for m in d["models"] if m["name"] == BIG)
    assert 7.5 < m["params_b"] < 8.5 and m["num_hidden_layers"] == 32
    for key in ("hidden_size", "vocab_size", "max_position_embeddings", "family"):
        assert key in m
    assert BIG in run("models").output


# ---------------------------------------------------------------------------
# bad input: exit 2, a message, never a traceback
@pytest.mark.parametrize("cmd", ["suggest", "estimate"])
@pytest.mark.parametrize("args, needles", [
    (["--model", "llama-3.1-8c", "--gpu", "rtx-4090"], ["unknown model", "Closest", "llama-3.1-8b"]),
    (["--model", SMALL, "--gpu", "rtx-4099"], ["unknown GPU", "Closest", "rtx-4090"]),
    (["--model", SMALL, "--gpu", "rtx-4090", "--seq", "10000000"], ["longer than", "context"]),
    (["--model", SMALL, "--gpu", "rtx-4090", "--targets", "q,foo"], ["'foo'", "available", "q_proj"]),
    (["--model", SMALL, "--gpu", "0GB"], ["out of range"]),
    (["--model", SMALL, "--gpu", "rtx-4090", "--vram", "-1"], ["--vram must be a positive"]),
    (["--model", SMALL, "--gpu", "rtx-4090", "--optim", "sgd"], ["'sgd' is not one of"]),
    (["--model", SMALL, "--gpu", "rtx-4090", "--batch", "0"], ["--batch"]),
    (["--model", SMALL, "--gpu", "rtx-4090", "--lora-dropout", "1.5"], ["--lora-dropout"]),
], ids=["model", "gpu", "seq", "targets", "gpu-size", "vram", "optim", "batch", "dropout"])
def test_bad_input_exit_2(cmd, args, needles):
    r = run(cmd, *args, code=2)
    for n in needles:
        assert n in r.output, r.output


def test_bad_input_json_is_an_error_object():
    d = run_json("estimate", "--model", "llama-3.1-8c", "--gpu", "rtx-4090", code=2)
    assert d["error"]["type"] == "UnknownModelError" and "Closest" in d["error"]["message"]


@pytest.mark.parametrize("cmd", ["suggest", "estimate"])
def test_malformed_config_json_names_missing_field(cmd, tmp_path):
    d = tmp_path / "my-model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64,
                                               "num_hidden_layers": 2, "vocab_size": 100}))
    r = run(cmd, "--model", str(d), "--gpu", "rtx-4090", code=2)
    assert "missing" in r.output and "intermediate_size" in r.output
    assert "num_attention_heads" in r.output
    (d / "config.json").write_text("{not json")
    assert "not valid JSON" in run(cmd, "--model", str(d / "config.json"), "--gpu", "rtx-4090",
                                   code=2).output
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no config.json" in run(cmd, "--model", str(empty), "--gpu", "rtx-4090",
                                       code=2).output


def test_local_config_json_plans(tmp_path, largest_gpu):
    cfg = api.get_model(SMALL).to_config_dict()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    d = run_json("suggest", "--model", str(tmp_path), "--gpu", largest_gpu)
    assert d["fits"] is True
    path = tmp_path / "p.yaml"
    run("suggest", "--model", str(tmp_path), "--gpu", largest_gpu, "--save", str(path))
    assert yaml.safe_load(path.read_text())["model"] == str(tmp_path)


def test_a_plan_names_a_local_model_by_its_absolute_path(tmp_path, largest_gpu, monkeypatch):
    """A plan read from another folder still finds the model it was made for."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(api.get_model(SMALL).to_config_dict()))
    monkeypatch.chdir(tmp_path)
    run("suggest", "--model", "./m", "--gpu", largest_gpu, "--save", "p.yaml")
    assert yaml.safe_load((tmp_path / "p.yaml").read_text())["model"] == str(tmp_path / "m")
    run("suggest", "--model", "llama-3.2-1b", "--gpu", largest_gpu, "--save", "c.yaml")
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["model"] == "llama-3.2-1b"


def test_suggest_data_errors(tmp_path, largest_gpu):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{broken\n')
    assert "line 2 is not JSON" in run("suggest", "--model", SMALL, "--gpu", largest_gpu,
                                       "--data", str(f), code=2).output
    assert "does not exist" in run("suggest", "--model", SMALL, "--gpu", largest_gpu,
                                   "--data", str(tmp_path / "nope.jsonl"), code=2).output
    (tmp_path / "empty.jsonl").write_text("\n")
    assert "no records" in run("suggest", "--model", SMALL, "--gpu", largest_gpu,
                               "--data", str(tmp_path / "empty.jsonl"), code=2).output
    assert "not both" in run("suggest", "--model", SMALL, "--gpu", largest_gpu, "--data",
                             str(f), "--tokens", "5", code=2).output
    assert "drop --seq or --longest" in run("suggest", "--model", SMALL, "--gpu", largest_gpu,
                                            "--seq", "512", "--longest", code=2).output


# ---------------------------------------------------------------------------
# nothing fits: exit 3, why, the largest term, the nearest plans that fit
def test_suggest_nothing_fits():
    r = run("suggest", "--model", BIG, "--gpu", "2GB", code=3)
    assert "nothing fits" in r.output and "largest term" in r.output
    assert "Smallest configuration tried" in r.output
    assert "Nearest plans that fit" in r.output and "bigger card: --gpu" in r.output
    d = run_json("suggest", "--model", BIG, "--gpu", "2GB", code=3)
    e = d["error"]
    assert e["type"] == "DoesNotFitError" and e["exit_code"] == 3
    assert any(a.startswith("bigger card") for a in e["alternatives"])
    assert e["smallest"]["peak_gib"] > 2 and "breakdown" in e["smallest"]


def test_errors_from_any_command_are_messages():
    """A qplan error escaping a command the group did not build (a plugin's) is a message."""
    import click

    @click.command("boom-test")
    def boom():
        raise BadInputError("boom: bad input from a plugin command")
    cli.add_command(boom)
    try:
        r = run("boom-test", code=2)
        assert "boom: bad input from a plugin command" in r.output
    finally:
        cli.commands.pop("boom-test", None)


@pytest.mark.parametrize("error, code, needles", [
    (KeyError("hidden_act"), 1, ["unexpected error: KeyError", "This is a bug",
                                 "QPLAN_DEBUG=1"]),
    (PermissionError(13, "Permission denied", "/data/x.jsonl"), 2,
     ["cannot use '/data/x.jsonl': Permission denied"]),
], ids=["bug", "oserror"])
def test_unexpected_errors_are_messages_not_tracebacks(monkeypatch, error, code, needles):
    """Whatever escapes a command (its own or a plugin's) is a message; QPLAN_DEBUG=1
    lets the traceback through for a bug report."""
    import click

    @click.command("boom-test")
    def boom():
        raise error
    cli.add_command(boom)
    try:
        r = run("boom-test", code=code)
        for n in needles:
            assert n in r.output
        monkeypatch.setenv("QPLAN_DEBUG", "1")
        r = CliRunner().invoke(cli, ["boom-test"])
        assert r.exception is error
    finally:
        cli.commands.pop("boom-test", None)


def test_estimate_hint_walks_the_oom_ladder():
    """A configuration far over the card gets the first safer one that fits, with the steps."""
    args = ["estimate", "--model", BIG, "--gpu", "rtx-4090", "--batch", "16", "--no-grad-ckpt"]
    d = run_json(*args, code=3)
    assert d["hint"] and d["hint"].startswith("fits (") and "per-device batch 16 -> 8" in d["hint"]
    assert "hint: fits" in run(*args, code=3).output
    assert run_json("estimate", "--model", BIG, "--gpu", "2GB", code=3)["hint"] is None
