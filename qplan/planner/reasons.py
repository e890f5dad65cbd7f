"""Why a plan's settings have their values, as :class:`~qplan.planner.plan.Reason` data.

Every setting of a plan gets one reason, computed from the setting's value (so the text
cannot claim a rule the value does not follow); a plugin's policy that changed a setting
adds a reason with the plugin as its source. The command line renders them; no code
reads the text back.
"""
from __future__ import annotations

from qplan.planner.config import TrainConfig
from qplan.planner.plan import Reason
from qplan.profiles.gpus import GpuProfile
from qplan.profiles.models import ModelProfile

QUANT_WHY = {"nf4": "QLoRA 4-bit NormalFloat", "fp4": "4-bit float (QLoRA's fp4)",
             "none": "plain LoRA on 16-bit weights (no quantization)"}


def _onoff(v: bool, on: str, off: str) -> str:
    return on if v else off


def _compute(cfg: TrainConfig, gpu: GpuProfile) -> list[Reason]:
    return [
        Reason(("compute_dtype",), f"{cfg.compute_dtype}: " + (
            "compute capability >= 8.0" if cfg.compute_dtype == "bf16"
            else f"{gpu.name} (cc {gpu.cc_str}) has no bf16" if not gpu.bf16 else "as asked")),
        Reason(("attn",), f"attention {cfg.attn}: " + {
            "flash_attention_2": "flash-attn importable and cc >= 8.0",
            "sdpa": "PyTorch SDPA (flash-attn not used)",
            "eager": "eager attention (materializes the attention matrix)"}[cfg.attn]),
        Reason(("grad_ckpt",), "gradient checkpointing " + _onoff(
            cfg.grad_ckpt, "on: activations would not fit otherwise",
            "off: it fits without, and steps are ~30% faster")),
        Reason(("loss",), f"loss {cfg.loss}: " + _onoff(
            cfg.loss == "fused", "chunked, never materializes float32 logits",
            "standard cross-entropy fits")),
        Reason(("prepare",), f"prepare {cfg.prepare}: " + _onoff(
            cfg.prepare == "lean", "embeddings/lm_head stay 16-bit (faster, smaller)",
            "peft prepare_model_for_kbit_training")),
        Reason(("optim",), f"optimizer {cfg.optim}" + (
            " (FSDP's sharded parameters take torch's AdamW; bitsandbytes' 8-bit optimizers do "
            "not update them)" if cfg.strategy == "fsdp" else "")),
    ]


def _lora(cfg: TrainConfig) -> list[Reason]:
    return [
        Reason(("lora_rank",), f"default policy: rank {cfg.lora_rank}"),
        Reason(("lora_alpha",), f"default policy: alpha {cfg.lora_alpha} (scale alpha/rank = "
                                f"{cfg.lora_alpha / cfg.lora_rank:g})"),
        Reason(("lora_targets",), "default policy: every linear layer in the blocks"
               if cfg.lora_targets is None else f"LoRA on {', '.join(cfg.lora_targets)}"),
        Reason(("lora_dropout",), f"default policy: {cfg.lora_dropout:g}" + (
            " (no dropout: faster, less memory)" if not cfg.lora_dropout else "")),
        Reason(("quant",), QUANT_WHY[cfg.quant]),
        Reason(("double_quant",), _onoff(cfg.double_quant,
                                         "quantize the quantization constants too (smaller)",
                                         "off: quantization constants stay 32-bit")),
    ]


def _memory(model: ModelProfile, cfg: TrainConfig) -> list[Reason]:
    emb = model.embedding_params * (4 if cfg.prepare == "kbit" else 2) / 2**30
    return [
        Reason(("expandable_segments",), _onoff(
            cfg.expandable_segments, "allocator setting: less fragmentation",
            "off: PyTorch's default allocator")),
        Reason(("offload_activations",), _onoff(
            cfg.offload_activations, "activation offloading: each checkpointed block's input "
            "waits in pinned CPU memory for its backward (costs ~3% speed)",
            "off: fits without (offload costs ~3% speed and host memory)")),
        Reason(("loss_chunk",), "logits per chunk of the fused loss (used only with loss fused)"),
        Reason(("mlp_chunk",), f"MLP tiled in chunks of {cfg.mlp_chunk} tokens: its large "
                               "tensors exist for one chunk at a time (costs one more MLP "
                               "forward)" if cfg.mlp_chunk else "0 = MLP not tiled"),
        Reason(("embed_on_cpu",), _onoff(
            cfg.embed_on_cpu, f"input embeddings in CPU memory: frees {emb:.2f} GiB of the "
            "card; only looked-up rows go to the GPU", "off")),
        Reason(("recompute_norms",), _onoff(
            cfg.recompute_norms, "lean RMSNorms: keep their 16-bit input, not a float32 copy, "
            "for backward", "off: fits without (costs ~2% speed)")),
        Reason(("packed_rows",), _onoff(
            cfg.packed_rows, "on: qplan run packs several examples a row (sdpa then needs a "
            "seq x seq mask); --no-packed-rows plans for a trainer that does not",
            "off: one sequence per row (qplan run packs: its plans have it on)")),
    ]


