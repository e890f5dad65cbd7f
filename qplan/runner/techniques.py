"""How each plan setting is applied to a real model (transformers + peft + bitsandbytes).

Used by the runner and by ``benchmarks/memory_accuracy.py``, so the settings that are
measured are exactly the ones that are run. torch and friends are imported inside the
functions: importing this module is cheap, but calling it needs ``qplan[train]``.
"""
from __future__ import annotations

import gc
from typing import Any

from qplan.planner.config import TrainConfig
from qplan.profiles.models import ModelProfile


def torch_dtype(cfg: TrainConfig):
    import torch

    return torch.bfloat16 if cfg.compute_dtype == "bf16" else torch.float16


def quantization_config(cfg: TrainConfig):
    """bitsandbytes 4-bit settings for ``cfg`` (None for plain LoRA, ``quant="none"``).

    Under ``strategy="fsdp"`` the packed 4-bit values are stored in the compute dtype
    (``bnb_4bit_quant_storage``): FSDP shards only floating-point tensors, and the same
    dtype as the other weights lets a block's parameters be gathered together.
    """
    if cfg.quant == "none":
        return None
    from transformers import BitsAndBytesConfig

    storage = torch_dtype(cfg) if cfg.strategy == "fsdp" else "uint8"
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quant,
                              bnb_4bit_use_double_quant=cfg.double_quant,
                              bnb_4bit_compute_dtype=torch_dtype(cfg),
                              bnb_4bit_quant_storage=storage)


def load_model(path: str, cfg: TrainConfig, device_map: Any = None):
    """Load the base model for training, quantized as ``cfg`` says.

    After loading, unreferenced tensors that ``from_pretrained`` leaves behind are
    collected and the CUDA cache emptied (several GiB on large models otherwise).
    """
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = dict(dtype=torch_dtype(cfg), attn_implementation=cfg.attn)
    q = quantization_config(cfg)
    if q is not None:
        kwargs["quantization_config"] = q
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    free_cached_memory()
    return model


def quant_states_to(model, device) -> int:
    """Move every 4-bit layer's quantization constants (bitsandbytes' ``quant_state``, kept
    beside the module, not a parameter: FSDP's offload leaves them where loading put them)
    to ``device``; returns how many."""
    n = 0
    for mod in model.modules():
        qs = getattr(mod, "quant_state", None)
        if qs is not None and hasattr(qs, "to"):
            qs.to(device)  # bitsandbytes' QuantState.to moves in place
            n += 1
    return n


def load_adapter_weights(model, checkpoint: str) -> None:
    """The LoRA weights a checkpoint folder holds (``adapter_model.safetensors``, as
    ``save_model`` writes it), into ``model``'s adapter, in place. Used before FSDP shards the
    model on resume: the Trainer's own resume loads the adapter into the sharded model."""
    from pathlib import Path

    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    f = Path(checkpoint) / "adapter_model.safetensors"
    if not f.is_file():
        raise FileNotFoundError(f"{checkpoint} has no adapter_model.safetensors to resume from")
    result = set_peft_model_state_dict(model, load_file(str(f)))
    bad = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if bad:
        raise RuntimeError(f"the checkpoint's adapter does not match the model: {bad[:3]}")


