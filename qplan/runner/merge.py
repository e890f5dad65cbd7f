"""Merge a trained LoRA adapter into its base model, for serving without peft.

The base is loaded in 16-bit (or float32), not 4-bit: merging into quantized weights would
round the update away. Note that the adapter was trained against the 4-bit base, so the
merged 16-bit model differs from the 4-bit + adapter model by the quantization error of
the base weights (the same as serving the adapter on a 16-bit base).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qplan.errors import BadInputError

DTYPES = ("bf16", "fp16", "fp32")


@dataclass(frozen=True)
class MergeReport:
    adapter: str
    base: str
    output: str
    dtype: str
    parameters: int


def _base_of(adapter: Path) -> str:
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise BadInputError(f"{adapter / 'adapter_config.json'} does not name its base model; "
                            "pass --base MODEL")
    return base


def merge(adapter: str | Path, output: str | Path, *, base: str | None = None,
          dtype: str = "bf16") -> MergeReport:
    """Load ``base`` (default: the one the adapter names) in ``dtype``, apply the adapter,
    ``merge_and_unload``, and save the model and the tokenizer to ``output``."""
    from qplan.runner.run import require_training_stack

    require_training_stack()
    a, out = Path(adapter).expanduser(), Path(output).expanduser()
    if not (a / "adapter_config.json").is_file():
        raise BadInputError(f"--adapter {str(a)!r} has no adapter_config.json; give the --output "
                            "folder of a finished `qplan run` (or any peft adapter folder)")
    if dtype not in DTYPES:
        raise BadInputError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if out.exists() and any(out.iterdir()):
        raise BadInputError(f"--output {str(out)!r} exists and is not empty; choose another folder")
    base = base or _base_of(a)
    bp = Path(base).expanduser()
    if (base.startswith((".", "/", "~")) or bp.exists()) and not (bp / "config.json").is_file():
        raise BadInputError(f"base model {base!r} is not a model directory (no config.json); "
                            "pass --base with the model the adapter was trained on")

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    td = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=td)
    except OSError as e:
        raise BadInputError(f"could not load the base model {base!r}: {e}") from None
    merged = PeftModel.from_pretrained(model, str(a)).merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out))
    tok_src = str(a) if (a / "tokenizer_config.json").is_file() else base
    AutoTokenizer.from_pretrained(tok_src).save_pretrained(str(out))
    return MergeReport(adapter=str(a), base=base, output=str(out), dtype=dtype,
                       parameters=sum(p.numel() for p in merged.parameters()))
