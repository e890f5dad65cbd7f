"""``qplan check`` of a seed-style trl config against nvidia-smi on a real trl run.

1. Builds a random-weight model with the shape of a catalogue model (default llama-3.1-8b;
   ``--layers N`` for fewer layers), bf16 on the GPU, saved with ``save_pretrained`` beside
   the tests' word-level tokenizer (token ids stay small; the 128k vocabulary still sizes
   the embeddings, the lm_head and the loss).
2. Writes the seeds' recipe as the trl sections file ``qplan check`` reads (``config.yaml``):
   BitsAndBytesConfig nf4 + double quantization (bf16 compute), ``prepare_model_for_kbit_
   training``, LoRA r64 / alpha 16 / dropout 0.1 on every linear layer, SFTConfig with
   per-device batch 1, accumulation, ``max_length`` 2048, ``paged_adamw_8bit``, bf16,
   gradient checkpointing (no packing; every example is longer than ``max_length``, so every
   step is the worst one).
3. Runs ``qplan check`` on it through the library (``qplan.ecosystem``; no click or rich
   needed): the estimate, its breakdown, how the config was read.
4. Trains that same config with trl's ``SFTTrainer`` for ``--steps`` optimizer steps in a fresh
   process, sampling NVML's per-process used memory every 20 ms (``qplan.runner.monitor``),
   the CUDA context measured right after ``torch.zeros(1, device="cuda")``.
5. Writes ``trl_check_gpu.json`` and ``trl_check_gpu.md`` to ``--out``: the estimate less
   qplan's CUDA-context term against the nvidia-smi peak less the measured context.

GPU machine (about 2-3 minutes for llama-3.1-8b on an H200: build ~60 s, load ~30 s, 4 steps
of 4 x 2048 tokens ~20 s):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && \\
        python3 benchmarks/trl_check_gpu.py --out "$OUT"

Plumbing check on a CPU (a tiny model, no NVML):  python benchmarks/trl_check_gpu.py --cpu-dry-run --out /tmp/x
"""
from __future__ import annotations

import argparse
import dataclasses
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
sys.path.insert(0, str(ROOT / "tests"))
GIB = 1024**3


def build(model_name: str, path: Path, layers: int | None, tiny: bool) -> None:
    """The model directory: random weights with the catalogue's shapes (or the tests' tiny
    Llama for a dry run), bf16, and the word-level tokenizer."""
    if tiny:
        from fixtures.tiny_llama import build as build_tiny

        build_tiny(path)
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from fixtures.tiny_llama import make_tokenizer, sentences
    from qplan import api

    d = api.get_model(model_name).to_config_dict()
    if layers:
        d["num_hidden_layers"] = layers
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**d), dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size="4GB")
    make_tokenizer(sentences(400, seed=123)).save_pretrained(path)


def seed_config(model_dir: Path, *, seq: int, accum: int, rank: int) -> dict:
    """The seeds' recipe as trl sections (what ``Plan.to_hf().to_dict()`` writes)."""
    return {
        "trainer": "SFTTrainer",
        "model": str(model_dir),
        "from_pretrained": {"dtype": "bfloat16", "attn_implementation": "sdpa"},
        "quantization_config": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                "bnb_4bit_use_double_quant": True,
                                "bnb_4bit_compute_dtype": "bfloat16"},
        "prepare_model_for_kbit_training": {"use_gradient_checkpointing": True},
        "peft_config": {"r": rank, "lora_alpha": 16, "lora_dropout": 0.1,
                        "target_modules": "all-linear", "task_type": "CAUSAL_LM"},
        "args": {"per_device_train_batch_size": 1, "gradient_accumulation_steps": accum,
                 "max_length": seq, "optim": "paged_adamw_8bit", "bf16": True,
                 "gradient_checkpointing": True, "learning_rate": 2e-4},
    }


