"""Fake installed plugins for the plugin tests (no tests here).

Like pluggy's own tests, entry points are faked by replacing
``importlib.metadata.distributions``: qplan's loader sees exactly the distributions a test
gives, and nothing installed in the environment.
"""
from __future__ import annotations

import importlib.metadata
import types

import pytest

from qplan.plugins import hookimpl
from qplan.plugins.manager import LOAD_ENV, reset_plugin_manager
from qplan.profiles.gpus import GpuProfile


class FakeEntryPoint:
    """An entry point of group ``qplan`` whose ``load()`` returns ``plugin`` (or raises it)."""

    def __init__(self, name: str, plugin, group: str = "qplan"):
        self.name, self.group, self.value = name, group, f"fake_module_{name}"
        self._plugin = plugin

    def load(self):
        if isinstance(self._plugin, BaseException):
            raise self._plugin
        return self._plugin


class FakeDist:
    """An installed distribution with ``entry_points``."""

    def __init__(self, name: str, version: str, *entry_points: FakeEntryPoint):
        self.metadata = {"Name": name}
        self.version = version
        self.entry_points = entry_points


def plugin(name: str = "fake_plugin", **hooks) -> types.SimpleNamespace:
    """A plugin object whose hooks are the given functions, each marked ``@hookimpl``."""
    ns = types.SimpleNamespace(__name__=name)
    for hook, fn in hooks.items():
        setattr(ns, hook, hookimpl(fn))
    return ns


def gpu(name: str, gib: float = 12, **kw) -> GpuProfile:
    return GpuProfile(name, f"Test GPU {name}", gib, (8, 9), 100.0, 500.0, "test", **kw)


def gpus_plugin(*gpus: GpuProfile) -> types.SimpleNamespace:
    def register_gpus(register):
        for g in gpus:
            register(g)
    return plugin(register_gpus=register_gpus)


@pytest.fixture
def installed(monkeypatch):
    """``installed(*dists)``: the process sees only these plugin distributions.

    The process's plugin manager is rebuilt on next use, and forgotten again at the end,
    so later tests get the real environment back. QPLAN_LOAD_PLUGINS starts unset.
    """
    monkeypatch.delenv(LOAD_ENV, raising=False)

    def install(*dists: FakeDist) -> None:
        monkeypatch.setattr(importlib.metadata, "distributions", lambda: list(dists))
        reset_plugin_manager()

    install()
    try:
        yield install
    finally:
        reset_plugin_manager()
