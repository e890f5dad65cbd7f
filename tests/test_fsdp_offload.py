"""FSDP with CPU offload of the parameters (``offload_params``, issue 12): the shards in pinned
host memory, each block copied to the GPU when it runs; on several GPUs or on one. Memory
terms, host memory, speed terms, the search's fallback to it (only when nothing else fits),
the settings it needs, the runner's set-up (accelerate's ``cpu_offload``, the 4-bit
constants moved to the GPU, one GPU launched as a group of 1). The GPU measurements:
benchmarks/results/fsdp_offload.md (the probe) and fsdp_gpu.md (qwen3-14b on one simulated
8 GB card through ``qplan run``)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qplan import api
from qplan.errors import BadInputError, DoesNotFitError
from qplan.planner import calibration as C
from qplan.planner import memory as M
from qplan.planner import speed as S
from qplan.planner.config import TrainConfig
from qplan.profiles.gpus import GIB

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["llama-3.2-1b", "llama-3.1-8b", "qwen3-14b", "gemma-2-2b", "gemma-3-4b",
          "qwen2.5-32b", "llama-3.1-70b"]
BASE = dict(seq_len=2048, batch_size=1, grad_accum=8, grad_ckpt=True, loss="fused",
            optim="adamw_torch", strategy="fsdp")


def _cfg(n=2, offload=True, **kw):
    return TrainConfig(**{**BASE, "gpus": n, "offload_params": offload, **kw})


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("n", [1, 2, 4])
def test_offload_leaves_only_the_constants_and_the_working_set_on_the_gpu(name, n):
    m = api.get_model(name)
    off = M.estimate_memory(m, _cfg(n), None)
    consts = M._quant_constants(m.quantized_params, _cfg(n))
    assert off.term("base_weights_4bit").bytes == int(consts)
    for key in ("unquantized_weights", "lora_adapters", "gradients", "optimizer_states"):
        assert off.term(key).bytes == 0, key
    if n > 1:  # the same plan with the shards on the GPUs: the rest is unchanged
        on = M.estimate_memory(m, _cfg(n, offload=False), None)
        for key in ("activations", "logits_or_working_set", "fsdp_gathered",
                    "collective_buffers", "cuda_context"):
            assert off.term(key).bytes == on.term(key).bytes, key
        assert off.peak_bytes < on.peak_bytes
    else:  # one GPU: no NCCL
        assert "collective_buffers" not in off.breakdown()
    assert any(x.startswith("CPU offload:") for x in off.notes)


@pytest.mark.parametrize("name", MODELS)
def test_the_host_holds_every_shard(name):
    m = api.get_model(name)
    lora = M.lora_param_count(m, _cfg(1))
    whole = m.quantized_params / 2 + 2 * m.unquantized_params + 16 * lora  # w, grad, 2 moments
    for n in (1, 2, 4):
        host = M.estimate_memory(m, _cfg(n), None).host_pinned_bytes
        assert host * n == pytest.approx(whole, rel=1e-3)
    assert M.estimate_memory(m, _cfg(2, offload=False), None).host_pinned_bytes == 0


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(MODELS), n=st.integers(1, 8),
       seq=st.sampled_from([256, 1024, 4096, 16384]), batch=st.sampled_from([1, 2, 4]))
def test_offload_never_needs_more_gpu_memory(name, n, seq, batch):
    """Property: offloading a plan's shards never raises its GPU peak, and more GPUs never
    raise the per-GPU peak of an offloaded plan."""
    m = api.get_model(name)
    kw = dict(seq_len=seq, batch_size=batch, grad_accum=2 * n)
    off = M.estimate_memory(m, _cfg(n, **kw), None)
    assert all(t.bytes >= 0 for t in off.terms)
    if n > 1:
        assert off.peak_bytes <= M.estimate_memory(m, _cfg(n, offload=False, **kw), None).peak_bytes
    more = M.estimate_memory(m, _cfg(n + 1, **{**kw, "grad_accum": 2 * (n + 1)}), None)
    assert more.peak_bytes <= off.peak_bytes + int(C.NCCL_BUFFERS_GIB * GIB) * (n == 1)


@pytest.mark.parametrize("changes, needle", [
    (dict(strategy="ddp", gpus=2), "needs strategy fsdp"),
    (dict(strategy="ddp", gpus=1), "needs strategy fsdp"),
    (dict(offload_params="yes"), "offload_params must be true or false"),
    (dict(optim="paged_adamw_8bit"), "needs optim adamw_torch"),
])
def test_settings_offload_cannot_have_are_refused(changes, needle):
    with pytest.raises(BadInputError) as e:
        TrainConfig(**{**BASE, "gpus": 2, "offload_params": True, **changes})
    assert needle in str(e.value)


def test_fsdp_on_one_gpu_needs_offload():
    assert _cfg(1).gpus == 1  # allowed: the weights in host memory
    with pytest.raises(BadInputError, match="or offload_params on one GPU"):
        _cfg(1, offload=False)


def test_plans_from_before_offload_still_load():
    d = _cfg(2, offload=False).to_dict()
    del d["offload_params"]
    assert TrainConfig.from_dict(d).offload_params is False


# --- the search ------------------------------------------------------------------------------
@pytest.mark.parametrize("name, card, gpus, seq", [
    ("llama-3.1-70b", "a100-40gb-sxm", 1, 2048),
    ("llama-3.1-70b", "rtx-4090", 2, 2048),
    ("qwen3-14b", "rtx-4060", 1, 2048),
    ("qwen2.5-32b", "rtx-4090", 1, 20480),
])
def test_the_search_offloads_when_nothing_else_fits(name, card, gpus, seq):
    m, g = api.get_model(name), api.get_gpu(card)
    fixed = {"gpus": gpus} if gpus > 1 else {}
    plan = api.suggest(m, g, seq_len=seq, fixed=fixed, find_alternatives=False,
                       use_calibration=False)
    c = plan.config
    assert c.strategy == "fsdp" and c.offload_params and c.gpus == gpus
    assert c.optim == "adamw_torch" and c.effective_batch == 16
    assert plan.memory.safe_peak_bytes <= g.memory_bytes
    assert any("CPU offload" in r.text for r in plan.reasons)
    assert plan.speed.tokens_per_s > 0 and "CPU offload (FSDP)" in dict(plan.speed.terms)
    with pytest.raises(DoesNotFitError):  # --no-offload-params: the honest refusal
        api.suggest(m, g, seq_len=seq, fixed={**fixed, "offload_params": False},
                    find_alternatives=False, use_calibration=False)


@pytest.mark.parametrize("name, card, gpus", [
    ("llama-3.1-8b", "rtx-4090", 1), ("qwen3-4b", "rtx-4060", 1), ("llama-3.1-8b", "h200", 2),
    ("llama-3.1-70b", "a100-40gb-sxm", 2), ("qwen2.5-32b", "rtx-4090", 2),
])
def test_offload_is_never_chosen_when_the_weights_fit(name, card, gpus):
    plan = api.suggest(api.get_model(name), api.get_gpu(card), seq_len=2048,
                       fixed={"gpus": gpus}, find_alternatives=False, use_calibration=False)
    assert not plan.config.offload_params


def test_no_offload_fallback_under_ddp_or_kbit():
    m, g = api.get_model("llama-3.1-70b"), api.get_gpu("rtx-4090")
    for fixed in ({"strategy": "ddp"}, {"prepare": "kbit"}, {"offload_params": False}):
        with pytest.raises(DoesNotFitError) as e:
            api.suggest(m, g, seq_len=2048, fixed=fixed, find_alternatives=False)
        assert "host memory" not in str(e.value)


def test_offload_fixed_implies_fsdp():
    m, g = api.get_model("qwen3-4b"), api.get_gpu("h200")
    plan = api.suggest(m, g, seq_len=2048, fixed={"offload_params": True},
                       find_alternatives=False, use_calibration=False)
    assert plan.config.strategy == "fsdp" and plan.config.offload_params
    assert plan.config.gpus == 1 and plan.config.optim == "adamw_torch"


def test_a_refusal_says_offload_was_tried():
    m, g = api.get_model("llama-3.1-8b"), api.get_gpu("rtx-4090")
    with pytest.raises(DoesNotFitError, match="not even with the weights in host memory"):
        api.suggest(m, g, seq_len=131072, find_alternatives=False)


# --- speed --------------------------------------------------------------------------------------
@pytest.mark.parametrize("card", ["rtx-4090", "h200", "a100-40gb-pcie"])
def test_offload_costs_time_per_block_and_the_copies(card):
    m, g = api.get_model("llama-3.1-8b"), api.get_gpu(card)
    on, off = S.estimate_speed(m, _cfg(2, offload=False), g), S.estimate_speed(m, _cfg(2), g)
    assert off.step_s > on.step_s
    assert S.offload_block_s(m, _cfg(2)) == pytest.approx(m.num_hidden_layers * C.OFFLOAD_BLOCK_S)
    assert S.offload_block_s(m, _cfg(2, offload=False)) == 0
    # each GPU copies its shard: twice the GPUs, half the bytes
    assert S.offload_copy_s(m, _cfg(4)) == pytest.approx(S.offload_copy_s(m, _cfg(2)) / 2)
    assert S.cpu_optimizer_s(m, _cfg(1)) == pytest.approx(
        M.lora_param_count(m, _cfg(1)) * C.CPU_ADAM_S_PER_PARAM)
    one = S.estimate_speed(m, _cfg(1), g)
    assert S.fsdp_block_s(m, _cfg(1)) > 0  # FSDP's hooks run on one GPU too
    assert "CPU offload (FSDP)" in dict(one.terms)


def _probe_rows():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "fsdp_offload_probe", ROOT / "benchmarks" / "fsdp_offload_probe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, mod.rows(sorted((ROOT / "benchmarks" / "results" / "raw")
                                .glob("h200x2_offload_probe*.jsonl")))


def test_offload_block_cost_matches_the_committed_gpu_probe():
    """The time offload adds a block (2 H200s, the same FSDP run with and without it) within
    20% of the planner's, for both models probed; and every offload run trained."""
    mod, rows = _probe_rows()
    assert rows and all(r["status"] == "ok" for r in rows)
    extra = mod.offload_extra_per_block(rows)
    assert len(extra) == 2
    for _name, measured, predicted in extra:
        assert predicted == pytest.approx(measured, rel=0.2)


