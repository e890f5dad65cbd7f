"""Steady-state training speed on the GPU: the data of the speed model, and a ranking check.

Two parts, both one process per model (the model is loaded once; each configuration gets
fresh LoRA adapters and optimizer; the memory techniques are put on and taken off the
loaded model between configurations), each configuration timed over steady-state steps
(2 warm-up steps, then the median of 4 steps, each a forward, backward and optimizer step of
one micro-batch under bf16 autocast, through qplan.runner.techniques like the runner):

* ``--grid``: a fixed set of configurations per model across sizes (0.5B to 14B shapes,
  blocks reduced for the large ones: the speed model is per block) and regimes;
* ``--rank``: for a model/card pair, the plans the search considered that fit the card,
  the chosen one among them, each timed the same way (PyTorch's allocator capped to the
  card, as ``qplan run --simulate-gpu`` does): where does the chosen plan rank?

Usage (GPU machine): python benchmarks/speed_grid.py --grid --rank --out "$OUT/speed.jsonl"
                     python benchmarks/speed_grid.py --cpu-dry-run --out /tmp/speed.jsonl
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# model: (blocks or None for all, [settings...])
BASE = dict(lora_rank=16, lora_alpha=32, loss="fused")
GRID = {
    "qwen2.5-0.5b": (None, [dict(seq_len=2048, batch_size=1, grad_ckpt=False),
                            dict(seq_len=4096, batch_size=4, grad_ckpt=True, packed_rows=True)]),
    "llama-3.2-1b": (None, [dict(seq_len=1024, batch_size=1, grad_ckpt=False, loss="standard"),
                            dict(seq_len=2048, batch_size=4, grad_ckpt=False)]),
    "qwen3-1.7b": (None, [dict(seq_len=2048, batch_size=2, grad_ckpt=False),
                          dict(seq_len=8192, batch_size=1, grad_ckpt=True, packed_rows=True)]),
    "gemma-3-1b": (None, [dict(seq_len=4096, batch_size=4, grad_ckpt=False),
                          dict(seq_len=2048, batch_size=1, grad_ckpt=True)]),
    "llama-3.2-3b": (None, [dict(seq_len=2048, batch_size=1, grad_ckpt=False),
                            dict(seq_len=8192, batch_size=1, grad_ckpt=True, recompute_norms=True,
                                 mlp_chunk=2048, offload_activations=True, packed_rows=True)]),
    "qwen3-8b": (8, [dict(seq_len=4096, batch_size=1, grad_ckpt=True, packed_rows=True),
                     dict(seq_len=2048, batch_size=8, grad_ckpt=False)]),
    "mistral-nemo-12b": (8, [dict(seq_len=2048, batch_size=2, grad_ckpt=True),
                             dict(seq_len=16384, batch_size=1, grad_ckpt=True, recompute_norms=True,
                                  mlp_chunk=2048, offload_activations=True, packed_rows=True)]),
    "qwen3-14b": (8, [dict(seq_len=1024, batch_size=1, grad_ckpt=True),
                      dict(seq_len=4096, batch_size=2, grad_ckpt=False, packed_rows=True)]),
}
# second grid (stop 16): models of the first left out, each at 2-4 batch sizes / lengths so
# that a model's fixed cost per micro-batch and its cost per token separate
_OFF = dict(grad_ckpt=True, offload_activations=True, mlp_chunk=2048, recompute_norms=True,
            packed_rows=True)
GRID2 = {
    "smollm2-360m": (None, [dict(seq_len=2048, batch_size=1, grad_ckpt=False),
                            dict(seq_len=2048, batch_size=8, grad_ckpt=False),
                            dict(seq_len=8192, batch_size=1, grad_ckpt=True, packed_rows=True)]),
    "qwen2.5-1.5b": (None, [dict(seq_len=2048, batch_size=1, grad_ckpt=False),
                            dict(seq_len=2048, batch_size=4, grad_ckpt=False),
                            dict(seq_len=4096, batch_size=2, grad_ckpt=True, packed_rows=True),
                            dict(seq_len=16384, batch_size=1, **_OFF)]),
    "gemma-2-2b": (None, [dict(seq_len=2048, batch_size=1, grad_ckpt=False, attn="eager"),
                          dict(seq_len=4096, batch_size=2, grad_ckpt=True, attn="eager")]),
    "phi-3.5-mini": (None, [dict(seq_len=2048, batch_size=1, grad_ckpt=False),
                            dict(seq_len=2048, batch_size=4, grad_ckpt=True),
                            dict(seq_len=8192, batch_size=1, grad_ckpt=True, packed_rows=True)]),
    "qwen3-4b": (None, [dict(seq_len=1024, batch_size=1, grad_ckpt=False, loss="standard"),
                        dict(seq_len=2048, batch_size=4, grad_ckpt=False),
                        dict(seq_len=4096, batch_size=2, grad_ckpt=True, packed_rows=True)]),
    "llama-3.1-8b": (8, [dict(seq_len=2048, batch_size=1, grad_ckpt=False),
                         dict(seq_len=2048, batch_size=4, grad_ckpt=False),
                         dict(seq_len=8192, batch_size=1, grad_ckpt=True, packed_rows=True),
                         dict(seq_len=32768, batch_size=1, **_OFF)]),
    "olmo-2-7b": (8, [dict(seq_len=2048, batch_size=2, grad_ckpt=False),
                      dict(seq_len=4096, batch_size=4, grad_ckpt=True)]),
    "gemma-3-12b": (8, [dict(seq_len=2048, batch_size=1, grad_ckpt=True),
                        dict(seq_len=4096, batch_size=2, grad_ckpt=False)]),
    "qwen2.5-14b": (8, [dict(seq_len=2048, batch_size=1, grad_ckpt=False),
                        dict(seq_len=2048, batch_size=8, grad_ckpt=True),
                        dict(seq_len=8192, batch_size=2, grad_ckpt=True, packed_rows=True)]),
}
GRIDS = {"1": GRID, "2": GRID2}
# model/card/seq pairs of the ranking check, and the seeds' recipe comparison
RANK = [("llama-3.1-8b", "rtx-4090", 2048, None), ("qwen3-4b", "rtx-4070", 2048, None)]
SEEDS_RECIPE = dict(seq_len=2048, batch_size=1, lora_rank=64, lora_alpha=16, lora_dropout=0.1,
                    grad_ckpt=True, prepare="kbit", loss="standard", optim="paged_adamw_8bit")


def build(model: str, layers, path: Path, device: str) -> None:
    code = f"""
