"""Built-in model shapes, copied from each model's Hugging Face ``config.json``.

Each family is a list of plain dicts headed by the URL of the config it was copied from.
Field names are the ``config.json`` names. ``head_dim`` is given only where the config
sets it (or where it differs from ``hidden_size // num_attention_heads``).
``tests/test_catalog_models.py`` builds every dense entry with transformers on the meta
device and checks the parameter counts, so a wrong number here fails a test.

Where a secondary source (litgpt's ``config.py``, a model card) disagreed with the
config.json, the config.json value is used and the entry says so.
"""
from __future__ import annotations

from qplan.profiles.models import ModelProfile

HF = "https://huggingface.co/{}/blob/main/config.json"
GATED = "gated on the hub: accept the licence on the model page and log in (hf auth login)"

LLAMA_2 = [
    # https://huggingface.co/meta-llama/Llama-2-7b-hf/blob/main/config.json
    dict(name="llama-2-7b", hf_id="meta-llama/Llama-2-7b-hf", model_type="llama",
         hidden_size=4096, intermediate_size=11_008, num_hidden_layers=32,
         num_attention_heads=32, num_key_value_heads=32, vocab_size=32_000,
         max_position_embeddings=4096,
         aliases=("llama2-7b", "meta-llama/Llama-2-7b-chat-hf"), notes=GATED),
    # https://huggingface.co/meta-llama/Llama-2-13b-hf/blob/main/config.json
    dict(name="llama-2-13b", hf_id="meta-llama/Llama-2-13b-hf", model_type="llama",
         hidden_size=5120, intermediate_size=13_824, num_hidden_layers=40,
         num_attention_heads=40, num_key_value_heads=40, vocab_size=32_000,
         max_position_embeddings=4096,
         aliases=("llama2-13b", "meta-llama/Llama-2-13b-chat-hf"), notes=GATED),
    # https://huggingface.co/meta-llama/Llama-2-70b-hf/blob/main/config.json
    dict(name="llama-2-70b", hf_id="meta-llama/Llama-2-70b-hf", model_type="llama",
         hidden_size=8192, intermediate_size=28_672, num_hidden_layers=80,
         num_attention_heads=64, num_key_value_heads=8, vocab_size=32_000,
         max_position_embeddings=4096,
         aliases=("llama2-70b", "meta-llama/Llama-2-70b-chat-hf"), notes=GATED),
]

# litgpt lists vocab_size=128000 for Llama 3 (the tokenizer's base vocabulary); the
# config.json's vocab_size, the embedding's row count, is 128256.
LLAMA_3 = [
    # https://huggingface.co/meta-llama/Llama-3.2-1B/blob/main/config.json
    dict(name="llama-3.2-1b", hf_id="meta-llama/Llama-3.2-1B", model_type="llama",
         hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
         num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128_256,
         max_position_embeddings=131_072, tie_word_embeddings=True,
         aliases=("llama3.2-1b", "meta-llama/Llama-3.2-1B-Instruct"), notes=GATED),
    # https://huggingface.co/meta-llama/Llama-3.2-3B/blob/main/config.json
    dict(name="llama-3.2-3b", hf_id="meta-llama/Llama-3.2-3B", model_type="llama",
         hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
         num_attention_heads=24, num_key_value_heads=8, head_dim=128, vocab_size=128_256,
         max_position_embeddings=131_072, tie_word_embeddings=True,
         aliases=("llama3.2-3b", "meta-llama/Llama-3.2-3B-Instruct"), notes=GATED),
    # https://huggingface.co/meta-llama/Llama-3.1-8B/blob/main/config.json
    dict(name="llama-3.1-8b", hf_id="meta-llama/Llama-3.1-8B", model_type="llama",
         hidden_size=4096, intermediate_size=14_336, num_hidden_layers=32,
         num_attention_heads=32, num_key_value_heads=8, vocab_size=128_256,
         max_position_embeddings=131_072,
         aliases=("llama3.1-8b", "meta-llama/Llama-3.1-8B-Instruct",
                  "meta-llama/Meta-Llama-3.1-8B", "meta-llama/Meta-Llama-3.1-8B-Instruct"),
         notes=GATED),
    # https://huggingface.co/meta-llama/Llama-3.1-70B/blob/main/config.json
    dict(name="llama-3.1-70b", hf_id="meta-llama/Llama-3.1-70B", model_type="llama",
         hidden_size=8192, intermediate_size=28_672, num_hidden_layers=80,
         num_attention_heads=64, num_key_value_heads=8, vocab_size=128_256,
         max_position_embeddings=131_072,
         aliases=("llama3.1-70b", "meta-llama/Llama-3.1-70B-Instruct",
                  "meta-llama/Meta-Llama-3.1-70B", "meta-llama/Meta-Llama-3.1-70B-Instruct"),
         notes=GATED),
    # https://huggingface.co/meta-llama/Llama-3.1-405B/blob/main/config.json
    dict(name="llama-3.1-405b", hf_id="meta-llama/Llama-3.1-405B", model_type="llama",
         hidden_size=16_384, intermediate_size=53_248, num_hidden_layers=126,
         num_attention_heads=128, num_key_value_heads=8, vocab_size=128_256,
         max_position_embeddings=131_072,
         aliases=("llama3.1-405b", "meta-llama/Llama-3.1-405B-Instruct",
                  "meta-llama/Meta-Llama-3.1-405B"),
         notes=GATED),
    # https://huggingface.co/meta-llama/Llama-3.3-70B-Instruct/blob/main/config.json
    dict(name="llama-3.3-70b", hf_id="meta-llama/Llama-3.3-70B-Instruct", model_type="llama",
         hidden_size=8192, intermediate_size=28_672, num_hidden_layers=80,
         num_attention_heads=64, num_key_value_heads=8, vocab_size=128_256,
         max_position_embeddings=131_072,
         aliases=("llama3.3-70b", "llama-3.3-70b-instruct"),
         notes=GATED + "; released as Instruct only"),
]

