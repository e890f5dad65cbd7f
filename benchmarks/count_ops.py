"""Operators dispatched per decoder block in one training micro-batch (forward + backward),
counted on the CPU: is the per-block host cost (issue 13: batch-1 steps on the H200 are
host-bound) a matter of how many operators an architecture dispatches?

Each catalogue model's architecture at a tiny width (hidden 128, 4 heads), 2 and 4 blocks,
4-bit (bitsandbytes on the CPU), LoRA r16 on every linear, fused loss, through
qplan.runner.techniques as the runner trains; every aten call counted
(TorchDispatchMode) over one micro-batch's loss and backward after a warm-up step; per block
= (4 blocks - 2 blocks) / 2. The count does not depend on the width.

    python benchmarks/count_ops.py MODEL ...   > benchmarks/results/ops_per_block.txt

Result (2026-11-30, benchmarks/results/ops_per_block.txt): 456 operators a block without
checkpointing, 703 with it, for the Llama/Qwen2.5/Mistral blocks; Qwen3 (q/k norms) 506/781;
OLMo-2 514/793; Gemma-3 568/885; Phi-3.5 (fused qkv, gate_up) 334/514. Gemma-3-1b's batch-1
steps take about 3x llama-3.2-1b's time per LoRA linear pass on the H200: its 25% more
operators do not explain that.
"""
import copy
import sys
import tempfile
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from qplan import api  # noqa: E402
from qplan.planner.config import TrainConfig  # noqa: E402
from qplan.runner import techniques as T  # noqa: E402


class Count(TorchDispatchMode):
    """Counts every aten operator dispatched while active."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def small(name: str, layers: int):
    """The catalogue model's architecture at a tiny width with ``layers`` blocks."""
    prof = api.get_model(name)
    d = copy.deepcopy(prof.to_config_dict())
    d.update(hidden_size=128, intermediate_size=256, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, vocab_size=512, num_hidden_layers=layers,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if d.get("layer_types"):
        d["layer_types"] = (d["layer_types"] * layers)[:layers]
    d.pop("text_config", None)
    return prof, AutoConfig.for_model(d.pop("model_type"), **d)


def ops(name: str, layers: int, ckpt: bool, seq: int = 256) -> int:
    """Operators of one micro-batch's loss and backward (after a warm-up step)."""
    prof, c = small(name, layers)
    d = tempfile.mkdtemp()
    AutoModelForCausalLM.from_config(c, torch_dtype=torch.bfloat16).save_pretrained(d)
    cfg = TrainConfig(seq_len=seq, batch_size=1, grad_ckpt=ckpt, loss="fused",
                      optim="adamw_torch", prepare="lean")
    m = T.load_model(d, cfg)
    T.prepare_for_training(m, cfg)
    pm = T.add_lora(m, prof, cfg)
    opt = T.make_optimizer(pm.parameters(), cfg)
    ids = torch.randint(3, 500, (1, seq))
    T.train_step(pm, opt, cfg, [(ids, ids)])
    cnt = Count()
    with cnt:
        T.micro_batch_loss(pm, cfg, ids, ids, step_tokens=seq).backward()
    return cnt.n


def main() -> int:
    for name in sys.argv[1:]:
        try:
            r = {}
            for ck in (False, True):
                a, b = ops(name, 2, ck), ops(name, 4, ck)
                r["ckpt" if ck else "nockpt"] = dict(per_block=(b - a) / 2, fixed=a - (b - a))
            print(name, r, flush=True)
        except Exception as e:  # noqa: BLE001 - reported, the other models go on
            print(name, "ERR", type(e).__name__, str(e)[:200], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
