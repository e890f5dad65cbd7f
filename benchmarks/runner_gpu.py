"""``qplan run`` on a real GPU with Llama-3.1-8B's shapes, simulating an 8 GB RTX 4060.

Shows, with the real runner (child processes, checkpoints, the OOM ladder):

(a) the plan qplan chooses for Llama-3.1-8B on an rtx-4060 trains without running out of
    memory under ``--simulate-gpu rtx-4060`` (PyTorch's allocator capped at what that card
    leaves after its CUDA context);
(b) a deliberately too-large plan (per-device batch 2, no gradient checkpointing) runs out
    of memory and is recovered automatically (same effective batch, from the checkpoint);
(c) every attempt's measured peak beside qplan's estimate.

The model is built from qplan's catalogue shapes with random weights (bf16, on the GPU),
saved with ``save_pretrained`` to local disk (not $OUT) and loaded back in 4-bit by each
training process. The tokenizer is a small word-level one (token ids stay far below the
128k vocabulary, which still sizes the embeddings, the lm_head and the logits).

Usage (GPU machine, about 5 minutes on an H100):
    python benchmarks/runner_gpu.py --out "$OUT"
Writes $OUT/runner_gpu.json, $OUT/runner_gpu.md, and each run's report.json/summary.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

GIB = 1024**3


def build(model_name: str, path: Path, layers: int | None) -> None:
    """Random-weight model with the catalogue's shapes, saved in bf16 (run in its own process)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from fixtures.tiny_llama import make_tokenizer, sentences
    from qplan import api

    profile = api.get_model(model_name)
    d = profile.to_config_dict()
    if layers:
        d["num_hidden_layers"] = layers
    cfg = AutoConfig.for_model(**d)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size="4GB")
    make_tokenizer(sentences(400, seed=123)).save_pretrained(path)


def write_data(path: Path, n: int) -> Path:
    from fixtures.tiny_llama import sentences, write_jsonl

    # ~60-word documents: packed into rows of the plan's sequence length
    docs = [" ".join(sentences(8, seed=i, length=10)) for i in range(n)]
    return write_jsonl(path, [{"text": d} for d in docs])


def run_case(name: str, req, log: list[str]) -> dict:
    from qplan.errors import QplanError
    from qplan.runner.run import run

    t0 = time.time()
    try:
        rep = run(req, notify=lambda m: (log.append(f"[{name}] {m}"), print(f"[{name}] {m}", flush=True)))
        out = rep.to_dict()
    except QplanError as e:
        rep = getattr(e, "report", None)
        out = rep.to_dict() if rep is not None else {"status": "failed"}
        out["error"] = str(e)
    out["wall_s"] = round(time.time() - t0, 1)
    return out