MISTRAL = [
    # https://huggingface.co/mistralai/Mistral-7B-v0.3/blob/main/config.json
    dict(name="mistral-7b", hf_id="mistralai/Mistral-7B-v0.3", model_type="mistral",
         hidden_size=4096, intermediate_size=14_336, num_hidden_layers=32,
         num_attention_heads=32, num_key_value_heads=8, vocab_size=32_768,
         max_position_embeddings=32_768,
         aliases=("mistral-7b-v0.3", "mistralai/Mistral-7B-Instruct-v0.3"),
         notes="v0.3 (vocab 32768, no sliding window); v0.1 had vocab 32000 and a 4096 window"),
    # https://huggingface.co/mistralai/Mistral-Nemo-Base-2407/blob/main/config.json
    # The Instruct-2407 config sets max_position_embeddings=1024000; the base says 128000.
    dict(name="mistral-nemo-12b", hf_id="mistralai/Mistral-Nemo-Base-2407",
         model_type="mistral",
         hidden_size=5120, intermediate_size=14_336, num_hidden_layers=40,
         num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=131_072,
         max_position_embeddings=128_000,
         aliases=("mistral-nemo", "nemo-12b", "mistralai/Mistral-Nemo-Instruct-2407"),
         notes="head_dim 128 is not hidden/heads (160)"),
    # https://huggingface.co/mistralai/Mixtral-8x7B-v0.1/blob/main/config.json
    dict(name="mixtral-8x7b", hf_id="mistralai/Mixtral-8x7B-v0.1", model_type="mixtral",
         hidden_size=4096, intermediate_size=14_336, num_hidden_layers=32,
         num_attention_heads=32, num_key_value_heads=8, vocab_size=32_000,
         max_position_embeddings=32_768, num_local_experts=8, num_experts_per_tok=2,
         aliases=("mixtral", "mistralai/Mixtral-8x7B-Instruct-v0.1"),
         notes="mixture of experts (8 experts, 2 per token): memory is not modelled by the core"),
]

