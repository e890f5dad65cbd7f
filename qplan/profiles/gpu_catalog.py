"""Built-in GPU profiles, each citing its datasheet or architecture whitepaper.

``tflops_16bit`` is the dense (no sparsity) tensor-core rate at 16 bit with FP32
accumulation: bf16 where the card has it (compute capability >= 8.0), fp16 otherwise.
GeForce cards run FP16/BF16 tensor math with FP32 accumulation at *half* the rate they
advertise (the advertised "AI TOPS" and FP16 numbers use FP16 accumulation, and sparsity);
data-center and workstation cards run it at full rate. PyTorch's bf16/fp16 matmuls
accumulate in FP32, so the half rate is the one training sees on GeForce.

Where NVIDIA's whitepaper appendix lists "Peak FP16 Tensor TFLOPS with FP32 Accumulate"
that number is used. For cards it does not list, the rate is computed from the tensor-core
count and boost clock with the same per-core rate as a listed card of the same architecture
(``notes`` says which): Turing 64 FP16 FMA/clock/tensor core, Ampere GA10x and Ada 128,
each halved with FP32 accumulation on GeForce. ``bandwidth_gbs`` is memory bandwidth in
GB/s. Laptop GPUs run at the clock their maker's power limit allows; their figures are at
the top of NVIDIA's boost range and are optimistic for thin laptops.

:func:`match_nvml_name` maps the name NVML reports (``nvidia-smi``) to an entry.
"""
from __future__ import annotations

import re
from typing import Iterable

from qplan.profiles.gpus import GIB, GpuProfile

TURING_WP = ("https://images.nvidia.com/aem-dam/en-zz/Solutions/design-visualization/"
             "technologies/turing-architecture/NVIDIA-Turing-Architecture-Whitepaper.pdf")
AMPERE_WP = ("https://www.nvidia.com/content/PDF/"
             "nvidia-ampere-ga-102-gpu-architecture-whitepaper-v2.pdf")
ADA_WP = "https://images.nvidia.com/aem-dam/Solutions/geforce/ada/nvidia-ada-gpu-architecture.pdf"
BLACKWELL_WP = ("https://images.nvidia.com/aem-dam/Solutions/geforce/blackwell/"
                "nvidia-rtx-blackwell-gpu-architecture.pdf")
GEFORCE_30 = "https://www.nvidia.com/en-us/geforce/graphics-cards/30-series/"
GEFORCE_40 = "https://www.nvidia.com/en-us/geforce/graphics-cards/40-series/"
GEFORCE_50 = "https://www.nvidia.com/en-us/geforce/graphics-cards/50-series/"
LAPTOPS_40 = "https://www.nvidia.com/en-us/geforce/laptops/40-series/"
HALF = "GeForce: FP16/BF16 tensor rate with FP32 accumulate (half the FP16-accumulate rate)"


def _computed(tc: int, mhz: int, flops_per_clock: int) -> str:
    return (f"{HALF}; not in the whitepaper appendix: computed {tc} tensor cores x "
            f"{mhz} MHz boost x {flops_per_clock} FLOP/clock")


