"""The plan search (api.suggest / api.longest_sequence): what it picks, what it holds fixed,
and how it fails. Checked by relationship, never by calibrated numbers."""
from __future__ import annotations

import dataclasses

import pytest

from qplan import api
from qplan.errors import DoesNotFitError, QplanError
from qplan.planner.search import candidates, default_settings, search, usable_bytes
from qplan.profiles.gpus import GIB, custom_gpu

CAT = api.catalog()
DENSE = [m for m in CAT.models if not m.is_moe]
# A spread of sizes and layouts that exist in any version of the catalogue.
MODELS = ["llama-3.2-1b", "llama-3.1-8b", "mistral-7b", "qwen2.5-7b"]
GPUS = ["rtx-4060", "rtx-4090", "h100-sxm"]


def gpu(name):
    return api.get_gpu(name)


def try_suggest(model, g, **kw):
    kw.setdefault("find_alternatives", False)
    try:
        return api.suggest(model, g, **kw)
    except DoesNotFitError:
        return None


# ---- the plan fits ------------------------------------------------------------
@pytest.mark.parametrize("gname", GPUS)
@pytest.mark.parametrize("mname", MODELS)
@pytest.mark.parametrize("seq", [512, 2048, 8192])
def test_plan_fits_usable_capacity(mname, gname, seq):
    m, g = api.get_model(mname), gpu(gname)
    p = try_suggest(m, g, seq_len=seq)
    if p is None:
        pytest.skip(f"{mname} at {seq} does not fit {gname}")
    # the peak with its uncertainty band stays under the card less its reserve
    assert p.memory.safe_peak_bytes <= usable_bytes(g) <= g.memory_bytes
    assert p.memory.band_bytes > 0
    assert p.config.seq_len == seq
    # the plan's estimate is the estimate of its config
    again = api.estimate(m, g, p.config)
    assert again.memory.peak_bytes == p.memory.peak_bytes


@pytest.mark.parametrize("cap_gib", [6, 10, 20])
def test_capacity_cap_is_respected(llama8b, cap_gib):
    g = gpu("h100-sxm")
    p = try_suggest(llama8b, g, seq_len=1024, capacity_bytes=int(cap_gib * GIB))
    assert p is None or p.memory.safe_peak_bytes <= usable_bytes(g, int(cap_gib * GIB))
    if p is not None:
        assert p.memory.peak_bytes < cap_gib * GIB


def test_usable_is_the_card_less_its_reserve():
    """Desktop cards lose memory to the display (reserved by kind, --reserve overrides);
    datacentre cards are headless. The estimate's own error is its band, not a margin here."""
    for g in CAT.gpus:
        reserve = g.memory_bytes - usable_bytes(g)
        assert reserve == (0 if g.kind == "datacenter" else reserve) and reserve >= 0
        if g.kind in ("consumer", "workstation", "laptop"):
            assert 0 < usable_bytes(g) < g.memory_bytes
        assert usable_bytes(g, reserve_bytes=int(1.5 * GIB)) == g.memory_bytes - int(1.5 * GIB)


def test_suggest_picks_the_fastest_fitting_candidate(llama8b):
    g = gpu("rtx-4090")
    best, seen = search(llama8b, g, seq_len=2048, target_effective_batch=16,
                        fixed={"packed_rows": True})  # what suggest plans for: qplan run's rows
    fitting = [c for c in seen if c.memory.safe_peak_bytes <= usable_bytes(g)]
    assert best is not None and fitting
    assert best.speed.tokens_per_s == max(c.speed.tokens_per_s for c in fitting)
    assert api.suggest(llama8b, g, seq_len=2048).config == best.config


# ---- effective batch -----------------------------------------------------------
TARGETS = [1, 2, 3, 5, 8, 12, 16, 20, 24, 32]


@pytest.mark.parametrize("gname", GPUS)
@pytest.mark.parametrize("target", TARGETS)
def test_effective_batch_reaches_target_with_least_accumulation(llama8b, gname, target):
    p = try_suggest(llama8b, gpu(gname), seq_len=1024, target_effective_batch=target)
    if p is None:
        pytest.skip("does not fit")
    c = p.config
    assert c.effective_batch >= target
    # accumulation is the least that reaches the target with this per-device batch
    assert (c.grad_accum - 1) * c.batch_size < target
    assert c.batch_size <= max(1, target)


