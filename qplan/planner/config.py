"""The knobs of one QLoRA / LoRA training configuration, as one typed dataclass.

Every field is a setting the runner applies and the memory model accounts for.
Validation collects every problem and reports them together.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from qplan.errors import BadInputError, ConfigError

OPTIMIZERS = ("paged_adamw_8bit", "adamw_8bit", "adamw_torch")
PREPARE_MODES = ("kbit", "lean")
LOSS_MODES = ("standard", "fused")
ATTN_IMPLS = ("sdpa", "flash_attention_2", "eager")
QUANT_TYPES = ("nf4", "fp4", "none")  # none = plain LoRA on 16-bit weights
DTYPES = ("bf16", "fp16")
# How several GPUs share the work: ddp = a whole model copy on each, fsdp = the weights,
# adapters and optimizer states sharded across them (FSDP2 through accelerate).
STRATEGIES = ("ddp", "fsdp")
# The optimizer FSDP's sharded (DTensor) parameters take: bitsandbytes' 8-bit ones fail on them.
FSDP_OPTIM = "adamw_torch"


# The lean RMSNorm (qplan.runner.lowmem, ``recompute_norms``) works through its rows a slice at
# a time: 4,096 rows of a norm 4,096 wide or wider; a narrower one (a per-head q/k norm, a
# small model's) takes more rows, up to the elements of such a slice. A per-head q norm of 16k
# tokens x 32 heads is 524k rows: 128 slices of 4,096 rows (each a handful of kernels) made a
# Qwen3-4B step 1.85x slower on an H200; 4 slices do not.
NORM_ROWS = 4096
NORM_ELEMENTS = NORM_ROWS * 4096


def norm_slice_rows(width: int, rows: int = NORM_ROWS, elements: int = NORM_ELEMENTS) -> int:
    """Rows per slice of the lean RMSNorm over ``width`` features."""
    return max(rows, elements // max(1, width))


@dataclass(frozen=True)
class TrainConfig:
    """One fully specified training configuration (what ``qplan estimate`` evaluates).

    ``batch_size`` is per device; ``grad_accum`` multiplies it to the effective batch: the
    micro-batches of one optimizer step, over all ``gpus`` (each of the ``gpus``
    data-parallel processes runs ``grad_accum / gpus`` of them).
    ``lora_targets`` holds canonical names (``q``, ``k``, ... or ``qkv`` for Phi-3);
    ``None`` means every linear layer in the blocks.
    """

    seq_len: int = 2048
    batch_size: int = 1
    grad_accum: int = 1
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_targets: tuple[str, ...] | None = None
    lora_dropout: float = 0.0
    grad_ckpt: bool = True
    optim: str = "paged_adamw_8bit"
    prepare: str = "lean"
    loss: str = "standard"
    attn: str = "sdpa"
    quant: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bf16"
    expandable_segments: bool = True
    offload_activations: bool = False
    # Logit elements per chunk of the fused (chunked) loss: rows = loss_chunk // vocab_size.
    loss_chunk: int = 16 * 1024 * 1024
    # Run each block's MLP over the sequence in checkpointed chunks of this many tokens
    # (0 = off): its large intermediate tensors then exist for one chunk at a time.
    mlp_chunk: int = 0
    # Keep the (frozen) input embeddings in CPU memory: the lookup runs on the CPU and only
    # the looked-up rows go to the GPU. Untied embeddings only.
    embed_on_cpu: bool = False
    # RMSNorms keep only their 16-bit input and one float32 scale per token for backward
    # (recomputing the normalized values), instead of a float32 copy of the input.
    recompute_norms: bool = False
    # Rows hold several examples with positions restarting at each (``qplan run`` packs its
    # data this way): with sdpa or eager attention transformers then builds a boolean
    # batch x seq x seq mask that keeps examples apart (flash_attention_2 needs none).
    packed_rows: bool = False
    # Data-parallel GPUs (DDP), one training process each with a full copy of the model:
    # every optimizer step's ``grad_accum`` micro-batches are split across them, so the
    # effective batch does not depend on it; memory figures are per GPU.
    gpus: int = 1
    # How the ``gpus`` share the model: "ddp" (each holds a whole copy) or "fsdp" (fully
    # sharded: each holds 1/gpus of the 4-bit weights, embeddings, adapters and optimizer
    # states, gathering one block at a time). Only meaningful with gpus > 1, or with
    # ``offload_params`` on one GPU.
    strategy: str = "ddp"
    # FSDP with CPU offload of parameters: every shard (4-bit weights, embeddings, LoRA
    # weights, their gradients and the optimizer states) lives in pinned host memory; each
    # block is copied to the GPU when it runs and the optimizer steps on the CPU. For models
    # that do not fit the GPUs even sharded; also on one GPU (transformers refuses to train
    # a 4-bit model whose device_map puts modules on the CPU: this is the form that trains).
    offload_params: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.lora_targets, (list, str)):
            t = self.lora_targets
            t = tuple(x.strip() for x in t.split(",")) if isinstance(t, str) else tuple(t)
            object.__setattr__(self, "lora_targets", t)
        problems = self.problems()
        if problems:
            raise BadInputError("invalid settings: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """Every invalid field, each with what is allowed."""
        p = []
        for f, lo in (("seq_len", 1), ("batch_size", 1), ("grad_accum", 1), ("lora_rank", 1),
                      ("loss_chunk", 1024), ("mlp_chunk", 0), ("gpus", 1)):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                p.append(f"{f} must be an integer >= {lo} (got {v!r})")
        n, a = self.gpus, self.grad_accum
        if (isinstance(n, int) and isinstance(a, int) and not isinstance(n, bool) and n > 1
                and a >= 1 and a % n):
            up = -(-a // n) * n
            down = f" or {up - n}" if up - n >= n else ""
            p.append(f"grad_accum {a} does not split across gpus {n}: each optimizer step's "
                     f"micro-batches are divided among the {n} GPUs, so the accumulation must be "
                     f"a multiple of {n}; use grad_accum {up} (an effective batch of "
                     f"{up * self.batch_size if isinstance(self.batch_size, int) else up}){down}")
        d = self.lora_dropout
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d < 1.0:
            p.append(f"lora_dropout must be a number in [0, 1) (got {d!r})")
        for f, allowed in (("optim", OPTIMIZERS), ("prepare", PREPARE_MODES),
                           ("loss", LOSS_MODES), ("attn", ATTN_IMPLS),
                           ("quant", QUANT_TYPES), ("compute_dtype", DTYPES),
                           ("strategy", STRATEGIES)):
            v = getattr(self, f)
            if v not in allowed:
                p.append(f"{f} {v!r} is not one of {', '.join(allowed)}")
        if not isinstance(self.offload_params, bool):
            p.append(f"offload_params must be true or false (got {self.offload_params!r})")
        if self.strategy == "fsdp":
            p += self._fsdp_problems()
        elif self.offload_params is True:
            p.append("offload_params (the sharded weights kept in host memory) needs strategy "
                     "fsdp: use --strategy fsdp with it")
        return p

    def _fsdp_problems(self) -> list[str]:
        p = []
        if isinstance(self.gpus, int) and self.gpus < 2 and self.offload_params is not True:
            p.append(f"strategy fsdp shards the model across GPUs and needs gpus >= 2 (got "
                     f"{self.gpus}), or offload_params on one GPU (the weights in host memory); "
                     f"use --gpus 2 or more, or strategy ddp on one GPU")
        if self.embed_on_cpu:
            p.append("strategy fsdp shards the embeddings across the GPUs; embed_on_cpu (the "
                     "embeddings in CPU memory) does not combine with it: turn one off")
        if self.optim != FSDP_OPTIM:
            p.append(f"strategy fsdp needs optim {FSDP_OPTIM}: bitsandbytes' 8-bit optimizers "
                     f"({self.optim}) cannot update FSDP's sharded (DTensor) parameters; use "
                     f"--optim {FSDP_OPTIM} (the LoRA states are small, and sharded)")
        if self.prepare == "kbit":
            p.append("strategy fsdp needs prepare lean: kbit preparation casts norms and "
                     "embeddings to float32 beside 16-bit weights, which FSDP cannot shard "
                     "as one; use --prepare lean")
        return p

    def loss_chunk_rows(self, vocab_size: int) -> int:
        """Rows (tokens) per chunk of the fused loss for a vocabulary of ``vocab_size``."""
        return max(64, self.loss_chunk // vocab_size)

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.grad_accum

    @property
    def tokens_per_step(self) -> int:
        """Tokens in one optimizer step (all micro-batches)."""
        return self.seq_len * self.effective_batch

    def with_(self, **changes: Any) -> "TrainConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets) if self.lora_targets else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        d = dict(d)
        if d.get("lora_targets") is not None:
            d["lora_targets"] = tuple(d["lora_targets"]) if not isinstance(
                d["lora_targets"], str) else d["lora_targets"]
        return cls(**d)
