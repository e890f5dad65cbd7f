"""Each memory term alone, checked against arithmetic done by hand from the shapes.

Only pure arithmetic is pinned here (bytes per parameter, element counts); calibrated
coefficients (qplan/planner/calibration.py) are compared only by relationship.
"""
from __future__ import annotations

import pytest

from qplan.errors import ConfigError
from qplan.planner import memory as M
from qplan.planner.config import TrainConfig

# Llama-3.1-8B, counted by hand from config.json (hidden 4096, intermediate 14336,
# 32 heads x 128, 8 kv heads x 128 = 1024, 32 layers), independent of linear_shapes().
L8B_LAYERS = 32
L8B_SHAPES = {  # name: (in, out)
    "q": (4096, 4096), "k": (4096, 1024), "v": (4096, 1024), "o": (4096, 4096),
    "gate": (4096, 14336), "up": (4096, 14336), "down": (14336, 4096),
}
L8B_LINEAR = L8B_LAYERS * sum(i * o for i, o in L8B_SHAPES.values())


def test_llama8b_shapes_match_hand_count(llama8b):
    assert {s.name: (s.in_features, s.out_features) for s in llama8b.linear_shapes()} == L8B_SHAPES
    assert llama8b.quantized_params == L8B_LINEAR == 6_979_321_856


# ---- quantized weights ----------------------------------------------------
def test_nf4_without_double_quant_is_half_byte_plus_fp32_absmax(llama8b):
    cfg = TrainConfig(quant="nf4", double_quant=False)
    n = L8B_LINEAR
    assert M.quantized_weights(llama8b, cfg) == pytest.approx(n * (0.5 + 4 / 64), abs=1)


def test_nf4_double_quant_is_half_byte_plus_8bit_absmax_plus_fp32_per_256(llama8b):
    cfg = TrainConfig(quant="nf4", double_quant=True)
    n = L8B_LINEAR
    assert M.quantized_weights(llama8b, cfg) == pytest.approx(
        n * (0.5 + 1 / 64 + 4 / (64 * 256)), abs=1)


def test_double_quant_saves_exactly_the_absmax_difference(llama8b):
    n = L8B_LINEAR
    without = M.quantized_weights(llama8b, TrainConfig(double_quant=False))
    with_dq = M.quantized_weights(llama8b, TrainConfig(double_quant=True))
    assert with_dq < without
    assert without - with_dq == pytest.approx(n * (4 / 64 - 1 / 64 - 4 / (64 * 256)), abs=2)


def test_fp4_costs_the_same_as_nf4(llama8b):
    for dq in (True, False):
        assert (M.quantized_weights(llama8b, TrainConfig(quant="fp4", double_quant=dq))
                == M.quantized_weights(llama8b, TrainConfig(quant="nf4", double_quant=dq)))


@pytest.mark.parametrize("dq", [True, False])
def test_quant_none_is_two_bytes_per_param(llama8b, dq):
    cfg = TrainConfig(quant="none", double_quant=dq)
    assert M.quantized_weights(llama8b, cfg) == 2 * L8B_LINEAR


def test_quant_none_term_is_labelled_16bit(llama8b):
    est = M.estimate_memory(llama8b, TrainConfig(quant="none"))
    assert "16-bit" in est.term("base_weights_4bit").label


# ---- unquantized weights --------------------------------------------------
def test_unquantized_weights_kbit_is_twice_lean(llama8b):
    lean = M.unquantized_weights(llama8b, TrainConfig(prepare="lean"))
    kbit = M.unquantized_weights(llama8b, TrainConfig(prepare="kbit"))
    assert kbit == 2 * lean
    # embeddings + untied lm_head + 2 norms per layer + final norm, 2 bytes each
    n = 2 * 128_256 * 4096 + (2 * 4096) * L8B_LAYERS + 4096
    assert lean == 2 * n


def test_tied_embeddings_count_once():
    from qplan import api

    tied = api.get_model("llama-3.2-1b")
    assert tied.tie_word_embeddings
    untied = tied.__class__(**{**tied.__dict__, "name": "x", "tie_word_embeddings": False})
    diff = (M.unquantized_weights(untied, TrainConfig())
            - M.unquantized_weights(tied, TrainConfig()))
    assert diff == 2 * tied.vocab_size * tied.hidden_size


# ---- LoRA weights, gradients, optimizer ------------------------------------
LORA_8B_R16_ALL = 41_943_040


def test_lora_param_count_llama8b_r16_all_targets_by_hand(llama8b):
    by_hand = L8B_LAYERS * sum(16 * (i + o) for i, o in L8B_SHAPES.values())
    assert by_hand == LORA_8B_R16_ALL
    assert M.lora_param_count(llama8b, TrainConfig(lora_rank=16)) == LORA_8B_R16_ALL