def test_offload_memory_estimate_is_above_the_probe_peaks():
    """The allocated terms of the estimate cover every probe run's peak allocated memory
    (the probe is not the runner: qplan run's nvidia-smi peaks are in fsdp_gpu.md)."""
    _, rows = _probe_rows()
    for r in rows:
        if r["offload"]:
            assert r["estimated_allocated_gib"] >= r["peak_allocated_gib"]
            assert r["estimated_allocated_gib"] <= 1.5 * r["peak_allocated_gib"]


def test_runner_offload_run_on_one_gpu_is_within_the_band():
    """qwen3-14b on one simulated 8 GB card (fsdp8): the nvidia-smi peak is within the
    estimate's band and the speed within 10% of this commit's prediction."""
    raw = ROOT / "benchmarks" / "results" / "raw" / "h200x2_fsdp8.jsonl"
    r = json.loads(raw.read_text().splitlines()[0])
    cfg = TrainConfig.from_dict(r["ran_settings"])
    assert cfg.offload_params and cfg.gpus == 1 and r["status"] == "ok"
    m = api.get_model(r["model"])
    mem = M.estimate_memory(m, cfg, api.get_gpu(r["card"]))
    peak = r["measured"]["nvml_peak_gib"]
    assert mem.peak_gib <= peak * 1.10 and peak <= mem.peak_gib + mem.band_gib
    pred = S.estimate_speed(m, cfg, api.get_gpu("h200")).tokens_per_s
    assert pred == pytest.approx(r["steady_tokens_per_s"], rel=0.10)


