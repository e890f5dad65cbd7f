"""The hardware probe: a fake pynvml module, fake cgroup files, never a traceback."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from qplan.planner import hardware as H
from qplan.profiles.gpus import GIB, GpuProfile

from fake_nvml import FakeNVMLError, fake_pynvml

CATALOGUE = [
    GpuProfile("rtx-4060", "NVIDIA GeForce RTX 4060", 8, (8, 9), 60.5, 272, "test",
               nvml_names=("rtx 4060",)),
    GpuProfile("rtx-4060-laptop", "NVIDIA GeForce RTX 4060 Laptop", 8, (8, 9), 40.0, 256,
               "test", kind="laptop", nvml_names=("rtx 4060 laptop",)),
    GpuProfile("a100-40gb", "NVIDIA A100 40GB", 40, (8, 0), 312, 1555, "test",
               nvml_names=("a100",)),
    GpuProfile("a100-80gb", "NVIDIA A100 80GB", 80, (8, 0), 312, 2039, "test",
               nvml_names=("a100",)),
]


@pytest.fixture
def no_torch(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)


@pytest.fixture
def empty_root(tmp_path) -> Path:
    return tmp_path


@pytest.fixture
def fallback_matcher(monkeypatch):
    """Test qplan's own substring matcher even once the catalogue has match_nvml_name."""
    from qplan.profiles import gpu_catalog

    monkeypatch.delattr(gpu_catalog, "match_nvml_name", raising=False)


def probe(monkeypatch, module, root):
    monkeypatch.setitem(sys.modules, "pynvml", module)
    return H.probe(root=root, gpus=CATALOGUE)


def test_gpus_are_read_and_matched(monkeypatch, no_torch, empty_root, fallback_matcher):
    nv = fake_pynvml([("NVIDIA GeForce RTX 4060", int(7.6 * GIB), int(7.2 * GIB), (8, 9)),
                      ("NVIDIA A100-SXM4-80GB", 80 * GIB, 79 * GIB, (8, 0))], bytes_names=True)
    hw = probe(monkeypatch, nv, empty_root)
    assert [g.index for g in hw.gpus] == [0, 1]
    g0, g1 = hw.gpus
    assert g0.name == "NVIDIA GeForce RTX 4060"  # bytes from old pynvml decoded
    assert g0.profile.name == "rtx-4060" and g0.matched
    assert g0.total_bytes == int(7.6 * GIB) and g0.free_bytes == int(7.2 * GIB)
    assert g0.compute_capability == (8, 9) and g0.driver_version == "560.35.03"
    # same NVML substring for both A100s: the memory size decides
    assert g1.profile.name == "a100-80gb"
    assert nv.calls == ["init", "shutdown"]


def test_longest_nvml_name_wins(fallback_matcher):
    g = H.match_gpu("NVIDIA GeForce RTX 4060 Laptop GPU", 8 * GIB, CATALOGUE)
    assert g is not None and g.name == "rtx-4060-laptop"
    assert H.match_gpu("NVIDIA Quadro Mystery 9000", 8 * GIB, CATALOGUE) is None


def test_match_uses_catalogue_matcher_when_present(monkeypatch):
    from qplan.profiles import gpu_catalog

    seen = []

    def matcher(name, mem, gpus):
        seen.append((name, mem))
        return gpus[-1]
    monkeypatch.setattr(gpu_catalog, "match_nvml_name", matcher, raising=False)
    assert H.match_gpu("anything", 5, CATALOGUE).name == "a100-80gb"
    assert seen == [("anything", 5)]


def test_unknown_gpu_works_from_nvml_numbers(monkeypatch, no_torch, empty_root,
                                             fallback_matcher):
    nv = fake_pynvml([("NVIDIA Quadro Mystery 9000", 12 * GIB, 11 * GIB, (7, 5))])
    hw = probe(monkeypatch, nv, empty_root)
    (g,) = hw.gpus
    assert not g.matched
    p = g.profile
    assert p.memory_gib == pytest.approx(12.0)
    assert p.compute_capability == (7, 5) and not p.bf16
    assert p.marketing_name == "NVIDIA Quadro Mystery 9000"
    assert "not in the catalogue" in p.notes and "assumed" in p.notes
    assert p.name == "mystery-9000"


@pytest.mark.parametrize("module, note", [
    (None, "nvidia-ml-py not importable"),  # ``import pynvml`` raises ImportError
    (fake_pynvml([], init_error=FakeNVMLError("NVML Shared Library Not Found")),
     "Library Not Found"),
    (fake_pynvml([], init_error=OSError("libnvidia-ml.so.1: cannot open")), "cannot open"),
    (fake_pynvml([]), None),
], ids=["not-installed", "no-driver", "oserror", "zero-devices"])
def test_no_nvml_means_no_gpus(monkeypatch, no_torch, empty_root, module, note):
    hw = probe(monkeypatch, module, empty_root)
    assert hw.gpus == ()
    if note is not None:
        assert any(note in n for n in hw.notes), hw.notes


