"""The speed model: its terms, its fitted coefficients and the fit that made them."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from qplan import api
from qplan.planner import calibration as C
from qplan.planner import speed as S
from qplan.planner.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import speed_fit  # noqa: E402

CFG = TrainConfig(seq_len=2048, batch_size=2, grad_accum=4, grad_ckpt=True)


@pytest.mark.parametrize("model", ["llama-3.1-8b", "qwen3-1.7b", "gemma-3-4b", "phi-4"])
@pytest.mark.parametrize("gpu", ["rtx-4090", "h200", "t4"])
def test_terms_add_up_to_the_step(model, gpu):
    m, g = api.get_model(model), api.get_gpu(gpu)
    cfg = CFG if g.bf16 else CFG.with_(compute_dtype="fp16")
    sp = S.estimate_speed(m, cfg, g)
    assert sum(v for _, v in sp.terms) == pytest.approx(sp.step_s, rel=1e-9)
    assert all(v >= 0 for _, v in sp.terms)
    assert sp.tokens_per_s == pytest.approx(cfg.tokens_per_step / sp.step_s)


def test_features_are_work_over_the_datasheet_rate():
    m, g = api.get_model("llama-3.1-8b"), api.get_gpu("rtx-4090")
    f = S.speed_features(m, CFG, g)
    assert set(f) == set(C.SPEED_COEFFICIENTS)
    assert f["matmul"] == pytest.approx(S.matmul_flops(m, CFG) / (g.tflops_16bit * 1e12))
    # 3 passes (checkpointing) over 32 blocks of 7 weight matrices
    assert f["linear_passes"] == 3 * 32 * 7
    # twice the GPU's rate: half the time for the rate-bound terms, the same fixed costs
    fast = type(g)(**{**g.__dict__, "tflops_16bit": 2 * g.tflops_16bit,
                      "bandwidth_gbs": 2 * g.bandwidth_gbs})
    f2 = S.speed_features(m, CFG, fast)
    assert f2["matmul"] == pytest.approx(f["matmul"] / 2)
    assert f2["dequant"] == pytest.approx(f["dequant"] / 2)
    assert f2["linear_passes"] == f["linear_passes"]


def test_no_fitted_kernel_beats_the_datasheet():
    """A coefficient below 1 on a rate-bound term would be faster than the card can go."""
    for name in ("matmul", "head", "attention"):
        assert C.SPEED_COEFFICIENTS[name] >= 1.0, name


def test_calibration_holds_the_committed_fit():
    fit = json.loads((ROOT / "benchmarks/results/speed_fit.json").read_text())
    for name, v in fit["coefficients"].items():
        assert C.SPEED_COEFFICIENTS[name] == pytest.approx(v, rel=1e-3, abs=1e-12), name
    assert C.SPEED_ERROR_MEASURED >= fit["held_out_median_abs_error"]


def test_committed_fit_is_current():
    """Rerunning the fit on the committed measurements gives the committed coefficients."""
    text, summary = speed_fit.report(speed_fit.load())
    fit = json.loads((ROOT / "benchmarks/results/speed_fit.json").read_text())
    for name, v in fit["coefficients"].items():
        assert summary["coefficients"][name] == pytest.approx(v, rel=1e-6, abs=1e-12), name
    assert (ROOT / "benchmarks/results/speed_fit.md").read_text() == text


def test_nnls_is_exact_on_a_small_problem():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.1, 1.0, size=(30, 4))
    x = np.array([2.0, 0.0, 0.5, 3.0])
    b = a @ x
    assert speed_fit.nnls(a, b) == pytest.approx(x, abs=1e-9)
    # a negative unconstrained optimum is clamped at zero
    b2 = a @ np.array([1.0, -2.0, 0.0, 0.0])
    got = speed_fit.nnls(a, b2)
    assert (got >= 0).all() and got[1] == 0


def test_uncertainty_is_wider_off_the_measured_gpu():
    m = api.get_model("qwen3-8b")
    on = S.estimate_speed(m, CFG, api.get_gpu("h200"))
    off = S.estimate_speed(m, CFG, api.get_gpu("rtx-4090"))
    assert off.uncertainty > on.uncertainty > 0
    assert "h200" in off.basis
