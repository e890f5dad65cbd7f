"""Shared fixtures. Keep this file small; append new fixtures, don't rewrite others'."""
from __future__ import annotations

import pytest

from qplan import api
from qplan.profiles.gpus import GpuProfile
from qplan.profiles.models import ModelProfile

# Shapes used by tests when the catalogue lacks the model, copied from each config.json.
# https://huggingface.co/microsoft/Phi-3-mini-4k-instruct/blob/main/config.json
PHI3_MINI = dict(name="phi-3-mini", hf_id="microsoft/Phi-3-mini-4k-instruct", model_type="phi3",
                 hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, vocab_size=32_064,
                 max_position_embeddings=4096, family="phi-3")
# https://huggingface.co/meta-llama/Llama-3.1-405B/blob/main/config.json
LLAMA_405B = dict(name="llama-3.1-405b", hf_id="meta-llama/Llama-3.1-405B", model_type="llama",
                  hidden_size=16_384, intermediate_size=53_248, num_hidden_layers=126,
                  num_attention_heads=128, num_key_value_heads=8, vocab_size=128_256,
                  max_position_embeddings=131_072, family="llama-3")


def model_or_built(name: str, shape: dict) -> ModelProfile:
    """The catalogue's entry for ``name``, else a profile built from ``shape``."""
    found = api.catalog().models.find(name)
    return found if found is not None else ModelProfile(source="test", **shape)


@pytest.fixture(scope="session")
def llama8b() -> ModelProfile:
    return api.get_model("llama-3.1-8b")


@pytest.fixture(scope="session")
def phi3() -> ModelProfile:
    return model_or_built("phi-3-mini", PHI3_MINI)


@pytest.fixture(scope="session")
def llama405b() -> ModelProfile:
    return model_or_built("llama-3.1-405b", LLAMA_405B)


@pytest.fixture(scope="session")
def pre_ampere_gpu() -> GpuProfile:
    """A card without bf16 (compute capability < 8.0): the catalogue's T4 if any, else built."""
    for name in ("t4", "rtx-2080-ti"):
        g = api.catalog().gpus.find(name)
        if g is not None and g.compute_capability < (8, 0):
            return g
    # https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/tesla-t4/t4-tensor-core-datasheet-951643.pdf
    return GpuProfile("t4", "NVIDIA Tesla T4", 16, (7, 5), 65.0, 320, "test", kind="datacenter")


@pytest.fixture(autouse=True, scope="session")
def _isolated_qplan_home(tmp_path_factory):
    """Every test (and every qplan process a test starts) uses an empty qplan home: no
    calibration records or counted models of the machine's own leak into estimates."""
    import os

    home = tmp_path_factory.mktemp("qplan-home")
    old = os.environ.get("QPLAN_HOME")
    os.environ["QPLAN_HOME"] = str(home)
    api._STORES.clear()
    yield home
    if old is None:
        os.environ.pop("QPLAN_HOME", None)
    else:
        os.environ["QPLAN_HOME"] = old
    api._STORES.clear()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """The runner tests' tiny Llama (tests/fixtures/tiny_llama.py), built once."""
    from fixtures import tiny_llama as TL

    return TL.build(tmp_path_factory.mktemp("tiny") / "tiny")


@pytest.fixture(scope="session")
def text_data(tmp_path_factory):
    """60 short text records for the tiny Llama."""
    from fixtures import tiny_llama as TL

    p = tmp_path_factory.mktemp("data") / "train.jsonl"
    return TL.write_jsonl(p, [{"text": s} for s in TL.sentences(60, seed=5)])


@pytest.fixture
def export_two_gpu_plan(tmp_path):
    """``qplan suggest --gpus 2 --save`` of MODEL on CARD, then ``qplan export --format trl``
    of that plan into tmp_path/t.py (extra export arguments appended); the export's result."""
    from click.testing import CliRunner

    from qplan.cli import cli

    def run(model: str, card: str, *export_args: str):
        plan = tmp_path / "p.yaml"
        r = CliRunner().invoke(cli, ["suggest", "--model", model, "--gpu", card, "--gpus", "2",
                                     "--save", str(plan)])
        assert r.exit_code == 0, r.output
        return CliRunner().invoke(cli, ["export", "--plan", str(plan), "--format", "trl", "-o",
                                        str(tmp_path / "t.py"), *export_args])
    return run
