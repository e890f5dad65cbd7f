"""Speed model: predicted tokens per second of a QLoRA / LoRA training step.

One micro-batch's time is a sum of named terms, each a count (FLOPs, bytes, launches) over a
rate of the GPU times an efficiency measured on the GPU machine (:mod:`.calibration`):

- :func:`matmul_s`: the dense products: forward, the input gradients (the base weights are
  frozen) and, with checkpointing, the forward again; the output layer (twice forward with
  the fused loss, which recomputes it in backward); LoRA's small products;
- :func:`dequant_s`: bitsandbytes dequantizes each 4-bit weight to 16 bits for every pass
  over it (above 512 rows; its own kernel reads the 4-bit weight directly below);
- :func:`attention_s`: the attention products (a causal kernel skips half; a packed-rows
  mask makes the kernel a masked one, which does not);
- :func:`activation_s`: memory-bound elementwise work (norms, activations, residual adds,
  rotary, LoRA adds), proportional to the bytes a block keeps per token;
- launches: fixed costs per LoRA-wrapped linear and per norm (:func:`norm_passes`) for each
  pass, and per chunk of the fused loss (:func:`loss_chunks`): kernel launches and Python in
  peft and bitsandbytes, what dominates small models and batches;
- :func:`transfer_s`: offloaded block inputs and CPU embeddings crossing PCIe;
- :func:`overlapped`: the host queues kernels while the GPU works, so host and GPU time
  overlap (a fitted share of each side adds to the other), in each of a micro-batch's two
  phases (:data:`LOSS_PHASE`: the blocks, then the output layer and loss);
- and per optimizer step, :func:`optimizer_s` and the runner's own step overhead, and with
  several GPUs (``gpus``, data-parallel) :func:`allreduce_s`, the LoRA gradients' all-reduce
  over the link between the cards; each GPU runs its share of the step's micro-batches.

On other GPUs the rates are the catalogue's datasheet figures and the fixed costs are the
H200 machine's; :func:`speed_uncertainty` says how far to trust the figure.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from qplan.planner import calibration as C
from qplan.planner.config import TrainConfig, norm_slice_rows
from qplan.profiles.gpus import GpuProfile
from qplan.profiles.models import ModelProfile


@dataclass(frozen=True)
class SpeedEstimate:
    tokens_per_s: float
    step_s: float  # one optimizer step (all micro-batches)
    compute_s: float  # per micro-batch: the matrix and attention work
    memory_s: float  # per micro-batch: dequantization and activation traffic
    terms: tuple[tuple[str, float], ...] = ()  # seconds per optimizer step, by term
    uncertainty: float = 0.0  # relative: how far the measured figure may be from this one
    basis: str = ""  # where the rates come from

    def wall_time_s(self, tokens: int) -> float:
        return tokens / self.tokens_per_s if self.tokens_per_s else float("inf")

    def scaled(self, factor: float) -> "SpeedEstimate":
        """This estimate with throughput multiplied by ``factor`` (a measured correction)."""
        return replace(self, tokens_per_s=self.tokens_per_s * factor, step_s=self.step_s / factor)


def _tokens(cfg: TrainConfig) -> int:
    return cfg.batch_size * cfg.seq_len


def _passes(cfg: TrainConfig) -> int:
    """Passes over the blocks' weights per micro-batch: forward, backward (+ recompute)."""
    return 3 if cfg.grad_ckpt else 2


def _targets(model: ModelProfile, cfg: TrainConfig):
    names = model.resolve_targets(cfg.lora_targets)
    return [s for s in model.linear_shapes() if s.name in names]


def matmul_flops(model: ModelProfile, cfg: TrainConfig) -> float:
    """Dense FLOPs of one micro-batch in the blocks: 2 per weight and token for each pass over
    them (forward, the input gradients: the base weights are frozen; the recompute with
    checkpointing), LoRA's products (forward, input and weight gradients), and one more
    forward of every tiled MLP."""
    t = _tokens(cfg)
    flops = 2.0 * model.quantized_params * t * _passes(cfg)
    lora = sum(cfg.lora_rank * (s.in_features + s.out_features) for s in _targets(model, cfg))
    flops += 2.0 * lora * model.num_hidden_layers * t * (_passes(cfg) + 1)
    if cfg.mlp_chunk and cfg.seq_len > cfg.mlp_chunk:
        mlp = sum(s.weight_params for s in model.linear_shapes()
                  if s.name in ("gate", "up", "down", "gate_up"))
        flops += 2.0 * mlp * model.num_hidden_layers * t
    return flops


