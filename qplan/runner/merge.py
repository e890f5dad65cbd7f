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
from qplan.paths import writable_folder

DTYPES = ("bf16", "fp16", "fp32")


@dataclass(frozen=True)
class MergeReport:
    adapter: str
    base: str
    output: str
    dtype: str
    parameters: int


def _base_of(adapter: Path) -> str:
    path = adapter / "adapter_config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInputError(f"{path} is not a readable adapter config ({e}); give the --output "
                            "folder of a finished `qplan run`") from None
    base = cfg.get("base_model_name_or_path") if isinstance(cfg, dict) else None
    if not base:
        raise BadInputError(f"{path} does not name its base model; pass --base MODEL")
    return base


def _check(a: Path, out: Path, base: str | None, dtype: str) -> str:
    """Everything about the inputs, before any model is loaded; the base model."""
    if not (a / "adapter_config.json").is_file():
        raise BadInputError(f"--adapter {str(a)!r} has no adapter_config.json; give the --output "
                            "folder of a finished `qplan run` (or any peft adapter folder)")
    if dtype not in DTYPES:
        raise BadInputError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    writable_folder(out, "--output")
    base = base or _base_of(a)
    bp = Path(base).expanduser()
    if (base.startswith((".", "/", "~")) or bp.exists()) and not (bp / "config.json").is_file():
        raise BadInputError(f"base model {base!r} is not a model directory (no config.json); "
                            "pass --base with the model the adapter was trained on")
    return base


def _load_base(base: str, td):
    from transformers import AutoModelForCausalLM

    from qplan.profiles.resolve import hub_offline, hub_reachable

    local = Path(base).expanduser().is_dir()
    offline = not local and not hub_offline() and not hub_reachable()
    try:
        return AutoModelForCausalLM.from_pretrained(base, dtype=td, local_files_only=offline)
    except (OSError, ValueError, KeyError) as e:
        why = " ".join(str(e).split())[:300]
        hint = " (the Hugging Face Hub cannot be reached; only its cache was searched)" \
            if offline else ""
        raise BadInputError(f"could not load the base model {base!r}{hint}: {why}") from None


def _apply(model, a: Path, base: str, named: str):
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(a)).merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as e:
        why = " ".join(str(e).split())[:300]
        raise BadInputError(
            f"the adapter in {str(a)!r} does not fit the base model {base!r}: {why}. Pass --base "
            f"with the model the adapter was trained on (adapter_config.json names {named!r})"
        ) from None


def merge(adapter: str | Path, output: str | Path, *, base: str | None = None,
          dtype: str = "bf16") -> MergeReport:
    """Load ``base`` (default: the one the adapter names) in ``dtype``, apply the adapter,
    ``merge_and_unload``, and save the model and the tokenizer to ``output``.
    BadInputError for inputs that cannot work, before anything is written."""
    from qplan.runner.run import require_training_stack

    require_training_stack()
    a, out = Path(adapter).expanduser(), Path(output).expanduser()
    base = _check(a, out, base, dtype)
    from qplan.runner.child import quiet_libraries

    quiet_libraries()
    import torch
    from transformers import AutoTokenizer

    td = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    try:
        named = _base_of(a)
    except BadInputError:
        named = "no model"
    merged = _apply(_load_base(base, td), a, base, named)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out))
    tok_src = str(a) if (a / "tokenizer_config.json").is_file() else base
    AutoTokenizer.from_pretrained(tok_src).save_pretrained(str(out))
    return MergeReport(adapter=str(a), base=base, output=str(out), dtype=dtype,
                       parameters=sum(p.numel() for p in merged.parameters()))