def table(results: dict, context_gib: float) -> str:
    lines = ["| case | attempt | settings | estimated peak (GiB) | estimate less context | "
             "reserved peak (GiB) | allocated peak (GiB) | nvidia-smi peak (GiB) | tokens/s | "
             "steps | ended |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for case, r in results.items():
        for a in r.get("attempts", []):
            s, m = a["settings"], a.get("measured") or {}
            st = (f"seq {s['seq_len']} b{s['batch_size']}x{s['grad_accum']} "
                  f"{'ckpt' if s['grad_ckpt'] else 'no-ckpt'} {s['loss']} {s['optim']}"
                  f"{' offload' if s['offload_activations'] else ''}"
                  f"{' mlp' + str(s['mlp_chunk']) if s.get('mlp_chunk') else ''}"
                  f"{' cpu-embed' if s.get('embed_on_cpu') else ''}"
                  f"{' lean-norms' if s.get('recompute_norms') else ''}")
            steps = f"{a['resumed_from'] + 1}-{a['last_step']}" if a["last_step"] > a["resumed_from"] else "none"
            est = a.get("estimated_peak_gib")
            less = round(est - context_gib, 3) if est is not None else None
            lines.append(f"| {case} | {a['attempt']} | {st} | {est} | {less} | "
                         f"{m.get('peak_reserved_gib')} | {m.get('peak_allocated_gib')} | "
                         f"{m.get('nvml_peak_gib')} | {a.get('tokens_per_s')} | {steps} | {a['ended']} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results/runner_gpu"))
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--gpu", default="rtx-4060")
    ap.add_argument("--layers", type=int, help="fewer layers, for a quick check only")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--effective-batch", type=int, default=8)
    ap.add_argument("--workdir", help="where the model and runs go (default: a temp dir)")
    ap.add_argument("--build-only", metavar="PATH", help=argparse.SUPPRESS)
    ap.add_argument("--longest", action="store_true",
                    help="only case (a), at the longest sequence the planner says fits the card "
                         "(api.longest_sequence, batch 1)")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="check the script's plumbing on CPU: no simulation, nothing OOMs")
    args = ap.parse_args()
    if args.build_only:
        build(args.model, Path(args.build_only), args.layers)
        return 0

    from qplan import api
    from qplan.errors import DoesNotFitError
    from qplan.planner.plan import save_plan
    from qplan.runner.planning import simulation
    from qplan.runner.types import RunRequest

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="qplan-runner-gpu-"))
    model_dir = work / args.model
    t0 = time.time()
    if not (model_dir / "config.json").exists():
        print(f"building {args.model} (random weights) in {model_dir}", flush=True)
        subprocess.run([sys.executable, __file__, "--build-only", str(model_dir), "--model",
                        args.model] + (["--layers", str(args.layers)] if args.layers else []),
                       check=True)
    build_s = round(time.time() - t0, 1)
    profile, gpu = api.get_model(str(model_dir)), api.get_gpu(args.gpu)
    plan = None
    if args.longest:
        plan = api.longest_sequence(profile, gpu, target_effective_batch=args.effective_batch,
                                    fixed={"packed_rows": True})  # as the runner plans
    # enough ~80-token documents for every row of every step
    rows = args.steps * args.effective_batch * (plan.config.seq_len if plan else 1024)
    data = write_data(work / "train.jsonl", max(400, rows // 60))
    # the longest of these sequences the planner says fits the card
    for seq in () if plan else (1024, 512, 256, 128):
        try:
            plan = api.suggest(profile, gpu, seq_len=seq, target_effective_batch=args.effective_batch)
            break
        except DoesNotFitError:
            continue
    if plan is None:
        print(f"nothing fits {args.model} on {args.gpu} even at 128 tokens", file=sys.stderr)
        return 1
    seq = plan.config.seq_len
    log: list[str] = []
    results: dict = {}
    common = dict(model=str(model_dir), data=str(data), max_steps=args.steps, save_steps=2,
                  progress=False)
    if args.cpu_dry_run:
        common.update(cpu=True, gpu=args.gpu)
    else:
        common.update(simulate_gpu=args.gpu)

    # (a) the automatic plan under the cap
    results["a_auto_plan"] = run_case("a", RunRequest(
        output=str(work / "run_a"), overrides={"seq_len": seq},
        effective_batch=args.effective_batch, **common), log)

    if args.longest:
        big = None
    else:
        big = plan.config.with_(batch_size=2, grad_accum=max(1, args.effective_batch // 2),
                                grad_ckpt=False, offload_activations=False)
        # (b) too large on purpose: per-device batch 2 and no checkpointing, same effective batch
        save_plan(api.make_plan(profile, gpu, big, target=big.effective_batch,
                                model_ref=str(model_dir)), work / "too_big.yaml")
        results["b_too_large_plan"] = run_case("b", RunRequest(
            output=str(work / "run_b"), plan=str(work / "too_big.yaml"), max_attempts=5,
            **common), log)

    import torch

    env = {"torch": torch.__version__, "cuda": torch.version.cuda,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    for pkg in ("transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            env[pkg] = __import__(pkg).__version__
        except ImportError:
            env[pkg] = None
    summary = {"model": args.model, "layers": args.layers or profile.num_hidden_layers,
               "simulated": dataclasses.asdict(simulation(gpu)), "seq_len": seq, "auto_plan": plan.config.to_dict(),
               "too_large_plan": big.to_dict() if big else None, "build_s": build_s,
               "total_s": round(time.time() - t0, 1), "env": env, "results": results, "log": log}
    (out / "runner_gpu.json").write_text(json.dumps(summary, indent=1))
    sim = dataclasses.asdict(simulation(gpu))
    title = (f"CPU dry run (planned for {args.gpu}, nothing simulated)" if args.cpu_dry_run
             else f"qplan run on {env['gpu']}, simulating {args.gpu}")
    md = [f"# {title}", "",
          f"Model: {args.model} shapes ({summary['layers']} layers, random weights), seq {seq}, "
          f"effective batch {args.effective_batch}, {args.steps} steps. Allocator cap "
          f"{sim['cap_bytes'] / GIB:.2f} GiB ({args.gpu}: {sim['card_bytes'] / GIB:g} GiB less "
          f"{sim['context_bytes'] / GIB:.2f} GiB CUDA context). The estimate includes that "
          "context; reserved/allocated are PyTorch's counters (no context); nvidia-smi is this "
          "GPU's view of the process, with this GPU's context. Paged optimizer memory lies "
          "outside the cap.", "",
          table(results, sim["context_bytes"] / GIB), ""]
    for case, r in results.items():
        md.append(f"- {case}: {r.get('status')} — {r.get('message') or r.get('error', '')}")
    md += ["", f"Versions: {json.dumps(env)}", f"Total {summary['total_s']} s (build {build_s} s)."]
    (out / "runner_gpu.md").write_text("\n".join(md) + "\n")
    for case, d in (("a", "run_a"), ("b", "run_b")):
        for f in ("report.json", "summary.md", "plan.yaml"):
            if (work / d / f).exists():
                shutil.copy(work / d / f, out / f"{case}_{f}")
    print("\n".join(md))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    ok = all(r.get("status") == "ok" for r in results.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
