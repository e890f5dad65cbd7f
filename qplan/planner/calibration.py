"""Measured coefficients of the memory and speed models, in one place.

Every number here was measured with ``benchmarks/memory_accuracy.py`` on the GPU machine
(an NVIDIA H200; torch 2.11 + CUDA 13, transformers 5.17, peft 0.21, bitsandbytes 0.50.2)
over Llama 3.2 1B / 3B, Llama 3.1 8B, Mistral 7B and Qwen2.5 7B shapes; the raw records are
in ``benchmarks/results/raw/`` and ``benchmarks/accuracy_report.py`` re-checks the model
against them (``tests/test_memory_accuracy.py`` runs it in CI).
"""

# Memory that nvidia-smi shows for a training process beyond what PyTorch reserves, measured
# by `qplan run` itself on the H200 (torch 2.11, CUDA 13, driver 580), 27 runs of 14
# architectures (results/raw/h200_runner_grid1.jsonl): NVML's per-process peak minus
# PyTorch's peak reserved memory was 0.740-0.741 GiB in every run, of which the CUDA context
# (read right after CUDA starts, before anything else) is 0.598 GiB and the rest the
# libraries' workspaces and loaded kernels (cuBLAS, cuDNN attention, bitsandbytes).
# Paged (managed) optimizer memory does not show in that per-process figure, whatever the
# optimizer's size: bitsandbytes pages it in for the optimizer step, after the activations
# are freed, so it is not part of the peak.
CUDA_CONTEXT_GIB = 0.60
LIBRARIES_GIB = 0.14

# Bytes kept per token inside one block without checkpointing, per element of: the hidden
# size ("h"), the MLP intermediate size ("i"), the q/k/v width ("qkv" = q_size + 2 kv_size),
# and each LoRA-adapted layer's input width when LoRA dropout is on ("dropout").
# Least-squares fit over 41 lean runs (GQA and MHA models) and 25 kbit runs (kbit's qkv
# coefficient taken from lean: no MHA kbit run); every residual within 3%.
ACT_COEF = {
    "lean": {"h": 15.03, "i": 7.71, "qkv": 2.34, "dropout": 1.83},
    "kbit": {"h": 20.06, "i": 13.65, "qkv": 2.34, "dropout": 1.83},
}
# (kbit's own dropout fit was 1.34; lean's 1.83 is used so that kbit, which keeps strictly more
# than lean, is never estimated below it for models whose adapted inputs dominate the h term.)
# A recomputed block's backward peak, in units of that block's activations (checkpointed
# runs at 8k-16k tokens, where it dominates the loss: 1.32-1.37).
BLOCK_BACKWARD_FACTOR = 1.40

# A tiled MLP (mlp_chunk) also holds its chunks' concatenated outputs and their gradients:
# bytes per token per hidden element in a recomputed block's backward. Fitted to capped
# Llama-3.1-8B runs of 12,800, 18,944 and 36,352 tokens (+4.9%, -0.1%, -0.8% with it; -4.8%,
# -3.2%, -4.8% without); 22,528 and 43,008 tokens ran out of memory where the estimate without
# it said they fit (results/longest_seq.md).
TILED_EXTRA_PER_H = 16.0