@pytest.mark.parametrize("gname", ["rtx-4090", "h100-sxm"])
@pytest.mark.parametrize("target", [3, 5, 6, 10, 12, 20, 24])
def test_effective_batch_is_exactly_the_target_when_achievable(gname, target):
    m = api.get_model("qwen2.5-0.5b") if CAT.models.find("qwen2.5-0.5b") else api.get_model(
        "llama-3.2-1b")
    p = api.suggest(m, gpu(gname), seq_len=1024, target_effective_batch=target)
    # batch 1 x accumulation target always reaches it exactly; the search must not overshoot
    assert p.config.effective_batch == target


# ---- user-fixed settings -------------------------------------------------------
@pytest.mark.parametrize("fixed", [
    {"lora_rank": 64},
    {"grad_ckpt": False},
    {"lora_rank": 64, "grad_ckpt": False},
    {"loss": "standard", "batch_size": 2},
    {"optim": "adamw_torch", "lora_dropout": 0.05, "lora_targets": ("q", "v")},
    {"prepare": "kbit", "grad_accum": 3},
    {"offload_activations": True},
])
def test_user_fixed_settings_are_held(fixed):
    m = api.get_model("llama-3.2-1b")
    p = api.suggest(m, gpu("h100-sxm"), seq_len=512, fixed=fixed)
    for k, v in fixed.items():
        assert getattr(p.config, k) == v, k


def test_fixed_none_means_not_fixed(llama8b):
    free = api.suggest(llama8b, gpu("rtx-4090"), seq_len=1024)
    same = api.suggest(llama8b, gpu("rtx-4090"), seq_len=1024,
                       fixed={"grad_ckpt": None, "lora_rank": None})
    assert free.config == same.config


def test_every_candidate_holds_fixed_settings(llama8b):
    g = gpu("rtx-4090")
    fixed = {"lora_rank": 8, "grad_ckpt": True, "loss": "fused"}
    cands = list(candidates(llama8b, g, 2048, 16, fixed, default_settings(llama8b, g)))
    assert cands
    for c in cands:
        assert (c.lora_rank, c.grad_ckpt, c.loss) == (8, True, "fused")
        assert not (c.offload_activations and not c.grad_ckpt)


def test_a_fixed_setting_that_cannot_fit_raises(llama8b):
    with pytest.raises(DoesNotFitError):
        api.suggest(llama8b, gpu("rtx-4060"), seq_len=8192, fixed={"grad_ckpt": False})


# ---- bigger card, never slower ---------------------------------------------------
@pytest.mark.parametrize("mname", MODELS)
@pytest.mark.parametrize("seq", [512, 2048, 8192])
def test_more_memory_never_gives_a_slower_plan(mname, seq):
    """Same card speed, more memory: the search has a superset of fitting candidates (and
    may trade up to TECHNIQUE_SPEED_MARGIN of predicted speed for fewer techniques). With the
    weights on the GPU: CPU offload is a fallback for when nothing else fits, and can be
    predicted faster than a smaller card's technique-heavy plan (mistral-7b at 8192 tokens:
    625 tokens/s offloaded on 6 GiB, 592 on 8 GiB with offloaded activations and a tiled
    MLP); test_offload_only_where_nothing_else_fits covers it."""
    from qplan.planner.search import TECHNIQUE_SPEED_MARGIN

    m = api.get_model(mname)
    best = 0.0
    for gib in (6, 8, 12, 16, 24, 32, 48, 80, 141):
        p = try_suggest(m, custom_gpu(gib), seq_len=seq, fixed={"offload_params": False})
        tps = p.speed.tokens_per_s if p else 0.0
        assert tps * (1 + TECHNIQUE_SPEED_MARGIN) >= best, f"{gib} GiB slower than a smaller card"
        best = max(best, tps)


@pytest.mark.parametrize("mname", MODELS)
@pytest.mark.parametrize("seq", [512, 8192])
def test_offload_only_where_nothing_else_fits(mname, seq):
    m = api.get_model(mname)
    for gib in (4, 6, 8, 12, 24):
        p = try_suggest(m, custom_gpu(gib), seq_len=seq)
        kept = try_suggest(m, custom_gpu(gib), seq_len=seq, fixed={"offload_params": False})
        if kept is not None:
            assert p is not None and p.config == kept.config
        elif p is not None:
            assert p.config.offload_params and p.config.strategy == "fsdp"


def test_fewer_techniques_win_within_the_margin():
    """A technique must buy TECHNIQUE_SPEED_MARGIN of predicted speed to be chosen."""
    from types import SimpleNamespace as NS

    from qplan.planner.search import TECHNIQUE_SPEED_MARGIN, fastest

    plain = NS(speed=NS(tokens_per_s=100.0), techniques=0)
    near = NS(speed=NS(tokens_per_s=100.0 * (1 + TECHNIQUE_SPEED_MARGIN / 2)), techniques=2)
    far = NS(speed=NS(tokens_per_s=100.0 * (1 + 2 * TECHNIQUE_SPEED_MARGIN)), techniques=2)
    assert fastest([near, plain]) is plain
    assert fastest([near, plain, far]) is far
    assert fastest([]) is None


