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

from dataclasses import dataclass, field, replace
from typing import Any, Callable

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
    basis: str = "analytic"  # "counted": dry-run figures of this architecture
    regime: str = ""  # the counted regimes the activation terms come from
    paged_bytes: int = 0  # paged optimizer states (managed memory, outside the peak)
    band_bytes: int = 0  # how far above the estimate the real peak may be (see uncertainty_band)

    @property
    def peak_bytes(self) -> int:
        return sum(t.bytes for t in self.terms)

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    @property
    def band_gib(self) -> float:
        return self.band_bytes / GIB

    @property
    def safe_peak_bytes(self) -> int:
        """The peak with its uncertainty band: what a plan must keep under the card."""
        return self.peak_bytes + self.band_bytes

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
def _sharded(cfg: TrainConfig) -> int:
    """How many GPUs a sharded tensor is split across: ``gpus`` under FSDP, else 1."""
    return cfg.gpus if cfg.strategy == "fsdp" else 1


def params_offloaded(cfg: TrainConfig) -> bool:
    """FSDP with CPU offload: the shards live in host memory, not on the GPU
    (TrainConfig refuses ``offload_params`` without strategy fsdp)."""
    return cfg.offload_params


def offloaded_host_bytes(model: ModelProfile, cfg: TrainConfig) -> int:
    """With ``offload_params``, per process: the pinned host memory its shards take, the
    4-bit values, the embeddings, norms and output layer, the LoRA weights, their gradients
    and the optimizer states (1/gpus of each); 0 otherwise."""
    if not params_offloaded(cfg):
        return 0
    n = _sharded(cfg)
    lora = lora_param_count(model, cfg)
    return int((_quant_payload(model.quantized_params, cfg)
                + model.unquantized_params * _unquantized_dtype_bytes(cfg)
                + 4 * lora + 4 * lora) / n + optimizer_states(model, cfg))


def _quant_payload(n: int, cfg: TrainConfig) -> float:
    """Bytes of ``n`` linear weights' values: half a byte each in 4 bit, 2 in 16-bit."""
    return 2 * n if cfg.quant == "none" else n / 2


def _quant_constants(n: int, cfg: TrainConfig) -> float:
    """Bytes of the quantization constants (absmax) of ``n`` 4-bit weights."""
    if cfg.quant == "none":
        return 0
    if cfg.double_quant:
        return n / QUANT_BLOCKSIZE * 1 + n / (QUANT_BLOCKSIZE * DQ_BLOCKSIZE) * 4
    return n / QUANT_BLOCKSIZE * 4


def quantized_weights(model: ModelProfile, cfg: TrainConfig) -> int:
    """Every linear weight inside the blocks, stored in 4 bit.

    NF4/FP4 pack two values a byte; each block of 64 values has an absmax constant:
    float32 (4 bytes / 64 values), or with double quantization 8-bit (1 byte / 64) plus
    one float32 per 256 constants. With ``quant="none"`` (plain LoRA) they stay 16-bit.
    Under FSDP each GPU keeps 1/gpus of the packed values; the constants (bitsandbytes'
    quantization state, kept beside the module, not a parameter) stay whole on every GPU,
    also with ``offload_params``, which keeps only the values in host memory.
    """
    n = model.quantized_params
    payload = 0 if params_offloaded(cfg) else _quant_payload(n, cfg) / _sharded(cfg)
    return int(payload + _quant_constants(n, cfg))


def unquantized_weights(model: ModelProfile, cfg: TrainConfig) -> int:
    """Embeddings, lm_head (unless tied) and norms, which stay unquantized.

    ``prepare=kbit`` (peft's ``prepare_model_for_kbit_training``) casts them to float32:
    4 bytes a parameter; ``lean`` keeps them in 16-bit: 2 bytes. Under FSDP, 1/gpus of them;
    none with ``offload_params`` (in host memory).
    """
    if params_offloaded(cfg):
        return 0
    n = model.unquantized_params
    if cfg.embed_on_cpu and not model.tie_word_embeddings:
        n -= model.embedding_params  # in host memory
    return n * _unquantized_dtype_bytes(cfg) // _sharded(cfg)


def lora_weights(model: ModelProfile, cfg: TrainConfig) -> int:
    """LoRA A and B matrices, r x (in + out) per adapted layer, in float32 (peft's default).

    Under FSDP, 1/gpus of them; none with ``offload_params`` (in host memory)."""
    if params_offloaded(cfg):
        return 0
    return 4 * lora_param_count(model, cfg) // _sharded(cfg)


