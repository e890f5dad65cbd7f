"""LLaMA-Factory YAML configs (``llamafactory-cli train FILE``): read, model, write.

Fields of LLaMA-Factory 0.9.5's ModelArguments, DataArguments, TrainingArguments,
FinetuningArguments and GeneratingArguments. How its behaviour is modelled (read from
0.9.5's ``llamafactory/model`` and ``llamafactory/hparams``):

* ``quantization_bit: 4`` (bitsandbytes): ``quantization_type`` (nf4) with
  ``double_quantization`` (on by default); without it, 16-bit weights.
* the model loads in the compute dtype and LLaMA-Factory does not cast embeddings or
  lm_head to float32: qplan's ``lean`` preparation (``upcast_layernorm`` makes the norms
  float32: a few MiB).
* gradient checkpointing is on unless ``disable_gradient_checkpointing``;
  ``use_unsloth_gc`` keeps the checkpointed block inputs in CPU memory (offload).
* loss: the model's own cross-entropy (``standard``) unless ``enable_liger_kernel``, which
  also fuses the loss (``fused``) and makes the RMSNorms keep only their input (lean norms).
* ``neat_packing``: examples share rows without attending to each other (``packed_rows``);
  ``packing`` without it lets packed examples attend to each other (no mask: not
  ``packed_rows``).
* no field for ``PYTORCH_CUDA_ALLOC_CONF``: it comes from the environment.
"""
from __future__ import annotations

from typing import Any

from qplan.ecosystem import fields_data as F
from qplan.ecosystem.axolotl import env_expandable
from qplan.ecosystem.base import (Reading, dropout, optimizer, positive_int, truthy,
                                  unknown_fields, want)
from qplan.errors import ConfigError, NotModelledError
from qplan.planner.config import TrainConfig
from qplan.profiles.models import ModelProfile

VERSION = F.VERSIONS["llamafactory"]
ALLOC_ENV = "PYTORCH_CUDA_ALLOC_CONF"
ATTN = {"auto": "sdpa", "sdpa": "sdpa", "disabled": "eager", "fa2": "flash_attention_2",
        "fa3": "flash_attention_2"}


def detect(data: dict[str, Any]) -> bool:
    keys = set(data)
    return bool(keys & {"finetuning_type", "cutoff_len", "quantization_bit", "lora_target",
                        "stage", "template", "lora_rank"})


def model_of(data: dict[str, Any]) -> str | None:
    m = data.get("model_name_or_path")
    return m if isinstance(m, str) and m.strip() else None


def field_name(path: tuple[str, ...], layout: str = "yaml") -> str:
    return ".".join(path)


