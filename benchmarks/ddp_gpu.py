"""Data-parallel training on two GPUs with ``qplan run``: throughput and per-GPU memory
against the plan (issue 12).

On a machine with 2 GPUs (the device tool's ``nvidia-h200-x2``), one case after another, each
its own ``qplan run`` process tree on otherwise idle GPUs:

* ``allreduce``: NCCL all-reduce between the two GPUs (float32 buffers of LoRA-gradient
  sizes), the bus bandwidth the speed model's all-reduce term assumes, and how the GPUs are
  linked (``nvidia-smi topo -m``);
* ``pair``: for a model, ``qplan suggest --gpu CARD ... --save`` for 1 GPU and with
  ``--gpus 2`` (same effective batch), then ``qplan run --plan`` of each: steady tokens/s of
  both (measured against predicted) and each rank's peak against the per-GPU estimate.
  With a consumer card the run is ``--simulate-gpu CARD`` (each GPU's allocator capped).

    python benchmarks/ddp_gpu.py --out "$OUT/ddp.jsonl"            # GPU machine, 2 GPUs
    python benchmarks/ddp_gpu.py --cpu-dry-run --out /tmp/ddp.jsonl  # plumbing (gloo, CPU)
    python benchmarks/ddp_gpu.py --report                           # results/ddp_gpu.md
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests")]

from e2e_unmeasured import qplan  # noqa: E402
from memory_grid import build_model, write_data  # noqa: E402

RAW = ROOT / "benchmarks" / "results" / "raw"
REPORT = ROOT / "benchmarks" / "results" / "ddp_gpu.md"

# (model, card, seq, fixed suggest options, steps, name)
PAIRS = [
    ("qwen3-4b", "h200", 2048, ("--batch", "4"), 8, "qwen3-4b h200 2k b4"),
    ("llama-3.2-1b", "h200", 1024, ("--batch", "1"), 8, "llama-3.2-1b h200 1k b1"),
    ("qwen3-4b", "rtx-4070", 4096, (), 5, "qwen3-4b rtx-4070 4k"),
]

ALLREDUCE = r"""
import json, os, sys, time, torch, torch.distributed as dist
rank = int(sys.argv[1]); out = sys.argv[2]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
torch.cuda.set_device(rank)
dist.init_process_group("nccl", rank=rank, world_size=2)
recs = []
for mib in (16, 64, 170, 512):
    x = torch.ones(mib * 2**18, device="cuda")  # float32
    for _ in range(3):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = 10
    for _ in range(n):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    s = (time.perf_counter() - t0) / n
    recs.append({"mib": mib, "s": s, "busbw_gbs": 2 * (2 - 1) / 2 * x.numel() * 4 / s / 1e9})
free, total = torch.cuda.mem_get_info()
recs.append({"nvml_used_gib_after": (total - free) / 2**30,
             "torch_reserved_gib": torch.cuda.memory_reserved() / 2**30})
if rank == 0:
    with open(out, "w") as f:
        json.dump(recs, f)
