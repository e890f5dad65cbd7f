"""Fit the speed model's coefficients to measured steps, and say how well it predicts.

Reads the speed grid's measurements (``benchmarks/speed_grid.py`` on the H200:
``results/raw/h200_speed_grid*.jsonl``), computes each configuration's features
(:func:`qplan.planner.speed.speed_features`: work over the GPU's datasheet rates, and counts
of fixed costs), and fits non-negative coefficients minimising the *relative* error of the
predicted step time (exact non-negative least squares: every subset of the features, the best
all-non-negative solution). The ranking points (``rank:*``, capped to a card) are held out of
the fit entirely; the grid's error is also reported leave-one-model-out (fit without the
model, predict it), the figure that says how the model does on an architecture it has not
seen.

    python benchmarks/speed_fit.py            # report to stdout
    python benchmarks/speed_fit.py --write    # also results/speed_fit.md and .json
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import re
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # speed_grid: the repeats' summary

from qplan import api  # noqa: E402
from qplan.planner import speed as S  # noqa: E402
from qplan.planner.config import TrainConfig  # noqa: E402

RAW = sorted((ROOT / "benchmarks/results/raw").glob("h200_speed_grid*.jsonl"))
NAMES = ("matmul", "head", "dequant", "attention", "activations", "linear_passes", "loss_chunks",
         "norm_passes", "micro_batch")
# lower bounds: no kernel beats 75% of the datasheet tensor rate (a fit below would be
# another term's time leaking into this one, and wrong on a compute-bound card)
LOWER = {"matmul": 1 / 0.75, "head": 1 / 0.75, "attention": 1 / 0.75}


def load(paths=RAW) -> list[dict]:
    gpu = api.get_gpu("h200")
    rows = []
    for p in paths:
        for line in Path(p).read_text().splitlines():
            r = json.loads(line)
            if r.get("status") != "ok":
                continue
            model = api.get_model(r["model"])
            if r.get("layers"):
                model = dataclasses.replace(model, num_hidden_layers=int(r["layers"]))
            cfg = TrainConfig.from_dict(r["settings"])
            feats = S.speed_features(model, cfg, gpu)
            # what the fit does not model: transfers (GPU side), chunk costs (host side),
            # the optimizer step
            rows.append(dict(tag=r["tag"], model=r["model"], layers=r.get("layers"), cfg=cfg,
                             profile=model, feats=feats, tr=S.transfer_s(model, cfg, gpu),
                             fixed=S._fixed_s(model, cfg), opt=S.optimizer_s(model, cfg, gpu),
                             step_s=statistics.median(r["step_s"]),
                             chosen=r.get("chosen", False), measured=r["tokens_per_s"]))
    return rows


# speed_check's held-out rounds kept out of the fit: predicted by the fitted model before
# they ran, they stay its held-out check (results/speed_check.md)
UNFITTED_ROUNDS = {4}


def load_fresh() -> list[dict]:
    """The plans of ``benchmarks/speed_check.py`` (held-out models' chosen plans and the
    ranking pairs' candidates, each timed in its own fresh process, ``accum`` micro-batches
    and an optimizer step a timed step), as fit rows: per micro-batch, with the optimizer's
    time shared over the step's micro-batches. The seeds' items (kbit, dropout) and the rounds of
    :data:`UNFITTED_ROUNDS` are left out."""
    import speed_check as K

    gpu = api.get_gpu("h200")
    by = K.load()
    rows = []
    for it in json.loads(K.ITEMS.read_text()):
        m = K._median(by.get(it["name"], []))
        if it["part"] == "seeds" or not m or it.get("round") in UNFITTED_ROUNDS:
            continue
        prof = K.profile_of(it["model"], it["layers"])
        acc = int(it["accum"])
        cfg = TrainConfig.from_dict(it["settings"]).with_(grad_accum=acc)
        rows.append(dict(tag="fresh", part=it["part"], name=it["name"], model=it["model"],
                         layers=it["layers"], cfg=cfg, profile=prof,
                         feats=S.speed_features(prof, cfg, gpu), tr=S.transfer_s(prof, cfg, gpu),
                         fixed=S._fixed_s(prof, cfg), opt=S.optimizer_s(prof, cfg, gpu) / acc,
                         step_s=cfg.tokens_per_step / m / acc, chosen=it.get("chosen", False),
                         measured=m, processes=len(by[it["name"]])))
    return rows


def _config_key(r: dict) -> tuple:
    return r["model"], r["layers"] or None, r["cfg"].with_(grad_accum=1)


def all_rows() -> list[dict]:
    """What the fit reads: the grid (and the old ranking rows it reports) and the fresh rows;
    a grid configuration timed again in fresh processes (speed_check's ``grid`` part) counts
    by those, its one-process row is left out."""
    fresh = load_fresh()
    again = {_config_key(r) for r in fresh if r["part"] == "grid"}
    return [r for r in load() if r["tag"] != "grid" or _config_key(r) not in again] + fresh


def nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Non-negative least squares, min |a x - b| over x >= 0 (Lawson and Hanson's active-set
    method: the problem is convex, so this is its exact optimum; tests/test_speed.py checks it
    against every subset of columns)."""
    n = a.shape[1]
    x = np.zeros(n)
    free = np.zeros(n, dtype=bool)  # the columns not held at zero
    tol = 1e-12 * max(1.0, float(np.abs(a).max()) * float(np.abs(b).max()))
    for _ in range(3 * n + 10):
        w = a.T @ (b - a @ x)
        if free.all() or w[~free].max() <= tol:
            break
        free[np.argmax(np.where(free, -np.inf, w))] = True
        while True:
            z = np.zeros(n)
            z[free], *_ = np.linalg.lstsq(a[:, free], b, rcond=None)
            if (z[free] > 0).all():
                x = z
                break
            neg = free & (z <= 0)
            alpha = float(np.min(x[neg] / (x[neg] - z[neg])))
            x = x + alpha * (z - x)
            free &= x > tol
            x[~free] = 0.0
    return x


HOST, LOSS_PHASE = S.HOST_TERMS, S.LOSS_PHASE  # host work; the output layer and loss phase
# (the host's share added to the GPU's time, the GPU's to the host's: speed.overlapped)
OVERLAPS = tuple((g / 10, h / 10) for g in range(11) for h in range(11))


def _fit_at(rows: list[dict], overlap: tuple[float, float]) -> tuple[dict[str, float], float]:
    """Coefficients for one overlap pair, minimising the relative error of the predicted step
    time: each phase of each point (the blocks; the output layer and loss) is host-bound or
    GPU-bound (the larger of the GPU's time plus a share of the host's and the host's plus a
    share of the GPU's, ``overlap``: :func:`qplan.planner.speed.overlapped`); alternate
    between assigning the phases and solving, from all GPU-bound. Returns (coefficients, error)."""
    og, oh = overlap
    used = [n for n in NAMES if any(r["feats"][n] for r in rows)]
    lb = np.array([LOWER.get(n, 0.0) for n in used])
    host = np.array([n in HOST for n in used])
    loss = np.array([n in LOSS_PHASE for n in used])
    f = np.array([[r["feats"][n] for n in used] for r in rows])
    step = np.array([r["step_s"] for r in rows])
    tr, fixed, opt = (np.array([r[k] for r in rows]) for k in ("tr", "fixed", "opt"))
    # True: host-bound; the blocks' phase and the loss phase
    bound_b = np.zeros(len(rows), dtype=bool)
    bound_l = np.zeros(len(rows), dtype=bool)

    def weights(bound):  # a feature's weight in its phase, per row
        return np.where(bound[:, None], np.where(host, 1.0, oh), np.where(host, og, 1.0))

    for _ in range(50):
        w = np.where(loss, weights(bound_l), weights(bound_b))
        a = f * w / step[:, None]
        known = np.where(bound_b, fixed + oh * tr, tr + og * fixed)
        b = (step - opt - known) / step
        x = nnls(a, b - a @ lb) + lb  # x = lb + y, y >= 0
        gb, hb = (f * (~host & ~loss)) @ x + tr, (f * (host & ~loss)) @ x + fixed
        gl, hl = (f * (~host & loss)) @ x, (f * (host & loss)) @ x
        new_b, new_l = hb + oh * gb > gb + og * hb, hl + oh * gl > gl + og * hl
        if np.array_equal(new_b, bound_b) and np.array_equal(new_l, bound_l):
            break
        bound_b, bound_l = new_b, new_l
    pred = (np.maximum(hb + oh * gb, gb + og * hb) + np.maximum(hl + oh * gl, gl + og * hl)
            + opt)
    k = {n: LOWER.get(n, 0.0) for n in NAMES}
    k.update({n: float(v) for n, v in zip(used, x)})
    return k, float(np.sum((pred / step - 1) ** 2))


def fit(rows: list[dict]) -> tuple[dict[str, float], float]:
    """Coefficients and the overlap (of :data:`OVERLAPS`) that fit ``rows`` best."""
    best = min(((*_fit_at(rows, o), o) for o in OVERLAPS), key=lambda t: t[1])
    return best[0], best[2]


def predict(r: dict, k: tuple[dict[str, float], float]) -> float:
    gpu = api.get_gpu("h200")
    return S.estimate_speed(r["profile"], r["cfg"], gpu, coefficients=k[0],
                            overlap=k[1]).tokens_per_s


def report(rows: list[dict]) -> tuple[str, dict]:
    fitted = [r for r in rows if r["tag"] in ("grid", "fresh")]
    grid = [r for r in rows if r["tag"] == "grid"]
    held = [r for r in rows if r["tag"] not in ("grid", "fresh")]
    k = fit(fitted)
    lines = ["# Speed model: fit and held-out error (H200)", "",
             "Made by `python benchmarks/speed_fit.py --write` from two kinds of measurement, "
             "fitted together:", "",
             "- the grid: " + ", ".join(f"`{p.relative_to(ROOT)}`" for p in RAW)
             + " (`benchmarks/speed_grid.py`: steady-state steps, median of 4 after 2 warm-up,"
             " bf16 autocast, one configuration after another on one loaded model, one "
             "micro-batch a step); the grid's configurations at batch 1 and those the fit "
             "of stop 21 missed by 15% or more were timed again in fresh processes (speed_check's "
             "`grid` part), and those rows replace their one-process ones;",
             "- the plans the search makes (`benchmarks/speed_check.py`, "
             "[speed_check.md](speed_check.md)): the chosen plans of three held-out rounds (models, "
             "cards and lengths not measured before) and the candidates of 3 ranking pairs, each "
             "configuration in its own fresh process, its accumulation (at most 4 micro-batches) "
             "and an optimizer step a timed step.", "",
             "Each micro-batch is two phases, each with its GPU work and host work overlapped "
             "(`qplan.planner.speed.overlapped`): the blocks, then the output layer and the loss.",
             "",
             "## Coefficients (seconds per feature unit; rate-bound terms: 1 / efficiency)", ""]
    for n in NAMES:
        lines.append(f"- `{n}`: {k[0][n]:.4g}")
    lines.append(f"- overlap: the larger of the GPU's time + {k[1][0]:.4g} x the host's and the "
                 f"host's time + {k[1][1]:.4g} x the GPU's")
    # leave-one-model-out: every row predicted by a fit without its model
    _, _, errs = lomo(fitted)
    table = []
    for r in fitted:
        c, e = r["cfg"], errs[id(r)]
        blocks = '' if not r['layers'] else ' (' + str(r['layers']) + ' blocks)'
        table.append(f"| {r['model']}{blocks} | {'grid' if r['tag'] == 'grid' else r['part']} | "
                     f"{_plan(c)} | {r['measured']:.0f} | {predict(r, k):.0f} | "
                     f"{r['measured'] * (1 + e):.0f} | {e:+.0%} |")

    def stats(sel) -> tuple[float, float, int, int]:
        e = [errs[id(r)] for r in fitted if sel(r)]
        a = sorted(abs(x) for x in e)
        return statistics.median(a), max(e, key=abs), sum(x <= .25 for x in a), len(e)

    parts = {"all": lambda r: True,
             "search's plans, fresh processes": lambda r: r["tag"] == "fresh" and r["part"] != "grid",
             "grid, fresh processes": lambda r: r["tag"] == "fresh" and r["part"] == "grid",
             "grid, one process (batch above 1)": lambda r: r["tag"] == "grid"}
    s_all = stats(parts["all"])
    base_lomo = (s_all[0], s_all[1], None)
    models = len({r["model"] for r in fitted})
    lines += ["", f"## Fitted: {len(fitted)} configurations, {models} models", "",
              "Leave-one-model-out error of predicted tokens/s (each model predicted by a fit "
              "without it):", "", "| rows | n | median abs | worst | within 25% |",
              "|---|---|---|---|---|"]
    summary = {"coefficients": k[0], "overlap": k[1], "grid_points": len(grid),
               "fresh_points": len(fitted) - len(grid), "models": models,
               "held_out_median_abs_error": s_all[0], "held_out_worst_error": s_all[1],
               "by_rows": {}}
    for name, sel in parts.items():
        if not any(sel(r) for r in fitted):
            continue
        med, worst, ok, n = stats(sel)
        summary["by_rows"][name] = {"n": n, "median_abs": med, "worst": worst, "within_25": ok}
        lines.append(f"| {name} | {n} | {med:.1%} | {worst:+.0%} | {ok}/{n} |")
    lines += ["", "| model | rows | plan | measured tok/s | fitted (all) | held-out model | "
              "held-out error |", "|---|---|---|---|---|---|---|", *table]
    if held:
        lines += ["", "## Earlier ranking check (one process; superseded by speed_check.md)", "",
                  "Kept for the record: plans the search made with an RTX 4090's and 4070's "
                  "datasheet rates, timed one after another in one process (the calibration "
                  "README's trap), so the 'chosen for the card' column compares a plan chosen "
                  "for another GPU's rates; [speed_check.md](speed_check.md) measures the plans "
                  "chosen for the H200's rates under the card's memory, each in its own process. "
                  "The search's candidates that fit the card, each timed on the H200 with the "
                  "allocator capped to the card. Predictions are for the H200 (where they ran): "
                  "the check is whether the model orders plans the way the GPU does. Plans that differ "
                  "only in small techniques (embeddings on CPU, recomputed norms) measured "
                  "3440-5990 tok/s at batch 1: on the H200 a batch-1 step is host-bound, and "
                  "that spread is the repeatability of such a measurement.", "",
                  "| tag | plan | chosen | measured tok/s | predicted (H200) | error |",
                  "|---|---|---|---|---|---|"]
        pairs = []
        for r in held:
            c, p = r["cfg"], predict(r, k)
            pairs.append((r["measured"], p, r["chosen"]))
            lines.append(f"| {r['tag']} {r['model']} | {c.seq_len}x{c.batch_size} ckpt "
                         f"{'on' if c.grad_ckpt else 'off'} {c.loss} loss, rank {c.lora_rank}"
                         f"{', mlp chunk ' + str(c.mlp_chunk) if c.mlp_chunk else ''}"
                         f"{', offload' if c.offload_activations else ''}"
                         f"{', embeddings on CPU' if c.embed_on_cpu else ''}"
                         f"{', norms recomputed' if c.recompute_norms else ''} | "
                         f"{'yes' if r['chosen'] else ''} | {r['measured']:.0f} | {p:.0f} | "
                         f"{p / r['measured'] - 1:+.0%} |")
        meas = [m for m, _, _ in pairs]
        pred = [p for _, p, _ in pairs]
        rank_m = np.argsort(np.argsort(-np.array(meas)))
        rank_p = np.argsort(np.argsort(-np.array(pred)))
        n = len(pairs)
        rho = 1 - 6 * float(np.sum((rank_m - rank_p) ** 2)) / (n * (n * n - 1)) if n > 1 else 1.0
        lines += ["", f"Spearman rank correlation {rho:.2f} over {n} plans.", "",
                  "Per pair: the measured tokens/s of the plan the search chose for the card "
                  "(its datasheet rates), and of the plan this fit ranks first for the H200 "
                  "(where they ran), as a share of the fastest measured plan of the pair:", "",
                  "| pair | plans | chosen for the card | first by the fit (H200) | fastest measured |",
                  "|---|---|---|---|---|"]
        per_pair = {}
        for tag in dict.fromkeys(r["tag"] + " " + r["model"] for r in held):
            rs = [(r, pr) for r, pr in zip(held, pred) if r["tag"] + " " + r["model"] == tag]
            best = max(r["measured"] for r, _ in rs)
            chosen = [r["measured"] for r, _ in rs if r["chosen"]]
            first = max(rs, key=lambda t: t[1])[0]["measured"]
            per_pair[tag] = {"plans": len(rs), "chosen": chosen[-1] / best if chosen else None,
                             "first_by_fit": first / best}
            lines.append(f"| {tag} | {len(rs)} | "
                         + (f"{chosen[-1]:.0f} ({chosen[-1] / best:.0%})" if chosen else "n/a")
                         + f" | {first:.0f} ({first / best:.0%}) | {best:.0f} |")
        seeds = {r["chosen"]: r["measured"] for r in held if r["tag"] == "seeds"}
        if len(seeds) == 2:
            lines += ["", f"Seeds' recipe vs the auto plan (Llama-3.1-8B, 2048 tokens, H200): "
                      f"{seeds[True]:.0f} vs {seeds[False]:.0f} tok/s, "
                      f"{seeds[True] / seeds[False]:.2f}x."]
            summary["seeds_speedup"] = seeds[True] / seeds[False]
        summary.update(rank_spearman=rho, rank_pairs=per_pair)
    if REPEAT:
        more, summary["repeatability"] = repeat_section(fitted, k, base_lomo)
        lines += more
    return "\n".join(lines) + "\n", summary


# --- repeatability: fresh-process repeats (speed_grid.py --repeat) ---------------------------
REPEAT = sorted((ROOT / "benchmarks/results/raw").glob("h200_speed_repeat*.jsonl"))


def _key(r: dict) -> tuple:
    return (r["model"], r.get("layers") or None, TrainConfig.from_dict(r["settings"]))


def repeat_rows(paths=None, grid_paths=None) -> list[dict]:
    """Per configuration of the fresh-process repeats (first-seen order): the summary of
    :func:`speed_grid.repeat_summary`, the within-process spread of the step times, and the
    one-process values of the same model and settings in the grid files (any tag and cap)."""
    import speed_grid

    recs = [json.loads(x) for p in paths or REPEAT for x in Path(p).read_text().splitlines()]
    one = [json.loads(x) for p in grid_paths or RAW for x in Path(p).read_text().splitlines()]
    one = [r for r in one if r.get("status") == "ok"]
    out = []
    for s in speed_grid.repeat_summary(recs):
        rs = [r for r in recs if r["item"] == s["item"] and r.get("status") == "ok"]
        key = _key(rs[0] if rs else s)
        s["within_cv"] = statistics.median(
            statistics.stdev(r["step_s"]) / statistics.fmean(r["step_s"]) for r in rs
            if len(r["step_s"]) > 1) if rs else None
        s["one_process"] = [(r["tag"], r.get("cap_gib"), r["tokens_per_s"]) for r in one
                            if _key(r) == key]
        every = s["tokens_per_s"] + [t for _, _, t in s["one_process"]]
        s["cv_all"] = (statistics.stdev(every) / statistics.fmean(every), len(every)) \
            if len(every) > 1 else None
        s["cfg"] = key[2]
        out.append(s)
    return out


def substituted(grid: list[dict], reps: list[dict]) -> tuple[list[dict], list[dict]]:
    """The grid rows with a fresh-process median (uncapped repeats of the same model and
    settings) in place of the one-process value; and the rows replaced."""
    fresh = {(s["model"], s["layers"] or None, s["cfg"]): s["median"] for s in reps
             if not s["cap_gib"] and s["median"]}
    out, changed = [], []
    for r in grid:
        m = fresh.get((r["model"], r["layers"] or None, r["cfg"]))
        if m is None:
            out.append(r)
            continue
        tokens = r["cfg"].seq_len * r["cfg"].batch_size
        nr = {**r, "measured": m, "step_s": tokens / m}
        out.append(nr)
        changed.append(nr)
    return out, changed


def lomo(grid: list[dict]) -> tuple[float, float, dict]:
    """Leave-one-model-out: (median |error|, worst error, error per row id)."""
    errs = {}
    for model in dict.fromkeys(r["model"] for r in grid):
        kk = fit([x for x in grid if x["model"] != model])
        for r in grid:
            if r["model"] == model:
                errs[id(r)] = predict(r, kk) / r["measured"] - 1
    e = list(errs.values())
    return statistics.median(abs(x) for x in e), max(e, key=abs), errs


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def _plan(c: TrainConfig) -> str:
    return (f"{c.seq_len}x{c.batch_size} ckpt {'on' if c.grad_ckpt else 'off'} {c.loss}"
            f"{' packed' if c.packed_rows else ''}{', embeddings on CPU' if c.embed_on_cpu else ''}"
            f"{', norms recomputed' if c.recompute_norms else ''}")


def repeat_section(grid: list[dict], k, base_lomo) -> tuple[list[str], dict]:
    """The report's Repeatability section, and its summary figures."""
    reps = repeat_rows()
    recs = [json.loads(x) for p in REPEAT for x in Path(p).read_text().splitlines()]
    ok = [r for r in recs if r.get("status") == "ok"]
    steps = sorted({(r.get("warmup"), r.get("steps")) for r in ok})
    alloc = sorted({r.get("alloc_conf") or "default" for r in ok})
    lines = ["", "## Repeatability: each configuration in its own process", "",
             "From " + ", ".join(f"`{_rel(p)}`" for p in REPEAT)
             + " (`benchmarks/speed_grid.py --repeat noise`): each configuration timed in a "
             "fresh process (the saved model loaded, timed, the process ended), rounds "
             "interleaved (A B C A B C ...), "
             + ", ".join(f"{w} warm-up + {n} timed steps" for w, n in steps)
             + f", allocator `{', '.join(alloc)}` as the trainer sets it, on "
             + ", ".join(sorted({r.get('gpu', '?') for r in ok})) + ". Tokens/s of a process: "
             "the batch's tokens over its median step. CV: sample standard deviation over "
             "mean of the processes' tokens/s; within: the median over processes of the CV of "
             "their 8 step times. One-process: the same model and settings in the grid files "
             "(one configuration after another on one loaded model; rank rows capped to the "
             "card as noted).", "",
             "| configuration | plan | cap GiB | tok/s per process | min / median / max | CV "
             "| within | alloc retries | peak reserved GiB | one-process tok/s | fresh median "
             "vs one-process | CV of all (n) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in reps:
        one = s["one_process"]
        ones = ", ".join(f"{t:.0f}" + (f" (cap {c:.2f})" if c else "") for _, c, t in one)
        bias = ", ".join(f"{s['median'] / t - 1:+.0%}" for _, _, t in one) if s["median"] else ""
        cap = f"{s['cap_gib']:.2f}" if s["cap_gib"] else "-"
        blocks = f" ({s['layers']} blocks)" if s["layers"] else ""
        lines.append(
            f"| {s['item']} | {s['model']}{blocks} {_plan(s['cfg'])} | {cap}"
            f" | {' / '.join(f'{x:.0f}' for x in s['tokens_per_s'])}"
            + (f" ({', '.join(s['failed'])})" if s["failed"] else "")
            + (f" | {s['min']:.0f} / {s['median']:.0f} / {s['max']:.0f}" if s["median"] else " | -")
            + (f" | {s['cv']:.1%}" if s["cv"] is not None else " | -")
            + (f" | {s['within_cv']:.1%}" if s["within_cv"] is not None else " | -")
            + f" | {', '.join(str(x) for x in s['alloc_retries'])}"
            + f" | {', '.join(f'{x:.1f}' for x in s['peak_reserved_gib'] if x is not None)}"
            + f" | {ones or '-'} | {bias or '-'}"
            + (f" | {s['cv_all'][0]:.1%} ({s['cv_all'][1]}) |" if s["cv_all"] else " | - |"))
    cvs = [s["cv"] for s in reps if s["cv"] is not None]
    summary: dict = {"configurations": len(reps), "processes": len(recs),
                     "cv_median": statistics.median(cvs) if cvs else None,
                     "cv_max": max(cvs) if cvs else None}
    counts = collections.Counter(s["runs"] for s in reps)
    builds = [int(m) for p in REPEAT if p.with_suffix(".log").exists()
              for m in re.findall(r"built .* in (\d+) s", p.with_suffix(".log").read_text())]
    if ok and all("wall_s" in r and "load_s" in r for r in ok):
        lines += ["", f"{len(recs)} processes ran: "
                  + ", ".join(f"{c} configuration{'s' * (c > 1)} {n} time{'s' * (n > 1)}"
                              for n, c in sorted(counts.items(), reverse=True))
                  + ". A fresh process took "
                  f"{min(r['wall_s'] for r in ok):.0f}-{max(r['wall_s'] for r in ok):.0f} s "
                  f"(loading the libraries and the 4-bit model {min(r['load_s'] for r in ok):.0f}-"
                  f"{max(r['load_s'] for r in ok):.0f} s) whatever the model's size"
                  + (f", building a model {min(builds)}-{max(builds)} s" if builds else "") + "."]
    if cvs:
        spans = [s["max"] / s["min"] - 1 for s in reps if s["median"] and len(s["tokens_per_s"]) > 1]
        lines += ["", f"Spread across fresh processes: CV median {statistics.median(cvs):.1%}, "
                  f"largest {max(cvs):.1%} over {len(cvs)} configurations; the fastest process "
                  f"of a configuration is up to {max(spans):.0%} faster than its slowest."]
        summary["max_over_min_max"] = max(spans)
    plans: dict = {}  # every measurement of a plan: its items' processes (capped or not), and
    for s in reps:    # the one-process values once
        key = (s["model"], s["layers"], s["cfg"])
        got = plans.setdefault(key, {"item": s["item"], "fresh": [], "one": s["one_process"]})
        got["fresh"] += s["tokens_per_s"]
    key, big = max(plans.items(), key=lambda kv: len(kv[1]["fresh"]) + len(kv[1]["one"]),
                   default=(None, None))
    every = sorted(big["fresh"] + [t for _, _, t in big["one"]]) if big else []
    if len(every) > 2:
        cv = statistics.stdev(every) / statistics.fmean(every)
        lines += ["", f"The most-measured plan ({key[0]} {_plan(key[2])}, as "
                  f"`{big['item']}`): {len(every)} measurements, fresh and one-process, capped and "
                  f"not, {every[0]:.0f}-{every[-1]:.0f} tok/s, CV {cv:.0%}. A configuration "
                  f"measured once with that noise leaves a perfect model a median held-out "
                  f"error of about {0.674 * cv:.0%} (0.674 CV) and, over 20 such rows, a worst "
                  f"of about {2.17 * cv:.0%} (the expected largest of 20 absolute normal deviations)."]
        summary["most_measured"] = {"plan": big["item"], "n": len(every), "cv": cv,
                                    "min": every[0], "max": every[-1]}
    # capped vs uncapped: the same model and settings
    pairs = []
    for s in reps:
        if not s["cap_gib"] or not s["median"]:
            continue
        for u in reps:
            if not u["cap_gib"] and u["median"] and (u["model"], u["layers"], u["cfg"]) == (
                    s["model"], s["layers"], s["cfg"]):
                pairs.append((s, u))
    if pairs:
        lines += ["", "Capped vs uncapped (same plan, fresh processes): "
                  + "; ".join(f"{s['item']}: {s['median']:.0f} vs {u['median']:.0f} tok/s "
                              f"({s['median'] / u['median'] - 1:+.0%}), alloc retries "
                              f"{sum(x or 0 for x in s['alloc_retries'])} vs "
                              f"{sum(x or 0 for x in u['alloc_retries'])}" for s, u in pairs) + "."]
        summary["capped_over_uncapped"] = {s["item"]: s["median"] / u["median"] for s, u in pairs}
    # fresh medians in place of the grid's one-process values: the held-out error
    sub, changed = substituted(grid, reps)
    if changed:
        m0, w0, _ = base_lomo
        m1, w1, errs = lomo(sub)
        k1 = fit(sub)
        lines += ["", f"The fit with the fresh-process medians in place of the {len(changed)} grid "
                  f"rows measured both ways: leave-one-model-out median {m1:.1%}, worst {w1:+.0%} "
                  f"(one-process values: median {m0:.1%}, worst {w0:+.0%}); held-out error of "
                  "those rows: " + ", ".join(
                      f"{r['model']} {_plan(r['cfg'])} {errs[id(r)]:+.0%}" for r in changed)
                  + "; coefficients " + ", ".join(f"`{n}` {k1[0][n]:.4g}" for n in NAMES)
                  + f", overlap {k1[1][0]:.4g} / {k1[1][1]:.4g}."]
        summary["with_fresh_medians"] = {"held_out_median_abs_error": m1,
                                         "held_out_worst_error": w1,
                                         "coefficients": k1[0], "overlap": k1[1]}
    return lines, summary


def write_coefficients(k: dict[str, float], overlap: tuple[float, float]) -> None:
    """Put the fitted coefficients into qplan/planner/calibration.py (its
    SPEED_COEFFICIENTS block and SPEED_OVERLAP), 4 significant digits."""
    p = ROOT / "qplan/planner/calibration.py"
    s = p.read_text()
    a = s.index("SPEED_COEFFICIENTS = {")
    b = s.index("}\n", a) + 2
    body = "SPEED_COEFFICIENTS = {\n" + "".join(f'    "{n}": {v:.4g},\n' for n, v in k.items()) + "}\n"
    s = s[:a] + body + s[b:]
    a = s.index("SPEED_OVERLAP = ")
    b = s.index("\n", a)
    s = s[:a] + f"SPEED_OVERLAP = ({overlap[0]:.4g}, {overlap[1]:.4g})" + s[b:]
    if s != p.read_text():  # the same fit: leave the file alone
        p.write_text(s)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    text, summary = report(all_rows())
    print(text)
    if args.write:
        out = ROOT / "benchmarks/results"
        (out / "speed_fit.md").write_text(text)
        (out / "speed_fit.json").write_text(json.dumps(summary, indent=1) + "\n")
        write_coefficients(summary["coefficients"], summary["overlap"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
