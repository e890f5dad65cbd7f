"""Can FSDP2 keep the 4-bit QLoRA weights on the host (CPU offload) and train? A probe for
issue 12's offload (a 70B model on 2 x 24 GB, or a too-big model on one card), run before
the planner and runner are built on it.

Each rank loads the saved model on the host in 4 bit (values stored in bf16, as qplan's FSDP
runs do), adds LoRA, shards it as accelerate does (every block, the embeddings, norm + head,
the root) with ``CPUOffloadPolicy(pin_memory=True)`` or none, and runs training steps
through qplan.runner.techniques (bf16 autocast, checkpointing, fused loss, torch's AdamW,
which steps the offloaded parameters on the host). bitsandbytes keeps each layer's
quantization constants beside the module (``module.quant_state``), outside FSDP's
parameters: ``--quant-states gpu`` moves them to the GPU after sharding, ``host`` leaves them
where loading put them (expected to fail under offload: dequantization on the GPU reads
them). One JSON line per rank: status, error and traceback, each step's seconds, the GPU's
peak allocated / reserved and the device's used memory, host RSS.

    torchrun --nproc-per-node 2 benchmarks/fsdp_offload_probe.py --model DIR --out F.jsonl \\
        [--offload|--no-offload] [--quant-states gpu|host] [--seq 2048] [--steps 4]
    python benchmarks/fsdp_offload_probe.py --model DIR --out F.jsonl --cpu   # one gloo
        process, no offload (CPUOffloadPolicy needs CUDA): the script itself, in the tests
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def quant_states_to(model, device) -> int:
    """Move every 4-bit layer's quantization constants to ``device``; how many."""
    n = 0
    for mod in model.modules():
        qs = getattr(mod, "quant_state", None)
        if qs is not None and hasattr(qs, "to"):
            qs.to(device)  # bitsandbytes' QuantState.to moves in place
            n += 1
    return n


def probe(args) -> dict:
    import psutil
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    from qplan import api
    from qplan.planner.config import TrainConfig
    from qplan.runner import techniques as T

    cuda = not args.cpu
    if cuda:
        dist.init_process_group("nccl")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(args.port))
        dist.init_process_group("gloo", rank=0, world_size=1)
        device = torch.device("cpu")
    world, rank = dist.get_world_size(), dist.get_rank()
    rec: dict = {"rank": rank, "world": world, "offload": args.offload,
                 "quant_states": args.quant_states, "seq": args.seq, "model": args.model,
                 "step_s": [], "status": "started"}
    try:
        cfg = TrainConfig(seq_len=args.seq, batch_size=1, grad_accum=max(2, world),
                          loss="fused", gpus=max(2, world), strategy="fsdp",
                          optim="adamw_torch", grad_ckpt=True)
        prof = api.get_model(args.model)
        t0 = time.time()
        m = T.load_model(args.model, cfg, device_map={"": "cpu"} if cuda else None)
        T.prepare_for_training(m, cfg)
        torch.manual_seed(0)
        m = T.add_lora(m, prof, cfg)
        rec["load_s"] = round(time.time() - t0, 1)
        mesh = init_device_mesh("cuda" if cuda else "cpu", (world,))
        policy = CPUOffloadPolicy(pin_memory=True) if args.offload else OffloadPolicy()
        kw = dict(mesh=mesh, offload_policy=policy)
        base = m.base_model.model
        for layer in base.model.layers:
            fully_shard(layer, **kw)
        fully_shard(base.model.embed_tokens, **kw)
        fully_shard([base.model.norm, base.lm_head], reshard_after_forward=False, **kw)
        fully_shard(m, **kw)
        if args.quant_states == "gpu":
            rec["quant_states_moved"] = quant_states_to(m, device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        opt = T.make_optimizer(m.parameters(), cfg)
        gen = torch.Generator().manual_seed(rank)
        v = min(prof.vocab_size, 32000)
        for _ in range(args.steps):
            ids = torch.randint(4, v, (1, args.seq), generator=gen).to(device)
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            T.train_step(m, opt, cfg, [(ids, ids)])
            if cuda:
                torch.cuda.synchronize()
            rec["step_s"].append(round(time.perf_counter() - t, 4))
        rec["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - the finding is what failed, and where
        rec.update(status="error", error=f"{type(e).__name__}: {e}"[:800],
                   traceback=traceback.format_exc()[-4000:])
    if cuda:
        free, total = torch.cuda.mem_get_info()
        rec.update(peak_allocated_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3),
                   peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 3),
                   device_used_gib=round((total - free) / 2**30, 3),
                   gpu=torch.cuda.get_device_name(device))
    rec["host_rss_gib"] = round(psutil.Process().memory_info().rss / 2**30, 2)
    rec["torch"] = torch.__version__
    with open(args.out, "a") as f:
        f.write(json.dumps(rec) + "\n")
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a saved model directory")
    ap.add_argument("--out", required=True)
    ap.add_argument("--offload", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--quant-states", choices=("gpu", "host"), default="gpu")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--cpu", action="store_true", help="one gloo process, no offload")
    ap.add_argument("--port", type=int, default=29641)
    args = ap.parse_args()
    if args.cpu:
        args.offload = False
    rec = probe(args)
    print(json.dumps({k: rec.get(k) for k in ("rank", "status", "error", "step_s",
                                               "peak_allocated_gib", "device_used_gib")}))
    return 0 if rec["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
