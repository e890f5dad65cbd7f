"""``qplan export``'s library side: a plan as a runnable trl script, or an axolotl or
LLaMA-Factory YAML, with a comment for every setting the tool cannot express and what that
costs in memory.

The estimate written into the file is that of what the tool runs with it: the file read
back the way ``qplan check`` reads it. So ``qplan check`` of an exported file gives that
estimate; it equals the plan's own when every setting is expressible, and each difference
is listed.
"""
from __future__ import annotations

import pprint
from dataclasses import dataclass
from typing import Any

from qplan.ecosystem import axolotl as AX
from qplan.ecosystem import llamafactory as LF
from qplan.ecosystem import trl as TRL
from qplan.ecosystem.base import YamlDoc, gib
from qplan.errors import BadInputError
from qplan.planner.config import TrainConfig

FORMATS = ("trl", "axolotl", "llama-factory")


@dataclass(frozen=True)
class Gap:
    """A plan setting the tool cannot express: what it does instead, and the memory that
    costs (positive: the tool needs more than the plan)."""

    setting: str
    planned: Any
    tool: Any
    why: str
    delta_bytes: int


@dataclass(frozen=True)
class Exported:
    format: str
    text: str
    plan_peak_bytes: int  # the plan's estimate
    peak_bytes: int  # the estimate of what the tool runs with this file
    tokens_per_s: float
    config: TrainConfig  # what the tool runs, as qplan settings
    gaps: tuple[Gap, ...]
    filename: str  # a suggested file name
    # with several GPUs (the plan's ``gpus``): how to start the processes, and accelerate's
    # config file for it (None: the tool starts them itself, or one GPU)
    launch: str | None = None
    accelerate_config: str | None = None


ACCELERATE_CONFIG = "accelerate_config.yaml"


def accelerate_config(cfg: TrainConfig) -> str:
    """accelerate's config file for ``cfg``'s processes on one machine (what ``accelerate
    config`` writes), with the plan's mixed precision: multi-GPU DDP, or FSDP2 as qplan run
    sets it up (every decoder block a unit, resharded after its forward, the model loaded on
    the host by every process, the full state dict saved; CPU offload of the parameters when
    the plan has it)."""
    import yaml

    fsdp = cfg.strategy == "fsdp"
    d = {"compute_environment": "LOCAL_MACHINE",
         "distributed_type": "FSDP" if fsdp else "MULTI_GPU",
         "num_machines": 1, "machine_rank": 0, "num_processes": cfg.gpus, "gpu_ids": "all",
         "mixed_precision": cfg.compute_dtype, "use_cpu": False, "main_training_function": "main",
         "rdzv_backend": "static", "same_network": True}
    if fsdp:
        d["fsdp_config"] = {
            "fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_reshard_after_forward": True, "fsdp_offload_params": cfg.offload_params,
            "fsdp_cpu_ram_efficient_loading": False, "fsdp_state_dict_type": "FULL_STATE_DICT",
            "fsdp_activation_checkpointing": False}
        what = (f"{cfg.gpus} process{'es' if cfg.gpus > 1 else ''} of FSDP2, the model sharded"
                + (", its shards in host memory (CPU offload)" if cfg.offload_params else ""))
    else:
        what = f"{cfg.gpus} data-parallel processes (DDP), one a GPU"
    return f"# accelerate config by qplan: {what}\n" + yaml.safe_dump(d, sort_keys=False)


def _launch(fmt: str, cfg: TrainConfig, name: str) -> str | None:
    if cfg.gpus <= 1 and cfg.strategy != "fsdp":
        return None
    if fmt == "trl":
        return f"accelerate launch --config_file {ACCELERATE_CONFIG} {name} --data DATA"
    if fmt == "axolotl":
        return f"accelerate launch --config_file {ACCELERATE_CONFIG} -m axolotl.cli.train {name}"
    return f"FORCE_TORCHRUN=1 NNODES=1 NPROC_PER_NODE={cfg.gpus} llamafactory-cli train {name}"


