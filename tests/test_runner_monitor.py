"""The training process's memory monitor samples from a process of its own (a thread would
take Python's lock from the training loop: 8.7 ms a sample, measured on H200s), and still
sees peaks between samples it is asked for."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

from qplan.runner.monitor import MemoryMonitor


def test_the_sampler_process_sees_a_peak_between_readings():
    m = MemoryMonitor(cuda=False, interval_s=0.01).start()
    try:
        assert m._sampler is not None and m._sampler.poll() is None
        assert m._thread is None  # no sampling thread in the training process
        base = m.rss_peak
        block = bytearray(400 * 2**20)  # touched: resident
        for i in range(0, len(block), 4096):
            block[i] = 1
        time.sleep(0.3)
        del block
        time.sleep(0.05)
    finally:
        m.stop()
    # the in-process reading at stop() came after the block was freed: the peak is the
    # sampler's
    assert m.rss_peak - base > 300 * 2**20
    assert m._sampler is None


def test_sampler_protocol_and_end_of_input():
    p = subprocess.Popen([sys.executable, "-m", "qplan.runner.sampler", str(os.getpid()), "",
                          "0.01"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    p.stdin.write("peek\n")
    p.stdin.flush()
    got = json.loads(p.stdout.readline())
    assert got["rss"] > 0 and got["nvml"] is None  # no GPU given: resident memory only
    p.stdin.close()  # the training process is gone: the sampler ends
    assert p.wait(timeout=10) == 0


def test_a_monitor_without_its_process_falls_back_to_a_thread(monkeypatch):
    monkeypatch.setattr(MemoryMonitor, "_start_sampler", lambda self: False)
    m = MemoryMonitor(cuda=False, interval_s=0.01).start()
    try:
        assert isinstance(m._thread, threading.Thread) and m._thread.is_alive()
    finally:
        m.stop()
    assert m.rss_peak > 0