def lora_gradients(model: ModelProfile, cfg: TrainConfig) -> int:
    """One float32 gradient per LoRA parameter.

    Under FSDP, for this GPU's shard of them; with ``offload_params`` they are copied to the
    host as they are made (none kept on the GPU)."""
    if params_offloaded(cfg):
        return 0
    return 4 * lora_param_count(model, cfg) // _sharded(cfg)


def ddp_gradient_buckets(model: ModelProfile, cfg: TrainConfig) -> int:
    """With ``gpus`` > 1: DDP's flat gradient buckets, a second float32 copy of the LoRA
    gradients that the all-reduce runs on (``gradient_as_bucket_view`` is off in Trainer)."""
    return lora_gradients(model, cfg) if cfg.gpus > 1 and cfg.strategy == "ddp" else 0


def gathered_blocks_bytes(model: ModelProfile, cfg: TrainConfig) -> float:
    """Every decoder block as FSDP gathers it: the packed 4-bit values, the norms and the LoRA
    matrices in 16-bit (what one GPU receives whole, block by block, each pass)."""
    return (_quant_payload(model.quantized_params, cfg) + 2 * model.small_params
            + 2 * lora_param_count(model, cfg))


def fsdp_gathered_weights(model: ModelProfile, cfg: TrainConfig) -> int:
    """Under FSDP: the whole (gathered) weights a GPU holds at the peak besides its shards.

    accelerate's FSDP2 wraps every decoder block, the input embeddings, and the final norm
    with the output layer (kept gathered from the end of forward into backward) as units.
    At the loss every GPU holds the output layer (the tied embeddings) whole, in 16-bit,
    twice while it is gathered (FSDP2 gathers a unit into one buffer, then copies each
    parameter out of it), and the blocks being computed, the same way (each block's packed
    4-bit values, its norms and its LoRA matrices cast to 16-bit): see
    :data:`calibration.FSDP_GATHERED_BLOCKS`.
    """
    if cfg.strategy != "fsdp":
        return 0
    block = gathered_blocks_bytes(model, cfg) / model.num_hidden_layers
    head = 2 * (model.lm_head_params or model.embedding_params)
    return int(C.FSDP_GATHERED_HEAD * head + C.FSDP_GATHERED_BLOCKS * block)


def collective_buffers(cfg: TrainConfig) -> int:
    """With ``gpus`` > 1: NCCL's communicator buffers on each GPU, outside PyTorch's
    allocator (in what ``nvidia-smi`` shows). Measured; see :mod:`.calibration`."""
    return int(C.NCCL_BUFFERS_GIB * GIB) if cfg.gpus > 1 else 0


def fsdp_loading_note(model: ModelProfile, cfg: TrainConfig) -> str:
    """What loading an FSDP plan asks of the host: every process reads the 16-bit checkpoint
    and quantizes it in host memory before the GPUs receive their shards; each holds its own
    4-bit copy (:data:`calibration.FSDP_LOAD_HOST_EXTRA_GIB` more), the file's pages are
    shared (measured for a 32B model on two H200s)."""
    ckpt = 2 * model.total_params / GIB
    four = (quantized_weights(model, cfg.with_(strategy="ddp", gpus=1, offload_params=False))
            + model.unquantized_params * 2) / GIB
    need = cfg.gpus * (four + C.FSDP_LOAD_HOST_EXTRA_GIB)
    if cfg.gpus == 1:
        return (f"loading: the training process reads the {ckpt:.0f} GiB 16-bit checkpoint and "
                f"quantizes it on the host into a {four:.1f} GiB 4-bit copy: ~{need:.0f} GiB of "
                f"host memory, plus the checkpoint's file pages (with less memory the system "
                f"evicts them and loading reads the file again, slower)")
    return (f"loading: each of the {cfg.gpus} processes reads the {ckpt:.0f} GiB 16-bit checkpoint "
            f"and quantizes it on the host into its own {four:.1f} GiB 4-bit copy before its "
            f"GPU gets its shard: ~{need:.0f} GiB of host memory for the {cfg.gpus}, plus the "
            f"checkpoint's file pages (shared; with less memory the system evicts them and "
            f"loading reads the file again, slower)")


def offload_note(model: ModelProfile, cfg: TrainConfig) -> str:
    """What ``offload_params`` keeps in host memory, and what it costs."""
    each = " each" if cfg.gpus > 1 else ""
    return (f"CPU offload: the weights' shards, the adapters and the optimizer states live in "
            f"pinned host memory ({offloaded_host_bytes(model, cfg) / GIB:.1f} GiB{each}); "
            f"every block is copied to the GPU{'s' if cfg.gpus > 1 else ''} twice a "
            f"micro-batch and the optimizer steps on the CPU: slow, but the model trains")


