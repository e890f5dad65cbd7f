"""Memory measured while training (in the training process), and the progress display.

On a GPU: PyTorch's counters (``max_memory_reserved`` is what the caching allocator held,
``max_memory_allocated`` what tensors used) and NVML's view of this process, which also
counts the CUDA context and kernels (what ``nvidia-smi`` shows), sampled every 20 ms by a
process of its own (:mod:`qplan.runner.sampler`; a thread here would take Python's lock from
the training loop every sample). On CPU there is no device memory; the process's resident
memory (RSS) is reported.
"""
from __future__ import annotations

import os
import threading
import time

from qplan.runner.protocol import Measured

GIB = 1024**3


class MemoryMonitor:
    def __init__(self, cuda: bool, interval_s: float = 0.02):
        self.cuda = cuda
        self.interval_s = interval_s
        self.nvml_peak = 0
        self.nvml_context = None  # bytes in use after CUDA started, before the model
        self.rss_peak = 0
        self._handle = None
        self._uuid = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sampler = None  # the sampler process (a thread if it cannot start)
        import psutil

        self._proc = psutil.Process()

    # -- sampling ------------------------------------------------------------
    def _nvml_used(self) -> int | None:
        if self._handle is None:
            return None
        import pynvml

        try:
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(self._handle):
                if p.pid == os.getpid() and p.usedGpuMemory is not None:
                    return int(p.usedGpuMemory)
            return int(pynvml.nvmlDeviceGetMemoryInfo(self._handle).used)
        except pynvml.NVMLError:
            return None

    def sample(self) -> None:
        """A reading now, with the peaks the sampler process saw since the last one."""
        try:
            self.rss_peak = max(self.rss_peak, self._proc.memory_info().rss)
        except Exception:  # noqa: BLE001 - a failed sample is just skipped
            pass
        if self._sampler is not None:
            self._ask("peek")
            return
        used = self._nvml_used()
        if used is not None:
            self.nvml_peak = max(self.nvml_peak, used)

    def _ask(self, what: str) -> None:
        """The sampler's peaks (``peek``; ``stop`` ends it). A sampler that stopped answering
        leaves the in-process readings."""
        import json

        p = self._sampler
        try:
            p.stdin.write(what + "\n")
            p.stdin.flush()
            got = json.loads(p.stdout.readline())
        except (OSError, ValueError):
            self._sampler = None
            return
        self.rss_peak = max(self.rss_peak, int(got.get("rss") or 0))
        if got.get("nvml") is not None:
            self.nvml_peak = max(self.nvml_peak, int(got["nvml"]))

    def _start_sampler(self) -> bool:
        import subprocess
        import sys

        try:
            self._sampler = subprocess.Popen(
                [sys.executable, "-m", "qplan.runner.sampler", str(os.getpid()),
                 self._uuid if self._handle is not None else "", str(self.interval_s)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        except OSError:
            self._sampler = None
        return self._sampler is not None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def start(self) -> "MemoryMonitor":
        if self.cuda:
            import torch

            dev = torch.cuda.current_device()  # this rank's GPU (the child set it)
            torch.zeros(1, device=f"cuda:{dev}")  # start the CUDA context
            try:
                import pynvml

                pynvml.nvmlInit()
                try:  # the GPU torch calls dev (CUDA_VISIBLE_DEVICES may renumber)
                    uuid = str(torch.cuda.get_device_properties(dev).uuid)
                    self._uuid = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
                    self._handle = pynvml.nvmlDeviceGetHandleByUUID(self._uuid)
                except Exception:  # noqa: BLE001
                    self._handle = pynvml.nvmlDeviceGetHandleByIndex(dev)
                    self._uuid = pynvml.nvmlDeviceGetUUID(self._handle)
                    if isinstance(self._uuid, bytes):
                        self._uuid = self._uuid.decode()
                self.nvml_context = self._nvml_used()
            except Exception:  # noqa: BLE001 - no NVML: PyTorch's counters only
                self._handle = None
        self.sample()
        if not self._start_sampler():
            self._thread = threading.Thread(target=self._loop, daemon=True, name="qplan-memory")
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
        self.sample()
        if self._sampler is not None:
            p = self._sampler
            self._ask("stop")
            self._sampler = None
            try:
                p.stdin.close()
                p.wait(timeout=5)
            except Exception:  # noqa: BLE001 - it ends with the training process anyway
                p.kill()

    # -- readings -----------------------------------------------------------
    def current(self) -> tuple[float, float]:
        """(current, peak) in GiB: reserved device memory on a GPU, RSS on CPU."""
        if self.cuda:
            import torch

            return torch.cuda.memory_reserved() / GIB, torch.cuda.max_memory_reserved() / GIB
        rss = self._proc.memory_info().rss
        self.rss_peak = max(self.rss_peak, rss)
        return rss / GIB, self.rss_peak / GIB

    def report(self) -> Measured:
        """What was measured (device memory is None on CPU; NVML's where it saw nothing)."""
        rss = round(self.rss_peak / GIB, 3)
        if not self.cuda:
            return Measured(device="cpu", host_rss_peak_gib=rss)
        import torch

        nvml = self._handle is not None
        return Measured(
            device=torch.cuda.get_device_name(), host_rss_peak_gib=rss,
            peak_reserved_gib=round(torch.cuda.max_memory_reserved() / GIB, 3),
            peak_allocated_gib=round(torch.cuda.max_memory_allocated() / GIB, 3),
            nvml_peak_gib=round(self.nvml_peak / GIB, 3) if nvml else None,
            cuda_context_gib=round(self.nvml_context / GIB, 3)
            if nvml and self.nvml_context is not None else None)


class Progress:
    """A rich progress bar (on a terminal) or one line every few steps (in a log)."""

    def __init__(self, total: int, start: int, attempt: int, enabled: bool = True):
        from rich.console import Console

        self.console = Console(highlight=False, soft_wrap=True)
        self.total, self.enabled, self.attempt = total, enabled, attempt
        self.every = max(1, total // 20)
        self._bar = None
        if enabled and self.console.is_terminal:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress,
                                       TextColumn, TimeElapsedColumn, TimeRemainingColumn)

            self._bar = RichProgress(TextColumn(f"attempt {attempt}"), BarColumn(),
                                     MofNCompleteColumn(), TimeElapsedColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                     console=self.console)
            self._task = self._bar.add_task("train", total=total, completed=start, info="")
            self._bar.start()

    def update(self, step: int, info: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
        elif step % self.every == 0 or step == self.total:
            self.console.print(f"step {step}/{self.total}  {info}")

    def line(self, text: str) -> None:
        if self.enabled:
            self.console.print(text)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def step_info(loss: float, tokens_per_s: float, monitor: MemoryMonitor) -> str:
    cur, peak = monitor.current()
    if not monitor.cuda:
        return f"loss {loss:.4f}  {tokens_per_s:,.0f} tok/s  RSS {cur:.2f} GiB (peak {peak:.2f})"
    out = f"loss {loss:.4f}  {tokens_per_s:,.0f} tok/s  GPU reserved {cur:.2f} GiB (peak {peak:.2f}"
    if monitor.nvml_peak:
        out += f", nvidia-smi peak {monitor.nvml_peak / GIB:.2f}"
    return out + ")"


def now() -> float:
    return time.perf_counter()
