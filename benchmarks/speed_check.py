"""The speed model checked where it is used: held-out plans, the ranking of the search's
candidates, and the seeds' recipe against the auto plan (issue 13), each configuration timed
in its OWN fresh process on the H200 (``speed_grid.py --repeat``).

Every plan here is one the search makes, for the H200's rates with a card's memory (what
``qplan suggest --gpu h200 --vram <card> --reserve <card's>`` chooses, and ``qplan run
--simulate-gpu <card>`` runs under the card's allocator cap): the machine that measures is an
H200, so the ranking checked is the H200's. Plans the search makes with a consumer card's
datasheet rates rank differently on that card, and cannot be checked without it.

Three parts, written as items for ``speed_grid.py --repeat FILE`` (``--items``):

* ``rank``: model/card pairs: the chosen plan, the next fastest by prediction, and a spread of
  the rest that fit, each under the card's cap; where does the chosen plan rank?
* ``heldout``: the chosen plan for models the speed model was not fitted on (0.5B-14B shapes;
  models above 4B with 8 blocks, uncapped: the model is per block), across cards and lengths;
* ``seeds``: the seeds' recipe and the auto plan for Llama-3.1-8B at 2,048 tokens on the H200;
* ``grid``: the speed grid's batch-1 and worst-fitted configurations (``speed_grid.py``, timed
  there one after another in one process) again, each in its own process.

The held-out items keep their ``round`` and the tokens/s predicted when they were written
(``pred_at_measure``): each round was predicted by the model of its day before it ran.

Each timed step is ``accum`` micro-batches and an optimizer step (the plan's accumulation, at
most 4), so the optimizer's fixed cost counts as the runner's does; 3 warm-up and 6 timed
steps.

    python benchmarks/speed_check.py --items benchmarks/speed_check_items.json
    # GPU machine (two halves at once, one per GPU):
    python benchmarks/speed_grid.py --repeat benchmarks/speed_check_items.json --times 1 ...
    python benchmarks/speed_check.py --report [--write]   # results/speed_check.md
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qplan import api  # noqa: E402
from qplan.planner.config import TrainConfig  # noqa: E402
from qplan.planner.search import default_reserve_bytes, search  # noqa: E402
from qplan.planner.speed import estimate_speed  # noqa: E402

ITEMS = ROOT / "benchmarks/speed_check_items.json"
RAW = sorted((ROOT / "benchmarks/results/raw").glob("h200_speed_check*.jsonl"))
OUT_MD = ROOT / "benchmarks/results/speed_check.md"
MAX_ACCUM = 4
SPREAD = 4  # ranking: candidates timed beyond the 4 fastest by prediction

# model, card whose memory the plan is for (the H200's rates), sequence length
PAIRS = [("llama-3.1-8b", "rtx-4090", 2048), ("qwen3-4b", "rtx-4070", 2048),
         ("qwen2.5-1.5b", "rtx-4060", 4096)]
# model, blocks (None: all), card (None: the whole H200), sequence length; none of these
# models is in the speed fit (results/speed_fit.md)
HELDOUT = [
    ("qwen3-0.6b", None, "rtx-4060", 2048),
    ("tinyllama-1.1b", None, "rtx-4070", 2048),
    ("smollm2-1.7b", None, "rtx-4060", 4096),
    ("qwen2.5-3b", None, "rtx-4090", 4096),
    ("gemma-3-4b", 12, "rtx-4080", 2048),
    ("mistral-7b", 8, "rtx-4090", 4096),
    ("qwen2.5-7b", 8, "rtx-4060-ti-16gb", 2048),
    ("granite-3.3-8b", 8, None, 8192),
    ("llama-2-13b", 8, "rtx-4090", 2048),
    ("phi-4", 8, "rtx-4090", 4096),
    ("smollm2-135m", None, None, 2048),
    ("gemma-2-9b", 8, "a100-40gb", 2048),
]
# the second held-out set (stop 22): two models never measured and measured models at cards and
# lengths not measured; each item keeps the tokens/s the speed model predicted when the items
# were written (``pred_at_measure``), before any fit saw them
HELDOUT2 = [
    ("llama-2-7b", 8, "rtx-3090", 4096),
    ("olmo-2-13b", 8, "rtx-4090", 2048),
    ("qwen3-1.7b", None, "rtx-4060", 1024),
    ("gemma-2-2b", None, "rtx-4070", 4096),
    ("llama-3.2-1b", None, None, 8192),
    ("qwen2.5-0.5b", None, "rtx-3060", 4096),
    ("phi-3.5-mini", None, "rtx-4090", 2048),
    ("llama-3.2-3b", None, "rtx-4060-ti-16gb", 4096),
    ("qwen3-8b", 8, "rtx-4090", 1024),
    ("gemma-3-1b", None, None, 2048),
    ("smollm2-360m", None, "rtx-4060", 2048),
    ("qwen2.5-14b", 8, "rtx-4090", 4096),
    ("mistral-nemo-12b", 8, "l4", 2048),
]
# the third (stop 22, after the refit on the second and the grid's fresh processes): new
# model/card/length triples again, predicted by the refitted model before they were measured
HELDOUT3 = [
    ("qwen3-0.6b", None, "rtx-4090", 4096),
    ("tinyllama-1.1b", None, "t4", 1024),
    ("smollm2-1.7b", None, "rtx-3080", 2048),
    ("qwen2.5-3b", None, "l4", 2048),
    ("gemma-3-4b", None, "rtx-4090", 4096),
    ("mistral-7b", 8, "a10g", 2048),
    ("qwen2.5-7b", 8, None, 4096),
    ("llama-2-7b", 8, "rtx-4060-ti-16gb", 2048),
    ("gemma-2-9b", 8, "rtx-4090", 1024),
    ("phi-4", 8, "a100-80gb-sxm", 4096),
    ("olmo-2-7b", 8, "rtx-3090", 2048),
    ("qwen3-14b", 8, "l40s", 2048),
    ("granite-3.3-8b", 8, "rtx-4080", 2048),
    ("smollm2-135m", None, "rtx-3060", 8192),
]
# the fourth (stop 22, after the two-phase refit on everything above): small models, where
# the errors were largest, at cards and lengths not measured
HELDOUT4 = [
    ("qwen2.5-1.5b", None, None, 4096),
    ("llama-3.2-1b", None, "rtx-3060-8gb", 2048),
    ("qwen3-1.7b", None, "rtx-4070", 4096),
    ("smollm2-1.7b", None, "t4", 1024),
]
# the speed grid's configurations (speed_grid.py GRID, GRID2: timed there one after another
# in one process, one micro-batch a step) timed again each in its own fresh process, two
# micro-batches and an optimizer step a timed step: those at batch 1 (host-bound: the most
# scattered in one process) and those the fit of stop 21 missed by 15% or more held out
GRID_ACCUM = 2
GRID_MISSED = {("llama-3.2-1b", 2048, 4), ("qwen2.5-1.5b", 4096, 2), ("gemma-2-2b", 4096, 2),
               ("gemma-3-12b", 4096, 2)}
SEEDS_RECIPE = dict(seq_len=2048, batch_size=1, grad_accum=16, lora_rank=64, lora_alpha=16,
                    lora_dropout=0.1, grad_ckpt=True, prepare="kbit", loss="standard",
                    optim="paged_adamw_8bit", packed_rows=True)


def capped(card: str | None):
    """(the H200 profile, capacity bytes, reserve bytes) for plans with ``card``'s memory."""
    h200 = api.get_gpu("h200")
    if card is None:
        return h200, None, None
    g = api.get_gpu(card)
    return h200, g.memory_bytes, default_reserve_bytes(g)


