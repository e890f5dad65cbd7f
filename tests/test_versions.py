"""Version honesty: pyproject's floors for the training stack are exactly the versions CI's
lowest-versions run installs (.ci/lowest.txt), and what is installed here satisfies them."""
from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
FLOOR = re.compile(r"^([A-Za-z0-9_.-]+)>=([0-9.]+)")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def floors() -> dict[str, str]:
    if sys.version_info < (3, 11):
        pytest.skip("tomllib is Python 3.11+")
    import tomllib

    train = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["train"]
    return {_norm(m.group(1)): m.group(2) for m in map(FLOOR.match, train) if m}


def lowest() -> dict[str, str]:
    pins = {}
    for line in (ROOT / ".ci" / "lowest.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[_norm(name)] = version.strip()
    return pins


def _v(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def test_ci_tests_the_floors_pyproject_states():
    f, low = floors(), lowest()
    assert set(low) == set(f) - {"torch"}, "every floor but torch's is tested at its version"
    for name, pin in low.items():
        assert _v(pin) == _v(f[name]) + (0,) * (len(_v(pin)) - len(_v(f[name]))), name


def test_what_is_installed_satisfies_the_floors():
    for name, floor in floors().items():
        try:
            got = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # the core install plans without the training stack
        assert _v(got) >= _v(floor), f"{name} {got} is older than pyproject's floor {floor}"
