"""Built-in model shapes, copied from each model's Hugging Face ``config.json``.

Each family is a list of plain dicts headed by the URL of the config it was copied from.
"""
from __future__ import annotations

from qplan.profiles.models import ModelProfile

HF = "https://huggingface.co/{}/blob/main/config.json"

LLAMA_3 = [
    # https://huggingface.co/meta-llama/Llama-3.2-1B/blob/main/config.json
    dict(name="llama-3.2-1b", hf_id="meta-llama/Llama-3.2-1B", model_type="llama",
         hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
         num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128_256,
         max_position_embeddings=131_072, tie_word_embeddings=True),
    # https://huggingface.co/meta-llama/Llama-3.2-3B/blob/main/config.json
    dict(name="llama-3.2-3b", hf_id="meta-llama/Llama-3.2-3B", model_type="llama",
         hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
         num_attention_heads=24, num_key_value_heads=8, head_dim=128, vocab_size=128_256,
         max_position_embeddings=131_072, tie_word_embeddings=True),
    # https://huggingface.co/meta-llama/Llama-3.1-8B/blob/main/config.json
    dict(name="llama-3.1-8b", hf_id="meta-llama/Llama-3.1-8B", model_type="llama",
         hidden_size=4096, intermediate_size=14_336, num_hidden_layers=32,
         num_attention_heads=32, num_key_value_heads=8, vocab_size=128_256,
         max_position_embeddings=131_072, aliases=("llama3.1-8b", "meta-llama/Llama-3.1-8B-Instruct")),
]

MISTRAL = [
    # https://huggingface.co/mistralai/Mistral-7B-v0.3/blob/main/config.json
    dict(name="mistral-7b", hf_id="mistralai/Mistral-7B-v0.3", model_type="mistral",
         hidden_size=4096, intermediate_size=14_336, num_hidden_layers=32,
         num_attention_heads=32, num_key_value_heads=8, vocab_size=32_768,
         max_position_embeddings=32_768),
]

QWEN = [
    # https://huggingface.co/Qwen/Qwen2.5-7B/blob/main/config.json
    dict(name="qwen2.5-7b", hf_id="Qwen/Qwen2.5-7B", model_type="qwen2",
         hidden_size=3584, intermediate_size=18_944, num_hidden_layers=28,
         num_attention_heads=28, num_key_value_heads=4, vocab_size=152_064,
         max_position_embeddings=131_072, attention_bias=True),
]

FAMILIES = {"llama-3": LLAMA_3, "mistral": MISTRAL, "qwen2.5": QWEN}


def builtin_models() -> list[ModelProfile]:
    out = []
    for family, entries in FAMILIES.items():
        for e in entries:
            e = dict(e)
            e.setdefault("family", family)
            e.setdefault("source", HF.format(e["hf_id"]))
            if "aliases" in e:
                e["aliases"] = tuple(e["aliases"])
            out.append(ModelProfile(**e))
    return out
