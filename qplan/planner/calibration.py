"""Measured coefficients of the memory and speed models, in one place.

Every number here was measured with ``benchmarks/memory_accuracy.py`` on the GPU machine
(an NVIDIA H200; torch 2.11 + CUDA 13, transformers 5.17, peft 0.21, bitsandbytes 0.50.2)
over Llama 3.2 1B / 3B, Llama 3.1 8B, Mistral 7B and Qwen2.5 7B shapes; the raw records are
in ``benchmarks/results/raw/`` and ``benchmarks/accuracy_report.py`` re-checks the model
against them (``tests/test_memory_accuracy.py`` runs it in CI).
"""

# Memory that nvidia-smi shows beyond what PyTorch reserves, on a fresh process: the CUDA
# context, cuBLAS workspaces and bitsandbytes' kernels. Measured as NVML used minus
# torch.cuda.max_memory_reserved() on the first configuration of two fresh processes
# (0.87 GiB both times, of which ~0.02 GiB was that run's paged optimizer state).
CUDA_CONTEXT_GIB = 0.85

# Bytes kept per token inside one block without checkpointing, per element of:
# the MLP intermediate size ("i"), the q/k/v width ("qkv" = q_size + 2 kv_size), and each
# LoRA-adapted layer's input width when LoRA dropout is on ("dropout"). Least-squares fit
# over 40 lean and 25 kbit no-checkpointing runs; every residual within 2%.
ACT_COEF = {
    "lean": {"i": 8.78, "qkv": 9.74, "dropout": 1.83},
    "kbit": {"i": 15.06, "qkv": 12.28, "dropout": 1.34},
}
# A recomputed block's backward peak, in units of that block's activations (checkpointed
# runs at 8k-16k tokens, where it dominates the loss: 1.32-1.37).
BLOCK_BACKWARD_FACTOR = 1.40

# Bytes per logit at the standard loss's peak (16-bit logits, float32 copy, float32
# log-softmax, float32 gradient): 11.9-12.1 measured over 2k-8k tokens, 32k-152k vocabularies.
LOGITS_STANDARD_BYTES = 12.0
# Logit elements per chunk of the chunked ("fused") loss; rows = this // vocab_size.
FUSED_CHUNK_ELEMENTS = 64 * 1024 * 1024

# Allocator: reserved - allocated at the peak. A fraction of the standard loss's logits
# (their large short-lived buffers), a fraction of the other dynamic memory, and a constant.
FRAG_LOGITS = 0.30
FRAG_EXPANDABLE = 0.02
FRAG_DEFAULT = 0.04
ALLOC_FIXED_GIB = 0.25
# The default allocator keeps more cached blocks (0.56-0.86 GiB measured on a 1B model).
ALLOC_FIXED_DEFAULT_GIB = 0.7

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