def test_lora_weights_and_gradients_are_fp32(llama8b):
    cfg = TrainConfig(lora_rank=16)
    assert M.lora_weights(llama8b, cfg) == 4 * LORA_8B_R16_ALL
    assert M.lora_gradients(llama8b, cfg) == 4 * LORA_8B_R16_ALL


@pytest.mark.parametrize("rank", [1, 8, 64, 256])
def test_lora_terms_are_linear_in_rank(llama8b, rank):
    assert M.lora_weights(llama8b, TrainConfig(lora_rank=rank)) == 4 * LORA_8B_R16_ALL * rank // 16


@pytest.mark.parametrize("targets", [("q", "v"), ("q_proj", "v_proj"), "q,v"])
def test_target_subset_counts_only_those_layers(llama8b, targets):
    cfg = TrainConfig(lora_rank=16, lora_targets=targets)
    expected = L8B_LAYERS * 16 * (sum(L8B_SHAPES["q"]) + sum(L8B_SHAPES["v"]))
    assert M.lora_param_count(llama8b, cfg) == expected == 6_815_744
    assert M.lora_weights(llama8b, cfg) == 4 * expected
    assert M.lora_gradients(llama8b, cfg) == 4 * expected
    full = M.estimate_memory(llama8b, TrainConfig(lora_rank=16))
    sub = M.estimate_memory(llama8b, cfg)
    for key in ("lora_adapters", "gradients"):
        assert sub.term(key).bytes < full.term(key).bytes
    assert sub.paged_bytes < full.paged_bytes  # paged optimizer states, outside the peak
    adam = M.estimate_memory(llama8b, cfg.with_(optim="adamw_torch"))
    assert adam.term("optimizer_states").bytes == 8 * expected


@pytest.mark.parametrize("alias", [None, ("all",), ("all-linear",), tuple(L8B_SHAPES)])
def test_all_targets_spellings_agree(llama8b, alias):
    assert M.lora_param_count(llama8b, TrainConfig(lora_targets=alias)) == LORA_8B_R16_ALL


def test_adamw_torch_is_8_bytes_per_trainable_param(llama8b):
    assert M.optimizer_states(llama8b, TrainConfig(optim="adamw_torch")) == 8 * LORA_8B_R16_ALL


@pytest.mark.parametrize("optim", ["adamw_8bit", "paged_adamw_8bit"])
def test_8bit_adam_is_about_2_bytes_per_param(llama8b, optim):
    got = M.optimizer_states(llama8b, TrainConfig(optim=optim))
    # two 8-bit moments + one fp32 absmax per 256 values for each moment
    assert got == pytest.approx(LORA_8B_R16_ALL * (2 + 2 * 4 / 256), abs=1)
    assert 2 * LORA_8B_R16_ALL < got < 2.1 * LORA_8B_R16_ALL


# ---- activations ------------------------------------------------------------
@pytest.mark.parametrize("prepare,residual", [("kbit", 4), ("lean", 2)])
@pytest.mark.parametrize("b,s", [(1, 2048), (4, 512), (3, 1000)])
def test_checkpointed_activations_are_block_inputs(llama8b, prepare, residual, b, s):
    cfg = TrainConfig(grad_ckpt=True, prepare=prepare, batch_size=b, seq_len=s)
    assert M.saved_activations(llama8b, cfg) == L8B_LAYERS * b * s * 4096 * residual


def test_kbit_residual_doubles_checkpointed_activations(llama8b):
    lean = M.saved_activations(llama8b, TrainConfig(prepare="lean"))
    kbit = M.saved_activations(llama8b, TrainConfig(prepare="kbit"))
    assert kbit == 2 * lean


def test_offloaded_checkpointed_activations_leave_the_device(llama8b):
    cfg = TrainConfig(grad_ckpt=True, offload_activations=True, batch_size=2, seq_len=1024)
    assert M.saved_activations(llama8b, cfg) == 0
    est = M.estimate_memory(llama8b, cfg)
    assert est.host_pinned_bytes == L8B_LAYERS * 2 * 1024 * 4096 * 2


def test_no_checkpointing_saves_more_than_block_inputs(llama8b):
    on = M.saved_activations(llama8b, TrainConfig(grad_ckpt=True))
    off = M.saved_activations(llama8b, TrainConfig(grad_ckpt=False))
    assert off > on


def test_eager_attention_keeps_probabilities_that_grow_with_seq(llama8b):
    per = M.layer_activation_bytes_per_token
    short = per(llama8b, TrainConfig(attn="eager", seq_len=512)) - per(
        llama8b, TrainConfig(attn="sdpa", seq_len=512))
    long = per(llama8b, TrainConfig(attn="eager", seq_len=4096)) - per(
        llama8b, TrainConfig(attn="sdpa", seq_len=4096))
    assert 0 < short < long


