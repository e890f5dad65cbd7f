"""qplan's chunked loss against trl's fused LM head, on CPU: same loss and gradients? how much
memory and time? One of the measurements behind keeping qplan's loss in ``qplan run``
(docs/runner.md, "Why Trainer, not SFTTrainer").

Each variant runs in a fresh process: forward and backward of the loss over ``--tokens``
hidden states of a ``--vocab`` x ``--hidden`` lm_head (bf16 under autocast, as in training),
reporting the loss, the gradient of the hidden states, the step time and the growth of the
process's peak resident memory over its baseline (the transient memory of the loss: on CPU,
PyTorch's allocations are the process's). trl's kernel uses its torch fallback on CPU (no
Triton), so the times say nothing about a GPU; the memory and the numbers do.

    python benchmarks/loss_cpu.py --out benchmarks/results/loss_cpu.json
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_one(kind: str, tokens: int, vocab: int, hidden: int) -> dict:
    import torch

    torch.manual_seed(0)
    h = torch.randn(tokens, hidden, dtype=torch.bfloat16) * 0.5
    w = torch.randn(vocab, hidden, dtype=torch.bfloat16) * 0.02
    y = torch.randint(0, vocab, (tokens,))
    y[::7] = -100
    h.requires_grad_(True)
    import gc

    gc.collect()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if kind == "qplan":
            from qplan.runner.techniques import chunked_cross_entropy
            from qplan.planner.config import TrainConfig

            loss = chunked_cross_entropy(h, w, y, chunk=TrainConfig().loss_chunk_rows(vocab))
        elif kind == "trl":
            from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, _ChunkedLogProbFunction

            mask = y != -100
            lp = _ChunkedLogProbFunction.apply(h[mask], w, None, y[mask], 1.0,
                                               _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ())[0]
            loss = -lp.sum() / mask.sum()
        else:  # the full float32 logits, as transformers' ForCausalLMLoss
            import torch.nn.functional as F

            loss = F.cross_entropy((h @ w.t()).float(), y, ignore_index=-100)
    loss.backward()
    dt = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"kind": kind, "loss": float(loss), "grad": h.grad.float().flatten()[:4096].tolist(),
            "seconds": round(dt, 3), "transient_mib": round((peak - base) / 1024, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=128_256)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--out")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(run_one(a.one, a.tokens, a.vocab, a.hidden)))
        return 0
    res = {}
    for kind in ("standard", "qplan", "trl"):
        r = subprocess.run([sys.executable, __file__, "--one", kind, "--tokens", str(a.tokens),
                            "--vocab", str(a.vocab), "--hidden", str(a.hidden)],
                           capture_output=True, text=True, cwd=ROOT,
                           env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                "OMP_NUM_THREADS": "2"})
        if r.returncode:
            print(r.stderr[-2000:], file=sys.stderr)
            return 1
        res[kind] = json.loads(r.stdout.strip().splitlines()[-1])
    import math

    ref = res["standard"]
    for k, v in res.items():
        g = v.pop("grad")
        err = max(abs(a_ - b_) for a_, b_ in zip(g, ref.get("_grad", g)))
        ref.setdefault("_grad", g)
        v["max_grad_diff_vs_standard"] = err
        v["loss_diff_vs_standard"] = abs(v["loss"] - ref["loss"])
        assert math.isfinite(v["loss"])
    ref.pop("_grad", None)
    out = {"tokens": a.tokens, "vocab": a.vocab, "hidden": a.hidden, "results": res,
           "note": "CPU, bf16 autocast; trl's kernel in its torch fallback (no Triton)"}
    for k, v in res.items():
        print(f"{k:9s} loss {v['loss']:.5f}  grad diff {v['max_grad_diff_vs_standard']:.2e}  "
              f"{v['seconds']:.2f} s  +{v['transient_mib']:.0f} MiB")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
