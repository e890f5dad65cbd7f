"""Calling hooks one implementation at a time, so that every error names its plugin.

pluggy's ``pm.hook.name(...)`` runs every implementation and lets an exception escape
without saying whose it was. qplan calls each implementation here instead, in pluggy's
order (plugins registered later first; ``tryfirst``/``trylast`` respected), and wraps a
failure in :class:`~qplan.errors.PluginError` naming the plugin and the hook.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import pluggy

from qplan.errors import PluginError


def implementations(pm: pluggy.PluginManager, hook: str, *, call_order: bool = True
                    ) -> Iterator[tuple[str, Callable[..., Any]]]:
    """``(plugin name, call)`` for each implementation of ``hook``.

    ``call(**kwargs)`` passes only the arguments the implementation accepts and does not
    catch errors. ``call_order=False`` gives registration order (built-ins first).
    """
    impls = getattr(pm.hook, hook).get_hookimpls()
    for impl in (reversed(impls) if call_order else impls):
        def call(_impl=impl, **kwargs: Any) -> Any:
            return _impl.function(*[kwargs[a] for a in _impl.argnames])
        yield impl.plugin_name, call


def failure(plugin: str, hook: str, e: BaseException) -> PluginError:
    """The :class:`PluginError` for ``plugin`` raising ``e`` in ``hook``."""
    if isinstance(e, PluginError) and plugin in str(e):
        return e
    text = " ".join(str(e).split())
    return PluginError(f"plugin {plugin!r} failed in {hook}: {type(e).__name__}: {text}")


def call_each(pm: pluggy.PluginManager, hook: str, **kwargs: Any) -> Iterator[tuple[str, Any]]:
    """``(plugin name, result)`` per implementation; an exception becomes a PluginError."""
    for name, call in implementations(pm, hook):
        try:
            res = call(**kwargs)
        except Exception as e:  # noqa: BLE001 - any error inside a plugin is the plugin's
            raise failure(name, hook, e) from e
        yield name, res


def adjust_memory(pm: pluggy.PluginManager, model, config, terms: list) -> bool:
    """Run every ``adjust_memory`` on ``terms`` (in place); True if any plugin claimed the model."""
    from qplan.planner.memory import MemoryTerm

    handled = False
    for name, res in call_each(pm, "adjust_memory", model=model, config=config, terms=terms):
        bad = [t for t in terms if not isinstance(t, MemoryTerm)]
        if bad:
            raise PluginError(f"plugin {name!r} failed in adjust_memory: it put a "
                              f"{type(bad[0]).__name__} in the terms; every item must be a MemoryTerm")
        handled = handled or res is True
    return handled


def apply_plan_policies(pm: pluggy.PluginManager, model, gpu, config, trace=None):
    """The candidate after every ``plan_policy``: a TrainConfig, or None if one vetoed it.

    Each policy sees the previous one's result. ``trace``, a list, receives
    ``(plugin name, {field: (old, new)})`` for every policy that changed something.
    """
    from qplan.planner.config import TrainConfig

    for name, call in implementations(pm, "plan_policy"):
        try:
            res = call(model=model, gpu=gpu, config=config)
        except Exception as e:  # noqa: BLE001
            raise failure(name, "plan_policy", e) from e
        if res is False:
            return None
        if isinstance(res, TrainConfig):
            if trace is not None and res != config:
                old, new = config.to_dict(), res.to_dict()
                trace.append((name, {k: (old[k], new[k]) for k in new if old[k] != new[k]}))
            config = res
        elif res is not None:
            raise PluginError(f"plugin {name!r} failed in plan_policy: returned "
                              f"{type(res).__name__}; return a TrainConfig, False or None")
    return config


def propose_after_oom(pm: pluggy.PluginManager, *, plan, model, gpu, attempt: int,
                      error: BaseException):
    """The first ``on_out_of_memory`` proposal as ``(TrainConfig, plugin name)``, or None."""
    from qplan.planner.config import TrainConfig

    for name, res in call_each(pm, "on_out_of_memory", plan=plan, model=model, gpu=gpu,
                               attempt=attempt, error=error):
        if res is None:
            continue
        if not isinstance(res, TrainConfig):
            raise PluginError(f"plugin {name!r} failed in on_out_of_memory: returned "
                              f"{type(res).__name__}; return a TrainConfig or None")
        return res, name
    return None
