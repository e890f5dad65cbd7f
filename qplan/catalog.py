"""The catalogues of models and GPUs, filled through the plugin hooks.

Built-in entries are registered by :mod:`qplan.plugins.builtin` through the same
``register_models`` / ``register_gpus`` hooks a third-party plugin uses.
"""
from __future__ import annotations

from dataclasses import dataclass

from qplan.errors import UnknownGpuError, UnknownModelError
from qplan.profiles.gpus import GpuProfile
from qplan.profiles.models import ModelProfile
from qplan.profiles.registry import Registry


@dataclass
class Catalog:
    models: Registry[ModelProfile]
    gpus: Registry[GpuProfile]


def _unknown_model(models: Registry) -> "callable":
    def make(name: str) -> Exception:
        close = models.closest(name)
        hint = f" Closest: {', '.join(close)}." if close else ""
        return UnknownModelError(
            f"unknown model {name!r}.{hint} See `qplan models` for the catalogue, or pass a "
            "local model directory, a config.json, or a Hugging Face hub id.")
    return make


def _unknown_gpu(gpus: Registry) -> "callable":
    def make(name: str) -> Exception:
        close = gpus.closest(name)
        hint = f" Closest: {', '.join(close)}." if close else ""
        return UnknownGpuError(
            f"unknown GPU {name!r}.{hint} See `qplan gpus`, or give a memory size "
            "such as --gpu 8GB or --vram 8.")
    return make


def build_catalog(pm=None) -> Catalog:
    """Ask every loaded plugin (built-ins included) to register its models and GPUs."""
    from qplan.plugins.manager import get_plugin_manager, plugin_name

    if pm is None:
        pm = get_plugin_manager()
    models: Registry[ModelProfile] = Registry("model", lambda n: UnknownModelError(n))
    gpus: Registry[GpuProfile] = Registry("GPU", lambda n: UnknownGpuError(n))
    models._not_found = _unknown_model(models)
    gpus._not_found = _unknown_gpu(gpus)
    for impl in pm.hook.register_models.get_hookimpls():
        name = plugin_name(pm, impl.plugin)
        impl.function(register=lambda m, _n=name: models.register(m, provider=_n))
    for impl in pm.hook.register_gpus.get_hookimpls():
        name = plugin_name(pm, impl.plugin)
        impl.function(register=lambda g, _n=name: gpus.register(g, provider=_n))
    return Catalog(models=models, gpus=gpus)
