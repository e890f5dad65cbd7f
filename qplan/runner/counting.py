"""Count an architecture's activation memory with dry runs, as data the planner reads.

For each *regime* (checkpointing, lean norms, tiled MLP, packed rows, and variants: peft's
kbit preparation, LoRA dropout, eager attention, fewer LoRA targets, plain LoRA), a small
model of the architecture (the real widths, one block of each kind, a small vocabulary) is
dry-run (:mod:`qplan.runner.dryrun`) at a few batch sizes and sequence lengths, and each
measured quantity is fitted as ``a*T + c*T*s + p*s + e*b + d`` (``T`` = tokens in the
micro-batch, ``s`` = sequence length, ``b`` = batch; the ``e`` term only where an MLP is
tiled). The fits are exact on the sizes measured (their largest residual is recorded) and
are what :mod:`qplan.planner.activations` reads to estimate memory without torch.

Run ``python benchmarks/count_activations.py`` to regenerate the catalogue's figures.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from qplan.planner.activations import shape_of
from qplan.planner.config import TrainConfig

COUNT_VERSION = 2
# (batch, seq) of the dry runs: two batches and three lengths separate T, T*s and b.
# (batch, seq) of the dry runs. The fits are made on the first sizes and must hold on all of
# them (the constant is raised until no measured point is above the fit): peaks are maxima
# over the moments of a step, so only piecewise linear in the sizes, and a tiled MLP's
# backward changes which moment is the peak as sequences grow. Tiled regimes are fitted where
# tiling is used (long sequences) and checked down to short ones. Every count has more than
# 512 tokens (bitsandbytes dequantizes its weights into a buffer from there on), and a tiled
# one sequences longer than its chunk.
SIZES = ((1, 4096), (1, 16384), (2, 8192), (4, 4096), (1, 32768))
CHECK_SIZES = ((1, 131072), (8, 2048))
TILED_SIZES = ((1, 16384), (1, 65536), (2, 32768), (4, 16384), (1, 131072))
TILED_CHECK_SIZES = ((1, 4096), (2, 4096), (8, 8192), (1, 32768), (16, 4096))
# The tiled regimes run the MLP in chunks of this many tokens (the search's chunk).
COUNT_MLP_CHUNK = 2048
COUNT_VOCAB = 1024
# The fused loss of the counts takes 1024 rows a chunk of the 1024-token vocabulary: its
# logits (about 12 MiB with their gradient) are small here and the model's own vocabulary's
# come from the per-logit figures (count_loss). (Fewer, larger chunks keep a dry run fast:
# the fake-tensor dispatch costs per operation.)
COUNT_LOSS_CHUNK = 1024 * COUNT_VOCAB
COUNT_RANK = 16
# Sliding-window layers are counted with a window longer than every counted length; the
# planner treats a sequence beyond the real window like a packed one (a mask, see there).
COUNT_WINDOW = 1 << 20


@dataclass(frozen=True)
class Regime:
    """One combination of settings that changes what the blocks keep."""

    grad_ckpt: bool
    packed: bool
    recompute_norms: bool = False
    tiled: bool = False
    offload: bool = False  # checkpointed block inputs wait in host memory
    variant: str = "base"  # base, kbit, dropout, eager, attn_targets, qv_targets, lora16

    @property
    def key(self) -> str:
        parts = ["ckpt" if self.grad_ckpt else "nockpt", "packed" if self.packed else "unpacked"]
        if self.recompute_norms:
            parts.append("norms")
        if self.tiled:
            parts.append("tiled")
        if self.offload:
            parts.append("offload")
        if self.variant != "base":
            parts.append(self.variant)
        return "+".join(parts)

    def config(self, profile) -> TrainConfig:
        targets = None
        if self.variant == "attn_targets":
            targets = tuple(t for t in profile.target_names if t in ("q", "k", "v", "o", "qkv"))
        elif self.variant == "qv_targets":
            targets = ("q", "v") if not profile.fused_projections else ("qkv",)
        return TrainConfig(
            seq_len=max(s for _, s in SIZES), batch_size=1, lora_rank=COUNT_RANK,
            lora_alpha=2 * COUNT_RANK, lora_targets=targets,
            lora_dropout=0.1 if self.variant == "dropout" else 0.0,
            grad_ckpt=self.grad_ckpt, prepare="kbit" if self.variant == "kbit" else "lean",
            loss="fused", loss_chunk=COUNT_LOSS_CHUNK,
            attn="eager" if self.variant == "eager" or not profile.sdpa_supported else "sdpa",
            quant="none" if self.variant == "lora16" else "nf4",
            recompute_norms=self.recompute_norms, offload_activations=self.offload,
            mlp_chunk=COUNT_MLP_CHUNK if self.tiled else 0, packed_rows=self.packed)


def regimes() -> list[Regime]:
    """Every regime the catalogue counts: the 24 combinations of the settings the search
    chooses, then each variant with and without checkpointing and packing."""
    out = [Regime(ck, pk, rn, tl, off) for ck in (False, True) for pk in (False, True)
           for rn in (False, True) for tl in (False, True) for off in (False, True)
           if ck or not off]
    for v in ("kbit", "dropout", "eager", "attn_targets", "qv_targets", "lora16"):
        out += [Regime(ck, pk, variant=v) for ck in (False, True) for pk in (False, True)]
    return out


def counting_config(config: dict[str, Any], layer_types: list[str] | None) -> dict[str, Any]:
    """``config`` made small where it does not matter per token: one block of the first
    kind, then one of each kind (the first block differs: its input needs no gradient
    without checkpointing), a small vocabulary, and a window longer than every count."""
    d = copy.deepcopy(config)
    kinds = list(dict.fromkeys(layer_types)) if layer_types else ["full_attention"]
    types = [kinds[0]] + kinds
    d["num_hidden_layers"] = len(types)
    if layer_types:
        d["layer_types"] = types
    d["vocab_size"] = COUNT_VOCAB
    # token ids within the small vocabulary (config classes default some beyond it)
    d.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if "sliding_attention" in kinds or d.get("sliding_window"):
        d["sliding_window"] = COUNT_WINDOW
    d["max_position_embeddings"] = max(d.get("max_position_embeddings") or 0, 4096)
    return d


def _fit(rows: list[tuple[list[float], float]], n_fit: int | None = None
         ) -> tuple[list[float], float]:
    """Least squares of y on features over the first ``n_fit`` rows (all by default), then
    the constant raised until no row is above the fit: an upper envelope of every measured
    point. Returns (coefficients, largest |residual| in bytes, over every row)."""
    import numpy as np

    x = np.array([r[0] for r in rows], dtype=float)
    y = np.array([r[1] for r in rows], dtype=float)
    n = n_fit or len(rows)
    coef, *_ = np.linalg.lstsq(x[:n], y[:n], rcond=None)
    resid = y - x @ coef
    coef[-1] += max(0.0, float(resid.max()))
    return [round(float(c), 4) for c in coef], float(np.abs(resid).max())


def _fit_pieces(rows: list[tuple[list[float], float]], max_pieces: int = 3,
                tolerance: float = 0.005) -> tuple[list[list[float]], float]:
    """The upper envelope of the rows as the largest of at most ``max_pieces`` linear
    pieces (a block's backward peaks at different moments as sizes grow: which one is the
    peak changes, each moment's memory is linear in the sizes). One piece if it fits every
    row within ``tolerance`` of the largest value; else pieces found by alternating between
    fitting each piece on its rows and giving each row to the piece that is largest there,
    from several first splits (by tokens, by length, by batch), keeping the pieces whose
    envelope, raised to lie above every row, overshoots least. Returns (pieces, largest
    overshoot of the envelope in bytes)."""
    import numpy as np

    x = np.array([r[0] for r in rows], dtype=float)
    y = np.array([r[1] for r in rows], dtype=float)
    scale = max(float(np.abs(y).max()), 1.0)

    def lsq(idx):
        c, *_ = np.linalg.lstsq(x[idx], y[idx], rcond=None)
        return c

    def spread(pieces):  # the overshoot once the envelope is raised above every row
        res = y - np.max(np.stack([x @ c for c in pieces]), axis=0)
        return float(res.max() - res.min()), float(res.max())

    best = [lsq(np.arange(len(y)))]
    keys = [x[:, 0], x[:, 1], x[:, 2]] + ([x[:, 3]] if x.shape[1] == 5 else [])
    for k in range(2, max_pieces + 1):
        if spread(best)[0] <= tolerance * scale:
            break
        for key in keys:
            order = np.argsort(key, kind="stable")
            pieces = [lsq(g) for g in np.array_split(order, k)]
            for _ in range(30):
                assign = np.argmax(np.stack([x @ c for c in pieces]), axis=0)
                new = [lsq(np.where(assign == j)[0]) if (assign == j).any() else pieces[j]
                       for j in range(k)]
                if all(np.allclose(a, b, rtol=1e-9, atol=1e-6) for a, b in zip(new, pieces)):
                    break
                pieces = new
            if spread(pieces)[0] < spread(best)[0]:
                best = pieces
    over, raise_by = spread(best)
    best = [np.concatenate([c[:-1], [c[-1] + max(0.0, raise_by)]]) for c in best]
    return [[round(float(v), 4) for v in c] for c in best], over


def _features(b: int, s: int, tiled: bool) -> list[float]:
    """``T``, ``T*s`` (masks, attention biases), ``s`` (per-position tables such as rotary
    cos/sin, shared by the batch), ``b`` (one tiled MLP chunk of each row) and a constant."""
    t = b * s
    return [t, t * s, s, b, 1.0] if tiled else [t, t * s, s, 1.0]


def full_layer_types(config: dict[str, Any]) -> list[str] | None:
    """transformers' ``layer_types`` for the full model (None: every block is alike)."""
    from transformers import AutoConfig

    hf = AutoConfig.for_model(**config)
    types = getattr(hf, "layer_types", None)
    return list(types) if types else None


def count_regime(config: dict[str, Any], profile, regime: Regime,
                 layer_types: list[str] | None, *, device: str = "fake",
                 model_dir: str | None = None, sizes=None, raw: bool = False,
                 checks: bool = True) -> dict[str, Any]:
    """Fit every quantity of :class:`qplan.runner.dryrun.StepTrace` for one regime
    (``device="cuda"``: measured for real, see :class:`~qplan.runner.dryrun.DryRun`).
    ``checks``: also trace the check sizes (the fit's envelope is raised to cover them;
    the largest, 128k tokens, costs more than the fit sizes together)."""
    from qplan.runner.dryrun import DryRun

    small = counting_config(config, layer_types)
    all_sizes, n_fit = _regime_sizes(regime, sizes, checks)
    with DryRun(small, regime.config(profile), packed=regime.packed, device=device,
                model_dir=model_dir) as dr:
        traces = [dr.trace(b, s) for b, s in all_sizes]
    tiled = regime.tiled
    out: dict[str, Any] = {}
    worst = 0.0

    def fit(name, values, tiled_feature=False):
        nonlocal worst
        coef, resid = _fit([(_features(t.batch, t.seq, tiled_feature), v)
                            for t, v in zip(traces, values)], n_fit)
        worst = max(worst, resid)
        out[name] = coef

    fit("prelude", [t.prelude for t in traces])
    fit("head", [t.head for t in traces])
    fit("loss_backward", [t.loss_backward for t in traces])
    fit("entering", [t.entering for t in traces])
    fit("kept_first", [t.blocks[0].kept for t in traces])
    kinds = [b.layer_type for b in traces[0].blocks[1:]]
    out["kept"] = {}
    out["backward"] = {}
    if tiled:
        out["backward_mlp"] = {}
    for i, kind in enumerate(kinds, start=1):
        coef, r1 = _fit([(_features(t.batch, t.seq, False), t.blocks[i].kept) for t in traces],
                        n_fit)
        out["kept"][kind] = coef
        # a block's backward outside its tiled MLP grows with the tokens, inside with the
        # batch too (one chunk of every row); within each, the moment that peaks changes
        # with the sizes: each is the largest of a few linear pieces (fitted on every size)
        pieces, r2 = _fit_pieces([(_features(t.batch, t.seq, False), t.blocks[i].backward)
                                  for t in traces])
        out["backward"][kind] = pieces
        worst = max(worst, r1, r2)
        if tiled:
            pieces, r3 = _fit_pieces([(_features(t.batch, t.seq, True), t.blocks[i].backward_mlp)
                                      for t in traces])
            out["backward_mlp"][kind] = pieces
            worst = max(worst, r3)
    out["max_residual_bytes"] = round(worst)
    if raw:
        out["traces"] = [_raw_trace(t) for t in traces]
    return out


def _regime_sizes(regime: Regime, sizes, checks: bool) -> tuple[list[tuple[int, int]], int]:
    """(every batch x seq to trace, how many of them, first, the fit uses): ``sizes`` given,
    or the standard fit sizes then the check sizes; a tiled regime only past one chunk."""
    if sizes:
        fit_sizes, check = tuple(sizes), ()
    else:
        fit_sizes = TILED_SIZES if regime.tiled else SIZES
        check = (TILED_CHECK_SIZES if regime.tiled else CHECK_SIZES) if checks else ()
    keep = [(b, s) for b, s in (*fit_sizes, *check) if not regime.tiled or s > COUNT_MLP_CHUNK]
    return keep, sum(1 for b, s in fit_sizes if not regime.tiled or s > COUNT_MLP_CHUNK)


def _raw_trace(t) -> dict[str, Any]:
    return {"batch": t.batch, "seq": t.seq, "prelude": t.prelude, "head": t.head,
            "loss_backward": t.loss_backward, "entering": t.entering,
            "kept": [b.kept for b in t.blocks], "backward": [b.backward for b in t.blocks],
            "peak": t.peak}


def count_model(config: dict[str, Any], *, name: str = "",
                which: list[Regime] | None = None, device: str = "fake", sizes=None,
                raw: bool = False, checks: bool = True) -> dict[str, Any]:
    """Every regime's fitted figures for the architecture ``config`` (a config.json dict),
    with the full model's layer kinds; JSON-ready. ``device="cuda"`` measures them for real
    on a GPU instead (the yardstick of the dry run)."""
    import tempfile

    from qplan.runner.dryrun import save_random_model

    from qplan.profiles.models import ModelProfile

    profile = ModelProfile.from_config_dict(config, name=name or "model")
    types = full_layer_types(config)
    composition: dict[str, int] = {}
    for t in types or ["full_attention"] * profile.num_hidden_layers:
        composition[t] = composition.get(t, 0) + 1
    result: dict[str, Any] = {
        "version": COUNT_VERSION, "shape": shape_of(profile),  # what the figures fit
        "lora_rank": COUNT_RANK, "mlp_chunk": COUNT_MLP_CHUNK,
        "layers": composition, "first_layer": (types or ["full_attention"])[0],
        "sliding_window": _window(config, types), "regimes": {}}
    result["loss_per_logit"] = count_loss(config, profile, types, device=device)
    with tempfile.TemporaryDirectory(prefix="qplan-count-") as tmp:
        model_dir = None
        if device != "fake":  # one saved model for every regime
            save_random_model(counting_config(config, types), tmp, device)
            model_dir = tmp
        for regime in which or regimes():
            if regime.variant == "eager" and not profile.sdpa_supported:
                continue  # its base regimes are eager already
            result["regimes"][regime.key] = count_regime(config, profile, regime, types,
                                                         device=device, model_dir=model_dir,
                                                         sizes=sizes, raw=raw, checks=checks)
    result["device"] = device
    result["checks"] = checks
    return result


def count_loss(config: dict[str, Any], profile, layer_types: list[str] | None,
               *, device: str = "fake") -> dict[str, Any]:
    """Bytes per logit of each loss: kept at the end of the forward (``head``) and live at
    the peak of the loss' backward (``peak``), from two large vocabularies (so that the
    logits dominate), all the logits in one chunk. The block counts use the fused loss with
    a small vocabulary; these slopes carry them to the model's vocabulary and either loss."""
    from qplan.runner.dryrun import DryRun

    out: dict[str, Any] = {}
    sizes = ((1, 4096), (2, 4096))
    vocabs = (32 * COUNT_VOCAB, 64 * COUNT_VOCAB)
    for loss in ("fused", "standard"):
        vals = {}
        for vocab in vocabs:
            small = counting_config(config, layer_types)
            small["vocab_size"] = vocab
            cfg = Regime(True, False).config(profile).with_(loss=loss, loss_chunk=1 << 40)
            with DryRun(small, cfg, packed=False, device=device) as dr:
                vals[vocab] = [dr.trace(b, s) for b, s in sizes]
        extra = [b * s * (vocabs[1] - vocabs[0]) for b, s in sizes]
        lo, hi = vals[vocabs[0]], vals[vocabs[1]]
        out[loss] = {
            "head": round(max((t2.head - t1.head) / n for t1, t2, n in zip(lo, hi, extra)), 3),
            "peak": round(max((t2.head + t2.loss_backward - t1.head - t1.loss_backward) / n
                              for t1, t2, n in zip(lo, hi, extra)), 3)}
    return out


def _window(config: dict[str, Any], types: list[str] | None) -> int | None:
    if not types or "sliding_attention" not in types:
        return None
    from transformers import AutoConfig

    return getattr(AutoConfig.for_model(**config), "sliding_window", None)


def search_regimes() -> list[Regime]:
    """The regimes the plan search uses (no variants): what a local model needs first."""
    return [r for r in regimes() if r.variant == "base"]


def raw_config(model_ref: str, profile) -> dict[str, Any]:
    """The model's own config.json when it is a local directory or file (every field its
    transformers class reads), else the profile's fields."""
    import json
    from pathlib import Path

    p = Path(model_ref)
    f = p / "config.json" if p.is_dir() else p
    if f.is_file() and f.suffix == ".json":
        d = json.loads(f.read_text())
        if isinstance(d.get("text_config"), dict) and "hidden_size" not in d:
            inner = dict(d["text_config"])
            inner.setdefault("model_type", profile.model_type)
            d = inner
        d.pop("quantization_config", None)
        return d
    return profile.to_config_dict()


def count_to_home(model_ref: str, profile, *, which: list[Regime] | None = None):
    """Count ``profile``'s architecture and store the figures in the qplan home, where the
    planner finds them for every model of the same shape; returns the file."""
    import json

    from qplan.planner.activations import user_counts_dir
    from qplan.planner.store import architecture_key

    result = count_model(raw_config(model_ref, profile), name=profile.name,
                         which=which or search_regimes())
    result["model"] = profile.name
    d = user_counts_dir()
    d.mkdir(parents=True, exist_ok=True)
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in architecture_key(profile))
    path = d / f"{name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    return path
