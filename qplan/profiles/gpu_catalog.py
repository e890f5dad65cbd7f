"""Built-in GPU profiles, each citing its datasheet.

``tflops_16bit`` is the dense tensor-core rate (bf16 where supported, else fp16),
without sparsity; ``bandwidth_gbs`` the memory bandwidth in GB/s.
"""
from __future__ import annotations

from qplan.profiles.gpus import GpuProfile

GPUS = [
    GpuProfile("rtx-4060", "NVIDIA GeForce RTX 4060", 8, (8, 9), 60.5, 272,
               "https://images.nvidia.com/aem-dam/Solutions/geforce/ada/nvidia-ada-gpu-architecture.pdf",
               kind="consumer", nvml_names=("rtx 4060",)),
    GpuProfile("rtx-4090", "NVIDIA GeForce RTX 4090", 24, (8, 9), 165.2, 1008,
               "https://images.nvidia.com/aem-dam/Solutions/geforce/ada/nvidia-ada-gpu-architecture.pdf",
               kind="consumer", nvml_names=("rtx 4090",)),
    GpuProfile("h100-sxm", "NVIDIA H100 SXM5 80GB", 80, (9, 0), 989.4, 3350,
               "https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet",
               kind="datacenter", aliases=("h100",), nvml_names=("h100 80gb hbm3", "h100 sxm")),
    GpuProfile("h200", "NVIDIA H200 SXM 141GB", 141, (9, 0), 989.4, 4800,
               "https://www.nvidia.com/en-us/data-center/h200/",
               kind="datacenter", nvml_names=("h200",)),
]


def builtin_gpus() -> list[GpuProfile]:
    return list(GPUS)