# Qwen2 always has a bias on q/k/v (transformers hard-codes it; config.json has no field
# for it), hence attention_bias=True. Qwen3 dropped the bias and added q/k RMSNorms.
QWEN2_5 = [
    # https://huggingface.co/Qwen/Qwen2.5-0.5B/blob/main/config.json
    dict(name="qwen2.5-0.5b", hf_id="Qwen/Qwen2.5-0.5B", model_type="qwen2",
         hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
         num_attention_heads=14, num_key_value_heads=2, vocab_size=151_936,
         max_position_embeddings=32_768, tie_word_embeddings=True, attention_bias=True,
         aliases=("Qwen/Qwen2.5-0.5B-Instruct",)),
    # https://huggingface.co/Qwen/Qwen2.5-1.5B/blob/main/config.json
    dict(name="qwen2.5-1.5b", hf_id="Qwen/Qwen2.5-1.5B", model_type="qwen2",
         hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
         num_attention_heads=12, num_key_value_heads=2, vocab_size=151_936,
         max_position_embeddings=131_072, tie_word_embeddings=True, attention_bias=True,
         aliases=("Qwen/Qwen2.5-1.5B-Instruct",)),
    # https://huggingface.co/Qwen/Qwen2.5-3B/blob/main/config.json
    dict(name="qwen2.5-3b", hf_id="Qwen/Qwen2.5-3B", model_type="qwen2",
         hidden_size=2048, intermediate_size=11_008, num_hidden_layers=36,
         num_attention_heads=16, num_key_value_heads=2, vocab_size=151_936,
         max_position_embeddings=32_768, tie_word_embeddings=True, attention_bias=True,
         aliases=("Qwen/Qwen2.5-3B-Instruct",)),
    # https://huggingface.co/Qwen/Qwen2.5-7B/blob/main/config.json
    dict(name="qwen2.5-7b", hf_id="Qwen/Qwen2.5-7B", model_type="qwen2",
         hidden_size=3584, intermediate_size=18_944, num_hidden_layers=28,
         num_attention_heads=28, num_key_value_heads=4, vocab_size=152_064,
         max_position_embeddings=131_072, attention_bias=True,
         aliases=("Qwen/Qwen2.5-7B-Instruct",)),
    # https://huggingface.co/Qwen/Qwen2.5-14B/blob/main/config.json
    dict(name="qwen2.5-14b", hf_id="Qwen/Qwen2.5-14B", model_type="qwen2",
         hidden_size=5120, intermediate_size=13_824, num_hidden_layers=48,
         num_attention_heads=40, num_key_value_heads=8, vocab_size=152_064,
         max_position_embeddings=131_072, attention_bias=True,
         aliases=("Qwen/Qwen2.5-14B-Instruct",)),
    # https://huggingface.co/Qwen/Qwen2.5-32B/blob/main/config.json
    dict(name="qwen2.5-32b", hf_id="Qwen/Qwen2.5-32B", model_type="qwen2",
         hidden_size=5120, intermediate_size=27_648, num_hidden_layers=64,
         num_attention_heads=40, num_key_value_heads=8, vocab_size=152_064,
         max_position_embeddings=131_072, attention_bias=True,
         aliases=("Qwen/Qwen2.5-32B-Instruct",)),
    # https://huggingface.co/Qwen/Qwen2.5-72B/blob/main/config.json
    dict(name="qwen2.5-72b", hf_id="Qwen/Qwen2.5-72B", model_type="qwen2",
         hidden_size=8192, intermediate_size=29_568, num_hidden_layers=80,
         num_attention_heads=64, num_key_value_heads=8, vocab_size=152_064,
         max_position_embeddings=131_072, attention_bias=True,
         aliases=("Qwen/Qwen2.5-72B-Instruct",)),
]

