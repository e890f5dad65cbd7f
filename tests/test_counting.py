"""Dry-run counts: the real training step on fake tensors, fitted per regime.

A tiny Llama (hidden 64) keeps the dry runs fast; what they must find is exact arithmetic
(a checkpointed block keeps its 16-bit input, offload moves it to the host, dropout keeps
more), and the fits must reproduce sizes they were not fitted on."""
from __future__ import annotations

import pytest

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from qplan.planner.activations import evaluate  # noqa: E402
from qplan.profiles.models import ModelProfile  # noqa: E402
from qplan.runner import counting as K  # noqa: E402

H = 64
CONFIG = dict(model_type="llama", hidden_size=H, intermediate_size=176, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
              max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
SIZES = ((1, 256), (2, 256), (1, 512), (4, 128), (1, 1024))
HELD_OUT = ((3, 384), (2, 768))


@pytest.fixture(scope="module")
def profile():
    return ModelProfile.from_config_dict(CONFIG, name="tiny-llama")


def _traces(profile, regime, sizes):
    from qplan.runner.dryrun import DryRun

    small = K.counting_config(CONFIG, None)
    with DryRun(small, regime.config(profile), packed=regime.packed) as dr:
        return [dr.trace(b, s) for b, s in sizes]


def test_a_checkpointed_block_keeps_its_16bit_input(profile):
    (t,) = _traces(profile, K.Regime(grad_ckpt=True, packed=False), [(2, 512)])
    # every block after the first: its bf16 input (b x s x hidden x 2 bytes) and what the
    # checkpoint holds besides (position tables: small next to it at a real hidden size)
    inp = 2 * 512 * H * 2
    assert inp <= t.blocks[1].kept <= 1.3 * inp


def test_offload_moves_the_block_input_to_the_host(profile):
    (on,) = _traces(profile, K.Regime(grad_ckpt=True, packed=False, offload=True), [(2, 512)])
    (off,) = _traces(profile, K.Regime(grad_ckpt=True, packed=False), [(2, 512)])
    # exactly the input's bytes leave the device; the rest of what the block holds stays
    assert off.blocks[1].kept - on.blocks[1].kept == 2 * 512 * H * 2


def test_without_checkpointing_a_block_keeps_much_more(profile):
    (ck,) = _traces(profile, K.Regime(grad_ckpt=True, packed=False), [(1, 512)])
    (no,) = _traces(profile, K.Regime(grad_ckpt=False, packed=False), [(1, 512)])
    assert no.blocks[1].kept > 8 * ck.blocks[1].kept
    # ... and checkpointing recomputes it all in backward: that block's backward is larger
    assert ck.blocks[1].backward > no.blocks[1].backward


def test_dropout_keeps_a_mask_and_a_dropped_copy(profile):
    (base,) = _traces(profile, K.Regime(grad_ckpt=False, packed=False), [(1, 512)])
    (drop,) = _traces(profile, K.Regime(grad_ckpt=False, packed=False, variant="dropout"),
                      [(1, 512)])
    assert drop.blocks[1].kept > base.blocks[1].kept


@pytest.mark.parametrize("regime", [K.Regime(grad_ckpt=False, packed=False),
                                    K.Regime(grad_ckpt=True, packed=True)],
                         ids=lambda r: r.key)
def test_fits_predict_sizes_they_were_not_fitted_on(profile, regime):
    fig = K.count_regime(CONFIG, profile, regime, None, sizes=SIZES)
    assert set(fig["kept"]) == {"full_attention"}
    for (b, s), t in zip(HELD_OUT, _traces(profile, regime, HELD_OUT)):
        for got, coef in ((t.blocks[1].kept, fig["kept"]["full_attention"]),
                          (t.blocks[1].backward, fig["backward"]["full_attention"]),
                          (t.prelude, fig["prelude"])):
            want = evaluate(coef, b, s)
            assert want == pytest.approx(got, rel=0.02, abs=4096), (b, s)


def test_regimes_cover_what_the_search_chooses():
    keys = {r.key for r in K.regimes()}
    for r in K.search_regimes():
        assert r.key in keys
    assert len(keys) == len(K.regimes())  # no duplicates
    # offload only with checkpointing (it moves the checkpointed inputs)
    assert all(r.grad_ckpt for r in K.regimes() if r.offload)


GEMMA2 = dict(model_type="gemma2", hidden_size=H, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512,
              max_position_embeddings=4096, sliding_window=4096, attn_logit_softcapping=50.0,
              final_logit_softcapping=30.0)


def test_gemma2_is_counted_with_eager_attention_which_keeps_the_attention_matrix():
    """Transformers refuses sdpa for Gemma 2 (soft-capped attention): its regimes count eager
    attention, whose kept probabilities grow with heads x seq per token."""
    from qplan.runner.dryrun import DryRun

    profile = ModelProfile.from_config_dict(GEMMA2, name="tiny-gemma2")
    assert not profile.sdpa_supported
    regime = K.Regime(grad_ckpt=False, packed=False)
    cfg = regime.config(profile)
    assert cfg.attn == "eager"
    small = K.counting_config(GEMMA2, profile.layer_types)
    with DryRun(small, cfg, packed=False) as dr:
        short, long = dr.trace(1, 256), dr.trace(1, 512)
    per_short, per_long = short.blocks[1].kept / 256, long.blocks[1].kept / 512
    # at least the 16-bit probabilities of 4 heads: 4 x 2 bytes per key, 256 more keys a token
    assert per_long - per_short >= 4 * 2 * 256
