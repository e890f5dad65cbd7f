"""The GPU catalogue: sources, sane numbers, unique names, and NVML name matching."""
from __future__ import annotations

import pytest

from qplan.errors import UnknownGpuError
from qplan.profiles.gpu_catalog import GPUS, builtin_gpus, match_nvml_name
from qplan.profiles.gpus import GIB, GpuProfile
from qplan.profiles.registry import Registry, normalize

IDS = [g.name for g in GPUS]
MIB = 1024**2


def test_catalogue_size_and_kept_names():
    assert len(GPUS) >= 30
    assert builtin_gpus() == GPUS and builtin_gpus() is not GPUS
    names = set(IDS)
    assert {"rtx-4060", "rtx-4090", "h100-sxm", "h200"} <= names  # used elsewhere
    assert {g.kind for g in GPUS} == {"consumer", "laptop", "workstation", "datacenter"}


def test_names_and_aliases_unique():
    reg: Registry = Registry("GPU", UnknownGpuError)
    for g in GPUS:
        reg.register(g)  # raises PluginError on a duplicate name or alias
    assert reg.get("h100").name == "h100-sxm"
    keys = [normalize(n) for g in GPUS for n in (g.name, *g.aliases)]
    assert len(keys) == len(set(keys))


@pytest.mark.parametrize("g", GPUS, ids=IDS)
def test_entry_fields(g):
    assert g.name == g.name.lower() and " " not in g.name
    assert g.source.startswith("https://"), g.source
    assert g.memory_gib > 0 and g.tflops_16bit > 0 and g.bandwidth_gbs > 0
    assert g.kind in {"consumer", "laptop", "workstation", "datacenter"}
    assert g.nvml_names and all(n == n.lower() and n.strip() == n for n in g.nvml_names)
    assert g.compute_capability in {(7, 0), (7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0),
                                    (12, 0)}
    # bf16 is derived from one fact, compute capability >= 8.0.
    assert g.bf16 == (g.compute_capability >= (8, 0))
    if not g.bf16:
        assert "fp16" in g.notes  # the card's notes say the rate is fp16
    # Dense 16-bit rates: between a laptop's and a B200's; bandwidth likewise.
    assert 20 <= g.tflops_16bit <= 2500
    assert 200 <= g.bandwidth_gbs <= 8000
    if g.kind == "laptop":
        assert "Laptop" in g.marketing_name


def test_each_entry_matches_its_own_nvml_name():
    """Every entry is reachable: its marketing-style NVML name with its memory finds it."""
    for g in GPUS:
        for n in g.nvml_names:
            found = match_nvml_name(f"NVIDIA {n}", int(g.memory_gib * 0.98 * GIB), GPUS)
            assert found is not None, (g.name, n)
            # Another entry may win only through a longer, more specific name.
            if found is not g:
                assert max(len(x) for x in found.nvml_names
                           if x in f"nvidia {n}") > len(n), (g.name, found.name)


@pytest.mark.parametrize("nvml_name, memory_mib, expected", [
    ("NVIDIA GeForce RTX 4060 Ti", 8188, "rtx-4060-ti"),
    ("NVIDIA GeForce RTX 4060 Ti", 16380, "rtx-4060-ti-16gb"),
    ("NVIDIA GeForce RTX 4060", 8188, "rtx-4060"),
    ("NVIDIA GeForce RTX 4060 Laptop GPU", 8188, "rtx-4060-laptop"),
    ("NVIDIA H100 80GB HBM3", 81559, "h100-sxm"),
    ("NVIDIA H100 PCIe", 81559, "h100-pcie"),
    ("NVIDIA A100-SXM4-40GB", 40960, "a100-40gb-sxm"),
    ("NVIDIA A100-SXM4-80GB", 81920, "a100-80gb-sxm"),
    ("NVIDIA A100-PCIE-40GB", 40960, "a100-40gb-pcie"),
    ("NVIDIA A100 80GB PCIe", 81920, "a100-80gb-pcie"),
    ("Tesla T4", 15360, "t4"),
    ("NVIDIA L4", 23034, "l4"),
    ("NVIDIA L40S", 46068, "l40s"),
    ("NVIDIA A10G", 23028, "a10g"),
    ("NVIDIA A10", 23028, "a10"),
    ("NVIDIA RTX A6000", 49140, "rtx-a6000"),
    ("NVIDIA RTX 6000 Ada Generation", 49140, "rtx-6000-ada"),
    ("NVIDIA GeForce RTX 3060", 12288, "rtx-3060"),
    ("NVIDIA GeForce RTX 3060", 8192, "rtx-3060-8gb"),
    ("NVIDIA GeForce RTX 3080", 10240, "rtx-3080"),
    ("NVIDIA GeForce RTX 3080", 12288, "rtx-3080-12gb"),
    ("Tesla V100-SXM2-16GB", 16160, "v100-16gb"),
    ("Tesla V100-SXM2-32GB", 32510, "v100-32gb"),
    ("NVIDIA GeForce RTX 4070 Ti SUPER", 16376, "rtx-4070-ti-super"),
    ("NVIDIA GeForce RTX 4090", 24564, "rtx-4090"),
    ("NVIDIA GeForce RTX 5090", 32607, "rtx-5090"),
    ("NVIDIA H200", 143771, "h200"),
    ("GeForce RTX 2080 Ti", 11264, "rtx-2080-ti"),  # older drivers omit "NVIDIA"
])
def test_match_real_nvml_names(nvml_name, memory_mib, expected):
    g = match_nvml_name(nvml_name, memory_mib * MIB, GPUS)
    assert g is not None and g.name == expected