def optimizer_states(model: ModelProfile, cfg: TrainConfig) -> int:
    """AdamW's two moments per trainable parameter.

    ``adamw_torch``: two float32 moments, 8 bytes a parameter. ``adamw_8bit`` and
    ``paged_adamw_8bit`` (bitsandbytes): two 8-bit moments plus a float32 absmax per block
    of 256, about 2.03 bytes; paged states live in CUDA managed memory, outside PyTorch's
    allocator, paged in for the optimizer step (see :func:`optimizer_states_at_peak`).
    """
    n = lora_param_count(model, cfg) / _sharded(cfg)  # FSDP: this GPU's shard
    if cfg.optim == "adamw_torch":
        return int(8 * n)
    return int(n * (2 + 2 * 4 / 256))


def optimizer_states_at_peak(model: ModelProfile, cfg: TrainConfig) -> int:
    """Optimizer states on the device at the activation peak: all of them, except paged
    ones, which bitsandbytes keeps in managed memory and pages in for the optimizer step,
    after the activations are freed (the runner's NVML readings never show them), and
    offloaded ones (``offload_params``: the optimizer steps on the CPU)."""
    if cfg.optim == "paged_adamw_8bit" or params_offloaded(cfg):
        return 0
    return optimizer_states(model, cfg)


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
    if cfg.mlp_chunk:  # MLP internals recomputed per chunk, not saved
        return int(model.num_hidden_layers * t * (layer_activation_bytes_per_token(model, cfg)
                                                  - mlp_bytes_per_token(model, cfg)))
    return int(model.num_hidden_layers * t * layer_activation_bytes_per_token(model, cfg))


def layer_activation_bytes_per_token(model: ModelProfile, cfg: TrainConfig) -> float:
    """Bytes autograd keeps per token inside one block, without checkpointing.

    Under bf16 autocast a Llama-style block keeps, per token: the float32 inputs of its
    RMSNorms, the 16-bit inputs each LoRA adapter needs, q/k/v after RoPE and the attention
    output, and the MLP's gate/up/activation tensors. With ``prepare=kbit`` the residual
    stream is float32 (float32 embeddings), and bitsandbytes returns each projection in the
    input's dtype, so the q/k/v and MLP tensors are float32 too. LoRA dropout keeps a mask
    and a dropped copy of each adapted input.

    Measured, not guessed: the coefficients (bytes per element of the hidden size, the
    intermediate size, the q/k/v width, and each adapted input under dropout) were fitted
    to the no-checkpointing runs in ``benchmarks/results/raw`` (6 architectures, 1B to 8B,
    residuals within 3%); see :mod:`.calibration`.
    """
    c = C.ACT_COEF[_coef_key(cfg)]
    per = (c["h"] * model.hidden_size + c["i"] * model.intermediate_size
           + c["qkv"] * (model.q_size + 2 * model.kv_size))
    if cfg.lora_dropout > 0:
        ins = {s.name: s.in_features for s in model.linear_shapes()}
        per += c["dropout"] * sum(ins[t] for t in model.resolve_targets(cfg.lora_targets))
    if cfg.recompute_norms:
        per -= C.NORM_SAVED_PER_H * model.norms_per_layer * model.hidden_size
    if cfg.attn == "eager":
        # eager attention keeps the probabilities (16-bit) and their float32 softmax:
        # heads x seq per token. Not measured on the GPU: an analytic count.
        per += 6 * model.num_attention_heads * cfg.seq_len
    return per


def mlp_bytes_per_token(model: ModelProfile, cfg: TrainConfig) -> float:
    """The intermediate-size part of :func:`layer_activation_bytes_per_token` (the MLP's
    gate, up and product tensors): what ``mlp_chunk`` keeps to one chunk of tokens."""
    return C.ACT_COEF[_coef_key(cfg)]["i"] * model.intermediate_size


def _coef_key(cfg: TrainConfig) -> str:
    """Which fitted activation coefficients apply: kbit's or lean's."""
    return "kbit" if cfg.prepare == "kbit" else "lean"


def _tiled_tokens(cfg: TrainConfig) -> int:
    """Tokens whose MLP tensors exist at once: a chunk per sequence when tiled, else all."""
    if cfg.mlp_chunk:
        return cfg.batch_size * min(cfg.seq_len, cfg.mlp_chunk)
    return _tokens(cfg)


def _offloaded(cfg: TrainConfig) -> bool:
    """Activation offload moves the checkpointed block inputs: only with checkpointing."""
    return cfg.offload_activations and cfg.grad_ckpt


