"""Tests of the example plugin, the way a plugin author tests a plugin.

Each test builds its own plugin manager with qplan's built-ins and this plugin (and
nothing else that happens to be installed), so results don't depend on the machine.
"""
from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

import qplan_plugin_example as example
from qplan import api
from qplan.catalog import build_catalog
from qplan.errors import NotModelledError
from qplan.planner.config import TrainConfig
from qplan.plugins.cli import load_plugin_commands
from qplan.plugins.manager import make_plugin_manager


@pytest.fixture(scope="module")
def pm():
    """qplan's built-ins plus this plugin, registered as an entry point would be."""
    return make_plugin_manager(entry_points=False, plugins={"example": example})


@pytest.fixture(scope="module")
def builtin_only():
    return make_plugin_manager(entry_points=False)


def test_loads_cleanly(pm):
    assert pm.problems == []
    info = {i.name: i for i in pm.plugin_infos()}["example"]
    assert set(info.hooks) == {"register_gpus", "register_models", "plan_policy",
                               "adjust_memory", "register_commands"}
    assert info.version == example.__version__


def test_adds_entries_qplan_does_not_have(pm, builtin_only):
    ours, theirs = build_catalog(pm), build_catalog(builtin_only)
    for g in example.GPUS:
        assert g.name not in theirs.gpus  # else qplan would report a duplicate
        assert ours.gpus.get(g.name).provider == "example"
    for m in example.MODELS:
        assert m["name"] not in theirs.models
        assert ours.models.get(m["name"]).provider == "example"
    assert api.get_gpu("RTX PRO 4000", pm=pm).name == "rtx-pro-4000-blackwell"  # alias


def test_model_shape_matches_its_config(pm):
    m = api.get_model("qwen2-0.5b", pm=pm)
    # Qwen2-0.5B has 494M parameters (its model card: "0.49B").
    assert 0.48e9 < m.total_params < 0.50e9


def test_suggest_plans_the_model_on_the_card(pm):
    plan = api.suggest(api.get_model("qwen2-0.5b", pm=pm),
                       api.get_gpu("rtx-pro-4000-blackwell", pm=pm), seq_len=2048, pm=pm)
    assert plan.gpu == "rtx-pro-4000-blackwell" and plan.memory.fits


def test_house_policy_caps_the_rank(pm):
    model, gpu = api.get_model("qwen2-0.5b", pm=pm), api.get_gpu("rtx-pro-4000", pm=pm)
    plan = api.suggest(model, gpu, seq_len=1024, fixed={"lora_rank": 128, "lora_alpha": 256},
                       pm=pm)
    assert (plan.config.lora_rank, plan.config.lora_alpha) == (32, 64)
    assert example.plan_policy(model, gpu, TrainConfig(lora_rank=16)) is None  # no opinion


def test_mixtral_is_planned_with_attention_adapters(pm, builtin_only):
    mixtral, h100 = api.get_model("mixtral-8x7b", pm=pm), api.get_gpu("h100", pm=pm)
    with pytest.raises(NotModelledError):
        api.suggest(mixtral, h100, seq_len=2048, pm=builtin_only)
    plan = api.suggest(mixtral, h100, seq_len=2048, pm=pm)
    assert plan.config.lora_targets == example.ATTENTION_ONLY
    experts = plan.memory.term("moe_expert_weights")
    # 7 more experts of 3 x 4096 x 14336 plus routers, 32 blocks, at the 4-bit cost per
    # parameter of the base weights term.
    base = plan.memory.term("base_weights_4bit")
    params = 32 * (7 * 3 * 4096 * 14_336 + 4096 * 8)
    assert experts.bytes == int(params * base.bytes / mixtral.quantized_params)
    # Mixtral 8x7B has 46.7B parameters; 4-bit it is about 23 GiB of weights.
    assert 20 < (experts.bytes + base.bytes) / 1024**3 < 26


def test_dense_models_are_left_alone(pm, builtin_only):
    model, gpu = api.get_model("llama-3.2-1b", pm=pm), api.get_gpu("rtx-4090", pm=pm)
    cfg = TrainConfig(seq_len=1024)
    assert api.estimate(model, gpu, cfg, pm=pm).memory == \
        api.estimate(model, gpu, cfg, pm=builtin_only).memory


def test_house_rules_command(pm):
    @click.group()
    def cli():
        pass
    load_plugin_commands(cli, pm)
    res = CliRunner().invoke(cli, ["house-rules"])
    assert res.exit_code == 0
    assert "LoRA rank at most 32" in res.output
