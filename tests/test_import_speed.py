"""Planning never imports the training stack, and ``qplan suggest`` answers quickly.

``python -X importtime`` lists every module a process imports; none of them may be torch,
transformers, bitsandbytes, peft (or their helpers accelerate / trl).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

HEAVY = ("torch", "transformers", "bitsandbytes", "peft", "accelerate", "trl")
SUGGEST = ["-m", "qplan", "suggest", "--model", "llama-3.1-8b", "--gpu", "rtx-4060", "--json"]


def _env() -> dict[str, str]:
    # Only qplan's own plugins: a third-party plugin's imports are not qplan's.
    return {**os.environ, "QPLAN_LOAD_PLUGINS": ""}


def imported_modules(args: list[str]) -> tuple[set[str], subprocess.CompletedProcess]:
    p = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True,
                       text=True, env=_env(), timeout=60)
    mods = set()
    for line in p.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "package":  # the header line
                mods.add(name)
    return mods, p


def heavy(mods: set[str]) -> list[str]:
    return sorted(m for m in mods if m.split(".")[0] in HEAVY)


def test_importtime_parser_sees_imports():
    mods, _ = imported_modules(["-c", "import json"])
    assert "json" in mods  # the check below would pass vacuously otherwise


def test_import_cli_imports_no_training_stack():
    mods, p = imported_modules(["-c", "import qplan.cli"])
    assert p.returncode == 0, p.stderr[-2000:]
    assert "qplan.cli" in mods
    assert heavy(mods) == []


def test_suggest_imports_no_training_stack():
    mods, p = imported_modules(SUGGEST)
    assert p.returncode in (0, 3), p.stderr[-2000:]
    assert "qplan.api" in mods and "qplan.planner.search" in mods
    assert heavy(mods) == []


@pytest.mark.parametrize("args", [SUGGEST, SUGGEST[:-1]], ids=["json", "text"])
def test_suggest_answers_quickly(args):
    # The interpreter's own start is included; the work itself is well under a second.
    best = float("inf")
    for _ in range(2):  # the first run may pay for a cold disk cache
        t = time.perf_counter()
        p = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                           env=_env(), timeout=60)
        best = min(best, time.perf_counter() - t)
        assert p.returncode in (0, 3), p.stderr[-2000:]
        assert "Traceback" not in p.stderr
    assert best < 2.0, f"qplan suggest took {best:.2f} s"
