"""The README's example outputs are what the commands print today (its "..." lines stand for
lines left out). Widths as on a 100-column terminal."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from qplan.cli import cli

README = Path(__file__).parent.parent / "README.md"
EXAMPLE = re.compile(r"```\n\$ (qplan [^\n]*)\n(.*?)```", re.S)


def examples() -> list[tuple[str, str]]:
    return EXAMPLE.findall(README.read_text())


def test_the_readme_has_planning_examples():
    assert [c.split()[1] for c, _ in examples()] == ["suggest", "estimate"]


@pytest.mark.parametrize("command, shown", examples(), ids=[c.split()[1] for c, _ in examples()])
def test_readme_example_is_real_output(command, shown, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    r = CliRunner().invoke(cli, shlex.split(command)[1:])
    got = [line.rstrip() for line in r.output.splitlines()]
    missing = [line for line in shown.splitlines() if line != "..." and line.rstrip() not in got]
    assert not missing, ("README lines the command no longer prints (regenerate the example "
                         "with COLUMNS=100):\n" + "\n".join(missing))