import sys, torch
sys.path.insert(0, {str(ROOT)!r})
from transformers import AutoConfig, AutoModelForCausalLM
from qplan import api
d = api.get_model({model!r}).to_config_dict()
if {layers!r}:
    d["num_hidden_layers"] = {layers!r}
torch.manual_seed(0)
with torch.device({device!r}):
    m = AutoModelForCausalLM.from_config(AutoConfig.for_model(**d), dtype=torch.bfloat16)
m.save_pretrained({str(path)!r}, max_shard_size="4GB")
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def undo_techniques(model) -> None:
    """Take qplan's memory techniques off a loaded base model (the next configuration
    puts on its own): lean norms, tiled MLPs, CPU embeddings; offloaded checkpointing is
    reset by the next prepare_for_training."""
    import torch

    for m in model.modules():
        if getattr(m, "_qplan_lean", False):
            del m.forward
            m._qplan_lean = False
        if getattr(m, "_qplan_tiled", False):
            del m.forward
            m._qplan_tiled = False
    emb = model.get_input_embeddings()
    if getattr(emb, "_qplan_on_cpu", False):
        emb._forward_pre_hooks.clear()
        emb._forward_hooks.clear()
        emb._qplan_on_cpu = False
        emb.to("cuda" if torch.cuda.is_available() else "cpu")
    pool = getattr(model, "_qplan_offload_pool", None)
    if pool is not None:
        pool.close()
        model._qplan_offload_pool = None