def read(data: dict[str, Any], profile: ModelProfile, *, source: str, **_: Any) -> Reading:
    d = data
    sem: list[str] = []
    unmodelled = unknown_fields(d, F.llamafactory, f"LLaMA-Factory {VERSION}'s train arguments "
                                f"(with transformers {F.VERSIONS['transformers']})")
    cfg: dict[str, Any] = {}
    fields: dict[str, tuple[str, ...] | None] = {}

    ft = d.get("finetuning_type", "lora")
    if ft != "lora":
        raise NotModelledError(f"{source}: finetuning_type {ft!r} is not modelled; qplan models "
                               "LoRA and QLoRA (finetuning_type: lora)")
    stage = d.get("stage", "sft")
    if stage not in ("sft", "pt"):
        unmodelled.append(f"stage {stage}: modelled as supervised fine-tuning (one model, one loss)")
    qb = d.get("quantization_bit")
    if qb is None:
        cfg["quant"], cfg["double_quant"] = "none", False
    elif qb == 4:
        method = d.get("quantization_method", "bnb")
        if method not in ("bnb", "bitsandbytes"):
            raise NotModelledError(f"{source}: quantization_method {method!r} is not modelled; "
                                   "qplan models bitsandbytes (bnb)")
        qt = d.get("quantization_type", "nf4")
        if qt not in ("nf4", "fp4"):
            raise ConfigError(f"{source}: quantization_type {qt!r} is not nf4 or fp4")
        cfg["quant"] = qt
        cfg["double_quant"] = truthy(d.get("double_quantization", True), "double_quantization",
                                     source)
    else:
        raise NotModelledError(f"{source}: quantization_bit {qb!r} is not modelled; use 4 "
                               "(QLoRA) or leave it out (LoRA on 16-bit weights)")
    fields["quant"] = ("quantization_type",)
    fields["double_quant"] = ("double_quantization",)
    cfg["prepare"] = "lean"
    fields["prepare"] = None
    sem.append("LLaMA-Factory keeps embeddings and lm_head in the compute dtype: lean")

    cfg["lora_rank"] = positive_int(d.get("lora_rank", 8), "lora_rank", source)
    alpha = d.get("lora_alpha")
    cfg["lora_alpha"] = positive_int(alpha, "lora_alpha", source) if alpha is not None \
        else cfg["lora_rank"] * 2
    if alpha is None:
        sem.append(f"lora_alpha is not set: LLaMA-Factory uses lora_rank x 2 = {cfg['lora_alpha']}")
    cfg["lora_dropout"] = dropout(d.get("lora_dropout", 0.0), "lora_dropout", source)
    target = d.get("lora_target", "all")
    want(target, str, "lora_target", source)
    mods = [t.strip() for t in target.split(",") if t.strip()]
    names = profile.target_names
    cfg["lora_targets"] = None if mods in ([], ["all"]) or set(mods) >= set(names.values()) \
        else profile.resolve_targets(tuple(mods))
    for k, f in (("lora_rank", "lora_rank"), ("lora_alpha", "lora_alpha"),
                 ("lora_dropout", "lora_dropout"), ("lora_target", "lora_targets")):
        fields[f] = (k,)

    cfg["seq_len"] = positive_int(d.get("cutoff_len", 2048), "cutoff_len", source)
    fields["seq_len"] = ("cutoff_len",)
    cfg["batch_size"] = positive_int(d.get("per_device_train_batch_size", 8),
                                     "per_device_train_batch_size", source)
    fields["batch_size"] = ("per_device_train_batch_size",)
    cfg["grad_accum"] = positive_int(d.get("gradient_accumulation_steps", 1),
                                     "gradient_accumulation_steps", source)
    fields["grad_accum"] = ("gradient_accumulation_steps",)
    cfg["grad_ckpt"] = not truthy(d.get("disable_gradient_checkpointing"),
                                  "disable_gradient_checkpointing", source)
    fields["grad_ckpt"] = ("disable_gradient_checkpointing",)
    cfg["offload_activations"] = cfg["grad_ckpt"] and truthy(d.get("use_unsloth_gc"),
                                                             "use_unsloth_gc", source)
    fields["offload_activations"] = ("use_unsloth_gc",)
    cfg["optim"] = optimizer(d.get("optim", "adamw_torch"), "optim", source, sem)
    fields["optim"] = ("optim",)

    bf16 = truthy(d.get("bf16"), "bf16", source)
    fp16 = truthy(d.get("fp16"), "fp16", source)
    if truthy(d.get("pure_bf16"), "pure_bf16", source):
        raise NotModelledError(f"{source}: pure_bf16 (no mixed precision) is not modelled; use bf16: true")
    if bf16 and fp16:
        raise ConfigError(f"{source}: bf16 and fp16 are both true; choose one")
    if not (bf16 or fp16):
        raise NotModelledError(f"{source}: neither bf16 nor fp16 is true: float32 training is not "
                               "modelled; set bf16: true (or fp16: true)")
    cfg["compute_dtype"] = "bf16" if bf16 else "fp16"
    fields["compute_dtype"] = ("bf16",)

    fa = str(d.get("flash_attn", "auto"))
    if fa not in ATTN:
        raise ConfigError(f"{source}: flash_attn {fa!r} is not one of {', '.join(ATTN)}")
    cfg["attn"] = ATTN[fa]
    fields["attn"] = ("flash_attn",)
    if fa == "auto":
        sem.append("flash_attn: auto: transformers' default attention (sdpa)")

    liger = truthy(d.get("enable_liger_kernel"), "enable_liger_kernel", source)
    cfg["recompute_norms"] = liger
    cfg["loss"] = "fused" if liger else "standard"
    fields["recompute_norms"] = fields["loss"] = ("enable_liger_kernel",)
    sem.append("enable_liger_kernel: fused linear cross-entropy (loss fused) and Liger's "
               "RMSNorm (lean norms)" if liger else
               "the model's own cross-entropy over the full logits: loss standard")
    neat = truthy(d.get("neat_packing"), "neat_packing", source)
    cfg["packed_rows"] = neat
    fields["packed_rows"] = ("neat_packing",)
    if d.get("packing") and not neat:
        unmodelled.append("packing without neat_packing: packed examples attend to each other "
                          "(no mask to model)")
    if not neat and not d.get("packing"):
        sem.append("no packing: batches are padded to their longest example; the estimate is a "
                   f"batch of {cfg['seq_len']}-token examples (the largest step)")
    cfg["expandable_segments"] = env_expandable()
    fields["expandable_segments"] = None
    sem.append(f"{ALLOC_ENV} comes from the environment (LLaMA-Factory has no field for it): "
               + ("expandable segments" if cfg["expandable_segments"] else "not set here: "
                  "PyTorch's default allocator"))
    fields["mlp_chunk"] = fields["embed_on_cpu"] = fields["loss_chunk"] = None
    if d.get("deepspeed") or d.get("fsdp"):
        unmodelled.append("deepspeed/fsdp: sharding across GPUs is not modelled")
    if d.get("use_unsloth"):
        unmodelled.append("use_unsloth: Unsloth's kernels are not modelled (the estimate is high)")
    return Reading(format="llama-factory", layout="yaml", source=source, model=model_of(d) or "",
                   config=TrainConfig(**cfg), fields=fields, data=dict(d),
                   semantics=tuple(sem), unmodelled=tuple(unmodelled), tool_version=VERSION,
                   auto_find_batch_size=bool(d.get("auto_find_batch_size")))


