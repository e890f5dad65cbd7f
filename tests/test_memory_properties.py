"""Properties of the memory and speed models over every dense catalogue model and random
valid settings: each knob moves the estimate in the direction its physics says."""
from __future__ import annotations

import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from qplan import api
from qplan.planner import config as K
from qplan.planner.config import TrainConfig
from qplan.planner.memory import estimate_memory
from qplan.planner.speed import estimate_speed

DENSE = [m for m in api.catalog().models if not m.is_moe]
GPUS = list(api.catalog().gpus)
FAST = settings(max_examples=60, deadline=None)

models = st.sampled_from(DENSE)
gpus = st.sampled_from(GPUS)


@st.composite
def configs(draw) -> TrainConfig:
    return TrainConfig(
        # counted figures are fitted from 4k tokens and checked on the GPU down to 256; below
        # that the fits' constants dominate and orderings between regimes are not promised
        seq_len=draw(st.integers(256, 16_384)),
        batch_size=draw(st.integers(1, 16)),
        grad_accum=draw(st.integers(1, 8)),
        lora_rank=draw(st.integers(1, 256)),
        lora_dropout=draw(st.sampled_from([0.0, 0.05, 0.1])),
        grad_ckpt=draw(st.booleans()),
        optim=draw(st.sampled_from(K.OPTIMIZERS)),
        prepare=draw(st.sampled_from(K.PREPARE_MODES)),
        loss=draw(st.sampled_from(K.LOSS_MODES)),
        attn=draw(st.sampled_from(K.ATTN_IMPLS)),
        quant=draw(st.sampled_from(K.QUANT_TYPES)),
        double_quant=draw(st.booleans()),
        expandable_segments=draw(st.booleans()),
        offload_activations=draw(st.booleans()),
        mlp_chunk=draw(st.sampled_from([0, 512, 2048])),
        embed_on_cpu=draw(st.booleans()),
        recompute_norms=draw(st.booleans()),
        loss_chunk=draw(st.sampled_from([1 << 20, 16 << 20, 64 << 20])),
    )


def test_catalogue_has_dense_models():
    assert DENSE


def peak(model, cfg) -> int:
    return estimate_memory(model, cfg).peak_bytes


def never_less(model, cfg, **bigger):
    assert peak(model, cfg.with_(**bigger)) >= peak(model, cfg)


@FAST
@given(models, configs())
def test_peak_is_positive_and_finite(model, cfg):
    est = estimate_memory(model, cfg)
    assert est.peak_bytes > 0
    assert math.isfinite(est.peak_gib)
    assert all(t.bytes >= 0 for t in est.terms)


@FAST
@given(models, configs())
def test_breakdown_sums_to_peak(model, cfg):
    est = estimate_memory(model, cfg)
    assert sum(t.bytes for t in est.terms) == est.peak_bytes
    bd = est.breakdown()
    assert list(bd) == [t.key for t in est.terms]
    assert sum(bd.values()) == pytest.approx(est.peak_gib, abs=0.0005 * len(bd))


@FAST
@given(models, configs(), st.integers(1, 4096))
def test_longer_sequence_never_needs_less(model, cfg, extra):
    # except across the MLP chunk: the runner tiles only a sequence longer than one chunk
    # (qplan.runner.lowmem.tiled), and a tiled MLP keeps only its input, so one token past
    # the chunk may keep less than the untiled chunk did
    assume(not cfg.mlp_chunk or not cfg.seq_len <= cfg.mlp_chunk < cfg.seq_len + extra)
    never_less(model, cfg, seq_len=cfg.seq_len + extra)


@FAST
@given(models, configs(), st.integers(1, 16))
def test_larger_batch_never_needs_less(model, cfg, extra):
    never_less(model, cfg, batch_size=cfg.batch_size + extra)


@FAST
@given(models, configs(), st.integers(1, 8))
def test_grad_accum_does_not_change_memory(model, cfg, accum):
    assert peak(model, cfg.with_(grad_accum=accum)) == peak(model, cfg)


