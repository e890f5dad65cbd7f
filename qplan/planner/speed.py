"""Speed model: predicted tokens per second of a QLoRA / LoRA training step.

A step is matrix work plus memory traffic. Matrix work: per token, the forward pass
costs 2 FLOPs per weight, the backward pass (input gradients only: the base weights are
frozen) another 2, and checkpointing recomputes the forward once more; attention adds
its s-dependent products. Memory traffic: bitsandbytes dequantizes every 4-bit weight to
16-bit for each pass over it, once per micro-batch, which is why larger batches run faster.
Both are divided by the GPU's rates times an efficiency measured on the GPU machine
(:mod:`.calibration`); on other GPUs the datasheet rates scale the prediction.
"""
from __future__ import annotations

from dataclasses import dataclass

from qplan.planner import calibration as C
from qplan.planner.config import TrainConfig
from qplan.profiles.gpus import GpuProfile
from qplan.profiles.models import ModelProfile


@dataclass(frozen=True)
class SpeedEstimate:
    tokens_per_s: float
    step_s: float  # one optimizer step (all micro-batches)
    compute_s: float  # per micro-batch
    memory_s: float  # per micro-batch

    def wall_time_s(self, tokens: int) -> float:
        return tokens / self.tokens_per_s if self.tokens_per_s else float("inf")

    def scaled(self, factor: float) -> "SpeedEstimate":
        """This estimate with throughput multiplied by ``factor`` (a measured correction)."""
        from dataclasses import replace

        return replace(self, tokens_per_s=self.tokens_per_s * factor, step_s=self.step_s / factor)


def flops_per_micro_batch(model: ModelProfile, cfg: TrainConfig) -> float:
    """Matrix FLOPs of forward + backward (+ recompute) for one micro-batch."""
    t = cfg.batch_size * cfg.seq_len
    dense = model.quantized_params + model.vocab_size * model.hidden_size
    passes = 3 if cfg.grad_ckpt else 2  # fwd, bwd (input grads ~ fwd), recompute
    flops = 2 * dense * t * passes
    # attention: QK^T and AV, causal (half), 2 FLOPs per MAC; backward ~2.5x forward
    # (a packed-rows mask under sdpa/eager loses the causal kernel's skipping of the upper
    # half, and the masked kernel is slower: C.MASKED_ATTENTION_FACTOR, measured)
    masked = cfg.packed_rows and cfg.attn != "flash_attention_2"
    attn_fwd = (2 * 2 * cfg.seq_len * model.q_size * t / 2 * model.num_hidden_layers
                * (C.MASKED_ATTENTION_FACTOR if masked else 1.0))
    flops += attn_fwd * (1 + 2.5 + (1 if cfg.grad_ckpt else 0))
    # LoRA: A and B forward + both gradients, small
    lora = sum(cfg.lora_rank * (s.in_features + s.out_features) for s in model.linear_shapes()
               if s.name in model.resolve_targets(cfg.lora_targets)) * model.num_hidden_layers
    flops += 2 * lora * t * (passes + 1)
    if cfg.mlp_chunk:
        # tiled MLPs run their forward once more (each chunk's checkpoint in backward)
        mlp = sum(s.weight_params for s in model.linear_shapes()
                  if s.name in ("gate", "up", "down", "gate_up"))
        flops += 2 * mlp * t * model.num_hidden_layers
    return flops


def bytes_per_micro_batch(model: ModelProfile, cfg: TrainConfig) -> float:
    """Weight traffic per micro-batch: dequantize (read 4-bit, write 16-bit) and read the
    16-bit copy in the matmul, for every pass over the weights; the unquantized output layer
    is read (and under kbit preparation cast from float32) each pass."""
    passes = 3 if cfg.grad_ckpt else 2
    q = model.quantized_params
    per_pass = q * (0.5 + 2 + 2) if cfg.quant != "none" else q * 2
    head = model.vocab_size * model.hidden_size
    per_pass += head * (4 + 2 + 2 if cfg.prepare == "kbit" else 2)
    return per_pass * passes


def estimate_speed(model: ModelProfile, cfg: TrainConfig, gpu: GpuProfile) -> SpeedEstimate:
    """Predicted throughput of ``cfg`` on ``gpu``."""
    compute_s = flops_per_micro_batch(model, cfg) / (gpu.tflops_16bit * 1e12 * C.MATMUL_EFFICIENCY)
    memory_s = bytes_per_micro_batch(model, cfg) / (gpu.bandwidth_gbs * 1e9 * C.BANDWIDTH_EFFICIENCY)
    micro = compute_s + memory_s + C.STEP_OVERHEAD_S
    if cfg.loss == "fused":
        micro *= C.FUSED_LOSS_TIME_FACTOR
    if cfg.offload_activations and cfg.grad_ckpt:  # offload only moves checkpointed inputs
        micro *= C.OFFLOAD_TIME_FACTOR
    if cfg.recompute_norms:
        micro *= C.NORM_TIME_FACTOR
    if cfg.embed_on_cpu:
        micro *= C.EMBED_CPU_TIME_FACTOR
    if cfg.attn == "eager":
        micro *= C.EAGER_TIME_FACTOR
    if cfg.lora_dropout > 0:
        micro *= C.DROPOUT_TIME_FACTOR
    step = micro * cfg.grad_accum
    return SpeedEstimate(tokens_per_s=cfg.batch_size * cfg.seq_len / micro, step_s=step,
                         compute_s=compute_s, memory_s=memory_s)
