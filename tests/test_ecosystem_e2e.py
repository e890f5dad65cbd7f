"""The exported files against the real tools, on CPU: the trl script trains, the axolotl and
LLaMA-Factory YAML validate against those projects' own schemas, and ``Plan.to_hf()`` with
qplan's techniques trains under trl's SFTTrainer.

axolotl 0.19.0 and LLaMA-Factory 0.9.5 cannot be installed beside qplan's stack (they pin
older transformers, peft and trl), so their wheels are installed without dependencies into
a temporary folder (with pillow, omegaconf and antlr4, which their schema modules import)
and only the schema is used: axolotl's pydantic ``AxolotlInputConfig`` (merged with the
Liger plugin's fields when the file loads that plugin, as axolotl does) and
LLaMA-Factory's ``get_train_args`` (with its check of installed kernels turned off: that is
the environment, not the schema). Without network access to the package index these two
tests are skipped; the field names are still checked against the lists read from the same
releases (tests/test_ecosystem.py).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures import tiny_llama as TL
from qplan import api
from qplan.ecosystem import export

pytestmark = pytest.mark.slow

SCHEMA_PACKAGES = ["axolotl==0.19.0", "llamafactory==0.9.5", "pillow", "omegaconf",
                   "antlr4-python3-runtime==4.9.3"]

VALIDATE = r'''
import importlib.util, os, sys, yaml
kind, path = sys.argv[1], sys.argv[2]
cfg = yaml.safe_load(open(path))
if kind == "axolotl":
    import axolotl
    from axolotl.utils.schemas.config import AxolotlInputConfig
    from axolotl.utils.schemas.datasets import SFTDataset

    def plugin_args(rel, name):  # the plugin's args module (its package imports the kernels)
        p = os.path.join(os.path.dirname(axolotl.__file__), "integrations", rel, "args.py")
        spec = importlib.util.spec_from_file_location("plugin_" + rel, p)
        m = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(m)
        return getattr(m, name)

    bases = [AxolotlInputConfig]
    if "axolotl.integrations.liger.LigerPlugin" in (cfg.get("plugins") or []):
        bases.insert(0, plugin_args("liger", "LigerArgs"))
    Model = type("Checked", tuple(bases), {})
    known = set(Model.model_fields) | {f.alias for f in Model.model_fields.values() if f.alias}
    unknown = set(cfg) - known
    assert not unknown, f"not axolotl fields: {unknown}"
    cfg["datasets"] = [SFTDataset(**d) for d in cfg["datasets"]]
    m = Model(**cfg)
    print("valid", m.base_model, m.sequence_len, m.micro_batch_size)
else:
    import llamafactory.hparams.parser as P
    P._check_extra_dependencies = lambda *a, **k: None  # installed kernels: not the schema
    from llamafactory.hparams import get_train_args
    cfg.setdefault("use_cpu", True)  # transformers refuses bf16 on a machine without a GPU
    model_args, data_args, training_args, ft_args, _ = get_train_args(cfg)
    print("valid", model_args.model_name_or_path, data_args.cutoff_len, ft_args.lora_rank)
'''


@pytest.fixture(scope="module")
def schema_site(tmp_path_factory):
    site = tmp_path_factory.mktemp("schemas")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                        str(site), *SCHEMA_PACKAGES], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"could not fetch {', '.join(SCHEMA_PACKAGES[:2])} from the package index: "
                    + r.stderr.strip().splitlines()[-1][:200])
    return site


def validate(site: Path, kind: str, path: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(site), "DISABLE_VERSION_CHECK": "1"}
    r = subprocess.run([sys.executable, "-c", VALIDATE, kind, str(path)], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    return r.stdout


# plans that use every setting the tools can express: offload, Liger norms, a tiled MLP,
# packing, 8-bit AdamW, an fp16 card, plain LoRA
PLANS = [
    ("llama-3.1-8b", "rtx-4060", 1024, {}),
    ("llama-3.1-8b", "rtx-4090", 4096, {"mlp_chunk": 1024, "recompute_norms": True}),
    ("qwen2.5-7b", "a100-80gb-sxm", 2048, {"packed_rows": True, "optim": "adamw_8bit"}),
    ("llama-3.2-1b", "t4", 1024, {"prepare": "kbit"}),
    ("phi-3.5-mini", "l4", 2048, {"quant": "none", "lora_targets": ("qkv", "o")}),
]


@pytest.mark.parametrize("fmt", ["axolotl", "llama-factory"])
@pytest.mark.parametrize("model, gpu, seq, fixed", PLANS, ids=[p[0] + "-" + p[1] for p in PLANS])
def test_exported_yaml_validates_against_the_tools_schema(schema_site, tmp_path, fmt, model, gpu,
                                                          seq, fixed):
    profile, g = api.get_model(model), api.get_gpu(gpu)
    plan = api.suggest(profile, g, seq_len=seq, fixed=fixed)
    e = export(plan, fmt, profile=profile, gpu=g, data="train.jsonl")
    p = tmp_path / e.filename
    p.write_text(e.text)
    out = validate(schema_site, "axolotl" if fmt == "axolotl" else "llamafactory", p)
    valid = [line for line in out.splitlines() if line.startswith("valid ")]
    # LLaMA-Factory packs into cutoff_len - 1 tokens (DataArguments.__post_init__)
    seq = int(valid[0].split()[2]) if valid else None
    assert seq in (plan.config.seq_len, plan.config.seq_len - int(plan.config.packed_rows))


# ---- the trl script trains ---------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    model = TL.build(d / "tiny")
    data = TL.write_jsonl(d / "train.jsonl", [{"text": s} for s in TL.sentences(40, seed=5)])
    return model, data


def test_the_exported_trl_script_trains_two_steps(tiny, tmp_path):
    model_dir, data = tiny
    profile = api.get_model(str(model_dir))
    # activation offloading and Liger norms exercise the script's CPU fallbacks too
    plan = api.suggest(profile, api.get_gpu("rtx-4090"), seq_len=64, target_effective_batch=4,
                       model_ref=str(model_dir), fixed={"grad_ckpt": True, "prepare": "kbit",
                                                        "offload_activations": True,
                                                        "recompute_norms": True})
    e = export(plan, "trl", profile=profile)
    script = tmp_path / "train_trl.py"
    script.write_text(e.text)
    r = subprocess.run([sys.executable, str(script), "--data", str(data), "--max-steps", "2",
                        "--output", str(tmp_path / "out")], capture_output=True, text=True,
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    logged = [line for line in (r.stdout + r.stderr).splitlines() if "'loss':" in line]
    assert len(logged) == 2, r.stdout[-2000:]  # logging_steps=1: one line per optimizer step


def test_to_hf_with_qplans_techniques_trains_under_sfttrainer(tiny, tmp_path):
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    from qplan.runner.lowmem import PinnedPool  # noqa: F401  (the offload's buffers)

    model_dir, data = tiny
    profile = api.get_model(str(model_dir))
    plan = api.suggest(profile, api.get_gpu("rtx-4090"), seq_len=64, target_effective_batch=2,
                       model_ref=str(model_dir),
                       fixed={"grad_ckpt": True, "offload_activations": True, "mlp_chunk": 16,
                              "recompute_norms": True, "embed_on_cpu": True, "batch_size": 2})
    hf = plan.to_hf(profile=profile)
    assert hf.not_expressible.keys() <= {"loss"}
    model = AutoModelForCausalLM.from_pretrained(hf.model, **hf.model_kwargs())
    model = hf.apply(model)
    base = model.get_base_model()
    assert getattr(base.model.embed_tokens, "_qplan_on_cpu", False)
    assert all(getattr(layer.mlp, "_qplan_tiled", False) for layer in base.model.layers)
    assert hasattr(base, "_qplan_offload_pool")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = hf.sft_config(output_dir=str(tmp_path / "o"), max_steps=2, use_cpu=True,
                         report_to="none", learning_rate=1e-2, save_strategy="no")
    assert args.gradient_checkpointing is False  # qplan set it up; the trainer must not redo it
    trainer = SFTTrainer(model=model, args=args, processing_class=AutoTokenizer.from_pretrained(hf.model),
                         train_dataset=load_dataset("json", data_files=str(data), split="train"))
    trainer.train()
    assert trainer.state.global_step == 2
    changed = [n for n, p in model.named_parameters() if p.requires_grad
               and not torch.equal(p.detach().to(before[n].dtype), before[n])]
    assert changed  # the LoRA weights learned through the offloaded, tiled blocks


def test_the_gpu_check_script_runs_its_cpu_dry_run(tmp_path):
    """benchmarks/trl_check_gpu.py's plumbing (build, config, qplan check, a trl run in a fresh
    process, the report) on CPU with the tiny model: what the GPU run does, without NVML."""
    import json

    script = Path(__file__).parent.parent / "benchmarks" / "trl_check_gpu.py"
    r = subprocess.run([sys.executable, str(script), "--cpu-dry-run", "--steps", "2", "--out",
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=900,
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "trl_check_gpu.json").read_text())
    assert res["run"]["steps"] == 2 and res["run"]["device"] == "cpu"
    assert set(res["run"]["example_lengths"]) == {64}  # every step at max_length
    est = res["estimate"]
    assert est["settings"]["loss"] == "fused" and est["settings"]["prepare"] == "kbit"
    assert est["peak_less_context_gib"] < est["peak_gib"]
    assert "estimate error" in (tmp_path / "out" / "trl_check_gpu.md").read_text()