@FAST
@given(models, configs())
def test_checkpointing_never_needs_more(model, cfg):
    assert peak(model, cfg.with_(grad_ckpt=True)) <= peak(model, cfg.with_(grad_ckpt=False))


@FAST
@given(models, configs())
def test_mlp_tiling_never_needs_more(model, cfg):
    # Tiling holds its chunks' concatenated outputs (16 bytes a token per hidden element),
    # so it only pays once a sequence spans several chunks: from 8 chunks on it never costs
    # (for every catalogue model, intermediate/hidden >= 2.5).
    cfg = cfg.with_(mlp_chunk=0, seq_len=max(cfg.seq_len, 8 * 1024))
    tiled = cfg.with_(mlp_chunk=1024)
    assert peak(model, tiled) <= peak(model, cfg)


@FAST
@given(models, configs())
def test_cpu_embeddings_never_need_more_on_device(model, cfg):
    assume(not cfg.embed_on_cpu)
    on_cpu = cfg.with_(embed_on_cpu=True)
    assert peak(model, on_cpu) <= peak(model, cfg)
    if not model.tie_word_embeddings:
        assert estimate_memory(model, on_cpu).host_pinned_bytes > \
            estimate_memory(model, cfg).host_pinned_bytes


@FAST
@given(models, configs())
def test_lean_norms_never_need_more(model, cfg):
    assert peak(model, cfg.with_(recompute_norms=True)) <= peak(model, cfg.with_(recompute_norms=False))


@FAST
@given(models, configs(), st.sampled_from([1 << 20, 4 << 20]))
def test_smaller_loss_chunk_never_needs_more(model, cfg, small):
    assume(cfg.loss_chunk > small)
    assert peak(model, cfg.with_(loss_chunk=small)) <= peak(model, cfg)


@FAST
@given(models, configs())
def test_fused_loss_never_needs_more(model, cfg):
    assert peak(model, cfg.with_(loss="fused")) <= peak(model, cfg.with_(loss="standard"))


@FAST
@given(models, configs())
def test_lean_never_needs_more_than_kbit(model, cfg):
    assert peak(model, cfg.with_(prepare="lean")) <= peak(model, cfg.with_(prepare="kbit"))


@FAST
@given(models, configs(), st.integers(1, 128))
def test_higher_rank_never_needs_less(model, cfg, extra):
    never_less(model, cfg, lora_rank=cfg.lora_rank + extra)


@FAST
@given(models, configs(), st.sampled_from([0.01, 0.05, 0.1, 0.5]))
def test_dropout_never_needs_less(model, cfg, p):
    assert peak(model, cfg.with_(lora_dropout=p)) >= peak(model, cfg.with_(lora_dropout=0.0))


@FAST
@given(models, configs(), st.sampled_from(["adamw_8bit", "paged_adamw_8bit"]))
def test_8bit_optimizer_never_needs_more(model, cfg, optim):
    assert peak(model, cfg.with_(optim=optim)) <= peak(model, cfg.with_(optim="adamw_torch"))


@FAST
@given(models, configs())
def test_double_quant_never_needs_more(model, cfg):
    assert peak(model, cfg.with_(double_quant=True)) <= peak(model, cfg.with_(double_quant=False))


@FAST
@given(models, configs())
def test_4bit_never_needs_more_than_16bit(model, cfg):
    assert peak(model, cfg.with_(quant="nf4")) <= peak(model, cfg.with_(quant="none"))


@FAST
@given(models, configs())
def test_expandable_segments_never_need_more(model, cfg):
    assert (peak(model, cfg.with_(expandable_segments=True))
            <= peak(model, cfg.with_(expandable_segments=False)))


@FAST
@given(models, configs())
def test_offload_never_needs_more_on_device(model, cfg):
    # The block input comes back for backward (OFFLOAD_EXTRA_PER_H); every catalogue model
    # has enough blocks (>= 16) that keeping all their inputs on the device costs more.
    cfg = cfg.with_(embed_on_cpu=False)
    on = estimate_memory(model, cfg.with_(offload_activations=True))
    off = estimate_memory(model, cfg.with_(offload_activations=False))
    assert on.peak_bytes <= off.peak_bytes
    assert off.host_pinned_bytes == 0
    if cfg.grad_ckpt:
        assert on.host_pinned_bytes > 0


