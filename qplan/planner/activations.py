"""Counted activation memory: the dry-run figures of an architecture, read without torch.

``benchmarks/count_activations.py`` dry-runs real training steps of every catalogue model
(:mod:`qplan.runner.counting`) and stores, per *regime* (checkpointing, packed rows, lean
norms, tiled MLP, and variants), linear fits of what the decoder blocks keep for backward,
what one block's backward needs on top, and what lies before the first block (embeddings
output, rotary tables, attention masks) and after the last (final norm, loss). This module
finds the figures for a model and a :class:`TrainConfig` and evaluates them; the memory model
(:mod:`qplan.planner.memory`) turns them into terms.

Each fit is ``a*T + c*T*s + p*s (+ e*b) + d`` in bytes, for ``T = batch*seq`` tokens, ``s``
the sequence length, ``b`` the batch (the ``e`` term only inside a tiled MLP's backward, for
one chunk of every row; a block's backward is the larger of that piece and the rest). Regimes not counted directly are composed: a variant's difference
from the base regime (with the same checkpointing and packing) is added to the base regime
with the same lean norms and tiling.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from qplan.planner.config import TrainConfig

COUNTS_DIR = Path(__file__).resolve().parents[1] / "profiles" / "activation_counts"
SUPPORTED_VERSION = 2


@dataclass(frozen=True)
class Counts:
    """An architecture's counted figures (one ``activation_counts/<model>.json``)."""

    model: str
    layers: dict[str, int]  # layer kind -> how many the full model has
    first_layer: str
    sliding_window: int | None
    mlp_chunk: int  # the chunk of the tiled counts
    lora_rank: int  # the rank of the counts
    loss_per_logit: dict[str, dict[str, float]]
    regimes: dict[str, dict[str, Any]]
    shape: dict[str, Any]
    source: str = ""


    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "") -> "Counts":
        return cls(model=d.get("model", ""), layers=dict(d["layers"]), first_layer=d["first_layer"],
                   sliding_window=d.get("sliding_window"), mlp_chunk=int(d["mlp_chunk"]),
                   lora_rank=int(d["lora_rank"]), loss_per_logit=d["loss_per_logit"],
                   regimes=d["regimes"], shape=dict(d["shape"]), source=source)


def _signature(shape: dict[str, Any]) -> tuple:
    """What the per-block figures depend on: the shape less the number of blocks."""
    return tuple(sorted((k, v) for k, v in shape.items() if k != "num_hidden_layers"))


def shape_of(model) -> dict[str, Any]:
    return {"model_type": model.model_type, "hidden_size": model.hidden_size,
            "intermediate_size": model.intermediate_size,
            "num_hidden_layers": model.num_hidden_layers,
            "num_attention_heads": model.num_attention_heads,
            "num_key_value_heads": model.num_key_value_heads, "head_dim": model.head_size}


@lru_cache(maxsize=8)
def _index(dirs: tuple[str, ...], _stamp: float = 0.0) -> dict[tuple, Counts]:
    """Every counts file in ``dirs`` by architecture signature (the first directory wins)."""
    out: dict[tuple, Counts] = {}
    for d in dirs:
        for p in sorted(Path(d).glob("*.json")) if Path(d).is_dir() else ():
            try:
                data = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            if data.get("version") != SUPPORTED_VERSION or "shape" not in data:
                continue
            out.setdefault(_signature(data["shape"]), Counts.from_dict(data, source=str(p)))
    return out


def user_counts_dir() -> Path:
    """Where ``qplan count`` keeps the figures of architectures counted on this machine."""
    from qplan.planner.store import qplan_home

    return qplan_home() / "activation_counts"


def counts_for(model, *, extra_dirs: tuple[Path, ...] = ()) -> Counts | None:
    """The counted figures for ``model``'s architecture, or None when it has not been
    counted. Any model with a counted architecture's block type, widths and heads matches
    (a fine-tune, a local copy, a model with fewer blocks): the per-block figures are the
    same; how many blocks of each kind there are is the model's own business
    (:meth:`ModelProfile.layer_kinds`)."""
    dirs = (COUNTS_DIR, *extra_dirs, user_counts_dir())
    return _index(tuple(str(d) for d in dirs), _mtime(user_counts_dir())).get(
        _signature(shape_of(model)))


def _mtime(d: Path) -> float:
    """Changes when a count is added to ``d`` (so a new count is seen without a restart)."""
    try:
        return d.stat().st_mtime
    except OSError:
        return 0.0


# ---------------------------------------------------------------------------
def features(batch: int, seq: int, tiled: bool) -> list[float]:
    t = batch * seq
    return [t, t * seq, seq, batch, 1.0] if tiled else [t, t * seq, seq, 1.0]


