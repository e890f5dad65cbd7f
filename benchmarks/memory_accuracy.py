"""Measure real QLoRA training memory on a GPU and record it beside qplan's estimate.

For each model (qplan catalogue shapes, random weights): build it in bf16 on the GPU,
``save_pretrained`` it to local disk, load it back in 4-bit (NF4, double quantization,
bf16 compute), then for each configuration of the grid run real training steps
(forward + backward + optimizer step under bf16 autocast, exactly as the runner does,
through :mod:`qplan.runner.techniques`) and record:

- ``peak_allocated_gib`` / ``peak_reserved_gib``: torch's counters over the steps;
- ``nvml_peak_gib``: device memory used as NVML reports it (what nvidia-smi shows),
  sampled every 2 ms, minus what was in use before this process touched the GPU;
- ``tokens_per_s``: micro-batch tokens over the median step time (first step excluded);
- ``estimate_peak_gib``: ``qplan estimate``'s peak for the same settings at the commit.

Usage (on the GPU machine; see benchmarks/README.md):
    python benchmarks/memory_accuracy.py --models llama-3.2-1b --grid full --out results.jsonl
One process per allocator setting (PYTORCH_CUDA_ALLOC_CONF must be set before CUDA starts).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 1024**3

# (seq, batch, rank, grad_ckpt, dropout, prepare, loss, optim)
GRIDS = {
    "full": [
        (2048, 1, 16, True, 0.0, "lean", "standard", "paged_adamw_8bit"),
        (2048, 1, 16, True, 0.0, "lean", "fused", "paged_adamw_8bit"),
        (512, 4, 16, False, 0.0, "lean", "standard", "paged_adamw_8bit"),
        (1024, 2, 32, False, 0.05, "lean", "fused", "paged_adamw_8bit"),
        (2048, 4, 32, True, 0.05, "lean", "standard", "paged_adamw_8bit"),
        (1024, 8, 16, True, 0.0, "lean", "fused", "adamw_torch"),
        (4096, 2, 64, True, 0.0, "lean", "fused", "paged_adamw_8bit"),
        (8192, 1, 16, True, 0.05, "lean", "fused", "paged_adamw_8bit"),
        (16384, 1, 16, True, 0.0, "lean", "fused", "paged_adamw_8bit"),
        (4096, 1, 16, True, 0.0, "lean", "standard", "paged_adamw_8bit"),
        # peft's prepare_model_for_kbit_training (float32 embeddings and lm_head)
        (2048, 1, 16, True, 0.05, "kbit", "standard", "paged_adamw_8bit"),
        (4096, 1, 32, True, 0.0, "kbit", "fused", "paged_adamw_8bit"),
        (512, 2, 64, False, 0.0, "kbit", "standard", "adamw_torch"),
        (2048, 2, 16, False, 0.05, "kbit", "fused", "paged_adamw_8bit"),
        (8192, 1, 16, True, 0.0, "kbit", "standard", "paged_adamw_8bit"),
    ],
}
GRIDS["small"] = GRIDS["full"][:2] + GRIDS["full"][10:11]


class NvmlPeak:
    """Samples NVML's used memory every ``interval`` seconds in a thread; keeps the max."""

    def __init__(self, index: int = 0, interval: float = 0.002):
        import pynvml

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = None

    def used(self) -> int:
        return self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used

    def __enter__(self):
        self.peak = self.used()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            u = self.used()
            if u > self.peak:
                self.peak = u
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.used())


def build_and_save(profile, path: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if (path / "config.json").exists():
        return
    cfg = AutoConfig.for_model(**profile.to_config_dict())
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size="4GB")
    del model
    gc.collect()
    torch.cuda.empty_cache()


