"""qplan's own catalogues, registered through the same hooks a plugin uses."""
from __future__ import annotations

from qplan.plugins.hookspecs import hookimpl


@hookimpl
def register_models(register):
    from qplan.profiles.model_catalog import builtin_models

    for m in builtin_models():
        register(m)


@hookimpl
def register_gpus(register):
    from qplan.profiles.gpu_catalog import builtin_gpus

    for g in builtin_gpus():
        register(g)