def block_activation_bytes(model: ModelProfile, cfg: TrainConfig) -> float:
    """One recomputed block's activations for the micro-batch, with MLP tiling, lean norms
    and offload taken into account (the extras are per token per hidden element, measured;
    see :mod:`.calibration`)."""
    t = _tokens(cfg)
    mlp = mlp_bytes_per_token(model, cfg)
    tiled = _tiled_tokens(cfg)
    per_h = 0.0
    if cfg.mlp_chunk:
        per_h += C.TILED_EXTRA_PER_H
        if cfg.recompute_norms:
            per_h -= C.NORM_BACKWARD_TEMP_PER_H
    if _offloaded(cfg):
        per_h += C.OFFLOAD_EXTRA_PER_H
    extra = per_h * model.hidden_size * t
    return t * (layer_activation_bytes_per_token(model, cfg) - mlp) + tiled * mlp + extra


def block_backward_peak(model: ModelProfile, cfg: TrainConfig) -> int:
    """Transient memory while one block runs its backward pass.

    With checkpointing, the block is first recomputed, so one block's full activations
    exist at once, plus the gradients flowing through it: measured as
    ``BLOCK_BACKWARD_FACTOR`` times one block's activations. Without checkpointing those
    activations are already counted in :func:`saved_activations`.
    """
    if not cfg.grad_ckpt:
        if cfg.mlp_chunk:  # one tiled chunk recomputed
            return int(C.BLOCK_BACKWARD_FACTOR * _tiled_tokens(cfg) * mlp_bytes_per_token(model, cfg))
        return 0
    return int(C.BLOCK_BACKWARD_FACTOR * block_activation_bytes(model, cfg))


def logits_and_loss(model: ModelProfile, cfg: TrainConfig) -> int:
    """The output layer and the cross-entropy at their peak.

    Standard (transformers' ``ForCausalLMLoss``): 16-bit logits (b x s x vocab), their
    float32 upcast, the float32 log-softmax kept for backward and the float32 gradient:
    measured at ``LOGITS_STANDARD_BYTES`` bytes per logit. Fused (qplan's chunked loss, or
    Liger's fused linear cross entropy) holds one chunk of rows at a time
    (``loss_chunk`` logits). With ``prepare=kbit`` the float32 lm_head is cast to
    16-bit for every use under autocast: one more vocab x hidden 16-bit copy.
    """
    t = _tokens(cfg)
    v = model.vocab_size
    per_logit = C.LOGITS_STANDARD_BYTES
    if model.final_logit_softcapping:
        per_logit += C.LOGITS_SOFTCAP_EXTRA_BYTES
    if cfg.loss == "fused":
        rows = min(t, cfg.loss_chunk_rows(v))
        peak = rows * v * per_logit
    else:
        peak = t * v * per_logit
    if cfg.prepare == "kbit":
        peak += 2 * v * model.hidden_size
    return int(peak)


def attention_mask(model: ModelProfile, cfg: TrainConfig) -> int:
    """The mask that keeps packed examples apart: with ``packed_rows`` and sdpa or eager
    attention, transformers materializes a boolean batch x seq x seq mask (one byte an
    element), shared by every block and alive for the whole step. Seen on the GPU: a
    48,896-token packed row ran out of memory under a 15.15 GiB cap where the estimate
    without this term (14.07 GiB) said it fit (benchmarks/results/runner_gpu_longest/)."""
    if not cfg.packed_rows or cfg.attn == "flash_attention_2":
        return 0
    return cfg.batch_size * cfg.seq_len * cfg.seq_len


def cuda_context(gpu: GpuProfile | None) -> int:
    """The CUDA context of the training process (what ``nvidia-smi`` shows for it before
    anything is allocated). Measured; see :mod:`.calibration`."""
    return int(C.CUDA_CONTEXT_GIB * GIB)


def libraries(gpu: GpuProfile | None) -> int:
    """Workspaces and kernels of cuBLAS, cuDNN and bitsandbytes: in what ``nvidia-smi``
    shows, not in PyTorch's counters. Measured; see :mod:`.calibration`."""
    return int(C.LIBRARIES_GIB * GIB)


