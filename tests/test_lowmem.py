"""The memory-lean building blocks of ``qplan/runner/lowmem.py`` and their wiring in
``qplan/runner/techniques.py``, on CPU.

- LeanRMSNorm (``make_norms_lean``): bitwise-equal forward and matching input gradients
  against transformers' Llama and Gemma RMSNorms (float32, bf16, bf16 input with a float32
  weight), with ``NORM_ROWS`` made small so the row slicing is exercised; trained norms,
  ``no_grad`` and the classes ``rms_norm_style`` recognises.
- TiledMLP (``tiled``): same output, input gradient and parameter gradients as the untiled
  ``LlamaMLP`` with a ragged last chunk; the calls it makes; exact dropout replay.
- OffloadedCheckpoint (``offloaded_checkpoint``): same outputs and gradients as plain
  autograd (hidden state, parameters, kwargs, tuples), dropout replay and autocast replay.
- PinnedPool: buffer reuse and choice, the page-locked budget and eviction, failed
  registration and ``close``, with a fake ``torch.cuda.cudart``.
- End to end on a tiny Llama through ``load_model`` / ``prepare_for_training`` /
  ``add_lora`` / ``causal_lm_loss``: every combination of the techniques gives the plain
  run's loss and LoRA gradients, with and without LoRA dropout, in bf16 and in nf4; one
  ``train_step`` with everything on.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from fixtures import tiny_llama as TL

from qplan.planner.config import TrainConfig
from qplan.profiles.models import ModelProfile
from qplan.runner import lowmem
from qplan.runner import techniques as T

pytestmark = pytest.mark.slow

HIDDEN = 64


def gen(seed: int):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int = 0, dtype=torch.float32, scale: float = 1.0):
    return (torch.randn(*shape, generator=gen(seed)) * scale).to(dtype)


def rel_err(a, b) -> float:
    """max |a - b| / max |b| (b must not be all zeros)."""
    a, b = a.float(), b.float()
    assert b.abs().max() > 0, "reference is all zeros: the comparison would prove nothing"
    return float((a - b).abs().max() / b.abs().max())


def assert_within_one_ulp(a, b):
    """bf16/fp16 tensors that differ by at most one unit in the last place."""
    assert a.dtype == b.dtype and a.shape == b.shape
    af, bf = a.float(), b.float()
    ulp = torch.finfo(a.dtype).eps * torch.maximum(af.abs(), bf.abs())
    tiny = torch.finfo(a.dtype).tiny
    bad = (af - bf).abs() > ulp + tiny
    assert not bad.any(), f"{int(bad.sum())} elements differ by more than one ulp"


# ---------------------------------------------------------------------------
# LeanRMSNorm
@pytest.fixture
def small_rows(monkeypatch):
    """Seven rows per slice, so every test tensor is cut into several ragged slices."""
    monkeypatch.setattr(lowmem, "NORM_ROWS", 7)
    monkeypatch.setattr(lowmem, "NORM_ELEMENTS", 0)


def test_narrow_norms_take_more_rows_a_slice():
    """A per-head q/k norm (128 wide) is sliced by elements, not 4,096 rows: a Qwen3 q norm
    of 16k tokens x 32 heads is 4 slices, not 128; 4,096-wide and wider norms keep 4,096."""
    assert lowmem.norm_slice_rows(4096) == 4096 and lowmem.norm_slice_rows(5120) == 4096
    assert lowmem.norm_slice_rows(128) == 4096 * 32
    assert -(-16384 * 32 // lowmem.norm_slice_rows(128)) == 4
    assert all(lowmem.norm_slice_rows(w) * w <= lowmem.NORM_ELEMENTS for w in (64, 128, 256, 576))


def _norm_class(module: str, name: str):
    import importlib

    try:
        return getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"),
                       name)
    except (ImportError, AttributeError):
        pytest.skip(f"transformers has no {name}")


def llama_norm(dtype=torch.float32, seed=1):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    m = LlamaRMSNorm(HIDDEN, eps=1e-5)
    with torch.no_grad():
        m.weight.copy_(1 + randn(HIDDEN, seed=seed, scale=0.3))
    m.weight.requires_grad_(False)
    return m.to(dtype)


def gemma2_norm(dtype=torch.float32, seed=2):
    """Gemma's formula: ``(n * (1 + w.float())).type_as(x)``."""
    m = _norm_class("gemma2", "Gemma2RMSNorm")(HIDDEN, eps=1e-6)
    with torch.no_grad():
        m.weight.copy_(randn(HIDDEN, seed=seed, scale=0.3))
    m.weight.requires_grad_(False)
    return m.to(dtype)


def lean_copy(module):
    import copy

    m = copy.deepcopy(module)
    assert lowmem.make_norms_lean(m) == 1
    assert m._qplan_lean
    return m


def norm_case(module, x, seed=9):
    """(forward, input gradient) of ``module`` for the upstream gradient of seed ``seed``."""
    x = x.detach().clone().requires_grad_()
    y = module(x)
    gy = randn(*y.shape, seed=seed).to(y.dtype)
    y.backward(gy)
    return y.detach(), x.grad


