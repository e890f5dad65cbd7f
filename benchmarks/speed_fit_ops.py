"""Would a host term in dispatched operators fit the speed grid better than LoRA linears and
norms? (issue 13; the profile in results/profiles/ found batch-1 steps host-bound by kernels.)

Replaces the speed model's ``linear_passes`` feature by the operators a micro-batch dispatches
(``results/ops_per_block.txt`` from ``benchmarks/count_ops.py``: per block, plain or
checkpointed, times the blocks, plus the fixed ones; smollm2 counted as Llama, gemma-2 as
Gemma 3, which count_ops could not run with sdpa), with or without the norm term, refits on
the grid (``speed_fit.py``'s fit) and prints the leave-one-model-out and held-out errors.

    python benchmarks/speed_fit_ops.py base|ops|ops+norm
"""
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import speed_fit as F
from qplan.planner import speed as S
OPS = {}
for line in open(ROOT / "benchmarks/results/ops_per_block.txt"):
    name, rest = line.split(" ", 1)
    if rest.startswith("{"):
        OPS[name] = ast.literal_eval(rest.strip())
orig = S.speed_features
fam = {}
def ops_for(model, cfg):
    key = model.name if model.name in OPS else {"llama": "llama-3.2-1b", "gemma2": "gemma-3-1b"}[model.model_type]
    d = OPS[key]["ckpt" if cfg.grad_ckpt else "nockpt"]
    return d["per_block"] * model.num_hidden_layers + d["fixed"]
mode = sys.argv[1]
def feats(model, cfg, gpu):
    f = orig(model, cfg, gpu)
    if mode == "ops":
        f["linear_passes"] = float(ops_for(model, cfg))
        f["norm_passes"] = 0.0
    elif mode == "ops+norm":
        f["linear_passes"] = float(ops_for(model, cfg))
    return f
S.speed_features = feats
rows = F.load()
grid = [r for r in rows if r["tag"] == "grid"]
print(mode, "n", len(grid))
med, worst, per = F.lomo(grid)
print("LOMO median %.3f worst %.3f" % (med, worst))
k = F.fit(grid)
print({n: round(v, 6) for n, v in k[0].items()}, k[1])
held = [r for r in rows if r["tag"] != "grid"]
errs = []
for r in held:
    p = F.predict(r, k); errs.append((p / r["measured"] - 1, r["model"], r["tag"]))
errs.sort(key=lambda e: abs(e[0]))
import statistics
print("held-out n", len(errs), "median %.3f" % statistics.median(abs(e[0]) for e in errs), "worst", errs[-3:])