def uncertainty_band(terms: list[MemoryTerm], basis: str) -> int:
    """How much higher than the estimate a real peak may be, from the held-out errors of
    the GPU grids: a share of the memory above the CUDA context for counted
    architectures (more under FSDP), a larger share of the activation memory for analytic ones (their
    per-token terms were fitted to Llama-like blocks and miss what other blocks keep)."""
    by = {t.key: t.bytes for t in terms}
    above_context = sum(by.values()) - by.get("cuda_context", 0)
    band = C.BAND_COUNTED * above_context
    if by.get("fsdp_gathered"):  # sharded plans: measured on few runs, a wider band
        band += C.BAND_FSDP * above_context
    if basis != "counted":
        dynamic = sum(by.get(k, 0) for k in ("activations", "attention_mask", "logits_or_working_set"))
        band += C.BAND_ANALYTIC * dynamic
    return int(max(band, C.BAND_MIN_GIB * GIB))


def allocator_overhead(model: ModelProfile, cfg: TrainConfig, activations: int, work: int) -> int:
    """What the caching allocator reserves beyond what is allocated at the peak.

    The large, short-lived logits buffers of the standard loss leave reserved segments
    behind (``FRAG_LOGITS`` of them); so does the working set freed and allocated again for
    every block (``FRAG_WORK``), and with checkpointing the block inputs kept between those
    cycles (``FRAG_ACT_CKPT``); the default allocator (no ``expandable_segments``) keeps more.
    Measured; see :mod:`.calibration`.
    """
    logits = _tokens(cfg) * model.vocab_size * C.LOGITS_STANDARD_BYTES if cfg.loss == "standard" else 0
    # the standard loss' logits are the working set at its peak: counted once, as logits
    # a tiled MLP's working set is chunk-sized buffers, used again and again (taken with the
    # technique, not the length: a shorter sequence must never need more)
    frag = C.FRAG_WORK_TILED if cfg.mlp_chunk else C.FRAG_WORK
    expandable = (max(C.FRAG_LOGITS * logits, frag * work)
                  + (C.FRAG_ACT_CKPT * activations if cfg.grad_ckpt else 0) + C.ALLOC_FIXED_GIB * GIB)
    if not cfg.expandable_segments:  # the default allocator keeps more cached blocks
        expandable = max(expandable, C.FRAG_DEFAULT * (activations + work)
                         + C.ALLOC_FIXED_DEFAULT_GIB * GIB)
    return int(expandable)


# ---------------------------------------------------------------------------
# counted activation memory (qplan/profiles/activation_counts, see .activations)
@dataclass(frozen=True)
class Dynamic:
    """The activation memory of one micro-batch (bytes), from counts or analytic terms."""

    inputs: int  # before the first block: embeddings output, rotary tables, attention masks
    activations: int  # kept by the blocks for backward
    transient: int  # the larger of the loss' peak and one block's backward, on top
    transient_is_loss: bool
    basis: str  # "counted" (dry-run figures of this architecture) or "analytic"
    regime: str = ""


def counts(model: ModelProfile):
    """The counted figures of ``model``'s architecture, if they exist and match its shape."""
    from qplan.planner.activations import counts_for

    return counts_for(model)


def _windowed(model: ModelProfile, cfg: TrainConfig) -> bool:
    """Sliding-window layers need a mask (like packed rows) once the sequence reaches the
    window: transformers then builds one instead of relying on SDPA's causal kernel."""
    w = model.sliding_window
    return bool(w) and cfg.seq_len >= w and "sliding_attention" in model.layer_kinds()


def _rank_extra(model: ModelProfile, cfg: TrainConfig, counted_rank: int) -> tuple[float, float]:
    """(bytes per token, bytes per block) that a LoRA rank other than the counted one adds:
    each adapter's 16-bit rank-wide intermediate is kept for backward, and autocast keeps a
    16-bit copy of every adapter weight for the step."""
    dr = cfg.lora_rank - counted_rank
    targets = model.resolve_targets(cfg.lora_targets)
    shapes = [s for s in model.linear_shapes() if s.name in targets]
    return 2.0 * dr * len(shapes), 2.0 * dr * sum(s.in_features + s.out_features for s in shapes)


_COUNTED: dict = {}  # (model, cfg) -> (counts, Dynamic): the search asks for the same often


def _counted_cached(model: ModelProfile, cfg: TrainConfig, c) -> Dynamic:
    """:func:`counted_dynamic`, remembered for these very counts (a search evaluates the same
    technique-free variants for many candidates: a third of its time)."""
    key = (model, cfg)
    hit = _COUNTED.get(key)
    if hit is not None and hit[0] is c:
        return hit[1]
    if len(_COUNTED) > 20000:
        _COUNTED.clear()
    d = counted_dynamic(model, cfg, c)
    _COUNTED[key] = (c, d)
    return d


