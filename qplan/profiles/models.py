"""Model shapes, as plain data, with Hugging Face ``config.json`` field names.

One dataclass, :class:`ModelProfile`; the catalogue entries live in
:mod:`qplan.profiles.model_catalog` as plain dicts, each headed by the URL of the
``config.json`` it was copied from. Everything derived (head size, the shapes of the
linear layers, parameter counts) is computed here from those fields, never stored twice.
No torch is imported here: listing and planning stay fast.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from qplan.errors import ConfigError, NotModelledError

# Canonical LoRA target names -> Hugging Face module names, per layout.
LLAMA_TARGETS = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
}
# Fields some config.json files leave to the transformers class default. The multimodal
# Gemma 3 configs (4B and up) give only a few text_config fields; these are
# transformers' Gemma3TextConfig defaults (the 4B's values).
CONFIG_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma3_text": dict(vocab_size=262_208, num_attention_heads=8, num_key_value_heads=4,
                        head_dim=256, max_position_embeddings=131_072),
}
CONFIG_DEFAULTS["gemma3"] = CONFIG_DEFAULTS["gemma3_text"]  # text_config without model_type
# Profile fields that come from qplan, never from a config.json.
_NOT_FROM_CONFIG = ("name", "hf_id", "source", "family", "aliases", "notes", "provider",
                    "unmodelled")
# Heads of a causal language model (``architectures`` in config.json); anything else
# (BertForMaskedLM, ...ForSequenceClassification, an encoder-decoder) is not modelled.
CAUSAL_HEADS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
# Sub-configs of the towers a multimodal model adds to its language model.
TOWER_CONFIGS = ("vision_config", "audio_config", "vision_tower", "mm_vision_tower")


def _not_causal(config: dict[str, Any]) -> str | None:
    """Why ``config`` is not a decoder-only causal LM qplan can plan (None if it is)."""
    arch = config.get("architectures") or []
    if config.get("is_encoder_decoder"):
        return "an encoder-decoder model (is_encoder_decoder)"
    if isinstance(arch, list) and arch and not any(
            isinstance(a, str) and a.endswith(CAUSAL_HEADS) for a in arch):
        return f"not a causal language model (architectures: {', '.join(map(str, arch))})"
    return None


def _towers(config: dict[str, Any]) -> str:
    """The towers a multimodal config adds, in words ("" for a text-only model)."""
    out = []
    for k in TOWER_CONFIGS:
        v = config.get(k)
        if v:
            kind = v.get("model_type", "") if isinstance(v, dict) else str(v)
            out.append(f"{k.replace('_config', '').replace('mm_', '').replace('_', ' ')}"
                       + (f" ({kind})" if kind else ""))
    return ", ".join(out)


def _default_tie(model_type: str) -> bool:
    """transformers' default ``tie_word_embeddings``: True for Gemma, False for the rest."""
    return model_type.startswith("gemma")


# Phi-3 fuses q/k/v and gate/up into one projection each.
PHI3_TARGETS = {
    "qkv": "qkv_proj",
    "o": "o_proj",
    "gate_up": "gate_up_proj",
    "down": "down_proj",
}


# model_type -> why transformers has no sdpa attention for it (it refuses to load with sdpa)
NO_SDPA = {"gemma2": "Gemma 2 soft-caps its attention logits, which sdpa cannot"}