def chosen(model: str, card: str | None, seq: int) -> TrainConfig:
    """What ``qplan suggest --gpu h200 --vram <card>`` picks (no calibration store)."""
    gpu, cap, reserve = capped(card)
    return api.suggest(api.get_model(model), gpu, seq_len=seq, capacity_bytes=cap,
                       reserve_bytes=reserve, use_calibration=False,
                       find_alternatives=False).config


def candidates(model: str, card: str, seq: int) -> list[tuple[TrainConfig, bool, float]]:
    """The fitting candidates of the pair: the chosen, the 3 next fastest by prediction and
    :data:`SPREAD` spread over the rest; (settings, chosen?, predicted tokens/s on the H200)."""
    gpu, cap, reserve = capped(card)
    m = api.get_model(model)
    best = chosen(model, card, seq)
    _, seen = search(m, gpu, seq_len=seq, target_effective_batch=16,
                     fixed={"packed_rows": True}, capacity_bytes=cap, reserve_bytes=reserve)
    from qplan.planner.search import usable_bytes

    limit = usable_bytes(gpu, cap, reserve)
    fit = sorted((c for c in seen if c.memory.safe_peak_bytes <= limit),
                 key=lambda c: -c.speed.tokens_per_s)
    pick = [c for c in fit if c.config == best][:1] + [c for c in fit if c.config != best]
    rest = pick[4:]
    pick = pick[:4] + rest[::max(1, -(-len(rest) // SPREAD))]
    return [(c.config, c.config == best, c.speed.tokens_per_s) for c in pick]


def _settings(cfg: TrainConfig) -> dict:
    return cfg.to_dict()


def items() -> list[dict]:
    out = []
    for model, card, seq in PAIRS:
        for i, (cfg, is_best, pred) in enumerate(candidates(model, card, seq)):
            out.append(dict(name=f"rank:{model}@{card}:{i}", part="rank", pair=f"{model}@{card}",
                            model=model, layers=None, settings=_settings(cfg), cap=card,
                            chosen=is_best, accum=min(cfg.grad_accum, MAX_ACCUM),
                            tier=1 if i < 4 else 2))
    for model, layers, card, seq in HELDOUT:
        cfg = chosen(model, card, seq)
        out.append(dict(name=f"heldout:{model}@{card or 'h200'}:{seq}", part="heldout",
                        model=model, layers=layers, settings=_settings(cfg),
                        cap=card if layers is None else None, plan_for=card or "h200",
                        accum=min(cfg.grad_accum, MAX_ACCUM), tier=1))
    for rnd, model, layers, card, seq in ([(2, *h) for h in HELDOUT2]
                                          + [(3, *h) for h in HELDOUT3]
                                          + [(4, *h) for h in HELDOUT4]):
        cfg = chosen(model, card, seq)
        it = dict(name=f"heldout:{model}@{card or 'h200'}:{seq}", part="heldout", round=rnd,
                  model=model, layers=layers, settings=_settings(cfg),
                  cap=card if layers is None else None, plan_for=card or "h200",
                  accum=min(cfg.grad_accum, MAX_ACCUM), tier=1)
        out.append({**it, "pred_at_measure": round(predicted(it))})
    out += grid_items()
    auto = chosen("llama-3.1-8b", None, 2048)
    seeds = TrainConfig(**SEEDS_RECIPE)
    for name, cfg in (("seeds:auto", auto), ("seeds:recipe", seeds)):
        out.append(dict(name=name, part="seeds", model="llama-3.1-8b", layers=None,
                        settings=_settings(cfg), cap=None,
                        accum=min(cfg.grad_accum, MAX_ACCUM), tier=1))
    return out


def grid_items() -> list[dict]:
    """The speed grid's configurations of :data:`GRID_MISSED` and at batch 1 as fresh-process
    items (part ``grid``)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from speed_grid import BASE, GRID, GRID2

    out = []
    for grid in (GRID, GRID2):
        for model, (layers, cfgs) in grid.items():
            for s in cfgs:
                cfg = TrainConfig(**{**BASE, **s}).with_(grad_accum=GRID_ACCUM)
                if cfg.batch_size > 1 and (model, cfg.seq_len, cfg.batch_size) not in GRID_MISSED:
                    continue
                name = f"grid:{model}:{cfg.seq_len}x{cfg.batch_size}:{'ckpt' if cfg.grad_ckpt else 'nockpt'}"
                out.append(dict(name=name, part="grid", model=model, layers=layers,
                                settings=_settings(cfg), cap=None, accum=GRID_ACCUM, tier=1))
    return out


def merged(old: list[dict], new: list[dict]) -> list[dict]:
    """The items file kept as measured: ``old`` items unchanged, and each ``new`` item whose
    settings no old item of its part, model and card has (the search chose differently after
    a change to the model) added under a fresh name (``...:v2``)."""
    out = list(old)
    for it in new:
        same = [o for o in old if o["part"] == it["part"] and o["model"] == it["model"]
                and o.get("pair") == it.get("pair") and o.get("plan_for") == it.get("plan_for")]
        if any(o["settings"] == it["settings"] for o in same):
            continue
        if it["part"] == "rank" and same:  # a pair's list: only the new chosen plan
            if not it.get("chosen"):
                continue
            for o in same:
                o["chosen"] = False
        names = {o["name"] for o in out}
        k = 2
        while f"{it['name']}:v{k}" in names:
            k += 1
        out.append({**it, "name": f"{it['name']}:v{k}" if it["name"] in names else it["name"]})
    return out


def profile_of(model: str, layers):
    m = api.get_model(model)
    return dataclasses.replace(m, num_hidden_layers=int(layers)) if layers else m


def predicted(rec: dict) -> float:
    """The current speed model's tokens/s for what the record timed (its blocks, its
    micro-batches per optimizer step) on the H200."""
    cfg = TrainConfig.from_dict(rec["settings"]).with_(grad_accum=int(rec.get("accum", 1)))
    return estimate_speed(profile_of(rec["model"], rec.get("layers")), cfg,
                          api.get_gpu("h200")).tokens_per_s


# records measured before a change to the runner that changes them: (file stem, item) -> why
SUPERSEDED = {
    ("h200_speed_check_c1_b", "rank:qwen3-4b@rtx-4070:1"): "",
    ("h200_speed_check_c1_a", "rank:qwen3-4b@rtx-4070:1"):
        "before the lean RMSNorm sliced narrow norms by elements (the per-head q/k norms ran "
        "4,096 rows a slice): 4,914 tok/s",
}


def load(paths=RAW) -> dict[str, list[dict]]:
    """Records by item name (every fresh process of it), without :data:`SUPERSEDED` ones."""
    by: dict[str, list[dict]] = {}
    for p in paths:
        for line in Path(p).read_text().splitlines():
            r = json.loads(line)
            if (Path(p).stem, r["item"]) in SUPERSEDED:
                continue
            by.setdefault(r["item"], []).append(r)
    return by


def _plan(s: dict) -> str:
    c = TrainConfig.from_dict(s)
    bits = [f"{c.seq_len}x{c.batch_size} (x{c.grad_accum})", "ckpt" if c.grad_ckpt else "no ckpt",
            f"{c.loss} loss", f"r{c.lora_rank}"]
    bits += [t for t, on in (("offload", c.offload_activations), ("CPU emb", c.embed_on_cpu),
                             ("norms", c.recompute_norms), ("kbit", c.prepare == "kbit"),
                             (f"mlp chunk {c.mlp_chunk}", c.mlp_chunk), (c.attn, c.attn != "sdpa"))
             if on]
    return ", ".join(bits)


def _median(rs: list[dict]) -> float | None:
    v = [r["tokens_per_s"] for r in rs if r.get("status") == "ok" and r.get("tokens_per_s")]
    return statistics.median(v) if v else None


def report(spec: list[dict], by: dict[str, list[dict]]) -> tuple[str, dict]:
    lines = ["# The speed model where it is used: held-out plans, ranking, seeds (H200)", "",
             "Made by `python benchmarks/speed_check.py --report --write` from "
             + ", ".join(f"`{p.relative_to(ROOT)}`" for p in RAW) + " (items: "
             "`benchmarks/speed_check_items.json`, written by `--items`). Each configuration "
             "timed in its own fresh process (`benchmarks/speed_grid.py --repeat`: load the "
             "saved random-weight model, 3 warm-up and 6 timed optimizer steps (call c1; 2 and 4 "
             "since) of the plan's "
             f"accumulation, at most {MAX_ACCUM} micro-batches, bf16 autocast, the allocator "
             "as the trainer sets it, capped to the card where a card is named); tokens/s of "
             "an item: the median over its processes of each process's median step. "
             "Predicted: the speed model at this commit, on the H200, for what was timed.", ""]
    summary: dict = {}
    # held out
    rows, errs = [], []
    for it in [x for x in spec if x["part"] == "heldout"]:
        rs = by.get(it["name"], [])
        m = _median(rs)
        rec = {**it, "accum": it["accum"]}
        p = predicted(rec)
        if m:
            errs.append((p / m - 1, it["name"]))
        blocks = f" ({it['layers']} blocks)" if it["layers"] else ""
        then = f"{it['pred_at_measure']:,}" if it.get("pred_at_measure") else ""
        rows.append(f"| {it['model']}{blocks} | {it['plan_for']} | {_plan(it['settings'])} | "
                    f"{it.get('round', 1)} | {len(rs)} | "
                    + (f"{round(m):,} | {then} | {round(p):,} | {100 * (p / m - 1):+.0f}% |" if m
                       else f"{_status(rs)} | {then} | {round(p):,} | |"))
    if errs:
        a = sorted(abs(e) for e, _ in errs)
        worst = max(errs, key=lambda t: abs(t[0]))
        summary["heldout"] = dict(n=len(errs), median_abs=statistics.median(a), worst=worst[0],
                                  worst_item=worst[1], within_25=sum(x <= 0.25 for x in a))
        lines += ["## The chosen plan of models and settings not measured before", "",
                  "Four rounds, each predicted before it was measured: round 1 (15 plans of 12 "
                  "models not in the grid; the model of stop 20: median |error| 3.2%, worst +25%), "
                  "round 2 (below: two models never measured and measured models at cards and "
                  "lengths not measured, predicted by the model of stop 21), round 3 (new triples "
                  "again, predicted by that model refitted on round 2 and the grid's fresh "
                  "processes, one overlap), round 4 (small models, predicted by the two-phase "
                  "model fitted on rounds 1-3 and the grid with one overlap share when the GPU "
                  "sets the pace and another when the host does; the model at this commit has the "
                  "same data and phases, its overlap made continuous (the larger of two sums) after "
                  "round 4 ran; round 4 is not in the fit, `speed_fit.UNFITTED_ROUNDS`). On rounds 1-3 the errors of the "
                  "model at this commit are in-sample; its held-out figure there is "
                  "leave-one-model-out, in [speed_fit.md](speed_fit.md).", ""]
        for rnd in sorted({it["round"] for it in spec if it.get("pred_at_measure")}):
            e = [(it["pred_at_measure"] / m - 1, it["name"]) for it in spec
                 if it.get("round") == rnd and (m := _median(by.get(it["name"], [])))]
            if not e:
                continue
            ra = sorted(abs(x) for x, _ in e)
            rw = max(e, key=lambda t: abs(t[0]))
            summary[f"heldout_round{rnd}"] = dict(n=len(e), median_abs=statistics.median(ra),
                                                  worst=rw[0], worst_item=rw[1],
                                                  within_25=sum(x <= 0.25 for x in ra))
            lines.append(f"- Round {rnd}, held out (the prediction written in the items before "
                         f"the run, `pred_at_measure`): {len(e)} plans, median |error| "
                         f"{100 * statistics.median(ra):.1f}%, worst {100 * rw[0]:+.1f}% "
                         f"({rw[1]}); within 25%: {sum(x <= 0.25 for x in ra)}/{len(e)}.")
        lines += ["", f"All {len(errs)} plans, at this commit (rounds 1-3 in-sample): median |error| "
                  f"{100 * statistics.median(a):.1f}%, worst {100 * worst[0]:+.0f}% ({worst[1]}); "
                  f"within 25%: {summary['heldout']['within_25']}/{len(errs)}.", ""]
    lines += ["| model | planned for (memory) | plan | round | processes | measured tok/s | "
              "predicted then | predicted | error |", "|---|---|---|---|---|---|---|---|---|",
              *rows, ""]
    # ranking
    pairs = sorted({x["pair"] for x in spec if x["part"] == "rank"},
                   key=[x["pair"] for x in spec if x["part"] == "rank"].index)
    lines += ["## Ranking: the search's candidates that fit, each under the card's cap", "",
              "Chosen: the plan the search makes at this commit (`qplan suggest --gpu h200 --vram "
              "<card> --reserve <card's>`). Candidates predicted below about 60% of the chosen "
              "plan's speed (batch 1 with accumulation 16) were left unmeasured after the first "
              "call, to keep within the GPU time.", "",
              "| pair | plan | chosen | processes | measured tok/s | predicted | error |",
              "|---|---|---|---|---|---|---|"]
    rank_summary = []
    for pair in pairs:
        its = [x for x in spec if x.get("pair") == pair]
        meas = {x["name"]: _median(by.get(x["name"], [])) for x in its}
        model, card = pair.split("@")
        seq = TrainConfig.from_dict(its[0]["settings"]).seq_len
        now = chosen(model, card, seq)  # the search at this commit
        is_chosen = {x["name"]: TrainConfig.from_dict(x["settings"]) == now for x in its}
        if not any(is_chosen.values()):
            lines.append(f"| {pair} | {_plan(now.to_dict())} | yes (not measured) | 0 | | "
                         f"{round(estimate_speed(profile_of(model, None), now.with_(grad_accum=min(now.grad_accum, MAX_ACCUM)), api.get_gpu('h200')).tokens_per_s):,} | |")
        for x in its:
            m, p = meas[x["name"]], predicted(x)
            lines.append(f"| {pair} | {_plan(x['settings'])} | {'yes' if is_chosen[x['name']] else ''} | "
                         f"{len(by.get(x['name'], []))} | "
                         f"{round(m) if m else _status(by.get(x['name'], []))} | {round(p):,} | "
                         f"{'' if not m else f'{100 * (p / m - 1):+.0f}%'} |")
        got = [v for v in meas.values() if v]
        ch = next((meas[x["name"]] for x in its if is_chosen[x["name"]]), None)
        if got and ch:
            rank_summary.append((pair, len(got), ch, max(got), ch / max(got)))
    lines += ["", "| pair | plans measured | chosen tok/s | fastest measured | chosen / fastest |",
              "|---|---|---|---|---|"]
    lines += [f"| {p} | {n} | {c:,.0f} | {b:,.0f} | {100 * s:.0f}% |"
              for p, n, c, b, s in rank_summary]
    summary["rank"] = [dict(pair=p, measured=n, chosen=c, fastest=b, share=s)
                       for p, n, c, b, s in rank_summary]
    # seeds
    a, r = _median(by.get("seeds:auto", [])), _median(by.get("seeds:recipe", []))
    lines += ["", "## The seeds' recipe against the auto plan (Llama-3.1-8B, 2,048 tokens, H200)", ""]
    for name in ("seeds:auto", "seeds:recipe"):
        x = next(i for i in spec if i["name"] == name)
        vals = [round(v["tokens_per_s"]) for v in by.get(name, []) if v.get("tokens_per_s")]
        lines.append(f"- {name.split(':')[1]}: {_plan(x['settings'])}: processes {vals}, "
                     f"predicted {round(predicted(x)):,}")
    if a and r:
        summary["seeds_ratio_harness"] = a / r
        lines += ["", f"In qplan's own step (the harness above), the recipe's settings: auto / "
                  f"recipe {a / r:.2f}x (medians {a:,.0f} / {r:,.0f}). The recipe's loss there is "
                  "transformers' standard one; trl's SFTTrainer chunks it (since trl 1.7)."]
    sva = ROOT / "benchmarks/results/seeds_vs_auto/seeds_vs_auto.json"
    if sva.exists():
        d = json.loads(sva.read_text())
        sd, q = d["seeds"], d["qplan"]
        summary["seeds_ratio"] = d["ratio"]
        lines += ["", "As users run them (`benchmarks/seeds_vs_auto.py`, "
                  "[results](seeds_vs_auto/seeds_vs_auto.json); Llama-3.1-8B shapes, every block, "
                  f"{d['seq']} tokens, the same data, each in its own process; "
                  + ", ".join(f"{k} {v}" for k, v in d["versions"].items()) + "):", "",
                  f"- the seeds' recipe through trl's `SFTTrainer` (batch 1 x accumulation "
                  f"{d['accum']}, r64, kbit, paged 8-bit AdamW, checkpointing): step times "
                  f"{', '.join(f'{x:.1f}' for x in sd['step_s'])} s, "
                  f"**{sd['steady_tokens_per_s']:,.0f}** tok/s without the first step;",
                  f"- `qplan run` with no settings (its plan for the H200: "
                  f"{_plan(q['settings'])}): **{q['steady_tokens_per_s']:,.0f}** tok/s steady, "
                  f"{q['predicted_tokens_per_s']:,.0f} predicted by the run (the coefficients before the "
                  "refit of speed_fit.md) "
                  f"({q['predicted_tokens_per_s'] / q['steady_tokens_per_s'] - 1:+.1%}), "
                  f"nvidia-smi peak {q['measured']['nvml_peak_gib']:.1f} GiB;", "",
                  f"**{d['ratio']:.2f}x** the seeds' recipe as the seeds run it."]
    return "\n".join(lines) + "\n", summary


def _status(rs: list[dict]) -> str:
    return ", ".join(sorted({r.get("status", "?") for r in rs})) or "not run"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", metavar="FILE", help="write the items for speed_grid.py --repeat")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--write", action="store_true", help="--report: to results/speed_check.md")
    a = ap.parse_args()
    if a.items:
        its = merged(json.loads(Path(a.items).read_text()) if Path(a.items).exists() else [],
                     items())
        Path(a.items).write_text(json.dumps(its, indent=1) + "\n")
        for it in its:
            print(it["name"], _plan(it["settings"]), "chosen" if it.get("chosen") else "",
                  f"accum {it['accum']}", f"pred {predicted(it):,.0f}")
        return 0
    if a.report:
        text, summary = report(json.loads(ITEMS.read_text()), load())
        print(text)
        if a.write:
            OUT_MD.write_text(text)
            OUT_MD.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
        return 0
    ap.print_help()
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