# Every Qwen3 config sets head_dim=128 (for 0.6B, 4B and 32B it is not hidden/heads).
QWEN3 = [
    # https://huggingface.co/Qwen/Qwen3-0.6B/blob/main/config.json
    dict(name="qwen3-0.6b", hf_id="Qwen/Qwen3-0.6B", model_type="qwen3",
         hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
         num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151_936,
         max_position_embeddings=40_960, tie_word_embeddings=True,
         aliases=("Qwen/Qwen3-0.6B-Base",)),
    # https://huggingface.co/Qwen/Qwen3-1.7B/blob/main/config.json
    dict(name="qwen3-1.7b", hf_id="Qwen/Qwen3-1.7B", model_type="qwen3",
         hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
         num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151_936,
         max_position_embeddings=40_960, tie_word_embeddings=True,
         aliases=("Qwen/Qwen3-1.7B-Base",)),
    # https://huggingface.co/Qwen/Qwen3-4B/blob/main/config.json
    dict(name="qwen3-4b", hf_id="Qwen/Qwen3-4B", model_type="qwen3",
         hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
         num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151_936,
         max_position_embeddings=40_960, tie_word_embeddings=True,
         aliases=("Qwen/Qwen3-4B-Base",)),
    # https://huggingface.co/Qwen/Qwen3-8B/blob/main/config.json
    dict(name="qwen3-8b", hf_id="Qwen/Qwen3-8B", model_type="qwen3",
         hidden_size=4096, intermediate_size=12_288, num_hidden_layers=36,
         num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151_936,
         max_position_embeddings=40_960,
         aliases=("Qwen/Qwen3-8B-Base",)),
    # https://huggingface.co/Qwen/Qwen3-14B/blob/main/config.json
    dict(name="qwen3-14b", hf_id="Qwen/Qwen3-14B", model_type="qwen3",
         hidden_size=5120, intermediate_size=17_408, num_hidden_layers=40,
         num_attention_heads=40, num_key_value_heads=8, head_dim=128, vocab_size=151_936,
         max_position_embeddings=40_960,
         aliases=("Qwen/Qwen3-14B-Base",)),
    # https://huggingface.co/Qwen/Qwen3-32B/blob/main/config.json
    dict(name="qwen3-32b", hf_id="Qwen/Qwen3-32B", model_type="qwen3",
         hidden_size=5120, intermediate_size=25_600, num_hidden_layers=64,
         num_attention_heads=64, num_key_value_heads=8, head_dim=128, vocab_size=151_936,
         max_position_embeddings=40_960,
         notes="no -Base release"),
]

# Gemma ties the output layer to the embeddings (transformers' default for Gemma; the
# configs do not repeat it). Every block has four RMSNorms (pre/post attention and MLP).
GEMMA_2 = [
    # https://huggingface.co/google/gemma-2-2b/blob/main/config.json
    dict(name="gemma-2-2b", hf_id="google/gemma-2-2b", model_type="gemma2",
         hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
         num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=256_000,
         max_position_embeddings=8192, tie_word_embeddings=True, sliding_window=4096,
         aliases=("gemma2-2b", "google/gemma-2-2b-it"),
         notes=GATED + "; sliding window 4096 on alternate layers"),
    # https://huggingface.co/google/gemma-2-9b/blob/main/config.json
    dict(name="gemma-2-9b", hf_id="google/gemma-2-9b", model_type="gemma2",
         hidden_size=3584, intermediate_size=14_336, num_hidden_layers=42,
         num_attention_heads=16, num_key_value_heads=8, head_dim=256, vocab_size=256_000,
         max_position_embeddings=8192, tie_word_embeddings=True, sliding_window=4096,
         aliases=("gemma2-9b", "google/gemma-2-9b-it"),
         notes=GATED + "; sliding window 4096 on alternate layers"),
    # https://huggingface.co/google/gemma-2-27b/blob/main/config.json
    dict(name="gemma-2-27b", hf_id="google/gemma-2-27b", model_type="gemma2",
         hidden_size=4608, intermediate_size=36_864, num_hidden_layers=46,
         num_attention_heads=32, num_key_value_heads=16, head_dim=128, vocab_size=256_000,
         max_position_embeddings=8192, tie_word_embeddings=True, sliding_window=4096,
         aliases=("gemma2-27b", "google/gemma-2-27b-it"),
         notes=GATED + "; sliding window 4096 on alternate layers"),
]

# Gemma 3 4B/12B/27B are multimodal (Gemma3ForConditionalGeneration): the values below
# are the language model's, from config.json's text_config (model_type gemma3_text);
# the ~0.4B-parameter SigLIP vision tower is not counted. Their vocabulary is 262208
# (262144 + image tokens); the text-only 1B has 262144. litgpt lists a 131072-token
# context for the 1B; its config.json says 32768.
GEMMA3_MM = ("multimodal: text tower only (vision tower ~0.4B params not counted); "
             + GATED + "; 5 of 6 layers use a 1024-token sliding window")
