"""docs/json-schema.md documents exactly the keys the commands print (no drift)."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from fake_nvml import fake_pynvml
from qplan.cli import cli
from qplan.profiles.gpus import GIB

DOC = Path(__file__).parent.parent / "docs" / "json-schema.md"


def documented() -> dict[str, set[str]]:
    """Heading -> the keys in the first column of its table."""
    out: dict[str, set[str]] = {}
    head = None
    for line in DOC.read_text().splitlines():
        if line.startswith("#"):
            head = line.lstrip("#").strip()
        m = re.match(r"^\| `([a-z_0-9]+)` \|", line)
        if m and head:
            out.setdefault(head, set()).add(m.group(1))
    return out


def js(*args: str, code: int = 0) -> dict:
    r = CliRunner().invoke(cli, [*args, "--json"])
    assert r.exit_code == code, r.output
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    save = tmp_path_factory.mktemp("p") / "plan.yaml"
    sug = js("suggest", "--model", "llama-3.2-1b", "--gpu", "rtx-4090", "--tokens", "1000",
             "--save", str(save))
    est = js("estimate", "--model", "llama-3.2-1b", "--gpu", "rtx-4090")
    err = js("suggest", "--model", "llama-3.1-8b", "--gpu", "2GB", code=3)
    return sug, est, err


def test_every_section_is_parsed():
    doc = documented()
    assert len(doc) >= 15 and all(doc.values())


def test_estimate_and_suggest(outputs):
    sug, est, _ = outputs
    doc = documented()
    assert set(sug) | set(est) == doc["`qplan estimate` and `qplan suggest`"]
    assert set(sug["terms"][0]) == doc["`terms[]`"]
    assert set(sug["plan"]) == doc["`plan` (suggest)"]
    assert set(sug["dataset"]) == doc["`dataset` (suggest with `--data` or `--tokens`)"]


def test_errors(outputs):
    _, _, err = outputs
    doc = documented()
    assert set(err) | {"report"} == doc["Errors (any command with `--json`)"]  # report: run's
    assert set(err["error"]) == doc["`error`"]


def test_run_and_merge_reports():
    """The keys of `qplan run --json` / `qplan merge --json` are their report dataclasses'
    (the real output is checked by tests/test_runner_e2e.py)."""
    from dataclasses import fields

    from qplan.runner.merge import MergeReport
    from qplan.runner.types import AttemptReport, RunReport

    doc = documented()
    names = lambda cls: {f.name for f in fields(cls)}  # noqa: E731
    assert names(RunReport) | {"schema_version", "qplan_report_version"} == doc["`qplan run`"]
    assert names(AttemptReport) == doc["`attempts[]` (run)"]
    assert names(MergeReport) | {"schema_version"} == doc["`qplan merge`"]


def test_catalogues():
    doc = documented()
    g = js("gpus")
    assert set(g) == doc["`qplan gpus`"] and set(g["gpus"][0]) == doc["`gpus[]`"]
    m = js("models")
    assert set(m) == doc["`qplan models`"] and set(m["models"][0]) == doc["`models[]`"]


def test_check_and_export(tmp_path, monkeypatch):
    fix = Path(__file__).parent / "fixtures" / "ecosystem"
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    doc = documented()
    too_big = js("check", str(fix / "axolotl_qlora.yaml"), "--gpu", "rtx-4090", code=3)
    fits = js("check", str(fix / "seed_trl.yaml"), "--gpu", "h100-sxm")
    est = js("estimate", "--model", "llama-3.2-1b", "--gpu", "rtx-4090")
    extra = doc["`qplan check`"]
    assert set(too_big) == set(fits) == (set(est) - {"hint"}) | extra
    assert not set(est) & extra
    assert set(too_big["to_fit"][0]) == set(fits["faster"]) == doc["`to_fit[]` and `faster`"]
    assert set(too_big["to_fit"][0]["edits"][0]) == doc["`edits[]`"]
    ex = js("export", "--model", "llama-3.1-8b", "--gpu", "rtx-4060", "--seq", "1024",
            "--format", "axolotl")
    assert set(ex) == doc["`qplan export`"]
    plan = tmp_path / "p.yaml"
    js("suggest", "--model", "llama-3.1-8b", "--gpu", "rtx-4060", "--seq", "1024", "--save",
       str(plan), "--embed-on-cpu")  # a setting trl cannot express: a gap
    ex = js("export", "--plan", str(plan), "--format", "trl", "-o", str(tmp_path / "t.py"))
    assert ex["gaps"] and set(ex["gaps"][0]) == doc["`gaps[]`"] and ex["text"] is None


def test_plot(tmp_path):
    doc = documented()
    d = js("plot", "--model", "llama-3.2-1b", "--gpu", "rtx-4060", "--gpu", "2GB",
           "-o", str(tmp_path / "m.svg"))
    assert set(d) == doc["`qplan plot`"] and set(d["curves"][0]) == doc["`curves[]`"]


def test_hw(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml",
                        fake_pynvml([("NVIDIA GeForce RTX 4090", 24 * GIB, 24 * GIB, (8, 9))]))
    doc = documented()
    h = js("hw")
    assert set(h) == doc["`qplan hw` / `qplan doctor`"]
    assert set(h["gpus"][0]) == doc["`gpus[]` (detected)"]


def test_calibrate_and_count(tmp_path, monkeypatch):
    from qplan import api
    from qplan.planner import store as S
    from qplan.planner.config import TrainConfig

    monkeypatch.setenv("QPLAN_HOME", str(tmp_path))
    doc = documented()
    m, g = api.get_model("llama-3.1-8b"), api.get_gpu("rtx-4090")
    est = api.estimate(m, g, TrainConfig(seq_len=1024))
    S.Store().add(S.attempt_record(gpu=g.name, model=m, memory=est.memory, speed=est.speed,
                                   measured={"nvml_peak_gib": 9.0, "cuda_context_gib": 0.6},
                                   steady_tokens_per_s=1000.0))
    shown = js("calibrate", "--show")
    assert set(shown) - {"removed"} == doc["`qplan calibrate`"] - {"removed"}
    assert set(shown["corrections"][0]) == doc["`corrections[]`"]
    reset = js("calibrate", "--reset")
    assert set(reset) | {"records", "corrections"} == doc["`qplan calibrate`"]
    counted = js("count", "--model", "llama-3.1-8b")  # the catalogue's: already counted
    assert counted["counted"] is False
    assert set(counted) | {"regimes"} == doc["`qplan count`"]