# The memory-lean implementations of 2026-11-26 (qplan/runner/lowmem.py), measured on the H200
# with Llama-3.1-8B shapes, r=32, tiled MLP (2048), CPU embeddings, 8k-64k tokens, one
# process per run (results/raw/h200_lowmem_fit.jsonl). Those runs went through a benchmark
# harness that, with CPU embeddings, autocast the CPU instead of the GPU (fixed since), so
# parts of their activations were float32: the coefficients below over-estimate the fixed
# pipeline, which the runner always used (the four longest-sequence plans, re-run fixed:
# +6.9% to +24.8%, results/raw/h200_longest_fixed.jsonl). A refit needs a new GPU grid.
# - recompute_norms: an RMSNorm keeps its 16-bit input instead of a float32 copy: 2 bytes
#   per hidden element saved per norm (no checkpointing, 4096 tokens: -2.0 GiB over 64 norms).
NORM_SAVED_PER_H = 2.0
# - ... and in a tiled, recomputed block's backward it also avoids transformers' float32
#   gradient temporaries: per token per hidden element of the block working set (16k tokens:
#   13.66 -> 12.44 GiB). Credited only with a tiled MLP: without tiling the MLP's backward is
#   the peak and the norms' saving showed only partly (8k tokens: -0.31 GiB).
NORM_BACKWARD_TEMP_PER_H = 9.7
# - offload_activations: the block's input comes back from the host, and the recomputed
#   output and the input's gradient exist beside it (reentrant-style backward): bytes per
#   token per hidden element of the working set; fitted to the longest runs (32k, 64k tokens)
#   so that the 16k runs are over-estimated by 3-5%, none under.
OFFLOAD_EXTRA_PER_H = 12.2

# Bytes per logit at the standard loss's peak (16-bit logits, float32 copy, float32
# log-softmax, float32 gradient): 11.9-12.1 measured over 2k-8k tokens, 32k-152k vocabularies.
LOGITS_STANDARD_BYTES = 12.0
# Gemma 2's final logit soft-capping (tanh) keeps more copies of the logits: measured
# +2.0 bytes per logit on gemma-2-2b (2 x 2048 tokens, 256k vocabulary).
LOGITS_SOFTCAP_EXTRA_BYTES = 2.0
# (The fused loss's chunk size is a setting, TrainConfig.loss_chunk; the grids of
# 2026-11-26 ran with 64 Mi elements, recorded as loss_chunk in their records.)

# Allocator: reserved - allocated at the peak. A fraction of the standard loss's logits
# (their large short-lived buffers), a fraction of the other dynamic memory, and a constant.
# With expandable segments (fitted 2026-11-29 by least squares on the 75 current fused-loss
# H200 records with both counters, benchmarks/results/raw; residuals -0.23 to +0.37 GiB): the
# short-lived working set (a block's backward or the loss chunk) leaves FRAG_WORK of itself
# reserved; with checkpointing the block inputs kept between those cycles add FRAG_ACT_CKPT
# (without it the saved activations are allocated once and add nothing measurable). The
# 83k-token Llama run: 1.57 GiB reserved beyond allocated, this model 1.61 (was 0.45).
FRAG_LOGITS = 0.30
FRAG_WORK = 0.16
# A tiled MLP's working set is chunk-sized buffers used again and again: less is left behind.
# Fitted to the 8 longest-sequence runs of qplan run (benchmarks/results/longest_run.md: 1.0
# to 12.5 GiB working sets, 0.11 to 1.50 GiB reserved beyond allocated; FRAG_WORK put them
# 0.2-0.9 GiB over).
FRAG_WORK_TILED = 0.10
FRAG_ACT_CKPT = 0.08
FRAG_DEFAULT = 0.04
ALLOC_FIXED_GIB = 0.13
# The default allocator keeps more cached blocks (0.56-0.86 GiB measured on a 1B model).
ALLOC_FIXED_DEFAULT_GIB = 0.7

