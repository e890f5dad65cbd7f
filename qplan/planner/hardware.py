"""What this machine has: GPUs (through NVML), RAM, CPUs, and the optional kernels.

The probe never fails: no NVML library, no driver or an NVML error means "no GPUs",
with the reason in :attr:`Hardware.notes`. torch is consulted only when something else
already imported it (``sys.modules``); it is never imported here, nor is any package
whose availability is checked (``importlib.util.find_spec`` only).

Inside a container the cgroup limits are the real ones: :attr:`Hardware.ram_limit_bytes`
is the smaller of the host's RAM and the cgroup memory limit, and
:attr:`Hardware.usable_cpus` honours a cgroup CPU quota. ``root`` lets tests point the
``/sys`` and ``/proc`` reads at a fake tree.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from qplan.profiles.gpus import GIB, GpuProfile, custom_gpu

# A cgroup v1 "no limit" is a page-rounded 2**63; anything this large means none.
_NO_LIMIT = 2**60
# Packages whose versions ``qplan hw`` reports (distribution names).
REPORTED_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "trl",
                     "flash-attn", "liger-kernel", "nvidia-ml-py")


@dataclass(frozen=True)
class DetectedGpu:
    """One GPU as NVML (or an already-imported torch) reports it, and its profile.

    ``profile`` is the catalogue entry it matched, or, when ``matched`` is False, a profile
    built from NVML's memory and compute capability with speed assumed (see its notes).
    """

    index: int
    name: str
    total_bytes: int
    free_bytes: int | None
    compute_capability: tuple[int, int]
    driver_version: str | None
    profile: GpuProfile
    matched: bool
    source: str = "nvml"  # "nvml" or "torch"

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    @property
    def free_gib(self) -> float | None:
        return None if self.free_bytes is None else self.free_bytes / GIB


@dataclass(frozen=True)
class Hardware:
    """Everything the planner needs to know about the machine it runs on."""

    gpus: tuple[DetectedGpu, ...]
    ram_bytes: int
    ram_available_bytes: int
    cgroup_memory_limit_bytes: int | None
    cpu_count: int
    cpu_quota: float | None  # cgroup CPU quota in CPUs (2.5 = 250 ms per 100 ms), None = none
    cpu_model: str
    flash_attn: bool
    liger_kernel: bool
    notes: tuple[str, ...] = ()

    @property
    def ram_limit_bytes(self) -> int:
        """Host memory a training process may really use: RAM, capped by the cgroup."""
        if self.cgroup_memory_limit_bytes is None:
            return self.ram_bytes
        return min(self.ram_bytes, self.cgroup_memory_limit_bytes)

    @property
    def usable_cpus(self) -> int:
        if self.cpu_quota is None:
            return self.cpu_count
        return max(1, min(self.cpu_count, math.ceil(self.cpu_quota)))

    @property
    def gpu0(self) -> DetectedGpu | None:
        return self.gpus[0] if self.gpus else None


# ---------------------------------------------------------------------------
# GPUs
def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def match_gpu(nvml_name: str, memory_bytes: int, gpus: Iterable[GpuProfile]) -> GpuProfile | None:
    """The catalogue profile of an NVML device name, or None.

    Uses ``qplan.profiles.gpu_catalog.match_nvml_name`` when the catalogue provides it;
    otherwise the profile whose ``nvml_names`` substring is the longest found in the
    lower-cased name, ties broken by the closest memory size.
    """
    gpus = list(gpus)
    from qplan.profiles import gpu_catalog

    matcher = getattr(gpu_catalog, "match_nvml_name", None)
    if matcher is not None:
        return matcher(nvml_name, memory_bytes, gpus)
    low = nvml_name.lower()
    best, best_key = None, None
    for g in gpus:
        hits = [len(s) for s in g.nvml_names if s and s.lower() in low]
        if not hits:
            continue
        key = (max(hits), -abs(g.memory_bytes - memory_bytes))
        if best_key is None or key > best_key:
            best, best_key = g, key
    return best


def _slug(name: str) -> str:
    s = re.sub(r"^nvidia\s+", "", name.strip(), flags=re.I)
    s = re.sub(r"\b(geforce|tesla|quadro)\b", "", s, flags=re.I)
    return re.sub(r"[^a-z0-9.]+", "-", s.lower()).strip("-") or "gpu"


def unknown_gpu_profile(name: str, total_bytes: int, cc: tuple[int, int]) -> GpuProfile:
    """A profile for a GPU the catalogue lacks: memory and compute capability from the
    driver, speed assumed (RTX 4070 class), which its ``notes`` say."""
    base = custom_gpu(round(total_bytes / GIB, 2), name=_slug(name), compute_capability=cc)
    return dataclasses.replace(
        base, marketing_name=name, kind="detected", source="NVML (not in the catalogue)",
        notes=f"{name} is not in the catalogue: memory and compute capability from the "
              "driver, speed assumed (RTX 4070 class)")


def _profile_for(name: str, total: int, cc: tuple[int, int],
                 catalogue: list[GpuProfile]) -> tuple[GpuProfile, bool]:
    prof = match_gpu(name, total, catalogue)
    if prof is not None:
        return prof, True
    return unknown_gpu_profile(name, total, cc), False


def _nvml_gpus(catalogue: list[GpuProfile], notes: list[str]) -> list[DetectedGpu]:
    try:
        import pynvml
    except ImportError as e:
        notes.append(f"NVML not available (nvidia-ml-py not importable: {e})")
        return []
    nvml_error = getattr(pynvml, "NVMLError", OSError)
    try:
        pynvml.nvmlInit()
    except (nvml_error, OSError) as e:
        notes.append(f"NVML could not start (no NVIDIA driver?): {e}")
        return []
    out: list[DetectedGpu] = []
    try:
        try:
            driver = _text(pynvml.nvmlSystemGetDriverVersion())
        except (nvml_error, OSError):
            driver = None
        for i in range(pynvml.nvmlDeviceGetCount()):
            try:
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                name = _text(pynvml.nvmlDeviceGetName(h))
                mem = pynvml.nvmlDeviceGetMemoryInfo(h)
                cc = tuple(int(x) for x in pynvml.nvmlDeviceGetCudaComputeCapability(h))
            except (nvml_error, OSError) as e:
                notes.append(f"GPU {i}: NVML query failed ({e}); skipped")
                continue
            prof, matched = _profile_for(name, int(mem.total), cc, catalogue)  # type: ignore[arg-type]
            out.append(DetectedGpu(i, name, int(mem.total), int(mem.free), cc,  # type: ignore[arg-type]
                                   driver, prof, matched))
    except (nvml_error, OSError) as e:
        notes.append(f"NVML query failed: {e}")
    finally:
        try:
            pynvml.nvmlShutdown()
        except (nvml_error, OSError):
            pass
    return out


def _torch_gpus(catalogue: list[GpuProfile], notes: list[str]) -> list[DetectedGpu]:
    """GPUs from torch, only when the process already imported it (never imported here)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return []
    try:
        if not torch.cuda.is_available():
            return []
        out = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            cc = (int(p.major), int(p.minor))
            prof, matched = _profile_for(p.name, int(p.total_memory), cc, catalogue)
            out.append(DetectedGpu(i, p.name, int(p.total_memory), None, cc, None, prof,
                                   matched, source="torch"))
        if out:
            notes.append("GPUs from the already-imported torch (NVML unavailable)")
        return out
    except Exception as e:  # torch's CUDA errors vary by version; a probe must not fail
        notes.append(f"torch could not list GPUs: {e}")
        return []


