"""The README's example outputs are what the commands print today (its "..." lines stand for
lines left out). Widths as on a 100-column terminal. A block may hold several commands (``$ ``
lines), run in order in one scratch folder, as a user would type them; paths into ``tests/``
resolve to this checkout, files the commands write land in the scratch folder."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
_spec = importlib.util.spec_from_file_location("readme_examples", ROOT / "tools" / "readme_examples.py")
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)


def blocks() -> list[list[tuple[str, list[str]]]]:
    """Each example block as [(command, lines shown after it), ...]."""
    return tool.blocks(README.read_text())


def _id(steps) -> str:
    return "+".join(c.split()[1] for c, _ in steps)


def test_the_readme_has_planning_examples():
    firsts = [steps[0][0].split()[1] for steps in blocks()]
    assert firsts[:2] == ["suggest", "estimate"]
    assert {"check", "export", "plot"} <= {c.split()[1] for s in blocks() for c, _ in s}


def test_block_parser_reads_multi_command_blocks():
    steps = [s for s in blocks() if len(s) > 1]
    assert steps, "the export example has several commands in one block"
    assert all(c.startswith("qplan ") for s in steps for c, _ in s)


@pytest.mark.parametrize("steps", blocks(), ids=[_id(s) for s in blocks()])
def test_readme_example_is_real_output(steps, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    with tool.scratch():
        for command, shown in steps:
            code, got = tool.run(command)
            missing = [line for line in shown if line != "..." and line.rstrip() not in got]
            assert not missing, (f"README lines `{command}` no longer prints (regenerate the example "
                                 "with COLUMNS=100):\n" + "\n".join(missing))
            assert code in (0, 3), f"`{command}` failed ({code}):\n" + "\n".join(got)


def test_the_regenerator_keeps_windows_of_long_outputs():
    out = ["qplan estimate: m on g", "Settings", "│ x │", "│ saved activations │ 1 │", "peak 1"]
    assert tool.select("qplan estimate --model m", out) == [
        "qplan estimate: m on g", "...", "│ saved activations │ 1 │", "peak 1"]
    assert tool.select("qplan plot --model m", out) == out