def free_cached_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def prepare_for_training(model, cfg: TrainConfig) -> None:
    """Freeze the base model and set up checkpointing the way ``cfg.prepare`` says.

    ``kbit``: peft's ``prepare_model_for_kbit_training`` (every non-4-bit parameter,
    embeddings and lm_head included, cast to float32). ``lean``: freeze, keep embeddings,
    lm_head and norms in 16-bit (the norms compute in float32 internally anyway), and let
    gradients reach the inputs so checkpointed blocks have something to differentiate.
    Then the lean RMSNorms (``recompute_norms``), the activation offload
    (``offload_activations``) and the CPU embeddings (``embed_on_cpu``).
    """
    ckpt_kwargs = {"use_reentrant": False}
    # from_pretrained returns the model in eval mode, where transformers skips
    # checkpointing and LoRA dropout is inactive: training needs train mode.
    model.train()
    if cfg.prepare == "kbit" and cfg.quant != "none":
        from peft import prepare_model_for_kbit_training

        # checkpointing is switched on below, as for lean (peft would use the deprecated call)
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
    if cfg.grad_ckpt:
        model.enable_input_require_grads()
    set_checkpointing(model, cfg.grad_ckpt, ckpt_kwargs)
    model.config.use_cache = False
    if cfg.recompute_norms:
        from qplan.runner.lowmem import make_norms_lean

        make_norms_lean(model)
    if cfg.offload_activations and cfg.grad_ckpt:
        offload_block_inputs(model, cfg)
    if cfg.embed_on_cpu:
        embeddings_to_cpu(model)


def set_checkpointing(model, on: bool, kwargs: dict[str, Any] | None = None) -> None:
    """Activation (gradient) checkpointing on or off: transformers' ``activation_*`` methods
    where they exist (5.24 on), else the ``gradient_*`` ones they replace."""
    if on:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        disable = getattr(model, "activation_checkpointing_disable", None)
        (disable or model.gradient_checkpointing_disable)()


def _decoder_layers(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.layers


def offload_block_inputs(model, cfg: TrainConfig, pool=None) -> int:
    """Checkpoint every decoder block so that its saved input lives in host memory (a
    bounded pool of pinned buffers, see :class:`qplan.runner.lowmem.PinnedPool`) until
    the block's backward pass brings it back. Replaces the checkpointing function that
    ``gradient_checkpointing_enable`` installed; returns how many blocks use it."""
    import psutil

    from qplan.runner.lowmem import PinnedPool, offloaded_checkpoint

    if pool is None:
        # never pin more than half the machine's memory: beyond, pageable buffers
        pool = PinnedPool(limit_bytes=psutil.virtual_memory().total // 2)
    fn = offloaded_checkpoint(pool, preserve_rng=cfg.lora_dropout > 0)
    n = 0
    for layer in _decoder_layers(model):
        if hasattr(layer, "_gradient_checkpointing_func"):
            layer._gradient_checkpointing_func = fn
            n += 1
    model._qplan_offload_pool = pool
    return n


def embeddings_to_cpu(model) -> None:
    """Move the frozen input embeddings to CPU memory; look tokens up there and send only
    the rows used to the model's device. The model's ``hf_device_map`` is untouched: this
    is not an accelerate CPU offload (which accelerate refuses to train in 4-bit), it is a
    frozen lookup table that happens to live in host memory."""
    import torch

    from qplan.errors import BadInputError

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "tie_word_embeddings", False):
        raise BadInputError("embed_on_cpu needs untied embeddings: this model's lm_head shares "
                            "the embedding matrix, which the loss needs on the GPU")
    emb = base.get_input_embeddings()
    if getattr(emb, "_qplan_on_cpu", False):
        return
    device = emb.weight.device
    emb.to("cpu")

    def to_cpu(module, args):
        if module.weight.device.type != "cpu":  # something (Trainer, accelerate) moved it back
            module.to("cpu")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return (args[0].to("cpu"),) + tuple(args[1:])

    def to_device(module, args, output):
        return output.to(device, non_blocking=True)

    # the pre-hook runs first; the device hook goes before any hook already registered
    # (enable_input_require_grads), so gradients are asked for on the device copy
    emb.register_forward_pre_hook(to_cpu)
    emb.register_forward_hook(to_device, prepend=True)
    emb._qplan_on_cpu = True
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def lora_config(profile: ModelProfile, cfg: TrainConfig):
    from peft import LoraConfig

    names = profile.target_names
    modules = [names[t] for t in profile.resolve_targets(cfg.lora_targets)]
    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=modules, bias="none", task_type="CAUSAL_LM")