def time_config(model, profile, cfg, steps: int, warmup: int, device: str) -> dict:
    import torch

    from qplan.runner import techniques as T

    T.prepare_for_training(model, cfg)
    peft_model = T.add_lora(model, profile, cfg)
    opt = T.make_optimizer(peft_model.parameters(), cfg)
    gen = torch.Generator().manual_seed(0)
    v = min(profile.vocab_size, 32000)
    times, status, err = [], "ok", ""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        for i in range(warmup + steps):
            ids = torch.randint(0, v, (cfg.batch_size, cfg.seq_len), generator=gen).to(device)
            pos = None
            if cfg.packed_rows:  # two examples a row, as qplan run's packed rows
                half = cfg.seq_len // 2
                pos = torch.cat([torch.arange(half), torch.arange(cfg.seq_len - half)]
                                ).expand(cfg.batch_size, -1).to(device)
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            T.train_step(peft_model, opt, cfg, [(ids, ids, pos)] if pos is not None else [(ids, ids)])
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - an OOM under the cap is a finding
        status, err = ("oom" if "out of memory" in str(e).lower() else "error"), str(e)[:300]
    rec = {"status": status, "error": err, "step_s": [round(t, 5) for t in times],
           "tokens_per_s": (cfg.batch_size * cfg.seq_len / statistics.median(times)) if times else None}
    if device == "cuda":
        rec["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    del opt
    base = peft_model.unload()
    del peft_model
    undo_techniques(base)
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return rec, base


def rank_configs(model: str, card: str, seq: int, layers) -> list:
    """The search's fitting candidates for the pair: the chosen plan, the 4 next fastest
    by prediction, and every 5th of the rest (a spread), each once."""
    from qplan import api
    from qplan.planner.search import search, usable_bytes

    m, g = api.get_model(model), api.get_gpu(card)
    best, seen = search(m, g, seq_len=seq, target_effective_batch=16,
                        fixed={"packed_rows": True})
    limit = usable_bytes(g)
    fit = sorted((c for c in seen if c.memory.safe_peak_bytes <= limit),
                 key=lambda c: -c.speed.tokens_per_s)
    pick = fit[:5] + fit[5::5]
    out, keys = [], set()
    for c in pick:
        k = tuple(sorted(c.config.to_dict().items(), key=lambda kv: kv[0]).__repr__())
        if k in keys:
            continue
        keys.add(k)
        out.append((c.config, c is best or c.config == best.config, c.speed.tokens_per_s))
    return out


def run_model(model: str, layers, configs, out_path: str, device: str, cap_gib=None,
              tag="grid", steps=4, warmup=2) -> None:
    run_model_parts(model, layers, [(tag, configs, cap_gib, steps, warmup)], out_path, device)


def run_model_parts(model: str, layers, parts, out_path: str, device: str) -> None:
    """Build the model once, then time each part's configurations (a part: tag, configs,
    allocator cap in GiB or None, steps, warm-up steps). Configurations are
    ``(TrainConfig, chosen, predicted tokens/s)`` or a dict of settings over ``BASE``."""
    import torch

    from qplan import api
    from qplan.planner.config import TrainConfig
    from qplan.runner import techniques as T

    with tempfile.TemporaryDirectory(prefix="qplan-speed-") as tmp:
        build(model, layers, Path(tmp), device)
        profile = api.get_model(tmp)
        base_model, prepared = None, None
        for tag, configs, cap_gib, steps, warmup in parts:
            if device == "cuda":
                total = torch.cuda.get_device_properties(0).total_memory
                frac = min(1.0, cap_gib * 2**30 / total) if cap_gib else 1.0
                torch.cuda.set_per_process_memory_fraction(frac)
            for item in configs:
                cfg, chosen, predicted = item if isinstance(item, tuple) else (
                    TrainConfig(**{**BASE, **item}), False, None)
                if profile.tie_word_embeddings and cfg.embed_on_cpu:
                    cfg = cfg.with_(embed_on_cpu=False)
                if base_model is None or cfg.prepare != prepared:
                    base_model = None
                    gc.collect()
                    base_model = T.load_model(tmp, cfg, device_map={"": 0} if device == "cuda" else None)
                    prepared = cfg.prepare
                rec, base_model = time_config(base_model, profile, cfg, steps, warmup, device)
                if cfg.prepare == "kbit":
                    base_model = None  # kbit cast the model's weights: reload for the next one
                rec.update(tag=tag, model=model, layers=layers, settings=cfg.to_dict(),
                           chosen=chosen, predicted_at_run=predicted, cap_gib=cap_gib)
                with open(out_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(f"{tag} {model} {cfg.seq_len}x{cfg.batch_size} ckpt={cfg.grad_ckpt} "
                      f"{cfg.loss}{' chosen' if chosen else ''}: {rec['status']} "
                      f"{rec['tokens_per_s'] and round(rec['tokens_per_s'])} tok/s", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--grid", action="store_true")
    ap.add_argument("--rank", action="store_true")
    ap.add_argument("--seeds", action="store_true", help="the seeds' recipe and the auto plan, "
                    "Llama-3.1-8B at 2048 tokens")
    ap.add_argument("--set", default="1", choices=sorted(GRIDS), help="which grid (--grid)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up steps per configuration")
    ap.add_argument("--rank-only", help="comma-separated models of the ranking check")
    ap.add_argument("--deadline", type=float, default=0, help="start no model after this many s")
    ap.add_argument("--only", help="comma-separated models of the grid")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--cpu-dry-run", action="store_true")
    args = ap.parse_args()
    device = "cpu" if args.cpu_dry_run else "cuda"
    if args.one:  # a child process: one model's part
        spec = json.loads(args.one)
        if spec["tag"] == "grid":
            run_model(spec["model"], spec["layers"], spec["configs"], args.out, device,
                      steps=spec.get("steps", 4), warmup=spec.get("warmup", 2))
        else:
            from qplan.planner.config import TrainConfig

            parts = [(p["tag"], [(TrainConfig.from_dict(c), ch, pr) for c, ch, pr in p["configs"]],
                      p.get("cap_gib"), p.get("steps", 4), p.get("warmup", 2))
                     for p in spec["parts"]]
            run_model_parts(spec["model"], spec["layers"], parts, args.out, device)
        return 0
    specs = []
    small = args.cpu_dry_run
    if args.grid:
        for model, (layers, cfgs) in GRIDS[args.set].items():
            if args.only and model not in args.only.split(","):
                continue
            if small:
                layers, cfgs = 2, [{**c, "seq_len": 128, "batch_size": min(c["batch_size"], 2)}
                                   for c in cfgs[:1]]
            specs.append({"tag": "grid", "model": model, "layers": layers, "configs": cfgs,
                          **({"steps": 1, "warmup": 1} if small else
                             {"steps": args.steps, "warmup": args.warmup})})
    if args.rank or args.seeds:
        from qplan import api
        from qplan.runner.planning import simulation

        if args.rank:
            for model, card, seq, layers in RANK:
                if args.rank_only and model not in args.rank_only.split(","):
                    continue
                cfgs = rank_configs(model, card, seq, layers)
                if small:
                    cfgs = [(c.with_(seq_len=128), ch, p) for c, ch, p in cfgs[:2]]
                cap = simulation(api.get_gpu(card)).cap_bytes / 2**30
                specs.append({"tag": f"rank:{card}", "model": model, "layers": 2 if small else layers,
                              "configs": [(c.to_dict(), ch, p) for c, ch, p in cfgs], "cap_gib": cap,
                              **({"steps": 1, "warmup": 1} if small else
                                 {"steps": args.steps, "warmup": args.warmup})})
        if args.seeds:  # on H200 (no cap): the auto plan and the seeds' recipe
            from qplan.planner.config import TrainConfig

            m, g = api.get_model("llama-3.1-8b"), api.get_gpu("h200")
            auto = api.suggest(m, g, seq_len=2048, fixed={"packed_rows": True}).config
            seeds = TrainConfig(**SEEDS_RECIPE)
            cfgs = [(auto, True, None), (seeds, False, None)]
            if small:
                cfgs = [(c.with_(seq_len=128, batch_size=1), ch, p) for c, ch, p in cfgs]
            specs.append({"tag": "seeds", "model": "llama-3.1-8b", "layers": 2 if small else None,
                          "configs": [(c.to_dict(), ch, p) for c, ch, p in cfgs],
                          **({"steps": 1, "warmup": 1} if small else
                                 {"steps": args.steps, "warmup": args.warmup})})
        # one child (one build of the model) for every spec of the same model and blocks
        merged: dict = {}
        for sp in [x for x in specs if x["tag"] != "grid"]:
            key = (sp["model"], sp["layers"])
            merged.setdefault(key, []).append(sp)
        specs = [x for x in specs if x["tag"] == "grid"] + [
            {"tag": "multi", "model": k[0], "layers": k[1], "parts": v} for k, v in merged.items()]
    start = time.time()
    for spec in specs:
        if args.deadline and time.time() - start > args.deadline:
            print(f"{spec['tag']} {spec['model']}: not started (deadline)", flush=True)
            continue
        t0 = time.time()
        cmd = [sys.executable, __file__, "--out", args.out, "--one", json.dumps(spec)]
        if args.cpu_dry_run:
            cmd.append("--cpu-dry-run")
        r = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"})
        print(f"{spec['tag']} {spec['model']}: exit {r.returncode} in {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
