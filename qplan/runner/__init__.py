"""Training with a plan: ``qplan run`` and ``qplan merge`` as a library.

``run(RunRequest(...)) -> RunReport`` plans, trains in child processes, recovers from
out-of-memory errors and reports; ``merge(adapter, output)`` merges an adapter into its
base. Importing this package is cheap: torch loads in the training process only.
"""
from __future__ import annotations

__all__ = ["run", "merge", "RunRequest", "RunReport", "AttemptReport", "AttemptSpec",
           "AttemptResult", "Measured"]


def __getattr__(name: str):
    if name == "run":
        from qplan.runner.run import run

        return run
    if name == "merge":
        from qplan.runner.merge import merge

        return merge
    if name in ("RunRequest", "RunReport", "AttemptReport"):
        from qplan.runner import types

        return getattr(types, name)
    if name in ("AttemptSpec", "AttemptResult", "Measured"):
        from qplan.runner import protocol

        return getattr(protocol, name)
    raise AttributeError(name)