GPUS = [
    # ---- GeForce RTX 20 (Turing, cc 7.5: no bf16) -----------------------------------
    GpuProfile("rtx-2060", "NVIDIA GeForce RTX 2060 6GB", 6, (7, 5), 25.8, 336,
               "https://www.nvidia.com/en-us/geforce/graphics-cards/rtx-2060/",
               kind="consumer", aliases=("2060",), nvml_names=("rtx 2060",),
               notes="fp16 only; " + _computed(240, 1680, 64)),
    GpuProfile("rtx-2070", "NVIDIA GeForce RTX 2070", 8, (7, 5), 29.9, 448, TURING_WP,
               kind="consumer", aliases=("2070",), nvml_names=("rtx 2070",),
               notes="fp16 only; " + HALF + " (whitepaper, reference clocks)"),
    GpuProfile("rtx-2080-ti", "NVIDIA GeForce RTX 2080 Ti", 11, (7, 5), 53.8, 616, TURING_WP,
               kind="consumer", aliases=("2080ti",), nvml_names=("rtx 2080 ti",),
               notes="fp16 only; " + HALF + " (whitepaper, reference clocks)"),
    # ---- GeForce RTX 30 (Ampere GA10x, cc 8.6) ---------------------------------------
    GpuProfile("rtx-3060", "NVIDIA GeForce RTX 3060 12GB", 12, (8, 6), 25.5, 360, GEFORCE_30,
               kind="consumer", aliases=("3060", "rtx-3060-12gb"), nvml_names=("rtx 3060",),
               notes=_computed(112, 1777, 128)),
    GpuProfile("rtx-3060-8gb", "NVIDIA GeForce RTX 3060 8GB", 8, (8, 6), 25.5, 240, GEFORCE_30,
               kind="consumer", nvml_names=("rtx 3060",),
               notes="128-bit bus; " + _computed(112, 1777, 128)),
    GpuProfile("rtx-3060-ti", "NVIDIA GeForce RTX 3060 Ti", 8, (8, 6), 32.4, 448, GEFORCE_30,
               kind="consumer", aliases=("3060ti",), nvml_names=("rtx 3060 ti",),
               notes=_computed(152, 1665, 128)),
    GpuProfile("rtx-3070", "NVIDIA GeForce RTX 3070", 8, (8, 6), 40.6, 448, AMPERE_WP,
               kind="consumer", aliases=("3070",), nvml_names=("rtx 3070",),
               notes=HALF + " (whitepaper appendix)"),
    GpuProfile("rtx-3080", "NVIDIA GeForce RTX 3080 10GB", 10, (8, 6), 59.5, 760, AMPERE_WP,
               kind="consumer", aliases=("3080", "rtx-3080-10gb"), nvml_names=("rtx 3080",),
               notes=HALF + " (whitepaper appendix)"),
    GpuProfile("rtx-3080-12gb", "NVIDIA GeForce RTX 3080 12GB", 12, (8, 6), 61.3, 912,
               GEFORCE_30, kind="consumer", nvml_names=("rtx 3080",),
               notes="384-bit bus, 70 SMs; " + _computed(280, 1710, 128)),
    GpuProfile("rtx-3090", "NVIDIA GeForce RTX 3090", 24, (8, 6), 71.0, 936, AMPERE_WP,
               kind="consumer", aliases=("3090",), nvml_names=("rtx 3090",),
               notes=HALF + " (whitepaper appendix)"),
    GpuProfile("rtx-3090-ti", "NVIDIA GeForce RTX 3090 Ti", 24, (8, 6), 80.0, 1008, GEFORCE_30,
               kind="consumer", aliases=("3090ti",), nvml_names=("rtx 3090 ti",),
               notes=_computed(336, 1860, 128)),
    # ---- GeForce RTX 40 (Ada, cc 8.9) -------------------------------------------------
    GpuProfile("rtx-4060", "NVIDIA GeForce RTX 4060", 8, (8, 9), 30.2, 272,
               GEFORCE_40 + "rtx-4060-4060ti/",
               kind="consumer", aliases=("4060",), nvml_names=("rtx 4060",),
               notes=_computed(96, 2460, 128)),
    GpuProfile("rtx-4060-ti", "NVIDIA GeForce RTX 4060 Ti 8GB", 8, (8, 9), 44.1, 288,
               GEFORCE_40 + "rtx-4060-4060ti/",
               kind="consumer", aliases=("4060ti", "rtx-4060-ti-8gb"),
               nvml_names=("rtx 4060 ti",), notes=_computed(136, 2535, 128)),
    GpuProfile("rtx-4060-ti-16gb", "NVIDIA GeForce RTX 4060 Ti 16GB", 16, (8, 9), 44.1, 288,
               GEFORCE_40 + "rtx-4060-4060ti/",
               kind="consumer", aliases=("4060ti-16gb",),
               nvml_names=("rtx 4060 ti",), notes=_computed(136, 2535, 128)),
    GpuProfile("rtx-4070", "NVIDIA GeForce RTX 4070", 12, (8, 9), 58.3, 504,
               GEFORCE_40 + "rtx-4070-family/",
               kind="consumer", aliases=("4070",), nvml_names=("rtx 4070",),
               notes=_computed(184, 2475, 128)),
    GpuProfile("rtx-4070-ti-super", "NVIDIA GeForce RTX 4070 Ti SUPER", 16, (8, 9), 88.2, 672,
               GEFORCE_40 + "rtx-4070-family/",
               kind="consumer", aliases=("4070tisuper",), nvml_names=("rtx 4070 ti super",),
               notes=_computed(264, 2610, 128)),
    GpuProfile("rtx-4080", "NVIDIA GeForce RTX 4080", 16, (8, 9), 97.5, 716.8, ADA_WP,
               kind="consumer", aliases=("4080",), nvml_names=("rtx 4080",),
               notes=HALF + " (whitepaper appendix)"),
    GpuProfile("rtx-4090", "NVIDIA GeForce RTX 4090", 24, (8, 9), 165.2, 1008, ADA_WP,
               kind="consumer", aliases=("4090",), nvml_names=("rtx 4090",),
               notes=HALF + " (whitepaper appendix)"),
    # ---- GeForce RTX 50 (Blackwell consumer, cc 12.0) ----------------------------------
    # Same per-tensor-core FP16 rate as Ada (NVIDIA's FP4 "AI TOPS" / 8 = the computed
    # FP16-accumulate rate for each card below).
    GpuProfile("rtx-5060-ti", "NVIDIA GeForce RTX 5060 Ti 16GB", 16, (12, 0), 47.4, 448,
               GEFORCE_50 + "rtx-5060-family/",
               kind="consumer", aliases=("5060ti", "rtx-5060-ti-16gb"),
               nvml_names=("rtx 5060 ti",), notes=_computed(144, 2572, 128)),
    GpuProfile("rtx-5070", "NVIDIA GeForce RTX 5070", 12, (12, 0), 61.7, 672,
               GEFORCE_50 + "rtx-5070-family/",
               kind="consumer", aliases=("5070",), nvml_names=("rtx 5070",),
               notes=_computed(192, 2512, 128)),
    GpuProfile("rtx-5080", "NVIDIA GeForce RTX 5080", 16, (12, 0), 112.6, 960,
               GEFORCE_50 + "rtx-5080/",
               kind="consumer", aliases=("5080",), nvml_names=("rtx 5080",),
               notes=_computed(336, 2617, 128)),
    GpuProfile("rtx-5090", "NVIDIA GeForce RTX 5090", 32, (12, 0), 209.5, 1792, BLACKWELL_WP,
               kind="consumer", aliases=("5090",), nvml_names=("rtx 5090",),
               notes=HALF + " (whitepaper appendix; = 680 tensor cores x 2407 MHz x 128)"),
    # ---- Laptop GPUs (power-limited; clocks vary by laptop) ---------------------------
    GpuProfile("rtx-3080-laptop", "NVIDIA GeForce RTX 3080 Laptop GPU 16GB", 16, (8, 6), 42.0,
               448, "https://www.nvidia.com/en-us/geforce/laptops/30-series/",
               kind="laptop", nvml_names=("rtx 3080 laptop",),
               notes="16 GB variant (8 GB also sold); 14 Gbps memory (some use 16 Gbps, "
                     "512 GB/s); " + _computed(192, 1710, 128)),
    GpuProfile("rtx-4060-laptop", "NVIDIA GeForce RTX 4060 Laptop GPU", 8, (8, 9), 29.1, 256,
               LAPTOPS_40, kind="laptop", nvml_names=("rtx 4060 laptop",),
               notes=_computed(96, 2370, 128)),
    GpuProfile("rtx-4070-laptop", "NVIDIA GeForce RTX 4070 Laptop GPU", 8, (8, 9), 40.1, 256,
               LAPTOPS_40, kind="laptop", nvml_names=("rtx 4070 laptop",),
               notes=_computed(144, 2175, 128)),
    GpuProfile("rtx-4090-laptop", "NVIDIA GeForce RTX 4090 Laptop GPU", 16, (8, 9), 79.4, 576,
               LAPTOPS_40, kind="laptop", nvml_names=("rtx 4090 laptop",),
               notes="AD103; " + _computed(304, 2040, 128)),
    # ---- Workstation -----------------------------------------------------------------
    GpuProfile("rtx-a6000", "NVIDIA RTX A6000", 48, (8, 6), 154.8, 768,
               "https://www.nvidia.com/en-us/design-visualization/rtx-a6000/",
               kind="workstation", aliases=("a6000",), nvml_names=("rtx a6000",),
               notes="datasheet 309.7 TFLOPS tensor is with sparsity; dense is half"),
    GpuProfile("rtx-6000-ada", "NVIDIA RTX 6000 Ada Generation", 48, (8, 9), 364.2, 960,
               "https://www.nvidia.com/en-us/design-visualization/rtx-6000/",
               kind="workstation", aliases=("6000ada",), nvml_names=("rtx 6000 ada",),
               notes="datasheet 1457 TFLOPS is FP8 with sparsity; FP16 dense is a quarter"),
    # ---- Data center -------------------------------------------------------------------
    GpuProfile("t4", "NVIDIA T4", 16, (7, 5), 65.0, 320,
               "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/tesla-t4/"
               "t4-tensor-core-datasheet-951643.pdf",
               kind="datacenter", aliases=("tesla-t4",), nvml_names=("t4",),
               notes="fp16 only (FP16/FP32 mixed precision 65 TFLOPS); NVML reports ~15 GiB "
                     "with ECC on"),
    GpuProfile("v100-16gb", "NVIDIA V100 SXM2 16GB", 16, (7, 0), 125.0, 900,
               "https://images.nvidia.com/content/technologies/volta/pdf/"
               "volta-v100-datasheet-update-us-1165301-r5.pdf",
               kind="datacenter", aliases=("v100",), nvml_names=("v100",),
               notes="fp16 only; SXM2 figure (the PCIe card is 112 TFLOPS)"),
    GpuProfile("v100-32gb", "NVIDIA V100 SXM2 32GB", 32, (7, 0), 125.0, 900,
               "https://images.nvidia.com/content/technologies/volta/pdf/"
               "volta-v100-datasheet-update-us-1165301-r5.pdf",
               kind="datacenter", nvml_names=("v100",),
               notes="fp16 only; SXM2 figure (the PCIe card is 112 TFLOPS)"),
    GpuProfile("a10", "NVIDIA A10", 24, (8, 6), 125.0, 600,
               "https://www.nvidia.com/en-us/data-center/products/a10-gpu/",
               kind="datacenter", nvml_names=("a10",)),
    GpuProfile("a10g", "NVIDIA A10G (AWS G5)", 24, (8, 6), 70.0, 600,
               "https://www.baseten.co/blog/nvidia-a10-vs-a10g-for-ml-model-inference/",
               kind="datacenter", nvml_names=("a10g",),
               notes="AWS-only variant, no NVIDIA datasheet: 70 TFLOPS is the commonly cited "
                     "figure (80 SMs, half-rate FP32 accumulate); not confirmed by NVIDIA"),
    GpuProfile("l4", "NVIDIA L4", 24, (8, 9), 121.0, 300,
               "https://www.nvidia.com/en-us/data-center/l4/",
               kind="datacenter", nvml_names=("l4",),
               notes="datasheet 242 TFLOPS BF16 is with sparsity; dense is half"),
    GpuProfile("l40s", "NVIDIA L40S", 48, (8, 9), 362.05, 864,
               "https://www.nvidia.com/en-us/data-center/l40s/",
               kind="datacenter", nvml_names=("l40s",),
               notes="datasheet 362.05 dense / 733 sparse BF16"),
    GpuProfile("a100-40gb-pcie", "NVIDIA A100 40GB PCIe", 40, (8, 0), 312.0, 1555,
               "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
               "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf",
               kind="datacenter", nvml_names=("a100-pcie-40gb",)),
    GpuProfile("a100-40gb-sxm", "NVIDIA A100 SXM4 40GB", 40, (8, 0), 312.0, 1555,
               "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
               "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf",
               kind="datacenter", interconnect="nvlink3", aliases=("a100", "a100-40gb"),
               nvml_names=("a100-sxm4-40gb", "a100")),
    GpuProfile("a100-80gb-pcie", "NVIDIA A100 80GB PCIe", 80, (8, 0), 312.0, 1935,
               "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
               "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf",
               kind="datacenter", nvml_names=("a100 80gb pcie", "a100-pcie-80gb")),
    GpuProfile("a100-80gb-sxm", "NVIDIA A100 SXM4 80GB", 80, (8, 0), 312.0, 2039,
               "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
               "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf",
               kind="datacenter", interconnect="nvlink3", aliases=("a100-80gb",),
               nvml_names=("a100-sxm4-80gb", "a100")),
    GpuProfile("h100-pcie", "NVIDIA H100 PCIe 80GB", 80, (9, 0), 756.0, 2000,
               "https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet",
               kind="datacenter", nvml_names=("h100 pcie",),
               notes="datasheet 1513 TFLOPS BF16 is with sparsity; dense is half"),
    GpuProfile("h100-sxm", "NVIDIA H100 SXM5 80GB", 80, (9, 0), 989.4, 3350,
               "https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet",
               kind="datacenter", interconnect="nvlink4", aliases=("h100",),
               nvml_names=("h100 80gb hbm3", "h100 sxm", "h100")),
    GpuProfile("h200", "NVIDIA H200 SXM 141GB", 141, (9, 0), 989.4, 4800,
               "https://www.nvidia.com/en-us/data-center/h200/",
               kind="datacenter", interconnect="nvlink4", nvml_names=("h200",)),
    GpuProfile("b200", "NVIDIA B200 (HGX, 1000 W)", 180, (10, 0), 2250.0, 8000,
               "https://www.nvidia.com/en-us/data-center/hgx/",
               kind="datacenter", interconnect="nvlink5", nvml_names=("b200",),
               notes="HGX/DGX B200: 180 GB usable per GPU (192 GB on the package); "
                     "BF16 2.25 PFLOPS dense (4.5 with sparsity)"),
]