def add_lora(model, profile: ModelProfile, cfg: TrainConfig):
    """Wrap ``model`` with LoRA adapters as ``cfg`` says (and tile its MLPs if asked)."""
    from peft import get_peft_model

    model = get_peft_model(model, lora_config(profile, cfg))
    tile_mlp(model, cfg)
    return model


def tile_mlp(model, cfg: TrainConfig) -> int:
    """Run every block's MLP over the sequence in chunks of ``cfg.mlp_chunk`` tokens
    (:class:`qplan.runner.lowmem.TiledMLP`): its intermediate-size tensors (gate, up, their
    product: most of a block's activations) exist for one chunk at a time, in forward and
    in the recomputation of backward, and only the MLP's input is saved. Costs one more
    MLP forward per chunk in backward. A no-op when ``mlp_chunk`` is 0. Returns how many
    MLPs were tiled."""
    if not cfg.mlp_chunk:
        return 0
    from qplan.runner.lowmem import tiled

    n = 0
    for layer in _decoder_layers(model):
        mlp = layer.mlp
        if getattr(mlp, "_qplan_tiled", False):
            continue
        mlp.forward = tiled(mlp.forward, cfg.mlp_chunk, preserve_rng=cfg.lora_dropout > 0)
        mlp._qplan_tiled = True
        n += 1
    return n


def make_optimizer(params, cfg: TrainConfig, lr: float = 2e-4):
    """The optimizer ``cfg.optim`` names, over ``params``."""
    import torch

    params = [p for p in params if p.requires_grad]
    if cfg.optim == "adamw_torch":
        return torch.optim.AdamW(params, lr=lr)
    import bitsandbytes as bnb

    if cfg.optim == "paged_adamw_8bit":
        return bnb.optim.PagedAdamW8bit(params, lr=lr)
    return bnb.optim.AdamW8bit(params, lr=lr)


