"""`qplan run` re-plans after a first step that measured more than the estimate's band."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from qplan.profiles.gpus import GIB  # noqa: E402
from qplan.runner.trainer import check_first_step  # noqa: E402


class Monitor:
    def __init__(self, peak_gib, cuda=True):
        self.cuda, self.nvml_peak, self.sampled = cuda, int(peak_gib * GIB), 0

    def sample(self):
        self.sampled += 1


def ctx(peak_gib, limit, steps=1, cuda=True):
    return SimpleNamespace(spec=SimpleNamespace(replan_above_gib=limit),
                           steps=[(100, 0.1)] * steps, monitor=Monitor(peak_gib, cuda))


def test_a_first_step_above_the_band_stops_as_out_of_memory():
    with pytest.raises(torch.cuda.OutOfMemoryError, match="above the estimate and its uncertainty band"):
        check_first_step(ctx(peak_gib=15.2, limit=14.9))


@pytest.mark.parametrize("c", [ctx(14.0, 14.9),            # within the band
                               ctx(15.2, 14.9, steps=2),   # only the first step decides
                               ctx(15.2, None),            # no estimate (CPU, unknown model)
                               ctx(15.2, 14.9, cuda=False)])
def test_otherwise_training_goes_on(c):
    check_first_step(c)