def builtin_gpus() -> list[GpuProfile]:
    return list(GPUS)


# A word right after a matched name that makes it a different card: "rtx 4060" must not
# match "RTX 4060 Ti" or "RTX 4060 Laptop GPU", nor "h100" match "H100 NVL".
_VARIANT_WORDS = frozenset({"ti", "super", "laptop", "mobile", "max", "max-q", "d", "nvl",
                            "ada", "s"})
_NEXT_WORD = re.compile(r"[\s_-]*([a-z0-9]+(?:-q)?)")
# NVML reports a little less than the marketed size (ECC, reserved memory): a T4 reports
# 15 GiB of 16, an H100 79.6 of 80. A candidate whose size is further off is a different card.
_MEMORY_TOLERANCE = 0.12


def _match_length(name: str, pattern: str) -> int:
    """Length of ``pattern`` if it occurs in ``name`` as a whole name, else 0.

    Whole: not inside a longer token (``a10`` is not in ``a100``), and not followed by a
    word that names a variant (``rtx 4060`` is not in ``rtx 4060 ti``).
    """
    for m in re.finditer(re.escape(pattern), name):
        start, end = m.span()
        if start > 0 and name[start - 1].isalnum():
            continue
        if end < len(name) and name[end].isalnum():
            continue
        nxt = _NEXT_WORD.match(name, end)
        if nxt and nxt.group(1) in _VARIANT_WORDS:
            continue
        return len(pattern)
    return 0