GEMMA_3 = [
    # https://huggingface.co/google/gemma-3-1b-pt/blob/main/config.json
    dict(name="gemma-3-1b", hf_id="google/gemma-3-1b-pt", model_type="gemma3_text",
         hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
         num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262_144,
         max_position_embeddings=32_768, tie_word_embeddings=True, sliding_window=512,
         sliding_window_pattern=6, aliases=("gemma3-1b", "google/gemma-3-1b-it"),
         notes=GATED + "; text only; 5 of 6 layers use a 512-token sliding window"),
    # https://huggingface.co/google/gemma-3-4b-pt/blob/main/config.json (text_config)
    dict(name="gemma-3-4b", hf_id="google/gemma-3-4b-pt", model_type="gemma3_text",
         hidden_size=2560, intermediate_size=10_240, num_hidden_layers=34,
         num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=262_208,
         max_position_embeddings=131_072, tie_word_embeddings=True, sliding_window=1024,
         sliding_window_pattern=6, aliases=("gemma3-4b", "google/gemma-3-4b-it"),
         notes=GEMMA3_MM),
    # https://huggingface.co/google/gemma-3-12b-pt/blob/main/config.json (text_config)
    dict(name="gemma-3-12b", hf_id="google/gemma-3-12b-pt", model_type="gemma3_text",
         hidden_size=3840, intermediate_size=15_360, num_hidden_layers=48,
         num_attention_heads=16, num_key_value_heads=8, head_dim=256, vocab_size=262_208,
         max_position_embeddings=131_072, tie_word_embeddings=True, sliding_window=1024,
         sliding_window_pattern=6, aliases=("gemma3-12b", "google/gemma-3-12b-it"),
         notes=GEMMA3_MM),
    # https://huggingface.co/google/gemma-3-27b-pt/blob/main/config.json (text_config)
    dict(name="gemma-3-27b", hf_id="google/gemma-3-27b-pt", model_type="gemma3_text",
         hidden_size=5376, intermediate_size=21_504, num_hidden_layers=62,
         num_attention_heads=32, num_key_value_heads=16, head_dim=128, vocab_size=262_208,
         max_position_embeddings=131_072, tie_word_embeddings=True, sliding_window=1024,
         sliding_window_pattern=6, aliases=("gemma3-27b", "google/gemma-3-27b-it"),
         notes=GEMMA3_MM),
]

# Phi-3 fuses q/k/v into one qkv_proj and gate/up into one gate_up_proj (model_type phi3).
PHI = [
    # https://huggingface.co/microsoft/Phi-3.5-mini-instruct/blob/main/config.json
    # litgpt pads to 32064 and lists vocab_size=32000; config.json says 32064.
    dict(name="phi-3.5-mini", hf_id="microsoft/Phi-3.5-mini-instruct", model_type="phi3",
         hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
         num_attention_heads=32, num_key_value_heads=32, vocab_size=32_064,
         max_position_embeddings=131_072,
         aliases=("phi3.5-mini", "phi-3.5-mini-instruct"),
         notes="fused qkv_proj and gate_up_proj; LoRA targets qkv, o, gate_up, down"),
    # https://huggingface.co/microsoft/phi-4/blob/main/config.json
    dict(name="phi-4", hf_id="microsoft/phi-4", model_type="phi3",
         hidden_size=5120, intermediate_size=17_920, num_hidden_layers=40,
         num_attention_heads=40, num_key_value_heads=10, vocab_size=100_352,
         max_position_embeddings=16_384,
         aliases=("phi4", "phi-4-14b"),
         notes="model_type phi3: fused qkv_proj and gate_up_proj"),
]

