"""qplan's plugin system (pluggy). A plugin marks its hook functions with :data:`hookimpl`.

See ``docs/plugins.md`` and :mod:`qplan.plugins.hookspecs`.
"""
from qplan.plugins.hookspecs import hookimpl, hookspec

__all__ = ["hookimpl", "hookspec"]
