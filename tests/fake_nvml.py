"""A fake ``pynvml`` module for tests: answers like nvidia-ml-py for given devices."""
from __future__ import annotations

import types
from collections import namedtuple

Mem = namedtuple("Mem", "total free used")

class FakeNVMLError(Exception):
    pass


def fake_pynvml(devices, *, init_error=None, driver="560.35.03", bytes_names=False):
    """A module object that answers like pynvml for ``devices`` [(name, total, free, cc)]."""
    m = types.ModuleType("pynvml")
    m.NVMLError = FakeNVMLError
    m.calls = []

    def init():
        m.calls.append("init")
        if init_error:
            raise init_error

    def name(h):
        n = devices[h][0]
        return n.encode() if bytes_names else n

    m.nvmlInit = init
    m.nvmlShutdown = lambda: m.calls.append("shutdown")
    m.nvmlSystemGetDriverVersion = lambda: driver
    m.nvmlDeviceGetCount = lambda: len(devices)
    m.nvmlDeviceGetHandleByIndex = lambda i: i
    m.nvmlDeviceGetName = name
    m.nvmlDeviceGetMemoryInfo = lambda h: Mem(devices[h][1], devices[h][2], devices[h][1] - devices[h][2])

    def cc(h):
        if devices[h][3] is None:
            raise FakeNVMLError("Not Supported")
        return devices[h][3]
    m.nvmlDeviceGetCudaComputeCapability = cc
    return m
