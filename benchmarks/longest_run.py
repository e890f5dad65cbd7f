"""The README's longest-sequence table, measured with ``qplan run`` itself.

Llama-3.1-8B shapes (random weights, every block), QLoRA r=32 / alpha 64 on all linear layers,
batch 1, checkpointing (as the published Unsloth / HF figures), on cards of 8, 12, 16 and 24 GB.
For each card and each kind of rows, as a user would:

    qplan suggest --model llama-3.1-8b --gpu 24GB --rank 32 --alpha 64 --batch 1 --grad-ckpt \\
        --longest [--no-packed-rows] --save plan.yaml
    qplan run --plan plan.yaml --model DIR --data data.jsonl --simulate-gpu 24GB --grad-accum 1

``packed``: many short examples a row (qplan run's packed rows: a seq x seq mask);
``unpacked`` (``--no-packed-rows``): one example longer than the plan's sequence a row. The
model is built once; runs go 3 at a time (memory does not depend on the others; the tokens/s
of runs that shared the GPU are not speed measurements).

    python benchmarks/longest_run.py --out "$OUT/longest_run.jsonl"    # GPU machine
    python benchmarks/longest_run.py --cpu-dry-run --out /tmp/lr.jsonl  # plumbing
    python benchmarks/longest_run.py --report   # results/longest_run.md from results/raw/h200_longest_run*.jsonl
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests")]

from e2e_unmeasured import case, figures, run_cases  # noqa: E402
from memory_grid import build_model  # noqa: E402

MODEL = "llama-3.1-8b"
CARDS = ("8GB", "12GB", "16GB", "24GB")
KNOBS = ("--rank", "32", "--alpha", "64", "--batch", "1", "--grad-ckpt")


def cases() -> list[tuple[str, str]]:
    """(card, rows), the longest first (they take longest)."""
    return [(c, k) for c in reversed(CARDS) for k in ("unpacked", "packed")]


def report(paths: list[Path]) -> str:
    lines = ["# Longest sequence that trains, measured with `qplan run` (H200, `--simulate-gpu`)", "",
             "Made by `python benchmarks/longest_run.py --report` from "
             + ", ".join(f"`{p.relative_to(ROOT)}`" for p in paths) + ". Llama-3.1-8B shapes "
             "(random weights), r32/alpha 64, batch 1, checkpointing; `qplan suggest --longest` "
             "for the card (`--no-packed-rows` for unpacked rows), then `qplan run --plan` under "
             "`--simulate-gpu` for 2 optimizer steps. Measured: the training process's NVML peak "
             "(CUDA context included, as the estimate). Runs shared the GPU 3 at a time: their "
             "tokens/s are not speed figures.", "",
             "| card | rows | planned seq | plan | status | estimate GiB (+band) | measured GiB | "
             "error | usable GiB | peak / usable | today's estimate (error) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in paths:
        for line in p.read_text().splitlines():
            r = json.loads(line)
            c, est, nv, e, err, now = figures(r)
            plan = ", ".join(x for x in (
                "offload" if c.get("offload_activations") else "",
                f"mlp chunk {c['mlp_chunk']}" if c.get("mlp_chunk") else "",
                "lean norms" if c.get("recompute_norms") else "",
                "CPU embeddings" if c.get("embed_on_cpu") else "",
                f"{c.get('loss')} loss" if c else "") if x)
            u = est.get("usable_gib")
            use = f"{nv / u * 100:.0f}%" if nv and u else "n/a"
            lines.append(f"| {r['card']} | {r['data']} | {c.get('seq_len', 'n/a')} | {plan} | "
                         f"{r.get('status')} | {e} (+{est.get('band_gib')}) | {nv} | {err} | {u} | "
                         f"{use} | {now} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out")
    ap.add_argument("--jobs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--cards", default=",".join(CARDS))
    ap.add_argument("--deadline", type=float, default=0, help="start no run after this many seconds")
    ap.add_argument("--cpu-dry-run", action="store_true")
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    if args.report:
        paths = sorted((ROOT / "benchmarks/results/raw").glob("h200_longest_run*.jsonl"))
        (ROOT / "benchmarks/results/longest_run.md").write_text(report(paths))
        return 0
    cpu = args.cpu_dry_run
    work = Path(tempfile.mkdtemp(prefix="qplan-longest-"))
    mdir = work / "model"
    t0 = time.time()
    build_model(MODEL, 2 if cpu else None, mdir, "cpu" if cpu else "cuda")
    todo = [c for c in cases() if c[0] in args.cards.split(",")]

    def one(c):
        card, rows = c
        knobs = KNOBS + (("--no-packed-rows",) if rows == "unpacked" else ())
        return case(MODEL, card, "longest", rows, work, args.steps, cpu, accum=1, knobs=knobs,
                    model_dir=mdir, name=f"{card}-{rows}")

    # the model's build counts against the deadline
    run_cases(todo, one, out=args.out, jobs=args.jobs,
              deadline=max(1.0, args.deadline - (time.time() - t0)) if args.deadline else 0)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
