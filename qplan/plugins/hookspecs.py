"""qplan's hook specifications (pluggy). Call hooks with keyword arguments only."""
from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("qplan")
hookimpl = pluggy.HookimplMarker("qplan")


@hookspec
def register_models(register):
    """Register additional models: call ``register(ModelProfile(...))`` for each."""


@hookspec
def register_gpus(register):
    """Register additional GPUs: call ``register(GpuProfile(...))`` for each."""


@hookspec
def adjust_memory(model, config, terms):
    """Add or change memory terms (a list of ``MemoryTerm``) in place for ``model``
    with ``config``. Return True if this plugin models the architecture (needed for MoE)."""


@hookspec
def plan_policy(model, gpu, config):
    """Return a changed ``TrainConfig``, False to veto ``config``, or None for no opinion."""


@hookspec(firstresult=True)
def on_out_of_memory(plan, model, gpu, attempt, error):
    """Propose the next ``TrainConfig`` after an out-of-memory error (first answer wins),
    or None to let the default policy choose."""


@hookspec
def register_commands(cli):
    """Add commands to the ``qplan`` click group."""
