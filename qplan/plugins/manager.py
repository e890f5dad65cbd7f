"""The plugin manager: built by a factory, never at import time.

:func:`make_plugin_manager` registers qplan's built-in plugins (``DEFAULT_PLUGINS``)
and then the ``qplan`` entry points, limited by ``QPLAN_LOAD_PLUGINS``:

* unset: every installed plugin;
* empty (``QPLAN_LOAD_PLUGINS=``): none, only the built-ins;
* ``a,b``: only the plugins whose entry-point or distribution name is listed.

A plugin that fails to load (import error, bad hook signature, misspelled hook) is left
out and recorded in ``pm.problems`` with its name; the others load. :func:`get_plugin_manager`
is the process's manager, made on first use; tests call :func:`reset_plugin_manager`.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable

import pluggy

from qplan.errors import PluginError
from qplan.plugins import hookspecs

ENTRY_POINT_GROUP = "qplan"
LOAD_ENV = "QPLAN_LOAD_PLUGINS"
# qplan's own plugins, registered through the same hooks as third-party ones.
# Plugin name -> module.
DEFAULT_PLUGINS = {"qplan": "qplan.plugins.builtin"}

HOOK_NAMES = tuple(n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), "qplan_spec"))


@dataclass(frozen=True)
class PluginProblem:
    """A plugin that failed: at ``where`` (``"load"`` or a hook name), with ``message``."""

    plugin: str
    where: str
    message: str

    def __str__(self) -> str:
        at = "failed to load" if self.where == "load" else f"failed in {self.where}"
        return f"plugin {self.plugin!r} {at}: {self.message}"

    def to_dict(self) -> dict[str, str]:
        return {"plugin": self.plugin, "where": self.where, "message": self.message}


@dataclass(frozen=True)
class PluginInfo:
    """One loaded plugin, as ``qplan plugins`` shows it."""

    name: str
    version: str
    distribution: str  # "qplan" for built-ins
    builtin: bool
    hooks: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "distribution": self.distribution,
                "builtin": self.builtin, "hooks": list(self.hooks)}


class QplanPluginManager(pluggy.PluginManager):
    """A pluggy manager with qplan's hook specs, load problems and plugin versions.

    ``generation`` changes whenever a plugin is registered or unregistered, so caches
    built from the plugins (the catalogue) know when to rebuild.
    """

    def __init__(self) -> None:
        super().__init__("qplan")
        self.add_hookspecs(hookspecs)
        self.problems: list[PluginProblem] = []
        self.generation = 0
        self._dists: dict[str, importlib.metadata.Distribution] = {}

    def register(self, plugin: Any, name: str | None = None) -> str | None:
        out = super().register(plugin, name)
        self.generation += 1
        return out

    def unregister(self, plugin: Any = None, name: str | None = None) -> Any:
        out = super().unregister(plugin, name)
        self._dists = {n: d for n, d in self._dists.items() if self.has_plugin(n)}
        self.generation += 1
        return out

    def add_plugin(self, plugin: Any, name: str, *,
                   distribution: importlib.metadata.Distribution | None = None) -> None:
        """Register ``plugin`` as ``name`` and check it; :class:`PluginError` if it is wrong.

        Wrong means: a hook with arguments its spec does not have, a hook name qplan does
        not define (a misspelling), a hook function not marked ``@hookimpl``, or a hook
        wrapper. A plugin that fails is not left registered.
        """
        if self.has_plugin(name):
            raise PluginError(f"plugin name {name!r} is already taken by "
                              f"{self.describe(name)}; rename the entry point")
        try:
            self.register(plugin, name=name)
        except pluggy.PluginValidationError as e:
            raise PluginError(f"plugin {name!r}: {_one_line(e)}") from None
        try:
            check_plugin(self, plugin, name)
        except PluginError:
            self.unregister(plugin)
            raise
        if distribution is not None:
            self._dists[name] = distribution

    def describe(self, name: str) -> str:
        """``"example (qplan-plugin-example 0.1.0)"``, or ``"qplan (built-in)"``."""
        d = self._dists.get(name)
        if d is not None:
            return f"{name} ({d.metadata['Name']} {d.version})"
        return f"{name} (built-in)" if name in DEFAULT_PLUGINS else name

    def plugin_infos(self) -> list[PluginInfo]:
        """Every registered plugin with its version and the hooks it implements."""
        from qplan import __version__

        out = []
        for name, plugin in self.list_name_plugin():
            if plugin is None:  # blocked
                continue
            hooks = tuple(sorted(h.name for h in self.get_hookcallers(plugin) or ()))
            d = self._dists.get(name)
            if d is not None:
                out.append(PluginInfo(name, d.version, d.metadata["Name"], False, hooks))
            elif name in DEFAULT_PLUGINS:
                out.append(PluginInfo(name, __version__, "qplan", True, hooks))
            else:  # registered directly (tests, scripts): the module's __version__ if any
                out.append(PluginInfo(name, str(getattr(plugin, "__version__", "")), "", False,
                                      hooks))
        return out


def check_plugin(pm: pluggy.PluginManager, plugin: Any, name: str) -> None:
    """:class:`PluginError` if ``plugin`` implements a hook qplan does not define, has a
    hook-named function without ``@hookimpl``, or uses a hook wrapper."""
    for attr in HOOK_NAMES:
        fn = getattr(plugin, attr, None)
        if callable(fn) and not hasattr(fn, "qplan_impl"):
            raise PluginError(
                f"plugin {name!r}: {attr}() is not marked as a hook implementation; "
                "decorate it with @hookimpl (from qplan.plugins import hookimpl)")
    for caller in pm.get_hookcallers(plugin) or ():
        for impl in caller.get_hookimpls():
            if impl.plugin is not plugin:
                continue
            if not caller.has_spec() and not impl.optionalhook:
                close = difflib.get_close_matches(caller.name, HOOK_NAMES, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise PluginError(
                    f"plugin {name!r} implements unknown hook {caller.name!r}{hint}; "
                    f"qplan's hooks are {', '.join(HOOK_NAMES)}")
            if impl.wrapper or impl.hookwrapper:
                raise PluginError(f"plugin {name!r}: {caller.name} is a hook wrapper; qplan "
                                  "calls each implementation itself and does not support wrappers")


def _norm(name: str) -> str:
    """Distribution names compare like pip does: case-insensitive, ``-``/``_``/``.`` equal."""
    return re.sub(r"[-_.]+", "-", name).strip().lower()


def selected_plugins(environ: dict[str, str] | None = None) -> set[str] | None:
    """The names ``QPLAN_LOAD_PLUGINS`` allows (normalized), or None for every plugin."""
    raw = (os.environ if environ is None else environ).get(LOAD_ENV)
    if raw is None:
        return None
    return {_norm(n) for n in raw.split(",") if n.strip()}


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if not isinstance(e, (PluginError,
                                                               pluggy.PluginValidationError)) else text


def load_entrypoints(pm: QplanPluginManager, only: set[str] | None = None) -> int:
    """Load the ``qplan`` entry points (only those named in ``only``, if given).

    Failures are recorded in ``pm.problems``, never raised. Returns how many loaded.
    """
    count, matched = 0, set()
    seen: set[tuple[str, str]] = set()
    for dist in list(importlib.metadata.distributions()):
        for ep in dist.entry_points:
            if ep.group != ENTRY_POINT_GROUP:
                continue
            dname = dist.metadata["Name"] or ""
            if only is not None:
                hit = {_norm(ep.name), _norm(dname)} & only
                if not hit:
                    continue
                matched |= hit
            if (ep.name, dname) in seen:  # the same distribution found twice on sys.path
                continue
            seen.add((ep.name, dname))
            try:
                plugin = ep.load()
            except Exception as e:  # noqa: BLE001 - any import error is the plugin's
                pm.problems.append(PluginProblem(ep.name, "load", _one_line(e)))
                continue
            try:
                pm.add_plugin(plugin, ep.name, distribution=dist)
            except PluginError as e:
                pm.problems.append(PluginProblem(ep.name, "load", _one_line(e)))
                continue
            count += 1
    for missing in sorted((only or set()) - matched):
        installed = sorted({ep.name for d in importlib.metadata.distributions()
                            for ep in d.entry_points if ep.group == ENTRY_POINT_GROUP})
        pm.problems.append(PluginProblem(
            missing, "load", f"{LOAD_ENV} names {missing!r}, which is not installed; "
            f"installed plugins: {', '.join(installed) or 'none'}"))
    return count


def make_plugin_manager(*, entry_points: bool = True, only: Iterable[str] | None = None,
                        plugins: dict[str, Any] | None = None) -> QplanPluginManager:
    """A new plugin manager with the built-ins, then the installed plugins.

    ``only`` limits the entry points that load (names as in ``QPLAN_LOAD_PLUGINS``; default:
    that variable). ``plugins`` registers more plugins by name (tests, scripts); those are
    checked like entry points but a wrong one raises :class:`PluginError`.
    """
    pm = QplanPluginManager()
    for name, mod in DEFAULT_PLUGINS.items():
        pm.add_plugin(importlib.import_module(mod), name)
    if entry_points:
        sel = selected_plugins() if only is None else {_norm(n) for n in only}
        if sel is None or sel:
            load_entrypoints(pm, sel)
    for name, plugin in (plugins or {}).items():
        pm.add_plugin(plugin, name)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:  # every plugin was checked; kept as a backstop
        raise PluginError(_one_line(e)) from None
    return pm


_cached: QplanPluginManager | None = None


def get_plugin_manager() -> QplanPluginManager:
    """The process's plugin manager, made on first use."""
    global _cached
    if _cached is None:
        _cached = make_plugin_manager()
    return _cached


def reset_plugin_manager() -> None:
    """Forget the process's plugin manager (and the catalogue cached on it)."""
    global _cached
    _cached = None


def plugin_name(pm: pluggy.PluginManager, plugin: Any) -> str:
    return pm.get_name(plugin) or getattr(plugin, "__name__", repr(plugin))
