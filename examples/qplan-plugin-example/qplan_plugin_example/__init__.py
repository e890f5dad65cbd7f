"""An example qplan plugin: what a lab would add for its own hardware, models and rules.

qplan loads this module through the ``qplan`` entry point in ``pyproject.toml`` and calls
the functions marked ``@hookimpl`` (see ``docs/plugins.md``). Each hook is independent:
a plugin implements only those it needs.
"""
from __future__ import annotations

from qplan.plugins import hookimpl
from qplan.profiles.gpus import GpuProfile
from qplan.profiles.models import ModelProfile

__version__ = "0.1.0"

# The house policy.
MAX_LORA_RANK = 32
ATTENTION_ONLY = ("q", "k", "v", "o")
# Architectures whose mixture-of-experts memory this plugin models (adjust_memory).
MOE_MODEL_TYPES = ("mixtral",)

GPUS = [
    # NVIDIA RTX PRO 4000 Blackwell (desktop, GB203): 24 GB GDDR7 on 192 bit, 672 GB/s;
    # 70 SMs, boost 2617 MHz (https://cputronic.com/gpu/compare/nvidia-rtx-pro-4000-blackwell-
    # vs-nvidia-rtx-pro-2000-blackwell). Dense 16-bit tensor rate with FP32 accumulate, full
    # rate on RTX PRO cards: 1024 FLOP per SM per clock (95.84 TFLOPS for the SFF variant's
    # 70 SMs at 1337 MHz, https://hmc-tech.com/gpu/nvidia-rtx-pro-4000-blackwell-sff), so
    # 70 x 1024 x 2.617 GHz = 187.6 TFLOPS. Compute capability 12.0 (Blackwell GB20x).
    GpuProfile("rtx-pro-4000-blackwell", "NVIDIA RTX PRO 4000 Blackwell", 24, (12, 0), 187.6,
               672, "https://cputronic.com/gpu/compare/nvidia-rtx-pro-4000-blackwell-vs-nvidia-"
               "rtx-pro-2000-blackwell", kind="workstation", aliases=("rtx-pro-4000",),
               nvml_names=("rtx pro 4000 blackwell",),
               notes="16-bit rate derived from SM count and boost clock; see the plugin source"),
]

MODELS = [
    # https://huggingface.co/Qwen/Qwen2-0.5B/blob/main/config.json
    # (qwen2 has a bias on q/k/v that config.json does not state: attention_bias=True)
    dict(name="qwen2-0.5b", hf_id="Qwen/Qwen2-0.5B", model_type="qwen2",
         hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
         num_attention_heads=14, num_key_value_heads=2, vocab_size=151_936,
         max_position_embeddings=131_072, tie_word_embeddings=True, attention_bias=True,
         family="qwen2", source="https://huggingface.co/Qwen/Qwen2-0.5B/blob/main/config.json"),
]


# --- catalogue -----------------------------------------------------------------------------
@hookimpl
def register_gpus(register):
    """Add the lab's cards. qplan checks names and aliases against every other plugin."""
    for gpu in GPUS:
        register(gpu)


@hookimpl
def register_models(register):
    for shape in MODELS:
        register(ModelProfile(**shape))


# --- planning ------------------------------------------------------------------------------
@hookimpl
def plan_policy(model, gpu, config):
    """House rules: LoRA rank at most 32 (alpha scaled with it); on Mixtral, adapters on
    attention only (the expert adapters are not in :func:`adjust_memory`'s model)."""
    cfg = config
    if cfg.lora_rank > MAX_LORA_RANK:
        alpha = max(1, cfg.lora_alpha * MAX_LORA_RANK // cfg.lora_rank)
        cfg = cfg.with_(lora_rank=MAX_LORA_RANK, lora_alpha=alpha)
    if model.model_type in MOE_MODEL_TYPES:
        if set(model.resolve_targets(cfg.lora_targets)) - set(ATTENTION_ONLY):
            cfg = cfg.with_(lora_targets=ATTENTION_ONLY)
    return cfg if cfg != config else None


@hookimpl
def adjust_memory(model, config, terms):
    """Memory of a Mixtral-style mixture of experts, on top of the core's dense terms.

    The core counts one MLP (gate, up, down) per block. A Mixtral block has
    ``num_local_experts`` of them plus a router (hidden x experts), all 4-bit; and each token
    runs through ``num_experts_per_tok`` experts, so the MLP activations the core counts for
    one expert are kept for every active expert (per block without checkpointing, for the
    block being recomputed with it). Not counted: the routing buffers (small), LoRA on the
    experts (the policy above keeps adapters on attention).
    """
    if model.model_type not in MOE_MODEL_TYPES or not model.is_moe:
        return None
    from qplan.planner.memory import MemoryTerm

    h, i, layers = model.hidden_size, model.intermediate_size, model.num_hidden_layers
    experts, active = model.num_local_experts, max(1, model.num_experts_per_tok)
    base = next(t for t in terms if t.key == "base_weights_4bit")
    bytes_per_param = base.bytes / model.quantized_params  # the core's 4-bit (or 16-bit) cost
    extra_params = layers * ((experts - 1) * 3 * h * i + h * experts)
    terms.append(MemoryTerm(
        "moe_expert_weights", f"other {experts - 1} experts and routers", int(
            extra_params * bytes_per_param),
        f"{experts - 1} more expert MLPs (3 x {h} x {i}) and a {h} x {experts} router per "
        f"block, at the base weights' bytes per parameter (qplan-plugin-example)"))
    tokens = config.batch_size * config.seq_len
    blocks = 1 if config.grad_ckpt else layers
    terms.append(MemoryTerm(
        "moe_expert_activations", f"activations of {active - 1} more active experts",
        tokens * (active - 1) * 3 * i * 2 * blocks,
        "gate and up outputs and their product (16-bit) for each extra expert a token "
        "visits (qplan-plugin-example)"))
    return True


# --- command line --------------------------------------------------------------------------
@hookimpl
def register_commands(cli):
    import click

    @cli.command(name="house-rules")
    def house_rules() -> None:
        """Show the planning rules that qplan-plugin-example adds.

        \b
        Example:
          qplan house-rules
        """
        click.echo(f"LoRA rank at most {MAX_LORA_RANK} (alpha scaled with it)")
        click.echo(f"{', '.join(MOE_MODEL_TYPES)}: LoRA on attention only "
                   f"({', '.join(ATTENTION_ONLY)}); expert memory modelled by this plugin")