def head_flops(model: ModelProfile, cfg: TrainConfig) -> float:
    """The output layer's FLOPs: forward and its input gradient, once more with the fused
    loss (it recomputes each chunk's logits in backward). Its own term: the fused loss runs
    it in small chunks, the standard loss with float32 logits around it."""
    head = model.vocab_size * model.hidden_size
    return 2.0 * head * _tokens(cfg) * (3 if cfg.loss == "fused" else 2)


def dequant_bytes(model: ModelProfile, cfg: TrainConfig) -> float:
    """Bytes moved to dequantize the 4-bit weights, for each pass over the blocks: read half a
    byte, write 2 bytes, read them again in the product. bitsandbytes does this only above 512
    rows a micro-batch; below, its own kernel reads the 4-bit weights (counted as the read)."""
    q = model.quantized_params
    if cfg.quant == "none":
        return 2.0 * q * _passes(cfg)
    per = 4.5 if _tokens(cfg) > 512 else 0.5
    return per * q * _passes(cfg)




def attention_flops(model: ModelProfile, cfg: TrainConfig) -> float:
    """QK^T and AV for every block: forward, backward (about 2.5 forwards) and recompute.
    A causal kernel computes half the products; a masked one computes all of them: with a
    packed-rows mask (sdpa, eager), in eager attention (it always does), and in
    sliding-window layers once the sequence reaches the window (transformers builds a mask
    for them, :func:`qplan.planner.memory._windowed`)."""
    from qplan.planner.memory import _windowed

    t = _tokens(cfg)
    per_layer = 4.0 * cfg.seq_len * model.q_size * t
    layers = model.num_hidden_layers
    if (cfg.packed_rows and cfg.attn != "flash_attention_2") or cfg.attn == "eager":
        masked = layers
    elif _windowed(model, cfg) and cfg.attn != "flash_attention_2":
        masked = min(layers, model.layer_kinds().get("sliding_attention", 0))
    else:
        masked = 0
    fwd = per_layer * (masked + (layers - masked) / 2)
    return fwd * (1 + 2.5 + (1 if cfg.grad_ckpt else 0))


def activation_bytes(model: ModelProfile, cfg: TrainConfig) -> float:
    """Memory-bound elementwise traffic of one micro-batch: proportional to what the blocks
    keep for backward per token (norms, activation functions, residual adds, rotary and
    LoRA's adds all read and write tensors of that size), once per pass."""
    per_token = _kept_per_token(model, cfg)
    return per_token * _tokens(cfg) * model.num_hidden_layers * _passes(cfg)


def _kept_per_token(model: ModelProfile, cfg: TrainConfig) -> float:
    """Bytes a block keeps per token without checkpointing: counted for the architecture
    when it has counts (:mod:`.activations`), else the analytic coefficients."""
    from qplan.planner.activations import counts_for, evaluate, figures

    c = counts_for(model)
    plain = cfg.with_(grad_ckpt=False, mlp_chunk=0, offload_activations=False,
                      recompute_norms=False)
    if c is not None:
        f = figures(c, plain, packed=False, tiled=False,
                    model_targets=tuple(model.target_names),
                    resolved_targets=model.resolve_targets(cfg.lora_targets))
        kind = next(iter(f.kept))
        t = 4096
        return max(0.0, evaluate(f.kept[kind], 1, t) / t)
    from qplan.planner.memory import layer_activation_bytes_per_token

    return layer_activation_bytes_per_token(model, plain)






def transfer_s(model: ModelProfile, cfg: TrainConfig, gpu: GpuProfile) -> float:
    """Bytes crossing PCIe in one micro-batch: each offloaded block input goes to the host
    and comes back (pinned, on the compute stream), and CPU embeddings send the looked-up
    rows (the lookup itself runs on the host)."""
    b = 0.0
    t = _tokens(cfg)
    if cfg.offload_activations and cfg.grad_ckpt:
        b += 2.0 * model.num_hidden_layers * t * model.hidden_size * 2
    s = b / (C.PCIE_GBS * 1e9)
    if cfg.embed_on_cpu and not model.tie_word_embeddings:
        s += t * model.hidden_size * 2 / (C.CPU_EMBED_GBS * 1e9)
    return s