def counted_dynamic(model: ModelProfile, cfg: TrainConfig, c) -> Dynamic:
    """Activation memory from the architecture's dry-run counts (:mod:`.activations`).

    Live at the end of the forward: what precedes the blocks (``inputs``), what every block
    keeps, then the final norm and the loss. The peak comes later, either in the loss'
    backward (its logits scale with the vocabulary: counted bytes per logit) or in the
    backward of a block (the recomputed block, with checkpointing, and its gradients)."""
    from qplan.planner.activations import evaluate, figures

    b, s, t = cfg.batch_size, cfg.seq_len, _tokens(cfg)
    packed = cfg.packed_rows and cfg.attn != "flash_attention_2"
    tiled = bool(cfg.mlp_chunk) and s > cfg.mlp_chunk
    args = dict(model_targets=tuple(model.target_names),
                resolved_targets=model.resolve_targets(cfg.lora_targets))
    f = figures(c, cfg, packed=packed, tiled=tiled, **args)
    # sliding-window layers past their window see a mask, as packed rows do
    fw = figures(c, cfg, packed=True, tiled=tiled, **args) if _windowed(model, cfg) and not packed else f

    def ev(coef):
        return max(0.0, evaluate(coef, b, s))

    def for_kind(kind):
        return fw if kind != "full_attention" else f

    def fit(table, kind):  # a kind the count did not see has the same blocks as a global one
        return table[kind] if kind in table else table["full_attention"]

    per_tok, per_block = _rank_extra(model, cfg, c.lora_rank)
    rank_kept = per_block + (0 if cfg.grad_ckpt else per_tok * t)
    inputs = ev(f.prelude)
    if fw is not f:  # the sliding layers' own boolean mask
        inputs += b * s * s
    kept = 0.0
    kinds = model.layer_kinds()
    for kind, n in kinds.items():
        k_each = ev(fit(for_kind(kind).kept, kind)) + rank_kept
        if kind == model.first_layer_kind:
            kept += ev(for_kind(kind).kept_first) + rank_kept + (n - 1) * k_each
        else:
            kept += n * k_each
    head = ev(f.head)
    scale = _tiled_scale(cfg, c) if tiled else 1.0
    block = max(max(ev(fit(for_kind(k).backward, k)),
                    _tiled_eval(fit(for_kind(k).backward_mlp, k), b, s, scale)
                    if for_kind(k).backward_mlp else 0.0) for k in kinds)
    block += per_tok * t if cfg.grad_ckpt else 0
    block += eager_scores_shortfall(model, cfg)
    block_phase = head + evaluate(f.entering, b, s) + block
    logits = _loss_logits(model, cfg)
    per_logit = c.loss_per_logit[cfg.loss]
    loss_phase = max(head + ev(f.loss_backward), head + per_logit["peak"] * logits)
    if cfg.loss == "standard":
        loss_phase = max(loss_phase, head + per_logit["head"] * logits)
    if cfg.prepare == "kbit":  # the float32 lm_head is cast to 16 bits for each use
        loss_phase += 2 * model.vocab_size * model.hidden_size
    transient = max(block_phase, loss_phase, 0.0)
    return Dynamic(inputs=int(inputs), activations=int(max(kept, 0.0)), transient=int(transient),
                   transient_is_loss=loss_phase >= block_phase, basis="counted",
                   regime="+".join(f.composed_from))


def eager_scores_shortfall(model: ModelProfile, cfg: TrainConfig) -> int:
    """Eager attention's score matrices (batch x heads x seq x seq) in a block's backward,
    beyond what the dry run counts: measured on the GPU (``qplan run``, Gemma-2-9B, 4096 x 2,
    soft-capped eager attention, H200), the allocated peak was 3.9 bytes a score element
    above the counted figures (the count sees 14; the cause is not found: the suspect is
    autocast's float32 list on CUDA, which the fake device does not share; one
    measurement, the term is as general as its cause). Counted eager figures add this
    (:data:`calibration.EAGER_SCORES_EXTRA_BYTES`); 0 for the fused kernels."""
    if cfg.attn != "eager":
        return 0
    return int(C.EAGER_SCORES_EXTRA_BYTES * cfg.batch_size * model.num_attention_heads
               * cfg.seq_len * cfg.seq_len)


def _loss_logits(model: ModelProfile, cfg: TrainConfig) -> int:
    """Logits that exist at once in the loss: all of them (standard), one chunk (fused)."""
    t, v = _tokens(cfg), model.vocab_size
    return t * v if cfg.loss == "standard" else min(t, cfg.loss_chunk_rows(v)) * v


