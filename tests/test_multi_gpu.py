"""Planning for several GPUs (``--gpus N``, data-parallel): per-GPU memory with DDP's terms,
speed over all GPUs with the gradients' all-reduce, accumulation split evenly, the link
between the cards from the catalogue, plans and exports that carry it."""
from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from qplan import api
from qplan.cli import cli
from qplan.errors import BadInputError
from qplan.planner import calibration as C
from qplan.planner.config import TrainConfig
from qplan.planner.memory import estimate_memory, lora_gradients
from qplan.planner.plan import load_plan, save_plan
from qplan.planner.search import candidates, default_settings
from qplan.planner.speed import allreduce_s, estimate_speed
from qplan.profiles.gpus import GIB, LINKS

MODELS = ["llama-3.1-8b", "qwen3-4b", "gemma-2-2b", "phi-3.5-mini", "mistral-7b"]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("gpus", [2, 4])
def test_per_gpu_memory_adds_ddp_buckets_and_nccl_buffers(name, gpus):
    m, g = api.get_model(name), api.get_gpu("rtx-4090")
    one = TrainConfig(seq_len=1024, batch_size=2, grad_accum=8, grad_ckpt=True)
    a = estimate_memory(m, one, g)
    b = estimate_memory(m, one.with_(gpus=gpus), g)
    assert "ddp_buckets" not in a.breakdown() and "collective_buffers" not in a.breakdown()
    assert b.term("ddp_buckets").bytes == lora_gradients(m, one)
    assert b.term("collective_buffers").bytes == int(C.NCCL_BUFFERS_GIB * GIB)
    # every other term is the one-GPU figure: each GPU holds a whole replica and its share
    # of micro-batches has the same shape
    rest = {k: v for k, v in b.breakdown().items() if k not in ("ddp_buckets", "collective_buffers")}
    assert rest == a.breakdown()
    assert b.peak_bytes == a.peak_bytes + lora_gradients(m, one) + int(C.NCCL_BUFFERS_GIB * GIB)


@pytest.mark.parametrize("card", ["rtx-4090", "h200", "a100-80gb-pcie"])
def test_throughput_scales_with_gpus_less_the_all_reduce(card):
    m, g = api.get_model("llama-3.1-8b"), api.get_gpu(card)
    cfg = TrainConfig(seq_len=2048, batch_size=2, grad_accum=8, grad_ckpt=True)
    one = estimate_speed(m, cfg, g)
    two = estimate_speed(m, cfg.with_(gpus=2), g)
    comm = allreduce_s(m, cfg.with_(gpus=2), g)
    assert comm > 0 and dict(two.terms)["all-reduce"] == pytest.approx(comm)
    assert "all-reduce" not in dict(one.terms)
    # half the micro-batches per GPU, plus the all-reduce
    per_micro = (one.step_s - dict(one.terms)["optimizer"]) / 8
    assert two.step_s == pytest.approx(per_micro * 4 + dict(one.terms)["optimizer"] + comm, rel=1e-6)
    assert 1.5 < two.tokens_per_s / one.tokens_per_s < 2.0