def _model_ref(plan, profile) -> str:
    """What the tool loads: a catalogue name becomes its hub id."""
    from qplan import api

    found = api.catalog().models.find(plan.model)
    if found is not None and found.hf_id and "/" in found.hf_id:
        return found.hf_id
    return plan.model


def _realized(fmt: str, rendered: dict[str, Any], profile, source: str) -> TrainConfig:
    """What the tool runs with ``rendered``, read back like ``qplan check`` reads it."""
    if fmt == "trl":
        return TRL.read(rendered, profile, source=source, layout="sections",
                        trl_version=TRL.NEWEST_MODELLED).config
    mod = AX if fmt == "axolotl" else LF
    import os

    old = os.environ.get(mod.ALLOC_ENV)
    # the file is read as if the environment set what the export asks for in a comment
    if rendered.get("_expandable"):
        os.environ[mod.ALLOC_ENV] = "expandable_segments:True"
    else:
        os.environ.pop(mod.ALLOC_ENV, None)
    try:
        return mod.read({k: v for k, v in rendered.items() if not k.startswith("_")}, profile,
                        source=source).config
    finally:
        if old is None:
            os.environ.pop(mod.ALLOC_ENV, None)
        else:
            os.environ[mod.ALLOC_ENV] = old


def _gaps(plan, profile, gpu, realized: TrainConfig, whys: dict[str, str], capacity_bytes,
          pm) -> list[Gap]:
    from qplan import api

    base = api.estimate(profile, gpu, plan.config, capacity_bytes=capacity_bytes, pm=pm)
    out = []
    for f in TrainConfig.__dataclass_fields__:
        a, b = getattr(plan.config, f), getattr(realized, f)
        if a == b and f not in whys:
            continue
        one = plan.config.with_(**{f: b})
        try:
            est = api.estimate(profile, gpu, one, capacity_bytes=capacity_bytes, pm=pm)
            delta = est.memory.peak_bytes - base.memory.peak_bytes
        except BadInputError:
            delta = 0
        out.append(Gap(f, a, b, whys.get(f, "the tool does this differently"), delta))
    return out


