"""The analytic GPU-memory model of a QLoRA / LoRA training step.

Each term is a small, named, documented function of the model shape and the settings,
returning bytes; :func:`estimate_memory` adds them into a :class:`MemoryEstimate`.
The peak is what ``nvidia-smi`` would show at the worst moment of a step: CUDA
context + what PyTorch's caching allocator reserves + managed (paged) optimizer memory.

Coefficients that are not pure arithmetic (allocator overhead, the per-token bytes of
activations that autograd keeps) were measured on an H100 with
``benchmarks/memory_accuracy.py``; see ``benchmarks/results/`` and :mod:`.calibration`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from qplan.errors import NotModelledError
from qplan.planner import calibration as C
from qplan.planner.config import TrainConfig
from qplan.profiles.gpus import GIB, GpuProfile
from qplan.profiles.models import ModelProfile

# bitsandbytes 4-bit: two values a byte, one absmax constant per block of 64 values.
QUANT_BLOCKSIZE = 64
# Double quantization: absmax stored in 8 bit, with one fp32 constant per 256 absmax.
DQ_BLOCKSIZE = 256


@dataclass(frozen=True)
class MemoryTerm:
    """One named part of the peak: ``bytes`` of device memory, and why."""

    key: str
    label: str
    bytes: int
    explanation: str

    @property
    def gib(self) -> float:
        return self.bytes / GIB


@dataclass(frozen=True)
class MemoryEstimate:
    """The estimate of one configuration on one GPU (``gpu`` may be None)."""

    model: str
    config: TrainConfig
    terms: tuple[MemoryTerm, ...]
    gpu: str | None = None
    capacity_bytes: int | None = None
    host_pinned_bytes: int = 0  # host RAM for offloaded activations
    notes: tuple[str, ...] = field(default=())

    @property
    def peak_bytes(self) -> int:
        return sum(t.bytes for t in self.terms)

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    @property
    def fits(self) -> bool | None:
        return None if self.capacity_bytes is None else self.peak_bytes <= self.capacity_bytes

    @property
    def headroom_gib(self) -> float | None:
        if self.capacity_bytes is None:
            return None
        return (self.capacity_bytes - self.peak_bytes) / GIB

    def term(self, key: str) -> MemoryTerm:
        for t in self.terms:
            if t.key == key:
                return t
        raise KeyError(key)

    def breakdown(self) -> dict[str, float]:
        """GiB per term, in order."""
        return {t.key: round(t.gib, 3) for t in self.terms}

    def largest(self) -> MemoryTerm:
        return max(self.terms, key=lambda t: t.bytes)


# ---------------------------------------------------------------------------
# helpers
def _tokens(cfg: TrainConfig) -> int:
    """Tokens in one micro-batch."""
    return cfg.batch_size * cfg.seq_len


def _unquantized_dtype_bytes(cfg: TrainConfig) -> int:
    """kbit preparation upcasts every non-4-bit parameter to float32; lean keeps 16-bit."""
    return 4 if cfg.prepare == "kbit" else 2


def _residual_bytes(cfg: TrainConfig) -> int:
    """Bytes per element of the residual stream between blocks.

    With kbit preparation the embedding weights are float32, so the embedding output and
    every residual add after it stay float32 under autocast; lean keeps them 16-bit.
    """
    return 4 if cfg.prepare == "kbit" else 2


def lora_param_count(model: ModelProfile, cfg: TrainConfig) -> int:
    return model.lora_params(cfg.lora_rank, model.resolve_targets(cfg.lora_targets))


# ---------------------------------------------------------------------------
# the terms
def quantized_weights(model: ModelProfile, cfg: TrainConfig) -> int:
    """Every linear weight inside the blocks, stored in 4 bit.

    NF4/FP4 pack two values a byte; each block of 64 values has an absmax constant:
    float32 (4 bytes / 64 values), or with double quantization 8-bit (1 byte / 64) plus
    one float32 per 256 constants. With ``quant="none"`` (plain LoRA) they stay 16-bit.
    """
    n = model.quantized_params
    if cfg.quant == "none":
        return 2 * n
    if cfg.double_quant:
        consts = n / QUANT_BLOCKSIZE * 1 + n / (QUANT_BLOCKSIZE * DQ_BLOCKSIZE) * 4
    else:
        consts = n / QUANT_BLOCKSIZE * 4
    return int(n / 2 + consts)


def unquantized_weights(model: ModelProfile, cfg: TrainConfig) -> int:
    """Embeddings, lm_head (unless tied) and norms, which stay unquantized.

    ``prepare=kbit`` (peft's ``prepare_model_for_kbit_training``) casts them to float32:
    4 bytes a parameter; ``lean`` keeps them in 16-bit: 2 bytes.
    """
    return model.unquantized_params * _unquantized_dtype_bytes(cfg)


def lora_weights(model: ModelProfile, cfg: TrainConfig) -> int:
    """LoRA A and B matrices, r x (in + out) per adapted layer, in float32 (peft's default)."""
    return 4 * lora_param_count(model, cfg)


def lora_gradients(model: ModelProfile, cfg: TrainConfig) -> int:
    """One float32 gradient per LoRA parameter."""
    return 4 * lora_param_count(model, cfg)


def optimizer_states(model: ModelProfile, cfg: TrainConfig) -> int:
    """AdamW's two moments per trainable parameter.

    ``adamw_torch``: two float32 moments, 8 bytes a parameter. ``adamw_8bit`` and
    ``paged_adamw_8bit`` (bitsandbytes): two 8-bit moments plus a float32 absmax per block
    of 256, about 2.03 bytes; paged states live in CUDA managed memory, which ``nvidia-smi``
    counts while resident but PyTorch's allocator does not.
    """
    n = lora_param_count(model, cfg)
    if cfg.optim == "adamw_torch":
        return 8 * n
    return int(n * (2 + 2 * 4 / 256))


def saved_activations(model: ModelProfile, cfg: TrainConfig) -> int:
    """What autograd keeps from the forward pass for the backward pass, over all blocks.

    With gradient checkpointing only each block's input survives (one residual-stream
    tensor, b x s x hidden); without it, every tensor each block saves (see
    :func:`layer_activation_bytes_per_token`). Offloaded activations live in pinned host
    memory instead and cost nothing here.
    """
    t = _tokens(cfg)
    if cfg.grad_ckpt:
        if cfg.offload_activations:
            return 0
        return model.num_hidden_layers * t * model.hidden_size * _residual_bytes(cfg)
    return int(model.num_hidden_layers * t * layer_activation_bytes_per_token(model, cfg))


def layer_activation_bytes_per_token(model: ModelProfile, cfg: TrainConfig) -> float:
    """Bytes autograd saves per token inside one block, without checkpointing.

    Counted tensor by tensor for a Llama-style block under bf16 autocast: the two RMSNorms
    keep their float32 input; q/k/v/o, gate/up/down keep the 16-bit input each LoRA adapter
    needs; RoPE and attention keep q, k, v and the output; SiLU and the gate*up product keep
    three intermediate-size tensors. LoRA dropout adds a mask and a dropped copy of each
    adapted input. Coefficients in :mod:`.calibration` were checked against measurements.
    """
    h, i = model.hidden_size, model.intermediate_size
    q, kv = model.q_size, model.kv_size
    targets = model.resolve_targets(cfg.lora_targets)
    rb = _residual_bytes(cfg)
    per = 0.0
    per += model.norms_per_layer * (4 * h)  # norm input upcast to float32
    per += 2 * rb * h / 2  # residual copies
    per += 2 * h * 2  # normalized inputs of attention and MLP (16-bit)
    per += 2 * (q + 2 * kv) * 2  # q, k, v after RoPE, kept by attention
    per += 2 * q * 2  # attention output, input of o_proj
    per += C.ATTN_EXTRA_PER_TOKEN.get(cfg.attn, 0) * q
    per += 3 * i * 2  # gate, up outputs and act*up product
    if cfg.attn == "eager":
        # attention probabilities: heads x s per token (16-bit) + dropout-free softmax copy
        per += 2 * 2 * model.num_attention_heads * cfg.seq_len
    if cfg.lora_dropout > 0:
        ins = {s.name: s.in_features for s in model.linear_shapes()}
        # dropout keeps a 1-byte mask and the dropped 16-bit copy of each adapted input
        per += sum(3 * ins[t] for t in targets)
    return per * C.ACT_SCALE


def recompute_working_set(model: ModelProfile, cfg: TrainConfig) -> int:
    """Transient memory while one block runs its forward (or recomputed forward) and backward.

    With checkpointing, the block under backward is recomputed, so one block's full
    activations exist at once, plus their gradients; the dequantized 16-bit copy of the
    largest weight exists during each matmul.
    """
    t = _tokens(cfg)
    per_tok = layer_activation_bytes_per_token(model, cfg)
    largest_weight = max(s.weight_params for s in model.linear_shapes()) * 2
    grads = t * (2 * model.intermediate_size * 2 + model.hidden_size * 4)
    if cfg.grad_ckpt:
        return int(t * per_tok + grads + largest_weight)
    return int(grads + largest_weight)


def logits_and_loss(model: ModelProfile, cfg: TrainConfig) -> int:
    """The output layer and the cross-entropy at their peak.

    Standard (transformers' ``ForCausalLMLoss``): 16-bit logits (b x s x vocab), a float32
    upcast, log-softmax saved in float32, and in backward a float32 gradient and its 16-bit
    cast: about ``LOGITS_STANDARD_BYTES`` bytes per logit. Fused (Liger's fused linear cross
    entropy or qplan's chunked loss) never holds the full logits: one chunk of rows at a
    time, plus the float32 gradient of the final hidden states.
    """
    t = _tokens(cfg)
    v = model.vocab_size
    if cfg.loss == "fused":
        chunk = min(t, max(64, C.FUSED_CHUNK_ELEMENTS // v))
        return int(chunk * v * C.LOGITS_FUSED_BYTES + t * model.hidden_size * 4)
    return int(t * v * C.LOGITS_STANDARD_BYTES)


def cuda_context(gpu: GpuProfile | None) -> int:
    """CUDA context and the kernels PyTorch, cuBLAS and bitsandbytes load (not in torch's
    counters, but in what ``nvidia-smi`` shows). Measured; see :mod:`.calibration`."""
    return int(C.CUDA_CONTEXT_GIB * GIB)


def allocator_overhead(model: ModelProfile, cfg: TrainConfig, transient: int) -> int:
    """What the caching allocator reserves beyond what is allocated (fragmentation,
    rounding, cached blocks). A fraction of the transient (activation and logits) memory;
    smaller with ``expandable_segments``. Measured; see :mod:`.calibration`."""
    frac = C.FRAG_EXPANDABLE if cfg.expandable_segments else C.FRAG_DEFAULT
    return int(transient * frac + C.ALLOC_FIXED_GIB * GIB)


# ---------------------------------------------------------------------------
TermFn = Callable[[ModelProfile, TrainConfig], int]


def estimate_memory(model: ModelProfile, cfg: TrainConfig, gpu: GpuProfile | None = None,
                    *, capacity_bytes: int | None = None,
                    adjust: Callable[[list[MemoryTerm], TrainConfig], bool] | None = None,
                    ) -> MemoryEstimate:
    """Estimate the peak device memory of one training step.

    ``capacity_bytes`` defaults to the GPU's memory. ``adjust`` lets plugins add or change
    terms in place (the ``adjust_memory`` hook); it returns True when a plugin modelled this
    architecture. Raises :class:`NotModelledError` for mixtures of experts unless a plugin did.
    """
    if cfg.attn == "flash_attention_2" and gpu is not None and not gpu.flash_attention_2:
        raise NotModelledError(
            f"flash_attention_2 needs compute capability 8.0 or newer; {gpu.name} has "
            f"{gpu.cc_str}. Use --attn sdpa.")
    act = saved_activations(model, cfg)
    work = recompute_working_set(model, cfg)
    logits = logits_and_loss(model, cfg)
    # The logits peak and the block-backward peak do not overlap: the loss backward
    # finishes (and frees its float32 buffers) before the last block's backward starts.
    transient = max(work, logits)
    terms = [
        MemoryTerm("base_weights_4bit", "base weights (4-bit)" if cfg.quant != "none"
                   else "base weights (16-bit)", quantized_weights(model, cfg),
                   quantized_weights.__doc__.split("\n")[0]),
        MemoryTerm("unquantized_weights", "embeddings, lm_head, norms",
                   unquantized_weights(model, cfg), unquantized_weights.__doc__.split("\n")[0]),
        MemoryTerm("lora_adapters", "LoRA adapters", lora_weights(model, cfg),
                   lora_weights.__doc__.split("\n")[0]),
        MemoryTerm("gradients", "LoRA gradients", lora_gradients(model, cfg),
                   lora_gradients.__doc__.split("\n")[0]),
        MemoryTerm("optimizer_states", "optimizer states", optimizer_states(model, cfg),
                   optimizer_states.__doc__.split("\n")[0]),
        MemoryTerm("activations", "saved activations", act,
                   saved_activations.__doc__.split("\n")[0]),
        MemoryTerm("logits_or_working_set",
                   "logits and loss" if logits >= work else "block backward working set",
                   transient, "the larger of the loss peak and one block's backward peak"),
        MemoryTerm("allocator_overhead", "allocator overhead",
                   allocator_overhead(model, cfg, act + transient),
                   allocator_overhead.__doc__.split("\n")[0]),
        MemoryTerm("cuda_context", "CUDA context", cuda_context(gpu),
                   cuda_context.__doc__.split("\n")[0]),
    ]
    handled = adjust(terms, cfg) if adjust is not None else False
    if model.is_moe and not handled:
        raise NotModelledError(
            f"{model.name} is a mixture of experts ({model.num_local_experts} experts); qplan's "
            "memory model covers dense decoders only. A plugin can supply MoE terms through "
            "the adjust_memory hook; dense models of similar size: see `qplan models`.")
    cap = capacity_bytes if capacity_bytes is not None else (gpu.memory_bytes if gpu else None)
    host = 0
    if cfg.offload_activations and cfg.grad_ckpt:
        host = model.num_hidden_layers * _tokens(cfg) * model.hidden_size * _residual_bytes(cfg)
    return MemoryEstimate(model=model.name, config=cfg, terms=tuple(terms),
                          gpu=gpu.name if gpu else None, capacity_bytes=cap,
                          host_pinned_bytes=host)