def _at_least_as_good(big, small):
    return (big.memory_gib >= small.memory_gib and big.tflops_16bit >= small.tflops_16bit
            and big.bandwidth_gbs >= small.bandwidth_gbs
            and big.compute_capability >= small.compute_capability)


def test_catalogue_card_that_dominates_never_gets_a_slower_plan():
    pairs = [(b, s) for b in CAT.gpus for s in CAT.gpus
             if b is not s and _at_least_as_good(b, s) and b.memory_gib > s.memory_gib]
    assert pairs
    m = api.get_model("llama-3.1-8b")
    for big, small in pairs:
        ps = try_suggest(m, small, seq_len=2048)
        if ps is None:
            continue
        pb = try_suggest(m, big, seq_len=2048)
        assert pb is not None, f"{big.name} cannot fit what {small.name} fits"
        assert pb.speed.tokens_per_s >= ps.speed.tokens_per_s, (big.name, small.name)


def test_more_memory_of_the_same_card_never_slower(llama8b):
    g = gpu("rtx-4090")
    bigger = dataclasses.replace(g, name="rtx-4090-48", memory_gib=48)
    for seq in (1024, 4096, 16384):
        small = try_suggest(llama8b, g, seq_len=seq)
        big = try_suggest(llama8b, bigger, seq_len=seq)
        if small is not None:
            assert big is not None and big.speed.tokens_per_s >= small.speed.tokens_per_s


# ---- dtype and attention from the card ---------------------------------------------
def test_fp16_below_compute_capability_8(llama8b, pre_ampere_gpu):
    for flash in (False, True):
        p = api.suggest(api.get_model("llama-3.2-1b"), pre_ampere_gpu, seq_len=1024,
                        flash_attn_available=flash)
        assert p.config.compute_dtype == "fp16"
        assert p.config.attn == "sdpa"


@pytest.mark.parametrize("g", [g for g in CAT.gpus], ids=lambda g: g.name)
@pytest.mark.parametrize("flash", [False, True])
def test_dtype_and_attention_follow_compute_capability(g, flash):
    s = default_settings(DENSE[0], g, flash_attn_available=flash)
    ampere = g.compute_capability >= (8, 0)
    assert s["compute_dtype"] == ("bf16" if ampere else "fp16")
    assert s["attn"] == ("flash_attention_2" if flash and ampere else "sdpa")


@pytest.mark.parametrize("flash", [False, True])
def test_suggest_uses_flash_attention_only_when_available_on_ampere(flash):
    p = api.suggest(api.get_model("llama-3.2-1b"), gpu("rtx-4090"), seq_len=1024,
                    flash_attn_available=flash)
    assert p.config.compute_dtype == "bf16"
    assert p.config.attn == ("flash_attention_2" if flash else "sdpa")


def test_flash_attention_fixed_on_pre_ampere_is_refused(pre_ampere_gpu):
    with pytest.raises(QplanError, match="flash_attention_2"):
        api.suggest(api.get_model("llama-3.2-1b"), pre_ampere_gpu, seq_len=1024,
                    fixed={"attn": "flash_attention_2"})


def test_bf16_fixed_on_pre_ampere_says_why(pre_ampere_gpu):
    with pytest.raises(QplanError) as e:
        api.suggest(api.get_model("llama-3.2-1b"), pre_ampere_gpu, seq_len=1024,
                    fixed={"compute_dtype": "bf16"})
    assert "bf16" in str(e.value)


# ---- does not fit --------------------------------------------------------------------
def test_405b_on_8gb_does_not_fit_with_alternatives_and_largest_term(llama405b):
    with pytest.raises(DoesNotFitError) as e:
        api.suggest(llama405b, custom_gpu(8), seq_len=2048)
    err = e.value
    assert err.estimate is not None
    largest = err.estimate.largest()
    msg = str(err)
    assert largest.label in msg
    assert largest.key == "base_weights_4bit"  # 203 GiB of 4-bit weights, by arithmetic
    assert llama405b.name in msg and "8gb" in msg
    assert all(isinstance(a, str) and "fits" in a for a in err.alternatives)
    # the smallest configuration really is over the usable memory
    assert err.estimate.peak_bytes > usable_bytes(custom_gpu(8))