def export(plan, fmt: str, *, profile=None, gpu=None, data: str | None = None,
           capacity_bytes: int | None = None, pm=None) -> Exported:
    """``plan`` as a ``fmt`` file: ``trl`` (a Python script), ``axolotl`` or
    ``llama-factory`` (YAML). ``data`` is the training data the file names (a placeholder
    otherwise)."""
    from qplan import api, __version__

    if fmt not in FORMATS:
        raise BadInputError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    profile = profile or api.get_model(plan.model, pm=pm)
    gpu = gpu or api.get_gpu(plan.gpu or "rtx-4090", pm=pm)
    cfg = plan.config
    fsdp = cfg.strategy == "fsdp"
    if fsdp and fmt != "trl":
        raise BadInputError(
            f"this plan uses FSDP (strategy fsdp{', CPU offload' if cfg.offload_params else ''}); "
            f"qplan export writes it for trl only so far (a script and accelerate's FSDP2 "
            f"config): use --format trl, or train it with `qplan run --plan PLAN`")
    # the tools' accumulation is per process; the number of processes is the launcher's (and
    # under FSDP the sharding is accelerate's config, not the script's)
    one = cfg.with_(gpus=1, grad_accum=cfg.grad_accum // cfg.gpus, strategy="ddp",
                    offload_params=False)
    model = _model_ref(plan, profile)
    if fmt == "trl":
        rendered = TRL.render(one, profile, model=model)
        whys = TRL.unexpressible(one)
        if fsdp:
            rendered["fsdp"] = {"offload": cfg.offload_params}
    elif fmt == "axolotl":
        rendered = AX.render(one, profile, model=model)
        rendered["_expandable"] = one.expandable_segments
        whys = AX.unexpressible(one)
    else:
        rendered = LF.render(one, profile, model=model)
        rendered["_expandable"] = one.expandable_segments
        whys = LF.unexpressible(one)
    realized = _realized(fmt, {k: v for k, v in rendered.items() if k != "fsdp"}, profile,
                         f"the exported {fmt} file")
    if cfg.gpus > 1 or fsdp:  # launched on the plan's GPUs (with accelerate's FSDP config)
        realized = realized.with_(gpus=cfg.gpus, grad_accum=realized.grad_accum * cfg.gpus,
                                  strategy=cfg.strategy, offload_params=cfg.offload_params)
    gaps = _gaps(plan, profile, gpu, realized, {k: v for k, v in whys.items()
                                                if k != "expandable_segments"},
                 capacity_bytes, pm)
    plan_est = api.estimate(profile, gpu, cfg, capacity_bytes=capacity_bytes, pm=pm)
    est = api.estimate(profile, gpu, realized, capacity_bytes=capacity_bytes, pm=pm)
    name = {"trl": "train_trl.py", "axolotl": "axolotl.yaml"}.get(fmt, "llamafactory.yaml")
    launch = _launch(fmt, cfg, name)
    head = _header(plan, gpu, plan_est, est, gaps, fmt, __version__, whys)
    if launch:  # `qplan check` reads one process's file: said below instead
        head = [h for h in head if not h.startswith("`qplan check` of this file")]
        if fsdp:
            head.append(f"FSDP2 on {cfg.gpus} GPU{'s' if cfg.gpus > 1 else ''} (estimates per "
                        "GPU, speed for all), the sharding in "
                        f"{ACCELERATE_CONFIG}" + (", the weights' shards in host memory "
                                                  "(CPU offload)" if cfg.offload_params else "")
                        + f": gradient_accumulation_steps is per process ({cfg.gpus} x "
                        f"{cfg.grad_accum // cfg.gpus} = the plan's {cfg.grad_accum}); start it with")
            head.append(f"  {launch}")
            head.append("(`qplan check` of this file estimates one process holding the whole "
                        "model: the sharding is the accelerate config's.)")
        else:
            ddp = sum(t.bytes for t in est.memory.terms
                      if t.key in ("ddp_buckets", "collective_buffers"))
            head.append(f"Data-parallel on {cfg.gpus} GPUs (estimates per GPU, speed for all): "
                        f"gradient_accumulation_steps is per process ({cfg.gpus} x "
                        f"{cfg.grad_accum // cfg.gpus} = the plan's {cfg.grad_accum}); start it with")
            head.append(f"  {launch}")
            head.append(f"(`qplan check` of this file estimates one process: without DDP's "
                        f"buckets and NCCL's buffers, {gib(ddp)} per GPU, and with "
                        f"{cfg.grad_accum // cfg.gpus} micro-batches a step.)")
    if fmt == "trl":
        text = trl_script(rendered, head, gpu=gpu.name, data=data)
    elif fmt == "axolotl":
        text = axolotl_yaml(rendered, head, data=data, whys=whys)
    else:
        text = llamafactory_yaml(rendered, head, data=data, whys=whys)
    return Exported(format=fmt, text=text, plan_peak_bytes=plan_est.memory.peak_bytes,
                    peak_bytes=est.memory.peak_bytes, tokens_per_s=est.speed.tokens_per_s,
                    config=realized, gaps=tuple(gaps), filename=name, launch=launch,
                    accelerate_config=(accelerate_config(cfg) if launch and fmt != "llama-factory"
                                       else None))