def write_data(path: Path, n: int, words: int) -> Path:
    """``n`` text records of ``words`` words each: longer than max_length in tokens."""
    from fixtures.tiny_llama import sentences, write_jsonl

    docs = []
    for i in range(n):
        text = []
        k = 0
        while len(text) < words:
            text += " ".join(sentences(20, seed=1000 * i + k, length=12)).split()
            k += 1
        docs.append({"text": " ".join(text[:words])})
    return write_jsonl(path, docs)


def check_estimate(config: Path, gpu_name: str, trl_version: str | None) -> dict:
    """``qplan check`` of the config, through the library (no click, no rich)."""
    from qplan import api
    from qplan.ecosystem import check, read_file
    from qplan.planner.memory import lora_param_count

    reading, profile = read_file(config, trl_version=trl_version)
    gpu = api.get_gpu(gpu_name)
    res = check(reading, profile, gpu)
    mem = res.estimate.memory
    ctx = mem.term("cuda_context").bytes
    n = lora_param_count(profile, reading.config)
    return {
        "gpu_profile": gpu.name, "model": profile.name, "layers": profile.num_hidden_layers,
        "settings": reading.config.to_dict(), "semantics": list(reading.semantics),
        "unmodelled": list(reading.unmodelled), "tool_version": reading.tool_version,
        "peak_gib": round(mem.peak_gib, 3), "cuda_context_term_gib": round(ctx / GIB, 3),
        "peak_less_context_gib": round((mem.peak_bytes - ctx) / GIB, 3),
        "breakdown": mem.breakdown(),
        # trl casts a quantized model's LoRA weights to bf16: weights and gradients then take
        # half the float32 bytes the model counts (reported, not applied)
        "bf16_lora_saving_gib": round(4 * n / GIB, 3),
        "tokens_per_s": round(res.estimate.speed.tokens_per_s, 1),
    }


def train(config: Path, data: Path, out: Path, steps: int, cpu: bool) -> dict:
    """The config trained with trl's SFTTrainer, the way an exported script builds it;
    memory sampled from before the model loads."""
    import yaml

    s = yaml.safe_load(config.read_text())
    if s.get("env"):
        os.environ.update(s["env"])
    import torch

    from qplan.runner.monitor import MemoryMonitor

    cuda = torch.cuda.is_available() and not cpu
    monitor = MemoryMonitor(cuda).start()  # torch.zeros(1, device="cuda"), then NVML's reading
    from datasets import load_dataset
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    q = dict(s["quantization_config"])
    q["bnb_4bit_compute_dtype"] = getattr(torch, q["bnb_4bit_compute_dtype"])
    fp = dict(s["from_pretrained"])
    fp["dtype"] = getattr(torch, fp["dtype"])
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(s["model"], quantization_config=BitsAndBytesConfig(**q),
                                                 device_map={"": 0} if cuda else None, **fp)
    if s.get("prepare_model_for_kbit_training") is not None:
        model = prepare_model_for_kbit_training(model, **s["prepare_model_for_kbit_training"])
    args = SFTConfig(output_dir=str(out / "trainer"), max_steps=steps, logging_steps=1,
                     save_strategy="no", report_to="none", use_cpu=not cuda,
                     dataloader_pin_memory=cuda, **s["args"])
    trainer = SFTTrainer(model=model, args=args, peft_config=LoraConfig(**s["peft_config"]),
                         processing_class=AutoTokenizer.from_pretrained(s["model"]),
                         train_dataset=load_dataset("json", data_files=str(data), split="train"))
    load_s = time.time() - t0
    from transformers import TrainerCallback

    ends: list[float] = []

    class StepTimes(TrainerCallback):  # the wall time at each optimizer step's end
        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            ends.append(time.perf_counter())

    trainer.add_callback(StepTimes())
    t1 = time.time()
    start = time.perf_counter()
    trainer.train()
    train_s = time.time() - t1
    step_s = [b - a for a, b in zip([start] + ends, ends)]
    rows = args.per_device_train_batch_size * args.gradient_accumulation_steps
    steady = step_s[1:]  # without the first (warm-up) step
    monitor.stop()
    mem = monitor.report()
    if dataclasses.is_dataclass(mem):
        mem = dataclasses.asdict(mem)
    lengths = [len(x) for x in trainer.train_dataset["input_ids"][:8]]
    return {"memory": mem, "steps": trainer.state.global_step, "load_s": round(load_s, 1),
            "train_s": round(train_s, 1), "example_lengths": lengths,
            "step_s": [round(x, 4) for x in step_s],
            "steady_tokens_per_s": (round(rows * args.max_length / statistics.median(steady), 1)
                                    if steady else None),
            "losses": [round(float(h["loss"]), 4) for h in trainer.state.log_history if "loss" in h],
            "device": "cuda" if cuda else "cpu"}


