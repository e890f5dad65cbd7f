"""Checks that a path the user named can be written, made before any work starts.

Each check tries what it needs (a probe file in the folder that would be written), so a
read-only file system, a folder without permission or a path through a file is found
even where ``os.access`` says yes (it does for root). Nothing is left behind.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from qplan.errors import BadInputError


def _existing_ancestor(p: Path) -> Path:
    for a in (p, *p.parents):
        if a.exists():
            return a
    return Path(".")


def _probe(folder: Path, flag: str, target: Path) -> None:
    """Raise BadInputError unless a file can be created (and removed) in ``folder``."""
    try:
        fd, name = tempfile.mkstemp(prefix=".qplan-probe-", dir=folder)
    except OSError as e:
        raise BadInputError(f"{flag} {str(target)!r}: cannot write in {str(folder)!r} "
                            f"({e.strerror or e}); choose a folder you can write") from None
    os.close(fd)
    os.unlink(name)


def _check_ancestor(p: Path, flag: str) -> None:
    """The nearest existing ancestor of a path to be created must be a writable folder."""
    a = _existing_ancestor(p.parent if p.parent != p else p)
    if not a.is_dir():
        raise BadInputError(f"{flag} {str(p)!r}: {str(a)!r} is a file, not a folder; "
                            "choose a path under a folder")
    _probe(a, flag, p)


def writable_file(path: str | Path, flag: str) -> Path:
    """``path`` can be written as a file (it may exist; its folders may be created)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise BadInputError(f"{flag} {str(p)!r} is a directory; give a file name such as "
                            f"{str(p / 'plan.yaml')!r}")
    if p.exists():
        _probe(p.parent, flag, p)
    else:
        _check_ancestor(p, flag)
    return p


def writable_folder(path: str | Path, flag: str, *, empty: bool = True) -> Path:
    """``path`` is a folder that can be created or written (and, if ``empty``, holds
    nothing yet)."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise BadInputError(f"{flag} {str(p)!r} is a file; give a folder (it is created "
                            "if it does not exist)")
    if p.is_dir():
        if empty and any(p.iterdir()):
            raise BadInputError(f"{flag} {str(p)!r} exists and is not empty; choose another "
                                "folder")
        _probe(p, flag, p)
    else:
        _check_ancestor(p, flag)
    return p
