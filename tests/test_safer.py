"""The OOM ladder (api.next_safer_config): every rung keeps the effective batch, never needs
more memory, follows SAFER_STEPS in order, and the ladder ends."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qplan import api
from qplan.api import SAFER_STEPS, next_safer_config
from qplan.planner import config as K
from qplan.planner.config import TrainConfig
from qplan.planner.memory import estimate_memory

DENSE = [m for m in api.catalog().models if not m.is_moe]

LARGE = TrainConfig(seq_len=8192, batch_size=16, grad_accum=2, grad_ckpt=False,
                    optim="adamw_torch", loss="standard", prepare="kbit",
                    expandable_segments=False, offload_activations=False)


def ladder(cfg: TrainConfig, *, allow_shorter_seq: bool = False, limit: int = 100):
    """Every (config, reason) the ladder visits from ``cfg``, until it returns None."""
    out = []
    for _ in range(limit):
        nxt = next_safer_config(cfg, allow_shorter_seq=allow_shorter_seq)
        if nxt is None:
            return out
        cfg, why = nxt
        out.append((cfg, why))
    raise AssertionError(f"ladder did not end within {limit} steps")


def bound(cfg: TrainConfig, allow_shorter_seq: bool) -> int:
    """Rungs at most: halvings of the batch (+1 for an odd batch), one per other knob,
    halvings of the sequence down to 256."""
    n = math.ceil(math.log2(cfg.batch_size)) + 1 + 8
    if allow_shorter_seq:
        n += max(0, math.ceil(math.log2(max(cfg.seq_len, 256) / 256)))
    return n


def step_name(a: TrainConfig, b: TrainConfig) -> str:
    """Which SAFER_STEPS entry turned ``a`` into ``b`` (exactly one knob group changes)."""
    changed = {f for f in a.to_dict() if getattr(a, f) != getattr(b, f)}
    names = {
        frozenset({"batch_size", "grad_accum"}): "halve_batch",
        frozenset({"grad_ckpt"}): "grad_ckpt",
        frozenset({"optim"}): "paged_optimizer",
        frozenset({"loss"}): "fused_loss",
        frozenset({"prepare"}): "lean_prepare",
        frozenset({"expandable_segments"}): "expandable_segments",
        frozenset({"offload_activations"}): "offload_activations",
        frozenset({"recompute_norms"}): "lean_norms",
        frozenset({"mlp_chunk"}): "tile_mlp",
        frozenset({"seq_len"}): "shorter_seq",
        frozenset({"seq_len", "mlp_chunk"}): "shorter_seq",  # a tiled MLP keeps its chunks
    }
    assert frozenset(changed) in names, f"unexpected change {sorted(changed)}"
    return names[frozenset(changed)]


@st.composite
def configs(draw) -> TrainConfig:
    return TrainConfig(
        # counted figures are fitted from 4k tokens and checked on the GPU down to 256; below
        # that the fits' constants dominate and orderings between regimes are not promised
        seq_len=draw(st.integers(256, 32_768)),
        batch_size=draw(st.integers(1, 64)),
        grad_accum=draw(st.integers(1, 16)),
        lora_rank=draw(st.sampled_from([8, 16, 64])),
        lora_dropout=draw(st.sampled_from([0.0, 0.1])),
        grad_ckpt=draw(st.booleans()),
        optim=draw(st.sampled_from(K.OPTIMIZERS)),
        prepare=draw(st.sampled_from(K.PREPARE_MODES)),
        loss=draw(st.sampled_from(K.LOSS_MODES)),
        attn=draw(st.sampled_from(K.ATTN_IMPLS)),
        quant=draw(st.sampled_from(K.QUANT_TYPES)),
        expandable_segments=draw(st.booleans()),
        offload_activations=draw(st.booleans()),
        recompute_norms=draw(st.booleans()),
        mlp_chunk=draw(st.sampled_from([0, 0, 1024])),
    )


FAST = settings(max_examples=80, deadline=None)


# ---- from one large configuration ---------------------------------------------------
@pytest.mark.parametrize("allow", [False, True])
def test_ladder_from_a_large_config_visits_every_rung_in_order(allow):
    steps = ladder(LARGE, allow_shorter_seq=allow)
    names = [step_name(a, b) for a, b in zip([LARGE] + [c for c, _ in steps], [c for c, _ in steps])]
    expected = ["halve_batch"] * 4 + list(SAFER_STEPS[1:-1])
    if allow:
        expected += ["shorter_seq"] * 5  # 8192 -> 4096 -> ... -> 256
    assert names == expected
    last = steps[-1][0]
    assert (last.batch_size, last.grad_accum) == (1, 32)
    assert last.grad_ckpt and last.optim == "paged_adamw_8bit" and last.loss == "fused"
    assert last.prepare == "lean" and last.expandable_segments and last.offload_activations
    assert last.recompute_norms
    # 8192 tokens in 8 chunks; a shorter sequence keeps the 8 chunks (256 tokens: 32 each)
    assert (last.seq_len, last.mlp_chunk) == ((256, 32) if allow else (LARGE.seq_len, 1024))


@pytest.mark.parametrize("model", DENSE, ids=lambda m: m.name)
def test_ladder_never_needs_more_memory_for_any_dense_model(model):
    start = LARGE.with_(seq_len=min(LARGE.seq_len, model.max_position_embeddings))
    prev = estimate_memory(model, start).peak_bytes
    for cfg, why in ladder(start, allow_shorter_seq=True):
        now = estimate_memory(model, cfg).peak_bytes
        assert now <= prev, f"{model.name}: '{why}' raised the estimate"
        prev = now


def test_every_rung_explains_itself():
    """Each rung's reason names exactly the settings it changed, and says it in words."""
    prev = LARGE
    for cfg, why in ladder(LARGE, allow_shorter_seq=True):
        changed = {f for f in cfg.to_dict() if getattr(cfg, f) != getattr(prev, f)}
        assert set(why.settings) == changed and why.text.strip() and why.source == "qplan"
        prev = cfg
    b = next_safer_config(TrainConfig(batch_size=8, grad_accum=2))
    assert b is not None and "effective batch stays 16" in b[1].text


