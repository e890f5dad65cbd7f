"""qplan's library API: what the CLI (and the runner, and users' scripts) call.

Everything returns typed data; domain errors are raised, never printed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from qplan.errors import BadInputError, DoesNotFitError
from qplan.planner.config import FSDP_OPTIM, TrainConfig
from qplan.planner.memory import MemoryEstimate
from qplan.planner.plan import Plan, Reason
from qplan.planner.reasons import plan_reasons, policy_reasons
from qplan.planner.search import search, usable_bytes
from qplan.planner.speed import SpeedEstimate
from qplan.profiles.gpus import GIB, GpuProfile, custom_gpu
from qplan.profiles.models import ModelProfile

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(gb|gib|g)?\s*$", re.I)


def catalog(pm=None):
    """The catalogue built from the loaded plugins (cached per plugin manager)."""
    from qplan.catalog import get_catalog

    return get_catalog(pm)


def get_model(name: str, *, pm=None) -> ModelProfile:
    """A catalogue name or alias, a local model directory or config.json, or a hub id."""
    from qplan.profiles.resolve import resolve_model

    return resolve_model(name, catalog(pm).models)


def get_gpu(name: str, *, pm=None) -> GpuProfile:
    """A catalogue GPU name or alias, or a memory size (``8GB``, ``8``, ``24GiB``). A name or
    alias comes first: ``4090`` is the RTX 4090 (an alias), not a card of 4,090 GiB."""
    found = catalog(pm).gpus.find(str(name))
    if found is not None:
        return found
    m = _SIZE.match(str(name))
    if m:
        gib = float(m.group(1))
        if not 0 < gib <= 4096:
            raise BadInputError(f"GPU memory {name!r} is out of range; give GiB like 8, 24GB")
        return custom_gpu(gib)
    return catalog(pm).gpus.get(name)


_COUNT_AFTER = re.compile(r"^\s*(.+?)\s*[x×*]\s*(\d+)\s*$", re.I)
_COUNT_BEFORE = re.compile(r"^\s*(\d+)\s*[x×*]\s*(.+?)\s*$", re.I)


def split_gpu_count(name: str, *, pm=None) -> tuple[str, int | None]:
    """``rtx-4090 x2``, ``rtx-4090x2``, ``2x rtx-4090``, ``2 x 24GB``: the card and how many
    (None when ``name`` names one card). A name the catalogue (or a size) resolves whole is
    one card, whatever it ends with. BadInputError for a count outside 1..64."""
    def resolves(n: str) -> bool:
        try:
            get_gpu(n, pm=pm)
        except BadInputError:
            return False
        return True

    if resolves(name):
        return name, None
    for rx, card_at, count_at in ((_COUNT_AFTER, 1, 2), (_COUNT_BEFORE, 2, 1)):
        m = rx.match(str(name))
        if m and resolves(m.group(card_at)):
            n = int(m.group(count_at))
            if not 1 <= n <= 64:
                raise BadInputError(f"--gpu {name!r}: {n} GPUs is outside 1..64")
            return m.group(card_at), n
    return name, None


def gpus_from_card(fixed: dict[str, Any], count: int | None, card: str) -> None:
    """Put the count of ``--gpu CARD xN`` into ``fixed["gpus"]``; BadInputError when
    ``--gpus`` says another number."""
    if count is None:
        return
    if fixed.get("gpus") not in (None, count):
        raise BadInputError(f"--gpu {card!r} names {count} GPUs but --gpus says "
                            f"{fixed['gpus']}; give the number once")
    fixed["gpus"] = count


def model_ref(name: str, model: ModelProfile, *, pm=None) -> str:
    """How a plan names ``model``: its catalogue name, the absolute path of a local model
    (a plan read from another folder still finds it), or the hub id as given."""
    from pathlib import Path

    if catalog(pm).models.find(name) is not None:
        return model.name
    p = Path(name).expanduser()
    if p.exists():
        return str(p.resolve())
    return name


def check_fixed(model: ModelProfile, fixed: dict[str, Any]) -> None:
    """Refuse settings given together that cannot be meant together (BadInputError saying
    what to change); LoRA targets are checked against the model's layers."""
    if fixed.get("lora_targets"):
        model.resolve_targets(tuple(fixed["lora_targets"]))
    problems = []
    if fixed.get("offload_activations") and fixed.get("grad_ckpt") is False:
        problems.append("--offload-activations keeps checkpointed blocks' inputs in CPU "
                        "memory, so it needs gradient checkpointing: drop --no-grad-ckpt or "
                        "--offload-activations")
    if fixed.get("embed_on_cpu") and model.tie_word_embeddings:
        problems.append(f"--embed-on-cpu needs untied embeddings, but {model.name} ties its "
                        "lm_head to the embedding matrix (tie_word_embeddings), which the loss "
                        "needs on the GPU: drop --embed-on-cpu")
    if fixed.get("attn") == "sdpa" and not model.sdpa_supported:
        problems.append(no_sdpa_message(model))
    if problems:
        raise BadInputError("; ".join(problems))