# ---------------------------------------------------------------------------
# the loss
def _decoder_and_head(model):
    """(decoder, lm_head, final_logit_softcapping, logit scale) of a (peft-wrapped) causal
    LM: the transforms its own forward applies to the logits (Gemma's soft-capping, Granite's
    ``logits_scaling`` divisor, Cohere's ``logit_scale`` factor)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    cap = getattr(cfg, "final_logit_softcapping", None)
    scale = 1.0
    if getattr(cfg, "logits_scaling", None):
        scale /= float(cfg.logits_scaling)
    if getattr(cfg, "logit_scale", None):
        scale *= float(cfg.logit_scale)
    return base.model, base.lm_head, cap, scale


def _chunk_loss(hidden, weight, labels, softcap, scale=1.0):
    import torch
    import torch.nn.functional as F

    logits = F.linear(hidden, weight).float()
    if scale != 1.0:
        logits = logits * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")


def chunked_cross_entropy(hidden, weight, labels, *, softcap=None, scale: float = 1.0,
                          chunk: int = 256):
    """Mean cross-entropy of ``scale * hidden @ weight.T`` (soft-capped when ``softcap``)
    against ``labels`` (-100 = ignored), computed a chunk of rows at a time: each chunk's
    logits are recomputed in backward (checkpointed), so float32 logits for the whole batch
    never exist."""
    import torch
    from torch.utils.checkpoint import checkpoint

    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    n = (y != -100).sum().clamp(min=1)
    total = torch.zeros((), device=h.device, dtype=torch.float32)
    for i in range(0, h.shape[0], chunk):
        total = total + checkpoint(_chunk_loss, h[i:i + chunk], weight, y[i:i + chunk], softcap,
                                   scale, use_reentrant=False)
    return total / n


def causal_lm_loss(model, cfg: TrainConfig, input_ids, labels, attention_mask=None,
                   position_ids=None):
    """The training loss of one micro-batch under ``cfg.loss``.

    ``standard``: the model's own forward with labels (transformers' ``ForCausalLMLoss``,
    float32 logits for the whole batch). ``fused``: the decoder's hidden states go through
    :func:`chunked_cross_entropy`, which never holds the full logits. ``position_ids``
    restarting at 0 mark packed sequences (attention stays within each).
    """
    if cfg.loss == "standard":
        return model(input_ids=input_ids, attention_mask=attention_mask,
                     position_ids=position_ids, labels=labels).loss

    def fused(m):
        decoder, head, cap, scale = _decoder_and_head(m)
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids).last_hidden_state
        if _is_fsdp(head):  # its weight is read here, not through its forward: gather it
            head.unshard()
        return chunked_cross_entropy(hidden[:, :-1, :], head.weight, labels[:, 1:],
                                     softcap=cap, scale=scale,
                                     chunk=cfg.loss_chunk_rows(head.weight.shape[0]))
    return through_wrapper(model, fused)


def through_wrapper(model, fn):
    """``fn(module)`` for a model that may be wrapped in DistributedDataParallel (``qplan run
    --gpus N``): run inside the wrapper's forward, with the wrapped module's ``forward`` set
    to ``fn`` for the call, since DDP syncs gradients only for passes through its forward
    (calling the decoder inside it directly would skip that). Under FSDP2 the model is its
    own wrapper: its forward hooks (the root's set-up, the gathers) run the same way."""
    import torch

    if _is_fsdp(model):  # the root's hooks (gather, then the backward's reduce) need its call
        model.forward = lambda **_: fn(model)
        try:
            return model(qplan_through=True)
        finally:
            del model.forward
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return fn(model)
    inner = model.module
    inner.forward = lambda **_: fn(inner)  # an instance attribute: shadows the class's forward
    try:  # one keyword: with no inputs at all DDP on a GPU fails (IndexError, seen on H200s)
        return model(qplan_through=True)
    finally:
        del inner.forward


def _is_fsdp(model) -> bool:
    """Whether ``model`` is the root of FSDP2's sharding (``fully_shard``)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without distributed
        return False
    return isinstance(model, FSDPModule)


def label_tokens(labels) -> int:
    """The tokens a micro-batch's loss is the mean over: labels after the shift, not -100."""
    return int((labels[..., 1:] != -100).sum())


def micro_batch_loss(model, cfg: TrainConfig, input_ids, labels, *, position_ids=None,
                     step_tokens: int | None = None, micro_tokens: int | None = None):
    """THE training step's forward: the loss of one micro-batch under autocast, as the
    runner's Trainer and every benchmark compute it.

    Autocast is on the inputs' device, not the first parameter's: with ``embed_on_cpu``
    that is the CPU, and CPU autocast would leave the GPU's matmuls (and LoRA's float32)
    un-autocast. With ``step_tokens`` (the label tokens of all micro-batches of the
    optimizer step) the micro-batch's mean is weighted by its share of them, so the
    micro-batches' losses add up to the step's token mean whatever the split.
    """
    import torch

    with torch.autocast(input_ids.device.type, dtype=torch_dtype(cfg)):
        loss = causal_lm_loss(model, cfg, input_ids, labels, position_ids=position_ids)
    if step_tokens is not None:  # micro_tokens: counted on the host (no wait for the GPU)
        n = label_tokens(labels) if micro_tokens is None else micro_tokens
        loss = loss * n / max(1, step_tokens)
    return loss


def train_step(model, optimizer, cfg: TrainConfig, batches) -> float:
    """One optimizer step over ``batches`` (micro-batches of (input_ids, labels) or
    (input_ids, labels, position_ids)): the runner's loss (:func:`micro_batch_loss`,
    token-weighted over the step), backward, the optimizer. Returns the step's loss (the
    mean over its label tokens)."""
    model.train()
    n = sum(label_tokens(b[1]) for b in batches)
    total = 0.0
    for input_ids, labels, *pos in batches:
        loss = micro_batch_loss(model, cfg, input_ids, labels, step_tokens=n,
                                position_ids=pos[0] if pos else None)
        loss.backward()
        total += float(loss.detach())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total