# --- the runner ---------------------------------------------------------------------------------
def test_accelerate_gets_cpu_offload():
    from qplan.runner.trainer import fsdp_arguments

    assert fsdp_arguments(offload=True)["fsdp_config"]["cpu_offload"] is True
    assert fsdp_arguments()["fsdp_config"]["cpu_offload"] is False


def _spec(tmp_path, cfg, world):
    from qplan.runner import protocol as P

    spec = P.AttemptSpec.__new__(P.AttemptSpec)
    fields = dict(settings=cfg, world_size=world, attempt_dir=str(tmp_path), total_steps=2,
                  lr=1e-4, lr_scheduler="constant", warmup_steps=0, max_grad_norm=1.0,
                  save_steps=10, eval_steps=10, seed=0)
    for k, v in fields.items():
        object.__setattr__(spec, k, v)
    return spec


def test_one_gpu_offload_runs_as_a_group_of_one(tmp_path, monkeypatch):
    import transformers

    from qplan.runner.trainer import training_arguments

    spec = _spec(tmp_path, _cfg(1), 1)
    assert spec.distributed  # launched through the ranks' path: torch.distributed, 1 rank
    assert not _spec(tmp_path, TrainConfig(seq_len=64), 1).distributed
    assert _spec(tmp_path, TrainConfig(seq_len=64, gpus=2, grad_accum=2), 2).distributed
    seen = {}
    monkeypatch.setattr(transformers, "TrainingArguments", lambda **kw: seen.update(kw))
    training_arguments(spec, cuda=True, has_eval=False)
    assert seen["fsdp"] is True and seen["fsdp_config"]["cpu_offload"] is True
    assert seen["gradient_accumulation_steps"] == 8 and seen["ddp_backend"] == "nccl"


