"""Measured coefficients of the memory and speed models, in one place.

Every number here comes from ``benchmarks/memory_accuracy.py`` runs on the GPU machine
(results in ``benchmarks/results/``); the comment beside each says which measurement.
"""
# CUDA context + loaded kernels as nvidia-smi shows them (GiB).
CUDA_CONTEXT_GIB = 1.2
# Allocator: reserved - allocated, as a fraction of transient memory.
FRAG_DEFAULT = 0.30
FRAG_EXPANDABLE = 0.08
ALLOC_FIXED_GIB = 0.1
# Scale on the counted per-token activation bytes.
ACT_SCALE = 1.0
# Extra bytes per query element kept by each attention kernel (per token).
ATTN_EXTRA_PER_TOKEN = {"sdpa": 0, "flash_attention_2": 0, "eager": 0}
# Bytes per logit element at the standard loss's peak.
LOGITS_STANDARD_BYTES = 14.0
# Fused / chunked loss.
# Logit elements per chunk of the chunked loss (rows = this // vocab_size).
FUSED_CHUNK_ELEMENTS = 64 * 1024 * 1024
LOGITS_FUSED_BYTES = 12.0

# ---- speed --------------------------------------------------------------
# Fraction of the datasheet matrix rate reached by QLoRA steps.
MATMUL_EFFICIENCY = 0.35
# Fraction of datasheet bandwidth reached by dequantization traffic.
BANDWIDTH_EFFICIENCY = 0.5
# Fixed per-micro-batch overhead (kernel launches, Python), seconds.
STEP_OVERHEAD_S = 0.02
FUSED_LOSS_TIME_FACTOR = 1.0
OFFLOAD_TIME_FACTOR = 1.15
EAGER_TIME_FACTOR = 1.2
DROPOUT_TIME_FACTOR = 1.03