def no_sdpa_message(model: ModelProfile) -> str:
    from qplan.profiles.models import NO_SDPA

    return (f"--attn sdpa: transformers has no sdpa attention for {model.name} "
            f"({NO_SDPA.get(model.model_type, model.model_type)}) and refuses to load it so; "
            "leave --attn out (qplan plans eager attention for it) or use --attn eager, or "
            "flash_attention_2 where flash-attn is installed")


@dataclass(frozen=True)
class Estimate:
    """``qplan estimate``'s answer: memory and speed of one configuration."""

    model: ModelProfile
    gpu: GpuProfile
    memory: MemoryEstimate
    speed: SpeedEstimate

    @property
    def fits(self) -> bool:
        return self.memory.peak_bytes <= self.memory.capacity_bytes


def _adjust_for(model: ModelProfile, pm=None):
    """The plugins' ``adjust_memory`` hook as a callable for the memory model (or None)."""
    from qplan.plugins.manager import get_plugin_manager

    pm = pm or get_plugin_manager()
    if not pm.hook.adjust_memory.get_hookimpls():
        return None

    def adjust(terms, cfg) -> bool:
        from qplan.plugins.calls import adjust_memory

        return adjust_memory(pm, model, cfg, terms)
    return adjust


def calibration_for(model: ModelProfile, gpu: GpuProfile, *, use: bool = True):
    """This machine's corrections for ``model`` on ``gpu`` as a function of the regime
    (:class:`qplan.planner.store.Correction`), or None (nothing recorded, or switched off
    by ``use=False`` / ``QPLAN_NO_CALIBRATION=1``)."""
    from qplan.planner import store as S

    if not use or S.disabled():
        return None
    st = _store()
    if not st.records():
        return None
    arch = S.architecture_key(model)
    return lambda regime: st.correction(gpu.name, arch, regime)


_STORES: dict = {}


def _store():
    from qplan.planner import store as S

    key = str(S.qplan_home())
    if key not in _STORES:
        _STORES[key] = S.Store()
    return _STORES[key]


def estimate(model: ModelProfile, gpu: GpuProfile, config: TrainConfig, *,
             capacity_bytes: int | None = None, pm=None, use_calibration: bool = True) -> Estimate:
    """Evaluate one fully specified configuration on ``gpu`` (corrected by this machine's
    calibration store unless ``use_calibration`` is False)."""
    if config.seq_len > model.max_position_embeddings:
        raise BadInputError(
            f"sequence length {config.seq_len} is longer than {model.name}'s context "
            f"({model.max_position_embeddings} tokens); use --seq {model.max_position_embeddings} or less")
    from qplan.planner.search import evaluate

    c = evaluate(model, gpu, config, capacity_bytes=capacity_bytes, adjust=_adjust_for(model, pm),
                 calibration=calibration_for(model, gpu, use=use_calibration))
    return Estimate(model, gpu, c.memory, c.speed)