def optimizer_s(model: ModelProfile, cfg: TrainConfig, gpu: GpuProfile) -> float:
    """The optimizer step and the runner's own work per optimizer step (gradient clipping,
    the schedule, logging): a fixed part and 8-bit AdamW's pass over the LoRA parameters."""
    from qplan.planner.memory import lora_param_count

    n = lora_param_count(model, cfg)
    return C.STEP_FIXED_S + n * C.OPTIMIZER_BYTES_PER_PARAM / (gpu.bandwidth_gbs * 1e9 * 0.5)


def allreduce_s(model: ModelProfile, cfg: TrainConfig, gpu: GpuProfile) -> float:
    """With ``gpus`` > 1, per optimizer step: DDP's ring all-reduce of the float32 LoRA
    gradients (each GPU sends and receives 2 (n-1)/n of them) over the link between the
    cards (:attr:`GpuProfile.link`, at a measured share of its rate), plus a fixed cost per
    bucket. Counted whole: the LoRA gradients are small and the last micro-batch's backward
    hides little of it on slow links."""
    n = cfg.gpus
    if n <= 1 or cfg.strategy != "ddp":
        return 0.0
    from qplan.planner.memory import lora_gradients

    grad = lora_gradients(model, cfg)
    link = gpu.link
    eff = C.ALLREDUCE_EFFICIENCY["nvlink" if link.nvlink else "pcie"]
    buckets = -(-grad // C.DDP_BUCKET_BYTES)
    return buckets * C.ALLREDUCE_LATENCY_S + 2 * (n - 1) / n * grad / (link.gbs * 1e9 * eff)


def fsdp_micro_batch_bytes(model: ModelProfile, cfg: TrainConfig) -> float:
    """Under FSDP, the weights and gradients one micro-batch moves, whole (before any split
    across the GPUs): every block's gathered weights twice (forward, and backward, where a
    checkpointed block's recompute reuses that gather), the embeddings and output layer
    once, the float32 LoRA gradients once."""
    from qplan.planner.memory import gathered_blocks_bytes, lora_param_count

    return (2 * gathered_blocks_bytes(model, cfg)
            + 2 * (model.embedding_params + model.lm_head_params)
            + 4 * lora_param_count(model, cfg))


def fsdp_gather_s(model: ModelProfile, cfg: TrainConfig, gpu: GpuProfile) -> float:
    """Under FSDP, per micro-batch: the collectives' time over the link between the cards.
    Every block's weights are gathered twice (forward, and backward, where a checkpointed
    block's recompute reuses that gather), the embeddings and output layer once, and the
    LoRA gradients reduce-scattered; each GPU receives (n-1)/n of every gathered tensor.
    FSDP gathers the next block while this one computes, so :func:`estimate_speed` counts
    the longer of this and the micro-batch's compute. Assumed, not measured: the link's
    all-reduce share (:data:`calibration.ALLREDUCE_EFFICIENCY`) and a fixed cost per call."""
    n = cfg.gpus
    if n <= 1 or cfg.strategy != "fsdp":
        return 0.0
    link = gpu.link
    eff = C.ALLREDUCE_EFFICIENCY["nvlink" if link.nvlink else "pcie"]
    calls = 3 * model.num_hidden_layers + 2
    return (calls * C.ALLREDUCE_LATENCY_S
            + (n - 1) / n * fsdp_micro_batch_bytes(model, cfg) / (link.gbs * 1e9 * eff))


def offload_copy_s(model: ModelProfile, cfg: TrainConfig) -> float:
    """With ``offload_params``, per micro-batch: the bytes each GPU copies from pinned host
    memory, its shard of every block for the forward and again for the backward, of the
    embeddings and output layer once, and its shard of the LoRA gradients back, at
    :data:`calibration.PCIE_GBS`. FSDP copies a block's shard as it gathers it, ahead of
    the block's compute, so :func:`estimate_speed` counts it with the gathers (hidden
    behind a long enough micro-batch)."""
    from qplan.planner.memory import params_offloaded

    if not params_offloaded(cfg):
        return 0.0
    return fsdp_micro_batch_bytes(model, cfg) / cfg.gpus / (C.PCIE_GBS * 1e9)


def offload_block_s(model: ModelProfile, cfg: TrainConfig) -> float:
    """With ``offload_params``, per micro-batch: a fixed cost per decoder block on top of
    FSDP's (:func:`fsdp_block_s`), the host-to-GPU copies' launches and waits,
    :data:`calibration.OFFLOAD_BLOCK_S` each (measured)."""
    from qplan.planner.memory import params_offloaded

    return model.num_hidden_layers * C.OFFLOAD_BLOCK_S if params_offloaded(cfg) else 0.0


def cpu_optimizer_s(model: ModelProfile, cfg: TrainConfig) -> float:
    """With ``offload_params``, per optimizer step: torch's AdamW over this process's shard of
    the LoRA parameters on the CPU (:data:`calibration.CPU_ADAM_S_PER_PARAM`)."""
    from qplan.planner.memory import lora_param_count, params_offloaded

    if not params_offloaded(cfg):
        return 0.0
    return lora_param_count(model, cfg) / cfg.gpus * C.CPU_ADAM_S_PER_PARAM


def fsdp_block_s(model: ModelProfile, cfg: TrainConfig) -> float:
    """Under FSDP, per micro-batch: a fixed cost per decoder block that compute does not
    hide (FSDP2's hooks, the gathers' launches and copy-out into the parameters, the waits
    between them): :data:`calibration.FSDP_BLOCK_S` each, measured on two H200s over NVLink
    (where the gathered bytes themselves take little time, :func:`fsdp_gather_s`). Not a
    factor on the micro-batch: a 32B model at 12k tokens ran 2% slower than the FSDP-less
    prediction, a 1B model at 2k x 4 45% slower; 5.6 ms a block fits both (and a 4B).
    Also on one GPU with ``offload_params`` (FSDP's hooks run there too)."""
    if cfg.strategy != "fsdp" or (cfg.gpus <= 1 and not cfg.offload_params):
        return 0.0
    return model.num_hidden_layers * C.FSDP_BLOCK_S


def speed_uncertainty(gpu: GpuProfile) -> tuple[float, str]:
    """How far a predicted tokens/s may be from the real one, and why."""
    if gpu.name in C.SPEED_MEASURED_GPUS:
        return C.SPEED_ERROR_MEASURED, "fitted to steady-state steps measured on this GPU model"
    return C.SPEED_ERROR_SCALED, (
        f"scaled from the {', '.join(C.SPEED_MEASURED_GPUS)} measurements by {gpu.name}'s "
        "datasheet rates (tensor TFLOPS, memory bandwidth); fixed costs as measured there")


def tiled_linear_passes(model: ModelProfile, cfg: TrainConfig) -> int:
    """With a tiled MLP (``mlp_chunk`` shorter than the sequence), the MLP's linear layers run
    once per chunk in every pass, and once more per chunk in backward (each chunk is
    recomputed there, :class:`qplan.runner.lowmem.TiledMLP`): the passes over them beyond the
    untiled ones, counted like the other LoRA-wrapped linears' (the same launches and Python
    a call; its FLOPs are in :func:`matmul_flops`)."""
    if not (cfg.mlp_chunk and cfg.seq_len > cfg.mlp_chunk):
        return 0
    chunks = -(-cfg.seq_len // cfg.mlp_chunk)
    mlp = sum(1 for s in model.linear_shapes() if s.name in ("gate", "up", "down", "gate_up"))
    extra = chunks * (_passes(cfg) + 1) - _passes(cfg)
    return extra * mlp * model.num_hidden_layers


def quantized_linears(model: ModelProfile) -> int:
    """Weight matrices per block (each a bitsandbytes layer with its own launches)."""
    return len(model.linear_shapes())


def norm_passes(model: ModelProfile, cfg: TrainConfig) -> int:
    """Norm modules run in one micro-batch: per block 2 (4 with Gemma's sandwich norms) and
    the q/k norms (Qwen3, Gemma 3, OLMo 2), for each pass over the blocks, once more when
    recomputed in backward (``recompute_norms``). Each is several small elementwise
    kernels (Gemma's in float32): host-bound launches, like the LoRA-wrapped linears'."""
    per_block = model.norms_per_layer + (2 if model.qk_norm_params else 0)
    passes = _passes(cfg) + (1 if cfg.recompute_norms else 0)
    return per_block * passes * model.num_hidden_layers


def loss_chunks(model: ModelProfile, cfg: TrainConfig) -> int:
    """Chunks of the fused loss in one micro-batch (each a few small kernels, forward and
    recomputed in backward: host-bound). A big vocabulary makes short chunks (Gemma 3's
    262k logits a row: 64 rows a chunk), so many of them."""
    if cfg.loss != "fused":
        return 0
    return -(-_tokens(cfg) // cfg.loss_chunk_rows(model.vocab_size))


def speed_features(model: ModelProfile, cfg: TrainConfig, gpu: GpuProfile) -> dict[str, float]:
    """One micro-batch's work in units a fitted coefficient turns into seconds: work over the
    GPU's datasheet rate (seconds at 100% of it) for the rate-bound terms, counts for the
    fixed costs. The coefficients (:data:`calibration.SPEED_COEFFICIENTS`) are fitted to
    steps measured on the GPU machine by ``benchmarks/speed_fit.py``."""
    tflops, bw = gpu.tflops_16bit * 1e12, gpu.bandwidth_gbs * 1e9
    att = attention_flops(model, cfg) / tflops
    if cfg.attn == "eager":
        att /= C.EAGER_ATTENTION_EFFICIENCY
    passes = _passes(cfg) * model.num_hidden_layers
    return {
        "matmul": matmul_flops(model, cfg) / tflops,
        "head": head_flops(model, cfg) / tflops,
        "dequant": dequant_bytes(model, cfg) / bw,
        "attention": att,  # a masked kernel's work counts every product (no faster)
        "activations": activation_bytes(model, cfg) / bw,
        "linear_passes": float(passes * quantized_linears(model) + tiled_linear_passes(model, cfg)),
        "loss_chunks": float(loss_chunks(model, cfg)),
        "norm_passes": float(norm_passes(model, cfg)),
        "micro_batch": 1.0,
    }


def lean_norm_slices(model: ModelProfile, cfg: TrainConfig) -> int:
    """With ``recompute_norms``, the slices the lean RMSNorms run in one micro-batch: each
    norm works through its rows a slice at a time (:func:`qplan.planner.config.norm_slice_rows`:
    4,096 rows of a norm 4,096 wide or wider, more rows of a narrower one, up to the same
    elements), in every forward (twice with checkpointing) and in backward; each slice is a
    handful of small kernels, host-bound like the launches. The norms: a block's own
    (:attr:`ModelProfile.norms_per_layer`) and the q/k norms, per head (Qwen3, Gemma 3: rows =
    tokens x heads) or over the whole q and k widths (OLMo 2)."""
    if not cfg.recompute_norms:
        return 0
    t = _tokens(cfg)

    def slices(rows: int, width: int) -> int:
        return -(-rows // norm_slice_rows(width))

    per_block = model.norms_per_layer * slices(t, model.hidden_size)
    if model.model_type in ("qwen3", "gemma3", "gemma3_text"):
        per_block += (slices(t * model.num_attention_heads, model.head_size)
                      + slices(t * model.num_key_value_heads, model.head_size))
    elif model.model_type == "olmo2":
        per_block += slices(t, model.q_size) + slices(t, model.kv_size)
    calls = (2 if cfg.grad_ckpt else 1) + 1  # forward(s) and backward
    return per_block * calls * model.num_hidden_layers


def _fixed_s(model: ModelProfile, cfg: TrainConfig) -> float:
    """Host-side fixed costs not in the fit (too few measured points to separate them): the
    lean norms' slices (:func:`lean_norm_slices`, :data:`calibration.LEAN_NORM_SLICE_S`,
    measured). (A tiled MLP's chunks are LoRA-linear passes: :func:`tiled_linear_passes`.)"""
    return lean_norm_slices(model, cfg) * C.LEAN_NORM_SLICE_S


def overlapped(gpu_s: float, host_s: float, overlap: tuple[float, float]) -> float:
    """One phase's time from its GPU work and its host work (launches, Python): the host
    queues kernels while the GPU runs earlier ones, so the time is the larger of the GPU's
    time plus a share of the host's and the host's plus a share of the GPU's (fitted: 0 =
    fully hidden, 1 = not at all; ``overlap`` = (the host's share, the GPU's share)). A big
    batch on a slow card is GPU-bound; a small one on a fast card, host-bound. Being the
    larger of two sums, more work on either side never makes it faster."""
    gpu_bound, host_bound = overlap
    return max(gpu_s + gpu_bound * host_s, host_s + host_bound * gpu_s)


# The features of host work (the rest are GPU work), and those of the output layer and loss:
# a phase of its own, after the blocks (estimate_speed; benchmarks/speed_fit.py fits by both)
HOST_TERMS = ("linear_passes", "loss_chunks", "norm_passes", "micro_batch")
LOSS_PHASE = ("head", "loss_chunks")


def estimate_speed(model: ModelProfile, cfg: TrainConfig, gpu: GpuProfile,
                   coefficients: dict[str, float] | None = None,
                   overlap: tuple[float, float] | None = None) -> SpeedEstimate:
    """Predicted throughput of ``cfg`` on ``gpu`` (on all ``gpus`` together): the fitted
    coefficients times the micro-batch's features (GPU work and host work,
    :func:`overlapped` for the blocks, and on its own for the output layer and loss), plus
    transfers, times each GPU's share of the accumulation, plus the
    optimizer and the gradients' all-reduce. The terms are each part's share of the
    step (scaled by how much the overlap hides)."""
    k = C.SPEED_COEFFICIENTS if coefficients is None else coefficients
    ov = C.SPEED_OVERLAP if overlap is None else overlap
    f = speed_features(model, cfg, gpu)
    part = {n: k.get(n, 0.0) * v for n, v in f.items()}
    tr = transfer_s(model, cfg, gpu)
    # two phases, each overlapped on its own: the blocks (GPU-bound at a big batch), then the
    # output layer and the loss (the fused loss's many small chunks are host-bound: their
    # host time does not hide behind the blocks' GPU work, which is over by then)
    def side(host: bool, loss: bool) -> float:
        return sum(v for n, v in part.items()
                   if (n in HOST_TERMS) == host and (n in LOSS_PHASE) == loss)

    blocks_host = side(True, False) + _fixed_s(model, cfg)
    blocks_gpu = side(False, False) + tr
    loss_host, loss_gpu = side(True, True), side(False, True)
    launch, device = blocks_host + loss_host, blocks_gpu + loss_gpu
    micro = overlapped(blocks_gpu, blocks_host, ov) + overlapped(loss_gpu, loss_host, ov)
    share = micro / (device + launch) if device + launch else 1.0
    factor = C.DROPOUT_TIME_FACTOR if cfg.lora_dropout > 0 else 1.0
    micro *= factor
    gather = fsdp_gather_s(model, cfg, gpu) + offload_copy_s(model, cfg)
    per_gpu = cfg.grad_accum // cfg.gpus  # each GPU runs its share of the micro-batches
    exposed = max(0.0, gather - micro)  # what the micro-batch's compute does not hide
    opt = optimizer_s(model, cfg, gpu) + cpu_optimizer_s(model, cfg)
    comm = allreduce_s(model, cfg, gpu) + (exposed + fsdp_block_s(model, cfg)
                                           + offload_block_s(model, cfg)) * per_gpu
    step = micro * per_gpu + opt + comm
    a = per_gpu * share * factor
    terms = (("matmul", part["matmul"] * a), ("output layer", part["head"] * a), ("dequant", part["dequant"] * a),
             ("attention", part["attention"] * a),
             ("activations", part["activations"] * a), ("launch", launch * a),
             ("transfer", tr * a), ("optimizer", opt))
    if cfg.gpus > 1 or cfg.strategy == "fsdp":
        name = "all-reduce" if cfg.strategy != "fsdp" else (
            "CPU offload (FSDP)" if cfg.offload_params else "all-gather (FSDP)")
        terms += ((name, comm),)
    err, basis = speed_uncertainty(gpu)
    return SpeedEstimate(tokens_per_s=cfg.tokens_per_step / step, step_s=step,
                         compute_s=part["matmul"] + part["head"] + part["attention"],
                         memory_s=part["dequant"] + part["activations"], terms=terms,
                         uncertainty=err, basis=basis)
