"""axolotl YAML configs: read, model, write (fields of axolotl 0.19.0's ``AxolotlInputConfig``).

How axolotl's behaviour is modelled (read from axolotl 0.19.0's sources,
``axolotl/loaders/model.py`` and ``axolotl/utils/schemas/``):

* ``adapter: qlora`` with ``load_in_4bit``: bitsandbytes nf4 with double quantization
  (``bnb_config_kwargs`` may change both); ``adapter: lora`` without it: 16-bit weights.
* axolotl casts embeddings and lm_head to float32 (and runs peft's
  ``prepare_model_for_kbit_training``), qplan's ``kbit`` preparation, unless
  ``load_in_4bit`` and ``embeddings_skip_upcast`` keep them 16-bit (``lean``).
* loss: the model's own cross-entropy (``standard``) unless ``chunked_cross_entropy``, Liger's
  fused linear cross-entropy or Cut Cross-Entropy make it chunked (``fused``).
* ``gradient_checkpointing: offload`` and ``activation_offloading`` keep checkpointed block
  inputs in CPU memory (qplan's ``offload_activations``); ``tiled_mlp`` runs the MLP in
  ``tiled_mlp_num_shards`` chunks (default: sequence length / hidden size);
  ``liger_rms_norm`` keeps the norm's input and one scale per token (lean norms).
* ``sample_packing``: several examples per row with positions restarting (``packed_rows``);
  rows are padded to ``sequence_len`` (axolotl's ``pad_to_sequence_len`` default with
  packing), so the estimate is that of full rows.
* axolotl has no field for ``PYTORCH_CUDA_ALLOC_CONF``: it comes from the environment.
"""
from __future__ import annotations

import math
import os
from typing import Any

from qplan.ecosystem import fields_data as F
from qplan.ecosystem.base import (Reading, dropout, optimizer, positive_int, truthy,
                                  unknown_fields, want)
from qplan.errors import ConfigError, NotModelledError
from qplan.planner.config import TrainConfig
from qplan.profiles.models import ModelProfile

VERSION = F.VERSIONS["axolotl"]
LIGER_PLUGIN = "axolotl.integrations.liger.LigerPlugin"
CCE_PLUGIN = "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"
ALLOC_ENV = "PYTORCH_CUDA_ALLOC_CONF"


def detect(data: dict[str, Any]) -> bool:
    keys = set(data)
    return "base_model" in keys or bool(keys & {"micro_batch_size", "sequence_len", "adapter",
                                                "lora_target_linear", "sample_packing"})


def model_of(data: dict[str, Any]) -> str | None:
    m = data.get("base_model")
    return m if isinstance(m, str) and m.strip() else None


def field_name(path: tuple[str, ...], layout: str = "yaml") -> str:
    return ".".join(path)


def env_expandable() -> bool:
    return "expandable_segments:true" in os.environ.get(ALLOC_ENV, "").replace(" ", "").lower()