def _header(plan, gpu, plan_est, est, gaps, fmt, version, whys) -> list[str]:
    tool = {"trl": "trl's SFTTrainer", "axolotl": "axolotl", "llama-factory": "LLaMA-Factory"}[fmt]
    cap = (est.memory.capacity_bytes or gpu.memory_bytes) / 2**30
    lines = [f"qplan {version}: the plan for {plan.model} on {gpu.name} ({cap:g} GiB), for {tool}.",
             f"qplan's estimate for what {tool} runs with this file: peak "
             f"{est.memory.peak_gib:.2f} GiB, {est.speed.tokens_per_s:,.0f} tokens/s "
             f"(the plan: {plan_est.memory.peak_gib:.2f} GiB).",
             "`qplan check` of this file gives the same estimate"
             + (f" (with {TRL.ALLOC_ENV}=expandable_segments:True in the environment)."
                if "expandable_segments" in whys else ".")]
    if not est.fits:
        lines.append(f"It does NOT fit {gpu.name}: {tool} cannot express what the plan needs "
                     "(below); `qplan run` can, or plan for this tool: `qplan export --model "
                     f"{plan.model} --gpu {gpu.name} --format {fmt}`.")
    if gaps:
        lines.append(f"Plan settings {tool} cannot express (memory against the plan):")
        for g in gaps:
            lines.append(f"  {g.setting}: planned {_v(g.planned)}, here {_v(g.tool)}: {g.why} "
                         f"({gib(g.delta_bytes)})")
    if "expandable_segments" in whys:
        lines.append(f"  expandable_segments: {whys['expandable_segments']} (without it: "
                     "more fragmentation, the estimate above assumes it is set)")
    return lines


def _v(x: Any) -> str:
    if isinstance(x, bool):
        return "on" if x else "off"
    if x is None:
        return "all"
    if isinstance(x, tuple):
        return ",".join(x)
    return str(x)


# ---------------------------------------------------------------------------
def _kwargs(d: dict[str, Any], indent: str, dtypes: tuple[str, ...] = ()) -> str:
    """``key=value`` lines for a call; dtype names become ``torch.<name>``."""
    lines = []
    for k, v in d.items():
        if k in dtypes and isinstance(v, str):
            val = f"torch.{v}"
        else:
            val = pprint.pformat(v, width=80, sort_dicts=False)
        lines.append(f"{indent}{k}={val},")
    return "\n".join(lines)


SCRIPT = '''#!/usr/bin/env python3
"""{doc}
Run:   python {{name}} --data train.jsonl [--output out] [--max-steps N] [--lr 2e-4]
Data:  a .jsonl file (or a `datasets` directory) of trl's SFT records: "text", or
       "prompt" + "completion", or "messages" (chat).
Check: qplan check {{name}} --gpu {gpu}
"""
import argparse
import os
{env}
MODEL = {model!r}


def main(argv=None):
    ap = argparse.ArgumentParser(description="QLoRA fine-tuning with trl's SFTTrainer (exported by qplan)")
    ap.add_argument("--data", required=True, help="training data: .jsonl file or datasets directory")
    ap.add_argument("--output", default="out", help="where the adapter and checkpoints go")
    ap.add_argument("--max-steps", type=int, default=-1, help="optimizer steps (-1: --epochs)")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=2e-4, help="learning rate")
    cli = ap.parse_args(argv)

    import torch
    from datasets import load_dataset, load_from_disk
    from peft import LoraConfig{prepare_import}
    from transformers import AutoModelForCausalLM, AutoTokenizer{bnb_import}
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
{bnb}    model = AutoModelForCausalLM.from_pretrained(
        MODEL,
{fp_kwargs}
{device_map}
    )
{fsdp_setup}{prepare}    peft_config = LoraConfig(
{lora_kwargs}
    )
    args = SFTConfig(
        output_dir=cli.output,
{args_kwargs}
        max_steps=cli.max_steps,
        num_train_epochs=cli.epochs,
        learning_rate=cli.lr,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=not cuda,
    )
{cpu_only}    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    if os.path.isdir(cli.data):
        dataset = load_from_disk(cli.data)
    else:
        dataset = load_dataset("json", data_files=cli.data, split="train")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset,
                         processing_class=tokenizer, peft_config=peft_config)
    trainer.train()
    trainer.save_model(cli.output)


if __name__ == "__main__":
    main()
'''


