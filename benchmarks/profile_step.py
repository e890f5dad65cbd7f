"""Where does one training step's time go? A torch.profiler trace of steady-state steps of
qplan's training step (the runner's loss under autocast, backward, the optimizer) for one
saved model and one setting, for issue 13's open question: gemma-3-1b at 2048 x 1 with
checkpointing spends ~3x llama-3.2-1b's time per LoRA linear pass, and FLOPs, bytes and the
operator count (count_ops.py) do not explain it.

Writes a text report: the step's wall time, the GPU's busy time (sum of kernel times), the
number of kernels launched, and the operators with the most self GPU time and the most self
CPU time (torch.profiler's key_averages).

    python benchmarks/profile_step.py --model DIR --name gemma-3-1b --seq 2048 --batch 1 \\
        [--no-ckpt] [--loss fused] [--attn sdpa] --out report.txt [--cpu]

``--cpu`` profiles on the host (no 4-bit; for the tests).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def profile(args) -> str:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    from qplan import api
    from qplan.planner.config import TrainConfig
    from qplan.runner import techniques as T

    cuda = not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    cfg = TrainConfig(seq_len=args.seq, batch_size=args.batch, grad_ckpt=args.ckpt,
                      loss=args.loss, attn=args.attn, optim="adamw_torch",
                      quant="nf4" if cuda else "none",
                      compute_dtype="bf16")
    prof = api.get_model(args.name)
    m = T.load_model(args.model, cfg, device_map={"": 0} if cuda else None)
    T.prepare_for_training(m, cfg)
    torch.manual_seed(0)
    m = T.add_lora(m, prof, cfg)
    opt = T.make_optimizer([p for p in m.parameters() if p.requires_grad], cfg)
    gen = torch.Generator().manual_seed(0)
    v = min(m.config.vocab_size, 32000)

    def step():
        ids = torch.randint(4, v, (args.batch, args.seq), generator=gen).to(device)
        T.train_step(m, opt, cfg, [(ids, ids)])

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    wall = (time.perf_counter() - t) / args.steps
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with tprofile(activities=acts) as p:
        for _ in range(args.steps):
            step()
        sync()
    ka = p.key_averages()
    dev_attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    kernels = [e for e in p.events() if str(getattr(e, "device_type", "")).endswith("CUDA")]
    busy_us = sum(getattr(k, "self_device_time_total", 0) for k in ka) if cuda else 0
    lines = [f"# {args.name} seq {args.seq} x {args.batch}, checkpointing "
             f"{'on' if args.ckpt else 'off'}, loss {args.loss}, attention {args.attn}, "
             f"{'cuda ' + torch.cuda.get_device_name(0) if cuda else 'cpu'}, torch "
             f"{torch.__version__}",
             f"step wall (unprofiled, mean of {args.steps}): {wall * 1000:.1f} ms; "
             f"tokens/s {args.seq * args.batch / wall:.0f}",
             f"kernels per step: {len(kernels) / args.steps:.0f}; GPU busy per step: "
             f"{busy_us / args.steps / 1000:.1f} ms",
             f"model: layers {m.config.num_hidden_layers}, hidden {m.config.hidden_size}, "
             f"vocab {m.config.vocab_size}", ""]
    lines.append(f"## top {args.top} by self {'GPU' if cuda else 'CPU'} time (per step)")
    lines.append(ka.table(sort_by=dev_attr, row_limit=args.top, max_name_column_width=70))
    if cuda:
        lines.append(f"## top {args.top} by self CPU time")
        lines.append(ka.table(sort_by="self_cpu_time_total", row_limit=args.top,
                              max_name_column_width=70))
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a saved model directory")
    ap.add_argument("--name", required=True, help="the catalogue's model name (shapes)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ckpt", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--loss", default="fused")
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--cpu", action="store_true")
    args = ap.parse_args()
    text = profile(args)
    with open(args.out, "a") as f:
        f.write(text)
    print(text.splitlines()[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
