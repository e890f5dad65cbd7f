"""A plan as the keyword arguments of the Hugging Face objects, for people who keep their
own trainer; and qplan's memory techniques applied to a model they load themselves.

::

    from qplan import api
    from qplan.planner.plan import load_plan

    hf = load_plan("plan.yaml").to_hf()          # or qplan.ecosystem.to_hf(plan)
    model = AutoModelForCausalLM.from_pretrained(hf.model, **hf.model_kwargs())
    model = hf.apply(model)                       # preparation, LoRA, offload, tiling, ...
    trainer = SFTTrainer(model=model, args=hf.sft_config(output_dir="out"), ...)

The kwargs are plain JSON-able values (dtypes as names: ``"bfloat16"``); the ``*_config``
methods build the objects (they import transformers, peft or trl). Settings the plain
objects cannot carry (``embed_on_cpu``, ``mlp_chunk``, ``recompute_norms``, activation
offload of checkpointed blocks, the fused loss under transformers' ``Trainer``) are applied
by :meth:`HFKwargs.apply`; ``not_expressible`` lists them with what each saves.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qplan.planner.config import TrainConfig
from qplan.profiles.models import ModelProfile

ALLOC_ENV = "PYTORCH_CUDA_ALLOC_CONF"


@dataclass(frozen=True)
class HFKwargs:
    """Keyword arguments for ``from_pretrained``, ``BitsAndBytesConfig``, ``LoraConfig``,
    ``prepare_model_for_kbit_training``, ``TrainingArguments`` and ``SFTConfig``."""

    model: str  # what to pass to from_pretrained (a hub id or a local directory)
    config: TrainConfig
    profile: ModelProfile = field(repr=False)
    from_pretrained: dict[str, Any]  # dtype, attn_implementation (plus quantization_config)
    quantization_config: dict[str, Any] | None  # BitsAndBytesConfig(**...), None = 16-bit weights
    prepare_model_for_kbit_training: dict[str, Any] | None  # None: do not call it
    lora: dict[str, Any]  # LoraConfig(**...)
    training_args: dict[str, Any]  # TrainingArguments(**...) (also valid SFTConfig fields)
    sft: dict[str, Any]  # what SFTConfig adds: max_length, packing, activation_offloading
    env: dict[str, str]  # set before torch starts (PYTORCH_CUDA_ALLOC_CONF)
    not_expressible: dict[str, str]  # qplan setting -> why the kwargs cannot carry it

    # -- the objects ----------------------------------------------------------
    def bnb_config(self):
        """``transformers.BitsAndBytesConfig`` (None for plain LoRA on 16-bit weights)."""
        if self.quantization_config is None:
            return None
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(**self.quantization_config)

    def model_kwargs(self, device_map: Any = "default") -> dict[str, Any]:
        """``from_pretrained`` kwargs with the BitsAndBytesConfig object and, unless
        ``device_map`` is given, ``{"": 0}`` on a CUDA machine (the plan's placement)."""
        import torch

        kw = dict(self.from_pretrained)
        kw["dtype"] = getattr(torch, kw["dtype"])
        q = self.bnb_config()
        if q is not None:
            kw["quantization_config"] = q
        if device_map == "default":
            device_map = {"": 0} if torch.cuda.is_available() else None
        if device_map is not None:
            kw["device_map"] = device_map
        return kw

    def lora_config(self):
        from peft import LoraConfig

        return LoraConfig(**self.lora)

    def training_arguments(self, **overrides: Any):
        """``transformers.TrainingArguments`` (``output_dir`` and the rest as overrides)."""
        from transformers import TrainingArguments

        return TrainingArguments(**{**self.training_args, **overrides})

    def sft_config(self, **overrides: Any):
        """``trl.SFTConfig``: the training arguments plus trl's own fields."""
        from trl import SFTConfig

        return SFTConfig(**{**self.training_args, **self.sft, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """The sections layout ``qplan check`` reads (``qplan export --format trl`` writes
        it as a script)."""
        out: dict[str, Any] = {"trainer": "SFTTrainer", "model": self.model,
                               "from_pretrained": dict(self.from_pretrained)}
        if self.quantization_config is not None:
            out["quantization_config"] = dict(self.quantization_config)
        if self.prepare_model_for_kbit_training is not None:
            out["prepare_model_for_kbit_training"] = dict(self.prepare_model_for_kbit_training)
        out["peft_config"] = dict(self.lora)
        out["args"] = {**self.training_args, **self.sft}
        out["env"] = dict(self.env)
        return out

    # -- qplan's techniques on the user's model --------------------------------------
    def apply(self, model):
        """Prepare ``model`` (loaded with :meth:`model_kwargs`) the way the plan says and wrap
        it with LoRA: kbit or lean preparation, gradient checkpointing (with activation
        offload), lean RMSNorms, CPU embeddings and the tiled MLP. Returns the peft model.

        Gradient checkpointing is set up here: pass ``gradient_checkpointing=False`` to the
        trainer (the kwargs already do), or it would re-enable checkpointing its own way and
        drop the offload. Do not call ``prepare_model_for_kbit_training`` or
        ``get_peft_model`` yourself, and pass no ``peft_config`` to SFTTrainer.
        """
        from qplan.runner import techniques as T

        T.prepare_for_training(model, self.config)
        return T.add_lora(model, self.profile, self.config)

    def loss(self, model, input_ids, labels, **kw):
        """The plan's loss for a custom loop (``fused``: chunked, never the full float32
        logits); ``kw``: attention_mask, position_ids."""
        from qplan.runner.techniques import causal_lm_loss

        return causal_lm_loss(model, self.config, input_ids, labels, **kw)


def to_hf(plan_or_config, profile: ModelProfile | None = None, *, model: str | None = None,
          apply_techniques: bool = True) -> HFKwargs:
    """The kwargs of a :class:`~qplan.planner.plan.Plan` (or a TrainConfig with ``profile``).

    ``apply_techniques=True`` (default) prepares the kwargs for :meth:`HFKwargs.apply`:
    ``gradient_checkpointing`` is left to it and ``prepare_model_for_kbit_training`` is
    None (apply does it). ``False`` gives the kwargs of a plain script that calls
    ``prepare_model_for_kbit_training`` itself and lets the trainer checkpoint; the
    settings such a script cannot carry are listed in ``not_expressible``.
    """
    from qplan.ecosystem.trl import render, unexpressible

    cfg = getattr(plan_or_config, "config", plan_or_config)
    if profile is None:
        from qplan import api

        profile = api.get_model(plan_or_config.model)
    name = model or getattr(plan_or_config, "model", None) or profile.hf_id
    from qplan import api

    found = api.catalog().models.find(name) if name else None
    if found is not None and found.hf_id and "/" in found.hf_id:
        name = found.hf_id
    s = render(cfg, profile, model=name)
    args = dict(s["args"])
    sft = {k: args.pop(k) for k in ("max_length", "packing", "activation_offloading") if k in args}
    prepare = s.get("prepare_model_for_kbit_training")
    missing = unexpressible(cfg)
    if apply_techniques:
        args["gradient_checkpointing"] = False
        args.pop("gradient_checkpointing_kwargs", None)
        sft.pop("activation_offloading", None)
        args.pop("use_liger_kernel", None)
        prepare = None
        missing = {k: v for k, v in missing.items() if k == "loss"}
    else:
        if cfg.recompute_norms:
            missing["recompute_norms"] = "use_liger_kernel (needs liger-kernel) stands in for it"
    if cfg.gpus > 1:
        missing["gpus"] = (f"start {cfg.gpus} processes (accelerate launch --num_processes "
                           f"{cfg.gpus}); gradient_accumulation_steps is per process")
    return HFKwargs(model=name, config=cfg, profile=profile,
                    from_pretrained=dict(s["from_pretrained"]),
                    quantization_config=s.get("quantization_config"),
                    prepare_model_for_kbit_training=prepare, lora=dict(s["peft_config"]),
                    training_args=args, sft=sft, env=dict(s["env"]), not_expressible=missing)