# The exported script under FSDP CPU offload: bitsandbytes' quantization constants are not
# FSDP parameters; left on the host with the offloaded shards, every dequantization copies
# them (20% slower in qplan's probe), so they go to this process's GPU (as qplan run does).
FSDP_OFFLOAD_SETUP = '''    if cuda:  # FSDP CPU offload: the 4-bit layers' constants on this process's GPU
        gpu = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        for module in model.modules():
            if getattr(module, "quant_state", None) is not None:
                module.quant_state.to(gpu)
'''


def trl_script(s: dict[str, Any], header: list[str], *, gpu: str, data: str | None) -> str:
    """The sections as a seed-style trl script: BitsAndBytesConfig, from_pretrained,
    prepare_model_for_kbit_training, LoraConfig, SFTConfig, SFTTrainer."""
    doc = "\n".join(header)
    env = ""
    for k, v in (s.get("env") or {}).items():
        env += f"\n# before torch starts: the allocator reads it once\nos.environ.setdefault({k!r}, {v!r})\n"
    q = s.get("quantization_config")
    fsdp = s.get("fsdp")
    if q and fsdp:  # FSDP shards the 4-bit values as tensors of the compute dtype
        q = {**q, "bnb_4bit_quant_storage": q.get("bnb_4bit_compute_dtype", "bfloat16")}
    bnb = ""
    fp = dict(s["from_pretrained"])
    if q:
        bnb = ("    bnb_config = BitsAndBytesConfig(\n"
               + _kwargs(q, " " * 8, ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage")) + "\n    )\n")
    fp_kwargs = ""
    if q:
        fp_kwargs += " " * 8 + "quantization_config=bnb_config,\n"
    fp_kwargs += _kwargs(fp, " " * 8, ("dtype",))
    prep = s.get("prepare_model_for_kbit_training")
    prepare = ""
    if prep is not None:
        prepare = ("    model = prepare_model_for_kbit_training(\n        model,\n"
                   + _kwargs(prep, " " * 8) + "\n    )\n")
    gpu_only = [k for k in ("activation_offloading", "use_liger_kernel") if s["args"].get(k)]
    cpu_only = ""
    if gpu_only:
        cpu_only = ("    if not cuda:  # a CPU run (a test): " + " and ".join(gpu_only)
                    + (" need" if len(gpu_only) > 1 else " needs") + " a GPU\n"
                    + "".join(f"        args.{k} = False\n" for k in gpu_only))
    if fsdp:
        device_map = ("        # FSDP: every process loads and quantizes the model on the host; "
                      "accelerate\n        # gives each GPU its shard as it wraps the blocks\n"
                      "        device_map={\"\": \"cpu\"},")
    else:
        device_map = ("        # each process its own GPU (accelerate launch sets LOCAL_RANK; 0 for "
                      "one process)\n        device_map={\"\": int(os.environ.get(\"LOCAL_RANK\", "
                      "\"0\"))} if cuda else None,")
    fsdp_setup = ""
    if fsdp and fsdp.get("offload"):
        fsdp_setup = FSDP_OFFLOAD_SETUP
    text = SCRIPT.format(doc=doc, gpu=gpu, env=env, model=s["model"], cpu_only=cpu_only,
                         device_map=device_map, fsdp_setup=fsdp_setup,
                         prepare_import=", prepare_model_for_kbit_training" if prep is not None else "",
                         bnb_import=", BitsAndBytesConfig" if q else "", bnb=bnb,
                         fp_kwargs=fp_kwargs, prepare=prepare,
                         lora_kwargs=_kwargs(s["peft_config"], " " * 8),
                         args_kwargs=_kwargs(s["args"], " " * 8))
    if data:
        text = text.replace('ap.add_argument("--data", required=True,',
                            f'ap.add_argument("--data", default={data!r},')
    return text.replace("{name}", "train_trl.py")


def axolotl_yaml(d: dict[str, Any], header: list[str], *, data: str | None,
                 whys: dict[str, str]) -> str:
    doc = YamlDoc(header=header + ["Train: axolotl train axolotl.yaml   "
                                   f"(axolotl {AX.VERSION}'s fields)"])
    comments = {
        "embeddings_skip_upcast": "keep embeddings and lm_head 16-bit (qplan's lean preparation)",
        "chunked_cross_entropy": "chunked loss: never the full float32 logits (qplan's fused loss)",
        "gradient_checkpointing": "offload = checkpointed block inputs in CPU memory",
        "sample_packing": "several examples per row, positions restarting (qplan's packed rows)",
    }
    for k, v in d.items():
        if k.startswith("_"):
            continue
        doc.add(k, v, comments.get(k, ""))
    doc.add("datasets", [{"path": data or "train.jsonl", "type": "alpaca"}],
            "your data: path and type (see axolotl's dataset formats)"
            + ("" if data else "; replace this placeholder"))
    doc.add("learning_rate", 0.0002, "qplan does not choose these: set your own")
    doc.add("num_epochs", 1)
    doc.add("output_dir", "./outputs/qplan")
    return doc.text()


def llamafactory_yaml(d: dict[str, Any], header: list[str], *, data: str | None,
                      whys: dict[str, str]) -> str:
    doc = YamlDoc(header=header + ["Train: llamafactory-cli train llamafactory.yaml   "
                                   f"(LLaMA-Factory {LF.VERSION}'s fields)"])
    comments = {
        "enable_liger_kernel": "Liger: fused linear cross-entropy and RMSNorm (qplan's fused "
                               "loss and lean norms)",
        "use_unsloth_gc": "checkpointed block inputs in CPU memory (qplan's activation offload)",
        "neat_packing": "several examples per row without attending to each other (packed rows)",
    }
    for k, v in d.items():
        if k.startswith("_"):
            continue
        doc.add(k, v, comments.get(k, ""))
    doc.add("dataset", data or "your_dataset",
            "a dataset name from data/dataset_info.json"
            + ("" if data else "; replace this placeholder"))
    doc.add("template", "default", "the chat template of your model (e.g. llama3, qwen)")
    doc.add("learning_rate", 0.0002, "qplan does not choose these: set your own")
    doc.add("num_train_epochs", 1.0)
    doc.add("output_dir", "saves/qplan")
    return doc.text()


# What each tool cannot do, as settings held fixed when planning for it.
TOOL_FIXED = {
    # trl >= 1.7's SFTTrainer always computes the loss in chunks
    "trl": ({"embed_on_cpu": False, "mlp_chunk": 0, "loss": "fused"},),
    "axolotl": ({"embed_on_cpu": False},),
    # enable_liger_kernel switches the fused loss and Liger's RMSNorm together
    "llama-factory": ({"embed_on_cpu": False, "mlp_chunk": 0, "loss": "fused",
                       "recompute_norms": True},
                      {"embed_on_cpu": False, "mlp_chunk": 0, "loss": "standard",
                       "recompute_norms": False}),
}


def plan_for(fmt: str, profile, gpu, *, seq_len: int, target: int = 16,
             capacity_bytes: int | None = None, model_ref: str | None = None, pm=None):
    """The fastest plan that fits ``gpu`` using only settings ``fmt`` can express
    (DoesNotFitError, with the alternatives, when none does)."""
    from qplan import api
    from qplan.errors import DoesNotFitError

    if fmt not in FORMATS:
        raise BadInputError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    best, err = None, None
    for fixed in TOOL_FIXED[fmt]:
        try:
            p = api.suggest(profile, gpu, seq_len=seq_len, target_effective_batch=target,
                            fixed=dict(fixed), capacity_bytes=capacity_bytes, model_ref=model_ref,
                            pm=pm)
        except DoesNotFitError as e:
            err = err or e
            continue
        if best is None or p.speed.tokens_per_s > best.speed.tokens_per_s:
            best = p
    if best is None:
        raise DoesNotFitError(f"{err} (with only the settings {fmt} can express)",
                              estimate=err.estimate, alternatives=err.alternatives)
    return best
