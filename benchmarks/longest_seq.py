"""Issue 5: the longest sequence that trains on 8 / 12 / 16 / 24 GB cards, plain recipe vs qplan.

Llama-3.1-8B shapes (random weights), QLoRA r=32 on all linear layers, batch 1, gradient
checkpointing. Each card is simulated on a big GPU by capping PyTorch's allocator at
``C x 10^9 bytes - 0.6 GiB`` after loading (the method that reproduced the published
"HF + FA2" figures; see ../shared/calibration/README.md). Every trial runs in its own process:
load in 4-bit, apply the settings through qplan.runner.techniques (as ``qplan run`` does),
cap, then two real optimizer steps on random tokens.

- plain recipe: peft ``prepare_model_for_kbit_training`` (float32 embeddings and lm_head),
  transformers' standard loss, default allocator: tried at the planner's predicted longest
  sequence and one step (25%) beyond, or below if that fails;
- qplan: ``api.longest_sequence`` for the capped card (capacity = cap + CUDA context +
  paged optimizer, which live outside the cap), run at that length.

Usage (GPU machine):  python benchmarks/longest_seq.py --out $OUT/longest.jsonl
                      python benchmarks/longest_seq.py --plans   (print the plans; no GPU)
Results: benchmarks/results/longest_seq.{jsonl,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

GIB = 1024**3
CARDS = (8, 12, 16, 24)
UNSLOTH = {8: 2972, 12: 21848, 16: 40724, 24: 78475}  # published, same setting
HF_FA2 = {8: None, 12: 932, 16: 2551, 24: 5789}  # published plain recipe (None = OOM)
MODEL = "llama-3.1-8b"
BASE = {"lora_rank": 32, "lora_alpha": 64, "batch_size": 1, "grad_ckpt": True}
PLAIN = {**BASE, "prepare": "kbit", "loss": "standard", "expandable_segments": False,
         "offload_activations": False, "mlp_chunk": 0, "embed_on_cpu": False}


def cap_bytes(card_gb: int) -> int:
    return int(card_gb * 1e9 - 0.6 * GIB)


def plan_for(card_gb: int, fixed: dict, step: int):
    from qplan import api
    from qplan.planner import calibration as C
    from qplan.planner.config import TrainConfig
    from qplan.planner.memory import optimizer_states
    from qplan.profiles.gpus import custom_gpu

    model = api.get_model(MODEL)
    outside = C.CUDA_CONTEXT_GIB * GIB + optimizer_states(model, TrainConfig(lora_rank=32))
    capacity = int(cap_bytes(card_gb) + outside)
    return api.longest_sequence(model, custom_gpu(card_gb), fixed=fixed, capacity_bytes=capacity,
                                step=step)


def trials() -> list[dict]:
    from qplan.errors import DoesNotFitError

    out = []
    for c in CARDS:
        p = plan_for(c, dict(BASE), 512)
        out.append({"card_gb": c, "recipe": "qplan", "settings": p.config.to_dict(),
                    "estimate_gib": p.peak_gib, "tokens_per_s_est": p.speed.tokens_per_s})
    for c in CARDS:
        try:
            p = plan_for(c, dict(PLAIN), 256)
            s = p.config.seq_len
        except DoesNotFitError:
            s = 256
        settings = dict(p.config.to_dict()) if s != 256 else None
        out.append({"card_gb": c, "recipe": "plain", "predicted": s, "settings": settings})
    return out


def run_trial(spec: dict, out: str, workdir: str) -> None:
    import torch

    from memory_accuracy import NvmlPeak, run_config
    from qplan import api
    from qplan.planner.config import TrainConfig
    from qplan.runner import techniques as T

    nvml = NvmlPeak()
    baseline = nvml.used()
    profile = api.get_model(MODEL)
    cfg = TrainConfig.from_dict(spec["settings"])
    model = T.load_model(str(Path(workdir) / MODEL), cfg, device_map={"": 0})
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(cap_bytes(spec["card_gb"]) / total, 0)
    rec, _ = run_config(model, profile, cfg, 2, nvml, baseline)
    est = api.estimate(profile, api.get_gpu("h200"), cfg).memory.peak_gib
    rec.update({"model": MODEL, "implementation": "lowmem-v2", "harness": "autocast-on-inputs-device",
                "card_gb": spec["card_gb"], "recipe": spec["recipe"], "seq": cfg.seq_len,
                "settings": cfg.to_dict(), "cap_gib": cap_bytes(spec["card_gb"]) / GIB,
                "estimate_peak_gib": est, "gpu": torch.cuda.get_device_name(0),
                "fresh_process": True})
    rec.pop("step_s", None)
    with open(out, "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(f"{spec['recipe']:5s} {spec['card_gb']:2d} GB seq={cfg.seq_len:6d} {rec['status']:3s} "
          f"nvml={rec['nvml_peak_gib']:.2f} res={rec['peak_reserved_gib']:.2f} est={est:.2f} "
          f"tok/s={rec['tokens_per_s'] or 0:.0f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plans", action="store_true", help="print the trials and exit")
    ap.add_argument("--out", default="longest.jsonl")
    ap.add_argument("--workdir", default="/dev/shm/m")
    ap.add_argument("--deadline", type=float, default=540)
    ap.add_argument("--cards", default="8,12,16,24", help="comma list of card sizes (GB)")
    ap.add_argument("--recipes", default="qplan,plain", help="comma list: qplan, plain")
    ap.add_argument("--plain-trials", type=int, default=2, choices=(1, 2),
                    help="plain recipe: trials per card (1 = only at the predicted longest)")
    ap.add_argument("--trial", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.trial:
        return run_trial(json.loads(args.trial), args.out, args.workdir)
    cards = [int(c) for c in args.cards.split(",")]
    todo = [t for t in trials() if t["card_gb"] in cards and t["recipe"] in args.recipes.split(",")]
    todo.sort(key=lambda t: (args.recipes.split(",").index(t["recipe"]), cards.index(t["card_gb"])))
    if args.plans:
        print(json.dumps(todo, indent=1))
        return
    t0 = time.time()
    from memory_accuracy import build_and_save  # noqa: F401  (needs torch: GPU machine)

    if not (Path(args.workdir) / MODEL / "config.json").exists():
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory_accuracy.py"), "--models", MODEL,
                        "--out", "/dev/null", "--workdir", args.workdir,
                        "--one", json.dumps({"build_only": True, "model": MODEL})], check=True)

    def go(spec: dict) -> str:
        env = dict(os.environ)
        if spec["settings"].get("expandable_segments"):
            env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
        else:
            env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
        r = subprocess.run([sys.executable, __file__, "--trial", json.dumps(spec), "--out", args.out,
                            "--workdir", args.workdir], env=env, check=False)
        if r.returncode:
            print(f"trial {spec['recipe']} {spec['card_gb']} GB exited {r.returncode}", flush=True)
            return "crash"
        last = [json.loads(x) for x in open(args.out)][-1] if Path(args.out).exists() else {}
        return last.get("status", "error")

    for spec in todo:
        if time.time() - t0 > args.deadline:
            print("deadline reached", flush=True)
            break
        if spec["recipe"] == "qplan":
            go(spec)
            continue
        s = spec["predicted"]
        base = spec["settings"] or {**PLAIN, "seq_len": 256}
        st = go({**spec, "settings": {**base, "seq_len": s}})
        nxt = int(s * 1.25) // 256 * 256 if st == "ok" else max(256, int(s * 0.75) // 256 * 256)
        if args.plain_trials > 1 and nxt != s and time.time() - t0 < args.deadline:
            go({**spec, "settings": {**base, "seq_len": nxt}})


if __name__ == "__main__":
    main()
