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

A third mode measures how repeatable those numbers are:

* ``--repeat SET --times R``: each configuration of a set (``noise``: the rtx-4090 ranking
  plans that scattered, capped and uncapped, and the grid rows with the largest held-out
  errors; or a JSON file of items) in its OWN fresh process (load the saved model, time,
  exit; the allocator set as the trainer sets it), R rounds interleaved (A B C A B C ...) so
  that drift and configuration separate; 3 warm-up and 8 timed steps; each record has every
  step time, the median, tokens/s, the allocator's alloc retries, peak reserved, the repeat,
  the cap and the pid. ``--deadline`` starts no process that would end after it. On the
  H200 machine a fresh process takes 25-40 s whatever the model's size (the libraries and
  the 4-bit load 13-18 s of it) and a build 16-43 s: the first call (deadline 470 s,
  results/raw/h200_speed_repeat.jsonl) ran 10 processes, round 1 and 3 configurations of
  round 2. Since that call each build is followed by a sync (the shards' writeback may
  compete with the next process's timing: both processes timed right after a build there
  were the slower of their pairs, by 28% and 7%) and records say ``after_build``.

Usage (GPU machine): python benchmarks/speed_grid.py --grid --rank --out "$OUT/speed.jsonl"
                     python benchmarks/speed_grid.py --repeat noise --times 3 --deadline 495 \
                         --out "$OUT/h200_speed_repeat.jsonl" --log "$OUT/h200_speed_repeat.log"
                     python benchmarks/speed_grid.py --cpu-dry-run --out /tmp/speed.jsonl
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
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