def read(data: dict[str, Any], profile: ModelProfile, *, source: str, **_: Any) -> Reading:
    d = data
    sem: list[str] = []
    unmodelled = unknown_fields(d, F.axolotl, f"axolotl {VERSION}'s config")
    cfg: dict[str, Any] = {}
    fields: dict[str, tuple[str, ...] | None] = {}

    adapter = d.get("adapter")
    if adapter not in ("lora", "qlora"):
        raise NotModelledError(f"{source}: adapter is {adapter!r}: full fine-tuning is not "
                               "modelled; set adapter: qlora (with load_in_4bit: true) or lora")
    if truthy(d.get("load_in_8bit"), "load_in_8bit", source):
        raise NotModelledError(f"{source}: load_in_8bit (8-bit bitsandbytes) is not modelled; "
                               "use adapter: qlora with load_in_4bit: true, or plain lora")
    four = truthy(d.get("load_in_4bit"), "load_in_4bit", source)
    if adapter == "qlora" and not four:
        raise ConfigError(f"{source}: adapter: qlora needs load_in_4bit: true")
    bnb = d.get("bnb_config_kwargs") or {}
    want(bnb, dict, "bnb_config_kwargs", source)
    if four:
        qt = bnb.get("bnb_4bit_quant_type", "nf4")
        if qt not in ("nf4", "fp4"):
            raise ConfigError(f"{source}: bnb_config_kwargs.bnb_4bit_quant_type {qt!r} is not nf4 or fp4")
        cfg["quant"] = qt
        cfg["double_quant"] = truthy(bnb.get("bnb_4bit_use_double_quant", True),
                                     "bnb_4bit_use_double_quant", source)
    else:
        cfg["quant"], cfg["double_quant"] = "none", False
    fields["quant"] = ("load_in_4bit",)
    fields["double_quant"] = ("bnb_config_kwargs", "bnb_4bit_use_double_quant")

    skip_upcast = truthy(d.get("embeddings_skip_upcast"), "embeddings_skip_upcast", source)
    cfg["prepare"] = "lean" if (four and skip_upcast) else "kbit"
    fields["prepare"] = ("embeddings_skip_upcast",)
    sem.append("embeddings and lm_head stay 16-bit (embeddings_skip_upcast): lean"
               if cfg["prepare"] == "lean" else
               "axolotl casts embeddings and lm_head to float32 (no embeddings_skip_upcast): kbit")

    cfg["lora_rank"] = positive_int(d.get("lora_r", 8), "lora_r", source)
    cfg["lora_alpha"] = positive_int(d.get("lora_alpha", 16), "lora_alpha", source)
    cfg["lora_dropout"] = dropout(d.get("lora_dropout", 0.0) or 0.0, "lora_dropout", source)
    for k, f in (("lora_r", "lora_rank"), ("lora_alpha", "lora_alpha"),
                 ("lora_dropout", "lora_dropout")):
        fields[f] = (k,)
    if "lora_r" not in d or "lora_alpha" not in d:
        raise ConfigError(f"{source}: set lora_r and lora_alpha (axolotl has no defaults for them)")
    if truthy(d.get("lora_target_linear"), "lora_target_linear", source):
        cfg["lora_targets"] = None
    else:
        mods = d.get("lora_target_modules")
        if not mods:
            raise ConfigError(f"{source}: set lora_target_linear: true or lora_target_modules")
        mods = [mods] if isinstance(mods, str) else want(mods, list, "lora_target_modules", source)
        names = profile.target_names
        cfg["lora_targets"] = None if set(mods) >= set(names.values()) else \
            profile.resolve_targets(tuple(str(m) for m in mods))
    fields["lora_targets"] = ("lora_target_linear",)

    cfg["seq_len"] = positive_int(d.get("sequence_len", 512), "sequence_len", source)
    fields["seq_len"] = ("sequence_len",)
    cfg["batch_size"] = positive_int(d.get("micro_batch_size", 1), "micro_batch_size", source)
    fields["batch_size"] = ("micro_batch_size",)
    if d.get("gradient_accumulation_steps") is None and d.get("batch_size") is not None:
        cfg["grad_accum"] = max(1, positive_int(d["batch_size"], "batch_size", source) // cfg["batch_size"])
    else:
        cfg["grad_accum"] = positive_int(d.get("gradient_accumulation_steps", 1) or 1,
                                         "gradient_accumulation_steps", source)
    fields["grad_accum"] = ("gradient_accumulation_steps",)

    gc = d.get("gradient_checkpointing", False)
    if gc not in (True, False, None, "offload", "offload_disk"):
        raise ConfigError(f"{source}: gradient_checkpointing {gc!r} is not true, false, offload "
                          "or offload_disk")
    cfg["grad_ckpt"] = bool(gc)
    fields["grad_ckpt"] = ("gradient_checkpointing",)
    ao = d.get("activation_offloading", False)
    if ao not in (True, False, None, "legacy", "disk", "hidden_states"):
        raise ConfigError(f"{source}: activation_offloading {ao!r} is not true, false, legacy, "
                          "disk or hidden_states")
    cfg["offload_activations"] = bool(gc in ("offload", "offload_disk") or ao) and cfg["grad_ckpt"]
    fields["offload_activations"] = ("gradient_checkpointing",)
    if cfg["offload_activations"]:
        sem.append("checkpointed block inputs wait in CPU memory (offload)")
    if gc == "offload_disk" or ao == "disk":
        unmodelled.append("offload to disk: modelled as offload to CPU memory")

    cfg["optim"] = optimizer(d.get("optimizer", "adamw_torch_fused"), "optimizer", source, sem)
    fields["optim"] = ("optimizer",)

    fp16 = truthy(d.get("fp16"), "fp16", source)
    bf16 = d.get("bf16", "auto")
    if bf16 not in ("auto", True, False, None, "full"):
        raise ConfigError(f"{source}: bf16 {bf16!r} is not true, false, auto or full")
    if fp16:
        cfg["compute_dtype"] = "fp16"
    elif bf16 in (True, "auto", "full"):
        cfg["compute_dtype"] = "bf16"
        if bf16 == "auto":
            sem.append("bf16: auto: bf16 (fp16 on cards without it: give --gpu of such a card "
                       "and set fp16: true)")
    else:
        raise NotModelledError(f"{source}: neither bf16 nor fp16: float32 training is not "
                               "modelled; set bf16: true (or fp16: true)")
    fields["compute_dtype"] = ("bf16",)

    attn = d.get("attn_implementation")
    if attn is None:
        attn = ("flash_attention_2" if d.get("flash_attention") else
                "eager" if d.get("eager_attention") else "sdpa")
    if attn.startswith("flash_attention"):
        attn = "flash_attention_2"
    elif attn not in ("sdpa", "eager"):
        raise NotModelledError(f"{source}: attention {attn!r} is not modelled; modelled: sdpa, "
                               "flash_attention_2, eager")
    if d.get("xformers_attention") or d.get("flex_attention") or d.get("sage_attention"):
        raise NotModelledError(f"{source}: xformers, flex and sage attention are not modelled; "
                               "use attn_implementation: sdpa or flash_attention_2")
    cfg["attn"] = attn
    fields["attn"] = ("attn_implementation",)

    plugins = d.get("plugins") or []
    want(plugins, list, "plugins", source)
    liger = LIGER_PLUGIN in plugins
    cfg["recompute_norms"] = liger and truthy(d.get("liger_rms_norm"), "liger_rms_norm", source)
    fields["recompute_norms"] = ("liger_rms_norm",)
    fused = (truthy(d.get("chunked_cross_entropy"), "chunked_cross_entropy", source)
             or (liger and truthy(d.get("liger_fused_linear_cross_entropy"),
                                  "liger_fused_linear_cross_entropy", source))
             or (CCE_PLUGIN in plugins and truthy(d.get("cut_cross_entropy"), "cut_cross_entropy",
                                                  source)))
    cfg["loss"] = "fused" if fused else "standard"
    fields["loss"] = ("chunked_cross_entropy",)
    sem.append("the loss is computed in chunks: loss fused" if fused else
               "the model's own cross-entropy over the full logits: loss standard")
    if (d.get("liger_rms_norm") or d.get("liger_fused_linear_cross_entropy")) and not liger:
        unmodelled.append(f"liger_* fields need plugins: [{LIGER_PLUGIN}]; without it they do nothing")

    if truthy(d.get("tiled_mlp"), "tiled_mlp", source):
        shards = d.get("tiled_mlp_num_shards") or math.ceil(cfg["seq_len"] / profile.hidden_size)
        shards = positive_int(shards, "tiled_mlp_num_shards", source)
        cfg["mlp_chunk"] = math.ceil(cfg["seq_len"] / shards) if shards > 1 else 0
    fields["mlp_chunk"] = ("tiled_mlp_num_shards",)

    cfg["packed_rows"] = truthy(d.get("sample_packing"), "sample_packing", source)
    fields["packed_rows"] = ("sample_packing",)
    if not cfg["packed_rows"] and not d.get("pad_to_sequence_len"):
        sem.append("no sample_packing: batches are padded to their longest example; the estimate "
                   f"is a batch of {cfg['seq_len']}-token examples (the largest step)")
    cfg["expandable_segments"] = env_expandable()
    fields["expandable_segments"] = None
    sem.append(f"{ALLOC_ENV} comes from the environment (axolotl has no field for it): "
               + ("expandable segments" if cfg["expandable_segments"] else "not set here: "
                  "PyTorch's default allocator"))
    fields["embed_on_cpu"] = fields["loss_chunk"] = None
    if d.get("deepspeed") or d.get("fsdp") or d.get("fsdp_config"):
        unmodelled.append("deepspeed/fsdp: sharding across GPUs is not modelled; the estimate is "
                          "for one GPU holding everything")
    if d.get("auto_find_batch_size"):
        unmodelled.append("auto_find_batch_size: on an out-of-memory error the batch is halved")
    if d.get("lora_modules_to_save"):
        unmodelled.append("lora_modules_to_save: fully trained module copies are not modelled")
    return Reading(format="axolotl", layout="yaml", source=source, model=model_of(d) or "",
                   config=TrainConfig(**cfg), fields=fields, data=dict(d),
                   semantics=tuple(sem), unmodelled=tuple(unmodelled), tool_version=VERSION,
                   auto_find_batch_size=bool(d.get("auto_find_batch_size")))


def render(cfg: TrainConfig, profile: ModelProfile, *, model: str) -> dict[str, Any]:
    """axolotl fields for ``cfg`` (what it can express; see :func:`unexpressible`)."""
    out: dict[str, Any] = {"base_model": model}
    if cfg.quant != "none":
        out["adapter"] = "qlora"
        out["load_in_4bit"] = True
        out["bnb_config_kwargs"] = {"bnb_4bit_quant_type": cfg.quant,
                                    "bnb_4bit_use_double_quant": cfg.double_quant}
    else:
        out["adapter"] = "lora"
    out["embeddings_skip_upcast"] = cfg.prepare == "lean" and cfg.quant != "none"
    out["lora_r"] = cfg.lora_rank
    out["lora_alpha"] = cfg.lora_alpha
    out["lora_dropout"] = cfg.lora_dropout
    if cfg.lora_targets is None:
        out["lora_target_linear"] = True
    else:
        out["lora_target_modules"] = [profile.target_names[t]
                                      for t in profile.resolve_targets(cfg.lora_targets)]
    out["sequence_len"] = cfg.seq_len
    out["micro_batch_size"] = cfg.batch_size
    out["gradient_accumulation_steps"] = cfg.grad_accum // cfg.gpus  # per process
    out["gradient_checkpointing"] = ("offload" if cfg.offload_activations and cfg.grad_ckpt
                                     else cfg.grad_ckpt)
    if cfg.grad_ckpt:
        out["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    out["optimizer"] = {"paged_adamw_8bit": "paged_adamw_8bit", "adamw_8bit": "adamw_bnb_8bit",
                        "adamw_torch": "adamw_torch"}[cfg.optim]
    out["bf16"] = cfg.compute_dtype == "bf16"
    out["fp16"] = cfg.compute_dtype == "fp16"
    out["attn_implementation"] = cfg.attn
    out["chunked_cross_entropy"] = cfg.loss == "fused"
    if cfg.recompute_norms:
        out["plugins"] = [LIGER_PLUGIN]
        out["liger_rms_norm"] = True
    if cfg.mlp_chunk:
        out["tiled_mlp"] = True
        out["tiled_mlp_num_shards"] = max(2, math.ceil(cfg.seq_len / cfg.mlp_chunk))
    out["sample_packing"] = cfg.packed_rows
    if cfg.packed_rows:
        out["pad_to_sequence_len"] = True
    return out


def unexpressible(cfg: TrainConfig) -> dict[str, str]:
    out = {}
    if cfg.embed_on_cpu:
        out["embed_on_cpu"] = "axolotl keeps the input embeddings on the GPU"
    if cfg.expandable_segments:
        out["expandable_segments"] = (f"set {ALLOC_ENV}=expandable_segments:True in the "
                                      "environment (axolotl has no field for it)")
    if cfg.loss == "fused" and cfg.loss_chunk != TrainConfig().loss_chunk:
        out["loss_chunk"] = "axolotl's chunked_cross_entropy chooses its own chunks"
    if cfg.prepare == "lean" and cfg.quant == "none":
        out["prepare"] = "axolotl casts embeddings and lm_head to float32 without load_in_4bit"
    if cfg.mlp_chunk and math.ceil(cfg.seq_len / max(2, math.ceil(cfg.seq_len / cfg.mlp_chunk))) != cfg.mlp_chunk:
        out["mlp_chunk"] = "axolotl tiles the MLP in equal shards (tiled_mlp_num_shards)"
    return out
