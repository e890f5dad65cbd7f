"""qplan's hook specifications: what a plugin may implement.

A plugin is a module (or any object) with functions marked ``@hookimpl``; it is found
through the ``qplan`` entry-point group. An implementation may accept fewer arguments
than its spec, so qplan always calls hooks with keyword arguments. qplan calls each
implementation itself (see :mod:`qplan.plugins.calls`), so an error is reported with
the name of the plugin that raised it.

Hooks, by group:

* catalogue: :func:`register_models`, :func:`register_gpus`
* planning: :func:`adjust_memory`, :func:`plan_policy`
* running: :func:`on_out_of_memory`
* command line: :func:`register_commands`

The guide for plugin authors is ``docs/plugins.md``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:  # only for annotations: importing these is cheap, but keep hookspecs light
    import click

    from qplan.planner.config import TrainConfig
    from qplan.planner.memory import MemoryTerm
    from qplan.planner.plan import Plan
    from qplan.profiles.gpus import GpuProfile
    from qplan.profiles.models import ModelProfile

hookspec = pluggy.HookspecMarker("qplan")
hookimpl = pluggy.HookimplMarker("qplan")


# --- catalogue ---------------------------------------------------------------------------
@hookspec
def register_models(register: Callable[["ModelProfile"], None]) -> None:
    """Add models to the catalogue.

    Receives ``register``: call ``register(ModelProfile(...))`` once per model. The host
    sets the entry's ``provider`` to the plugin's name and checks names and aliases: a name
    or alias that another plugin (or qplan) already registered raises
    :class:`~qplan.errors.PluginError` naming both. If the hook raises, none of this
    plugin's models are added and the error is reported with the plugin's name.
    Returns nothing.
    """


@hookspec
def register_gpus(register: Callable[["GpuProfile"], None]) -> None:
    """Add GPUs to the catalogue.

    Receives ``register``: call ``register(GpuProfile(...))`` once per GPU. Names, aliases,
    collisions and errors are handled as for :func:`register_models`. Returns nothing.
    """


# --- planning ----------------------------------------------------------------------------
@hookspec
def adjust_memory(model: "ModelProfile", config: "TrainConfig",
                  terms: list["MemoryTerm"]) -> bool | None:
    """Add or change memory terms for ``model`` trained with ``config``.

    Receives the model, the configuration, and ``terms``: the core's list of
    :class:`~qplan.planner.memory.MemoryTerm` (base weights, adapters, activations, ...).
    May change ``terms`` in place: append a term, or replace one
    (``terms[i] = MemoryTerm(...)``); terms are frozen, so build new ones. Every item must
    stay a ``MemoryTerm``. Called for every estimate, so keep it fast and return early for
    models the plugin does not know.

    Returns True when this plugin models the architecture. The core refuses mixtures of
    experts (:class:`~qplan.errors.NotModelledError`) unless some plugin returned True.
    None or False: no claim.
    """


@hookspec
def plan_policy(model: "ModelProfile", gpu: "GpuProfile",
                config: "TrainConfig") -> "TrainConfig | bool | None":
    """Adjust or veto a candidate configuration while qplan searches for a plan.

    Receives the model, the GPU, and one candidate ``config`` (already changed by the
    policies called before this one). May not change ``config`` (it is frozen).

    Returns a changed :class:`~qplan.planner.config.TrainConfig`
    (``config.with_(lora_rank=32)``) to use instead, ``False`` to veto the candidate, or
    ``None`` for no opinion. Policies are chained: each sees the previous one's result; a
    veto ends the chain. Anything else is an error reported with the plugin's name.
    """


# --- running -----------------------------------------------------------------------------
@hookspec(firstresult=True)
def on_out_of_memory(plan: "Plan", model: "ModelProfile", gpu: "GpuProfile", attempt: int,
                     error: BaseException) -> "TrainConfig | None":
    """Propose the configuration to try after a run ran out of device memory.

    Receives the ``plan`` that failed (its ``config`` is what ran), the model, the GPU,
    ``attempt`` (1 for the first out-of-memory error of this run) and the ``error``
    raised. Must not change them.

    Returns the next :class:`~qplan.planner.config.TrainConfig` to try; the first plugin
    to return one wins. None lets the next plugin, and finally qplan's own ladder
    (:func:`qplan.api.next_safer_config`), choose.
    """


# --- command line ------------------------------------------------------------------------
@hookspec
def register_commands(cli: "click.Group") -> None:
    """Add commands to the ``qplan`` command group.

    Receives the :class:`click.Group`; use ``@cli.command()`` or ``cli.add_command``.
    Replacing an existing command is refused and reported. If the hook raises, the
    error is reported with the plugin's name and the other commands still work.
    Returns nothing.
    """