def _tiled_scale(cfg: TrainConfig, c) -> float:
    """A tiled MLP's chunk term was counted with ``c.mlp_chunk`` tokens a chunk."""
    return min(cfg.seq_len, cfg.mlp_chunk) / c.mlp_chunk


def _tiled_eval(coef, b: int, s: int, chunk_scale: float) -> float:
    from qplan.planner.activations import evaluate

    if coef and isinstance(coef[0], list):  # pieces: the largest
        return max(_tiled_eval(c, b, s, chunk_scale) for c in coef)
    if len(coef) == 5:  # the batch term is one chunk of every row
        coef = coef[:3] + [coef[3] * chunk_scale] + coef[4:]
    return max(0.0, evaluate(coef, b, s))


def analytic_dynamic(model: ModelProfile, cfg: TrainConfig) -> Dynamic:
    """Activation memory from the analytic terms (an architecture without counts)."""
    act = saved_activations(model, cfg)
    work = block_backward_peak(model, cfg)
    logits = logits_and_loss(model, cfg)
    return Dynamic(inputs=attention_mask(model, cfg), activations=act, transient=max(work, logits),
                   transient_is_loss=logits >= work, basis="analytic")


def dynamic_memory(model: ModelProfile, cfg: TrainConfig) -> Dynamic:
    """Counted when this architecture has counts (the catalogue's do), else analytic."""
    c = counts(model)
    if c is None:
        return analytic_dynamic(model, cfg)
    return _dominated(model, cfg, c)


def _dominated(model: ModelProfile, cfg: TrainConfig, c) -> Dynamic:
    """The counted figures of ``cfg``, kept in the order the techniques guarantee for the
    whole (what is kept plus the working set on top): lean norms, the tiled MLP and
    checkpointing never need more than without them, and a packed-rows mask, dropout, kbit
    preparation or eager attention never less. Each regime's fits are upper envelopes of
    their own points; where two regimes' envelopes cross (their constants, a few KiB at some
    length, or far below the counted lengths) the other regime's figures stand in. Per-term
    figures are not ordered (checkpointing keeps less but recomputes a larger working set)."""
    d = _counted_cached(model, cfg, c)
    offs = [k for k in ("recompute_norms", "mlp_chunk", "grad_ckpt") if getattr(cfg, k)]
    if cfg.loss == "fused":
        offs.append("loss")
    for n in range(1, 1 << len(offs)):
        off = {k: {"mlp_chunk": 0, "loss": "standard"}.get(k, False)
               for i, k in enumerate(offs) if n >> i & 1}
        if off.get("grad_ckpt") is False:
            off["offload_activations"] = False
        p = _counted_cached(model, cfg.with_(**off), c)
        if _whole(model, cfg, p) < _whole(model, cfg, d):
            d = replace(p, regime=d.regime)
    more = [k for k, on in (("packed_rows", cfg.packed_rows), ("lora_dropout", cfg.lora_dropout > 0),
                            ("prepare", cfg.prepare == "kbit"),
                            ("attn", cfg.attn == "eager" and model.sdpa_supported)) if on]
    plain = {"packed_rows": False, "lora_dropout": 0.0, "prepare": "lean", "attn": "sdpa"}
    lower = [cfg.with_(**{k: plain[k]}) for k in more]
    for other in lower:
        u = _dominated(model, other, c)
        if _whole(model, cfg, u) > _whole(model, cfg, d):
            d = replace(u, regime=d.regime)
    return d


def _whole(model: ModelProfile, cfg: TrainConfig, d: Dynamic) -> int:
    """What ``d`` adds to ``cfg``'s peak: its figures and the allocator slack they bring."""
    kept = d.inputs + d.activations
    return kept + d.transient + allocator_overhead(model, cfg, kept, d.transient)


# ---------------------------------------------------------------------------
TermFn = Callable[[ModelProfile, TrainConfig], int]