def _env_for(cfg: TrainConfig) -> dict[str, str]:
    return {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"} if cfg.expandable_segments else {}


def make_plan(model: ModelProfile, gpu: GpuProfile, cfg: TrainConfig, *, target: int,
              model_ref: str | None = None, capacity_bytes: int | None = None, pm=None,
              extra_reasons: tuple[Reason, ...] = (), use_calibration: bool = True) -> Plan:
    """``cfg`` as a plan for ``gpu``: its estimate, environment and a reason per setting."""
    est = estimate(model, gpu, cfg, capacity_bytes=capacity_bytes, pm=pm,
                   use_calibration=use_calibration)
    return Plan(model=model_ref or model.name, gpu=gpu.name, config=cfg,
                target_effective_batch=target,
                # FSDP: loaded (and quantized) on the host, sharded onto the GPUs when wrapped
                device_map={"": "cpu"} if cfg.strategy == "fsdp" else {"": 0}, env=_env_for(cfg),
                reasons=plan_reasons(model, gpu, cfg, target) + tuple(extra_reasons),
                memory=est.memory, speed=est.speed)


def _policies(pm=None):
    from qplan.plugins.manager import get_plugin_manager

    pm = pm or get_plugin_manager()

    traces: dict = {}

    def policy(model, gpu, cfg):
        from qplan.plugins.calls import apply_plan_policies

        trace: list = []
        out = apply_plan_policies(pm, model, gpu, cfg, trace)  # chained; None if vetoed
        if out is not None and trace:
            traces[out] = trace
        return out
    policy.traces = traces  # result config -> [(plugin, {field: (old, new)})]
    return [policy]


def _policy_reasons(policies, cfg: TrainConfig) -> tuple[Reason, ...]:
    """Reasons for the fields plugins' plan policies changed in ``cfg``."""
    return tuple(r for pol in policies
                 for r in policy_reasons(getattr(pol, "traces", {}).get(cfg, ())))


def suggest(model: ModelProfile, gpu: GpuProfile, *, seq_len: int = 2048,
            target_effective_batch: int = 16, fixed: dict[str, Any] | None = None,
            flash_attn_available: bool = False,
            host_ram_bytes: int | None = None, capacity_bytes: int | None = None,
            reserve_bytes: int | None = None, use_calibration: bool = True,
            model_ref: str | None = None, pm=None, find_alternatives: bool = True) -> Plan:
    """The fastest plan that fits ``gpu``; :class:`DoesNotFitError` with alternatives if none.

    Plans are for ``qplan run``'s rows, which pack several examples (``packed_rows``)
    unless ``fixed`` says otherwise. ``reserve_bytes``: memory the card loses to other
    things (default: by the card's kind). ``find_alternatives=False`` skips the search for
    nearby plans that fit (callers that probe many settings, such as :func:`alternatives`
    itself, would otherwise recurse).
    """
    fixed = {"packed_rows": True, **(fixed or {})}
    if seq_len > model.max_position_embeddings:
        raise BadInputError(
            f"sequence length {seq_len} is longer than {model.name}'s context "
            f"({model.max_position_embeddings} tokens); use --seq {model.max_position_embeddings} or less")
    if not isinstance(target_effective_batch, int) or not 1 <= target_effective_batch <= 1 << 20:
        raise BadInputError(f"target effective batch must be an integer from 1 to {1 << 20} "
                            f"(got {target_effective_batch!r}); the default is 16")
    check_gpus_split(target_effective_batch, fixed)
    if (fixed or {}).get("compute_dtype") == "bf16" and not gpu.bf16:
        raise BadInputError(
            f"bf16 needs compute capability 8.0 or newer; {gpu.name} has {gpu.cc_str}. "
            "Leave the dtype to qplan (fp16 is chosen there) or pick an Ampere or newer card.")
    if fixed.get("offload_params") and not fixed.get("strategy"):
        fixed = {**fixed, "strategy": "fsdp"}  # offload is FSDP's
    if fixed.get("strategy") == "fsdp":
        fixed = sharded_settings(fixed)
    policies = _policies(pm)

    def run_search(fixed):
        return search(model, gpu, seq_len=seq_len, target_effective_batch=target_effective_batch,
                      fixed=fixed, flash_attn_available=flash_attn_available,
                      host_ram_bytes=host_ram_bytes,
                      capacity_bytes=capacity_bytes, reserve_bytes=reserve_bytes,
                      policies=policies, adjust=_adjust_for(model, pm),
                      calibration=calibration_for(model, gpu, use=use_calibration))

    best, seen = run_search(fixed)
    sharded = None
    if best is None and seen and (fixed.get("gpus") or 1) > 1 and not fixed.get("strategy") \
            and fixed.get("prepare") != "kbit" and not fixed.get("embed_on_cpu"):
        # no whole copy fits one GPU: shard the model across them (FSDP)
        sharded = min(seen, key=lambda c: c.memory.safe_peak_bytes)
        best, seen_fsdp = run_search(sharded_settings(fixed))
        seen = seen_fsdp or seen
    offload_tried = False
    if best is None and seen and may_offload(fixed):
        # nothing fits the GPUs, even sharded: the shards in host memory (slow, but it trains)
        offload_tried = True
        best, seen_off = run_search({**sharded_settings(fixed), "offload_params": True})
        if best is None:  # report the smallest of the plans that keep the weights on the GPU
            seen = seen or seen_off
    if best is None and not seen:
        raise BadInputError(
            f"every candidate plan for {model.name} on {gpu.name} was vetoed by a plan policy; "
            "see `qplan plugins` for the loaded policies, or limit them with QPLAN_LOAD_PLUGINS")
    if best is None:
        smallest = min(seen, key=lambda c: c.memory.peak_bytes) if seen else None
        alts = alternatives(model, gpu, seq_len=seq_len, target=target_effective_batch,
                            fixed=fixed, capacity_bytes=capacity_bytes,
                            reserve_bytes=reserve_bytes, pm=pm) if find_alternatives else []
        msg = f"nothing fits {model.name} at {seq_len} tokens on {gpu.name}"
        if smallest is not None:
            lim = usable_bytes(gpu, capacity_bytes, reserve_bytes) / GIB
            big = smallest.memory.largest()
            msg += (f": the smallest configuration needs {smallest.memory.peak_gib:.1f} GiB "
                    f"(+{smallest.memory.band_gib:.1f} GiB uncertainty) of {lim:.1f} GiB usable; "
                    f"its largest term is {big.label} ({big.gib:.1f} GiB)")
        n = fixed.get("gpus") or 1
        if n > 1 and (sharded is not None or fixed.get("strategy") == "fsdp"):
            msg += (f", even with the model sharded across the {n} GPUs (FSDP: each holds "
                    f"1/{n} of the weights; activations are not sharded)")
        elif n > 1:
            msg += (f"; with --gpus {n} and --strategy ddp every GPU holds the whole model, "
                    "so more GPUs do not make it fit: leave --strategy to qplan (or give "
                    "--strategy fsdp) to shard it")
        if offload_tried:
            msg += ("; not even with the weights in host memory (FSDP CPU offload: the "
                    "activations and the gathered blocks still need the GPU)")
        raise DoesNotFitError(msg, estimate=smallest.memory if smallest else None,
                              alternatives=alts)
    return make_plan(model, gpu, best.config, target=target_effective_batch, model_ref=model_ref,
                     capacity_bytes=capacity_bytes, pm=pm, use_calibration=use_calibration,
                     extra_reasons=_policy_reasons(policies, best.config))


@dataclass(frozen=True)
class GpuChoice:
    """:func:`choose_gpus`'s answer: the plan, why this count, and every count considered
    (count, its plan or None when nothing fits that many)."""

    plan: Plan
    why: str
    tried: tuple[tuple[int, Plan | None], ...]


def choose_gpus(model: ModelProfile, gpu: GpuProfile, *, max_gpus: int, seq_len: int = 2048,
                target_effective_batch: int = 16, min_tokens_per_s: float | None = None,
                fixed: dict[str, Any] | None = None, **kw: Any) -> GpuChoice:
    """How many of ``max_gpus`` cards to use (``qplan suggest --max-gpus N``): every count the
    effective batch splits across is planned; plans that keep the weights on the GPUs go
    before CPU-offloaded ones. Without ``min_tokens_per_s`` the fewest cards that fit; with
    it, the fewest that reach it, else the fastest (``why`` says so). DoesNotFitError (with
    the alternatives) when no count fits."""
    fixed = dict(fixed or {})
    if "gpus" in fixed:
        raise BadInputError("--max-gpus chooses the number of GPUs: drop --gpus (or the count "
                            "in --gpu CARD xN), or drop --max-gpus")
    if not isinstance(max_gpus, int) or not 1 <= max_gpus <= 64:
        raise BadInputError(f"--max-gpus must be a whole number from 1 to 64 (got {max_gpus!r})")
    counts = [n for n in range(1, max_gpus + 1) if target_effective_batch % n == 0]
    tried: list[tuple[int, Plan | None]] = []
    for n in counts:
        try:
            p = suggest(model, gpu, seq_len=seq_len, target_effective_batch=target_effective_batch,
                        fixed={**fixed, **({"gpus": n} if n > 1 else {})},
                        find_alternatives=False, **kw)
        except (DoesNotFitError, BadInputError):  # does not fit, or a fixed batch cannot split
            p = None
        tried.append((n, p))
    fits = [(n, p) for n, p in tried if p is not None]
    if not fits:  # the refusal for the most cards, with its alternatives
        suggest(model, gpu, seq_len=seq_len, target_effective_batch=target_effective_batch,
                fixed={**fixed, **({"gpus": counts[-1]} if counts[-1] > 1 else {})}, **kw)
        raise AssertionError("unreachable: suggest raised")  # pragma: no cover
    pool = [x for x in fits if not x[1].config.offload_params] or fits
    offl = " (with the weights in host memory: no count keeps them on the GPUs)" \
        if pool[0][1].config.offload_params else ""
    if min_tokens_per_s is None:
        n, p = pool[0]
        why = (f"{n} GPU{'s' if n > 1 else ''}: the fewest of up to {max_gpus} that fit"
               f"{offl}; --min-tokens-per-s X picks the fewest that reach a speed")
        return GpuChoice(p, why, tuple(tried))
    reach = [x for x in pool if x[1].speed.tokens_per_s >= min_tokens_per_s]
    if reach:
        n, p = reach[0]
        why = (f"{n} GPU{'s' if n > 1 else ''}: the fewest of up to {max_gpus} that reach "
               f"{min_tokens_per_s:,.0f} tokens/s ({p.speed.tokens_per_s:,.0f}){offl}")
    else:
        n, p = max(pool, key=lambda x: x[1].speed.tokens_per_s)
        why = (f"{n} GPU{'s' if n > 1 else ''}: no count up to {max_gpus} reaches "
               f"{min_tokens_per_s:,.0f} tokens/s; the fastest ({p.speed.tokens_per_s:,.0f})"
               f"{offl}")
    return GpuChoice(p, why, tuple(tried))


def may_offload(fixed: dict[str, Any]) -> bool:
    """Whether the search may fall back to FSDP with CPU offload of the weights: not when
    the user fixed ``offload_params`` (either way), the data-parallel strategy, kbit
    preparation or CPU embeddings (which FSDP does not take)."""
    return ("offload_params" not in fixed and fixed.get("strategy") != "ddp"
            and fixed.get("prepare") != "kbit" and not fixed.get("embed_on_cpu"))


def sharded_settings(fixed: dict[str, Any]) -> dict[str, Any]:
    """``fixed`` with strategy fsdp, and the optimizer FSDP takes unless one is fixed."""
    return {**fixed, "strategy": "fsdp", "optim": fixed.get("optim") or FSDP_OPTIM}


def check_gpus_split(target: int, fixed: dict[str, Any]) -> None:
    """Data-parallel GPUs divide each optimizer step's micro-batches among them: the target
    effective batch must split evenly (BadInputError naming the nearest that do)."""
    n = fixed.get("gpus") or 1
    if n <= 1:
        return
    a = fixed.get("grad_accum")
    if a and a % n:
        near = " or ".join(str(x) for x in ((a // n) * n, (a // n + 1) * n) if x >= 1)
        raise BadInputError(
            f"grad_accum {a} does not split across {n} GPUs: each GPU runs the same number of "
            f"micro-batches per optimizer step, so it must be a multiple of {n}; use "
            f"grad_accum {near}")
    b = fixed.get("batch_size")
    unit = n * (b or 1)
    if target % unit:
        lo, hi = (target // unit) * unit, (target // unit + 1) * unit
        near = " or ".join(str(x) for x in (lo, hi) if x >= 1)
        per = f" with a per-device batch of {b}" if b else ""
        raise BadInputError(
            f"an effective batch of {target} does not split across {n} GPUs{per}: each GPU "
            f"runs the same number of micro-batches per optimizer step, so it must be a "
            f"multiple of {unit}; use {near}")


def _longest_multiple(fits, lo: int, hi: int, step: int, best: Plan | None = None
                      ) -> tuple[int, Plan | None]:
    """Binary search for the largest k in lo..hi whose ``fits(k * step)`` gives a plan, and
    that plan; ``lo`` is taken to fit already (with ``best`` its plan, or None)."""
    while lo < hi:
        mid = (lo + hi + 1) // 2
        p = fits(mid * step)
        if p is not None:
            lo, best = mid, p
        else:
            hi = mid - 1
    return lo, best


def longest_sequence(model: ModelProfile, gpu: GpuProfile, *, target_effective_batch: int = 16,
                     fixed: dict[str, Any] | None = None, capacity_bytes: int | None = None,
                     reserve_bytes: int | None = None, use_calibration: bool = True,
                     flash_attn_available: bool = False, host_ram_bytes: int | None = None,
                     step: int = 256, pm=None) -> Plan:
    """The plan with the longest sequence that fits (``qplan suggest --longest``), with the
    weights on the GPUs; with CPU offload only when no sequence fits without it (unless
    ``fixed`` says either way): offload buys a few percent more tokens at a plan that is
    slower and loads differently."""
    fixed = dict(fixed or {})
    fixed.setdefault("batch_size", 1)

    def fits(s: int, offload: dict) -> Plan | None:
        try:
            return suggest(model, gpu, seq_len=s, target_effective_batch=target_effective_batch,
                           fixed={**fixed, **offload}, capacity_bytes=capacity_bytes,
                           reserve_bytes=reserve_bytes, use_calibration=use_calibration,
                           flash_attn_available=flash_attn_available,
                           host_ram_bytes=host_ram_bytes, pm=pm, find_alternatives=False)
        except DoesNotFitError:
            return None

    top = model.max_position_embeddings // step
    best = None
    if "offload_params" not in fixed:
        _, best = _longest_multiple(lambda s: fits(s, {"offload_params": False}), 0, top, step)
    if best is None:
        _, best = _longest_multiple(lambda s: fits(s, {}), 0, top, step)
    if best is None:
        return suggest(model, gpu, seq_len=step, target_effective_batch=target_effective_batch,
                       fixed=fixed, capacity_bytes=capacity_bytes, reserve_bytes=reserve_bytes,
                       use_calibration=use_calibration, pm=pm)
    return best


def alternatives(model: ModelProfile, gpu: GpuProfile, *, seq_len: int, target: int,
                 fixed: dict[str, Any] | None = None, capacity_bytes: int | None = None,
                 reserve_bytes: int | None = None, pm=None) -> list[str]:
    """Nearest plans that do fit: a shorter sequence, a smaller model, more of these cards
    (sharded), a bigger card, each with the weights on the GPUs; CPU offload when the user
    turned it off (``offload_params`` False)."""
    out: list[str] = []
    asked = dict(fixed or {})
    # the alternatives keep the weights on the GPUs (offload, when allowed, was tried already)
    fixed = asked if "offload_params" in asked else {**asked, "offload_params": False}

    def fits(s: int) -> Plan | None:
        try:
            return suggest(model, gpu, seq_len=s, target_effective_batch=target, fixed=fixed,
                           capacity_bytes=capacity_bytes, reserve_bytes=reserve_bytes, pm=pm,
                           find_alternatives=False)
        except DoesNotFitError:
            return None

    # halve until one fits, then the longest multiple of 256 tokens between it and the
    # asked length that fits (20,480 on a 24 GB card: 16,384 fits, not only 10,240)
    s = seq_len // 2
    p = None
    while s >= 128 and (p := fits(s)) is None:
        s //= 2
    if p is not None:
        k, q = _longest_multiple(fits, s // 256, (seq_len - 1) // 256, 256, p)
        s, p = (k * 256, q) if q is not p else (s, p)
        out.append(f"shorter sequence: --seq {s} fits ({p.peak_gib:.1f} GiB)")
    cat = catalog(pm)
    # the largest smaller model that fits: same family first, then any family
    smaller = sorted((m for m in cat.models if not m.is_moe and m.total_params < model.total_params),
                     key=lambda m: (m.family != model.family, -m.total_params))
    for m in smaller:
        try:
            p = suggest(m, gpu, seq_len=min(seq_len, m.max_position_embeddings),
                        target_effective_batch=target, capacity_bytes=capacity_bytes,
                        reserve_bytes=reserve_bytes, pm=pm, find_alternatives=False,
                        fixed={"offload_params": fixed["offload_params"]})
            out.append(f"smaller model: --model {m.name} fits ({p.peak_gib:.1f} GiB)")
            break
        except DoesNotFitError:
            continue
    if asked.get("offload_params") is False and may_offload(
            {k: v for k, v in asked.items() if k != "offload_params"}):
        try:  # the weights in host memory (turned off by the user)
            p = suggest(model, gpu, seq_len=seq_len, target_effective_batch=target,
                        fixed={**asked, "offload_params": True}, capacity_bytes=capacity_bytes,
                        reserve_bytes=reserve_bytes, pm=pm, find_alternatives=False)
            out.append(f"CPU offload: --offload-params fits ({p.peak_gib:.1f} GiB"
                       f"{' per GPU' if p.config.gpus > 1 else ''}; slow: "
                       f"~{p.speed.tokens_per_s:,.0f} tokens/s)")
        except (DoesNotFitError, BadInputError):
            pass
    have = fixed.get("gpus") or 1
    for n in (x for x in (2, 4, 8) if x > have and target % x == 0
              and not fixed.get("strategy") == "ddp"):
        try:  # the model sharded across more of these cards (a whole copy did not fit)
            p = suggest(model, gpu, seq_len=seq_len, target_effective_batch=target,
                        fixed={**fixed, "gpus": n}, capacity_bytes=capacity_bytes,
                        reserve_bytes=reserve_bytes, pm=pm, find_alternatives=False)
            how = "FSDP, the model sharded" if p.config.strategy == "fsdp" else "data-parallel"
            out.append(f"more GPUs: --gpus {n} ({how}) fits ({p.peak_gib:.1f} GiB per GPU)")
            break
        except (DoesNotFitError, BadInputError):
            continue
    bigger = sorted((g for g in cat.gpus if g.memory_gib > gpu.memory_gib), key=lambda g: g.memory_gib)
    for g in bigger:
        try:
            p = suggest(model, g, seq_len=seq_len, target_effective_batch=target, fixed=fixed,
                        reserve_bytes=reserve_bytes, pm=pm, find_alternatives=False)
            each = " per GPU" if p.config.gpus > 1 else ""
            out.append(f"bigger card: --gpu {g.name} ({g.memory_gib:g} GiB) fits "
                       f"({p.peak_gib:.1f} GiB{each})")
            break
        except DoesNotFitError:
            continue
    return out


# The order in which the runner makes a plan safer after an out-of-memory error.
SAFER_STEPS = ("halve_batch", "grad_ckpt", "paged_optimizer", "fused_loss", "lean_prepare",
               "expandable_segments", "offload_activations", "lean_norms", "tile_mlp",
               "shorter_seq")
# The tile_mlp rung splits a sequence into at least this many chunks (of >= 256 tokens): from 8
# chunks on, tiling never needs more memory for any catalogue model (tests/test_memory_properties).
TILE_MIN_CHUNKS = 8


def _halve_batch(cfg: TrainConfig) -> tuple[TrainConfig, Reason] | None:
    if cfg.batch_size <= 1:
        return None
    keys = ("batch_size", "grad_accum")
    if cfg.batch_size % 2 == 0:
        b = cfg.batch_size // 2
        return (cfg.with_(batch_size=b, grad_accum=cfg.grad_accum * 2),
                Reason(keys, f"per-device batch {cfg.batch_size} -> {b}, accumulation "
                             f"{cfg.grad_accum} -> {cfg.grad_accum * 2} (effective batch stays "
                             f"{cfg.effective_batch})"))
    eff = cfg.effective_batch  # odd batch: go to 1, the effective batch kept
    return (cfg.with_(batch_size=1, grad_accum=eff),
            Reason(keys, f"per-device batch {cfg.batch_size} -> 1, accumulation -> {eff} "
                         f"(effective batch stays {eff})"))


# The ladder after the batch: (applies to cfg, the change, why), in SAFER_STEPS order.
_RUNGS = (
    (lambda c: not c.grad_ckpt, dict(grad_ckpt=True),
     "gradient checkpointing on: keep only block inputs"),
    (lambda c: c.optim != "paged_adamw_8bit" and c.strategy != "fsdp", dict(optim="paged_adamw_8bit"),
     "optimizer {optim} -> paged_adamw_8bit"),
    (lambda c: c.loss != "fused", dict(loss="fused"), "fused loss: never materialize float32 logits"),
    (lambda c: c.prepare != "lean", dict(prepare="lean"),
     "lean preparation: keep embeddings and lm_head 16-bit"),
    (lambda c: not c.expandable_segments, dict(expandable_segments=True),
     "allocator expandable_segments: less fragmentation"),
    (lambda c: not c.offload_activations, dict(offload_activations=True),
     "offload checkpointed activations to CPU"),
    (lambda c: not c.recompute_norms, dict(recompute_norms=True),
     "lean RMSNorms: keep their 16-bit input, not a float32 copy, for backward"),
)


def next_safer_config(cfg: TrainConfig, *, allow_shorter_seq: bool = False
                      ) -> tuple[TrainConfig, Reason] | None:
    """The next configuration to try after an OOM with ``cfg``, and what changed and why.

    A smaller per-device batch keeps the effective batch exactly (accumulation doubles);
    then checkpointing, a paged optimizer, a fused loss, lean preparation, expandable
    segments, activation offloading, lean norms, a tiled MLP (sequences of at least 8 chunks of
    256 tokens); a shorter sequence only if allowed. None when nothing is left to try.
    """
    halved = _halve_batch(cfg)
    if halved is not None:
        return halved
    for applies, change, why in _RUNGS:
        if applies(cfg):
            return cfg.with_(**change), Reason(tuple(change), why.format(optim=cfg.optim))
    if not cfg.mlp_chunk and cfg.seq_len >= TILE_MIN_CHUNKS * 256:
        chunk = cfg.seq_len // TILE_MIN_CHUNKS // 256 * 256
        return (cfg.with_(mlp_chunk=chunk), Reason(("mlp_chunk",), f"MLP tiled in chunks of "
                                                   f"{chunk} tokens: its large tensors exist for one chunk"))
    if allow_shorter_seq and cfg.seq_len > 256:
        s = max(256, cfg.seq_len // 2)
        if not cfg.mlp_chunk:
            return cfg.with_(seq_len=s), Reason(("seq_len",), f"sequence {cfg.seq_len} -> {s} "
                                                              "(allowed by --allow-shorter-seq)")
        # a tiled MLP keeps its number of chunks: a sequence no longer than one chunk runs
        # untiled, and that can need more than the longer tiled one (llama-3.1-405b: 512
        # tokens in 2 chunks of 256, 206.66 GiB; 256 untiled, 206.87)
        chunk = max(1, cfg.mlp_chunk * s // cfg.seq_len)
        return (cfg.with_(seq_len=s, mlp_chunk=chunk),
                Reason(("seq_len", "mlp_chunk"), f"sequence {cfg.seq_len} -> {s}, MLP chunks "
                       f"{cfg.mlp_chunk} -> {chunk} tokens (allowed by --allow-shorter-seq)"))
    return None