def run_config(model, profile, cfg, steps: int, nvml: NvmlPeak, baseline: int) -> dict:
    import torch

    from qplan.runner import techniques as T

    T.prepare_for_training(model, cfg)
    peft_model = T.add_lora(model, profile, cfg)
    opt = T.make_optimizer(peft_model.parameters(), cfg)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    times, losses, status, err = [], [], "ok", ""
    v = profile.vocab_size
    torch.manual_seed(0)  # the same tokens for every configuration of a length: losses compare
    try:
        with nvml:
            for _ in range(steps):
                ids = torch.randint(0, v, (cfg.batch_size, cfg.seq_len), device="cuda")
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                losses.append(T.train_step(peft_model, opt, cfg, [(ids, ids)]))
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError as e:
        status, err = "oom", str(e).split("\n")[0][:200]
    rec = {
        "status": status,
        "error": err,
        "trainable_params": trainable,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
        "nvml_peak_gib": (nvml.peak - baseline) / GIB,
        "step_s": times,
        "losses": losses,
        "tokens_per_s": (cfg.batch_size * cfg.seq_len / statistics.median(times[1:]))
        if len(times) > 1 else None,
    }
    pool = getattr(model, "_qplan_offload_pool", None)
    if pool is not None:
        rec["host_pinned_gib"] = pool.allocated_bytes / GIB
        rec["host_offload_peak_gib"] = pool.peak_in_use_bytes / GIB
        rec["pinned_failed"] = pool.pinned_failed
    # Undo: remove the adapters, free optimizer state.
    del opt
    base = peft_model.unload()
    del peft_model
    gc.collect()
    torch.cuda.empty_cache()
    return rec, base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", required=True, help="comma list of qplan catalogue names")
    ap.add_argument("--grid", default="full", choices=sorted(GRIDS))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", required=True)
    ap.add_argument("--workdir", default="/tmp/qplan-models")
    ap.add_argument("--keep", action="store_true", help="keep saved models")
    ap.add_argument("--deadline", type=float, default=1e9, help="stop starting configs after N s")
    ap.add_argument("--fresh", metavar="JSON", help="held-out mode: a JSON list of {model, settings}; "
                    "each runs in its own process and NVML's peak is recorded directly")
    ap.add_argument("--one", metavar="JSON", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.fresh:
        return run_fresh(args)
    if args.one:
        return run_one(args)
    t_start = time.time()

    nvml = NvmlPeak()
    baseline = nvml.used()  # before this process makes a CUDA context
    import torch
    import transformers, peft, bitsandbytes  # noqa: E401  (versions)

    from qplan import api
    from qplan.planner.config import TrainConfig
    from qplan.runner import techniques as T

    torch.cuda.init()
    x = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
    (x @ x).sum().item()
    context = nvml.used() - baseline - torch.cuda.memory_reserved()
    del x
    allocator = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    env = {
        "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__, "allocator": allocator or "default",
        "nvml_baseline_gib": baseline / GIB, "cuda_context_gib": context / GIB,
    }
    print(json.dumps(env), flush=True)
    out = open(args.out, "a")
    work = Path(args.workdir)
    for name in args.models.split(","):
        profile = api.get_model(name)
        path = work / name
        t0 = time.time()
        build_and_save(profile, path)
        t_build = time.time() - t0
        model = None
        current_prepare = None
        for (seq, b, r, ck, dp, prep, loss, optim) in GRIDS[args.grid]:
            if time.time() - t_start > args.deadline:
                print(f"deadline reached; skipping the rest of {name}", flush=True)
                break
            cfg = TrainConfig(seq_len=seq, batch_size=b, lora_rank=r, lora_alpha=2 * r,
                              grad_ckpt=ck, lora_dropout=dp, prepare=prep, loss=loss, optim=optim,
                              expandable_segments="expandable_segments:True" in allocator)
            if seq > profile.max_position_embeddings:
                continue
            if model is None or (prep == "lean" and current_prepare == "kbit"):
                model = None
                gc.collect()
                torch.cuda.empty_cache()
                t0 = time.time()
                model = T.load_model(str(path), cfg, device_map={"": 0})
                t_load = time.time() - t0
                static = torch.cuda.memory_allocated() / GIB
            current_prepare = prep
            est = api.estimate(profile, api.get_gpu("h100-sxm"), cfg)
            rec, model = run_config(model, profile, cfg, args.steps, nvml, baseline)
            rec.update({
                "model": name, "seq": seq, "batch": b, "lora_rank": r, "lora_alpha": 2 * r,
                "lora_dropout": dp, "lora_targets": "all", "grad_ckpt": ck, "optim": optim,
                "loss_chunk": cfg.loss_chunk,
                "prepare": prep, "loss": loss, "attn": cfg.attn, "quant": "nf4+dq",
                "allocator": allocator or "default", "expandable_segments": cfg.expandable_segments,
                "model_static_gib": static, "build_s": t_build, "load_s": t_load,
                "estimate_peak_gib": est.memory.peak_gib, "estimate_breakdown": est.memory.breakdown(),
                **{k: env[k] for k in ("gpu", "torch", "transformers", "peft", "bitsandbytes",
                                       "cuda_context_gib", "nvml_baseline_gib")},
            })
            out.write(json.dumps(rec) + "\n")
            out.flush()
            print(f"{name:14s} seq={seq:5d} b={b} r={r:2d} ckpt={ck!s:5s} do={dp} {prep:4s} "
                  f"{loss:8s} {optim:16s} {rec['status']:3s} alloc={rec['peak_allocated_gib']:6.2f} "
                  f"res={rec['peak_reserved_gib']:6.2f} nvml={rec['nvml_peak_gib']:6.2f} "
                  f"est={est.memory.peak_gib:6.2f} tok/s={rec['tokens_per_s'] or 0:8.0f}", flush=True)
        model = None
        gc.collect()
        torch.cuda.empty_cache()
        if not args.keep:
            shutil.rmtree(path, ignore_errors=True)
    out.close()


def run_fresh(args) -> None:
    """Each configuration in a new process: NVML's peak is then the process's own."""
    import subprocess


    items = json.loads(Path(args.fresh).read_text())
    t0 = time.time()
    for item in items:
        if time.time() - t0 > args.deadline:
            print("deadline reached", flush=True)
            break
        path = Path(args.workdir) / item["model"]
        if not (path / "config.json").exists():
            subprocess.run([sys.executable, __file__, "--models", item["model"], "--out", "/dev/null",
                            "--one", json.dumps({"build_only": True, **item}), "--workdir", args.workdir],
                           check=False)
        r = subprocess.run([sys.executable, __file__, "--models", item["model"], "--out", args.out,
                            "--one", json.dumps(item), "--workdir", args.workdir, "--steps", str(args.steps)],
                           check=False)
        if r.returncode:
            print(f"config {item} exited {r.returncode}", flush=True)


def run_one(args) -> None:
    item = json.loads(args.one)
    nvml = NvmlPeak()
    baseline = nvml.used()
    import torch
    import transformers, peft, bitsandbytes  # noqa: E401

    from qplan import api
    from qplan.planner.config import TrainConfig
    from qplan.runner import techniques as T

    profile = api.get_model(item["model"])
    path = Path(args.workdir) / item["model"]
    if item.get("build_only"):
        build_and_save(profile, path)
        return
    allocator = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    cfg = TrainConfig.from_dict({**item["settings"],
                                 "expandable_segments": "expandable_segments:True" in allocator})
    with nvml:
        model = T.load_model(str(path), cfg, device_map={"": 0})
    static = torch.cuda.memory_allocated() / GIB
    est = api.estimate(profile, api.get_gpu("h200"), cfg)
    rec, _ = run_config(model, profile, cfg, args.steps, nvml, baseline)
    rec.update({
        "model": item["model"], "seq": cfg.seq_len, "batch": cfg.batch_size,
        "lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
        "lora_targets": ",".join(cfg.lora_targets) if cfg.lora_targets else "all",
        "grad_ckpt": cfg.grad_ckpt, "optim": cfg.optim, "prepare": cfg.prepare, "loss": cfg.loss,
        "attn": cfg.attn, "offload_activations": cfg.offload_activations, "quant": "nf4+dq",
        "loss_chunk": cfg.loss_chunk,
        "allocator": allocator or "default", "expandable_segments": cfg.expandable_segments,
        "fresh_process": True, "model_static_gib": static, "settings": cfg.to_dict(),
        "mlp_chunk": cfg.mlp_chunk, "embed_on_cpu": cfg.embed_on_cpu,
        "recompute_norms": cfg.recompute_norms, "implementation": "lowmem-v2",
        "harness": "autocast-on-inputs-device",
        "estimate_peak_gib": est.memory.peak_gib, "estimate_breakdown": est.memory.breakdown(),
        "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__, "nvml_baseline_gib": baseline / GIB,
    })
    with open(args.out, "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(f"{item['model']:14s} {json.dumps(item['settings'])} {rec['status']} "
          f"alloc={rec['peak_allocated_gib']:.2f} res={rec['peak_reserved_gib']:.2f} "
          f"nvml={rec['nvml_peak_gib']:.2f} est={est.memory.peak_gib:.2f} "
          f"err={(est.memory.peak_gib / rec['nvml_peak_gib'] - 1) * 100:+.1f}% "
          f"tok/s={rec['tokens_per_s'] or 0:.0f}", flush=True)


if __name__ == "__main__":
    main()
