"""The run folder: its state (``run.json``), its lock, and the attempts recorded in it.

Everything ``--resume`` and the report need is rebuilt from what is on disk: the
attempts' own files (:mod:`qplan.runner.protocol`) and the checkpoints. Nothing is kept
only in memory, so a run whose ``qplan run`` process was killed at any point reports
every step exactly once when it is resumed.

The lock (``.lock``, an ``flock`` on the open file) is held by ``qplan run`` and
inherited by its training process, so the folder stays locked while either lives; the
kernel releases it when both are gone, so a lock left by a crash is never stale. The
file records the holder (pid, host, start, the training process) for the message that
refuses a second run.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qplan.errors import BadInputError
from qplan.planner.config import TrainConfig
from qplan.planner.plan import Reason
from qplan.runner import protocol as P
from qplan.runner.types import RunRequest

RUN_FILE = "run.json"
LOCK_FILE = ".lock"
ATTEMPTS = "attempts"
STATE_VERSION = 1


@dataclass
class RunState:
    """``run.json``: what the run is (its request, model, data) and where it stands."""

    request: RunRequest
    model: str
    model_path: str
    model_ref: str
    settings: TrainConfig  # the settings of the next attempt
    effective_batch: int
    total_steps: int
    save_steps: int
    eval_steps: int
    warmup_steps: int
    device: str
    device_name: str
    planned_for: str
    data: dict[str, Any]
    eval_rows: int = 0
    simulate: P.Simulation | None = None
    notes: list[str] = field(default_factory=list)
    next_change: Reason | None = None  # why ``settings`` changed after the last attempt
    version: int = STATE_VERSION


class RunFolderError(BadInputError):
    """A run folder that cannot be used: not a run, damaged, or in use."""


def read_state(run_dir: Path) -> RunState:
    path = run_dir / RUN_FILE
    if not path.is_file():
        why = (f"no {RUN_FILE} there, so it is not a run folder" if run_dir.is_dir()
               else "no such folder")
        raise RunFolderError(f"--resume {str(run_dir)!r}: {why}; give the --output folder of an "
                             "earlier `qplan run`")
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and data.get("version", STATE_VERSION) != STATE_VERSION:
            raise ValueError(f"version {data.get('version')!r}; this qplan reads version "
                             f"{STATE_VERSION}")
        req = data.get("request") if isinstance(data, dict) else None
        if isinstance(req, dict) and "gpus" in req:  # stop 16's run.json: --gpus was its own
            n = req.pop("gpus")
            if n not in (None, 1) and isinstance(req.get("overrides"), dict):
                req["overrides"]["gpus"] = n
        return P.from_dict(RunState, data, RUN_FILE)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError, TypeError,
            BadInputError) as e:
        raise RunFolderError(
            f"--resume {str(run_dir)!r}: {RUN_FILE} is damaged ({e}); the run cannot be "
            "resumed. Its checkpoints are in checkpoints/ and its data in data/; start a new "
            "run with --output elsewhere") from None


def write_state(run_dir: Path, state: RunState) -> None:
    P.write(run_dir / RUN_FILE, state)


# ---------------------------------------------------------------------------
# attempts on disk
@dataclass
class AttemptRecord:
    """One attempt as its files tell it."""

    spec: P.AttemptSpec
    result: P.AttemptResult | None  # None: the child was killed (it writes none then)
    exit: P.AttemptExit | None  # None: the parent stopped while the child ran
    steps: list[P.StepRecord]
    # with several data-parallel processes: each rank's own result (rank 0 first; None
    # where a rank wrote none), whichever rank's result the attempt took as its own
    ranks: list[P.AttemptResult | None] = field(default_factory=list)


def attempt_dir(run_dir: Path, n: int) -> Path:
    return run_dir / ATTEMPTS / str(n)


def _numbers(run_dir: Path) -> list[int]:
    root = run_dir / ATTEMPTS
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())


def next_attempt_number(run_dir: Path) -> int:
    """A number no attempt folder has used (folders are never reused)."""
    return max(_numbers(run_dir), default=0) + 1


def _optional(cls, path: Path):
    return P.read(cls, path) if path.exists() else None


def load_attempts(run_dir: Path) -> list[AttemptRecord]:
    """Every attempt that started (has an ``attempt.json``), in order."""
    out = []
    for n in _numbers(run_dir):
        d = attempt_dir(run_dir, n)
        if not (d / "attempt.json").is_file():
            continue  # the parent stopped before the attempt started: nothing ran
        spec = P.read(P.AttemptSpec, d / "attempt.json")
        result = _optional(P.AttemptResult, d / "result.json")
        ranks = []
        if spec.world_size > 1:
            own = d / "result.rank0.json"
            ranks = [_optional(P.AttemptResult, own) if own.exists() else result]
            ranks += [_optional(P.AttemptResult, d / f"rank{k}" / "result.json")
                      for k in range(1, spec.world_size)]
        out.append(AttemptRecord(spec=spec, result=result,
                                 exit=_optional(P.AttemptExit, d / "exit.json"),
                                 steps=P.read_steps(d / "steps.jsonl"), ranks=ranks))
    return out


# ---------------------------------------------------------------------------
# the lock
def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder_text(h: dict[str, Any]) -> str:
    who = f"pid {h.get('pid', '?')} on {h.get('host', '?')}"
    if h.get("since"):
        who += f", since {h['since']}"
    if h.get("child_pid"):
        who += f"; its training process is pid {h['child_pid']}"
    return who


class RunLock:
    """An exclusive lock on a run folder (see the module's docstring)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None
        self.stale: dict[str, Any] | None = None  # the record of a holder that died
        self.info: dict[str, Any] = {}

    def acquire(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read(fd)
            os.close(fd)
            raise RunFolderError(
                f"{self.path.parent} is in use by another `qplan run` ({_holder_text(holder)}); "
                "two runs must not write one folder. Wait for it to end, or stop it (kill "
                f"{holder.get('pid', 'PID')}: its training process stops with it)") from None
        old = self._read(fd)
        if old.get("pid") and old.get("pid") != os.getpid():
            self.stale = old  # its holder died: the kernel released the flock
        self.fd = fd
        self.update(pid=os.getpid(), host=socket.gethostname(), child_pid=None,
                    since=time.strftime("%Y-%m-%d %H:%M:%S"))
        return self

    @staticmethod
    def _read(fd: int) -> dict[str, Any]:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            data = json.loads(os.read(fd, 65536) or b"{}")
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def update(self, **info: Any) -> None:
        """Record who holds the lock (the training process's pid once it started)."""
        assert self.fd is not None
        self.info.update(info)
        data = json.dumps(self.info).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def release(self) -> None:
        """Unlock; the record is cleared, so a record found later means a holder died."""
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
            finally:
                os.close(self.fd)
                self.fd = None

    def stale_note(self) -> str | None:
        if not self.stale:
            return None
        state = "no longer running" if not _alive(self.stale.get("pid")) else "gone"
        return (f"the lock left by `qplan run` pid {self.stale.get('pid')} ({state}) was "
                "released when it ended; taking it over")

    def __enter__(self) -> "RunLock":
        return self if self.fd is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