@dataclass(frozen=True)
class LinearShape:
    """One linear layer inside a transformer block (repeated once per block)."""

    name: str  # canonical short name: "q", "gate_up", ...
    module: str  # Hugging Face module name: "q_proj", ...
    in_features: int
    out_features: int
    bias: bool = False

    @property
    def weight_params(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class ModelProfile:
    """The shape of a decoder-only transformer, in ``config.json`` field names.

    ``name`` is qplan's short name (``llama-3.1-8b``); ``hf_id`` the hub repository;
    ``source`` the URL of the ``config.json`` the numbers were copied from.
    """

    name: str
    hf_id: str
    source: str
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int
    head_dim: int | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    # Mixture of experts (0 = dense). MoE memory is not modelled by the core:
    # a plugin may supply it through the ``adjust_memory`` hook.
    num_local_experts: int = 0
    num_experts_per_tok: int = 0
    # Sliding-window attention: the window (tokens), and which blocks use it: ``layer_types``
    # as config.json lists them ("sliding_attention" / "full_attention"), or Gemma 3's
    # ``sliding_window_pattern`` (every n-th block is global); Gemma 2 alternates.
    sliding_window: int | None = None
    sliding_window_pattern: int | None = None
    layer_types: tuple[str, ...] | None = None
    family: str = ""
    aliases: tuple[str, ...] = ()
    # Free-form notes shown by ``qplan models`` (e.g. "gated on the hub").
    notes: str = ""
    # Who registered it ("qplan" for built-ins, else the plugin's name).
    provider: str = field(default="qplan", compare=False)
    # What of the model the memory model does not count ("" = nothing): a multimodal
    # model's vision tower. Planning says so; ``qplan run`` refuses such a model.
    unmodelled: str = ""

    def __post_init__(self) -> None:
        problems = []
        for f in ("hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "vocab_size",
                  "max_position_embeddings"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                problems.append(f"{f} must be a positive integer (got {v!r})")
        if not problems and self.num_attention_heads % self.num_key_value_heads:
            problems.append(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if problems:
            raise ConfigError(f"model {self.name!r}: " + "; ".join(problems))

    # ---- derived shape -------------------------------------------------
    @property
    def head_size(self) -> int:
        """Per-head dimension: ``head_dim`` when the config sets it, else hidden/heads."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_size

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_size

    @property
    def final_logit_softcapping(self) -> bool:
        """Gemma 2 soft-caps its logits with tanh (more logits copies in the loss)."""
        return self.model_type == "gemma2"

    @property
    def sdpa_supported(self) -> bool:
        """Whether transformers runs this architecture's attention through sdpa. Gemma 2
        soft-caps its attention logits (``attn_logit_softcapping``), which sdpa cannot:
        transformers refuses sdpa for it (``_supports_sdpa = False``), leaving eager
        attention (or flash-attention 2), which keeps the attention matrix."""
        return self.model_type not in NO_SDPA

    @property
    def is_moe(self) -> bool:
        return self.num_local_experts > 0

    @property
    def fused_projections(self) -> bool:
        """Phi-3 style: one ``qkv_proj`` and one ``gate_up_proj``."""
        return self.model_type == "phi3"

    @property
    def target_names(self) -> dict[str, str]:
        """Canonical LoRA target name -> module name for this layout."""
        return PHI3_TARGETS if self.fused_projections else LLAMA_TARGETS

    def linear_shapes(self) -> tuple[LinearShape, ...]:
        """The linear layers of one block (all of them are quantized to 4 bit)."""
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.q_size, self.kv_size
        b = self.attention_bias
        if self.fused_projections:
            return (
                LinearShape("qkv", "qkv_proj", h, q + 2 * kv, b),
                LinearShape("o", "o_proj", q, h),
                LinearShape("gate_up", "gate_up_proj", h, 2 * i),
                LinearShape("down", "down_proj", i, h),
            )
        return (
            LinearShape("q", "q_proj", h, q, b),
            LinearShape("k", "k_proj", h, kv, b),
            LinearShape("v", "v_proj", h, kv, b),
            LinearShape("o", "o_proj", q, h),
            LinearShape("gate", "gate_proj", h, i),
            LinearShape("up", "up_proj", h, i),
            LinearShape("down", "down_proj", i, h),
        )

    def layer_kinds(self) -> dict[str, int]:
        """How many blocks of each attention kind the model has (transformers' rules)."""
        if self.layer_types:
            out: dict[str, int] = {}
            for t in self.layer_types:
                out[t] = out.get(t, 0) + 1
            return out
        n = self.num_hidden_layers
        if not self.sliding_window:
            return {"full_attention": n}
        if self.model_type in ("gemma2", "gemma3", "gemma3_text"):
            pattern = self.sliding_window_pattern or (2 if self.model_type == "gemma2" else 6)
            full = n // pattern
            return {"sliding_attention": n - full, "full_attention": full} if full else \
                {"sliding_attention": n}
        return {"sliding_attention": n}  # Mistral v0.1 style: every block has the window

    @property
    def first_layer_kind(self) -> str:
        if self.layer_types:
            return self.layer_types[0]
        return next(iter(self.layer_kinds()))

    @property
    def norms_per_layer(self) -> int:
        """RMSNorm weights per block: 4 for Gemma 2/3 (pre/post), else 2.

        Qwen3 and Gemma 3 also norm q and k per head (``q_norm``/``k_norm``);
        those are counted in :attr:`qk_norm_params`.
        """
        return 4 if self.model_type in ("gemma2", "gemma3", "gemma3_text") else 2

    @property
    def qk_norm_params(self) -> int:
        """q/k norm weights per block: per head (Qwen3, Gemma 3) or over the whole q and k
        widths (OLMo 2)."""
        if self.model_type == "olmo2":
            return self.q_size + self.kv_size
        return 2 * self.head_size if self.model_type in ("qwen3", "gemma3", "gemma3_text") else 0

    # ---- parameter counts ---------------------------------------------
    @property
    def linear_params_per_layer(self) -> int:
        return sum(s.weight_params for s in self.linear_shapes())

    @property
    def quantized_params(self) -> int:
        """Parameters stored in 4 bit: every linear weight inside the blocks."""
        return self.linear_params_per_layer * self.num_hidden_layers

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        """0 when the output layer is tied to the embeddings."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def small_params(self) -> int:
        """Norm weights and biases: kept unquantized, tiny."""
        per_layer = self.norms_per_layer * self.hidden_size + self.qk_norm_params
        per_layer += sum(s.out_features for s in self.linear_shapes() if s.bias)
        return per_layer * self.num_hidden_layers + self.hidden_size  # + final norm

    @property
    def unquantized_params(self) -> int:
        return self.embedding_params + self.lm_head_params + self.small_params

    @property
    def total_params(self) -> int:
        return self.quantized_params + self.unquantized_params

    def lora_params(self, rank: int, targets: tuple[str, ...]) -> int:
        """LoRA A and B parameters for the given canonical targets, over all blocks."""
        per_layer = sum(rank * (s.in_features + s.out_features)
                        for s in self.linear_shapes() if s.name in targets)
        return per_layer * self.num_hidden_layers

    def resolve_targets(self, targets: tuple[str, ...] | None) -> tuple[str, ...]:
        """Canonical target names; ``None`` or ``("all",)`` means every linear layer.

        Accepts canonical names (``q``) or module names (``q_proj``).
        """
        names = self.target_names
        if not targets or tuple(targets) in (("all",), ("all-linear",)):
            return tuple(names)
        by_module = {m: c for c, m in names.items()}
        out = []
        for t in targets:
            t = t.strip()
            if t in names:
                out.append(t)
            elif t in by_module:
                out.append(by_module[t])
            else:
                avail = ", ".join(f"{c} ({m})" for c, m in names.items())
                raise ConfigError(
                    f"LoRA target {t!r} is not a linear layer of {self.name}; "
                    f"available: {avail}. Use --targets all for every one.")
        return tuple(dict.fromkeys(out))

    # ---- (de)serialisation --------------------------------------------
    @classmethod
    def from_config_dict(cls, config: dict[str, Any], *, name: str, hf_id: str = "",
                         source: str = "") -> "ModelProfile":
        """Build a profile from a Hugging Face ``config.json`` dict.

        Multimodal configs that nest the language model under ``text_config`` are
        unwrapped (their towers are named in ``unmodelled``). Raises :class:`ConfigError`
        naming every missing field, :class:`NotModelledError` for a model that is not a
        decoder-only causal LM (BERT, T5, a classifier).
        """
        why = _not_causal(config)
        if why is not None:
            raise NotModelledError(
                f"{name!r} is {why}; qplan plans and trains decoder-only causal language "
                "models (LlamaForCausalLM, Qwen2ForCausalLM, ...). See `qplan models`.")
        towers = _towers(config)
        if isinstance(config.get("text_config"), dict) and "hidden_size" not in config:
            inner = dict(config["text_config"])
            inner.setdefault("model_type", config.get("model_type", ""))
            if "tie_word_embeddings" in config:
                inner.setdefault("tie_word_embeddings", config["tie_word_embeddings"])
            config = inner
        model_type = config.get("model_type") or "llama"
        defaults = CONFIG_DEFAULTS.get(model_type, {})
        config = {**defaults, **{k: v for k, v in config.items()
                                 if v is not None or k not in defaults}}
        required = ["hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "vocab_size"]
        missing = [k for k in required if config.get(k) is None]
        if missing:
            raise ConfigError(
                f"config for {name!r} is missing {', '.join(missing)}; a decoder-only "
                "model's config.json needs hidden_size, intermediate_size, num_hidden_layers, "
                "num_attention_heads and vocab_size")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in known and k not in _NOT_FROM_CONFIG}
        kwargs.setdefault("num_key_value_heads", config["num_attention_heads"])
        if kwargs.get("num_key_value_heads") is None:
            kwargs["num_key_value_heads"] = config["num_attention_heads"]
        if kwargs.get("max_position_embeddings") is None:
            kwargs["max_position_embeddings"] = 4096
        kwargs["model_type"] = model_type
        if config.get("num_local_experts") is None:
            kwargs.pop("num_local_experts", None)
        if config.get("num_experts") and not kwargs.get("num_local_experts"):
            kwargs["num_local_experts"] = config["num_experts"]
        if kwargs.get("head_dim") is None:
            kwargs.pop("head_dim", None)
        tie = config.get("tie_word_embeddings")
        kwargs["tie_word_embeddings"] = _default_tie(model_type) if tie is None else bool(tie)
        kwargs["attention_bias"] = bool(config.get("attention_bias", False)) or \
            config.get("model_type") == "qwen2"
        if kwargs.get("num_experts_per_tok") is None:
            kwargs.pop("num_experts_per_tok", None)
        if isinstance(kwargs.get("layer_types"), list):
            kwargs["layer_types"] = tuple(kwargs["layer_types"])
        if not isinstance(kwargs.get("sliding_window"), int) or \
                (model_type.startswith("qwen") and not config.get("use_sliding_window")):
            kwargs["sliding_window"] = None  # Qwen2/3 keep a window in config.json but off
        if not isinstance(kwargs.get("sliding_window_pattern"), int):
            kwargs.pop("sliding_window_pattern", None)
        return cls(name=name, hf_id=hf_id or name, source=source, unmodelled=towers, **kwargs)

    def to_config_dict(self) -> dict[str, Any]:
        """The ``config.json`` fields this profile holds (for building a model)."""
        d = {
            "model_type": self.model_type,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
        }
        if self.head_dim:
            d["head_dim"] = self.head_dim
        if self.attention_bias and self.model_type not in ("qwen2",):
            d["attention_bias"] = True
        if self.is_moe:
            d["num_local_experts"] = self.num_local_experts
            d["num_experts_per_tok"] = self.num_experts_per_tok
        if self.model_type == "mistral":
            # MistralConfig defaults to a 4096-token window; v0.3 and Nemo have none.
            d["sliding_window"] = self.sliding_window
        elif self.sliding_window:
            d["sliding_window"] = self.sliding_window
        if self.sliding_window_pattern:
            d["sliding_window_pattern"] = self.sliding_window_pattern
        if self.layer_types:
            d["layer_types"] = list(self.layer_types)
        return d
