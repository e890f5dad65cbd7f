"""The plugin system: the manager, loading, failures, the hooks as the planner uses them, and
the command line (``qplan plugins``, warnings, plugin commands)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from test_plugins_fakes import (FakeDist, FakeEntryPoint, gpu, gpus_plugin, installed,  # noqa: F401
                                plugin)

from qplan import api
from qplan.catalog import build_catalog, get_catalog
from qplan.errors import BadInputError, DoesNotFitError, NotModelledError, PluginError
from qplan.planner.config import TrainConfig
from qplan.planner.memory import MemoryTerm
from qplan.plugins import calls
from qplan.plugins.cli import load_plugin_commands
from qplan.plugins.manager import (HOOK_NAMES, LOAD_ENV, get_plugin_manager,
                                   make_plugin_manager, reset_plugin_manager)
from qplan.profiles.models import ModelProfile


def bare_pm(**plugins):
    """A manager with the built-ins and ``plugins``, ignoring whatever is installed."""
    return make_plugin_manager(entry_points=False, plugins=plugins)


def qplan_cli(*args: str):
    from qplan.cli import cli

    return CliRunner().invoke(cli, list(args))


# --- the manager ---------------------------------------------------------------------------
def test_hook_names_are_the_documented_ones():
    assert set(HOOK_NAMES) == {"register_models", "register_gpus", "adjust_memory",
                               "plan_policy", "on_out_of_memory", "register_commands"}


def test_importing_the_library_makes_no_plugin_manager():
    code = ("import qplan.api, qplan.catalog, qplan.plugins.manager as m; "
            "assert m._cached is None, 'a plugin manager was made at import'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_builtins_come_through_the_same_hooks():
    pm = bare_pm()
    (info,) = pm.plugin_infos()
    assert (info.name, info.builtin, info.distribution) == ("qplan", True, "qplan")
    assert {"register_models", "register_gpus", "plan_policy",
            "register_commands"} <= set(info.hooks)
    cat = build_catalog(pm)
    assert len(cat.gpus) > 0 and len(cat.models) > 0
    assert {g.provider for g in cat.gpus} == {"qplan"} == {m.provider for m in cat.models}


def test_each_factory_call_is_independent():
    a = bare_pm(extra=gpus_plugin(gpu("only-in-a")))
    b = bare_pm()
    assert "only-in-a" in build_catalog(a).gpus
    assert "only-in-a" not in build_catalog(b).gpus


def test_default_manager_is_cached_and_resettable(installed):
    pm = get_plugin_manager()
    assert get_plugin_manager() is pm
    reset_plugin_manager()
    assert get_plugin_manager() is not pm


def test_catalogue_cache_follows_registration():
    pm = bare_pm()
    before = get_catalog(pm)
    assert get_catalog(pm) is before
    extra = gpus_plugin(gpu("late-gpu"))
    pm.register(extra, name="late")
    try:
        assert "late-gpu" in get_catalog(pm).gpus
    finally:
        pm.unregister(extra)
    assert "late-gpu" not in get_catalog(pm).gpus


# --- loading through entry points ----------------------------------------------------------
def test_entry_point_plugin_loads_with_its_distribution_version(installed):
    installed(FakeDist("qplan-gpu-pack", "1.2.3",
                       FakeEntryPoint("gpupack", gpus_plugin(gpu("pack-card")))))
    pm = get_plugin_manager()
    info = {i.name: i for i in pm.plugin_infos()}["gpupack"]
    assert (info.version, info.distribution, info.builtin) == ("1.2.3", "qplan-gpu-pack", False)
    assert info.hooks == ("register_gpus",)
    assert api.catalog().gpus.get("pack-card").provider == "gpupack"
    assert pm.problems == []


@pytest.fixture
def two_plugins(installed):
    installed(FakeDist("qplan-alpha", "1.0", FakeEntryPoint("alpha", gpus_plugin(gpu("a-card")))),
              FakeDist("qplan-beta", "2.0", FakeEntryPoint("beta", gpus_plugin(gpu("b-card")))))


@pytest.mark.parametrize("value, loaded", [
    (None, {"alpha", "beta"}),  # unset: everything installed
    ("", set()),  # empty: only the built-ins
    (" ", set()),
    ("alpha", {"alpha"}),  # by entry-point name
    ("qplan-beta", {"beta"}),  # by distribution name
    ("QPLAN_BETA", {"beta"}),  # compared like pip compares names
    ("alpha, qplan-beta", {"alpha", "beta"}),
], ids=["unset", "empty", "blank", "entry-point", "distribution", "normalized", "both"])
def test_qplan_load_plugins_limits_what_loads(two_plugins, monkeypatch, value, loaded):
    if value is not None:
        monkeypatch.setenv(LOAD_ENV, value)
    reset_plugin_manager()
    pm = get_plugin_manager()
    assert {i.name for i in pm.plugin_infos()} == {"qplan"} | loaded
    assert {g.name for g in api.catalog().gpus} & {"a-card", "b-card"} == \
        {f"{n[0]}-card" for n in loaded}
    assert pm.problems == []


def test_qplan_load_plugins_naming_a_missing_plugin_is_reported(two_plugins, monkeypatch):
    monkeypatch.setenv(LOAD_ENV, "alpha,gamma")
    reset_plugin_manager()
    pm = get_plugin_manager()
    assert {i.name for i in pm.plugin_infos()} == {"qplan", "alpha"}
    (p,) = pm.problems
    assert p.plugin == "gamma" and "not installed" in p.message
    assert "alpha, beta" in p.message  # what is installed


def test_plugin_that_fails_to_import_is_reported_and_the_rest_load(installed):
    installed(FakeDist("qplan-broken", "0.1", FakeEntryPoint("broken", ImportError("no module x"))),
              FakeDist("qplan-alpha", "1.0", FakeEntryPoint("alpha", gpus_plugin(gpu("a-card")))))
    pm = get_plugin_manager()
    (p,) = pm.problems
    assert (p.plugin, p.where) == ("broken", "load")
    assert "ImportError: no module x" in str(p) and "'broken'" in str(p)
    assert "a-card" in api.catalog().gpus


def test_misspelled_hook_is_caught_by_name(installed):
    bad = plugin(register_gpu=lambda register: None)
    installed(FakeDist("qplan-typo", "0.1", FakeEntryPoint("typo", bad)))
    pm = get_plugin_manager()
    (p,) = pm.problems
    assert p.plugin == "typo"
    assert "unknown hook 'register_gpu'" in p.message
    assert "did you mean 'register_gpus'" in p.message
    assert not pm.has_plugin("typo")
    pm.check_pending()  # nothing unchecked is left behind
    with pytest.raises(PluginError, match="plugin 'typo' implements unknown hook 'register_gpu'"):
        bare_pm(typo=bad)


def test_hook_without_hookimpl_marker_is_reported():
    import types

    unmarked = types.SimpleNamespace(register_gpus=lambda register: None)
    with pytest.raises(PluginError, match=r"plugin 'lazy': register_gpus\(\) is not marked"):
        bare_pm(lazy=unmarked)


def test_hook_with_a_wrong_argument_is_reported():
    with pytest.raises(PluginError, match="plugin 'argh'.*registr"):
        bare_pm(argh=plugin(register_gpus=lambda registr: None))


def test_hook_wrappers_are_refused():
    from qplan.plugins import hookimpl

    class Wrapper:
        @hookimpl(wrapper=True)
        def plan_policy(self, model, gpu, config):
            return (yield)

    with pytest.raises(PluginError, match="wrapper"):
        bare_pm(wrap=Wrapper())


def test_entry_point_name_taken_twice_is_reported(installed):
    installed(FakeDist("qplan-one", "1", FakeEntryPoint("same", gpus_plugin(gpu("one-card")))),
              FakeDist("qplan-two", "1", FakeEntryPoint("same", gpus_plugin(gpu("two-card")))))
    pm = get_plugin_manager()
    (p,) = pm.problems
    assert "'same' is already taken by same (qplan-one 1)" in p.message


# --- catalogue hooks: failures and collisions ----------------------------------------------
def test_register_gpus_that_raises_is_reported_and_builtins_still_listed():
    def register_gpus(register):
        register(gpu("half-registered"))
        raise RuntimeError("datasheet server down")

    cat = build_catalog(bare_pm(flaky=plugin(register_gpus=register_gpus)))
    (p,) = cat.problems
    assert (p.plugin, p.where) == ("flaky", "register_gpus")
    assert "RuntimeError: datasheet server down" in str(p)
    assert "half-registered" not in cat.gpus  # a failing plugin adds nothing
    assert "rtx-4090" in cat.gpus


def test_register_with_the_wrong_type_is_reported():
    cat = build_catalog(bare_pm(wrong=plugin(register_models=lambda register: register({"a": 1}))))
    (p,) = cat.problems
    assert p.plugin == "wrong" and "register() takes a ModelProfile, got dict" in p.message


def test_duplicate_of_a_builtin_names_both_plugins():
    with pytest.raises(PluginError, match=r"'rtx-4090' is registered twice: by qplan "
                                          r"\(rtx-4090\) and by copycat \(rtx-4090\)"):
        build_catalog(bare_pm(copycat=gpus_plugin(gpu("rtx-4090"))))


def test_duplicate_alias_between_two_plugins_names_both():
    pm = bare_pm(first=gpus_plugin(gpu("card-one", aliases=("lab-card",))),
                 second=gpus_plugin(gpu("card-two", aliases=("Lab Card",))))
    with pytest.raises(PluginError, match=r"by first \(card-one\) and by second \(card-two\)"
                                          r".*QPLAN_LOAD_PLUGINS"):
        build_catalog(pm)


def test_plugin_cannot_claim_to_be_qplan():
    import dataclasses

    g = dataclasses.replace(gpu("sneaky-card"), provider="qplan")
    assert build_catalog(bare_pm(sneaky=gpus_plugin(g))).gpus.get("sneaky-card").provider == "sneaky"


# --- planning hooks --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_model():
    return api.get_model("llama-3.2-1b", pm=bare_pm())


@pytest.fixture(scope="module")
def card():
    return api.get_gpu("rtx-4090", pm=bare_pm())


def cap_rank(limit):
    def plan_policy(config):  # may take fewer arguments than the spec
        return config.with_(lora_rank=limit) if config.lora_rank > limit else None
    return plugin(plan_policy=plan_policy)


def test_policy_plugin_changes_the_plan(small_model, card):
    pm = bare_pm(house=cap_rank(32))
    plan = api.suggest(small_model, card, seq_len=1024, fixed={"lora_rank": 128}, pm=pm)
    assert plan.config.lora_rank == 32
    plain = api.suggest(small_model, card, seq_len=1024, fixed={"lora_rank": 128}, pm=bare_pm())
    assert plain.config.lora_rank == 128


def test_policies_are_chained(small_model, card):
    dropout = plugin(plan_policy=lambda config: config.with_(lora_dropout=0.1))
    pm = bare_pm(house=cap_rank(8), dropout=dropout)
    plan = api.suggest(small_model, card, seq_len=1024, fixed={"lora_rank": 64}, pm=pm)
    assert (plan.config.lora_rank, plan.config.lora_dropout) == (8, 0.1)


def test_policy_veto_removes_candidates(small_model, card):
    no_fused = plugin(plan_policy=lambda config: False if config.loss == "fused"
                                 else None)
    plan = api.suggest(small_model, card, seq_len=1024, pm=bare_pm(v=no_fused))
    assert plan.config.loss == "standard"
    with pytest.raises(BadInputError, match="vetoed by a plan policy"):
        api.suggest(small_model, card, seq_len=1024,
                    pm=bare_pm(everything=plugin(plan_policy=lambda config: False)))


def test_builtin_policy_vetoes_bf16_without_bf16_hardware(small_model, card):
    from qplan.profiles.gpus import GpuProfile

    t4 = GpuProfile("t4-test", "Tesla T4", 16, (7, 5), 65.0, 320, "test")
    pm = bare_pm()
    assert calls.apply_plan_policies(pm, small_model, t4, TrainConfig(compute_dtype="bf16")) is None
    fp16 = TrainConfig(compute_dtype="fp16")
    assert calls.apply_plan_policies(pm, small_model, t4, fp16) == fp16
    bf16 = TrainConfig(compute_dtype="bf16")
    assert calls.apply_plan_policies(pm, small_model, card, bf16) == bf16


def test_policy_that_raises_or_returns_junk_names_the_plugin(small_model, card):
    def boom(config):
        raise ValueError("no rank table")
    with pytest.raises(PluginError, match="plugin 'grumpy' failed in plan_policy: ValueError: "
                                          "no rank table"):
        api.suggest(small_model, card, seq_len=512, pm=bare_pm(grumpy=plugin(plan_policy=boom)))
    with pytest.raises(PluginError, match="plugin 'junk' failed in plan_policy: returned dict"):
        api.suggest(small_model, card, seq_len=512,
                    pm=bare_pm(junk=plugin(plan_policy=lambda config: {"lora_rank": 8})))


@pytest.fixture(scope="module")
def tiny_moe():
    # A made-up small mixture of experts: 4 experts, 2 per token.
    return ModelProfile(name="tiny-moe", hf_id="test/tiny-moe", source="test", model_type="mixtral",
                        hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=8, vocab_size=32_000,
                        max_position_embeddings=4096, num_local_experts=4, num_experts_per_tok=2)


EXTRA = 123 * 1024**2


def moe_plugin():
    def adjust_memory(model, terms):
        if not model.is_moe:
            return None
        terms.append(MemoryTerm("experts", "other experts", EXTRA, "test term"))
        return True
    return plugin(adjust_memory=adjust_memory)


def test_adjust_memory_makes_a_moe_estimable(tiny_moe, card):
    with pytest.raises(NotModelledError, match="mixture of experts"):
        api.estimate(tiny_moe, card, TrainConfig(seq_len=512), pm=bare_pm())
    est = api.estimate(tiny_moe, card, TrainConfig(seq_len=512), pm=bare_pm(moe=moe_plugin()))
    assert est.memory.term("experts").bytes == EXTRA
    assert est.memory.peak_bytes == sum(t.bytes for t in est.memory.terms)
    plan = api.suggest(tiny_moe, card, seq_len=512, pm=bare_pm(moe=moe_plugin()))
    assert plan.memory.term("experts").bytes == EXTRA


def test_adjust_memory_not_claiming_the_model_leaves_it_refused(tiny_moe, card):
    adds_only = plugin(adjust_memory=lambda terms: terms.append(
        MemoryTerm("x", "x", 1, "x")))
    with pytest.raises(NotModelledError):
        api.estimate(tiny_moe, card, TrainConfig(seq_len=512), pm=bare_pm(adds=adds_only))


def test_adjust_memory_errors_name_the_plugin(small_model, card):
    bad_item = plugin(adjust_memory=lambda terms: terms.append(("x", 1)))
    with pytest.raises(PluginError, match="plugin 'sloppy' failed in adjust_memory: it put a "
                                          "tuple in the terms"):
        api.estimate(small_model, card, TrainConfig(seq_len=512), pm=bare_pm(sloppy=bad_item))

    def boom(model):
        raise KeyError("hidden_act")
    with pytest.raises(PluginError, match="plugin 'crash' failed in adjust_memory: KeyError"):
        api.estimate(small_model, card, TrainConfig(seq_len=512),
                     pm=bare_pm(crash=plugin(adjust_memory=boom)))


def test_on_out_of_memory_first_proposal_wins(small_model, card):
    plan = api.suggest(small_model, card, seq_len=1024, pm=bare_pm())
    kw = dict(plan=plan, model=small_model, gpu=card, attempt=1, error=MemoryError("oom"))
    assert calls.propose_after_oom(bare_pm(), **kw) is None
    shorter = plugin(on_out_of_memory=lambda plan, attempt: plan.config.with_(seq_len=512))
    silent = plugin(on_out_of_memory=lambda plan: None)
    cfg, who = calls.propose_after_oom(bare_pm(shorter=shorter, silent=silent), **kw)
    assert cfg.seq_len == 512 and who == "shorter"
    junk = plugin(on_out_of_memory=lambda plan: "halve the batch")
    with pytest.raises(PluginError, match="plugin 'junk' failed in on_out_of_memory: returned str"):
        calls.propose_after_oom(bare_pm(junk=junk), **kw)


# --- commands --------------------------------------------------------------------------------
def hello_plugin():
    def register_commands(cli):
        @cli.command()
        def hello():
            """Say hello."""
            click.echo("hello from a plugin")
    return plugin(register_commands=register_commands)


def fresh_group():
    @click.group()
    def group():
        """A test group."""
    return group


def test_register_commands_adds_a_command():
    pm = bare_pm(hi=hello_plugin())
    group = fresh_group()
    load_plugin_commands(group, pm)
    assert {"hello", "plugins"} <= set(group.commands)
    res = CliRunner().invoke(group, ["hello"])
    assert res.exit_code == 0 and res.stdout == "hello from a plugin\n"
    assert pm.problems == []


def test_register_commands_that_raises_is_reported_and_the_rest_work():
    def register_commands(cli):
        cli.add_command(click.Command("half", callback=lambda: None))
        raise RuntimeError("no click here")
    pm = bare_pm(hi=hello_plugin(), bad=plugin(register_commands=register_commands))
    group = fresh_group()
    load_plugin_commands(group, pm)
    assert "hello" in group.commands and "half" not in group.commands
    (p,) = pm.problems
    assert (p.plugin, p.where) == ("bad", "register_commands")
    res = CliRunner().invoke(group, ["hello"])
    assert res.exit_code == 0
    assert "warning: plugin 'bad' failed in register_commands: RuntimeError: no click here" \
        in res.stderr


def test_plugin_cannot_replace_a_command():
    def register_commands(cli):
        cli.add_command(click.Command("plugins", callback=lambda: click.echo("hijacked")))
    pm = bare_pm(hijack=plugin(register_commands=register_commands))
    group = fresh_group()
    load_plugin_commands(group, pm)
    res = CliRunner().invoke(group, ["plugins"])
    assert "hijacked" not in res.stdout and "qplan 0.1.0 (built-in)" in res.stdout
    assert "tried to replace the command(s) plugins" in res.stdout  # listed under problems


def test_qplan_plugins_json_lists_plugins_versions_hooks_and_problems(installed):
    def register_models(register):
        raise ValueError("bad shape")
    installed(FakeDist("qplan-gpu-pack", "1.2.3",
                       FakeEntryPoint("gpupack", gpus_plugin(gpu("pack-card")))),
              FakeDist("qplan-models", "0.2", FakeEntryPoint("mods", plugin(
                  register_models=register_models))),
              FakeDist("qplan-broken", "0.1", FakeEntryPoint("broken", ImportError("nope"))))
    res = qplan_cli("plugins", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    by_name = {p["name"]: p for p in out["plugins"]}
    from qplan import __version__
    assert by_name["qplan"]["version"] == __version__ and by_name["qplan"]["builtin"]
    assert by_name["gpupack"] == {"name": "gpupack", "version": "1.2.3",
                                  "distribution": "qplan-gpu-pack", "builtin": False,
                                  "hooks": ["register_gpus"]}
    assert "broken" not in by_name
    problems = {(p["plugin"], p["where"]) for p in out["problems"]}
    assert problems == {("broken", "load"), ("mods", "register_models")}
    assert out["load_plugins"] is None and out["catalogue_error"] is None


def test_qplan_plugins_text(installed, monkeypatch):
    installed(FakeDist("qplan-gpu-pack", "1.2.3",
                       FakeEntryPoint("gpupack", gpus_plugin(gpu("pack-card")))))
    res = qplan_cli("plugins")
    assert "gpupack 1.2.3 (qplan-gpu-pack)\n  hooks: register_gpus" in res.stdout
    monkeypatch.setenv(LOAD_ENV, "")
    reset_plugin_manager()
    res = qplan_cli("plugins")
    assert "gpupack" not in res.stdout and "QPLAN_LOAD_PLUGINS='' limits" in res.stdout


def test_qplan_gpus_survives_a_broken_gpu_plugin_and_warns(installed):
    def register_gpus(register):
        raise RuntimeError("boom")
    installed(FakeDist("qplan-bad", "0.1", FakeEntryPoint("badgpus", plugin(
        register_gpus=register_gpus))))
    res = qplan_cli("gpus", "--json")
    assert res.exit_code == 0, res.output
    names = {g["name"] for g in json.loads(res.stdout)["gpus"]}
    assert "rtx-4090" in names
    assert "warning: plugin 'badgpus' failed in register_gpus: RuntimeError: boom" in res.stderr


def test_qplan_gpus_with_a_duplicate_fails_clearly_and_plugins_still_works(installed):
    installed(FakeDist("qplan-copy", "0.1", FakeEntryPoint("copycat", gpus_plugin(gpu("rtx-4090")))))
    res = qplan_cli("gpus")
    assert res.exit_code == 2
    assert "registered twice: by qplan (rtx-4090) and by copycat (rtx-4090)" in res.output
    res = qplan_cli("plugins", "--json")
    assert res.exit_code == 0
    assert "copycat" in json.loads(res.stdout)["catalogue_error"]


# --- the guide -------------------------------------------------------------------------------
GUIDE = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


def test_guide_has_a_section_per_hook():
    text = GUIDE.read_text()
    for hook in HOOK_NAMES:
        assert f"\n### {hook}\n" in text, f"docs/plugins.md has no section for {hook}"


def test_guide_python_snippets_parse():
    import ast
    import re

    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.S)
    assert len(blocks) >= 8
    for b in blocks:
        ast.parse(b)


def test_guide_quotes_the_real_collision_message():
    with pytest.raises(PluginError) as e:
        build_catalog(bare_pm(copycat=gpus_plugin(gpu("rtx-4090"))))
    assert f"error: {e.value}\n" in GUIDE.read_text()


def test_policy_changes_are_explained_in_the_plan(small_model, card):
    """A plan says which plugin's policy changed which setting (and the CLI shows it)."""
    plan = api.suggest(small_model, card, seq_len=1024, fixed={"lora_rank": 128},
                       pm=bare_pm(house=cap_rank(32)))
    why = [r for r in plan.reasons if r.source == "house"]
    assert [r.settings for r in why] == [("lora_rank",)] and "128 -> 32" in why[0].text
    assert "'house'" in why[0].text
    from qplan.commands.planner import why_by_setting

    by_field, _ = why_by_setting(plan.reasons, {"lora_rank": 128}, "")
    assert by_field["lora_rank"].startswith("lora_rank 128 -> 32 by plugin 'house'")
    plain = api.suggest(small_model, card, seq_len=1024, pm=bare_pm())
    assert all(r.source == "qplan" for r in plain.reasons)