SHAPES = [(3, 20, HIDDEN), (45, HIDDEN), (2, 2, 9, HIDDEN), (1, 7, HIDDEN)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lean_llama_norm_matches_transformers(small_rows, shape, dtype):
    ref = llama_norm(dtype)
    lean = lean_copy(ref)
    x = randn(*shape, seed=3, dtype=dtype, scale=2.0)
    y_ref, g_ref = norm_case(ref, x)
    y, g = norm_case(lean, x)
    assert y.dtype == y_ref.dtype == dtype
    assert torch.equal(y, y_ref)  # bitwise
    if dtype == torch.float32:
        assert rel_err(g, g_ref) < 1e-5
    else:
        assert g.dtype == torch.bfloat16
        assert_within_one_ulp(g, g_ref)


@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lean_gemma_norm_matches_transformers(small_rows, shape, dtype):
    ref = gemma2_norm(dtype)
    lean = lean_copy(ref)
    assert lowmem.rms_norm_style(ref) == "gemma"
    x = randn(*shape, seed=4, dtype=dtype, scale=2.0)
    y_ref, g_ref = norm_case(ref, x)
    y, g = norm_case(lean, x)
    assert y.dtype == dtype
    assert torch.equal(y, y_ref)
    if dtype == torch.float32:
        assert rel_err(g, g_ref) < 1e-5
    else:
        assert_within_one_ulp(g, g_ref)


def test_lean_norm_bf16_input_float32_weight(small_rows):
    """Norm weights cast to float32 (peft's kbit preparation) with a bf16 input: transformers
    returns float32 (``w * n.to(bf16)`` promotes), so must the lean norm."""
    ref = llama_norm(torch.float32)
    lean = lean_copy(ref)
    x = randn(4, 11, HIDDEN, seed=5, dtype=torch.bfloat16, scale=2.0)
    y_ref, g_ref = norm_case(ref, x)
    y, g = norm_case(lean, x)
    assert y.dtype == torch.float32 and torch.equal(y, y_ref)
    assert g.dtype == torch.bfloat16
    assert_within_one_ulp(g, g_ref)


def test_lean_norm_non_contiguous_input(small_rows):
    ref = llama_norm()
    lean = lean_copy(ref)
    x = randn(13, 3, HIDDEN, seed=6).transpose(0, 1)  # (3, 13, H), rows not contiguous
    assert not x.is_contiguous()
    y_ref, g_ref = norm_case(ref, x)
    y, g = norm_case(lean, x)
    assert torch.equal(y, y_ref)
    assert rel_err(g, g_ref) < 1e-5


def test_lean_norm_saves_only_input_and_one_scale_per_row(small_rows):
    """What the point of the lean norm is: no float32 copy of a 16-bit input is saved."""
    lean = lean_copy(llama_norm(torch.bfloat16))
    x = randn(3, 20, HIDDEN, seed=7, dtype=torch.bfloat16).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lean(x)
    big = [t for t in saved if t.numel() == x.numel()]
    assert len(big) == 1 and big[0].dtype == torch.bfloat16
    assert sum(t.numel() * t.element_size() for t in saved if t.numel() != HIDDEN) == \
        x.numel() * 2 + 60 * 4


def test_lean_norm_under_no_grad(small_rows):
    for ref in (llama_norm(torch.bfloat16), gemma2_norm(torch.bfloat16)):
        lean = lean_copy(ref)
        x = randn(3, 20, HIDDEN, seed=8, dtype=torch.bfloat16)
        with torch.no_grad():
            y, y_ref = lean(x), ref(x)
        assert not y.requires_grad
        assert torch.equal(y, y_ref)


def test_trained_norm_falls_back_to_transformers(small_rows):
    ref = llama_norm()
    ref.weight.requires_grad_(True)
    lean = lean_copy(ref)
    x = randn(2, 10, HIDDEN, seed=9).requires_grad_()
    y_ref, g_ref = norm_case(ref, x)
    y, g = norm_case(lean, x)
    assert torch.equal(y, y_ref) and torch.equal(g, g_ref)
    assert lean.weight.grad is not None
    assert torch.equal(lean.weight.grad, ref.weight.grad)


def test_make_norms_lean_counts_and_is_idempotent():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaModel

    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaModel(cfg)
    assert lowmem.make_norms_lean(model) == 2 * 2 + 1  # two per block, one final
    assert lowmem.make_norms_lean(model) == 0


def test_rms_norm_style():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    assert lowmem.rms_norm_style(LlamaRMSNorm(8)) == "llama"
    assert lowmem.rms_norm_style(gemma2_norm()) == "gemma"
    assert lowmem.rms_norm_style(torch.nn.LayerNorm(8)) is None
    assert lowmem.rms_norm_style(torch.nn.RMSNorm(8)) is None  # torch's: unknown formula
    assert lowmem.rms_norm_style(torch.nn.Linear(8, 8)) is None
    nn = torch.nn.LayerNorm(8)
    assert lowmem.make_norms_lean(torch.nn.Sequential(nn, torch.nn.Linear(8, 8))) == 0
    assert not hasattr(nn, "_qplan_lean")


# Norms named like the ones qplan knows but computing otherwise: Gemma3n and Gemma4 scale by
# w (not 1 + w); Olmo2 and GPT-OSS cast after multiplying by w. rms_norm_style must refuse
# them (it checks the lean forward against the module's own on a probe input).
OTHER_FORMULAS = {"gemma3n", "gemma4", "olmo2", "gpt_oss"}


@pytest.mark.parametrize("module,name", [
    ("llama", "LlamaRMSNorm"), ("mistral", "MistralRMSNorm"), ("qwen2", "Qwen2RMSNorm"),
    ("qwen3", "Qwen3RMSNorm"), ("phi3", "Phi3RMSNorm"), ("mixtral", "MixtralRMSNorm"),
    ("gemma", "GemmaRMSNorm"), ("gemma2", "Gemma2RMSNorm"), ("gemma3", "Gemma3RMSNorm"),
    ("gemma3n", "Gemma3nRMSNorm"), ("gemma4", "Gemma4RMSNorm"), ("olmo2", "Olmo2RMSNorm"),
    ("gpt_oss", "GptOssRMSNorm"),
])
def test_every_recognised_norm_keeps_its_forward(module, name):
    """Whatever norm ``rms_norm_style`` accepts, the lean replacement must compute the same
    thing (the catalogue's families first, then other transformers models it also accepts)."""
    cls = _norm_class(module, name)
    ref = cls(HIDDEN, eps=1e-6)
    with torch.no_grad():  # weights as after training: neither all ones nor all zeros
        ref.weight.add_(randn(HIDDEN, seed=11, scale=0.3))
    ref = ref.to(torch.bfloat16).requires_grad_(False)
    if module in OTHER_FORMULAS:
        assert lowmem.rms_norm_style(ref) is None
        assert lowmem.make_norms_lean(torch.nn.Sequential(ref)) == 0
        return
    assert lowmem.rms_norm_style(ref) is not None
    lean = lean_copy(ref)
    x = randn(2, 16, HIDDEN, seed=12, dtype=torch.bfloat16, scale=2.0)
    with torch.no_grad():
        assert torch.equal(lean(x), ref(x))


# ---------------------------------------------------------------------------
# TiledMLP
def llama_mlp(seed=0):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(seed)
    mlp = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=64))
    mlp.up_proj.weight.requires_grad_(False)  # some trainable, some frozen
    return mlp