# ---- logits and loss ------------------------------------------------------
def test_fused_loss_is_much_smaller_than_standard_for_a_large_vocab(llama8b):
    cfg = TrainConfig(batch_size=4, seq_len=4096)
    std = M.logits_and_loss(llama8b, cfg.with_(loss="standard"))
    fused = M.logits_and_loss(llama8b, cfg.with_(loss="fused"))
    assert fused * 4 < std
    # standard scales with every token's logits; fused stops growing with vocab x tokens
    std2 = M.logits_and_loss(llama8b, cfg.with_(loss="standard", batch_size=8))
    fused2 = M.logits_and_loss(llama8b, cfg.with_(loss="fused", batch_size=8))
    assert std2 == pytest.approx(2 * std, rel=1e-9)
    assert fused2 - fused < std2 - std


def test_standard_loss_is_proportional_to_tokens_times_vocab(llama8b):
    a = M.logits_and_loss(llama8b, TrainConfig(batch_size=1, seq_len=1000, loss="standard"))
    b = M.logits_and_loss(llama8b, TrainConfig(batch_size=3, seq_len=1000, loss="standard"))
    assert b == pytest.approx(3 * a, abs=3)
    assert a % 1 == 0 and a > 1000 * llama8b.vocab_size * 2  # at least the 16-bit logits


# ---- targets by layout ------------------------------------------------------
def test_phi3_fused_targets_accepted(phi3):
    assert phi3.resolve_targets(("qkv", "gate_up")) == ("qkv", "gate_up")
    assert phi3.resolve_targets(("qkv_proj",)) == ("qkv",)
    h, i, L = phi3.hidden_size, phi3.intermediate_size, phi3.num_hidden_layers
    qkv_out = phi3.q_size + 2 * phi3.kv_size
    cfg = TrainConfig(lora_rank=8, lora_targets=("qkv",))
    assert M.lora_param_count(phi3, cfg) == L * 8 * (h + qkv_out)
    all_ = M.lora_param_count(phi3, TrainConfig(lora_rank=8))
    assert all_ == L * 8 * ((h + qkv_out) + (phi3.q_size + h) + (h + 2 * i) + (i + h))
    M.estimate_memory(phi3, TrainConfig(lora_targets=("qkv", "o")))  # no error


@pytest.mark.parametrize("bad", ["q", "q_proj", "gate", "up_proj"])
def test_phi3_rejects_llama_names_and_lists_available(phi3, bad):
    with pytest.raises(ConfigError, match=rf"'{bad}'.*available: qkv \(qkv_proj\)") as e:
        phi3.resolve_targets((bad,))
    for name in ("qkv", "o", "gate_up", "down"):
        assert name in str(e.value)
    with pytest.raises(ConfigError, match="available"):
        M.estimate_memory(phi3, TrainConfig(lora_targets=(bad,)))


def test_llama_rejects_phi3_names(llama8b):
    with pytest.raises(ConfigError, match=r"'qkv'.*available: q \(q_proj\)"):
        llama8b.resolve_targets(("qkv",))


@pytest.mark.parametrize("attn, expected", [("sdpa", 2 * 8192 * 8192), ("eager", 2 * 8192 * 8192),
                                            ("flash_attention_2", 0)])
def test_packed_rows_mask_is_batch_x_seq_squared_bytes_without_flash(llama8b, attn, expected):
    cfg = TrainConfig(seq_len=8192, batch_size=2, attn=attn, packed_rows=True)
    assert M.attention_mask(llama8b, cfg) == expected  # the analytic term
    assert M.attention_mask(llama8b, cfg.with_(packed_rows=False)) == 0
    # counted: the boolean mask is among what precedes the first block (with the rotary
    # tables, which packed rows hold per row instead of per position)
    packed = M.estimate_memory(llama8b, cfg).term("attention_mask").bytes
    unpacked = M.estimate_memory(llama8b, cfg.with_(packed_rows=False)).term("attention_mask").bytes
    assert expected <= packed - unpacked <= expected + 2 * 8192 * 512 if expected else \
        packed == unpacked


def test_lean_norms_save_two_bytes_per_norm_and_hidden_element(llama8b):
    per = M.layer_activation_bytes_per_token
    off, on = per(llama8b, TrainConfig()), per(llama8b, TrainConfig(recompute_norms=True))
    assert off - on == pytest.approx(2.0 * llama8b.norms_per_layer * llama8b.hidden_size)


def test_offload_credits_tiling_and_counts_the_returned_input(llama8b):
    base = TrainConfig(seq_len=32768, mlp_chunk=2048, offload_activations=True)
    untiled = base.with_(mlp_chunk=0)
    assert M.block_backward_peak(llama8b, base) < M.block_backward_peak(llama8b, untiled)
    plain = M.block_activation_bytes(llama8b, base.with_(offload_activations=False))
    assert M.block_activation_bytes(llama8b, base) - plain == pytest.approx(
        12.2 * llama8b.hidden_size * 32768)
