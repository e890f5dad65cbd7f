"""Plan search: the fastest configuration that fits, and the next safer one after an OOM.

The search is exhaustive over a small grid (per-device batch, checkpointing, loss,
preparation, activation offload), each candidate scored by the speed model and kept only
if the memory model says it fits with a margin. A few hundred candidates: milliseconds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from qplan.planner import calibration as C
from qplan.planner.config import TrainConfig
from qplan.planner.memory import MemoryEstimate, estimate_memory
from qplan.planner.speed import SpeedEstimate, estimate_speed
from qplan.profiles.gpus import GIB, GpuProfile
from qplan.profiles.models import ModelProfile


# A policy sees a candidate and returns it (maybe changed) or None to veto it.
Policy = Callable[[ModelProfile, GpuProfile, TrainConfig], "TrainConfig | None"]
MemoryAdjust = Callable[[list], list]


@dataclass(frozen=True)
class Candidate:
    config: TrainConfig
    memory: MemoryEstimate
    speed: SpeedEstimate
    techniques: int  # how many memory-saving techniques it uses (tie-breaker)


def default_reserve_bytes(gpu: GpuProfile) -> int:
    """What the card loses to other things before training (display, desktop), by its kind."""
    return int(C.RESERVE_GIB.get(gpu.kind, C.RESERVE_GIB["consumer"]) * GIB)


def usable_bytes(gpu: GpuProfile, capacity_bytes: int | None = None,
                 reserve_bytes: int | None = None) -> int:
    """Device memory a plan's peak plus its uncertainty band may reach: the card (or the
    given cap) less what the display and other processes hold (``reserve_bytes``, by
    default by the card's kind: :func:`default_reserve_bytes`)."""
    cap = capacity_bytes if capacity_bytes is not None else gpu.memory_bytes
    reserve = default_reserve_bytes(gpu) if reserve_bytes is None else reserve_bytes
    return int(cap - reserve)


def default_attention(model: ModelProfile, gpu: GpuProfile | None = None, *,
                      flash_attn_available: bool = False) -> str:
    """flash-attention 2 where it is installed and the card runs it, else sdpa, or eager for
    architectures transformers has no sdpa path for (:attr:`ModelProfile.sdpa_supported`)."""
    if flash_attn_available and gpu is not None and gpu.flash_attention_2:
        return "flash_attention_2"
    return "sdpa" if model.sdpa_supported else "eager"


def default_settings(model: ModelProfile, gpu: GpuProfile, *, flash_attn_available: bool = False,
                     ) -> dict[str, Any]:
    """The default policy's starting point, with the reason for each choice."""
    return {
        "compute_dtype": "bf16" if gpu.bf16 else "fp16",
        "attn": default_attention(model, gpu, flash_attn_available=flash_attn_available),
        "lora_rank": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.0,
        "lora_targets": None,
        "optim": "paged_adamw_8bit",
        "quant": "nf4",
        "double_quant": True,
        "expandable_segments": True,
    }


# Tokens per chunk when the search tiles the MLP (``TrainConfig.mlp_chunk``).
MLP_CHUNK = 2048


def _techniques(cfg: TrainConfig) -> int:
    return (int(cfg.grad_ckpt) + int(cfg.loss == "fused") + int(cfg.offload_activations)
            + int(cfg.prepare == "kbit") + int(bool(cfg.mlp_chunk)) + int(cfg.embed_on_cpu)
            + int(cfg.recompute_norms))


def _batch_sizes(target: int, gpus: int = 1) -> list[int]:
    """Per-device batches that reach the target effective batch exactly with an accumulation
    that splits evenly across ``gpus`` (the divisors of target / gpus)."""
    return [b for b in range(1, max(1, target) + 1)
            if target % b == 0 and (target // b) % gpus == 0]


def candidates(model: ModelProfile, gpu: GpuProfile, seq_len: int, target_effective_batch: int,
               fixed: dict[str, Any], base: dict[str, Any]) -> Iterable[TrainConfig]:
    """Every configuration the search considers, with user-fixed settings held."""
    grid = {
        "batch_size": _batch_sizes(target_effective_batch, fixed.get("gpus") or 1),
        "grad_ckpt": [False, True],
        "loss": ["standard", "fused"],
        "prepare": ["lean"],
        "offload_activations": [False, True],
        "mlp_chunk": [0, MLP_CHUNK] if seq_len > MLP_CHUNK else [0],
        "embed_on_cpu": ([False] if model.tie_word_embeddings or fixed.get("strategy") == "fsdp"
                         else [False, True]),
        "recompute_norms": [False, True],
    }
    for k in list(grid):
        if k in fixed:
            grid[k] = [fixed[k]]
    settings = {**base, **{k: v for k, v in fixed.items() if k not in grid}}
    for b in grid["batch_size"]:
        accum = fixed.get("grad_accum") or max(1, math.ceil(target_effective_batch / b))
        for ck in grid["grad_ckpt"]:
            for loss in grid["loss"]:
                for prep in grid["prepare"]:
                    for off in grid["offload_activations"]:
                        if off and not ck:
                            continue  # offloading applies to checkpointed block inputs
                        for mc in grid["mlp_chunk"]:
                            for ec in grid["embed_on_cpu"]:
                                for rn in grid["recompute_norms"]:
                                    yield TrainConfig(**{
                                        **settings, "seq_len": seq_len, "batch_size": b,
                                        "grad_accum": accum, "grad_ckpt": ck, "loss": loss,
                                        "prepare": prep, "offload_activations": off,
                                        "mlp_chunk": mc, "embed_on_cpu": ec,
                                        "recompute_norms": rn})


def evaluate(model: ModelProfile, gpu: GpuProfile, cfg: TrainConfig, *,
             capacity_bytes: int | None = None, adjust: MemoryAdjust | None = None,
             calibration=None) -> Candidate:
    mem = estimate_memory(model, cfg, gpu, capacity_bytes=capacity_bytes, adjust=adjust,
                          calibration=calibration)
    speed = estimate_speed(model, cfg, gpu)
    if calibration is not None:
        corr = calibration(mem.regime or mem.basis)
        if corr.used and corr.speed_factor != 1.0:
            speed = speed.scaled(corr.speed_factor)
    return Candidate(cfg, mem, speed, _techniques(cfg))


def search(model: ModelProfile, gpu: GpuProfile, *, seq_len: int, target_effective_batch: int = 16,
           fixed: dict[str, Any] | None = None, flash_attn_available: bool = False,
           host_ram_bytes: int | None = None,
           capacity_bytes: int | None = None, reserve_bytes: int | None = None,
           policies: Sequence[Policy] = (), adjust: MemoryAdjust | None = None,
           calibration=None) -> tuple[Candidate | None, list[Candidate]]:
    """Best fitting candidate (or None) and every evaluated candidate. A candidate fits when
    its peak plus its uncertainty band stays under :func:`usable_bytes`."""
    fixed = {k: v for k, v in (fixed or {}).items() if v is not None}
    base = default_settings(model, gpu, flash_attn_available=flash_attn_available)
    limit = usable_bytes(gpu, capacity_bytes, reserve_bytes)
    seen: list[Candidate] = []
    fitting: list[Candidate] = []
    for cfg in candidates(model, gpu, seq_len, target_effective_batch, fixed, base):
        for pol in policies:
            cfg = pol(model, gpu, cfg)
            if cfg is None:
                break
        if cfg is None:
            continue
        cand = evaluate(model, gpu, cfg, capacity_bytes=capacity_bytes, adjust=adjust,
                        calibration=calibration)
        seen.append(cand)
        if cand.memory.safe_peak_bytes > limit:
            continue
        if (host_ram_bytes is not None  # pinned host memory of every GPU's process
                and cand.memory.host_pinned_bytes * cfg.gpus > 0.5 * host_ram_bytes):
            continue
        fitting.append(cand)
    return fastest(fitting), seen


# A memory-saving technique must buy this much predicted speed to be chosen: the speed model
# does not resolve smaller differences (results/speed_fit.md), and each technique changes
# what runs (lean norms measured 40% slower than predicted on Qwen3-4B at batch 8).
TECHNIQUE_SPEED_MARGIN = 0.03


def fastest(cands: Sequence[Candidate]) -> Candidate | None:
    """The fastest candidate, preferring fewer memory-saving techniques among those within
    :data:`TECHNIQUE_SPEED_MARGIN` of the fastest (then the faster, then the first)."""
    if not cands:
        return None
    top = max(c.speed.tokens_per_s for c in cands)
    near = [c for c in cands if c.speed.tokens_per_s * (1 + TECHNIQUE_SPEED_MARGIN) >= top]
    return min(near, key=lambda c: (c.techniques, -c.speed.tokens_per_s))
