"""Peak memory against sequence length, for one or more cards (``qplan plot``,
``qplan suggest --plot``).

:func:`memory_curves` computes the data (typed, for ``--json`` and tests): for each card the
settings ``qplan suggest`` chooses there, and the estimated peak of those settings at every
sequence length, with the card's memory, the limit plans keep under, the recommended point
and the longest sequence those settings fit. :func:`draw` renders it with matplotlib (the
optional extra ``qplan[plot]``), as PNG or SVG by the file's suffix.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qplan.errors import BadInputError, DoesNotFitError
from qplan.planner.config import TrainConfig
from qplan.planner.search import default_attention
from qplan.profiles.gpus import GIB

SUFFIXES = (".png", ".svg")
STEP = 128  # sequence lengths are sampled every STEP tokens (and at the powers of two)


@dataclass(frozen=True)
class Curve:
    gpu: str
    capacity_gib: float
    usable_gib: float
    settings: Any  # TrainConfig the curve holds fixed (but the sequence length)
    seq: tuple[int, ...]
    peak_gib: tuple[float, ...]
    point: tuple[int, float] | None  # the recommended (sequence, peak)
    longest_fit: int | None  # the longest sampled sequence under usable_gib with these settings
    note: str = ""


@dataclass(frozen=True)
class PlotData:
    model: str
    curves: tuple[Curve, ...] = field(default_factory=tuple)


def _lengths(hi: int) -> list[int]:
    out = set(range(STEP, hi + 1, STEP))
    p = 256
    while p <= hi:
        out.add(p)
        p *= 2
    return sorted(out)


def memory_curves(model, gpus, *, seq_len: int = 2048, target_effective_batch: int = 16,
                  fixed: dict[str, Any] | None = None, capacity_bytes: int | None = None,
                  max_seq: int | None = None, plans: dict | None = None, pm=None) -> PlotData:
    """The curves for ``gpus`` (GpuProfiles). ``plans`` (gpu name -> Plan) gives the settings
    for a card instead of planning them (``qplan suggest --plot``)."""
    from qplan import api
    from qplan.planner.search import usable_bytes

    fixed = dict(fixed or {})
    hi = min(model.max_position_embeddings, max_seq or max(4 * seq_len, 8192))
    curves = []
    for g in gpus:
        cap = capacity_bytes if capacity_bytes is not None else g.memory_bytes
        usable = usable_bytes(g, capacity_bytes)
        note = ""
        plan = (plans or {}).get(g.name)
        if plan is None:
            try:
                plan = api.suggest(model, g, seq_len=seq_len, target_effective_batch=target_effective_batch,
                                   fixed=fixed, capacity_bytes=capacity_bytes, pm=pm,
                                   find_alternatives=False)
            except DoesNotFitError:
                try:
                    plan = api.longest_sequence(model, g, target_effective_batch=target_effective_batch,
                                                fixed=fixed, capacity_bytes=capacity_bytes, pm=pm)
                    note = (f"nothing fits at {seq_len} tokens: the settings of the longest "
                            f"sequence that fits ({plan.config.seq_len})")
                except DoesNotFitError:
                    plan = None
        cfg = plan.config if plan is not None else TrainConfig(**{
            "attn": default_attention(model, g), **fixed, "seq_len": seq_len})
        if plan is None:
            note = "nothing fits this card at any sequence length: the default settings drawn"
        seqs, peaks = [], []
        for s in _lengths(hi):
            est = api.estimate(model, g, cfg.with_(seq_len=s), capacity_bytes=capacity_bytes, pm=pm)
            seqs.append(s)
            peaks.append(round(est.memory.peak_bytes / GIB, 3))
            if est.memory.peak_bytes > 1.6 * cap and s > cfg.seq_len:
                break
        under = [s for s, p in zip(seqs, peaks) if p * GIB <= usable]
        point = None
        if plan is not None:
            point = (cfg.seq_len, round(plan.memory.peak_bytes / GIB, 3))
        curves.append(Curve(gpu=g.name, capacity_gib=round(cap / GIB, 3),
                            usable_gib=round(usable / GIB, 3), settings=cfg, seq=tuple(seqs),
                            peak_gib=tuple(peaks), point=point,
                            longest_fit=max(under) if under else None, note=note))
    return PlotData(model=model.name, curves=tuple(curves))


def check_path(path: str | Path) -> Path:
    p = Path(path)
    if p.suffix.lower() not in SUFFIXES:
        raise BadInputError(f"cannot draw {str(p)!r}: the file name must end in .png or .svg")
    return p


def draw(data: PlotData, path: str | Path) -> Path:
    """Write the plot; BadInputError when matplotlib is missing or the suffix is unknown."""
    p = check_path(path)
    try:
        import matplotlib
    except ImportError:
        raise BadInputError("drawing needs matplotlib, which is not installed: pip install "
                            "'qplan[plot]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, c in enumerate(data.curves):
        col = colors[i % len(colors)]
        s = c.settings
        how = (f"batch {s.batch_size}, {'ckpt' if s.grad_ckpt else 'no ckpt'}, loss {s.loss}"
               + (", offload" if s.offload_activations else "")
               + (", CPU embeddings" if s.embed_on_cpu else ""))
        ax.plot(c.seq, c.peak_gib, color=col, lw=2, label=f"{c.gpu}: {how}")
        ax.axhline(c.capacity_gib, color=col, lw=1, ls="-", alpha=0.6)
        ax.axhline(c.usable_gib, color=col, lw=1, ls="--", alpha=0.6)
        ax.annotate(f"{c.gpu} {c.capacity_gib:g} GiB", (c.seq[0], c.capacity_gib),
                    textcoords="offset points", xytext=(2, 3), fontsize=8, color=col)
        if c.point is not None:
            ax.plot([c.point[0]], [c.point[1]], "o", color=col, ms=8)
            ax.annotate(f"recommended: {c.point[0]:,} tokens, {c.point[1]:.1f} GiB", c.point,
                        textcoords="offset points", xytext=(6, -12), fontsize=8, color=col)
        if c.longest_fit is not None and c.longest_fit != (c.point or (None,))[0]:
            y = c.peak_gib[c.seq.index(c.longest_fit)]
            ax.plot([c.longest_fit], [y], "x", color=col, ms=7)
    ax.set_xscale("log", base=2)
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{int(x):,}"))
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("estimated peak memory (GiB, as nvidia-smi shows it)")
    top = max(max(c.capacity_gib for c in data.curves) * 1.35, 1.0) if data.curves else 1.0
    ax.set_ylim(0, top)
    ax.set_title(f"{data.model}: peak memory by sequence length "
                 "(solid line: card; dashed: plan limit; x: longest that fits)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p)
    plt.close(fig)
    return p


def plot_dict(data: PlotData) -> dict[str, Any]:
    return {"model": data.model, "curves": [
        {"gpu": c.gpu, "capacity_gib": c.capacity_gib, "usable_gib": c.usable_gib,
         "settings": c.settings.to_dict(), "seq": list(c.seq), "peak_gib": list(c.peak_gib),
         "point": None if c.point is None else {"seq_len": c.point[0], "peak_gib": c.point[1]},
         "longest_fit": c.longest_fit, "note": c.note} for c in data.curves]}
