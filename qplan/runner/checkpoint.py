"""Checkpoints that a crash can never leave half-trusted.

A checkpoint is written into a temporary folder (``.tmp-step-000004-<pid>``), every file
and the folder are fsync'ed, the folder is renamed to ``step-000004``, and only then is
the ``COMPLETE`` marker written (and fsync'ed). Resume trusts a checkpoint only if its
marker exists; anything else (a temporary folder, a renamed folder without marker) is
ignored, and removed when the run continues.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

COMPLETE = "COMPLETE"
STATE = "qplan_state.json"  # qplan's part of a checkpoint: step, settings, data order
PREFIX = "step-"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def name_for(step: int) -> str:
    return f"{PREFIX}{step:06d}"


def step_of(path: Path) -> int | None:
    if not path.name.startswith(PREFIX):
        return None
    try:
        return int(path.name[len(PREFIX):])
    except ValueError:
        return None


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file() and (path / STATE).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest step first."""
    if not root.is_dir():
        return []
    found = [(step_of(p), p) for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return [p for s, p in sorted(found) if is_complete(p)]


def latest(root: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    done = complete_checkpoints(root)
    return done[-1] if done else None


def read_state(path: Path) -> dict:
    return json.loads((path / STATE).read_text())


def write(root: Path, step: int, fill: Callable[[Path], None], state: dict,
          before_marker: Callable[[], None] | None = None) -> Path:
    """Write the checkpoint of ``step``: ``fill(tmp_dir)`` writes the files, ``state`` goes
    to ``qplan_state.json``; then fsync, rename, marker. ``before_marker`` runs between
    the rename and the marker (the ``phase=save`` failpoint)."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / name_for(step)
    if is_complete(final):
        return final
    tmp = root / f".tmp-{name_for(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    fill(tmp)
    (tmp / STATE).write_text(json.dumps(state, indent=1))
    fsync_tree(tmp)
    if final.exists():  # an incomplete leftover of the same step
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    if before_marker is not None:
        before_marker()
    with open(final / COMPLETE, "w") as f:
        f.write(f"step {step}\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(final)
    return final


def remove_incomplete(root: Path) -> list[str]:
    """Delete temporary and unmarked checkpoint folders; their names."""
    gone = []
    if not root.is_dir():
        return gone
    for p in root.iterdir():
        if p.is_dir() and (p.name.startswith(".tmp-") or (step_of(p) is not None and not is_complete(p))):
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p.name)
    return gone


def rotate(root: Path, keep: int) -> None:
    """Keep the ``keep`` newest complete checkpoints."""
    done = complete_checkpoints(root)
    for p in done[:-keep] if keep > 0 else []:
        (p / COMPLETE).unlink(missing_ok=True)  # unmark first: never trusted half-deleted
        shutil.rmtree(p, ignore_errors=True)
