"""Resolving --model: catalogue names, local directories and config.json files, hub ids.

No test touches the network: the hub is either a fake ``huggingface_hub`` module or the
real one in offline mode with an empty cache, and socket connections fail the test.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import types

import pytest

from qplan import api
from qplan.errors import ConfigError, UnknownModelError
from qplan.profiles import resolve as R
from qplan.profiles.models import ModelProfile

# https://huggingface.co/HuggingFaceTB/SmolLM2-135M/blob/main/config.json (the fields used)
SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
    "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
    "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 8192,
    "tie_word_embeddings": True, "rms_norm_eps": 1e-05, "torch_dtype": "bfloat16",
}
# The original google/gemma-3-4b-it config.json gives only these text_config fields; the
# rest are transformers' Gemma3TextConfig defaults.
GEMMA3_4B_SPARSE = {
    "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
    "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                    "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024},
    "vision_config": {"hidden_size": 1152, "model_type": "siglip_vision_model"},
}


@pytest.fixture
def models():
    return api.catalog().models


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a test tried to open a network connection")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def write_config(folder, data) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(data))
    return str(folder)


def fake_hub(monkeypatch, download):
    """Install a fake ``huggingface_hub`` whose hf_hub_download is ``download``."""
    mod = types.ModuleType("huggingface_hub")
    mod.hf_hub_download = download
    monkeypatch.setitem(sys.modules, "huggingface_hub", mod)
    return mod


# ---- catalogue ------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["llama-3.1-8b", "Llama-3.1-8B", "llama3.1-8b",
                                  "meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct",
                                  "  llama-3.1-8b  "])
def test_catalogue_names_and_aliases(models, text, no_network):
    assert R.resolve_model(text, models).name == "llama-3.1-8b"


def test_unknown_name_names_closest_entries(models, no_network):
    with pytest.raises(UnknownModelError, match=r"unknown model 'qwen3-9b'.*Closest: .*qwen3-8b"):
        R.resolve_model("qwen3-9b", models)


def test_empty_name(models):
    with pytest.raises(UnknownModelError, match="no model given"):
        R.resolve_model("  ", models)


# ---- local directories and files -------------------------------------------------------
def test_local_directory(models, tmp_path):
    d = write_config(tmp_path / "my-smol", SMOLLM2_135M)
    m = R.resolve_model(d, models)
    assert m.name == "my-smol" and m.hf_id == d
    assert m.total_params == models.get("smollm2-135m").total_params
    assert m.source.endswith("config.json")


def test_config_json_path(models, tmp_path):
    d = write_config(tmp_path / "ckpt", SMOLLM2_135M)
    m = R.resolve_model(f"{d}/config.json", models)
    assert m.name == "ckpt" and m.hf_id == d and m.tie_word_embeddings


def test_other_json_file_name(models, tmp_path):
    p = tmp_path / "shape.json"
    p.write_text(json.dumps(SMOLLM2_135M))
    assert R.resolve_model(str(p), models).name == "shape"


def test_local_directory_wins_over_catalogue_name(models, tmp_path, monkeypatch):
    cfg = dict(SMOLLM2_135M, num_hidden_layers=2)
    write_config(tmp_path / "llama-3.1-8b", cfg)
    monkeypatch.chdir(tmp_path)
    assert R.resolve_model("./llama-3.1-8b", models).num_hidden_layers == 2
    assert R.resolve_model("llama-3.1-8b", models).num_hidden_layers == 2  # has config.json


def test_directory_without_config(models, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        R.resolve_model(str(tmp_path / "empty"), models)


def test_missing_path(models, tmp_path):
    with pytest.raises(UnknownModelError, match="no such file or directory"):
        R.resolve_model(str(tmp_path / "nope" / "config.json"), models)


def test_missing_fields_are_named(models, tmp_path):
    cfg = {k: v for k, v in SMOLLM2_135M.items() if k not in ("intermediate_size", "vocab_size")}
    d = write_config(tmp_path / "broken", cfg)
    with pytest.raises(ConfigError, match=r"'broken' is missing intermediate_size, vocab_size"):
        R.resolve_model(d, models)


def test_null_field_is_reported_missing(models, tmp_path):
    d = write_config(tmp_path / "nulls", dict(SMOLLM2_135M, hidden_size=None))
    with pytest.raises(ConfigError, match="is missing hidden_size"):
        R.resolve_model(d, models)


def test_bad_values_are_named(models, tmp_path):
    d = write_config(tmp_path / "odd", dict(SMOLLM2_135M, num_key_value_heads=4))
    with pytest.raises(ConfigError, match=r"num_attention_heads \(9\) must be a multiple of "
                                          r"num_key_value_heads \(4\)"):
        R.resolve_model(d, models)


def test_invalid_json(models, tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        R.resolve_model(str(tmp_path / "bad"), models)


def test_json_that_is_not_an_object(models, tmp_path):
    d = write_config(tmp_path / "list", [1, 2, 3])
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        R.resolve_model(d, models)


# ---- config.json variants (ModelProfile.from_config_dict) ------------------------------
def test_sparse_gemma3_text_config_uses_transformers_defaults(models, tmp_path):
    m = R.resolve_model(write_config(tmp_path / "g3", GEMMA3_4B_SPARSE), models)
    ref = models.get("gemma-3-4b")
    assert m.model_type == "gemma3_text" and m.tie_word_embeddings
    assert (m.num_attention_heads, m.num_key_value_heads, m.head_size, m.vocab_size) == \
        (8, 4, 256, 262_208)
    assert m.total_params == ref.total_params


def test_full_nested_text_config(models, tmp_path):
    ref = models.get("gemma-3-12b")
    text = dict(ref.to_config_dict(), query_pre_attn_scalar=256)
    cfg = {"model_type": "gemma3", "text_config": text, "vision_config": {"hidden_size": 1152}}
    m = R.resolve_model(write_config(tmp_path / "g3-12b", cfg), models)
    assert m.total_params == ref.total_params


def test_optional_fields_missing_or_null(models, tmp_path):
    cfg = {k: v for k, v in SMOLLM2_135M.items()
           if k not in ("num_key_value_heads", "max_position_embeddings", "tie_word_embeddings")}
    cfg["head_dim"] = None
    m = R.resolve_model(write_config(tmp_path / "mha", cfg), models)
    assert m.num_key_value_heads == 9 and m.head_size == 64 and m.head_dim is None
    assert not m.tie_word_embeddings  # llama's default
    m2 = R.resolve_model(write_config(tmp_path / "kvnull", dict(cfg, num_key_value_heads=None)),
                         models)
    assert m2.num_key_value_heads == 9


def test_gemma2_without_tie_field_is_tied_and_qwen2_has_bias(models, tmp_path):
    g2 = models.get("gemma-2-2b").to_config_dict()
    del g2["tie_word_embeddings"]
    assert R.resolve_model(write_config(tmp_path / "g2", g2), models).tie_word_embeddings
    q = models.get("qwen2.5-0.5b").to_config_dict()
    m = R.resolve_model(write_config(tmp_path / "q", q), models)
    assert m.attention_bias and m.total_params == models.get("qwen2.5-0.5b").total_params


def test_catalogue_entries_round_trip_through_config_dict():
    for m in api.catalog().models:
        again = ModelProfile.from_config_dict(m.to_config_dict(), name=m.name)
        assert again.total_params == m.total_params, m.name
        assert again.is_moe == m.is_moe


# ---- the hub ----------------------------------------------------------------------------
def test_hub_id_offline_with_empty_cache(models, monkeypatch, tmp_path, no_network):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(UnknownModelError) as e:
        R.resolve_model("Qwen/Qwen9-7B", models)
    msg = str(e.value)
    assert "HF_HUB_OFFLINE is set" in msg
    assert "Closest catalogue entries:" in msg and "qwen" in msg
    assert "--model path/to/config.json" in msg
    assert "https://huggingface.co/Qwen/Qwen9-7B/blob/main/config.json" in msg


def test_hub_offline_reads_cache_only(models, monkeypatch, tmp_path):
    calls = []

    def download(repo_id, filename, **kw):
        calls.append((repo_id, filename, kw.get("local_files_only")))
        return str(write_config(tmp_path / "cache", SMOLLM2_135M)) + "/config.json"
    fake_hub(monkeypatch, download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    m = R.resolve_model("someone/smol-finetune", models)
    assert calls == [("someone/smol-finetune", "config.json", True)]
    assert m.name == m.hf_id == "someone/smol-finetune"
    assert m.source == "https://huggingface.co/someone/smol-finetune/blob/main/config.json"
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(R, "hub_reachable", lambda: True)
    R.resolve_model("someone/smol-finetune", models)
    assert calls[-1][2] is False
    monkeypatch.setattr(R, "hub_reachable", lambda: False)  # unreachable: the cache at once
    R.resolve_model("someone/smol-finetune", models)
    assert calls[-1][2] is True


def test_hub_reachable_is_a_quick_connection_attempt(monkeypatch):
    tried = []

    def connect(address, timeout):
        tried.append((address, timeout))
        raise OSError("Name or service not known")
    for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_ENDPOINT"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr(socket, "create_connection", connect)
    assert R.hub_reachable() is False and tried == [(("huggingface.co", 443), 3.0)]
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.example:8080")
    assert R.hub_reachable() is False and tried[-1][0] == ("mirror.example", 8080)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")  # only the HTTP client can tell
    assert R.hub_reachable() is True and len(tried) == 2


def test_hub_not_installed(models, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import raises ImportError
    with pytest.raises(UnknownModelError, match=r"huggingface_hub is not installed "
                                                r"\(pip install 'qplan\[hub\]'\)"):
        R.resolve_model("someone/unknown-7b", models)


@pytest.mark.parametrize("error_name, text", [
    ("GatedRepoError", "the repository is gated"),
    ("RepositoryNotFoundError", "no such repository, or it is private"),
    ("RemoteEntryNotFoundError", "has no config.json"),
    ("LocalEntryNotFoundError", "the hub cannot be reached"),
    ("ConnectionError", "ConnectionError: connection refused"),
])
def test_hub_errors_become_unknown_model(models, monkeypatch, error_name, text):
    err = type(error_name, (Exception,), {})

    def download(repo_id, filename, **kw):
        raise err("connection refused")
    fake_hub(monkeypatch, download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(R, "hub_reachable", lambda: True)
    with pytest.raises(UnknownModelError, match=text):
        R.resolve_model("meta-llama/Llama-9-8B", models)


def test_hub_config_that_is_malformed(models, monkeypatch, tmp_path):
    d = write_config(tmp_path / "h", {"model_type": "llama", "hidden_size": 64})
    fake_hub(monkeypatch, lambda repo_id, filename, **kw: f"{d}/config.json")
    with pytest.raises(ConfigError, match="missing intermediate_size, num_hidden_layers"):
        R.resolve_model("org/tiny", models)


def test_importing_resolve_does_not_import_huggingface_hub():
    code = ("import sys, qplan.profiles.resolve, qplan.profiles.model_catalog, "
            "qplan.profiles.gpu_catalog; "
            "print(sorted(m for m in ('huggingface_hub', 'torch', 'transformers') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_api_get_model_uses_resolve(tmp_path):
    d = write_config(tmp_path / "via-api", SMOLLM2_135M)
    assert api.get_model(d).name == "via-api"
