"""GPU profiles as plain data.

One dataclass, :class:`GpuProfile`; catalogue entries live in
:mod:`qplan.profiles.gpu_catalog`, each citing its datasheet. Capabilities are
derived from one fact (bf16 <= compute capability >= 8.0), never stored twice.
"""
from __future__ import annotations

from dataclasses import dataclass, field

GIB = 1024**3


@dataclass(frozen=True)
class Link:
    """How two cards of one machine exchange data (the gradient all-reduce of data-parallel
    training): ``gbs`` is the link's rate in GB/s in each direction."""

    name: str
    gbs: float
    source: str
    nvlink: bool = False


PCI_SIG = "https://pcisig.com/specifications (x16, each direction, after 128b/130b encoding)"
LINKS = {
    "pcie3": Link("PCIe 3.0 x16", 15.75, PCI_SIG),
    "pcie4": Link("PCIe 4.0 x16", 31.5, PCI_SIG),
    "pcie5": Link("PCIe 5.0 x16", 63.0, PCI_SIG),
    "nvlink3": Link("NVLink 3 (A100 SXM)", 300.0, "https://www.nvidia.com/content/dam/en-zz/"
                    "Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-"
                    "web.pdf (600 GB/s both directions)", nvlink=True),
    "nvlink4": Link("NVLink 4 (H100/H200 SXM)", 450.0,
                    "https://www.nvidia.com/en-us/data-center/h200/ (900 GB/s both directions)",
                    nvlink=True),
    "nvlink5": Link("NVLink 5 (B200)", 900.0, "https://www.nvidia.com/en-us/data-center/hgx/ "
                    "(1.8 TB/s both directions)", nvlink=True),
}


@dataclass(frozen=True)
class GpuProfile:
    """One GPU model.

    ``memory_gib`` is the marketed memory size (GPU "GB" are binary: an "8 GB" card
    has 8 GiB of chips, of which NVML reports a little less as total).
    ``tflops_16bit`` is the dense (no sparsity) tensor-core rate at 16-bit: bf16 where
    the card has it, fp16 otherwise. ``bandwidth_gbs`` is memory bandwidth in GB/s.
    """

    name: str
    marketing_name: str
    memory_gib: float
    compute_capability: tuple[int, int]
    tflops_16bit: float
    bandwidth_gbs: float
    source: str
    kind: str = "consumer"  # consumer | laptop | workstation | datacenter
    aliases: tuple[str, ...] = ()
    # Lower-case substrings of the NVML device name that identify this card.
    nvml_names: tuple[str, ...] = ()
    notes: str = ""
    provider: str = field(default="qplan", compare=False)
    # key of :data:`LINKS` between two such cards; "" = by generation (:attr:`link`)
    interconnect: str = ""

    @property
    def bf16(self) -> bool:
        """bf16 compute needs compute capability 8.0 (Ampere) or newer."""
        return self.compute_capability >= (8, 0)

    @property
    def flash_attention_2(self) -> bool:
        """FlashAttention 2 supports compute capability 8.0 and newer."""
        return self.compute_capability >= (8, 0)

    @property
    def link(self) -> Link:
        """The link between two of these cards in one machine: the catalogue's, else PCIe of
        the card's generation (3.0 before Ampere, 5.0 from Blackwell and the H100 PCIe on)."""
        if self.interconnect:
            return LINKS[self.interconnect]
        if self.compute_capability < (8, 0):
            return LINKS["pcie3"]
        return LINKS["pcie5" if self.compute_capability >= (9, 0) else "pcie4"]

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)

    @property
    def cc_str(self) -> str:
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"


def custom_gpu(memory_gib: float, *, name: str | None = None,
               compute_capability: tuple[int, int] = (8, 9)) -> GpuProfile:
    """A GPU known only by its memory size (``--gpu 8GB`` / ``--vram 8``).

    Speed figures are those of a mid-range Ada card (RTX 4070 class) and are marked as
    assumed in ``notes``.
    """
    return GpuProfile(
        name=name or f"{memory_gib:g}gb",
        marketing_name=f"GPU with {memory_gib:g} GiB",
        memory_gib=float(memory_gib),
        compute_capability=compute_capability,
        tflops_16bit=117.0,
        bandwidth_gbs=504.0,
        source="user-given memory size; speed assumed (RTX 4070 class)",
        kind="custom",
        notes="memory from the user; compute capability and speed assumed",
    )
