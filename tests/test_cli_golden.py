"""Golden ``--json`` outputs of ``qplan suggest`` / ``qplan estimate`` for a few model x GPU pairs.

The memory and speed models are still being calibrated, so these files change whenever a
coefficient does. After a deliberate change to the model, regenerate them and review the diff:

    QPLAN_UPDATE_GOLDEN=1 pytest tests/test_cli_golden.py
    git diff tests/golden/

Each file holds the command, its exit code and its JSON output.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from qplan.cli import cli

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("QPLAN_UPDATE_GOLDEN") == "1"
REGENERATE = "QPLAN_UPDATE_GOLDEN=1 pytest tests/test_cli_golden.py"

CASES: dict[str, list[str]] = {
    "suggest-llama-3.1-8b-rtx-4060-seq1024":
        ["suggest", "--model", "llama-3.1-8b", "--gpu", "rtx-4060", "--seq", "1024"],
    "suggest-llama-3.2-1b-rtx-4090":
        ["suggest", "--model", "llama-3.2-1b", "--gpu", "rtx-4090"],
    "suggest-qwen2.5-7b-a100-80gb-sxm-data":
        ["suggest", "--model", "qwen2.5-7b", "--gpu", "a100-80gb-sxm", "--seq", "4096",
         "--tokens", "50000000", "--epochs", "2"],
    "suggest-phi-3.5-mini-l4-fixed":
        ["suggest", "--model", "phi-3.5-mini", "--gpu", "l4", "--rank", "32",
         "--targets", "qkv,o", "--no-grad-ckpt"],
    "suggest-llama-3.1-8b-2x-rtx-4090":
        ["suggest", "--model", "llama-3.1-8b", "--gpu", "rtx-4090", "--gpus", "2"],
    "suggest-llama-3.1-70b-2x-a100-40gb-fsdp":
        ["suggest", "--model", "llama-3.1-70b", "--gpu", "a100-40gb-sxm", "--gpus", "2"],
    "estimate-llama-3.1-8b-rtx-4090-batch2":
        ["estimate", "--model", "llama-3.1-8b", "--gpu", "rtx-4090", "--batch", "2"],
    "estimate-mistral-7b-t4-fp16":
        ["estimate", "--model", "mistral-7b", "--gpu", "t4", "--compute-dtype", "fp16",
         "--seq", "1024", "--prepare", "kbit"],
    # qplan check of the ecosystem fixtures (paths relative to the repository root)
    "check-seed-trl-yaml-rtx-4090":
        ["check", "tests/fixtures/ecosystem/seed_trl.yaml", "--gpu", "rtx-4090",
         "--trl-version", "1.16.0"],
    "check-seed-trl-script-rtx-4060":
        ["check", "tests/fixtures/ecosystem/seed_trl.py", "--gpu", "rtx-4060",
         "--trl-version", "1.16.0"],
    "check-trl-cli-rtx-3090":
        ["check", "tests/fixtures/ecosystem/trl_cli.yaml", "--gpu", "rtx-3090",
         "--trl-version", "1.16.0"],
    "check-axolotl-rtx-4090":
        ["check", "tests/fixtures/ecosystem/axolotl_qlora.yaml", "--gpu", "rtx-4090"],
    "check-llamafactory-rtx-4060":
        ["check", "tests/fixtures/ecosystem/llamafactory_qlora.yaml", "--gpu", "rtx-4060"],
}
ROOT = Path(__file__).parent.parent


@pytest.fixture(autouse=True)
def _from_the_repository_root(monkeypatch):
    """check cases name their files relative to the root; axolotl and LLaMA-Factory read
    the allocator setting from the environment."""
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)


def _output(args: list[str]) -> dict:
    r = CliRunner().invoke(cli, [*args, "--json"])
    assert "Traceback" not in r.output, r.output
    assert r.exit_code in (0, 3), r.output
    return {"command": "qplan " + " ".join([*args, "--json"]), "exit_code": r.exit_code,
            "output": json.loads(r.stdout)}


def _diff(want, got, path="") -> list[str]:
    if isinstance(want, dict) and isinstance(got, dict):
        out = []
        for k in sorted(set(want) | set(got), key=str):
            if k not in got:
                out.append(f"{path}.{k}: missing")
            elif k not in want:
                out.append(f"{path}.{k}: new")
            else:
                out += _diff(want[k], got[k], f"{path}.{k}")
        return out
    if isinstance(want, list) and isinstance(got, list) and len(want) == len(got):
        return [d for i, (a, b) in enumerate(zip(want, got)) for d in _diff(a, b, f"{path}[{i}]")]
    return [] if want == got else [f"{path}: {want!r} -> {got!r}"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name):
    got = _output(CASES[name])
    path = GOLDEN / f"{name}.json"
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(json.dumps(got, indent=2) + "\n")
        return
    if not path.exists():
        pytest.fail(f"{path.name} is missing; create it with: {REGENERATE}")
    want = json.loads(path.read_text())
    diffs = _diff(want, got)
    assert not diffs, (f"{name} differs from {path.name} (if the model changed on purpose, "
                       f"regenerate: {REGENERATE}):\n  " + "\n  ".join(diffs[:30]))


def test_no_stale_golden_files():
    stale = sorted(p.stem for p in GOLDEN.glob("*.json") if p.stem not in CASES)
    assert not stale, f"golden files without a case: {stale}; delete them"
