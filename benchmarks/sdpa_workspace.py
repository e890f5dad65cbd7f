"""What PyTorch's attention kernels allocate on a GPU beyond their inputs and outputs.

The dry run (qplan/runner/dryrun.py) sees tensors, not the scratch memory a CUDA kernel takes
from the caching allocator inside one call. This script measures it for
``scaled_dot_product_attention`` forward and backward, as transformers calls it (bf16,
causal without a mask; a boolean mask with key/value heads repeated), over head counts,
grouped-query ratios, head sizes, batch and length, and records which kernel PyTorch chose.

Usage (GPU): python benchmarks/sdpa_workspace.py --out "$OUT/sdpa_workspace.json"
"""
from __future__ import annotations

import argparse
import json
import sys

SHAPES = [  # (batch, seq, q heads, kv heads, head dim)
    (1, 4096, 32, 8, 128), (1, 8192, 32, 8, 128), (2, 4096, 32, 8, 128), (1, 8192, 32, 32, 128),
    (1, 8192, 8, 4, 256), (1, 8192, 40, 10, 128), (1, 16384, 16, 8, 256), (4, 2048, 32, 8, 64),
    (1, 8192, 24, 8, 128), (1, 8192, 4, 1, 256),
]


def measure(b, s, hq, hk, d, masked: bool) -> dict:
    import torch
    import torch.nn.functional as F

    dev = "cuda"
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    q = torch.randn(b, hq, s, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, hk, s, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, hk, s, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    mask = None
    kk, vv = k, v
    kw = {}
    if masked:
        half = s // 2
        seg = torch.cat([torch.zeros(half, dtype=torch.long), torch.ones(s - half, dtype=torch.long)]).to(dev)
        causal = torch.ones(s, s, dtype=torch.bool, device=dev).tril()
        mask = (causal & (seg[:, None] == seg[None, :]))[None, None].expand(b, 1, s, s)
        rep = hq // hk
        kk = k[:, :, None].expand(b, hk, rep, s, d).reshape(b, hq, s, d)
        vv = v[:, :, None].expand(b, hk, rep, s, d).reshape(b, hq, s, d)
    else:
        kw = {"is_causal": True, "enable_gqa": hq != hk}
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, **kw)
    torch.cuda.synchronize()
    after_fwd = torch.cuda.memory_allocated()
    fwd_peak = torch.cuda.max_memory_allocated()
    kernel = out.grad_fn.name() if out.grad_fn is not None else None
    g = torch.randn_like(out)
    torch.cuda.synchronize()
    before_bwd = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out.backward(g)
    torch.cuda.synchronize()
    bwd_peak = torch.cuda.max_memory_allocated()
    grads = sum(t.grad.numel() * t.grad.element_size() for t in (q, k, v))
    unit = b * s * hq * d  # elements of q
    r = {"batch": b, "seq": s, "q_heads": hq, "kv_heads": hk, "head_dim": d, "masked": masked,
         "kernel": kernel, "forward_kept": after_fwd - base, "forward_peak_extra": fwd_peak - after_fwd,
         "backward_peak_extra": bwd_peak - before_bwd, "grad_bytes": grads,
         "backward_extra_per_q_element": round((bwd_peak - before_bwd - grads) / unit, 3)}
    del q, k, v, kk, vv, out, g, mask
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import torch

    rows = []
    for shape in SHAPES:
        for masked in (False, True):
            try:
                rows.append(measure(*shape, masked))
            except Exception as e:  # noqa: BLE001 - recorded, the others go on
                rows.append({"shape": shape, "masked": masked, "error": f"{type(e).__name__}: {e}"[:300]})
            print(json.dumps(rows[-1]), flush=True)
    env = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0)}
    with open(args.out, "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
