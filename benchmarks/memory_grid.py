"""Peak GPU memory of `qplan run` itself, one fresh process per configuration.

Each point is a real ``qplan run`` (the runner's parent and training child, its data path,
its techniques) of a random-weight model with a catalogue model's shapes (optionally fewer
blocks: the per-block memory is the same, weights are counted exactly), for three optimizer
steps, with every setting fixed by a plan file. The report of each run gives what it
measured (PyTorch's peak reserved and allocated memory, the NVML peak of the training
process, the CUDA context measured right after CUDA started); this script adds the point's
description and writes one JSON line per point. ``benchmarks/grid_report.py`` compares
them with the memory model of the commit, split into the points used to set the model's
few global constants and the held-out rest.

Several runs share the GPU at once (each one's memory is its own process's, read by PID
from NVML; speed figures of concurrent runs are not used).

Usage (GPU machine; the training stack and click/rich installed):
    python benchmarks/memory_grid.py --out "$OUT" [--jobs 6] [--only NAME,...]
    python benchmarks/memory_grid.py --cpu-dry-run --out /tmp/grid   # plumbing, on CPU
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

GIB = 1024**3

# name: (catalogue model, blocks or None for all, {settings}, data, split)
# data "packed": rows of many short examples (qplan run's usual rows, with a mask);
# "unpacked": one long example per row, filling it (no restart, no mask).
L = dict
POINTS: dict[str, tuple] = {}


def _p(name, model, layers, data, split, **settings):
    POINTS[name] = (model, layers, settings, data, split)


# --- points that set the global constants (allocator, libraries): Llama-3.1-8B only
_p("fit-l8-ckpt-4k", "llama-3.1-8b", 8, "packed", "fit", seq_len=4096, batch_size=1, grad_ckpt=True)
_p("fit-l8-nockpt-2k-b4", "llama-3.1-8b", 8, "packed", "fit", seq_len=2048, batch_size=4,
   grad_ckpt=False)
_p("fit-l8-ckpt-16k-std", "llama-3.1-8b", 8, "unpacked", "fit", seq_len=16384, batch_size=1,
   grad_ckpt=True, loss="standard")
_p("fit-l8-nockpt-1k-b2-tiny", "llama-3.1-8b", 8, "unpacked", "fit", seq_len=1024, batch_size=2,
   grad_ckpt=False, loss="fused")
# --- held out: other architectures and regimes
_p("qwen3-1.7b-nockpt-tiled-4k", "qwen3-1.7b", None, "packed", "heldout", seq_len=4096,
   batch_size=1, grad_ckpt=False, mlp_chunk=2048)
_p("qwen3-4b-nockpt-2k-b2", "qwen3-4b", 12, "packed", "heldout", seq_len=2048, batch_size=2,
   grad_ckpt=False)
_p("qwen3-14b-ckpt-16k", "qwen3-14b", 8, "packed", "heldout", seq_len=16384, batch_size=1,
   grad_ckpt=True, recompute_norms=True)
_p("qwen3-8b-ckpt-32k-offload", "qwen3-8b", 8, "unpacked", "heldout", seq_len=32768,
   batch_size=1, grad_ckpt=True, offload_activations=True, mlp_chunk=2048, recompute_norms=True,
   embed_on_cpu=True)
_p("gemma-3-1b-nockpt-4k-b2", "gemma-3-1b", None, "packed", "heldout", seq_len=4096,
   batch_size=2, grad_ckpt=False)
_p("gemma-3-4b-ckpt-8k", "gemma-3-4b", 12, "unpacked", "heldout", seq_len=8192, batch_size=1,
   grad_ckpt=True)
_p("gemma-3-12b-ckpt-4k-b4-std", "gemma-3-12b", 8, "packed", "heldout", seq_len=4096,
   batch_size=4, grad_ckpt=True, loss="standard")
_p("gemma-2-2b-nockpt-2k-b4", "gemma-2-2b", None, "unpacked", "heldout", seq_len=2048,
   batch_size=4, grad_ckpt=False)
_p("phi-4-ckpt-16k", "phi-4", 8, "packed", "heldout", seq_len=16384, batch_size=1, grad_ckpt=True)
_p("phi-3.5-nockpt-2k-b2", "phi-3.5-mini", 8, "packed", "heldout", seq_len=2048, batch_size=2,
   grad_ckpt=False, lora_dropout=0.05)
_p("nemo-ckpt-32k-tiled", "mistral-nemo-12b", 8, "packed", "heldout", seq_len=32768, batch_size=1,
   grad_ckpt=True, mlp_chunk=2048, recompute_norms=True)
_p("nemo-nockpt-4k", "mistral-nemo-12b", 8, "unpacked", "heldout", seq_len=4096, batch_size=1,
   grad_ckpt=False)
_p("olmo2-7b-ckpt-8k-b2", "olmo-2-7b", 8, "packed", "heldout", seq_len=8192, batch_size=2,
   grad_ckpt=True)
_p("olmo2-7b-nockpt-2k", "olmo-2-7b", 8, "packed", "heldout", seq_len=2048, batch_size=1,
   grad_ckpt=False, mlp_chunk=512)
_p("granite-8b-ckpt-8k", "granite-3.3-8b", 8, "unpacked", "heldout", seq_len=8192, batch_size=2,
   grad_ckpt=True, loss="standard")
_p("granite-8b-nockpt-1k-b8", "granite-3.3-8b", 8, "packed", "heldout", seq_len=1024,
   batch_size=8, grad_ckpt=False)
_p("llama-3.2-3b-nockpt-tiled-8k", "llama-3.2-3b", None, "packed", "heldout", seq_len=8192,
   batch_size=1, grad_ckpt=False, mlp_chunk=2048)
_p("llama-3.2-1b-ckpt-64k-offload", "llama-3.2-1b", None, "unpacked", "heldout", seq_len=65536,
   batch_size=1, grad_ckpt=True, offload_activations=True, mlp_chunk=2048, recompute_norms=True)
_p("qwen2.5-7b-nockpt-1k-b16", "qwen2.5-7b", 8, "packed", "heldout", seq_len=1024, batch_size=16,
   grad_ckpt=False)
_p("qwen2.5-7b-ckpt-kbit-std", "qwen2.5-7b", 8, "unpacked", "heldout", seq_len=4096,
   batch_size=2, grad_ckpt=True, prepare="kbit", loss="standard", lora_dropout=0.05)
_p("smollm2-1.7b-nockpt-2k-b4", "smollm2-1.7b", None, "packed", "heldout", seq_len=2048,
   batch_size=4, grad_ckpt=False)
_p("llama-3.1-8b-ckpt-64k-cpuemb", "llama-3.1-8b", 8, "unpacked", "heldout", seq_len=65536,
   batch_size=1, grad_ckpt=True, mlp_chunk=2048, recompute_norms=True, embed_on_cpu=True)
_p("tinyllama-nockpt-2k-b8-r64", "tinyllama-1.1b", None, "packed", "heldout", seq_len=2048,
   batch_size=8, grad_ckpt=False, lora_rank=64, lora_alpha=128)
_p("qwen2.5-0.5b-ckpt-8k-b4-qv", "qwen2.5-0.5b", None, "packed", "heldout", seq_len=8192,
   batch_size=4, grad_ckpt=True, lora_targets=("q", "v"))
# --- the runner's own overhead per step, for the speed model (run alone: --jobs 1 --steps 12)
_p("speed-qwen2.5-0.5b-2k", "qwen2.5-0.5b", None, "unpacked", "speed", seq_len=2048,
   batch_size=1, grad_ckpt=False)
_p("speed-llama-3.2-1b-2k-b4x2", "llama-3.2-1b", None, "unpacked", "speed", seq_len=2048,
   batch_size=4, grad_accum=2, grad_ckpt=False)


def build_model(model: str, layers: int | None, path: Path, device: str) -> None:
    """Random-weight model with the catalogue's shapes (``layers`` blocks), saved in bf16
    with the tests' word-level tokenizer (its ids stay far below the vocabulary)."""
    code = f"""
import sys, torch
sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]
from transformers import AutoConfig, AutoModelForCausalLM
from fixtures.tiny_llama import make_tokenizer, sentences
from qplan import api
d = api.get_model({model!r}).to_config_dict()
if {layers!r}:
    d["num_hidden_layers"] = {layers!r}
    if d.get("layer_types"):
        d["layer_types"] = d["layer_types"][:{layers!r}]
torch.manual_seed(0)
with torch.device({device!r}):
    m = AutoModelForCausalLM.from_config(AutoConfig.for_model(**d), dtype=torch.bfloat16)
m.save_pretrained({str(path)!r}, max_shard_size="4GB")
make_tokenizer(sentences(400, seed=123)).save_pretrained({str(path)!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def write_data(path: Path, kind: str, seq: int, rows: int) -> Path:
    """``packed``: short examples (several per row); ``unpacked``: examples longer than
    ``seq`` words (the word-level tokenizer makes a token of each word), one per row."""
    from fixtures.tiny_llama import WORDS

    import random

    rnd = random.Random(seq * 7 + rows)
    recs = []
    if kind == "packed":
        n = rows * seq // 150 + 8
        recs = [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(60, 240))) for _ in range(n)]
    else:
        recs = [" ".join(rnd.choice(WORDS) for _ in range(seq + 16)) for _ in range(rows + 2)]
    with open(path, "w") as f:
        for r in recs:
            f.write(json.dumps({"text": r}) + "\n")
    return path


def plan_file(name: str, model_dir: Path, settings: dict, path: Path) -> dict:
    from qplan import api
    from qplan.planner.config import TrainConfig
    from qplan.planner.plan import save_plan

    profile = api.get_model(str(model_dir))
    if profile.tie_word_embeddings:
        settings = {**settings, "embed_on_cpu": False}
    cfg = TrainConfig(**{"grad_accum": 1, "loss": "fused", **settings})
    plan = api.make_plan(profile, api.get_gpu("h200"), cfg, target=cfg.effective_batch,
                         model_ref=str(model_dir))
    save_plan(plan, path)
    return cfg.to_dict()


class Budget:
    """Starts a run only while the estimated peaks of the runs in flight fit the GPU."""

    def __init__(self, gib: float):
        self.free = gib
        self.cv = threading.Condition()

    def take(self, gib: float):
        with self.cv:
            while self.free < gib:
                self.cv.wait()
            self.free -= gib

    def give(self, gib: float):
        with self.cv:
            self.free += gib
            self.cv.notify_all()


def steady_tokens_per_s(run_dir: Path, seq: int) -> float | None:
    """Rows x seq over the median step time of the steps after the first two."""
    import statistics

    f = sorted(run_dir.glob("attempts/*/steps.jsonl"))
    if not f:
        return None
    steps = [json.loads(x) for x in f[-1].read_text().splitlines() if x.strip()]
    late = steps[2:]
    if not late:
        return None
    return round(len(late[0]["rows"]) * seq / statistics.median(s["seconds"] for s in late), 1)


def run_point(name: str, work: Path, model_dir: Path, data: Path, cfg: dict, budget: Budget,
              est_gib: float, cpu: bool, log, steps: int = 3) -> dict:
    out = work / "runs" / name
    cmd = [sys.executable, "-m", "qplan", "run", "--model", str(model_dir), "--data", str(data),
           "--plan", str(work / "plans" / f"{name}.yaml"), "--max-steps", str(steps),
           "--save-steps", "1000", "--max-attempts", "1", "--output", str(out)]
    if cpu:
        cmd.append("--cpu")
    need = min(est_gib * 1.3 + 2, budget_total)
    budget.take(need)
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                           env={**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"})
    finally:
        budget.give(need)
    rec = {"name": name, "exit_code": p.returncode, "wall_s": round(time.time() - t0, 1)}
    rep = out / "report.json"
    if rep.exists():
        r = json.loads(rep.read_text())
        a = r["attempts"][-1] if r.get("attempts") else {}
        rec.update(status=r.get("status"), estimated_peak_gib=a.get("estimated_peak_gib"),
                   measured=a.get("measured"), tokens_per_s=a.get("tokens_per_s"),
                   steady_tokens_per_s=steady_tokens_per_s(out, cfg["seq_len"]),
                   ended=a.get("ended"), error=a.get("error"), data_summary=r.get("data"))
    else:
        rec["stderr_tail"] = p.stderr[-2000:]
    log(f"{name}: exit {p.returncode} in {rec['wall_s']} s: "
        f"est {rec.get('estimated_peak_gib')} measured {rec.get('measured')}")
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return rec


budget_total = 120.0


def main() -> int:
    global budget_total
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/grid"))
    ap.add_argument("--jobs", type=int, default=6)
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps a run")
    ap.add_argument("--only", help="comma-separated point names")
    ap.add_argument("--budget-gib", type=float, default=120.0, help="GPU memory runs may share")
    ap.add_argument("--workdir")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="tiny models of each architecture (2 blocks) on CPU: plumbing only")
    args = ap.parse_args()
    budget_total = args.budget_gib
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="qplan-grid-"))
    (work / "plans").mkdir(parents=True, exist_ok=True)
    names = args.only.split(",") if args.only else list(POINTS)
    logf = open(out / "grid_log.txt", "a")
    lock = threading.Lock()

    def log(m):
        with lock:
            print(m, flush=True)
            logf.write(m + "\n")
            logf.flush()

    from qplan import api
    from qplan.planner.config import TrainConfig

    t0 = time.time()
    device = "cpu" if args.cpu_dry_run else "cuda"
    jobs = []
    for n in names:
        model, layers, settings, kind, split = POINTS[n]
        if args.cpu_dry_run:
            layers = 2
            settings = {**settings, "seq_len": min(settings["seq_len"], 256)}
        jobs.append((n, model, layers, settings, kind, split))
    # models are built on first use and deleted after their last point (the disk is small)
    users: dict = {}
    for j in jobs:
        users[(j[1], j[2])] = users.get((j[1], j[2]), 0) + 1
    dirs: dict = {}
    locks = {k: threading.Lock() for k in users}
    state_lock = threading.Lock()

    def model_dir(key):
        with locks[key]:
            if key not in dirs:
                d = work / "models" / f"{key[0]}-{key[1] or 'all'}"
                build_model(key[0], key[1], d, device)
                log(f"built {key[0]} ({key[1] or 'all'} blocks) at {time.time() - t0:.0f} s")
                dirs[key] = d
            return dirs[key]

    def release(key):
        with state_lock:
            users[key] -= 1
            last = users[key] == 0
        if last:
            shutil.rmtree(dirs[key], ignore_errors=True)

    budget = Budget(args.budget_gib)

    def one(job):
        n, model, layers, settings, kind, split = job
        key = (model, layers)
        try:
            d = model_dir(key)
            data = write_data(work / f"data-{n}.jsonl", kind, settings["seq_len"],
                              args.steps * settings.get("batch_size", 1) * settings.get("grad_accum", 1))
            cfg = plan_file(n, d, settings, work / "plans" / f"{n}.yaml")
            est = api.estimate(api.get_model(str(d)), api.get_gpu("h200"),
                               TrainConfig(**{**cfg, "packed_rows": kind == "packed"})).memory.peak_gib
            rec = run_point(n, work, d, data, cfg, budget, est, args.cpu_dry_run, log,
                            steps=args.steps)
        except Exception as e:  # noqa: BLE001 - one failed point does not stop the grid
            rec = {"name": n, "status": "harness-error", "error": f"{type(e).__name__}: {e}"[:500]}
            log(f"{n}: harness error {rec['error']}")
            cfg = settings
        finally:
            release(key)
        rec.update(model=model, layers=layers, data=kind, split=split, settings=cfg)
        return rec

    with ThreadPoolExecutor(max_workers=args.jobs) as ex:
        recs = list(ex.map(one, sorted(jobs, key=lambda j: (j[1], j[2] or 0))))
    env = {}
    try:
        import torch

        env = {"torch": torch.__version__, "cuda": torch.version.cuda,
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
        for pkg in ("transformers", "peft", "bitsandbytes", "accelerate"):
            env[pkg] = __import__(pkg).__version__
    except Exception:  # noqa: BLE001
        pass
    with open(out / "grid.jsonl", "a") as f:
        for r in recs:
            f.write(json.dumps({**r, "env": env, "jobs": args.jobs}) + "\n")
    log(f"done: {len(recs)} points in {time.time() - t0:.0f} s")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r.get("status") == "ok" for r in recs) else 1


if __name__ == "__main__":
    sys.exit(main())
