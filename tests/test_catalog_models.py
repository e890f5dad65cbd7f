"""The model catalogue: every entry's fields, and its parameter counts against transformers.

Each dense entry is built with transformers on the meta device (no memory, no download)
from ``ModelProfile.to_config_dict()``. Its parameter count must equal
``ModelProfile.total_params`` exactly, and the ``nn.Linear`` weights inside the decoder
layers must equal ``quantized_params``: this checks both the catalogue's numbers and the
shapes models.py derives from them (Gemma's four norms per block, Qwen3/Gemma 3 q/k norms,
Phi-3's fused projections, tied embeddings, Qwen2's q/k/v bias).
"""
from __future__ import annotations

import re

import pytest

from qplan.errors import UnknownModelError
from qplan.profiles.model_catalog import FAMILIES, builtin_models
from qplan.profiles.registry import Registry, normalize

MODELS = builtin_models()
IDS = [m.name for m in MODELS]
DENSE = [m for m in MODELS if not m.is_moe]
HF_SOURCE = re.compile(r"^https://huggingface\.co/[\w.-]+/[\w.-]+/blob/main/config\.json$")


def test_catalogue_size_and_families():
    assert len(MODELS) >= 30
    assert len(set(IDS)) == len(IDS)
    wanted = {"llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3.2-1b", "llama-3.2-3b",
              "llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b", "llama-3.3-70b", "mistral-7b",
              "mistral-nemo-12b", "mixtral-8x7b", "qwen2.5-0.5b", "qwen2.5-72b", "qwen3-0.6b",
              "qwen3-32b", "gemma-2-2b", "gemma-2-27b", "gemma-3-1b", "gemma-3-27b",
              "phi-3.5-mini", "phi-4", "smollm2-135m", "smollm2-1.7b", "tinyllama-1.1b"}
    assert wanted <= set(IDS)
    assert {m.family for m in MODELS} == set(FAMILIES)


def test_names_and_aliases_register_without_collisions():
    reg: Registry = Registry("model", UnknownModelError)
    for m in MODELS:
        reg.register(m)  # raises PluginError on any duplicate name or alias
    assert len(reg) == len(MODELS)
    for m in MODELS:
        assert reg.find(m.hf_id) is m
        for a in m.aliases:
            assert reg.find(a) is m


@pytest.mark.parametrize("m", MODELS, ids=IDS)
def test_entry_fields(m):
    assert m.name == m.name.lower() and " " not in m.name
    assert "/" in m.hf_id and m.hf_id in m.aliases
    assert HF_SOURCE.match(m.source), m.source
    assert m.source == f"https://huggingface.co/{m.hf_id}/blob/main/config.json"
    assert m.model_type in {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma2",
                            "gemma3_text", "phi3", "olmo2", "granite"}
    assert m.num_attention_heads % m.num_key_value_heads == 0
    if m.head_dim is None:
        assert m.hidden_size % m.num_attention_heads == 0
    else:
        assert m.head_dim in (64, 128, 256)
    assert m.max_position_embeddings >= 2048
    assert m.vocab_size >= 32_000
    # Qwen2 is the only family here with a q/k/v bias.
    assert m.attention_bias == (m.model_type == "qwen2")
    if m.model_type.startswith("gemma"):
        assert m.tie_word_embeddings
    assert m.is_moe == (m.model_type == "mixtral")
    if m.is_moe:
        assert m.num_experts_per_tok and m.num_experts_per_tok < m.num_local_experts
        assert "not modelled" in m.notes
    assert all(normalize(a) for a in m.aliases)


def test_head_dim_only_where_needed():
    """head_dim is set where the config sets it; where it differs from hidden/heads it must be."""
    by = {m.name: m for m in MODELS}
    assert by["mistral-nemo-12b"].head_size == 128 != 5120 // 32
    assert by["qwen3-0.6b"].head_size == 128 != 1024 // 16
    assert by["gemma-2-27b"].head_size == 128 != 4608 // 32
    assert by["llama-3.1-8b"].head_dim is None and by["llama-3.1-8b"].head_size == 128


def test_published_parameter_counts():
    """Totals that the model publishers state (rounded) match the derived counts."""
    by = {m.name: m.total_params for m in MODELS}
    assert round(by["llama-3.1-8b"] / 1e9, 2) == 8.03
    assert round(by["llama-2-7b"] / 1e9, 2) == 6.74
    assert round(by["qwen2.5-7b"] / 1e9, 2) == 7.62
    assert round(by["qwen2.5-0.5b"] / 1e9, 2) == 0.49
    assert round(by["gemma-2-9b"] / 1e9, 2) == 9.24
    assert round(by["phi-4"] / 1e9, 2) == 14.66
    assert round(by["smollm2-135m"] / 1e6) == 135
    # keras-hub's Gemma 3 presets count 999,885,952 for the 1B; Phi-3-mini 3,821,079,552.
    assert by["gemma-3-1b"] == 999_885_952
    assert by["phi-3.5-mini"] == 3_821_079_552


def _build_meta(m):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM

    cfg = m.to_config_dict()
    model_type = cfg.pop("model_type")
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type!r} architecture")
    config = AutoConfig.for_model(model_type, **cfg)
    with torch.device("meta"):
        return torch, AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("m", DENSE, ids=[m.name for m in DENSE])
def test_param_counts_match_transformers(m):
    torch, model = _build_meta(m)
    total = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    assert m.total_params == total
    layers = model.get_decoder().layers
    assert len(layers) == m.num_hidden_layers
    linear = sum(mod.weight.numel() for mod in layers.modules()
                 if isinstance(mod, torch.nn.Linear))
    assert m.quantized_params == linear
    # The LoRA target module names exist in the built model.
    names = {n.rsplit(".", 1)[-1] for n, mod in layers[0].named_modules()
             if isinstance(mod, torch.nn.Linear)}
    assert names == set(m.target_names.values())


def test_moe_is_flagged_not_counted():
    """Mixtral keeps its expert fields; its dense-shaped counts are not checked (not modelled)."""
    mix = next(m for m in MODELS if m.name == "mixtral-8x7b")
    assert (mix.num_local_experts, mix.num_experts_per_tok) == (8, 2)
    cfg = mix.to_config_dict()
    assert cfg["num_local_experts"] == 8 and cfg["num_experts_per_tok"] == 2