def match_nvml_name(nvml_name: str, memory_bytes: int | None,
                    gpus: Iterable[GpuProfile]) -> GpuProfile | None:
    """The catalogue entry for the device NVML calls ``nvml_name``, or ``None``.

    The entry whose ``nvml_names`` substring matches the longest part of the name wins
    (``"rtx 4060 ti"`` over ``"rtx 4060"``). Among equally long matches (same-name
    variants such as the RTX 3060 8 GB and 12 GB), the one whose memory is closest to
    ``memory_bytes`` (NVML's total) wins, else the first in catalogue order. When
    ``memory_bytes`` is given, entries whose memory is more than 12% away from it are
    never chosen: ``None`` then tells the caller to fall back on the measured size.
    """
    name = " ".join(nvml_name.lower().split())
    best: list[tuple[int, GpuProfile]] = []
    for g in gpus:
        length = max((_match_length(name, p.lower()) for p in g.nvml_names), default=0)
        if length:
            best.append((length, g))
    if not best:
        return None
    longest = max(n for n, _ in best)
    candidates = [g for n, g in best if n == longest]
    if memory_bytes is None:
        return candidates[0]
    gib = memory_bytes / GIB
    close = [g for g in candidates if abs(g.memory_gib - gib) <= _MEMORY_TOLERANCE * g.memory_gib]
    if not close:
        return None
    return min(close, key=lambda g: abs(g.memory_gib - gib))