def test_all_reduce_is_the_ring_over_the_link():
    m = api.get_model("llama-3.1-8b")
    cfg = TrainConfig(seq_len=2048, batch_size=1, grad_accum=8, gpus=2)
    grad = lora_gradients(m, cfg)
    pcie, nvl = api.get_gpu("rtx-4090"), api.get_gpu("h200")
    assert pcie.link.name.startswith("PCIe 4.0") and nvl.link.nvlink
    buckets = -(-grad // C.DDP_BUCKET_BYTES)
    want = buckets * C.ALLREDUCE_LATENCY_S + grad / (pcie.link.gbs * 1e9 * C.ALLREDUCE_EFFICIENCY["pcie"])
    assert allreduce_s(m, cfg, pcie) == pytest.approx(want)
    assert allreduce_s(m, cfg, nvl) < allreduce_s(m, cfg, pcie) / 5
    # 4 GPUs send 2 x 3/4 of the gradients, 2 GPUs 2 x 1/2
    four = allreduce_s(m, cfg.with_(gpus=4), pcie) - buckets * C.ALLREDUCE_LATENCY_S
    assert four == pytest.approx(1.5 * (want - buckets * C.ALLREDUCE_LATENCY_S))


@pytest.mark.parametrize("g", api.catalog().gpus, ids=lambda g: g.name)
def test_every_catalogue_gpu_has_a_link(g):
    assert g.link in LINKS.values() and g.link.gbs > 0 and g.link.source
    if g.interconnect:
        assert g.interconnect in LINKS
    if "sxm" in g.name or g.name in ("h200", "b200"):
        assert g.link.nvlink
    else:
        assert not g.link.nvlink


@pytest.mark.parametrize("gpus, target", [(2, 16), (4, 16), (3, 12), (2, 6)])
def test_candidates_split_the_accumulation_evenly(gpus, target):
    m, g = api.get_model("qwen3-4b"), api.get_gpu("rtx-4090")
    seen = list(candidates(m, g, 2048, target, {"gpus": gpus}, default_settings(m, g)))
    assert seen
    for c in seen:
        assert c.gpus == gpus and c.grad_accum % gpus == 0
        assert c.effective_batch == target


def test_suggest_for_two_gpus_keeps_the_effective_batch_and_fits_each():
    m, g = api.get_model("llama-3.1-8b"), api.get_gpu("rtx-4090")
    p = api.suggest(m, g, seq_len=2048, fixed={"gpus": 2})
    assert p.config.gpus == 2 and p.config.effective_batch == 16
    assert p.config.grad_accum % 2 == 0
    assert p.memory.safe_peak_bytes <= g.memory_bytes
    assert any("data-parallel" in r.text for r in p.reasons)


@pytest.mark.parametrize("target, fixed, needles", [
    (15, {"gpus": 2}, ["effective batch of 15", "use 14 or 16"]),
    (16, {"gpus": 3}, ["multiple of 3", "use 15 or 18"]),
    (16, {"gpus": 2, "batch_size": 3}, ["per-device batch of 3", "use 12 or 18"]),
    (16, {"gpus": 2, "grad_accum": 3}, ["grad_accum 3", "grad_accum 2 or 4"]),
])
def test_a_batch_that_does_not_split_is_refused(target, fixed, needles):
    m, g = api.get_model("llama-3.1-8b"), api.get_gpu("rtx-4090")
    with pytest.raises(BadInputError) as e:
        api.suggest(m, g, seq_len=1024, target_effective_batch=target, fixed=fixed)
    for n in needles:
        assert n in str(e.value)


def test_settings_validate_the_split():
    with pytest.raises(BadInputError, match="multiple of 2; use grad_accum 4"):
        TrainConfig(grad_accum=3, gpus=2)
    for bad in (0, -1, True, 1.5):
        with pytest.raises(BadInputError, match="gpus must be an integer"):
            TrainConfig(gpus=bad)


def test_a_saved_plan_keeps_its_gpus(tmp_path):
    m, g = api.get_model("qwen3-4b"), api.get_gpu("rtx-4070")
    p = api.suggest(m, g, seq_len=2048, fixed={"gpus": 2})
    back = load_plan(save_plan(p, tmp_path / "p.yaml"))
    assert back.config == p.config and back.config.gpus == 2


def test_cli_says_per_gpu_and_all_gpus():
    r = CliRunner().invoke(cli, ["suggest", "--model", "llama-3.1-8b", "--gpu", "rtx-4090",
                                 "--gpus", "2"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "on 2 x rtx-4090" in r.output and "PCIe 4.0 x16 between them" in r.output
    assert "Memory per GPU" in r.output and "NCCL buffers" in r.output
    assert "tokens/s on all 2 GPUs" in r.output


@pytest.mark.parametrize("fmt, field", [("trl", "gradient_accumulation_steps=8"),
                                        ("axolotl", "gradient_accumulation_steps: 8"),
                                        ("llama-factory", "gradient_accumulation_steps: 8")])
def test_export_for_two_gpus_writes_per_process_accumulation_and_the_launch(tmp_path, fmt, field):
    from qplan.ecosystem.export import export

    m, g = api.get_model("llama-3.1-8b"), api.get_gpu("rtx-4090")
    plan = api.make_plan(m, g, TrainConfig(seq_len=1024, batch_size=1, grad_accum=16, gpus=2,
                                           packed_rows=True), target=16)
    e = export(plan, fmt, profile=m, gpu=g)
    assert field in e.text
    assert e.config.gpus == 2 and e.config.grad_accum == 16  # as launched on 2 processes
    assert e.launch and ("--config_file accelerate_config.yaml" in e.launch
                         or "NPROC_PER_NODE=2" in e.launch)
    if fmt != "llama-factory":
        acc = yaml.safe_load(e.accelerate_config)
        assert acc["num_processes"] == 2 and acc["distributed_type"] == "MULTI_GPU"
        assert acc["mixed_precision"] == "bf16"
    # one GPU: no launch, the accumulation whole
    e1 = export(plan.__class__(**{**plan.__dict__, "config": plan.config.with_(gpus=1)}), fmt,
                profile=m, gpu=g)
    assert e1.launch is None and e1.accelerate_config is None
    assert field.replace("8", "16") in e1.text


def test_export_cli_writes_the_accelerate_config_beside_the_file(tmp_path, export_two_gpu_plan):
    r = export_two_gpu_plan("qwen3-4b", "rtx-4090", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    acc = tmp_path / "accelerate_config.yaml"
    assert d["accelerate_config_written_to"] == str(acc) and acc.exists()
    assert yaml.safe_load(acc.read_text())["num_processes"] == 2
    assert d["launch"].startswith("accelerate launch --config_file accelerate_config.yaml")


def test_a_model_too_big_for_two_cards_even_sharded_says_so():
    from qplan.errors import DoesNotFitError

    m, g = api.get_model("llama-3.1-70b"), api.get_gpu("rtx-4090")
    with pytest.raises(DoesNotFitError) as e:  # with the weights kept on the GPUs
        api.suggest(m, g, seq_len=2048, fixed={"gpus": 2, "offload_params": False},
                    find_alternatives=False)
    assert "even with the model sharded across the 2 GPUs (FSDP" in str(e.value)
    assert "activations are not sharded" in str(e.value)
    # left to qplan, the weights go to host memory (tests/test_fsdp_offload.py)
    plan = api.suggest(m, g, seq_len=2048, fixed={"gpus": 2}, find_alternatives=False)
    assert plan.config.offload_params and plan.config.gpus == 2


def test_ddp_fixed_says_fsdp_would_shard_it():
    from qplan.errors import DoesNotFitError

    m, g = api.get_model("llama-3.1-70b"), api.get_gpu("a100-40gb-sxm")
    with pytest.raises(DoesNotFitError) as e:
        api.suggest(m, g, seq_len=2048, fixed={"gpus": 2, "strategy": "ddp"},
                    find_alternatives=False)
    assert "every GPU holds the whole model" in str(e.value)
    assert "--strategy fsdp" in str(e.value)


def test_exported_trl_script_puts_each_process_on_its_own_gpu(tmp_path, export_two_gpu_plan):
    """With several processes (accelerate launch), the script's model goes to the process's
    GPU (LOCAL_RANK), not GPU 0 for every rank."""
    r = export_two_gpu_plan("llama-3.1-8b", "rtx-4090")
    assert r.exit_code == 0, r.output
    text = (tmp_path / "t.py").read_text()
    assert 'device_map={"": int(os.environ.get("LOCAL_RANK", "0"))} if cuda else None' in text
    assert 'device_map={"": 0}' not in text


@pytest.mark.parametrize("spelled", ["rtx-4090 x2", "rtx-4090x2", "RTX-4090 X2", "2x rtx-4090",
                                     "2 x rtx-4090", "rtx-4090*2", "rtx-4090 \u00d7 2"])
def test_gpu_with_a_count_is_that_many_cards(spelled):
    """The issue's `--gpu rtx-4090 x2`: the same plan as --gpu rtx-4090 --gpus 2."""
    r = CliRunner().invoke(cli, ["suggest", "--model", "llama-3.1-8b", "--gpu", spelled, "--json"])
    want = CliRunner().invoke(cli, ["suggest", "--model", "llama-3.1-8b", "--gpu", "rtx-4090",
                                    "--gpus", "2", "--json"])
    assert r.exit_code == 0, r.output
    got, exp = json.loads(r.output), json.loads(want.output)
    assert got["settings"]["gpus"] == 2 and got["settings"] == exp["settings"]
    assert got["gpu"] == exp["gpu"] == "rtx-4090"


def test_gpu_count_and_gpus_must_agree_and_estimate_takes_the_count():
    r = CliRunner().invoke(cli, ["suggest", "--model", "llama-3.1-8b", "--gpu", "rtx-4090 x2",
                                 "--gpus", "4"])
    assert r.exit_code == 2 and "names 2 GPUs but --gpus says 4" in r.output
    ok = CliRunner().invoke(cli, ["suggest", "--model", "llama-3.1-8b", "--gpu", "rtx-4090 x2",
                                  "--gpus", "2", "--json"])
    assert ok.exit_code == 0 and json.loads(ok.output)["settings"]["gpus"] == 2
    e = CliRunner().invoke(cli, ["estimate", "--model", "llama-3.1-8b", "--gpu", "2x 24GB",
                                 "--grad-accum", "4", "--json"])
    assert e.exit_code == 0, e.output
    assert json.loads(e.output)["settings"]["gpus"] == 2
    bad = CliRunner().invoke(cli, ["suggest", "--model", "llama-3.1-8b", "--gpu", "rtx-4090 x65"])
    assert bad.exit_code == 2 and "outside 1..64" in bad.output


def test_commands_for_one_card_refuse_a_count(tmp_path):
    r = CliRunner().invoke(cli, ["export", "--model", "llama-3.1-8b", "--gpu", "rtx-4090 x2",
                                 "--format", "trl", "--output", str(tmp_path / "t.py")])
    assert r.exit_code == 2 and "names 2 cards; this command takes one (--gpu rtx-4090)" in r.output


def test_every_catalogue_gpu_name_is_one_card():
    """No catalogue name or alias is read as a card and a count (an ``x2``-like ending)."""
    cat = api.catalog()
    for g in cat.gpus:
        for name in (g.name, *getattr(g, "aliases", ())):
            assert api.split_gpu_count(name) == (name, None)
    assert api.split_gpu_count("24GB") == ("24GB", None)


@pytest.mark.parametrize("alias,card", [("4090", "rtx-4090"), ("3090", "rtx-3090"),
                                        ("2060", "rtx-2060")])
def test_a_numeric_alias_is_the_card_not_a_memory_size(alias, card):
    """`--gpu 4090` planned for a custom card of 4,090 GiB (the size was read before the
    catalogue's aliases): a silent wrong answer. Now the card; `4090GB` is still a size."""
    assert api.get_gpu(alias).name == card
    assert api.get_gpu(f"{alias}GB").memory_gib == float(alias)
    assert api.split_gpu_count(f"{alias} x2") == (alias, 2)