def versions() -> dict:
    out = {}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "trl", "datasets"):
        try:
            import importlib.metadata as md

            out[pkg] = md.version(pkg)
        except Exception:  # noqa: BLE001
            out[pkg] = None
    return out


def table(est: dict, run: dict | None) -> str:
    m = (run or {}).get("memory", {})
    nv, ctx = m.get("nvml_peak_gib"), m.get("cuda_context_gib")
    meas = round(nv - ctx, 3) if nv is not None and ctx is not None else None
    err = (f"{(est['peak_less_context_gib'] - meas) / meas * 100:+.1f}%" if meas else "n/a")
    alt = round(est["peak_less_context_gib"] - est["bf16_lora_saving_gib"], 3)
    alt_err = f"{(alt - meas) / meas * 100:+.1f}%" if meas else "n/a"
    return "\n".join([
        "| | GiB |", "|---|---|",
        f"| qplan check: estimated peak (with its {est['cuda_context_term_gib']} GiB CUDA-context term) | {est['peak_gib']} |",
        f"| estimate less the CUDA-context term | {est['peak_less_context_gib']} |",
        f"| nvidia-smi (NVML, this process) peak | {nv if nv is not None else 'n/a'} |",
        f"| CUDA context measured after torch.zeros(1, device='cuda') | {ctx if ctx is not None else 'n/a'} |",
        f"| nvidia-smi peak less that context | {meas if meas is not None else 'n/a'} |",
        f"| **estimate error** | **{err}** |",
        f"| torch max reserved / max allocated | {m.get('peak_reserved_gib', 'n/a')} / {m.get('peak_allocated_gib', 'n/a')} |",
        f"| (estimate less trl's bf16 LoRA cast, {est['bf16_lora_saving_gib']} GiB: not applied) | {alt} ({alt_err}) |",
    ])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results/trl_check_gpu"))
    ap.add_argument("--model", default="llama-3.1-8b", help="a qplan catalogue model")
    ap.add_argument("--layers", type=int, help="build fewer layers (a quick check)")
    ap.add_argument("--gpu", default="h200", help="the GPU profile the estimate is made for "
                    "(the memory terms do not depend on it)")
    ap.add_argument("--seq", type=int, default=2048, help="max_length")
    ap.add_argument("--accum", type=int, default=4, help="gradient_accumulation_steps")
    ap.add_argument("--rank", type=int, default=64, help="LoRA r (the seeds use 64)")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps")
    ap.add_argument("--trl-version", help="model this trl release (default: the installed one)")
    ap.add_argument("--workdir", help="where the model goes (default: a temporary folder)")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="the same plumbing on CPU with the tests' tiny model, no NVML")
    ap.add_argument("--build-only", metavar="PATH", help=argparse.SUPPRESS)
    ap.add_argument("--train-only", nargs=4, metavar=("CONFIG", "DATA", "OUT", "STEPS"),
                    help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.build_only:
        build(a.model, Path(a.build_only), a.layers, a.cpu_dry_run)
        return 0
    if a.train_only:
        cfg, data, out, steps = a.train_only
        res = train(Path(cfg), Path(data), Path(out), int(steps), a.cpu_dry_run)
        (Path(out) / "train_result.json").write_text(json.dumps(res, indent=1))
        return 0

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="qplan-trl-check-"))
    work.mkdir(parents=True, exist_ok=True)
    seq = 64 if a.cpu_dry_run else a.seq
    rank = 8 if a.cpu_dry_run else a.rank
    model_dir = work / ("tiny" if a.cpu_dry_run else a.model)
    t0 = time.time()
    flags = ["--model", a.model] + (["--layers", str(a.layers)] if a.layers else []) + \
        (["--cpu-dry-run"] if a.cpu_dry_run else [])
    if not (model_dir / "config.json").exists():
        print(f"building {model_dir.name} (random weights) in {model_dir}", flush=True)
        subprocess.run([sys.executable, __file__, "--build-only", str(model_dir), *flags], check=True)
    build_s = round(time.time() - t0, 1)

    import yaml

    config = out / "config.yaml"
    config.write_text("# the seeds' recipe as trl sections (written by benchmarks/trl_check_gpu.py)\n"
                      + yaml.safe_dump(seed_config(model_dir, seq=seq, accum=a.accum, rank=rank),
                                       sort_keys=False))
    est = check_estimate(config, a.gpu, a.trl_version)
    print(f"qplan check: {est['peak_gib']} GiB ({est['peak_less_context_gib']} GiB without the "
          f"context term) for {est['model']}, {est['layers']} layers", flush=True)
    data = write_data(work / "train.jsonl", max(16, a.steps * a.accum), words=int(seq * 1.5))
    t1 = time.time()
    r = subprocess.run([sys.executable, __file__, "--train-only", str(config), str(data), str(work),
                        str(a.steps), *flags], env={**os.environ, "TOKENIZERS_PARALLELISM": "false",
                                                    **({"CUDA_VISIBLE_DEVICES": ""} if a.cpu_dry_run else {})})
    run = json.loads((work / "train_result.json").read_text()) if r.returncode == 0 else None
    result = {"estimate": est, "run": run, "train_exit_code": r.returncode,
              "train_wall_s": round(time.time() - t1, 1), "build_s": build_s,
              "total_s": round(time.time() - t0, 1), "versions": versions(),
              "cpu_dry_run": a.cpu_dry_run, "config": seed_config(model_dir, seq=seq, accum=a.accum,
                                                                   rank=rank)}
    if run and run["memory"].get("nvml_peak_gib") is not None:
        meas = run["memory"]["nvml_peak_gib"] - run["memory"].get("cuda_context_gib", 0)
        result["error_pct"] = round((est["peak_less_context_gib"] - meas) / meas * 100, 2)
    (out / "trl_check_gpu.json").write_text(json.dumps(result, indent=1) + "\n")
    title = ("CPU dry run (tiny model; no GPU memory to compare)" if a.cpu_dry_run else
             f"qplan check vs nvidia-smi: the seeds' trl recipe on {est['model']} shapes")
    md = [f"# {title}", "",
          f"{est['layers']} layers, random weights; QLoRA nf4 + double quant, "
          f"prepare_model_for_kbit_training, LoRA r{rank}/16/0.1 on every linear layer, batch 1 x "
          f"accumulation {a.accum}, max_length {seq} (every example longer), paged_adamw_8bit, bf16, "
          f"gradient checkpointing; trl {result['versions'].get('trl')} SFTTrainer, {a.steps} steps. "
          "The file checked: config.yaml.", "",
          table(est, run), "",
          "How qplan read it:", *[f"- {s}" for s in est["semantics"]], "",
          "Not modelled:", *[f"- {s}" for s in est["unmodelled"]], "",
          f"Training: exit code {r.returncode}"
          + (f", {run['steps']} steps, losses {run['losses']}, {run['train_s']} s "
             f"(load {run['load_s']} s), example lengths {run['example_lengths']}" if run else ""),
          f"Versions: {json.dumps(result['versions'])}",
          f"Total {result['total_s']} s (build {build_s} s)."]
    (out / "trl_check_gpu.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    if not a.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if r.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