def test_the_attempt_goes_through_the_ranks_path(tmp_path, monkeypatch):
    """run._attempt: a one-GPU FSDP attempt starts its process as rank 0 of a group of 1."""
    from qplan.runner import protocol as P
    from qplan.runner import run as R

    called = {}
    monkeypatch.setattr(R, "_attempt_ranks", lambda r, spec, adir, env: called.setdefault("ranks", 0))
    monkeypatch.setattr(R.supervise, "start", lambda *a, **k: pytest.fail("single-process path"))
    monkeypatch.setattr(R.rundir, "load_attempts", lambda d: [type("A", (), {"spec": spec})()])

    class Run:
        state = type("S", (), {"next_change": None})()
        lock = type("L", (), {"update": staticmethod(lambda **k: None), "fd": 0})()
        dir = tmp_path

        def notify(self, msg):
            pass

        def plan_env(self):
            return {}

    spec = _spec(tmp_path / "a1", _cfg(1), 1)
    object.__setattr__(spec, "attempt", 1)
    object.__setattr__(spec, "device", "cuda")
    object.__setattr__(spec, "resume_from", None)
    object.__setattr__(spec, "estimated_peak_gib", None)
    monkeypatch.setattr(P, "write", lambda path, obj: None)
    R._attempt(Run(), spec)
    assert "ranks" in called


def test_quant_states_move_with_the_helper(tmp_path):
    """The runner's helper finds every 4-bit layer's constants (a tiny 4-bit model on CPU)."""
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    from fixtures.tiny_llama import build

    from qplan.runner import techniques as T

    build(tmp_path / "m")
    cfg = TrainConfig(seq_len=64)
    m = T.load_model(str(tmp_path / "m"), cfg)
    n = T.quant_states_to(m, "cpu")
    assert n == 7 * m.config.num_hidden_layers  # q, k, v, o, gate, up, down in every block
    assert all(mod.quant_state.absmax.device.type == "cpu" for mod in m.modules()
               if getattr(mod, "quant_state", None) is not None)