# ---- speed --------------------------------------------------------------
# Coefficients of the speed model's terms (qplan/planner/speed.py). Each term is a count
# (FLOPs, bytes, launches) over the GPU's datasheet rate times an efficiency, or a fixed
# time; fitted by least squares to steady-state step times measured on the H200
# (benchmarks/speed_grid.py, results/speed_fit.md), held-out error reported there.
# Bytes a score element (batch x heads x seq x seq) of eager attention's backward adds to the
# counted figures: measured 3.88 (Gemma-2-9B, 4096 x 2, qplan run on the H200,
# benchmarks/results/raw/h200_e2e3.jsonl), rounded up. See memory.eager_scores_shortfall.
EAGER_SCORES_EXTRA_BYTES = 4.0
EAGER_ATTENTION_EFFICIENCY = 0.5  # eager attention relative to the fused kernel (not measured)
# per slice of a lean RMSNorm (recompute_norms), forward or backward: host time of its ~10
# small kernels. From Qwen3-4B, 2048 x 8, checkpointing, fused loss, under an rtx-4070's cap
# on the H200 (benchmarks/results/speed_check.md), each in a fresh process: 9,090 tok/s
# without lean norms, 4,914 with them when the per-head q/k norms ran 4,096 rows a slice
# (18,144 slices a micro-batch): 1.53 s / 18,144 = 84 us a slice
LEAN_NORM_SLICE_S = 84e-6
STEP_FIXED_S = 0.02  # per optimizer step: the optimizer's launches and the runner's own work
OPTIMIZER_BYTES_PER_PARAM = 16.0  # 8-bit AdamW's traffic per LoRA parameter
PCIE_GBS = 20.0  # offloaded activations to pinned host memory and back
# Data-parallel training (TrainConfig.gpus > 1). NCCL's communicator buffers on each GPU,
# outside PyTorch's allocator (in what nvidia-smi shows): 0.83 GiB measured on two H200s
# over NVLink (nvidia-smi less PyTorch's reserved less the context, in two qplan runs and an
# all-reduce benchmark alike; benchmarks/results/ddp_gpu.md). PCIe pairs: not measured.
NCCL_BUFFERS_GIB = 0.85
# FSDP: whole (gathered) copies of the output layer and of a decoder block on each GPU at
# the peak. FSDP2 gathers a unit into one buffer and copies every parameter out of it, so a
# unit being gathered is there twice; blocks: this one and the next (prefetched), each twice.
# Fitted to the first-step nvidia-smi peaks of two FSDP runs on 2 H200s (qwen3-8b capped to
# an 8 GB card: 8.30 GiB measured, 6.99 estimated with one head and two blocks; qwen3-14b
# capped to 12 GB: 12.24 vs 10.48; benchmarks/results/fsdp_gpu.md): in-sample, two points.
FSDP_GATHERED_HEAD = 2
FSDP_GATHERED_BLOCKS = 4
# FSDP plans' band, on top of BAND_COUNTED: held out, llama-3.1-8b capped to a 10 GB card ran
# 5.6% above its estimate (8.82 GiB vs 8.33), qwen3-4b and llama-3.2-1b on whole H200s 2-5%
# below (benchmarks/results/fsdp_gpu.md); four runs, so the band covers the worst twice over.
BAND_FSDP = 0.06
# FSDP's time per decoder block per micro-batch over the same plan's without it (FSDP2's
# hooks, the gathers' launches and copies; speed.fsdp_block_s): three runs on 2 H200s over
# NVLink ran 5.7 ms (llama-3.2-1b 2k b4), 5.5 ms (qwen3-4b 2k b4) and 2.7 ms (qwen2.5-32b 12k
# b1, checkpointed) a block above the FSDP-less prediction; least squares in relative speed:
# 5.6 ms; leave-one-out speed errors +1.6%, -1.1%, -1.7% (benchmarks/results/fsdp_gpu.md).
# A factor on the micro-batch (1.37, fitted to the first two) was 26% slow for the 32B run.
FSDP_BLOCK_S = 0.0056
# FSDP with CPU offload of parameters (CPUOffloadPolicy, pinned): the time per decoder block
# per micro-batch over the same FSDP plan without offload (speed.offload_block_s; the
# copies' bytes at PCIE_GBS run ahead of the compute). benchmarks/fsdp_offload_probe.py on 2
# H200s (benchmarks/results/fsdp_offload.md): 8.0 ms a block for llama-3.2-1b, 10.0 ms for
# llama-3.1-8b's blocks (8 of them), less the CPU optimizer's share. Two models, 2,048 tokens.
OFFLOAD_BLOCK_S = 0.008
# torch's AdamW (float32, foreach) stepping offloaded LoRA parameters on the CPU, seconds a
# parameter: 1.2-1.8 ns measured on a 2-core CI machine (5M and 20M parameters); rounded up
# (speed.cpu_optimizer_s). Small next to the copies except for very large adapters.
CPU_ADAM_S_PER_PARAM = 2e-9
# FSDP runs load and quantize the model on the host in every process. qwen2.5-32b on two
# H200s (benchmarks/results/raw/h200x2_fsdp6_host_memory.txt, `free` every 10 s): the two
# processes used 39 GiB of host memory at the peak (2 x its 17.9 GiB 4-bit copy + 1.6 GiB
# each), the 61 GiB checkpoint sat once in the page cache (65 GiB), shared by both; each
# process's resident size (77.8 GiB) counts those shared pages. Per process: the 4-bit copy
# plus this much (1.6 measured; rounded up for peaks between the samples):
FSDP_LOAD_HOST_EXTRA_GIB = 2.0
# Share of the link rate (GpuProfile.link) a ring all-reduce's bus bandwidth reaches, by
# kind of link; and a fixed cost per all-reduce call (one per DDP bucket). NVLink: 287 GB/s
# of 450 for 170 MiB of float32 on two H200s (0.47 at 16 MiB). PCIe: assumed (consumer cards
# without peer-to-peer go through host memory), not measured.
ALLREDUCE_EFFICIENCY = {"nvlink": 0.64, "pcie": 0.5}
ALLREDUCE_LATENCY_S = 50e-6
DDP_BUCKET_BYTES = 25 * 1024**2  # DDP's default bucket_cap_mb
CPU_EMBED_GBS = 4.0  # looked-up embedding rows from the host (pageable copy)
# Fitted coefficients of qplan.planner.speed.speed_features (seconds per unit; for rate-bound
# terms 1 / the fraction of the datasheet rate reached). Written from results/speed_fit.json.
SPEED_COEFFICIENTS = {
    "matmul": 1.546,
    "head": 2.584,
    "dequant": 1.492,
    "attention": 3.717,
    "activations": 8.57,
    "linear_passes": 0.0004409,
    "loss_chunks": 0.00135,
    "norm_passes": 0.0004925,
    "micro_batch": 0,
}
# How much of one side of a micro-batch phase's GPU and host times adds to the other
# (qplan.planner.speed.overlapped; 1 = no overlap): (the host's share added to the GPU's time,
# the GPU's share added to the host's). Written from results/speed_fit.json.
SPEED_OVERLAP = (0.2, 0.2)
DROPOUT_TIME_FACTOR = 1.03
# Where the speed coefficients were measured, and how far predictions may be off there
# (held-out) and on other GPUs (datasheet-scaled, unmeasured: wider).
SPEED_MEASURED_GPUS = ("h200",)
# leave-one-model-out median 6.9%, worst +47% (a batch-1 grid row), 102 of 106 within 25%
# (results/speed_fit.md); the search's plans predicted before they ran: worst +25%
# (results/speed_check.md)
SPEED_ERROR_MEASURED = 0.25
SPEED_ERROR_SCALED = 0.40

# ---- uncertainty band ------------------------------------------------------
# Every estimate carries a one-sided band: the search keeps peak + band under the card (less
# its reserve). Counted architectures (dry-run figures of the real stack) carry
# BAND_COUNTED of the memory above the CUDA context; architectures without counts (analytic
# terms fitted to Llama-like models) carry BAND_ANALYTIC of the activation memory on top.
# Set from the held-out runner grid (benchmarks/results/grid_report.md).
# Counted: the held-out counted points ran -3.9% to +3.9% (two long-sequence points at -3.9%
# of the memory above the context, both 32k+ tokens with lean norms and the tiled MLP).
BAND_COUNTED = 0.05
BAND_ANALYTIC = 0.45  # covers the grid with counts off (results/grid_report.md, analytic fallback: worst -25%)
BAND_MIN_GIB = 0.10

# What a card loses to other things before training starts (display server, desktop, other
# processes), by the card's kind; `--reserve GIB` overrides it. Datacentre cards are headless.
RESERVE_GIB = {"consumer": 0.5, "workstation": 0.5, "laptop": 0.3, "datacenter": 0.0,
               "custom": 0.3}
