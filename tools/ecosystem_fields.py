"""Regenerate ``qplan/ecosystem/fields_data.py``: the configuration field names of trl,
transformers, peft, axolotl and LLaMA-Factory that ``qplan check`` accepts.

The names are read from the packages themselves (dataclass fields, pydantic model fields),
so the lists say exactly what those versions accept. axolotl and LLaMA-Factory cannot be
installed beside qplan's training stack (they pin older transformers, peft and trl), so their
wheels are installed without dependencies into a temporary folder and only their schema
modules are imported (with pillow and omegaconf, which those modules need):

    python tools/ecosystem_fields.py            # writes qplan/ecosystem/fields_data.py

Run it in the dev environment (``pip install -e '.[dev]'``); it downloads the two wheels.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata as md
import inspect
import os
import subprocess
import sys
import tempfile
from pathlib import Path

AXOLOTL = "axolotl==0.19.0"
LLAMAFACTORY = "llamafactory==0.9.5"
OUT = Path(__file__).resolve().parents[1] / "qplan" / "ecosystem" / "fields_data.py"


def dc_fields(*classes) -> list[str]:
    return sorted({f.name for c in classes for f in dataclasses.fields(c) if f.init})


def schema_site(target: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(target), AXOLOTL, LLAMAFACTORY, "pillow", "omegaconf", "antlr4-python3-runtime"],
                   check=True)


def main() -> int:
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig, TrainingArguments
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig

    out: dict[str, list[str]] = {
        "SFTConfig": dc_fields(SFTConfig),
        "TrainingArguments": dc_fields(TrainingArguments),
        "ModelConfig": dc_fields(ModelConfig),
        "ScriptArguments": dc_fields(ScriptArguments, DatasetMixtureConfig),
        "LoraConfig": dc_fields(LoraConfig),
        "BitsAndBytesConfig": sorted(p for p in inspect.signature(BitsAndBytesConfig.__init__).parameters
                                     if p not in ("self", "kwargs")),
    }
    versions = {p: md.version(p) for p in ("trl", "transformers", "peft")}
    with tempfile.TemporaryDirectory() as tmp:
        schema_site(Path(tmp))
        env = {**os.environ, "PYTHONPATH": tmp, "DISABLE_VERSION_CHECK": "1"}
        code = r'''
import json, dataclasses
from axolotl.utils.schemas.config import AxolotlInputConfig
ax = set()
import importlib.util, os, axolotl
def plugin_args(rel, name):  # the plugin's args module alone (its package imports the kernels)
    path = os.path.join(os.path.dirname(axolotl.__file__), "integrations", rel, "args.py")
    spec = importlib.util.spec_from_file_location("qplan_" + rel, path)
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return getattr(mod, name)
LigerArgs = plugin_args("liger", "LigerArgs")
CutCrossEntropyArgs = plugin_args("cut_cross_entropy", "CutCrossEntropyArgs")
for model in (AxolotlInputConfig, LigerArgs, CutCrossEntropyArgs):
    for name, f in model.model_fields.items():
        ax.add(name)
        if isinstance(f.alias, str): ax.add(f.alias)
from llamafactory.hparams import DataArguments, FinetuningArguments, GeneratingArguments, ModelArguments, TrainingArguments
lf = {f.name for c in (ModelArguments, DataArguments, TrainingArguments, FinetuningArguments, GeneratingArguments)
      for f in dataclasses.fields(c) if f.init}
print(json.dumps({"axolotl": sorted(ax), "llamafactory": sorted(lf)}))
'''
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                           check=True)
        other = __import__("json").loads(r.stdout.strip().splitlines()[-1])
    out["axolotl"] = other["axolotl"]
    out["llamafactory"] = other["llamafactory"]
    lines = ['"""Configuration field names accepted by trl, transformers, peft, axolotl and',
             "LLaMA-Factory, read from the packages by ``tools/ecosystem_fields.py`` (do not edit).",
             "",
             f"trl {versions['trl']} (SFTConfig on transformers {versions['transformers']}, ModelConfig,",
             f"ScriptArguments + DatasetMixtureConfig), transformers {versions['transformers']}",
             f"(TrainingArguments, BitsAndBytesConfig), peft {versions['peft']} (LoraConfig), {AXOLOTL}",
             "(AxolotlInputConfig fields and aliases, with the Liger and Cut Cross-Entropy",
             "plugins' fields), " + LLAMAFACTORY + " (the five argument",
             "dataclasses of ``llamafactory-cli train``, with transformers "
             f"{versions['transformers']}'s Seq2SeqTrainingArguments).",
             '"""', "",
             f"VERSIONS = {dict(versions, axolotl=AXOLOTL.split('==')[1], llamafactory=LLAMAFACTORY.split('==')[1])!r}",
             ""]
    for k, v in out.items():
        lines.append(f"{k} = frozenset({{")
        row = "   "
        for name in v:
            item = f" {name!r},"
            if len(row) + len(item) > 99:
                lines.append(row)
                row = "   "
            row += item
        lines.append(row)
        lines.append("})")
        lines.append("")
    OUT.write_text("\n".join(lines))
    print(f"wrote {OUT} ({', '.join(f'{k}: {len(v)}' for k, v in out.items())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