def plan_reasons(model: ModelProfile, gpu: GpuProfile, cfg: TrainConfig,
                 target: int) -> tuple[Reason, ...]:
    """One reason for every setting of ``cfg`` but the sequence length (which the caller
    chose), in the order of :class:`TrainConfig`'s fields."""
    split = (f" ({cfg.grad_accum // cfg.gpus} micro-batches on each of {cfg.gpus} GPUs)"
             if cfg.gpus > 1 else "")
    batch = Reason(("batch_size", "grad_accum"),
                   f"batch {cfg.batch_size} x accumulation {cfg.grad_accum}{split} = effective "
                   f"batch {cfg.effective_batch} (target {target})")
    out = [batch] + _compute(cfg, gpu) + _lora(cfg) + _memory(model, cfg) + _gpus(cfg, gpu)
    if not cfg.offload_params:
        out.append(Reason(("offload_params",), "off: the weights fit on the GPU"
                          + ("s" if cfg.gpus > 1 else "") + " (CPU offload only when nothing "
                          "else fits: it is slow)"))
    return tuple(out)


def _gpus(cfg: TrainConfig, gpu: GpuProfile) -> list[Reason]:
    if cfg.offload_params:
        if cfg.gpus > 1:
            how = (f"{cfg.gpus} GPUs, fully sharded (FSDP): each process holds 1/{cfg.gpus} of "
                   f"the 4-bit weights, embeddings, adapters and optimizer states and gathers "
                   f"each block over {gpu.link.name} as it computes it; memory figures are "
                   "per GPU")
        else:
            how = ("one GPU under FSDP (a group of one process): it copies each block to the "
                   "GPU as it computes it")
        return [Reason(("gpus", "strategy"), how),
                Reason(("offload_params",),
                       f"on: the weights do not fit the GPU{'s even sharded' if cfg.gpus > 1 else ''}"
                       ", so they stay in pinned host memory (CPU offload) and every block is "
                       "copied in when it runs, twice a micro-batch; the optimizer steps on the "
                       "CPU. Slow (the speed below counts it), but it trains")]
    if cfg.gpus == 1:
        return [Reason(("gpus", "strategy"), "one GPU (--gpus N: data-parallel on N)")]
    if cfg.strategy == "fsdp":
        return [Reason(("gpus", "strategy"), f"{cfg.gpus} GPUs, fully sharded (FSDP): each holds "
                       f"1/{cfg.gpus} of the 4-bit weights, embeddings, adapters and optimizer "
                       f"states and gathers each block over {gpu.link.name} as it computes it "
                       "(a whole copy does not fit one GPU); memory figures are per GPU")]
    return [Reason(("gpus", "strategy"), f"{cfg.gpus} GPUs, data-parallel (DDP): a full copy of "
                   f"the model on each, the LoRA gradients all-reduced every optimizer step over "
                   f"{gpu.link.name}; memory figures are per GPU")]


def policy_reasons(trace) -> tuple[Reason, ...]:
    """Reasons for what plugins' plan policies changed: ``trace`` holds
    ``(plugin name, {field: (old, new)})`` in the order the policies ran."""
    return tuple(Reason((field,), f"{field} {old} -> {new} by plugin {name!r} (plan_policy)",
                        source=name)
                 for name, changes in trace for field, (old, new) in changes.items())


def by_setting(reasons) -> dict[str, Reason]:
    """Each setting's reason; a later reason (a plugin's policy) wins over an earlier one."""
    out: dict[str, Reason] = {}
    for r in reasons:
        for s in r.settings:
            out[s] = r
    return out