dist.destroy_process_group()
"""


def allreduce(work: Path) -> dict:
    out = work / "allreduce.json"
    code = work / "allreduce.py"
    code.write_text(ALLREDUCE)
    procs = [subprocess.Popen([sys.executable, str(code), str(k), str(out)]) for k in (0, 1)]
    codes = [p.wait(timeout=300) for p in procs]
    rec: dict = {"case": "allreduce", "exit_codes": codes}
    if out.exists():
        rec["results"] = json.loads(out.read_text())
    topo = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True)
    rec["topo"] = topo.stdout[-2000:]
    return rec


def _suggest(model: str, card: str, seq: int, knobs, gpus: int, plan: Path, cpu: bool,
             mdir: Path) -> dict:
    args = ["suggest", "--model", str(mdir) if cpu else model, "--gpu", card, "--seq",
            str(seq), "--save", str(plan), "--json", *knobs]
    if gpus > 1:
        args += ["--gpus", str(gpus)]
    p = qplan(*args, cwd=plan.parent)
    if p.returncode:
        return {"status": "suggest failed", "stdout": p.stdout[-1500:], "stderr": p.stderr[-1500:]}
    return json.loads(p.stdout)


def _run(plan: Path, mdir: Path, data: Path, out: Path, steps: int, card: str, cpu: bool,
         profile: Path | None = None, extra: tuple[str, ...] = ()) -> dict:
    args = ["run", "--plan", str(plan), "--model", str(mdir), "--data", str(data),
            "--max-steps", str(steps), "--save-steps", "1000", "--max-attempts", "1",
            "--output", str(out), "--quiet", "--json", *extra]  # extra: later flags win
    if cpu:
        args += ["--cpu", "--seq", "64", "--batch", "1"]
    elif card != "h200":
        args += ["--simulate-gpu", card]
    t0 = time.time()
    if profile is not None:  # the training process's host time by function (rank 0)
        os.environ["QPLAN_PROFILE"] = str(profile)
    try:
        p = qplan(*args, cwd=out.parent)
    finally:
        os.environ.pop("QPLAN_PROFILE", None)
    if os.environ.get("QPLAN_BENCH_DEBUG"):  # every rank's stderr (pair copies *.log)
        (out.parent / f"{out.name}.stderr.log").write_text(p.stderr[-200_000:])
    rep = out / "report.json"
    if not rep.exists():
        return {"status": "no report", "stderr": p.stderr[-2000:], "stdout": p.stdout[-1000:]}
    r = json.loads(rep.read_text())
    a = r["attempts"][-1] if r.get("attempts") else {}
    return {"status": r.get("status"), "ended": a.get("ended"), "error": a.get("error"),
            "attempts": [{k: x.get(k) for k in ("ended", "resumed_from", "error")}
                         for x in r.get("attempts") or []],
            "ran_settings": a.get("settings"),  # the last attempt's (a re-plan changes them)
            "estimated_peak_gib": a.get("estimated_peak_gib"), "measured": a.get("measured"),
            "rank_measured": a.get("rank_measured"),
            "steady_tokens_per_s": a.get("steady_tokens_per_s"),
            "tokens_per_s": a.get("tokens_per_s"),
            "predicted_tokens_per_s": a.get("predicted_tokens_per_s"),
            "simulated": r.get("simulated"), "wall_s": round(time.time() - t0, 1)}


def pair(model: str, card: str, seq: int, knobs, steps: int, name: str, work: Path,
         cpu: bool, gpus_list=(1, 2), profile: Path | None = None,
         run_extra: tuple[str, ...] = ()) -> list[dict]:
    d = work / name.replace(" ", "_")
    d.mkdir(parents=True)
    mdir = d / "model"
    build_model(model, 2 if cpu else None, mdir, "cpu" if cpu else "cuda")
    recs = []
    for gpus in gpus_list:
        plan = d / f"plan{gpus}.yaml"
        sug = _suggest(model, card, seq, knobs, gpus, plan, cpu, mdir)
        rec: dict = {"case": "pair", "name": name, "model": model, "card": card, "seq": seq,
                     "gpus": gpus,  # the runner's memory sampler period (A/B of its cost)
                     "sample_interval_s": float(os.environ.get("QPLAN_SAMPLE_INTERVAL_S", "0.02"))}
        if "settings" not in sug:
            recs.append({**rec, **sug})
            continue
        cfg = sug["settings"]
        rec.update(plan=cfg, estimate={k: sug.get(k) for k in ("peak_gib", "band_gib",
                                                               "breakdown", "tokens_per_s")})
        s = 64 if cpu else cfg["seq_len"]
        data = write_data(d / f"data{gpus}.jsonl", "packed", s,
                          rows=cfg["batch_size"] * cfg["grad_accum"] * (steps + 1))
        prof = profile.with_name(f"{profile.stem}-{gpus}gpu.txt") if profile else None
        rec.update(_run(plan, mdir, data, d / f"run{gpus}", steps, card, cpu, prof, run_extra))
        if prof is not None:
            rec["profiled"] = True  # under cProfile: its speed is not comparable
        recs.append(rec)
        print(f"{name} gpus={gpus}: {rec.get('status')} steady {rec.get('steady_tokens_per_s')} "
              f"(predicted {rec.get('predicted_tokens_per_s')}) est {rec.get('estimated_peak_gib')}",
              flush=True)
    debug = os.environ.get("QPLAN_BENCH_DEBUG")
    if debug and any(r.get("status") != "completed" for r in recs):
        # a failed run's attempt results (errors, tracebacks) and logs, for the report
        for f in d.rglob("*"):
            if f.is_file() and (f.name == "result.json" or f.suffix == ".log") \
                    and f.stat().st_size < 1 << 20:
                dest = Path(debug) / name.replace(" ", "_") / f.relative_to(d)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, dest)
    shutil.rmtree(d, ignore_errors=True)
    return recs


def report(paths: list[Path]) -> str:
    rows = [json.loads(x) for p in paths for x in p.read_text().splitlines() if x.strip()]
    lines = ["# Data-parallel runs on two GPUs (qplan run --gpus 2)", "",
             "Made by `python benchmarks/ddp_gpu.py --report` from "
             + ", ".join(f"`{p.relative_to(ROOT)}`" for p in paths) + ". Each case: `qplan "
             "suggest --gpu CARD --save` for one GPU and with `--gpus 2` (the same effective "
             "batch), then `qplan run --plan` (with `--simulate-gpu CARD` for a consumer card: "
             "each GPU's allocator capped), one run at a time on an H200 x2 machine.", ""]
    for r in rows:
        if r["case"] == "allreduce":
            res = [x for x in r.get("results", []) if "mib" in x]
            lines += ["## NCCL all-reduce between the two GPUs", "",
                      "| float32 MiB | ms | bus GB/s |", "|---|---|---|"]
            lines += [f"| {x['mib']} | {x['s'] * 1e3:.2f} | {x['busbw_gbs']:.0f} |" for x in res]
            lines.append("")
    pairs = [r for r in rows if r["case"] == "pair" and not r.get("profiled")]
    if pairs:
        lines += ["## Throughput and memory per GPU", "",
                  "| case | GPUs | plan | predicted tok/s | measured steady tok/s | error | "
                  "estimate per GPU | nvidia-smi peak per rank | error (worst rank) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in pairs:
            c = r.get("plan") or {}
            plan = (f"{c.get('seq_len')}x{c.get('batch_size')}x{c.get('grad_accum')}"
                    f"{' ckpt' if c.get('grad_ckpt') else ''}") if c else r.get("status")
            pred, meas = r.get("predicted_tokens_per_s"), r.get("steady_tokens_per_s")
            err = f"{pred / meas - 1:+.1%}" if pred and meas else "n/a"
            if r["card"] != "h200":  # the prediction is for the simulated card
                err = "n/a (predicted for the card)"
            ranks = r.get("rank_measured") or [r.get("measured")]
            peaks = [m.get("nvml_peak_gib") for m in ranks if m]
            est = r.get("estimated_peak_gib")
            worst = max(peaks) if peaks and all(p is not None for p in peaks) else None
            merr = f"{est / worst - 1:+.1%}" if est and worst else "n/a"
            num = lambda x: f"{x:,.0f}" if x else "n/a"  # noqa: E731
            status = "" if r.get("status") == "ok" else f" ({r.get('ended') or r.get('status')}: " \
                f"{(r.get('error') or '')[:60]})"
            lines.append(f"| {r['name']}{status} | {r['gpus']} | {plan} | {num(pred)} | "
                         f"{num(meas)} | {err} | {est} GiB | "
                         f"{', '.join(f'{p:.2f}' for p in peaks if p is not None) or 'n/a'} | "
                         f"{merr} |")
        lines.append("")
        by = {}
        for r in pairs:
            by.setdefault(r["name"], {})[r["gpus"]] = r.get("steady_tokens_per_s")
        sc = [(n, v[2] / v[1]) for n, v in by.items() if v.get(1) and v.get(2)]
        if sc:
            lines += ["Scaling (2 GPUs over 1, measured): "
                      + "; ".join(f"{n} {x:.2f}x" for n, x in sc), ""]
    lines += NOTES
    return "\n".join(lines)


NOTES = [
    "## Notes", "",
    "- The first call (`raw/h200x2_ddp1.jsonl`, not in the tables) found two bugs: a 1-GPU "
    "`qplan run` on a machine with 2 GPUs let transformers' Trainer see both, so it ran "
    "DataParallel with twice the per-device batch (peaks 128.4 GiB for a 67.5 GiB estimate, "
    "8.7 for 5.5; the training processes now see only their GPUs, fixed for the second call); "
    "and with DDP the fused loss called the decoder past DDP's forward (on CPU the gradients "
    "were then never averaged, on the GPUs it failed: it now runs inside DDP's forward, and a "
    "CPU test compares 2 processes with 1). The second call's fused-loss DDP row then failed "
    "on the GPUs only (DDP's forward with no inputs at all: IndexError); it now passes one "
    "keyword.",
    "- NCCL's buffers: nvidia-smi less PyTorch's reserved memory is 0.83 GiB more per GPU with "
    "DDP than alone (both DDP pairs, and the all-reduce benchmark alone); "
    "`calibration.NCCL_BUFFERS_GIB` is 0.85. The NVLink all-reduce reached 287 GB/s at 170 MiB "
    "(0.64 of NVLink 4's 450 GB/s a direction: `ALLREDUCE_EFFICIENCY['nvlink']`). PCIe pairs "
    "(consumer cards) are not measured: their all-reduce share (0.5) is assumed.",
    "- Speed: the runner's own cost per micro-batch is not in the speed model (it is fitted to "
    "the speed grid's harness, `benchmarks/speed_grid.py`): at batch 1 on a 1B model `qplan run` "
    "measured about half the harness's tokens/s; at batch 4 on a 4B model 5% under the "
    "prediction. The same 1-GPU llama-3.2-1b run measured 4,377 and 5,421 (profiled) tokens/s "
    "in two calls.",
    "- Where the runner's time went (`raw/h200x2_ddp3_profile.txt`: cProfile of that 1-GPU "
    "llama-3.2-1b run's training process, `--profile`): the memory monitor's sampling thread "
    "took 10.7 s of the 53 s attempt (8.7 ms a sample every 20 ms: NVML and psutil calls "
    "holding Python's lock against the training loop). The monitor now samples from a process "
    "of its own (`qplan.runner.sampler`); on the CPU the tiny model's steps got 6% faster.",
    "- Re-measured after that change and the host-side bookkeeping (`raw/h200_speed_runner1.jsonl`, "
    "the same 1-GPU llama-3.2-1b 1024x1 plan, on the nvidia-h200-x2 machine): 4,709 tokens/s "
    "steady (predicted 7,669; harness 8,601): inside the earlier runs' 4,377-5,421, so neither "
    "change closed the gap between `qplan run` and the harness at batch 1.",
    "- The sampler A/B, next session (`raw/h200_speed_sampler_ab1.jsonl`, "
    "`raw/h200_speed_sampler_ab2.jsonl`: the same plan, one `qplan run` after another, "
    "`QPLAN_SAMPLE_INTERVAL_S` 2.0 or the default 0.02 s; `raw/h200_speed_harness_ab.jsonl`: "
    "the speed grid's harness, the same settings, 2 fresh processes between them): first call 6,816 (2.0 s), 6,913 (0.02 s), harness 5,933 and 5,501, "
    "7,648 (2.0 s); second call 8,603 (0.02 s), 8,154 (2.0 s) tokens/s, predicted 7,669. The "
    "sampler's period makes no difference the spread does not swamp, `qplan run` was not slower "
    "than the harness, and the earlier sessions' 4,377-5,421 did not recur: at batch 1 on the "
    "H200 (host-bound) a run's speed varies by +-15% from process to process and machine to "
    "machine (the grid's repeatability study found the same), so the gap was that variation, "
    "not the runner.", ""]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out")
    ap.add_argument("--only", help="comma-separated case names (allreduce, or a pair's name)")
    ap.add_argument("--deadline", type=float, default=0, help="start no case after this many s")
    ap.add_argument("--cpu-dry-run", action="store_true")
    ap.add_argument("--pair-gpus", default="1,2", help="the GPU counts each pair runs")
    ap.add_argument("--profile", type=Path, help="cProfile each run's training process (rank "
                    "0) into this file's folder (NAME-<n>gpu.txt)")
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    if args.report:
        # ddp1: before two fixes (a 1-GPU run saw both GPUs; DDP with the fused loss failed):
        # its 1-GPU rows are not the plans' (see the report's notes)
        REPORT.write_text(report([p for p in sorted(RAW.glob("h200x2_ddp*.jsonl"))
                                  if p.name != "h200x2_ddp1.jsonl"]))
        print(REPORT)
        return 0
    work = Path(tempfile.mkdtemp(prefix="qplan-ddp-"))
    start = time.time()
    only = set(args.only.split(",")) if args.only else None
    cases = [] if args.cpu_dry_run else [("allreduce", None)]
    cases += [(p[-1], p) for p in (PAIRS[:1] if args.cpu_dry_run else PAIRS)]
    for name, p in cases:
        if only and name not in only:
            continue
        if args.deadline and time.time() - start > args.deadline:
            print(f"{name}: not started (deadline)", flush=True)
            continue
        recs = [allreduce(work)] if p is None else pair(
            *p, work=work, cpu=args.cpu_dry_run,
            gpus_list=[int(x) for x in args.pair_gpus.split(",")], profile=args.profile)
        with open(args.out, "a") as f:
            for r in recs:
                f.write(json.dumps(r) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
