"""Every catalogue model is either counted (its architecture's dry-run figures ship in
qplan/profiles/activation_counts/) or planned from the analytic terms with the wide band, and
says which; the shipped counts are whole (every regime the estimate asks for)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from qplan import api
from qplan.cli import cli
from qplan.planner import calibration as C
from qplan.planner.activations import COUNTS_DIR, counts_for
from qplan.planner.config import TrainConfig
from qplan.planner.memory import estimate_memory
from qplan.runner.counting import regimes

DENSE = sorted(m.name for m in api.catalog().models if not m.is_moe)
SHIPPED = sorted(p.stem for p in Path(COUNTS_DIR).glob("*.json"))


def test_some_models_are_counted():
    assert {"llama-3.1-8b", "qwen3-8b", "mistral-7b"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_counts_name_a_catalogue_model_and_hold_every_regime(name):
    d = json.loads((Path(COUNTS_DIR) / f"{name}.json").read_text())
    model = api.get_model(name)
    assert counts_for(model) is not None, "the counts do not match the model's shape"
    want = {r.key for r in regimes() if model.sdpa_supported or r.variant != "eager"}
    assert want <= set(d["regimes"]), sorted(want - set(d["regimes"]))


@pytest.mark.parametrize("name", DENSE)
def test_every_dense_model_is_counted_or_carries_the_analytic_band(name):
    model = api.get_model(name)
    cfg = TrainConfig(seq_len=2048, batch_size=2, loss="fused",
                      attn="sdpa" if model.sdpa_supported else "eager")
    m = estimate_memory(model, cfg)
    above = m.peak_bytes - m.term("cuda_context").bytes
    if counts_for(model) is not None:
        assert m.basis == "counted"
        assert m.band_bytes == pytest.approx(max(C.BAND_COUNTED * above, C.BAND_MIN_GIB * 2**30),
                                             rel=1e-6, abs=2)
    else:
        assert m.basis == "analytic"
        dynamic = sum(m.term(k).bytes for k in ("activations", "attention_mask",
                                                 "logits_or_working_set"))
        assert m.band_bytes >= C.BAND_COUNTED * above + C.BAND_ANALYTIC * dynamic - 2


def test_an_uncounted_model_says_so_in_the_output(tmp_path):
    """A config.json of a shape nothing was counted for (a user's own model) is planned from
    the analytic terms, and the output says so and how to count it."""
    import json as _json

    cfg = dict(model_type="llama", hidden_size=3072, intermediate_size=9000, num_hidden_layers=20,
               num_attention_heads=24, num_key_value_heads=8, vocab_size=50000,
               max_position_embeddings=8192, tie_word_embeddings=False)
    (tmp_path / "config.json").write_text(_json.dumps(cfg))
    r = CliRunner().invoke(cli, ["estimate", "--model", str(tmp_path / "config.json"), "--gpu", "h200"],
                           env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "no dry-run counts" in r.output and "qplan count" in r.output, r.output
    r = CliRunner().invoke(cli, ["estimate", "--model", str(tmp_path / "config.json"), "--gpu",
                                 "h200", "--json"])
    assert _json.loads(r.output)["basis"] == "analytic"