def autocast_if(on: bool):
    import contextlib

    return torch.autocast("cpu", dtype=torch.bfloat16) if on else contextlib.nullcontext()


def mlp_run(forward, mlp, x, seed=21, autocast=False):
    """(output, input gradient, {trainable parameter: gradient}); forward under bf16
    autocast if asked, backward outside it (as ``train_step`` does)."""
    mlp.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    with autocast_if(autocast):
        y = forward(x)
    y.backward(randn(*y.shape, seed=seed).to(y.dtype))
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in mlp.named_parameters()
                                if p.requires_grad}


@pytest.mark.parametrize("seq,rows", [(23, 5), (17, 16), (40, 8)])
def test_tiled_mlp_matches_untiled(seq, rows):
    mlp = llama_mlp()
    x = randn(2, seq, 32, seed=20)
    y_ref, g_ref, p_ref = mlp_run(mlp.forward, mlp, x)
    y, g, p = mlp_run(lowmem.tiled(mlp.forward, rows), mlp, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)
    assert p.keys() == p_ref.keys() == {"gate_proj.weight", "down_proj.weight"}
    for k in p:
        torch.testing.assert_close(p[k], p_ref[k], rtol=1e-5, atol=1e-6)


def test_tiled_mlp_frozen_input_still_trains_parameters():
    # The MLP's parameters are inside the callable, not inputs of TiledMLP: gradients reach
    # them through .backward() (accumulated into .grad, as reentrant checkpointing does),
    # also when the input itself does not require grad.
    mlp = llama_mlp()
    x = randn(2, 23, 32, seed=22)  # does not require grad
    gy = randn(2, 23, 32, seed=23)
    params = [mlp.gate_proj.weight, mlp.down_proj.weight]
    mlp(x).backward(gy)
    ref = [p.grad.clone() for p in params]
    mlp.zero_grad(set_to_none=True)
    y = lowmem.tiled(mlp.forward, 5)(x)
    assert y.requires_grad
    y.backward(gy)
    for p, want in zip(params, ref):
        torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-6)


def test_tiled_mlp_replays_autocast():
    """Forward under bf16 autocast, backward outside it: the recomputation must run under
    autocast again. A bf16 input (as in a bf16 model) is compared exactly with the same
    chunks under plain autograd; a float32 one loosely with the untiled MLP (bf16 matmuls
    over other row counts round differently)."""
    mlp = llama_mlp()
    x = randn(2, 23, 32, seed=24)

    def by_hand(z):
        return torch.cat([mlp(z[:, i:i + 5]) for i in range(0, 23, 5)], dim=1)

    xb = x.to(torch.bfloat16)
    y_ref, g_ref, p_ref = mlp_run(by_hand, mlp, xb, autocast=True)
    y, g, p = mlp_run(lowmem.tiled(mlp.forward, 5), mlp, xb, autocast=True)
    assert y.dtype == y_ref.dtype == g.dtype == torch.bfloat16
    assert torch.equal(y, y_ref) and torch.equal(g, g_ref)
    # (the reference sums its chunks' weight gradients in bf16 through autocast's cached
    # weight cast; the tiled backward sums them in float32: close, not equal)
    for k in p:
        assert rel_err(p[k], p_ref[k]) < 2e-2

    y_un, g_un, p_un = mlp_run(mlp.forward, mlp, x, autocast=True)
    y, g, p = mlp_run(lowmem.tiled(mlp.forward, 5), mlp, x, autocast=True)
    assert torch.equal(y, y_un)
    assert rel_err(g, g_un) < 2e-2
    for k in p:
        assert rel_err(p[k], p_un[k]) < 2e-2