def evaluate(coef, batch: int, seq: int) -> float:
    """A fit at ``batch`` x ``seq`` (either feature set, by its length); a list of fits
    (pieces) is their largest."""
    if coef and isinstance(coef[0], list):
        return max(evaluate(c, batch, seq) for c in coef)
    return sum(c * x for c, x in zip(coef, features(batch, seq, len(coef) == 5)))


def _variants(model_targets: tuple[str, ...], cfg: TrainConfig, resolved: tuple[str, ...]
              ) -> list[str]:
    """The counted variants whose differences apply to ``cfg``."""
    out = []
    if cfg.prepare == "kbit":
        out.append("kbit")
    if cfg.lora_dropout > 0:
        out.append("dropout")
    if cfg.attn == "eager":
        out.append("eager")
    if cfg.quant == "none":
        out.append("lora16")
    if set(resolved) != set(model_targets):
        attn = {"q", "k", "v", "o", "qkv"}
        if set(resolved) <= {"q", "v"} or resolved == ("qkv",):
            out.append("qv_targets")
        elif set(resolved) <= attn:
            out.append("attn_targets")
        # other subsets keep the all-targets figures (an over-estimate)
    return out


@dataclass(frozen=True)
class RegimeFigures:
    """The fits that apply to one configuration, composed from the counted regimes."""

    key: str
    prelude: list[float]
    head: list[float]
    loss_backward: list[float]
    entering: list[float]
    kept_first: list[float]
    kept: dict[str, list[float]]
    backward: dict[str, list[float]]
    backward_mlp: dict[str, list[float]]  # inside a tiled MLP's backward (empty: not tiled)
    composed_from: tuple[str, ...]


def _add(a, b, sign: float = 1.0):
    """``a + sign*b`` where ``b`` may lack the tiled ``b`` feature (4 vs 5 coefficients).
    Pieces (lists of fits): ``b``'s single fit, or its largest piece at no particular size
    (the difference of a variant), is added to each of ``a``'s pieces."""
    if a and isinstance(a[0], list):
        return [_add(p, b, sign) for p in a]
    if b and isinstance(b[0], list):
        b = b[0] if len(b) == 1 else [max(col) if sign > 0 else min(col) for col in zip(*b)]
    if len(a) == len(b):
        return [x + sign * y for x, y in zip(a, b)]
    if len(a) == 5 and len(b) == 4:
        return [a[0] + sign * b[0], a[1] + sign * b[1], a[2] + sign * b[2], a[3], a[4] + sign * b[3]]
    raise ValueError("incompatible fits")


def regime_key(grad_ckpt: bool, packed: bool, norms: bool, tiled: bool, variant: str = "",
               offload: bool = False) -> str:
    parts = ["ckpt" if grad_ckpt else "nockpt", "packed" if packed else "unpacked"]
    if norms:
        parts.append("norms")
    if tiled:
        parts.append("tiled")
    if offload:
        parts.append("offload")
    if variant:
        parts.append(variant)
    return "+".join(parts)


def figures(counts: Counts, cfg: TrainConfig, *, packed: bool, tiled: bool,
            model_targets: tuple[str, ...], resolved_targets: tuple[str, ...]) -> RegimeFigures:
    """The fits for ``cfg`` (``packed``: a mask keeps examples apart; ``tiled``: the MLP runs
    in chunks at this length)."""
    key = regime_key(cfg.grad_ckpt, packed, cfg.recompute_norms, tiled,
                     offload=cfg.offload_activations and cfg.grad_ckpt)
    base = counts.regimes[key]
    parts = [key]
    fields = ("prelude", "head", "loss_backward", "entering", "kept_first")
    vals = {f: list(base[f]) for f in fields}
    kept = {k: list(v) for k, v in base["kept"].items()}
    backward = {k: list(v) for k, v in base["backward"].items()}
    backward_mlp = {k: list(v) for k, v in base.get("backward_mlp", {}).items()}
    plain = counts.regimes[regime_key(cfg.grad_ckpt, packed, False, False)]
    for v in _variants(model_targets, cfg, resolved_targets):
        var = counts.regimes.get(regime_key(cfg.grad_ckpt, packed, False, False, v))
        if var is None:
            continue
        parts.append(v)
        for f in fields:
            vals[f] = _add(vals[f], _add(var[f], plain[f], -1.0))
        for k in kept:
            kept[k] = _add(kept[k], _add(var["kept"][k], plain["kept"][k], -1.0))
            delta = _add(var["backward"][k], plain["backward"][k], -1.0)
            backward[k] = _add(backward[k], delta)
            if k in backward_mlp:
                backward_mlp[k] = _add(backward_mlp[k], delta)
    return RegimeFigures(key=key, kept=kept, backward=backward, backward_mlp=backward_mlp,
                         composed_from=tuple(parts), **vals)
