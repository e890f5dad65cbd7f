"""Architectures transformers has no sdpa attention for (Gemma 2: soft-capped attention
logits; recent transformers refuse to load it with sdpa) are planned, estimated, counted and
checked with eager attention, and an explicit sdpa is refused with what to do (the library
still estimates sdpa when asked: older transformers ran Gemma 2 so, as the GPU grid did)."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from qplan import api
from qplan.cli import cli
from qplan.errors import BadInputError
from qplan.planner.config import TrainConfig
from qplan.planner.search import default_attention

NO_SDPA_MODELS = sorted(m.name for m in api.catalog().models if not m.sdpa_supported)


def test_gemma2_is_the_catalogue_model_without_sdpa():
    assert NO_SDPA_MODELS and all(api.get_model(n).model_type == "gemma2" for n in NO_SDPA_MODELS)
    assert api.get_model("llama-3.1-8b").sdpa_supported


@pytest.mark.parametrize("name", NO_SDPA_MODELS)
def test_suggest_plans_eager_for_models_without_sdpa(name):
    gpu = api.get_gpu("h200")
    assert default_attention(api.get_model(name), gpu) == "eager"
    assert default_attention(api.get_model(name), gpu, flash_attn_available=True) \
        == "flash_attention_2"
    plan = api.suggest(api.get_model(name), gpu, seq_len=2048)
    assert plan.config.attn == "eager"


def test_estimate_refuses_sdpa_for_gemma2_and_defaults_to_eager():
    m, gpu = api.get_model("gemma-2-9b"), api.get_gpu("rtx-4090")
    with pytest.raises(BadInputError, match="leave --attn out"):
        api.check_fixed(m, {"attn": "sdpa"})
    r = CliRunner().invoke(cli, ["estimate", "--model", "gemma-2-9b", "--gpu", "rtx-4090",
                                 "--seq", "4096", "--json"])
    assert r.exit_code in (0, 3), r.output
    import json
    d = json.loads(r.output)
    assert d["settings"]["attn"] == "eager"
    r = CliRunner().invoke(cli, ["estimate", "--model", "gemma-2-9b", "--gpu", "rtx-4090",
                                 "--attn", "sdpa"])
    assert r.exit_code == 2 and "leave --attn out" in r.output and "Traceback" not in r.output


def test_eager_attention_keeps_the_attention_matrix(monkeypatch):
    """Analytic terms: eager attention's probabilities cost more than a fused kernel's;
    Gemma 2's counts are made with eager attention (the attention it runs)."""
    from qplan.planner import memory

    m, gpu = api.get_model("gemma-2-9b"), api.get_gpu("rtx-4090")
    lean = dict(seq_len=4096, loss="fused", grad_ckpt=False)
    counted = api.estimate(m, gpu, TrainConfig(attn="eager", **lean)).memory
    monkeypatch.setattr(memory, "counts", lambda model: None)
    eager = api.estimate(m, gpu, TrainConfig(attn="eager", **lean)).memory
    flash = api.estimate(m, gpu, TrainConfig(attn="flash_attention_2", **lean)).memory
    assert eager.term("activations").bytes > flash.term("activations").bytes
    assert counted.basis == "counted" and eager.basis == "analytic"


def test_counting_regimes_use_eager_for_gemma2():
    from qplan.runner.counting import Regime

    cfg = Regime(True, True).config(api.get_model("gemma-2-9b"))
    assert cfg.attn == "eager"
    assert Regime(True, True).config(api.get_model("qwen3-8b")).attn == "sdpa"