def estimate_memory(model: ModelProfile, cfg: TrainConfig, gpu: GpuProfile | None = None,
                    *, capacity_bytes: int | None = None,
                    adjust: Callable[[list[MemoryTerm], TrainConfig], bool] | None = None,
                    calibration: Callable[[str], Any] | None = None,
                    ) -> MemoryEstimate:
    """Estimate the peak device memory of one training step.

    ``capacity_bytes`` defaults to the GPU's memory. ``adjust`` lets plugins add or change
    terms in place (the ``adjust_memory`` hook); it returns True when a plugin modelled this
    architecture. ``calibration(regime)`` returns this machine's correction
    (:class:`qplan.planner.store.Correction`) for the activation terms. Raises
    :class:`NotModelledError` for mixtures of experts unless a plugin did.
    """
    if cfg.attn == "flash_attention_2" and gpu is not None and not gpu.flash_attention_2:
        raise NotModelledError(
            f"flash_attention_2 needs compute capability 8.0 or newer; {gpu.name} has "
            f"{gpu.cc_str}. Use --attn sdpa.")
    dyn = dynamic_memory(model, cfg)
    act, inputs, transient = dyn.activations, dyn.inputs, dyn.transient
    notes: list[str] = []
    corr = calibration(dyn.regime or dyn.basis) if calibration is not None else None
    if corr is not None and corr.used and corr.memory_factor != 1.0:
        f = corr.memory_factor
        act, inputs, transient = int(act * f), int(inputs * f), int(transient * f)
        notes.append(f"activation memory x{f:.2f}: calibrated by {corr.records} run(s) of this "
                     "architecture and regime on this GPU (qplan calibrate --show)")
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
        MemoryTerm("optimizer_states", "optimizer states" if cfg.optim != "paged_adamw_8bit"
                   else "optimizer states (paged out)", optimizer_states_at_peak(model, cfg),
                   optimizer_states_at_peak.__doc__.split("\n")[0]),
        MemoryTerm("activations", "saved activations", act,
                   "what the decoder blocks keep for backward" + (
                       " (counted)" if dyn.basis == "counted" else "")),
        MemoryTerm("attention_mask", "inputs, masks, rotary tables" if dyn.basis == "counted"
                   else "packed-rows attention mask", inputs,
                   "embeddings output, rotary tables and attention masks, before the first block"
                   if dyn.basis == "counted" else attention_mask.__doc__.split("\n")[0]),
        MemoryTerm("logits_or_working_set",
                   "logits and loss" if dyn.transient_is_loss else "block backward working set",
                   transient, "the larger of the loss peak and one recomputed block's backward"),
        MemoryTerm("allocator_overhead", "allocator overhead",
                   allocator_overhead(model, cfg, act + inputs, transient),
                   allocator_overhead.__doc__.split("\n")[0]),
        MemoryTerm("libraries", "CUDA libraries", libraries(gpu),
                   libraries.__doc__.split("\n")[0]),
        *([MemoryTerm("ddp_buckets", "DDP gradient buckets", ddp_gradient_buckets(model, cfg),
                      ddp_gradient_buckets.__doc__.split("\n")[0])]
          if cfg.gpus > 1 and cfg.strategy == "ddp" else []),
        *([MemoryTerm("fsdp_gathered", "gathered weights (FSDP)",
                      fsdp_gathered_weights(model, cfg),
                      fsdp_gathered_weights.__doc__.split("\n")[0])]
          if cfg.strategy == "fsdp" else []),
        *([MemoryTerm("collective_buffers", "NCCL buffers", collective_buffers(cfg),
                      collective_buffers.__doc__.split("\n")[0])] if cfg.gpus > 1 else []),
        MemoryTerm("cuda_context", "CUDA context", cuda_context(gpu),
                   cuda_context.__doc__.split("\n")[0]),
    ]
    handled = adjust(terms, cfg) if adjust is not None else False
    if model.is_moe and not handled:
        raise NotModelledError(
            f"{model.name} is a mixture of experts ({model.num_local_experts} experts); qplan's "
            "memory model covers dense decoders only. A plugin can supply MoE terms through "
            "the adjust_memory hook; dense models of similar size: see `qplan models`.")
    if cfg.strategy == "fsdp" and (cfg.gpus > 1 or cfg.offload_params):
        notes.append(fsdp_loading_note(model, cfg))
    if params_offloaded(cfg):
        notes.append(offload_note(model, cfg))
    cap = capacity_bytes if capacity_bytes is not None else (gpu.memory_bytes if gpu else None)
    host = 0
    if _offloaded(cfg):
        host = model.num_hidden_layers * _tokens(cfg) * model.hidden_size * _residual_bytes(cfg)
    if cfg.embed_on_cpu and not model.tie_word_embeddings:
        host += model.embedding_params * _unquantized_dtype_bytes(cfg)
    host += offloaded_host_bytes(model, cfg)
    return MemoryEstimate(model=model.name, config=cfg, terms=tuple(terms),
                          gpu=gpu.name if gpu else None, capacity_bytes=cap,
                          host_pinned_bytes=host, basis=dyn.basis, regime=dyn.regime,
                          paged_bytes=(optimizer_states(model, cfg)
                                       if cfg.optim == "paged_adamw_8bit" else 0),
                          band_bytes=uncertainty_band(terms, dyn.basis), notes=tuple(notes))