def test_longest_keeps_the_weights_on_the_gpu_when_it_can():
    """--longest: offload would buy a few percent more tokens (llama-3.1-8b on a 24 GB card:
    57,344 against 55,040) at a slower plan that loads differently: the weights stay on the
    GPU unless nothing fits without offload (a 70B model on one 24 GB card)."""
    g = api.get_gpu("rtx-4090")
    p = api.longest_sequence(api.get_model("llama-3.1-8b"), g)
    assert not p.config.offload_params and p.config.seq_len >= 32768
    asked = api.longest_sequence(api.get_model("llama-3.1-8b"), g,
                                 fixed={"offload_params": True})
    assert asked.config.offload_params and asked.config.seq_len >= p.config.seq_len
    big = api.longest_sequence(api.get_model("llama-3.1-70b"), g)
    assert big.config.offload_params and big.config.seq_len >= 2048


# --- how many GPUs (--max-gpus) -----------------------------------------------------------------
def test_max_gpus_takes_the_fewest_that_fit_with_the_weights_on_the_gpus():
    m, g = api.get_model("llama-3.1-70b"), api.get_gpu("rtx-4090")
    c = api.choose_gpus(m, g, max_gpus=8, use_calibration=False)
    assert c.plan.config.gpus == 4 and not c.plan.config.offload_params
    assert [n for n, _ in c.tried] == [1, 2, 4, 8]  # 3, 5, 6, 7 do not split 16
    offloaded = dict(c.tried)
    assert offloaded[1].config.offload_params and offloaded[2].config.offload_params
    assert "the fewest of up to 8 that fit" in c.why
    one = api.choose_gpus(api.get_model("llama-3.1-8b"), g, max_gpus=4, use_calibration=False)
    assert one.plan.config.gpus == 1


def test_max_gpus_with_a_speed_takes_the_fewest_that_reach_it():
    m, g = api.get_model("llama-3.1-8b"), api.get_gpu("rtx-4090")
    one = api.suggest(m, g, find_alternatives=False, use_calibration=False).speed.tokens_per_s
    c = api.choose_gpus(m, g, max_gpus=8, min_tokens_per_s=1.5 * one, use_calibration=False)
    assert c.plan.config.gpus == 2 and c.plan.speed.tokens_per_s >= 1.5 * one
    far = api.choose_gpus(m, g, max_gpus=2, min_tokens_per_s=100 * one, use_calibration=False)
    assert far.plan.config.gpus == 2 and "no count up to 2 reaches" in far.why


def test_max_gpus_when_nothing_fits_and_bad_combinations():
    m, g = api.get_model("llama-3.1-405b"), api.get_gpu("rtx-3060")
    with pytest.raises(DoesNotFitError):
        api.choose_gpus(m, g, max_gpus=2, seq_len=65536)
    with pytest.raises(BadInputError, match="drop --gpus"):
        api.choose_gpus(api.get_model("llama-3.1-8b"), g, max_gpus=2, fixed={"gpus": 2})


@pytest.mark.parametrize("args, needle", [
    (["--max-gpus", "2", "--gpus", "2"], "drop --gpus"),
    (["--max-gpus", "2", "--gpu", "rtx-4090 x2"], "drop --gpus"),
    (["--min-tokens-per-s", "1000"], "give --max-gpus"),
    (["--max-gpus", "2", "--longest"], "--max-gpus and --longest"),
    (["--max-gpus", "0"], "--max-gpus"),
    (["--max-gpus", "2", "--min-tokens-per-s", "-5"], "--min-tokens-per-s"),
])
def test_max_gpus_bad_input_is_refused(args, needle):
    from click.testing import CliRunner

    from qplan.cli import cli

    base = ["suggest", "--model", "llama-3.1-8b"]
    if "--gpu" not in args:
        base += ["--gpu", "rtx-4090"]
    r = CliRunner().invoke(cli, base + args)
    assert r.exit_code == 2 and needle in r.output, r.output


def test_max_gpus_json_lists_every_count():
    from click.testing import CliRunner

    from qplan.cli import cli

    r = CliRunner().invoke(cli, ["suggest", "--model", "llama-3.1-70b", "--gpu", "rtx-4090",
                                 "--max-gpus", "4", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["settings"]["gpus"] == 4 and d["gpu_choice"]["why"].startswith("4 GPUs")
    assert [t["gpus"] for t in d["gpu_choice"]["tried"]] == [1, 2, 4]
    assert d["gpu_choice"]["tried"][0]["offload_params"] is True