def test_405b_on_8gb_offers_an_alternative(llama405b):
    with pytest.raises(DoesNotFitError) as e:
        api.suggest(llama405b, custom_gpu(8), seq_len=2048)
    assert e.value.alternatives, "no alternatives offered"


def test_does_not_fit_estimate_is_the_smallest_candidate(llama8b):
    g = custom_gpu(4)
    _, seen = search(llama8b, g, seq_len=2048, fixed={"packed_rows": True})
    with pytest.raises(DoesNotFitError) as e:
        api.suggest(llama8b, g, seq_len=2048)
    assert e.value.estimate.peak_bytes == min(c.memory.peak_bytes for c in seen)


def test_alternatives_really_fit(llama8b):
    kept = {"offload_params": False}  # the weights on the GPU (else offload fits it)
    with pytest.raises(DoesNotFitError) as e:
        api.suggest(llama8b, custom_gpu(6), seq_len=4096, fixed=kept)
    alts = e.value.alternatives
    assert any(a.startswith("CPU offload: --offload-params fits") for a in alts), alts
    for alt in alts:
        if alt.startswith("smaller model: --model "):
            name = alt.split("--model ")[1].split()[0]
            assert try_suggest(api.get_model(name), custom_gpu(6), seq_len=4096,
                               fixed=kept) is not None
        if alt.startswith("bigger card: --gpu "):
            name = alt.split("--gpu ")[1].split()[0]
            assert gpu(name).memory_gib > 6
            assert try_suggest(llama8b, gpu(name), seq_len=4096, fixed=kept) is not None
        if alt.startswith("shorter sequence: --seq "):
            s = int(alt.split("--seq ")[1].split()[0])
            assert s < 4096 and try_suggest(llama8b, custom_gpu(6), seq_len=s,
                                            fixed=kept) is not None
        if alt.startswith("CPU offload"):
            p = try_suggest(llama8b, custom_gpu(6), seq_len=4096, fixed={"offload_params": True})
            assert p is not None and p.config.offload_params


def test_the_shorter_sequence_offered_is_the_longest_that_fits():
    """Not only a halving: qwen2.5-32b at 20,480 tokens on a 24 GB card was offered 10,240
    when 16,384 fits. The offer is a multiple of 256 that fits; 256 more does not."""
    m, g = api.get_model("qwen2.5-32b"), gpu("rtx-4090")
    kept = {"offload_params": False}  # the weights on the GPU (offload fits 20,480 tokens)
    with pytest.raises(DoesNotFitError) as e:
        api.suggest(m, g, seq_len=20480, fixed=kept)
    (alt,) = [a for a in e.value.alternatives if a.startswith("shorter sequence: --seq ")]
    s = int(alt.split("--seq ")[1].split()[0])
    assert s % 256 == 0 and 10240 < s < 20480
    assert try_suggest(m, g, seq_len=s, fixed=kept) is not None
    assert try_suggest(m, g, seq_len=s + 256, fixed=kept) is None


# ---- longest sequence ----------------------------------------------------------------
@pytest.mark.parametrize("mname,gname", [("llama-3.1-8b", "rtx-4090"), ("llama-3.1-8b", "rtx-4060"),
                                         ("llama-3.2-1b", "rtx-4060"), ("mistral-7b", "h100-sxm")])
@pytest.mark.parametrize("step", [256, 1000])
def test_longest_sequence_fits_and_one_step_more_does_not(mname, gname, step):
    m, g = api.get_model(mname), gpu(gname)
    try:
        p = api.longest_sequence(m, g, step=step)
    except DoesNotFitError:
        pytest.skip("nothing fits at all")
    s = p.config.seq_len
    assert s % step == 0 and s >= step
    assert p.memory.peak_bytes <= usable_bytes(g)
    assert p.config.batch_size == 1  # the default holds the per-device batch at 1
    if s + step <= m.max_position_embeddings:  # one step more does not fit the same way
        # (with the weights on the GPU; offload, a fallback, may fit a little more)
        with pytest.raises(DoesNotFitError):
            api.suggest(m, g, seq_len=s + step, find_alternatives=False,
                        fixed={"batch_size": 1, "offload_params": p.config.offload_params})
    else:
        assert s + step > m.max_position_embeddings


def test_longest_sequence_raises_when_even_one_step_does_not_fit(llama405b):
    with pytest.raises(DoesNotFitError):
        api.longest_sequence(llama405b, custom_gpu(8))


@pytest.mark.parametrize("target", [0, -4])
def test_non_positive_target_is_bad_input(llama8b, target):
    from qplan.errors import BadInputError

    with pytest.raises(BadInputError):
        api.suggest(llama8b, gpu("rtx-4090"), seq_len=1024, target_effective_batch=target)
