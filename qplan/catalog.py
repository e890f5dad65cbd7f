"""The catalogues of models and GPUs, filled through the plugin hooks.

Built-in entries are registered by :mod:`qplan.plugins.builtin` through the same
``register_models`` / ``register_gpus`` hooks a third-party plugin uses.

Policy for plugins that go wrong:

* a plugin whose hook raises (or registers something that is not a profile) adds
  nothing to that catalogue; the failure is kept in :attr:`Catalog.problems` with the
  plugin's name, and everything else is still listed;
* a name or alias registered twice (by two plugins, or by a plugin and qplan) raises
  :class:`~qplan.errors.PluginError` naming both: which entry to use would otherwise
  depend on the order plugins load in.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from qplan.errors import UnknownGpuError, UnknownModelError
from qplan.plugins.manager import PluginProblem
from qplan.profiles.gpus import GpuProfile
from qplan.profiles.models import ModelProfile
from qplan.profiles.registry import Registry


@dataclass
class Catalog:
    models: Registry[ModelProfile]
    gpus: Registry[GpuProfile]
    # Plugins whose register_models / register_gpus raised; their entries are left out.
    problems: list[PluginProblem] = field(default_factory=list)


def _unknown(registry: Registry, error: type, what: str, see: str) -> Callable[[str], Exception]:
    """The error for a name not in ``registry``, with the closest names."""
    def make(name: str) -> Exception:
        close = registry.closest(name)
        hint = f" Closest: {', '.join(close)}." if close else ""
        return error(f"unknown {what} {name!r}.{hint} {see}")
    return make


def _unknown_model(models: Registry) -> Callable[[str], Exception]:
    return _unknown(models, UnknownModelError, "model", "See `qplan models` for the catalogue, "
                    "or pass a local model directory, a config.json, or a Hugging Face hub id.")


def _unknown_gpu(gpus: Registry) -> Callable[[str], Exception]:
    return _unknown(gpus, UnknownGpuError, "GPU", "See `qplan gpus`, or give a memory size such "
                    "as --gpu 8GB or --vram 8.")


def _fill(pm, hook: str, registry: Registry, kind: type, problems: list[PluginProblem]) -> None:
    """Ask each plugin (registration order: built-ins first) for its entries.

    A plugin's entries are collected first and added only if its hook returns normally.
    """
    from qplan.plugins.calls import implementations

    for name, call in implementations(pm, hook, call_order=False):
        staged: list = []

        def register(entry, _staged=staged) -> None:
            if not isinstance(entry, kind):
                raise TypeError(f"register() takes a {kind.__name__}, got {type(entry).__name__}")
            _staged.append(entry)
        try:
            call(register=register)
        except Exception as e:  # noqa: BLE001 - any error inside a plugin is the plugin's
            text = " ".join(str(e).split())
            problems.append(PluginProblem(name, hook, f"{type(e).__name__}: {text}"))
            continue
        for entry in staged:
            registry.register(entry, provider=name)  # PluginError on a duplicate name


def build_catalog(pm=None) -> Catalog:
    """Ask every loaded plugin (built-ins included) to register its models and GPUs."""
    from qplan.plugins.manager import get_plugin_manager

    if pm is None:
        pm = get_plugin_manager()
    models: Registry[ModelProfile] = Registry("model", lambda n: UnknownModelError(n))
    gpus: Registry[GpuProfile] = Registry("GPU", lambda n: UnknownGpuError(n))
    models._not_found = _unknown_model(models)
    gpus._not_found = _unknown_gpu(gpus)
    problems: list[PluginProblem] = []
    _fill(pm, "register_models", models, ModelProfile, problems)
    _fill(pm, "register_gpus", gpus, GpuProfile, problems)
    return Catalog(models=models, gpus=gpus, problems=problems)


def get_catalog(pm=None) -> Catalog:
    """The catalogue of ``pm`` (default: the process's plugin manager), cached on it.

    Rebuilt when a plugin is registered or unregistered.
    """
    from qplan.plugins.manager import get_plugin_manager

    if pm is None:
        pm = get_plugin_manager()
    gen = getattr(pm, "generation", None)
    cached = getattr(pm, "_qplan_catalog", None)
    if gen is not None and cached is not None and cached[0] == gen:
        return cached[1]
    cat = build_catalog(pm)
    if gen is not None:
        pm._qplan_catalog = (gen, cat)
    return cat


def cached_problems(pm) -> list[PluginProblem]:
    """Catalogue problems of ``pm``'s cached catalogue (none if it was never built)."""
    cached = getattr(pm, "_qplan_catalog", None)
    return list(cached[1].problems) if cached else []