class Recorder:
    """An MLP forward that records the input of each call."""

    def __init__(self, mlp):
        self.mlp, self.calls = mlp, []

    def __call__(self, x):
        self.calls.append(x)
        return self.mlp(x)


def test_tiled_mlp_chunks_and_recomputes_each_chunk_once():
    rec = Recorder(llama_mlp())
    x = randn(2, 23, 32, seed=25, scale=1.0).requires_grad_()
    y = lowmem.tiled(rec, 5)(x)
    assert [c.shape[1] for c in rec.calls] == [5, 5, 5, 5, 3]
    y.sum().backward()
    assert [c.shape[1] for c in rec.calls] == [5, 5, 5, 5, 3] * 2


def test_tiled_mlp_no_grad_runs_plain_chunks():
    rec = Recorder(llama_mlp())
    x = randn(2, 23, 32, seed=26)
    with torch.no_grad():
        y = lowmem.tiled(rec, 5)(x)
        y_ref = rec.mlp(x)
    assert not y.requires_grad
    assert [c.shape[1] for c in rec.calls] == [5, 5, 5, 5, 3]
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 5, 32), (2, 4, 32), (10, 32)])
def test_tiled_mlp_calls_through_when_short_or_not_3d(shape):
    rec = Recorder(llama_mlp())
    x = randn(*shape, seed=27).requires_grad_()
    y = lowmem.tiled(rec, 5)(x)
    assert len(rec.calls) == 1 and rec.calls[0] is x
    assert "TiledMLP" not in type(y.grad_fn).__name__


class DropMLP(torch.nn.Module):
    """Dropout on the input, then the MLP: LoRA dropout in miniature."""

    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp

    def forward(self, x):
        return self.mlp(F.dropout(x, 0.5, training=True))


def _dropout_runs(preserve_rng):
    mlp = DropMLP(llama_mlp())
    x = randn(2, 23, 32, seed=28)
    gy = randn(2, 23, 32, seed=29)
    # reference: the same chunks, in the same order, from the same seed, all under autograd
    torch.manual_seed(1234)
    xr = x.clone().requires_grad_()
    y_ref = torch.cat([mlp(xr[:, i:i + 5]) for i in range(0, 23, 5)], dim=1)
    y_ref.backward(gy)
    ref = (y_ref.detach(), xr.grad, mlp.mlp.gate_proj.weight.grad.clone())
    mlp.zero_grad(set_to_none=True)
    torch.manual_seed(1234)
    xt = x.clone().requires_grad_()
    y = lowmem.tiled(mlp.forward, 5, preserve_rng=preserve_rng)(xt)
    torch.rand(100)  # whatever runs between forward and backward moves the generator
    after_forward = torch.get_rng_state()
    y.backward(gy)
    return ref, (y.detach(), xt.grad, mlp.mlp.gate_proj.weight.grad.clone()), \
        (after_forward, torch.get_rng_state())


def test_tiled_mlp_replays_dropout_exactly():
    ref, got, (rng_fwd, rng_bwd) = _dropout_runs(preserve_rng=True)
    assert torch.equal(got[0], ref[0])  # same masks in forward
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-6)
    assert torch.equal(rng_fwd, rng_bwd)  # the replay leaves the RNG where it was


def test_tiled_mlp_without_rng_replay_would_differ():
    """The check above can fail: without the replay, backward draws new masks."""
    ref, got, _ = _dropout_runs(preserve_rng=False)
    assert torch.equal(got[0], ref[0])
    assert rel_err(got[1], ref[1]) > 0.1


# ---------------------------------------------------------------------------
# OffloadedCheckpoint
def ckpt(preserve_rng=False):
    pool = lowmem.PinnedPool(pinned=False)
    f = lowmem.offloaded_checkpoint(pool, preserve_rng=preserve_rng)
    assert f.pool is pool
    return f


class Block(torch.nn.Module):
    def __init__(self, dropout=0.0):
        super().__init__()
        self.a = torch.nn.Linear(16, 32)
        self.b = torch.nn.Linear(32, 16)
        self.a.weight.requires_grad_(False)  # frozen base, trainable rest
        self.dropout = dropout
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(randn(*p.shape, seed=p.numel(), scale=0.3))

    def forward(self, h, scale=1.0):
        z = F.silu(self.a(h))
        if self.dropout:
            z = F.dropout(z, self.dropout, training=True)
        return h + scale * self.b(z)


def block_run(block, h, checkpoint=None, seed=None, autocast=False, **kw):
    """(output, hidden gradient or None, gradient of b.weight); forward under bf16 autocast
    if asked, backward outside it."""
    block.zero_grad(set_to_none=True)
    if seed is not None:
        torch.manual_seed(seed)
    with autocast_if(autocast):
        out = block(h, **kw) if checkpoint is None else checkpoint(block.forward, h, **kw)
    out.backward(randn(*out.shape, seed=31).to(out.dtype))
    return out.detach(), h.grad, block.b.weight.grad.clone()


def hidden(seed=30, requires_grad=True):
    return randn(2, 9, 16, seed=seed).requires_grad_(requires_grad)


