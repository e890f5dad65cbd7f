"""Fault injection for the runner, switched on by an environment variable (like etcd's
failpoints), so that out-of-memory recovery, kills and interrupts can be tested on CPU.

``QPLAN_FAILPOINTS`` holds one or more failpoints separated by ``;``::

    ACTION@key=value,key=value

Actions:

* ``oom``: raise ``torch.cuda.OutOfMemoryError`` (constructible without a GPU).
* ``kill``: the training process sends itself SIGKILL (what the host's OOM killer does).
* ``sigterm``: the training process sends itself SIGTERM (what ``kill PID`` or a batch
  scheduler does): it finishes the step, saves a checkpoint and exits.
* ``hang``: the training process sleeps (10 minutes) right there, so that a test can kill
  ``qplan run`` (or send signals) at an exact point.

Keys (all optional; a missing key matches anything):

* ``attempt``: the attempt number (1 = first training process of the run; attempt
  numbers continue across ``--resume``).
* ``step``: the optimizer step (1-based) during which it fires.
* ``rank``: the data-parallel rank (``qplan run --gpus N``; 0 is the only rank otherwise).
* ``phase``: ``train`` (default: at the first micro-batch of ``step``), ``eval`` (at the
  first evaluation batch after ``step`` was done), or ``save`` (while the checkpoint of
  ``step`` is written: after its files were renamed into place, before its COMPLETE
  marker; a ``kill`` there leaves a half-written checkpoint), ``load`` (after the
  model is loaded and prepared, before training; ``step`` is 0 there), or ``end`` (after
  the last step, before the adapter is saved; ``step`` is the last step).

Examples: ``oom@attempt=1,step=3``, ``kill@attempt=1,step=4``,
``kill@step=4,phase=save;oom@attempt=2,step=6``.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass

from qplan.errors import BadInputError

ENV = "QPLAN_FAILPOINTS"
ACTIONS = ("oom", "kill", "sigterm", "hang")
HANG_S = 600  # long enough for a test to do something to the run meanwhile
PHASES = ("train", "eval", "save", "load", "end")
KEYS = ("attempt", "step", "phase", "rank")


@dataclass(frozen=True)
class Failpoint:
    action: str
    attempt: int | None = None
    step: int | None = None
    phase: str = "train"
    rank: int | None = None

    def matches(self, *, phase: str, attempt: int, step: int, rank: int = 0) -> bool:
        return (self.phase == phase and (self.attempt is None or self.attempt == attempt)
                and (self.step is None or self.step == step)
                and (self.rank is None or self.rank == rank))


def parse(spec: str) -> tuple[Failpoint, ...]:
    """Failpoints from ``spec`` (the variable's value); BadInputError naming what is wrong."""
    out = []
    for part in (p.strip() for p in spec.split(";")):
        if not part:
            continue
        action, _, args = part.partition("@")
        action = action.strip()
        if action not in ACTIONS:
            raise BadInputError(f"{ENV}: unknown action {action!r} in {part!r}; "
                                f"use one of {', '.join(ACTIONS)}")
        kw: dict = {}
        for item in (a.strip() for a in args.split(",") if a.strip()):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or key not in KEYS:
                raise BadInputError(f"{ENV}: bad key {item!r} in {part!r}; "
                                    f"use key=value with keys {', '.join(KEYS)}")
            if key == "phase":
                if value not in PHASES:
                    raise BadInputError(f"{ENV}: phase {value!r} in {part!r} is not one of "
                                        f"{', '.join(PHASES)}")
                kw[key] = value
            else:
                try:
                    kw[key] = int(value)
                except ValueError:
                    raise BadInputError(f"{ENV}: {key} must be an integer in {part!r}") from None
        out.append(Failpoint(action, **kw))
    return tuple(out)


def from_env(environ=None) -> tuple[Failpoint, ...]:
    return parse((environ if environ is not None else os.environ).get(ENV, ""))


class Failpoints:
    """The failpoints of one attempt; :meth:`fire` is called at each instrumented place."""

    def __init__(self, points: tuple[Failpoint, ...], attempt: int, rank: int = 0):
        self.points = points
        self.attempt = attempt
        self.rank = rank

    def fire(self, phase: str, step: int) -> None:
        for fp in self.points:
            if not fp.matches(phase=phase, attempt=self.attempt, step=step, rank=self.rank):
                continue
            where = f"{phase} of step {step}, attempt {self.attempt}" + (
                f", rank {self.rank}" if self.rank else "")
            if fp.action == "oom":
                import torch

                raise torch.cuda.OutOfMemoryError(
                    f"CUDA out of memory (injected by {ENV} at {where})")
            if fp.action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if fp.action == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            if fp.action == "hang":
                print(f"{ENV}: hanging at {where}", file=sys.stderr, flush=True)
                time.sleep(HANG_S)
