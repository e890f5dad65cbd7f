"""`qplan run --plan plan.yaml --model DIR`: a plan made for a catalogue name must accept that
model's own folder, whose config.json spells out what the catalogue leaves to transformers'
defaults (head_dim, layer_types), and refuse another shape."""
from __future__ import annotations

import pytest

from qplan import api
from qplan.runner.newrun import _shape

transformers = pytest.importorskip("transformers")

NAMES = [m.name for m in api.catalog().models]


@pytest.mark.parametrize("name", NAMES)
def test_a_models_own_config_has_the_catalogue_shape(name, tmp_path):
    profile = api.get_model(name)
    cfg = transformers.AutoConfig.for_model(**profile.to_config_dict())
    cfg.save_pretrained(tmp_path)  # as save_pretrained writes it: every default spelled out
    assert _shape(api.get_model(str(tmp_path))) == _shape(profile)


def test_another_shape_differs():
    a, b = api.get_model("llama-3.1-8b"), api.get_model("llama-3.2-3b")
    assert _shape(a) != _shape(b)
    # the same blocks with another vocabulary: another output layer, another estimate
    assert _shape(api.get_model("mistral-7b")) != _shape(api.get_model("llama-2-7b"))
