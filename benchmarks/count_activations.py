"""Count every catalogue model's activation memory with dry runs; write the figures as data.

For each dense model of qplan's catalogue, :func:`qplan.runner.counting.count_model` dry-runs
training steps of the real stack (transformers, bitsandbytes 4-bit, peft LoRA, qplan's
techniques) on fake tensors, on the CPU, in every regime the planner uses, and fits what the
blocks keep and need in backward. The result goes to
``qplan/profiles/activation_counts/<model>.json``, which the planner reads
(:mod:`qplan.planner.activations`) without importing torch.

Usage (no GPU needed; about 2-4 minutes a model on one core):
    python benchmarks/count_activations.py                 # every dense catalogue model
    python benchmarks/count_activations.py --models qwen3-8b,gemma-3-4b --jobs 2
    python benchmarks/count_activations.py --missing       # only models without a file
    python benchmarks/count_activations.py --device cuda --models qwen3-8b --out DIR
                                    # the same steps measured on a GPU (the dry run's yardstick)
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = ROOT / "qplan" / "profiles" / "activation_counts"


def versions() -> dict:
    out = {}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            out[pkg] = __import__(pkg).__version__
        except ImportError:
            out[pkg] = None
    return out


def count_one(name: str, out_dir: str, device: str = "fake", regime_keys: list[str] | None = None,
              sizes=None, checks: bool = True) -> tuple[str, float, str | None]:
    warnings.filterwarnings("ignore")
    from qplan import api
    from qplan.runner.counting import count_model, regimes

    t0 = time.time()
    try:
        profile = api.get_model(name)
        which = [r for r in regimes() if r.key in regime_keys] if regime_keys else None
        result = count_model(profile.to_config_dict(), name=name, which=which, device=device,
                             sizes=sizes, raw=sizes is not None, checks=checks)
    except Exception as e:  # noqa: BLE001 - reported, the other models go on
        return name, time.time() - t0, f"{type(e).__name__}: {e}"
    result["model"] = name
    result["versions"] = versions()
    result["seconds"] = round(time.time() - t0, 1)
    path = Path(out_dir) / f"{name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    return name, time.time() - t0, None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", help="comma-separated catalogue names (default: every dense model)")
    ap.add_argument("--jobs", type=int, default=1, help="models counted at once (one process each)")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--missing", action="store_true", help="skip models that already have a file")
    ap.add_argument("--device", default="fake", choices=("fake", "cuda"),
                    help="fake: the dry run (no GPU); cuda: measure the same steps on a GPU")
    ap.add_argument("--regimes", help="comma-separated regime keys (default: all)")
    ap.add_argument("--sizes", help="BxS,... instead of the standard sizes (keeps raw traces)")
    ap.add_argument("--no-checks", action="store_true", help="fit sizes only, without the check "
                    "sizes (about 2.5x faster; the fits were within 2%% at the checks where measured)")
    args = ap.parse_args()
    from qplan import api

    names = args.models.split(",") if args.models else [m.name for m in api.catalog().models
                                                        if not m.is_moe and m.provider == "qplan"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.missing:
        names = [n for n in names if not (out / f"{n}.json").exists()]
    failed = []
    ctx = mp.get_context("spawn")
    with ctx.Pool(max(1, args.jobs), maxtasksperchild=1) as pool:
        keys = args.regimes.split(",") if args.regimes else None
        sizes = tuple(tuple(int(x) for x in bs.split("x")) for bs in args.sizes.split(",")) \
            if args.sizes else None
        for name, secs, err in pool.imap_unordered(_star, [(n, str(out), args.device, keys, sizes,
                                                            not args.no_checks) for n in names]):
            print(f"{name}: {'FAILED ' + err if err else 'ok'} ({secs:.0f} s)", flush=True)
            if err:
                failed.append(name)
    return 1 if failed else 0


def _star(a):
    return count_one(*a)


if __name__ == "__main__":
    sys.exit(main())