def test_fully_safe_config_has_nothing_left():
    safest = TrainConfig(batch_size=1, grad_ckpt=True, optim="paged_adamw_8bit", loss="fused",
                         prepare="lean", expandable_segments=True, offload_activations=True,
                         recompute_norms=True, seq_len=256)
    assert next_safer_config(safest) is None
    assert next_safer_config(safest, allow_shorter_seq=True) is None
    assert next_safer_config(safest.with_(seq_len=1024)) is None  # too short to tile
    tiled = next_safer_config(safest.with_(seq_len=4096))
    assert tiled is not None and tiled[0].mlp_chunk == 512
    assert next_safer_config(tiled[0]) is None


@pytest.mark.parametrize("b,accum", [(3, 5), (5, 1), (6, 1), (7, 3), (12, 2)])
def test_odd_batch_keeps_the_effective_batch(b, accum):
    cfg = TrainConfig(batch_size=b, grad_accum=accum)
    for nxt, _ in ladder(cfg):
        assert nxt.effective_batch == b * accum
    assert ladder(cfg)[-1][0].batch_size == 1


@pytest.mark.parametrize("seq,after", [(4096, 2048), (300, 256), (257, 256)])
def test_shorter_sequence_halves_but_not_below_256(seq, after):
    cfg = TrainConfig(batch_size=1, seq_len=seq, loss="fused", offload_activations=True,
                      recompute_norms=True, mlp_chunk=256)
    nxt = next_safer_config(cfg, allow_shorter_seq=True)
    assert nxt is not None and nxt[0].seq_len == after
    assert next_safer_config(cfg) is None


@pytest.mark.parametrize("seq", [1, 100, 256])
def test_short_sequence_is_never_shortened(seq):
    cfg = TrainConfig(batch_size=1, seq_len=seq, loss="fused", offload_activations=True,
                      recompute_norms=True)
    assert next_safer_config(cfg, allow_shorter_seq=True) is None


# ---- from any configuration -----------------------------------------------------------
@FAST
@given(configs(), st.booleans())
def test_ladder_keeps_effective_batch_and_ends(cfg, allow):
    steps = ladder(cfg, allow_shorter_seq=allow, limit=200)
    assert len(steps) <= bound(cfg, allow)
    for nxt, _ in steps:
        assert nxt.effective_batch == cfg.effective_batch
        if not allow:
            assert nxt.seq_len == cfg.seq_len
        # what the ladder never touches
        for f in ("lora_rank", "lora_alpha", "lora_targets", "lora_dropout", "attn", "quant",
                  "double_quant", "compute_dtype"):
            assert getattr(nxt, f) == getattr(cfg, f), f


@FAST
@given(configs(), st.booleans())
def test_ladder_follows_safer_steps_order(cfg, allow):
    seq = [cfg] + [c for c, _ in ladder(cfg, allow_shorter_seq=allow)]
    order = [SAFER_STEPS.index(step_name(a, b)) for a, b in zip(seq, seq[1:])]
    assert order == sorted(order)
    if not allow:
        assert "shorter_seq" not in [SAFER_STEPS[i] for i in order]


@FAST
@given(st.sampled_from(DENSE), configs(), st.booleans())
def test_ladder_memory_never_increases(model, cfg, allow):
    prev = estimate_memory(model, cfg).peak_bytes
    for nxt, why in ladder(cfg, allow_shorter_seq=allow):
        now = estimate_memory(model, nxt).peak_bytes
        assert now <= prev, why
        prev = now


@FAST
@given(configs())
def test_shorter_sequence_only_when_allowed(cfg):
    without = ladder(cfg)
    with_ = ladder(cfg, allow_shorter_seq=True)
    assert all(c.seq_len == cfg.seq_len for c, _ in without)
    # allowing it only appends rungs: the ones before are the same
    assert [c for c, _ in with_[:len(without)]] == [c for c, _ in without]
    extra = with_[len(without):]
    assert all(c.seq_len < cfg.seq_len and c.seq_len >= 256 for c, _ in extra)



def test_a_shorter_sequence_keeps_the_mlp_tiled():
    """Found by the property above (hypothesis, llama-3.1-405b): 512 tokens tiled in 2 chunks
    of 256 were estimated at 206.66 GiB, then the shorter-sequence rung made it 256 tokens in
    one chunk (untiled), 206.87 GiB: more. The rung now keeps the number of chunks."""
    from qplan import api

    m = api.get_model("llama-3.1-405b")
    cfg = TrainConfig(seq_len=512, batch_size=1, grad_accum=1, lora_rank=8, grad_ckpt=True,
                      loss="fused", prepare="lean", expandable_segments=True,
                      offload_activations=True, recompute_norms=True, mlp_chunk=256)
    nxt, why = api.next_safer_config(cfg, allow_shorter_seq=True)
    assert (nxt.seq_len, nxt.mlp_chunk) == (256, 128) and "MLP chunks 256 -> 128" in why.text
    assert estimate_memory(m, nxt).peak_bytes <= estimate_memory(m, cfg).peak_bytes
    untiled = cfg.with_(seq_len=256)
    assert estimate_memory(m, untiled).peak_bytes > estimate_memory(m, cfg).peak_bytes
