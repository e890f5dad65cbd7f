"""The plugin manager, built by a factory (no import-time global)."""
from __future__ import annotations

import os

import pluggy

from qplan.plugins import hookspecs

ENTRY_POINT_GROUP = "qplan"
LOAD_ENV = "QPLAN_LOAD_PLUGINS"
DEFAULT_PLUGINS = ("qplan.plugins.builtin",)

_cached: pluggy.PluginManager | None = None


def make_plugin_manager(load_entrypoints: bool = True) -> pluggy.PluginManager:
    import importlib

    pm = pluggy.PluginManager("qplan")
    pm.add_hookspecs(hookspecs)
    for mod in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(mod), name=mod)
    if load_entrypoints:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    pm.check_pending()
    return pm


def get_plugin_manager() -> pluggy.PluginManager:
    """The process's plugin manager, made on first use."""
    global _cached
    if _cached is None:
        _cached = make_plugin_manager(load_entrypoints=os.environ.get(LOAD_ENV, None) != "")
    return _cached


def plugin_name(pm: pluggy.PluginManager, plugin) -> str:
    return pm.get_name(plugin) or getattr(plugin, "__name__", repr(plugin))