def test_a_failing_device_is_skipped(monkeypatch, no_torch, empty_root):
    nv = fake_pynvml([("NVIDIA GeForce RTX 4060", 8 * GIB, 8 * GIB, None),
                      ("NVIDIA GeForce RTX 4060", 8 * GIB, 8 * GIB, (8, 9))])
    hw = probe(monkeypatch, nv, empty_root)
    assert [g.index for g in hw.gpus] == [1]
    assert any("GPU 0" in n and "skipped" in n for n in hw.notes)
    assert nv.calls[-1] == "shutdown"


def test_torch_is_never_imported(monkeypatch, no_torch, empty_root):
    probe(monkeypatch, None, empty_root)
    assert "torch" not in sys.modules


def test_torch_used_only_when_already_imported(monkeypatch, empty_root, fallback_matcher):
    props = types.SimpleNamespace(name="NVIDIA GeForce RTX 4060", total_memory=8 * GIB,
                                  major=8, minor=9)
    cuda = types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 1,
                                 get_device_properties=lambda i: props)
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    hw = probe(monkeypatch, None, empty_root)
    (g,) = hw.gpus
    assert g.source == "torch" and g.profile.name == "rtx-4060" and g.free_bytes is None


# ---------------------------------------------------------------------------
def write(root: Path, rel: str, text: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


@pytest.mark.parametrize("files, expected", [
    ({}, None),
    ({"sys/fs/cgroup/memory.max": "max\n"}, None),
    ({"sys/fs/cgroup/memory.max": f"{6 * GIB}\n"}, 6 * GIB),
    ({"sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n"}, None),
    ({"sys/fs/cgroup/memory/memory.limit_in_bytes": f"{3 * GIB}\n"}, 3 * GIB),
], ids=["none", "v2-max", "v2-limit", "v1-huge", "v1-limit"])
def test_cgroup_memory_limit(tmp_path, files, expected):
    for rel, text in files.items():
        write(tmp_path, rel, text)
    assert H.cgroup_memory_limit(tmp_path) == expected


@pytest.mark.parametrize("files, expected", [
    ({}, None),
    ({"sys/fs/cgroup/cpu.max": "max 100000\n"}, None),
    ({"sys/fs/cgroup/cpu.max": "250000 100000\n"}, 2.5),
    ({"sys/fs/cgroup/cpu/cpu.cfs_quota_us": "-1\n", "sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000"}, None),
    ({"sys/fs/cgroup/cpu/cpu.cfs_quota_us": "50000\n", "sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000"}, 0.5),
], ids=["none", "v2-max", "v2-quota", "v1-none", "v1-quota"])
def test_cgroup_cpu_quota(tmp_path, files, expected):
    for rel, text in files.items():
        write(tmp_path, rel, text)
    assert H.cgroup_cpu_quota(tmp_path) == expected


def test_ram_limit_is_the_smaller_of_ram_and_cgroup(monkeypatch, no_torch, tmp_path):
    import psutil

    vm = types.SimpleNamespace(total=64 * GIB, available=60 * GIB)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: vm)
    write(tmp_path, "sys/fs/cgroup/memory.max", str(16 * GIB))
    write(tmp_path, "sys/fs/cgroup/cpu.max", "150000 100000")
    write(tmp_path, "proc/cpuinfo", "processor\t: 0\nmodel name\t: Test CPU 3000\n")
    hw = probe(monkeypatch, None, tmp_path)
    assert hw.ram_bytes == 64 * GIB and hw.ram_available_bytes == 60 * GIB
    assert hw.cgroup_memory_limit_bytes == 16 * GIB
    assert hw.ram_limit_bytes == 16 * GIB
    assert hw.cpu_quota == 1.5 and hw.usable_cpus == min(hw.cpu_count, 2)
    assert hw.cpu_model == "Test CPU 3000"
    write(tmp_path, "sys/fs/cgroup/memory.max", str(128 * GIB))  # limit above RAM
    assert probe(monkeypatch, None, tmp_path).ram_limit_bytes == 64 * GIB


def test_optional_kernels_checked_without_import(monkeypatch):
    import importlib.util

    seen = []
    real = importlib.util.find_spec

    def spy(name, *a):
        seen.append(name)
        return object() if name == "flash_attn" else None
    monkeypatch.setattr(importlib.util, "find_spec", spy)
    assert H.has_package("flash_attn") is True
    assert H.has_package("liger_kernel") is False
    assert seen == ["flash_attn", "liger_kernel"]
    monkeypatch.setattr(importlib.util, "find_spec", real)
    assert "flash_attn" not in sys.modules


def test_library_versions_reads_metadata_without_importing():
    before = set(sys.modules)
    v = H.library_versions(("click", "surely-not-installed-pkg"))
    assert v["click"] and v["surely-not-installed-pkg"] is None
    assert "torch" not in set(sys.modules) - before