SMOLLM2 = [
    # https://huggingface.co/HuggingFaceTB/SmolLM2-135M/blob/main/config.json
    dict(name="smollm2-135m", hf_id="HuggingFaceTB/SmolLM2-135M", model_type="llama",
         hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
         num_attention_heads=9, num_key_value_heads=3, vocab_size=49_152,
         max_position_embeddings=8192, tie_word_embeddings=True,
         aliases=("HuggingFaceTB/SmolLM2-135M-Instruct",)),
    # https://huggingface.co/HuggingFaceTB/SmolLM2-360M/blob/main/config.json
    dict(name="smollm2-360m", hf_id="HuggingFaceTB/SmolLM2-360M", model_type="llama",
         hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
         num_attention_heads=15, num_key_value_heads=5, vocab_size=49_152,
         max_position_embeddings=8192, tie_word_embeddings=True,
         aliases=("HuggingFaceTB/SmolLM2-360M-Instruct",)),
    # https://huggingface.co/HuggingFaceTB/SmolLM2-1.7B/blob/main/config.json
    dict(name="smollm2-1.7b", hf_id="HuggingFaceTB/SmolLM2-1.7B", model_type="llama",
         hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
         num_attention_heads=32, num_key_value_heads=32, vocab_size=49_152,
         max_position_embeddings=8192, tie_word_embeddings=True,
         aliases=("HuggingFaceTB/SmolLM2-1.7B-Instruct",)),
]

TINYLLAMA = [
    # https://huggingface.co/TinyLlama/TinyLlama-1.1B-Chat-v1.0/blob/main/config.json
    dict(name="tinyllama-1.1b", hf_id="TinyLlama/TinyLlama-1.1B-Chat-v1.0", model_type="llama",
         hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
         num_attention_heads=32, num_key_value_heads=4, vocab_size=32_000,
         max_position_embeddings=2048,
         aliases=("tinyllama", "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T")),
]

# OLMo 2 norms q and k over their whole width (q_norm: q_size, k_norm: kv_size) and puts its
# two block norms after attention and after the MLP (model_type olmo2).
OLMO_2 = [
    # https://huggingface.co/allenai/OLMo-2-1124-7B/blob/main/config.json
    dict(name="olmo-2-7b", hf_id="allenai/OLMo-2-1124-7B", model_type="olmo2",
         hidden_size=4096, intermediate_size=11_008, num_hidden_layers=32,
         num_attention_heads=32, num_key_value_heads=32, vocab_size=100_352,
         max_position_embeddings=4096, aliases=("olmo2-7b", "allenai/OLMo-2-1124-7B-Instruct")),
    # https://huggingface.co/allenai/OLMo-2-1124-13B/blob/main/config.json
    dict(name="olmo-2-13b", hf_id="allenai/OLMo-2-1124-13B", model_type="olmo2",
         hidden_size=5120, intermediate_size=13_824, num_hidden_layers=40,
         num_attention_heads=40, num_key_value_heads=40, vocab_size=100_352,
         max_position_embeddings=4096,
         aliases=("olmo2-13b", "allenai/OLMo-2-1124-13B-Instruct")),
]

# Granite 3.x is Llama-shaped with scalar multipliers (embedding, attention, residual) and
# logits divided by logits_scaling (16); none of them changes memory (model_type granite).
GRANITE_3 = [
    # https://huggingface.co/ibm-granite/granite-3.3-8b-instruct/blob/main/config.json
    dict(name="granite-3.3-8b", hf_id="ibm-granite/granite-3.3-8b-instruct",
         model_type="granite", hidden_size=4096, intermediate_size=12_800, num_hidden_layers=40,
         num_attention_heads=32, num_key_value_heads=8, vocab_size=49_159,
         max_position_embeddings=131_072, tie_word_embeddings=True,
         aliases=("granite3.3-8b", "ibm-granite/granite-3.3-8b-base")),
]

FAMILIES = {
    "llama-2": LLAMA_2,
    "llama-3": LLAMA_3,
    "mistral": MISTRAL,
    "qwen2.5": QWEN2_5,
    "qwen3": QWEN3,
    "gemma-2": GEMMA_2,
    "gemma-3": GEMMA_3,
    "phi": PHI,
    "smollm2": SMOLLM2,
    "tinyllama": TINYLLAMA,
    "olmo-2": OLMO_2,
    "granite-3": GRANITE_3,
}


def builtin_models() -> list[ModelProfile]:
    out = []
    for family, entries in FAMILIES.items():
        for e in entries:
            e = dict(e)
            e.setdefault("family", family)
            e.setdefault("source", HF.format(e["hf_id"]))
            aliases = tuple(e.get("aliases", ()))
            if e["hf_id"] not in aliases:
                aliases = (e["hf_id"], *aliases)
            e["aliases"] = aliases
            out.append(ModelProfile(**e))
    return out