def test_offloaded_checkpoint_matches_autograd():
    block = Block()
    y_ref, gh_ref, gw_ref = block_run(block, hidden())
    y, gh, gw = block_run(block, hidden(), ckpt())
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(gh, gh_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-6, atol=1e-7)
    assert block.a.weight.grad is None and block.b.bias.grad is not None


def test_offloaded_checkpoint_saves_no_activations():
    block = Block()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ckpt()(block.forward, hidden())
    assert saved == []  # the block's input is kept by the function itself (host copy)


def test_offloaded_checkpoint_keeps_its_own_copy_of_the_input():
    """The block's input is offloaded (copied) at forward: changing the tensor in place
    afterwards does not change what backward recomputes."""
    block = Block()
    _, gh_ref, gw_ref = block_run(block, hidden())
    block.zero_grad(set_to_none=True)
    h = hidden()
    out = ckpt()(block.forward, h)
    with torch.no_grad():
        h.mul_(-3.0)
    out.backward(randn(*out.shape, seed=31))
    torch.testing.assert_close(h.grad, gh_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(block.b.weight.grad, gw_ref, rtol=1e-6, atol=1e-7)


def test_offloaded_checkpoint_hidden_without_grad_still_trains_parameters():
    block = Block()
    y_ref, _, gw_ref = block_run(block, hidden(requires_grad=False))
    h = hidden(requires_grad=False)
    y, _, gw = block_run(block, h, ckpt())
    assert h.grad is None and not h.requires_grad
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-6, atol=1e-7)


def test_offloaded_checkpoint_binds_kwargs():
    block = Block()
    y_ref, gh_ref, gw_ref = block_run(block, hidden(), scale=-2.5)
    y, gh, gw = block_run(block, hidden(), ckpt(), scale=-2.5)
    y1, _, _ = block_run(block, hidden(), ckpt())
    assert torch.equal(y, y_ref) and not torch.equal(y, y1)
    torch.testing.assert_close(gh, gh_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-6, atol=1e-7)


