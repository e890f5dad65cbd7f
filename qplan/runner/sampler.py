"""The memory sampler: a small process of its own that polls a training process's memory.

``python -m qplan.runner.sampler PID GPU_UUID INTERVAL_S`` samples the process's resident
memory (psutil) and, with a GPU's UUID, what NVML says the process holds on that GPU (all of
the GPU's used memory where NVML does not list processes), every ``INTERVAL_S`` seconds, and
keeps the peaks. It answers each line on stdin (``peek`` or ``stop``) with the peaks so far as
one JSON line, ``{"rss": bytes, "nvml": bytes or null}``; ``stop`` or the end of stdin (the
training process is gone) ends it.

Why a process and not a thread: a sampling thread in the training process takes Python's
lock for every sample, and at batch 1 the training loop is bound by Python. On two H200s a
20 ms thread took 8.7 ms a sample (cProfile of a 1B model's ``qplan run``: 10.7 s of a 53 s
attempt; benchmarks/results/raw/h200x2_ddp3_profile.txt).
"""
from __future__ import annotations

import json
import sys
import threading


def _nvml_used(pynvml, handle, pid: int) -> int | None:
    try:
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if p.pid == pid and p.usedGpuMemory is not None:
                return int(p.usedGpuMemory)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except pynvml.NVMLError:
        return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    pid, uuid, interval = int(argv[0]), argv[1], float(argv[2])
    import psutil

    proc = psutil.Process(pid)
    pynvml = handle = None
    if uuid:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        except Exception:  # noqa: BLE001 - no NVML: resident memory only
            handle = None
    peaks: dict = {"rss": 0, "nvml": None}
    lock = threading.Lock()

    def sample() -> None:
        try:
            rss = proc.memory_info().rss
        except psutil.Error:
            rss = 0
        used = _nvml_used(pynvml, handle, pid) if handle is not None else None
        with lock:
            peaks["rss"] = max(peaks["rss"], rss)
            if used is not None:
                peaks["nvml"] = max(peaks["nvml"] or 0, used)

    done = threading.Event()

    def loop() -> None:
        while not done.wait(interval):
            sample()

    sample()
    threading.Thread(target=loop, daemon=True).start()
    for line in sys.stdin:
        sample()
        with lock:
            out = dict(peaks)
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
        if line.strip() == "stop":
            break
    done.set()
    return 0


if __name__ == "__main__":
    sys.exit(main())