def time_config(model, profile, cfg, steps: int, warmup: int, device: str,
                cleanup: bool = True, accum: int = 1) -> tuple[dict, object]:
    """Time ``steps`` optimizer steps (after ``warmup``) of ``accum`` micro-batches each."""
    import torch

    from qplan.runner import techniques as T

    T.prepare_for_training(model, cfg)
    peft_model = T.add_lora(model, profile, cfg)
    opt = T.make_optimizer(peft_model.parameters(), cfg)
    gen = torch.Generator().manual_seed(0)
    v = min(profile.vocab_size, 32000)
    times, status, err = [], "ok", ""
    retries = []  # the caching allocator's frees-and-retries: before, after warm-up, at the end
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        retries.append(torch.cuda.memory_stats().get("num_alloc_retries", 0))
    try:
        for i in range(warmup + steps):
            if device == "cuda" and i == warmup:
                retries.append(torch.cuda.memory_stats().get("num_alloc_retries", 0))
            micro = []
            for _ in range(accum):
                ids = torch.randint(0, v, (cfg.batch_size, cfg.seq_len), generator=gen).to(device)
                pos = None
                if cfg.packed_rows:  # two examples a row, as qplan run's packed rows
                    half = cfg.seq_len // 2
                    pos = torch.cat([torch.arange(half), torch.arange(cfg.seq_len - half)]
                                    ).expand(cfg.batch_size, -1).to(device)
                micro.append((ids, ids, pos) if pos is not None else (ids, ids))
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            T.train_step(peft_model, opt, cfg, micro)
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - an OOM under the cap is a finding
        status, err = ("oom" if "out of memory" in str(e).lower() else "error"), str(e)[:300]
    rec = {"status": status, "error": err, "step_s": [round(t, 5) for t in times],
           "accum": accum, "tokens_per_s": (accum * cfg.batch_size * cfg.seq_len
                                            / statistics.median(times)) if times else None}
    if device == "cuda":
        rec["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
        rec["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        stats = torch.cuda.memory_stats()
        retries += [stats.get("num_alloc_retries", 0)] * (3 - len(retries))
        rec["num_alloc_retries"] = retries[2] - retries[0]  # over warm-up and timed steps
        rec["alloc_retries_timed"] = retries[2] - retries[1]
        rec["num_ooms"] = stats.get("num_ooms", 0)
    if not cleanup:  # a fresh process: it exits next
        return rec, None
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


# --- fresh-process repeats (--repeat) -------------------------------------------------------
# Each configuration timed in its own Python process (load the model, time, exit), R times in
# interleaved order (A B C A B C ...), so that a configuration's effect and drift over the run
# separate. An item: name, model, layers (blocks; None: all), settings (over BASE, or over
# RANK_BASE with rank=True), cap (a card whose simulation cap is applied, a number of GiB, or
# None), tier (1 by default: every round of tier 1 runs before tier 2's).
# The rtx-4090 ranking plans of Llama-3.1-8B at batch 1 (as the rank part timed them: the
# same settings measured 3,994 and 5,231 tok/s in two runs of one-process timing)
RANK_BASE = dict(seq_len=2048, batch_size=1, grad_accum=16, lora_rank=16, lora_alpha=32,
                 lora_dropout=0.0, grad_ckpt=False, optim="paged_adamw_8bit", prepare="lean",
                 loss="standard", packed_rows=True)
NOISE = [  # tier 1: every round of these first (the most important first in a round); then
    # tier 2's rounds, as long as the deadline allows
    dict(name="4090-fused-capped", model="llama-3.1-8b", layers=None, rank=True,
         settings=dict(loss="fused"), cap="rtx-4090"),
    dict(name="4090-fused-uncapped", model="llama-3.1-8b", layers=None, rank=True,
         settings=dict(loss="fused"), cap=None),
    dict(name="gemma-3-1b-2048x1-ckpt", model="gemma-3-1b", layers=None,
         settings=GRID["gemma-3-1b"][1][1], cap=None),
    dict(name="smollm2-360m-2048x1", model="smollm2-360m", layers=None,
         settings=GRID2["smollm2-360m"][1][0], cap=None),
    dict(name="qwen2.5-1.5b-4096x2-ckpt-packed", model="qwen2.5-1.5b", layers=None,
         settings=GRID2["qwen2.5-1.5b"][1][2], cap=None),
    dict(name="llama-3.2-1b-1024x1-standard", model="llama-3.2-1b", layers=None,
         settings=GRID["llama-3.2-1b"][1][0], cap=None),
    dict(name="llama-3.2-3b-2048x1", model="llama-3.2-3b", layers=None,
         settings=GRID["llama-3.2-3b"][1][0], cap=None),
    dict(name="4090-chosen-capped", model="llama-3.1-8b", layers=None, rank=True,
         settings=dict(embed_on_cpu=True), cap="rtx-4090", tier=2),
    dict(name="4090-chosen-uncapped", model="llama-3.1-8b", layers=None, rank=True,
         settings=dict(embed_on_cpu=True), cap=None, tier=2),
    dict(name="4090-fused-norms-capped", model="llama-3.1-8b", layers=None, rank=True,
         settings=dict(loss="fused", recompute_norms=True), cap="rtx-4090", tier=2),
]
REPEAT_SETS = {"noise": NOISE}


def repeat_items(name_or_file: str, small: bool) -> list[dict]:
    """The items of a repeat set (a name of :data:`REPEAT_SETS` or a JSON file of items),
    each with its full ``settings`` (a TrainConfig dict) and ``cap_gib`` resolved. ``small``
    (the CPU dry run): 2 blocks, 128 tokens, at most 2 rows."""
    from qplan import api
    from qplan.planner.config import TrainConfig

    if name_or_file in REPEAT_SETS:
        items = REPEAT_SETS[name_or_file]
    else:
        items = json.loads(Path(name_or_file).read_text())
    out = []
    for it in items:
        base = RANK_BASE if it.get("rank") else BASE
        cfg = TrainConfig(**{**base, **it.get("settings", {})})
        if small:
            cfg = cfg.with_(seq_len=128, batch_size=min(cfg.batch_size, 2))
        cap = it.get("cap")
        if isinstance(cap, str):
            from qplan.runner.planning import simulation

            cap_gib = simulation(api.get_gpu(cap)).cap_bytes / 2**30
        else:
            cap_gib = cap
        out.append({"name": it["name"], "model": it["model"],
                    "layers": 2 if small else it.get("layers"), "settings": cfg.to_dict(),
                    "cap": cap, "cap_gib": cap_gib, "tier": it.get("tier", 1),
                    "accum": int(it.get("accum", 1))})
    names = [x["name"] for x in out]
    if len(set(names)) != len(names):
        raise SystemExit(f"repeat set {name_or_file}: item names repeat")
    return out


def alloc_env(cfg) -> dict:
    """The child's environment as the trainer sets it (qplan run: expandable segments as the
    plan says, other PYTORCH_CUDA_ALLOC_CONF options kept)."""
    from qplan.runner.run import set_allocator

    env = dict(os.environ)
    set_allocator(env, cfg.expandable_segments)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"
    return env


def fresh_child(spec: dict, out_path: str, device: str) -> None:
    """One configuration in this (fresh) process: load the saved model, cap the allocator
    if asked, time the steps, write one record to ``out_path``."""
    t0 = time.time()
    import torch

    from qplan import api
    from qplan.planner.config import TrainConfig
    from qplan.runner import techniques as T

    t_import = time.time()
    cfg = TrainConfig.from_dict(spec["settings"])
    profile = api.get_model(spec["path"])
    if profile.tie_word_embeddings and cfg.embed_on_cpu:
        cfg = cfg.with_(embed_on_cpu=False)
    frac = None
    if device == "cuda" and spec.get("cap_gib"):
        total = torch.cuda.get_device_properties(0).total_memory
        frac = min(1.0, spec["cap_gib"] * 2**30 / total)
        torch.cuda.set_per_process_memory_fraction(frac)
    t_load = time.time()
    model = T.load_model(spec["path"], cfg, device_map={"": 0} if device == "cuda" else None)
    t_loaded = time.time()
    rec, _ = time_config(model, profile, cfg, spec["steps"], spec["warmup"], device,
                         cleanup=False, accum=int(spec.get("accum", 1)))
    if rec["step_s"]:
        rec["median_step_s"] = round(statistics.median(rec["step_s"]), 5)
    import bitsandbytes
    import transformers

    rec.update(mode="fresh", item=spec["name"], repeat=spec["repeat"], order=spec["order"],
               model=spec["model"], layers=spec["layers"], settings=cfg.to_dict(),
               cap=spec.get("cap"), cap_gib=spec.get("cap_gib"), memory_fraction=frac,
               pid=os.getpid(), alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
               steps=spec["steps"], warmup=spec["warmup"], device=device,
               gpu=torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
               versions={"torch": torch.__version__, "transformers": transformers.__version__,
                         "bitsandbytes": bitsandbytes.__version__},
               start_after_s=round(t0 - spec["launched"], 2),
               import_s=round(t_import - t0, 2), load_s=round(t_loaded - t_load, 2),
               child_s=round(time.time() - spec["launched"], 2),
               loadavg=[round(x, 2) for x in os.getloadavg()])
    with open(out_path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def run_repeat(items: list[dict], times: int, out_path: str, device: str, steps: int,
               warmup: int, deadline: float = 0, grace: float = 30, log=print) -> list[dict]:
    """Build each model once (when first needed), then time every item in a fresh process,
    ``times`` rounds of all items in their order. With ``deadline`` (s from the start) no
    child starts that would end past it, as far as the item's (or its model's) last child
    took, and a running child is killed ``grace`` s after it. Returns the records written."""
    from qplan.planner.config import TrainConfig

    start = time.time()
    schedule = [(r, it) for tier in sorted({it["tier"] for it in items})
                for r in range(times) for it in items if it["tier"] == tier]
    last_use = {(it["model"], it["layers"]): n for n, (_, it) in enumerate(schedule)}
    took: dict = {}  # item name or model key -> child wall seconds
    dirs: dict = {}
    failed: dict = {}
    records = []
    with tempfile.TemporaryDirectory(prefix="qplan-speed-repeat-") as tmp:
        for n, (r, it) in enumerate(schedule):
            key = (it["model"], it["layers"])
            expect = took.get(it["name"], took.get(key, 0)) + (0 if key in dirs else 30)
            elapsed = time.time() - start
            if key in failed:
                log(f"[{elapsed:5.0f} s] {it['name']} #{r}: not started (no model: {failed[key]})")
            elif deadline and elapsed + expect > deadline:
                log(f"[{elapsed:5.0f} s] {it['name']} #{r}: not started (deadline {deadline:.0f} s,"
                    f" expected {expect:.0f} s)")
            else:
                built_now = False
                if key not in dirs:
                    path = Path(tmp) / f"{it['model']}-{it['layers'] or 'all'}"
                    t0 = time.time()
                    try:
                        build(it["model"], it["layers"], path, device)
                    except subprocess.CalledProcessError as e:  # disk full, say: the rest runs
                        failed[key] = f"build exit {e.returncode}"
                        shutil.rmtree(path, ignore_errors=True)
                        log(f"[{time.time() - start:5.0f} s] {it['model']}: build failed "
                            f"(exit {e.returncode}; {shutil.disk_usage(tmp).free / 2**30:.0f} GiB"
                            " free): its configurations are not run")
                        continue
                    os.sync()  # the shards' writeback may compete with the next timing
                    dirs[key] = path
                    built_now = True
                    log(f"[{time.time() - start:5.0f} s] built {it['model']} "
                        f"({it['layers'] or 'all'} blocks) in {time.time() - t0:.0f} s; "
                        f"{shutil.disk_usage(tmp).free / 2**30:.0f} GiB free")
                spec = {**it, "path": str(dirs[key]), "repeat": r, "order": n, "steps": steps,
                        "warmup": warmup, "launched": time.time()}
                child_out = Path(tmp) / f"child-{n}.jsonl"
                cmd = [sys.executable, __file__, "--out", str(child_out), "--fresh", json.dumps(spec)]
                if device == "cpu":
                    cmd.append("--cpu-dry-run")
                t0 = time.time()
                limit = max(1.0, start + deadline + grace - t0) if deadline else None
                try:
                    p = subprocess.run(cmd, env=alloc_env(TrainConfig.from_dict(it["settings"])),
                                       timeout=limit, capture_output=True, text=True)
                    rc, tail = p.returncode, (p.stderr or "")[-600:]
                except subprocess.TimeoutExpired as e:
                    rc, tail = "timeout", str(e.stderr or "")[-600:]
                wall = time.time() - t0
                took[it["name"]] = took[key] = wall
                got = [json.loads(x) for x in child_out.read_text().splitlines()] \
                    if child_out.exists() else []
                if not got:  # the child died before its record: say so in the data
                    got = [{"status": "timeout" if rc == "timeout" else "crash",
                            "error": f"exit {rc}: {tail}", "step_s": [], "tokens_per_s": None,
                            "mode": "fresh", "item": it["name"], "repeat": r, "order": n,
                            "model": it["model"], "layers": it["layers"],
                            "settings": it["settings"], "cap": it["cap"],
                            "cap_gib": it["cap_gib"], "device": device}]
                for rec in got:
                    rec["wall_s"] = round(wall, 2)
                    rec["after_build"] = built_now  # the model was built just before
                    records.append(rec)
                    with open(out_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                rec = got[-1]
                log(f"[{time.time() - start:5.0f} s] {it['name']} #{r}: {rec['status']} "
                    f"{rec['tokens_per_s'] and round(rec['tokens_per_s'])} tok/s, "
                    f"retries {rec.get('num_alloc_retries')}, {wall:.0f} s"
                    f" (load {rec.get('load_s')} s)")
                if rc not in (0, "timeout") and tail:
                    log(tail)
            if n == last_use[key] and key in dirs:  # the model's last child: free the disk
                shutil.rmtree(dirs.pop(key), ignore_errors=True)
    return records


def repeat_summary(records: list[dict]) -> list[dict]:
    """Per item, in first-seen order: tok/s of each repeat (repeat order), min, median, max,
    coefficient of variation (sample stdev / mean) over the repeats that ran, alloc retries."""
    by: dict = {}
    for r in records:
        by.setdefault(r["item"], []).append(r)
    out = []
    for name, rs in by.items():
        rs = sorted(rs, key=lambda r: r["repeat"])
        tps = [r["tokens_per_s"] for r in rs if r.get("status") == "ok" and r["tokens_per_s"]]
        mean = statistics.fmean(tps) if tps else None
        out.append({"item": name, "model": rs[0]["model"], "layers": rs[0].get("layers"),
                    "settings": rs[0]["settings"], "cap_gib": rs[0].get("cap_gib"),
                    "tokens_per_s": tps, "runs": len(rs),
                    "failed": [r.get("status") for r in rs if r.get("status") != "ok"],
                    "min": min(tps) if tps else None,
                    "median": statistics.median(tps) if tps else None,
                    "max": max(tps) if tps else None,
                    "cv": statistics.stdev(tps) / mean if len(tps) > 1 else None,
                    "alloc_retries": [r.get("num_alloc_retries") for r in rs],
                    "peak_reserved_gib": [r.get("peak_reserved_gib") for r in rs]})
    return out


def print_repeat_summary(records: list[dict], log=print) -> None:
    log("item | cap GiB | tok/s per repeat | median | CV | alloc retries")
    for s in repeat_summary(records):
        cv = f"{s['cv']:.1%}" if s["cv"] is not None else "-"
        log(f"{s['item']} | {s['cap_gib'] and round(s['cap_gib'], 2)} | "
            f"{' '.join(str(round(x)) for x in s['tokens_per_s'])} | "
            f"{s['median'] and round(s['median'])} | {cv} | {s['alloc_retries']}"
            + (f" | failed: {s['failed']}" if s["failed"] else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--grid", action="store_true")
    ap.add_argument("--rank", action="store_true")
    ap.add_argument("--seeds", action="store_true", help="the seeds' recipe and the auto plan, "
                    "Llama-3.1-8B at 2048 tokens")
    ap.add_argument("--set", default="1", choices=sorted(GRIDS), help="which grid (--grid)")
    ap.add_argument("--steps", type=int, help="timed steps per configuration (default 4; "
                    "--repeat: 8; CPU dry run: 1, --repeat 2)")
    ap.add_argument("--warmup", type=int, help="warm-up steps per configuration (default 2; "
                    "--repeat: 3; CPU dry run: 1)")
    ap.add_argument("--repeat", metavar="SET_OR_FILE", help="fresh-process repeats of a set "
                    f"of configurations: {', '.join(REPEAT_SETS)} or a JSON file of items")
    ap.add_argument("--times", type=int, default=3, help="rounds of --repeat")
    ap.add_argument("--grace", type=float, default=30, help="--repeat: kill a child this many "
                    "s after --deadline")
    ap.add_argument("--log", help="--repeat: also append the progress lines to this file")
    ap.add_argument("--fresh", help=argparse.SUPPRESS)
    ap.add_argument("--rank-only", help="comma-separated models of the ranking check")
    ap.add_argument("--deadline", type=float, default=0, help="start no model after this many s "
                    "(--repeat: no child that would end after it)")
    ap.add_argument("--only", help="comma-separated models of the grid")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--cpu-dry-run", action="store_true")
    args = ap.parse_args()
    device = "cpu" if args.cpu_dry_run else "cuda"
    small = args.cpu_dry_run
    if args.fresh:  # a child process of --repeat: one configuration
        fresh_child(json.loads(args.fresh), args.out, device)
        return 0
    if args.repeat:
        steps = args.steps or (2 if small else 8)
        warmup = args.warmup if args.warmup is not None else (1 if small else 3)

        def log(line: str) -> None:
            print(line, flush=True)
            if args.log:
                with open(args.log, "a") as f:
                    f.write(line + "\n")

        items = repeat_items(args.repeat, small)
        log(f"--repeat {args.repeat}: {len(items)} configurations x {args.times}, "
            f"{warmup} warm-up + {steps} timed steps each, deadline {args.deadline or 'none'}")
        records = run_repeat(items, args.times, args.out, device, steps, warmup,
                             deadline=args.deadline, grace=args.grace, log=log)
        print_repeat_summary(records, log)
        return 0
    args.steps = args.steps or (1 if small else 4)
    args.warmup = args.warmup if args.warmup is not None else (1 if small else 2)
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