@FAST
@given(models, configs())
def test_eager_attention_never_needs_less_than_sdpa(model, cfg):
    assert peak(model, cfg.with_(attn="eager")) >= peak(model, cfg.with_(attn="sdpa"))


# ---- speed --------------------------------------------------------------------
@FAST
@given(models, configs(), gpus)
def test_speed_is_positive_and_finite(model, cfg, gpu):
    if cfg.attn == "flash_attention_2" and not gpu.flash_attention_2:
        cfg = cfg.with_(attn="sdpa")
    sp = estimate_speed(model, cfg, gpu)
    assert sp.tokens_per_s > 0 and math.isfinite(sp.tokens_per_s)
    assert sp.step_s > 0 and math.isfinite(sp.step_s)
    # one step processes tokens_per_step at tokens_per_s
    assert sp.step_s == pytest.approx(cfg.tokens_per_step / sp.tokens_per_s, rel=1e-9)


@FAST
@given(models, configs(), gpus)
def test_checkpointing_is_never_faster(model, cfg, gpu):
    on = estimate_speed(model, cfg.with_(grad_ckpt=True), gpu).tokens_per_s
    off = estimate_speed(model, cfg.with_(grad_ckpt=False), gpu).tokens_per_s
    assert on <= off


@FAST
@given(models, configs(), gpus)
def test_packed_rows_cost_memory_and_speed_except_with_flash(model, cfg, gpu):
    packed, plain = cfg.with_(packed_rows=True), cfg.with_(packed_rows=False)
    assert peak(model, packed) >= peak(model, plain)
    fast = estimate_speed(model, plain, gpu).tokens_per_s
    assert estimate_speed(model, packed, gpu).tokens_per_s <= fast
    if cfg.attn == "flash_attention_2":
        assert peak(model, packed) == peak(model, plain)
        assert estimate_speed(model, packed, gpu).tokens_per_s == fast


@FAST
@given(models, configs(), gpus, st.integers(1, 16))
def test_larger_batch_is_never_slower_per_token(model, cfg, gpu, extra):
    small = estimate_speed(model, cfg, gpu).tokens_per_s
    big = estimate_speed(model, cfg.with_(batch_size=cfg.batch_size + extra), gpu).tokens_per_s
    assert big >= small * (1 - 1e-12)


@FAST
@given(models, configs(), gpus)
def test_offload_is_never_faster(model, cfg, gpu):
    on = estimate_speed(model, cfg.with_(offload_activations=True), gpu).tokens_per_s
    off = estimate_speed(model, cfg.with_(offload_activations=False), gpu).tokens_per_s
    assert on <= off


@FAST
@given(models, configs(), gpus)
def test_grad_accum_only_spreads_the_optimizer_step(model, cfg, gpu):
    """Micro-batches cost the same; the optimizer step is shared by more of them."""
    one = estimate_speed(model, cfg.with_(grad_accum=1), gpu)
    seven = estimate_speed(model, cfg.with_(grad_accum=7), gpu)
    assert seven.tokens_per_s >= one.tokens_per_s
    opt = dict(one.terms)["optimizer"]
    assert seven.step_s == pytest.approx(7 * (one.step_s - opt) + opt, rel=1e-9)


@FAST
@given(models, configs(), gpus)
def test_offload_without_checkpointing_changes_nothing(model, cfg, gpu):
    cfg = cfg.with_(grad_ckpt=False, attn="sdpa")
    on, off = cfg.with_(offload_activations=True), cfg.with_(offload_activations=False)
    assert estimate_memory(model, on).peak_bytes == estimate_memory(model, off).peak_bytes
    assert (estimate_speed(model, on, gpu).tokens_per_s
            == pytest.approx(estimate_speed(model, off, gpu).tokens_per_s))
