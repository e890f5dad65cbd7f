"""The seeds' recipe as the seeds run it against qplan's automatic plan, on one GPU (issue 13).

Both as a user runs them, each in its own fresh process, on the same random-weight model with
the catalogue model's shapes (default Llama-3.1-8B, every block) and the same data (text
records longer than the sequence):

* the seeds: trl's ``SFTTrainer`` with the seeds' recipe (``benchmarks/trl_check_gpu.py``'s
  config: nf4 + double quantization, ``prepare_model_for_kbit_training``, LoRA r64 / 16 / 0.1
  on every linear layer, batch 1 x accumulation 16, ``max_length`` 2048, paged 8-bit AdamW,
  bf16, gradient checkpointing), steady-state tokens/s from its optimizer steps' wall times
  (without the first);
* qplan: ``qplan run`` with no settings (the plan it makes for the detected GPU), its
  report's steady-state tokens/s (without the first step) and the speed model's prediction.

Writes ``seeds_vs_auto.json`` to ``--out``. GPU machine (trl and datasets wheels installed):

    python3 benchmarks/seeds_vs_auto.py --out "$OUT" --steps 5

Plumbing check on a CPU (the tests' tiny Llama):  python benchmarks/seeds_vs_auto.py --cpu-dry-run --out /tmp/x
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--accum", type=int, default=16, help="the seeds' accumulation")
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps of each run")
    ap.add_argument("--workdir")
    ap.add_argument("--cpu-dry-run", action="store_true")
    a = ap.parse_args()
    import yaml

    import trl_check_gpu as T

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="qplan-seeds-"))
    dry = a.cpu_dry_run
    seq, accum = (64, 2) if dry else (a.seq, a.accum)
    model_dir = work / ("tiny" if dry else a.model)
    t0 = time.time()
    if not (model_dir / "config.json").exists():
        subprocess.run([sys.executable, str(ROOT / "benchmarks/trl_check_gpu.py"), "--build-only",
                        str(model_dir), "--model", a.model] + (["--cpu-dry-run"] if dry else []),
                       check=True)
    build_s = time.time() - t0
    # records longer than the sequence: every micro-batch is whole, packed or not
    data = T.write_data(work / "train.jsonl", n=max(accum, 16) * (a.steps + 1),
                        words=2 * seq)
    config = work / "seeds.yaml"
    config.write_text(yaml.safe_dump(T.seed_config(model_dir, seq=seq, accum=accum,
                                                   rank=8 if dry else 64), sort_keys=False))
    res: dict = {"model": a.model, "seq": seq, "accum": accum, "steps": a.steps,
                 "build_s": round(build_s, 1), "versions": T.versions()}
    trl_out = work / "trl"
    trl_out.mkdir(exist_ok=True)
    t0 = time.time()
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks/trl_check_gpu.py"), "--train-only",
                        str(config), str(data), str(trl_out), str(a.steps)]
                       + (["--cpu-dry-run"] if dry else []), capture_output=True, text=True)
    res["seeds"] = (json.loads((trl_out / "train_result.json").read_text()) if p.returncode == 0
                    else {"error": p.stderr[-2000:]})
    res["seeds"]["wall_s"] = round(time.time() - t0, 1)
    run_dir = work / "qplan-run"
    t0 = time.time()
    cmd = [sys.executable, "-m", "qplan", "run", "--model", str(model_dir), "--data", str(data),
           "--output", str(run_dir), "--max-steps", str(a.steps), "--seq", str(seq), "--quiet",
           "--no-calibration", "--json"] + (["--cpu"] if dry else [])
    p = subprocess.run(cmd, capture_output=True, text=True)
    try:
        rep = json.loads(p.stdout)
        att = rep["attempts"][-1]
        res["qplan"] = {"settings": att["settings"], "steady_tokens_per_s": att["steady_tokens_per_s"],
                        "predicted_tokens_per_s": att["predicted_tokens_per_s"],
                        "measured": att.get("measured"), "attempts": len(rep["attempts"]),
                        "status": rep["status"]}
    except (json.JSONDecodeError, KeyError, IndexError):
        res["qplan"] = {"error": (p.stdout[-1000:] + p.stderr[-2000:])}
    res["qplan"]["wall_s"] = round(time.time() - t0, 1)
    s, q = res["seeds"].get("steady_tokens_per_s"), res["qplan"].get("steady_tokens_per_s")
    res["ratio"] = round(q / s, 3) if s and q else None
    (out / "seeds_vs_auto.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: res[k] for k in ("ratio",)}), "seeds", s, "qplan", q)
    return 0 if res["ratio"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