def test_offloaded_checkpoint_extra_positional_args_and_tuple_outputs():
    block = Block()
    extra = randn(2, 9, 16, seed=32)

    def run(h, e):
        out = block(h) * e
        return out, out.sum(dim=-1)

    def loss(outs):
        return (outs[0] * randn(2, 9, 16, seed=33)).sum() + outs[1].pow(2).sum()

    h = hidden()
    loss(run(h, extra)).backward()
    gh_ref, gw_ref = h.grad, block.b.weight.grad.clone()
    block.zero_grad(set_to_none=True)
    h = hidden()
    outs = ckpt()(run, h, extra)
    assert isinstance(outs, tuple) and len(outs) == 2
    loss(outs).backward()
    torch.testing.assert_close(h.grad, gh_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(block.b.weight.grad, gw_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("preserve_rng", [True, False])
def test_offloaded_checkpoint_dropout_replay(preserve_rng):
    block = Block(dropout=0.5)
    y_ref, gh_ref, gw_ref = block_run(block, hidden(), seed=77)
    y, gh, gw = block_run(block, hidden(), ckpt(preserve_rng), seed=77)
    assert torch.equal(y, y_ref)  # the forward draws the same masks either way
    if preserve_rng:
        torch.testing.assert_close(gh, gh_ref, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(gw, gw_ref, rtol=1e-6, atol=1e-7)
    else:  # the check above can fail: without replay the recomputation's masks differ
        assert rel_err(gw, gw_ref) > 0.1


def test_offloaded_checkpoint_replays_autocast():
    block = Block()
    y_ref, gh_ref, gw_ref = block_run(block, hidden(), autocast=True)
    y, gh, gw = block_run(block, hidden(), ckpt(), autocast=True)
    assert y.dtype == y_ref.dtype == torch.float32  # h (fp32) + bf16 product
    assert torch.equal(y, y_ref)
    assert torch.equal(gh, gh_ref) and torch.equal(gw, gw_ref)
    # without autocast the recomputation would be float32 and the gradients differ
    _, _, gw32 = block_run(block, hidden())
    assert not torch.equal(gw32, gw_ref)


# ---------------------------------------------------------------------------
# PinnedPool
class FakeCudart:
    """Stands in for ``torch.cuda.cudart()``: register returns the queued codes (0 when the
    queue is empty) and both calls are recorded."""

    def __init__(self, codes=()):
        self.codes = list(codes)
        self.registered: dict[int, int] = {}
        self.calls: list[tuple] = []

    def cudaHostRegister(self, ptr, nbytes, flags):
        self.calls.append(("register", ptr, nbytes))
        rc = self.codes.pop(0) if self.codes else 0
        if rc == 0:
            assert ptr not in self.registered
            self.registered[ptr] = nbytes
        return rc

    def cudaHostUnregister(self, ptr):
        self.calls.append(("unregister", ptr))
        assert ptr in self.registered, "unregistering memory that was never registered"
        del self.registered[ptr]
        return 0


@pytest.fixture
def cudart(monkeypatch):
    fake = FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    return fake


def like(nbytes, dtype=torch.uint8):
    return torch.empty(nbytes // torch.empty(0, dtype=dtype).element_size(), dtype=dtype)


def test_pool_take_gives_the_requested_shape_and_dtype():
    pool = lowmem.PinnedPool(pinned=False)
    t = torch.empty(3, 5, 7, dtype=torch.bfloat16)
    host, buf, pinned = pool.take(t)
    assert host.shape == t.shape and host.dtype == t.dtype and host.device.type == "cpu"
    assert buf.dtype == torch.uint8 and buf.numel() == t.numel() * 2
    assert host.data_ptr() == buf.data_ptr() and pinned is False
    host.copy_(randn(3, 5, 7, seed=40, dtype=torch.bfloat16))  # writable, contiguous
    assert host.is_contiguous()


def test_pool_reuses_a_given_buffer():
    pool = lowmem.PinnedPool(pinned=False)
    _, buf, _ = pool.take(like(400))
    pool.give(buf)
    host, buf2, _ = pool.take(torch.empty(10, 10, dtype=torch.float32))
    assert buf2 is buf and host.data_ptr() == buf.data_ptr() and pool.free == []
    _, buf3, _ = pool.take(like(400))
    assert buf3 is not buf  # in use: a new one


def test_pool_prefers_the_smallest_fitting_buffer_over_a_larger_one():
    pool = lowmem.PinnedPool(pinned=False)
    bufs = {n: pool.take(like(n))[1] for n in (160, 300, 100)}
    for b in bufs.values():
        pool.give(b)
    _, got, _ = pool.take(like(150))
    assert got is bufs[160]  # 300 fits too; 100 does not
    _, got, _ = pool.take(like(400))  # nothing fits: a new buffer, the free ones stay
    assert all(got is not b for b in bufs.values()) and got.numel() == 400
    assert [b.numel() for b in pool.free] == [300, 100]


# Buffers of several sizes in the free list: the chosen one is removed by identity (a
# list.remove would compare tensors with ==, which raises for unequal sizes).
def test_pool_takes_the_smallest_free_buffer_that_fits():
    pool = lowmem.PinnedPool(pinned=False)
    bufs = {n: pool.take(like(n))[1] for n in (100, 300, 200, 160)}
    for b in bufs.values():
        pool.give(b)
    _, got, _ = pool.take(like(150))
    assert got is bufs[160]
    _, got, _ = pool.take(like(150))
    assert got is bufs[200]
    assert [b.numel() for b in pool.free] == [100, 300]


def test_pool_tracks_bytes_in_use_and_the_peak():
    pool = lowmem.PinnedPool(pinned=False)
    _, a, _ = pool.take(like(100))
    _, b, _ = pool.take(like(200))
    assert (pool.in_use_bytes, pool.peak_in_use_bytes) == (300, 300)
    pool.give(a)
    assert (pool.in_use_bytes, pool.peak_in_use_bytes) == (200, 300)
    _, c, _ = pool.take(like(40))  # reuses a: counts its whole 100 bytes
    assert c is a and (pool.in_use_bytes, pool.peak_in_use_bytes) == (300, 300)
    _, d, _ = pool.take(like(400))
    assert (pool.in_use_bytes, pool.peak_in_use_bytes) == (700, 700)
    for x in (b, c, d):
        pool.give(x)
    assert (pool.in_use_bytes, pool.peak_in_use_bytes) == (0, 700)


def test_pool_pins_with_cuda_host_register(cudart):
    pool = lowmem.PinnedPool(pinned=True)
    _, buf, pinned = pool.take(like(256))
    assert pinned and pool.is_pinned(buf)
    assert cudart.calls == [("register", buf.data_ptr(), 256)]
    assert pool.allocated_bytes == 256
    pool.give(buf)
    _, again, pinned = pool.take(like(256))
    assert again is buf and pinned and len(cudart.calls) == 1  # reused, not re-registered


def test_pool_never_pins_more_than_its_limit(cudart):
    pool = lowmem.PinnedPool(limit_bytes=1000, pinned=True)
    took = [pool.take(like(400)) for _ in range(3)]
    assert [p for _, _, p in took] == [True, True, False]  # the third would exceed 1000
    assert pool.allocated_bytes == 800 == sum(cudart.registered.values())
    pool.give(took[0][1])
    # 600 fits no free buffer; pinning it needs room: the free (pinned) 400 is evicted
    _, _, pinned = pool.take(like(600))
    assert pinned and ("unregister", took[0][1].data_ptr()) in cudart.calls
    assert pool.free == [] and pool.allocated_bytes == 1000
    assert sum(cudart.registered.values()) == pool.allocated_bytes <= 1000
    # in-use buffers are never evicted: now nothing is free, so pageable memory
    _, more, pinned = pool.take(like(100))
    assert not pinned and not pool.is_pinned(more) and pool.allocated_bytes == 1000
    assert not pool.pinned_failed


@pytest.mark.parametrize("sizes", [
    [600],
    [200, 400, 600, 800],
], ids=["same-shapes", "varying-shapes"])
def test_pool_registered_bytes_stay_within_the_limit_over_many_steps(cudart, sizes):
    import random

    rnd = random.Random(0)
    pool = lowmem.PinnedPool(limit_bytes=3000, pinned=True)
    for _ in range(30):  # steps of six blocks, taken in forward and given back in backward
        held = [pool.take(like(rnd.choice(sizes)))[1] for _ in range(6)]
        assert sum(cudart.registered.values()) == pool.allocated_bytes <= 3000
        assert set(pool.registered) == set(cudart.registered)
        for b in reversed(held):
            pool.give(b)
    assert pool.in_use_bytes == 0
    pool.close()
    assert cudart.registered == {} and pool.registered == {} and pool.allocated_bytes == 0


def test_pool_turns_pageable_when_pinning_fails(cudart):
    cudart.codes = [0, 2]  # the second registration is refused
    pool = lowmem.PinnedPool(pinned=True)
    _, a, pa = pool.take(like(64))
    _, _, pb = pool.take(like(64))
    assert (pa, pb) == (True, False) and pool.pinned_failed
    _, _, pc = pool.take(like(64))
    assert not pc and [k for k, *_ in cudart.calls] == ["register", "register"]  # not tried
    assert pool.allocated_bytes == 64 and set(pool.registered) == {a.data_ptr()}


def test_pool_close_unregisters_everything(cudart):
    pool = lowmem.PinnedPool(pinned=True)
    bufs = [pool.take(like(n))[1] for n in (64, 128, 256)]
    for b in bufs:
        pool.give(b)
    pool.close()
    assert cudart.registered == {} and pool.registered == {}
    assert pool.free == [] and pool.allocated_bytes == 0
    assert sorted(c[1] for c in cudart.calls if c[0] == "unregister") == \
        sorted(b.data_ptr() for b in bufs)


def test_pool_without_pinning_never_calls_cuda(cudart):
    pool = lowmem.PinnedPool(limit_bytes=10_000, pinned=False)
    _, b, pinned = pool.take(like(512))
    pool.give(b)
    pool.close()
    assert not pinned and cudart.calls == []


# ---------------------------------------------------------------------------
# end to end on a tiny Llama
SEQ = 40


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = TL.build(tmp_path_factory.mktemp("tiny") / "tiny", hidden=HIDDEN, layers=2)
    prof = ModelProfile.from_config_dict(json.loads((path / "config.json").read_text()),
                                         name="tiny")
    ids = torch.randint(4, prof.vocab_size, (2, SEQ), generator=gen(1))
    return path, prof, ids


def config(**kw) -> TrainConfig:
    base = {"seq_len": SEQ, "lora_rank": 4, "lora_alpha": 8, "loss": "fused", "quant": "none",
            "optim": "adamw_torch", "grad_ckpt": False}
    return TrainConfig(**{**base, **kw})


def build_model(tiny, cfg):
    path, prof, _ = tiny
    model = T.load_model(str(path), cfg)
    T.prepare_for_training(model, cfg)
    torch.manual_seed(0)  # peft draws lora_A from the global generator
    model = T.add_lora(model, prof, cfg)
    # peft starts lora_B at zero, which would leave lora_A without gradient: start both
    # from the same random values in every run instead
    g = gen(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def graph_nodes(t) -> set[str]:
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names


def chunk_mlps_by_hand(model, rows):
    """Run each MLP over chunks of ``rows`` tokens under plain autograd: the dropout masks
    a tiled MLP draws (one per chunk), without its recomputation."""
    for layer in model.get_base_model().model.layers:
        def forward(x, _f=layer.mlp.forward):
            return torch.cat([_f(x[:, i:i + rows]) for i in range(0, x.shape[1], rows)], dim=1)

        layer.mlp.forward = forward


def loss_and_grads(tiny, cfg, seed=5, by_hand=0):
    _, _, ids = tiny
    model = build_model(tiny, cfg)
    if by_hand:
        chunk_mlps_by_hand(model, by_hand)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = T.causal_lm_loss(model, cfg, ids, ids)
    nodes = graph_nodes(loss)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    return model, loss.detach(), grads, nodes


def assert_same_training(got, ref):
    _, loss, grads, _ = got
    _, loss_ref, grads_ref, _ = ref
    assert torch.isfinite(loss_ref)
    assert torch.equal(loss, loss_ref)
    assert grads.keys() == grads_ref.keys()
    errs = {k: rel_err(grads[k], grads_ref[k]) for k in grads}
    worst = max(errs, key=errs.get)
    assert errs[worst] < 2e-2, f"{worst}: relative error {errs[worst]:.3g}"


def assert_wired(model, cfg, nodes):
    base = model.get_base_model()
    layers = base.model.layers
    offload = cfg.grad_ckpt and cfg.offload_activations
    pool = getattr(base, "_qplan_offload_pool", None)
    assert (pool is not None) == offload
    for layer in layers:
        assert bool(layer.gradient_checkpointing) == cfg.grad_ckpt
        fn = getattr(layer, "_gradient_checkpointing_func", None)
        if offload:
            assert fn.pool is pool
        else:
            assert not hasattr(fn, "pool")
        assert getattr(layer.mlp, "_qplan_tiled", False) == bool(cfg.mlp_chunk)
    norms = [m for m in base.modules() if type(m).__name__.endswith("RMSNorm")]
    assert len(norms) == 2 * len(layers) + 1
    assert all(getattr(m, "_qplan_lean", False) == cfg.recompute_norms for m in norms)
    emb = base.get_input_embeddings()
    assert getattr(emb, "_qplan_on_cpu", False) == cfg.embed_on_cpu
    # and they ran: their autograd nodes are in the loss's graph (a block checkpointed by
    # OffloadedCheckpoint hides its insides; the final norm is outside every block)
    assert ("OffloadedCheckpointBackward" in nodes) == offload
    assert ("LeanRMSNormBackward" in nodes) == cfg.recompute_norms
    assert ("TiledMLPBackward" in nodes) == (bool(cfg.mlp_chunk) and not offload)


@pytest.fixture(scope="module")
def plain(tiny):
    return loss_and_grads(tiny, config())


COMBOS = {
    "ckpt": {"grad_ckpt": True},
    "offload": {"grad_ckpt": True, "offload_activations": True},
    "offload-without-ckpt": {"offload_activations": True},  # offload needs checkpointing
    "norms": {"recompute_norms": True},
    "mlp": {"mlp_chunk": 16},
    "embed-cpu": {"embed_on_cpu": True},
    "ckpt-norms-mlp": {"grad_ckpt": True, "recompute_norms": True, "mlp_chunk": 16},
    "offload-norms": {"grad_ckpt": True, "offload_activations": True, "recompute_norms": True},
    "offload-mlp": {"grad_ckpt": True, "offload_activations": True, "mlp_chunk": 16},
    "all": {"grad_ckpt": True, "offload_activations": True, "recompute_norms": True,
            "mlp_chunk": 16, "embed_on_cpu": True},
}


@pytest.mark.parametrize("combo", list(COMBOS))
def test_techniques_keep_loss_and_lora_gradients(tiny, plain, combo):
    cfg = config(**COMBOS[combo])
    got = loss_and_grads(tiny, cfg)
    assert_wired(got[0], cfg, got[3])
    assert_same_training(got, plain)


def test_plain_run_uses_none_of_the_techniques(plain):
    assert_wired(plain[0], config(), plain[3])


def test_techniques_are_applied_once(tiny):
    cfg = config(**COMBOS["all"])
    model = build_model(tiny, cfg)
    assert T.tile_mlp(model, cfg) == 0
    assert lowmem.make_norms_lean(model) == 0
    pool = lowmem.PinnedPool(pinned=False)
    assert T.offload_block_inputs(model, cfg, pool=pool) == 2
    assert model._qplan_offload_pool is pool
    assert all(layer._gradient_checkpointing_func.pool is pool
               for layer in model.get_base_model().model.layers)


@pytest.mark.parametrize("combo", ["offload-norms", "mlp", "ckpt-norms-mlp", "all"])
def test_techniques_replay_lora_dropout(tiny, plain, combo):
    """With LoRA dropout the masks drawn in forward must be drawn again in every
    recomputation. A tiled MLP draws one mask per chunk, so when the MLP is tiled the
    reference runs its chunks by hand under plain autograd."""
    cfg = config(lora_dropout=0.1, **COMBOS[combo])
    ref = loss_and_grads(tiny, config(lora_dropout=0.1), by_hand=cfg.mlp_chunk)
    got = loss_and_grads(tiny, cfg)
    assert_wired(got[0], cfg, got[3])
    assert_same_training(got, ref)
    down_b = "base_model.model.model.layers.0.mlp.down_proj.lora_B.default.weight"
    assert rel_err(got[2][down_b], plain[2][down_b]) > 0.05  # dropout did act


@pytest.mark.parametrize("grad_ckpt", [
    True,
    False,
], ids=["ckpt", "no-ckpt"])
def test_tiled_mlp_with_lora_on_the_mlp_only(tiny, grad_ckpt):
    """LoRA on gate/up/down only (``--targets gate,up,down``): the blocks' MLP inputs come
    from frozen weights alone."""
    mlp_only = {"lora_targets": ("gate", "up", "down"), "grad_ckpt": grad_ckpt}
    ref = loss_and_grads(tiny, config(**mlp_only))
    cfg = config(mlp_chunk=16, **mlp_only)
    got = loss_and_grads(tiny, cfg)
    assert_wired(got[0], cfg, got[3])
    assert_same_training(got, ref)


@pytest.fixture(scope="module")
def nf4_model_or_skip(tiny):
    try:
        import bitsandbytes  # noqa: F401

        model = build_model(tiny, config(quant="nf4"))
    except Exception as e:  # noqa: BLE001 - whatever bitsandbytes raises on this CPU
        pytest.skip(f"bitsandbytes cannot load a 4-bit model on this CPU: {e}")
    return model


def test_techniques_keep_loss_and_gradients_in_nf4(tiny, nf4_model_or_skip):
    import bitsandbytes as bnb

    base_layer = nf4_model_or_skip.get_base_model().model.layers[0].mlp.gate_proj.base_layer
    assert isinstance(base_layer, bnb.nn.Linear4bit)
    ref = loss_and_grads(tiny, config(quant="nf4"))
    cfg = config(quant="nf4", **COMBOS["all"])
    got = loss_and_grads(tiny, cfg)
    assert_wired(got[0], cfg, got[3])
    assert_same_training(got, ref)


def test_train_step_with_dropout_and_every_technique(tiny):
    _, _, ids = tiny
    cfg = config(lora_dropout=0.1, **COMBOS["all"])
    model = build_model(tiny, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = T.make_optimizer(model.parameters(), cfg, lr=1e-2)
    torch.manual_seed(0)
    loss = T.train_step(model, opt, cfg, [(ids[:1], ids[:1]), (ids[1:], ids[1:])])
    assert isinstance(loss, float) and 0 < loss < 20
    after = dict(model.named_parameters())
    lora = [n for n in before if "lora_" in n]
    assert len(lora) == 2 * 7 * 2  # A and B of 7 linear layers in each of 2 blocks
    assert all(not torch.equal(before[n], after[n]) for n in lora)
    assert all(torch.equal(before[n], after[n]) for n in before if n not in lora)
    assert all(after[n].grad is None for n in lora)  # zeroed by the step
