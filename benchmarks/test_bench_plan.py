"""How long one full plan search takes (``api.suggest``): it must be milliseconds.

In the normal test run pytest-benchmark is disabled (``--benchmark-disable`` in
pyproject's addopts): each benchmark body runs once, as a test. To measure for real and
record the results:

    pytest benchmarks/test_bench_plan.py --benchmark-enable \
        --benchmark-json benchmarks/results/plan_search_benchmark.json
"""
from __future__ import annotations

import time

import pytest

from qplan import api
from qplan.errors import DoesNotFitError


@pytest.fixture(scope="module")
def llama8b():
    return api.get_model("llama-3.1-8b")


@pytest.fixture(scope="module", autouse=True)
def warm_catalogue():
    api.catalog()  # the catalogue is built once per process; time the search alone


def test_plan_search_llama8b_rtx4090(benchmark, llama8b):
    gpu = api.get_gpu("rtx-4090")
    plan = benchmark(api.suggest, llama8b, gpu, seq_len=2048)
    assert plan.memory.fits and plan.config.seq_len == 2048


def test_estimate_one_config(benchmark, llama8b):
    from qplan.planner.config import TrainConfig

    est = benchmark(api.estimate, llama8b, api.get_gpu("rtx-4090"), TrainConfig())
    assert est.memory.peak_bytes > 0


def test_does_not_fit_with_alternatives(benchmark, llama8b):
    """The slow path: nothing fits, so the nearest plans that do are searched too."""
    def run():
        try:
            return api.suggest(llama8b, api.get_gpu("2GB"), seq_len=2048)
        except DoesNotFitError as e:
            return e
    err = benchmark(run)
    assert isinstance(err, DoesNotFitError) and err.alternatives


def test_plan_search_is_milliseconds(llama8b):
    """Guard that also runs with benchmarks disabled: one search well under 100 ms."""
    gpu = api.get_gpu("rtx-4090")
    api.suggest(llama8b, gpu, seq_len=2048)
    t = time.perf_counter()
    for _ in range(5):
        api.suggest(llama8b, gpu, seq_len=2048)
    per = (time.perf_counter() - t) / 5
    assert per < 0.1, f"one plan search took {per * 1000:.0f} ms"
