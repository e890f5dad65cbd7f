"""The example plugin (examples/qplan-plugin-example) as users meet it: loaded through its
``qplan`` entry point, visible in ``qplan gpus`` / ``qplan models``, used by ``qplan suggest``.

Nothing is installed into the test environment (that would change the catalogue other
tests see): entry points are faked, except in the slow test, which pip-installs the example
into a temporary directory and runs qplan in a subprocess.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_plugins_fakes import FakeDist, FakeEntryPoint, installed  # noqa: F401

from qplan import api
from qplan.plugins.manager import LOAD_ENV, get_plugin_manager, reset_plugin_manager

EXAMPLE_DIR = Path(__file__).resolve().parents[1] / "examples" / "qplan-plugin-example"


@pytest.fixture
def example_module(monkeypatch):
    """The example's module, imported from the source tree."""
    monkeypatch.syspath_prepend(str(EXAMPLE_DIR))
    try:
        yield importlib.import_module("qplan_plugin_example")
    finally:
        sys.modules.pop("qplan_plugin_example", None)


@pytest.fixture
def with_example(installed, example_module):
    """The process sees the example installed, as pip would install it."""
    installed(FakeDist("qplan-plugin-example", "0.1.0",
                       FakeEntryPoint("example", example_module)))
    return example_module


def qplan_cli(*args: str):
    from qplan.cli import cli

    return CliRunner().invoke(cli, list(args))


def test_entry_point_declared_in_pyproject():
    tomllib = pytest.importorskip("tomllib")

    meta = tomllib.loads((EXAMPLE_DIR / "pyproject.toml").read_text())
    assert meta["project"]["entry-points"]["qplan"] == {"example": "qplan_plugin_example"}


def test_example_loads_through_its_entry_point(with_example):
    pm = get_plugin_manager()
    assert pm.problems == []
    info = {i.name: i for i in pm.plugin_infos()}["example"]
    assert (info.version, info.distribution) == ("0.1.0", "qplan-plugin-example")


def test_example_gpu_and_model_in_gpus_and_models(with_example):
    res = qplan_cli("gpus", "--json")
    assert res.exit_code == 0, res.output
    gpus = {g["name"]: g for g in json.loads(res.stdout)["gpus"]}
    assert gpus["rtx-pro-4000-blackwell"]["provider"] == "example"
    res = qplan_cli("models", "--json")
    assert res.exit_code == 0, res.output
    assert "qwen2-0.5b" in {m["name"] for m in json.loads(res.stdout)["models"]}
    assert res.stderr == ""  # no plugin warnings


def test_example_is_usable_by_suggest(with_example):
    plan = api.suggest(api.get_model("qwen2-0.5b"), api.get_gpu("rtx-pro-4000-blackwell"),
                       seq_len=2048)
    assert plan.memory.fits
    res = qplan_cli("suggest", "--model", "qwen2-0.5b", "--gpu", "rtx-pro-4000-blackwell",
                    "--seq", "1024", "--rank", "64", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["gpu"] == "rtx-pro-4000-blackwell"
    assert out["settings"]["lora_rank"] == 32  # the house policy


def test_without_the_plugin_its_entries_are_unknown(with_example, monkeypatch):
    monkeypatch.setenv(LOAD_ENV, "")
    reset_plugin_manager()
    res = qplan_cli("suggest", "--model", "qwen2-0.5b", "--gpu", "rtx-4090", "--json")
    assert res.exit_code == 2
    assert "qwen2-0.5b" in res.output


def test_house_rules_command_is_added(with_example):
    # qplan.cli ran register_commands when it was first imported, with whatever was
    # installed then; check the hook on a fresh group instead.
    import click

    from qplan.plugins.cli import load_plugin_commands

    @click.group()
    def group():
        pass
    load_plugin_commands(group, get_plugin_manager())
    assert "house-rules" in group.commands


@pytest.mark.slow
def test_pip_installed_example_is_found_by_qplan(tmp_path):
    """pip install the example (no deps, no build isolation: offline) into a target
    directory, then run qplan with it on PYTHONPATH."""
    src = tmp_path / "src"
    shutil.copytree(EXAMPLE_DIR, src, ignore=shutil.ignore_patterns("build", "*.egg-info",
                                                                    "__pycache__"))
    target = tmp_path / "site"
    # Offline when setuptools is here to build with; else pip fetches it from PyPI.
    offline = ["--no-build-isolation", "--no-index"] if importlib.util.find_spec(
        "setuptools") else []
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *offline,
                    "--target", str(target), str(src)], check=True, timeout=120)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(target), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop(LOAD_ENV, None)

    def run(*args, **extra):
        return subprocess.run([sys.executable, "-m", "qplan", *args], env={**env, **extra},
                              capture_output=True, text=True, timeout=60)

    res = run("plugins", "--json")
    assert res.returncode == 0, res.stderr
    plugins = {p["name"]: p for p in json.loads(res.stdout)["plugins"]}
    assert plugins["example"]["distribution"] == "qplan-plugin-example"
    assert plugins["example"]["version"] == "0.1.0"
    res = run("gpus", "--json")
    assert "rtx-pro-4000-blackwell" in {g["name"] for g in json.loads(res.stdout)["gpus"]}
    res = run("gpus", "--json", **{LOAD_ENV: ""})
    assert "rtx-pro-4000-blackwell" not in {g["name"] for g in json.loads(res.stdout)["gpus"]}
    res = run("house-rules")
    assert res.returncode == 0 and "rank at most 32" in res.stdout