@pytest.mark.parametrize("nvml_name, expected", [
    ("NVIDIA GeForce RTX 4060 Ti", "rtx-4060-ti"),  # first same-name variant: the 8 GB
    ("NVIDIA GeForce RTX 3060", "rtx-3060"),        # the 12 GB comes first
    ("NVIDIA A100-SXM4-40GB", "a100-40gb-sxm"),
    ("nvidia   geforce rtx 4090", "rtx-4090"),      # case and spacing do not matter
])
def test_match_without_memory(nvml_name, expected):
    g = match_nvml_name(nvml_name, None, GPUS)
    assert g is not None and g.name == expected


@pytest.mark.parametrize("nvml_name, memory_mib", [
    ("NVIDIA GeForce RTX 4070 SUPER", 12282),      # a variant the catalogue lacks: not 4070
    ("NVIDIA GeForce RTX 4080 SUPER", 16376),
    ("NVIDIA GeForce RTX 3080 Ti", 12288),
    ("NVIDIA H100 NVL", 95830),
    ("NVIDIA GeForce RTX 3080 Laptop GPU", 8192),  # the 8 GB laptop: only 16 GB is listed
    ("NVIDIA GeForce GTX 1080 Ti", 11264),
    ("Quadro RTX 6000", 24576),                    # Turing, not the RTX 6000 Ada
    ("AMD Radeon RX 7900 XTX", 24560),
])
def test_no_match_for_other_cards(nvml_name, memory_mib):
    assert match_nvml_name(nvml_name, memory_mib * MIB, GPUS) is None


def test_short_names_do_not_match_inside_longer_ones():
    """"a10" is not in "A100", "l4" not in "L40S", "rtx 4060" not in "RTX 4060 Ti"."""
    only = [g for g in GPUS if g.name in ("a10", "l4", "rtx-4060")]
    assert match_nvml_name("NVIDIA A100-SXM4-40GB", None, only) is None
    assert match_nvml_name("NVIDIA L40S", None, only) is None
    assert match_nvml_name("NVIDIA GeForce RTX 4060 Ti", None, only) is None
    assert match_nvml_name("NVIDIA GeForce RTX 4060 Laptop GPU", None, only) is None


def test_memory_picks_between_plugin_variants():
    """Works for any catalogue, e.g. a plugin's entries sharing one NVML name."""
    src = "https://example.com"
    a = GpuProfile("x-24", "X 24GB", 24, (8, 9), 100, 900, src, nvml_names=("x1",))
    b = GpuProfile("x-48", "X 48GB", 48, (8, 9), 100, 900, src, nvml_names=("x1",))
    assert match_nvml_name("NVIDIA X1", 47 * GIB, [a, b]) is b
    assert match_nvml_name("NVIDIA X1", 23 * GIB, [a, b]) is a
    assert match_nvml_name("NVIDIA X1", None, [a, b]) is a
    assert match_nvml_name("NVIDIA X1", 8 * GIB, [a, b]) is None
    assert match_nvml_name("NVIDIA X1", 8 * GIB, []) is None