def render(cfg: TrainConfig, profile: ModelProfile, *, model: str) -> dict[str, Any]:
    out: dict[str, Any] = {"model_name_or_path": model, "stage": "sft", "do_train": True,
                           "finetuning_type": "lora"}
    if cfg.quant != "none":
        out["quantization_bit"] = 4
        out["quantization_method"] = "bnb"
        out["quantization_type"] = cfg.quant
        out["double_quantization"] = cfg.double_quant
    out["lora_rank"] = cfg.lora_rank
    out["lora_alpha"] = cfg.lora_alpha
    out["lora_dropout"] = cfg.lora_dropout
    out["lora_target"] = "all" if cfg.lora_targets is None else ",".join(
        profile.target_names[t] for t in profile.resolve_targets(cfg.lora_targets))
    out["cutoff_len"] = cfg.seq_len
    out["per_device_train_batch_size"] = cfg.batch_size
    out["gradient_accumulation_steps"] = cfg.grad_accum // cfg.gpus  # per process
    out["disable_gradient_checkpointing"] = not cfg.grad_ckpt
    if cfg.grad_ckpt:
        out["use_reentrant_gc"] = False
    out["use_unsloth_gc"] = bool(cfg.offload_activations and cfg.grad_ckpt)
    out["optim"] = {"paged_adamw_8bit": "paged_adamw_8bit", "adamw_8bit": "adamw_bnb_8bit",
                    "adamw_torch": "adamw_torch"}[cfg.optim]
    out["bf16"] = cfg.compute_dtype == "bf16"
    out["fp16"] = cfg.compute_dtype == "fp16"
    out["flash_attn"] = {"sdpa": "sdpa", "eager": "disabled", "flash_attention_2": "fa2"}[cfg.attn]
    out["enable_liger_kernel"] = cfg.loss == "fused" or cfg.recompute_norms
    out["neat_packing"] = cfg.packed_rows
    if cfg.packed_rows:
        out["packing"] = True
    return out


def unexpressible(cfg: TrainConfig) -> dict[str, str]:
    out = {}
    if cfg.embed_on_cpu:
        out["embed_on_cpu"] = "LLaMA-Factory keeps the input embeddings on the GPU"
    if cfg.mlp_chunk:
        out["mlp_chunk"] = "LLaMA-Factory does not tile the MLP"
    if cfg.expandable_segments:
        out["expandable_segments"] = (f"set {ALLOC_ENV}=expandable_segments:True in the "
                                      "environment (LLaMA-Factory has no field for it)")
    if cfg.prepare == "kbit":
        out["prepare"] = "LLaMA-Factory keeps embeddings and lm_head 16-bit (less memory than planned)"
    if (cfg.loss == "fused") != cfg.recompute_norms:
        out["recompute_norms" if cfg.loss == "fused" else "loss"] = (
            "enable_liger_kernel turns on the fused loss and Liger's RMSNorm together")
    if cfg.loss == "fused" and cfg.loss_chunk != TrainConfig().loss_chunk:
        out["loss_chunk"] = "Liger's fused linear cross-entropy chooses its own chunks"
    return out