# ---------------------------------------------------------------------------
# cgroups, CPUs, RAM
def _read(root: Path, rel: str) -> str | None:
    try:
        return (root / rel).read_text().strip()
    except OSError:
        return None


def cgroup_memory_limit(root: str | Path = "/") -> int | None:
    """The cgroup memory limit in bytes (v2 ``memory.max``, else v1), None when unlimited."""
    root = Path(root)
    for rel in ("sys/fs/cgroup/memory.max", "sys/fs/cgroup/memory/memory.limit_in_bytes"):
        v = _read(root, rel)
        if v is None:
            continue
        if v == "max" or not v.isdigit():
            return None
        n = int(v)
        return None if n >= _NO_LIMIT or n <= 0 else n
    return None


def cgroup_cpu_quota(root: str | Path = "/") -> float | None:
    """The cgroup CPU quota in CPUs (v2 ``cpu.max``, else v1 cfs quota/period), or None."""
    root = Path(root)
    v = _read(root, "sys/fs/cgroup/cpu.max")
    if v is not None:
        parts = v.split()
        if len(parts) == 2 and parts[0] != "max":
            try:
                return int(parts[0]) / int(parts[1])
            except (ValueError, ZeroDivisionError):
                return None
        return None
    for d in ("sys/fs/cgroup/cpu", "sys/fs/cgroup/cpu,cpuacct"):
        q, p = _read(root, f"{d}/cpu.cfs_quota_us"), _read(root, f"{d}/cpu.cfs_period_us")
        if q is not None and p is not None:
            try:
                qi, pi = int(q), int(p)
            except ValueError:
                return None
            return qi / pi if qi > 0 and pi > 0 else None
    return None


def cpu_model(root: str | Path = "/") -> str:
    text = _read(Path(root), "proc/cpuinfo") or ""
    for line in text.splitlines():
        key, _, val = line.partition(":")
        if key.strip() in ("model name", "Model", "Hardware") and val.strip():
            return val.strip()
    import platform

    return platform.processor() or platform.machine() or "unknown"


def _cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def has_package(module: str) -> bool:
    """Whether ``module`` could be imported (without importing it)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def library_versions(names: Iterable[str] = REPORTED_PACKAGES) -> dict[str, str | None]:
    """Installed versions by distribution name (None = not installed); nothing imported."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


# ---------------------------------------------------------------------------
def probe(*, gpus: Iterable[GpuProfile], root: str | Path = "/") -> Hardware:
    """Inspect this machine. ``gpus`` is the catalogue to match detected cards against
    (``qplan.api.catalog().gpus``: the planner never reaches up into the API for it)."""
    import psutil

    catalogue = list(gpus)
    notes: list[str] = []
    found = _nvml_gpus(catalogue, notes)
    if not found:
        found = _torch_gpus(catalogue, notes)
    vm = psutil.virtual_memory()
    return Hardware(
        gpus=tuple(found),
        ram_bytes=int(vm.total),
        ram_available_bytes=int(vm.available),
        cgroup_memory_limit_bytes=cgroup_memory_limit(root),
        cpu_count=_cpu_count(),
        cpu_quota=cgroup_cpu_quota(root),
        cpu_model=cpu_model(root),
        flash_attn=has_package("flash_attn"),
        liger_kernel=has_package("liger_kernel"),
        notes=tuple(notes),
    )
