"""Every command answers bad input with one message and exit 2 (3: does not fit), before
any work starts, never with a traceback. One row per input; add a row with every bug.

``{name}`` in a row's arguments is a path from the ``world`` fixture (a tiny Llama, data
files, plans, configs of models qplan refuses, an adapter). ``run`` rows never get as far
as training: the table checks that no run folder was created.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from fixtures import tiny_llama as TL
from qplan import api
from qplan.cli import cli

LLAMA_1B = api.get_model("llama-3.2-1b").to_config_dict()  # tied embeddings
LLAMA_8B = dict(api.get_model("llama-3.1-8b").to_config_dict(), architectures=["LlamaForCausalLM"])
BERT = {"architectures": ["BertForMaskedLM"], "model_type": "bert", "hidden_size": 768,
        "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
        "vocab_size": 30522, "max_position_embeddings": 512}
T5 = {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "is_encoder_decoder": True,
      "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 6,
      "num_attention_heads": 8, "vocab_size": 32128}
LLAVA = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
         "text_config": dict(LLAMA_8B, model_type="llama"),
         "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024}}


def _config_dir(root: Path, name: str, cfg) -> str:
    d = root / name
    d.mkdir()
    (d / "config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    return str(d)


def _unwritable(root: Path) -> str:
    """A folder nothing can be written in: read-only permissions, or (as root, whom
    permissions do not stop) a path in sysfs."""
    if os.geteuid() != 0:
        d = root / "readonly"
        d.mkdir()
        d.chmod(0o555)
        return str(d)
    try:
        os.mkdir("/sys/qplan-probe")
    except OSError:
        return "/sys"
    os.rmdir("/sys/qplan-probe")
    pytest.skip("no unwritable folder on this machine")


def _adapter(root: Path, base: Path) -> tuple[str, str, str]:
    """A LoRA adapter of the tiny Llama, one whose config is not JSON, one whose config
    names no base model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    m = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                       LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    good = root / "adapter"
    m.save_pretrained(good)
    broken = root / "adapter-broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    nobase = root / "adapter-nobase"
    m.save_pretrained(nobase)
    cfg = json.loads((nobase / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = None
    (nobase / "adapter_config.json").write_text(json.dumps(cfg))
    return str(good), str(broken), str(nobase)


def _plans(root: Path, tiny: Path) -> dict[str, str]:
    from qplan.planner.plan import save_plan

    from qplan.planner.config import TrainConfig

    prof = api.get_model(str(tiny))

    good = save_plan(api.make_plan(prof, api.get_gpu("rtx-4090"), TrainConfig(seq_len=32),
                                   target=1, model_ref=str(tiny)), root / "plan.yaml")
    other = save_plan(api.suggest(api.get_model("llama-3.2-1b"), api.get_gpu("rtx-4090"),
                                  seq_len=256, model_ref="llama-3.2-1b"), root / "other.yaml")
    data = yaml.safe_load(good.read_text())
    out = {"plan": str(good), "plan_other": str(other)}
    for name, change in (("plan_v9", {"qplan_plan_version": 9}),
                         ("plan_badbatch", {"target_effective_batch": "abc"}),
                         ("plan_baddropout", {"settings": {**data["settings"], "lora_dropout": "x"}})):
        (root / f"{name}.yaml").write_text(yaml.safe_dump({**data, **change}))
        out[name] = str(root / f"{name}.yaml")
    (root / "plan_yaml.yaml").write_text("model: [unclosed\n")
    out["plan_yaml"] = str(root / "plan_yaml.yaml")
    return out


def _runs(root: Path) -> dict[str, str]:
    """Folders --resume must refuse: not a run, a damaged run.json, a future version."""
    out = {}
    for name, text in (("run_notrun", None), ("run_corrupt", "{\"request\": {"),
                       ("run_future", json.dumps({"version": 99}))):
        d = root / name
        d.mkdir()
        if text is not None:
            (d / "run.json").write_text(text)
        out[name] = str(d)
    held = root / "run_held"
    held.mkdir()
    (held / "run.json").write_text("{}")
    out["run_held"] = str(held)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    tiny = TL.build(root / "tiny")
    plain = TL.build(root / "plain", chat_template=False)
    w = {"tmp": str(root), "tiny": str(tiny), "plain": str(plain), "new": str(root / "new"),
         "unwritable": _unwritable(root), "other_shape": str(TL.build(root / "tiny32", hidden=32))}
    w["data"] = str(TL.write_jsonl(root / "train.jsonl", TL.alpaca_records(64)))
    w["text"] = str(TL.write_jsonl(root / "text.jsonl", [{"text": s} for s in TL.sentences(64)]))
    w["chat"] = str(TL.write_jsonl(root / "chat.jsonl", [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in zip(TL.sentences(40, 1), TL.sentences(40, 2))]))
    w["one"] = str(TL.write_jsonl(root / "one.jsonl", TL.alpaca_records(1)))
    w["bad"] = str(TL.write_jsonl(root / "bad.jsonl", ['{"text": "ok"}', "{broken"]))
    w["csv"] = str(TL.write_jsonl(root / "train.csv", [{"text": "a"}]))
    w["empty"] = str(TL.write_jsonl(root / "empty.jsonl", []))
    w["file"] = w["data"]
    (root / "notempty").mkdir()
    (root / "notempty" / "x").write_text("x")
    w["notempty"] = str(root / "notempty")
    (root / "nocfg").mkdir()
    w["nocfg"] = str(root / "nocfg")
    for name, cfg in (("bert", BERT), ("t5", T5), ("llava", LLAVA), ("llama8b", LLAMA_8B),
                      ("notjson", "{not json"), ("listcfg", [1, 2]),
                      ("partial", {"model_type": "llama", "hidden_size": 64}),
                      ("heads", dict(LLAMA_1B, num_key_value_heads=7))):
        w[name] = _config_dir(root, name, cfg)
    w.update(_plans(root, tiny))
    w.update(_runs(root))
    w["adapter"], w["adapter_broken"], w["adapter_nobase"] = _adapter(root, tiny)
    return w


def M(*a):  # suggest/estimate: a model and a card that are fine
    return ["--model", "llama-3.2-1b", "--gpu", "rtx-4090", *a]


def R(*a):  # run: the tiny model and data that are fine, on CPU, into {new}
    return ["run", "--model", "{tiny}", "--data", "{data}", "--cpu", "--seq", "64",
            "--output", "{new}", *a]


# (id, arguments, exit code, what the message must say)
CASES = [
    # ---- suggest -----------------------------------------------------------------------
    ("suggest-unknown-model", ["suggest", "--model", "llama-3.1-8c", "--gpu", "rtx-4090"], 2, ["unknown model", "llama-3.1-8b"]),
    ("suggest-unknown-gpu", ["suggest", "--model", "llama-3.2-1b", "--gpu", "rtx-4099"], 2, ["unknown GPU", "rtx-4090"]),
    ("suggest-empty-model", ["suggest", "--model", "", "--gpu", "rtx-4090"], 2, ["no model given"]),
    ("suggest-seq-too-long", ["suggest", *M("--seq", "10000000")], 2, ["longer than", "context"]),
    ("suggest-bad-target", ["suggest", *M("--targets", "q,foo")], 2, ["'foo'", "q_proj"]),
    ("suggest-gpu-0gb", ["suggest", "--model", "llama-3.2-1b", "--gpu", "0GB"], 2, ["out of range"]),
    ("suggest-vram-negative", ["suggest", *M("--vram", "-1")], 2, ["--vram must be a positive"]),
    ("suggest-vram-inf", ["suggest", *M("--vram", "inf")], 2, ["--vram must be a positive", "inf"]),
    ("suggest-vram-nan", ["suggest", *M("--vram", "nan")], 2, ["--vram must be a positive", "nan"]),
    ("suggest-vram-huge", ["suggest", *M("--vram", "1e9")], 2, ["--vram must be a positive", "up to 4096"]),
    ("suggest-vram-above-card", ["suggest", "--model", "llama-3.1-8b", "--gpu", "rtx-4060", "--vram", "80"], 2, ["more than rtx-4060's 8 GiB", "--gpu 80GB"]),
    ("suggest-optim", ["suggest", *M("--optim", "sgd")], 2, ["'sgd' is not one of"]),
    ("suggest-batch-0", ["suggest", *M("--batch", "0")], 2, ["--batch"]),
    ("suggest-dropout", ["suggest", *M("--lora-dropout", "1.5")], 2, ["--lora-dropout"]),
    ("suggest-epochs-0", ["suggest", *M("--epochs", "0")], 2, ["--epochs"]),
    ("suggest-tokens-0", ["suggest", *M("--tokens", "0")], 2, ["--tokens"]),
    ("suggest-target-batch-0", ["suggest", *M("--target-batch", "0")], 2, ["--target-batch"]),
    ("suggest-target-batch-huge", ["suggest", *M("--target-batch", "1000000000")], 2, ["--target-batch", "1048576"]),
    ("suggest-epochs-nan", ["suggest", *M("--tokens", "1000", "--epochs", "nan")], 2, ["--epochs", "not a finite number"]),
    ("suggest-dropout-nan", ["suggest", *M("--lora-dropout", "nan")], 2, ["--lora-dropout", "not a finite number"]),
    ("suggest-save-directory", ["suggest", *M("--save", "{tmp}")], 2, ["--save", "is a directory"]),
    ("suggest-save-unwritable", ["suggest", *M("--save", "{unwritable}/plan.yaml")], 2, ["--save", "cannot write in"]),
    ("suggest-save-under-a-file", ["suggest", *M("--save", "{file}/plan.yaml")], 2, ["is a file, not a folder"]),
    ("suggest-offload-without-ckpt", ["suggest", *M("--no-grad-ckpt", "--offload-activations")], 2, ["needs gradient checkpointing", "--no-grad-ckpt"]),
    ("suggest-embed-on-cpu-tied", ["suggest", *M("--embed-on-cpu")], 2, ["untied embeddings", "tie_word_embeddings"]),
    ("suggest-bert", ["suggest", "--model", "{bert}", "--gpu", "rtx-4090"], 2, ["not a causal language model", "BertForMaskedLM"]),
    ("suggest-t5", ["suggest", "--model", "{t5}", "--gpu", "rtx-4090"], 2, ["encoder-decoder"]),
    ("suggest-longest-and-seq", ["suggest", *M("--longest", "--seq", "512")], 2, ["drop --seq or --longest"]),
    ("suggest-data-and-tokens", ["suggest", *M("--data", "{data}", "--tokens", "5")], 2, ["not both"]),
    ("suggest-data-missing", ["suggest", *M("--data", "{tmp}/nope.jsonl")], 2, ["does not exist"]),
    ("suggest-data-broken", ["suggest", *M("--data", "{bad}")], 2, ["line 2 is not JSON"]),
    ("suggest-data-empty", ["suggest", *M("--data", "{empty}")], 2, ["no records"]),
    ("suggest-data-directory", ["suggest", *M("--data", "{tmp}")], 2, ["not a file"]),
    ("suggest-bf16-on-t4", ["suggest", "--model", "llama-3.2-1b", "--gpu", "t4", "--compute-dtype", "bf16"], 2, ["bf16 needs compute capability"]),
    ("suggest-config-partial", ["suggest", "--model", "{partial}", "--gpu", "rtx-4090"], 2, ["missing", "intermediate_size"]),
    ("suggest-config-not-json", ["suggest", "--model", "{notjson}", "--gpu", "rtx-4090"], 2, ["not valid JSON"]),
    ("suggest-config-a-list", ["suggest", "--model", "{listcfg}", "--gpu", "rtx-4090"], 2, ["must hold a JSON object"]),
    ("suggest-config-heads", ["suggest", "--model", "{heads}", "--gpu", "rtx-4090"], 2, ["must be a multiple"]),
    ("suggest-dir-without-config", ["suggest", "--model", "{nocfg}", "--gpu", "rtx-4090"], 2, ["has no config.json"]),
    ("suggest-nothing-fits", ["suggest", "--model", "llama-3.1-8b", "--gpu", "2GB"], 3, ["nothing fits", "bigger card"]),
    ("suggest-json-error", ["suggest", "--model", "llama-3.1-8c", "--gpu", "rtx-4090", "--json"], 2, ['"type": "UnknownModelError"']),
    # ---- estimate ----------------------------------------------------------------------
    ("estimate-unknown-model", ["estimate", "--model", "llama-3.1-8c", "--gpu", "rtx-4090"], 2, ["unknown model"]),
    ("estimate-vram-nan", ["estimate", *M("--vram", "nan")], 2, ["--vram must be a positive"]),
    ("estimate-vram-above-card", ["estimate", "--model", "llama-3.1-8b", "--gpu", "rtx-4060", "--vram", "80"], 2, ["more than rtx-4060's"]),
    ("estimate-offload-without-ckpt", ["estimate", *M("--no-grad-ckpt", "--offload-activations")], 2, ["needs gradient checkpointing"]),
    ("estimate-embed-on-cpu-tied", ["estimate", *M("--embed-on-cpu")], 2, ["untied embeddings"]),
    ("estimate-bert", ["estimate", "--model", "{bert}", "--gpu", "rtx-4090"], 2, ["not a causal language model"]),
    ("estimate-seq-too-long", ["estimate", *M("--seq", "10000000")], 2, ["longer than"]),
    ("estimate-does-not-fit", ["estimate", "--model", "llama-3.1-8b", "--gpu", "2GB"], 3, ["does not fit", "largest term"]),
    ("estimate-bad-target", ["estimate", *M("--targets", "qkv")], 2, ["'qkv'"]),
    # ---- run ---------------------------------------------------------------------------
    ("run-no-model", ["run", "--data", "{data}"], 2, ["--model is required"]),
    ("run-no-data", ["run", "--model", "{tiny}"], 2, ["--data is required"]),
    ("run-gpus-accum", ["run", "--model", "{tiny}", "--data", "{data}", "--cpu", "--output", "{new}", "--batch", "1", "--grad-accum", "4", "--gpus", "3"], 2, ["multiple of 3", "grad_accum 3 or 6"]),
    ("run-gpus-effective-batch", ["run", "--model", "{tiny}", "--data", "{data}", "--cpu", "--output", "{new}", "--effective-batch", "5", "--gpus", "2"], 2, ["effective batch of 5 does not split across 2 GPUs", "use 4 or 6"]),
    ("suggest-gpus-split", ["suggest", "--model", "llama-3.1-8b", "--gpu", "rtx-4090", "--gpus", "3"], 2, ["effective batch of 16 does not split across 3 GPUs", "use 15 or 18"]),
    ("suggest-gpus-batch-split", ["suggest", "--model", "llama-3.1-8b", "--gpu", "rtx-4090", "--gpus", "2", "--batch", "3", "--target-batch", "9"], 2, ["per-device batch of 3", "multiple of 6", "use 6 or 12"]),
    ("suggest-gpus-zero", ["suggest", "--model", "llama-3.1-8b", "--gpus", "0"], 2, ["--gpus"]),
    ("suggest-gpus-huge", ["suggest", "--model", "llama-3.1-8b", "--gpus", "1000"], 2, ["--gpus"]),
    ("estimate-gpus-accum", ["estimate", "--model", "llama-3.1-8b", "--gpu", "rtx-4090", "--gpus", "2", "--grad-accum", "3"], 2, ["grad_accum 3 does not split across gpus 2", "grad_accum 4"]),
    ("run-fsdp-on-cpu", ["run", "--model", "{tiny}", "--data", "{data}", "--cpu", "--output", "{new}", "--gpus", "2", "--strategy", "fsdp"], 2, ["shards the model across GPUs (strategy fsdp)", "--strategy ddp"]),
    ("run-fsdp-8bit", ["run", "--model", "{tiny}", "--data", "{data}", "--cpu", "--output", "{new}", "--gpus", "2", "--strategy", "fsdp", "--optim", "adamw_8bit"], 2, ["needs optim adamw_torch"]),
    ("suggest-fsdp-one-gpu", ["suggest", "--model", "qwen3-4b", "--gpu", "rtx-4090", "--strategy", "fsdp"], 2, ["needs gpus >= 2", "--gpus 2"]),
    ("run-offload-on-cpu", ["run", "--model", "{tiny}", "--data", "{data}", "--cpu", "--output", "{new}", "--offload-params"], 2, ["strategy fsdp with CPU offload", "--strategy ddp --no-offload-params"]),
    ("suggest-offload-ddp", ["suggest", "--model", "llama-3.1-8b", "--gpu", "rtx-4090", "--offload-params", "--strategy", "ddp"], 2, ["offload_params", "needs strategy fsdp"]),
    ("estimate-offload-8bit", ["estimate", "--model", "llama-3.1-8b", "--gpu", "rtx-4090", "--offload-params", "--optim", "paged_adamw_8bit"], 2, ["needs optim adamw_torch"]),
    ("suggest-offload-kbit", ["suggest", "--model", "llama-3.1-70b", "--gpu", "rtx-4090", "--offload-params", "--prepare", "kbit"], 2, ["needs prepare lean"]),
    ("suggest-strategy-unknown", ["suggest", "--model", "qwen3-4b", "--gpu", "rtx-4090", "--strategy", "zero3"], 2, ["--strategy", "ddp", "fsdp"]),
    ("estimate-fsdp-kbit", ["estimate", "--model", "qwen3-4b", "--gpu", "rtx-4090", "--gpus", "2", "--grad-accum", "2", "--strategy", "fsdp", "--prepare", "kbit"], 2, ["needs prepare lean"]),
    ("run-gpus-zero", ["run", "--model", "{tiny}", "--data", "{data}", "--cpu", "--output", "{new}", "--gpus", "0"], 2, ["--gpus"]),
    ("run-model-missing", ["run", "--model", "./no/such/model", "--data", "{data}", "--cpu", "--output", "{new}"], 2, ["no such file or directory"]),
    ("run-model-a-file", ["run", "--model", "{data}", "--data", "{data}", "--cpu", "--output", "{new}"], 2, ["is a file"]),
    ("run-model-no-config", ["run", "--model", "{nocfg}", "--data", "{data}", "--cpu", "--output", "{new}"], 2, ["has no config.json"]),
    ("run-bert", ["run", "--model", "{bert}", "--data", "{data}", "--cpu", "--output", "{new}"], 2, ["not a causal language model"]),
    ("run-t5", ["run", "--model", "{t5}", "--data", "{data}", "--cpu", "--output", "{new}"], 2, ["encoder-decoder"]),
    ("run-llava", ["run", "--model", "{llava}", "--data", "{data}", "--cpu", "--output", "{new}"], 2, ["multimodal", "vision"]),
    ("run-data-missing", ["run", "--model", "{tiny}", "--data", "{tmp}/nope.jsonl", "--cpu", "--output", "{new}"], 2, ["does not exist"]),
    ("run-data-csv", ["run", "--model", "{tiny}", "--data", "{csv}", "--cpu", "--output", "{new}"], 2, ["unknown format"]),
    ("run-data-bad-records", ["run", "--model", "{tiny}", "--data", "{bad}", "--cpu", "--output", "{new}"], 2, ["bad.jsonl:2", "--skip-bad-lines"]),
    ("run-data-one-record", ["run", "--model", "{tiny}", "--data", "{one}", "--cpu", "--output", "{new}"], 2, ["every step would repeat rows", "--effective-batch"]),
    ("run-data-empty-dir", ["run", "--model", "{tiny}", "--data", "{nocfg}", "--cpu", "--output", "{new}"], 2, ["not a saved `datasets` dataset"]),
    ("run-eval-split-099", R("--eval-split", "0.99"), 2, ["--eval-split", "0.5"]),
    ("run-eval-data-and-split", R("--eval-split", "0.1", "--eval-data", "{data}"), 2, ["not both"]),
    ("run-lr-negative", R("--lr", "-1"), 2, ["--lr"]),
    ("run-lr-nan", R("--lr", "nan"), 2, ["--lr", "not a finite number"]),
    ("run-epochs-inf", R("--epochs", "inf"), 2, ["--epochs", "not a finite number"]),
    ("run-seed-negative", R("--seed", "-1"), 2, ["--seed"]),
    ("run-max-steps-0", R("--max-steps", "0"), 2, ["--max-steps"]),
    ("run-save-steps-0", R("--save-steps", "0"), 2, ["--save-steps"]),
    ("run-effective-batch-0", R("--effective-batch", "0"), 2, ["--effective-batch"]),
    ("run-max-steps-huge", R("--max-steps", "100000000", "--batch", "2", "--grad-accum", "2"), 2, ["rows to train on", "at most 100,000,000"]),
    ("run-plan-bad-dropout", R("--plan", "{plan_baddropout}"), 2, ["lora_dropout must be a number"]),
    ("run-output-a-file", ["run", "--model", "{tiny}", "--data", "{data}", "--cpu", "--output", "{file}"], 2, ["--output", "is a file"]),
    ("run-output-unwritable", ["run", "--model", "{tiny}", "--data", "{data}", "--cpu", "--output", "{unwritable}/o"], 2, ["--output", "cannot write in"]),
    ("run-output-not-empty", ["run", "--model", "{tiny}", "--data", "{data}", "--cpu", "--output", "{notempty}"], 2, ["not empty"]),
    ("run-output-holds-a-run", ["run", "--model", "{tiny}", "--data", "{data}", "--cpu", "--output", "{run_held}"], 2, ["already holds a run", "--resume"]),
    ("run-plan-missing", R("--plan", "{tmp}/nope.yaml"), 2, ["does not exist", "qplan suggest"]),
    ("run-plan-directory", R("--plan", "{tmp}"), 2, ["is a directory"]),
    ("run-plan-not-yaml", R("--plan", "{plan_yaml}"), 2, ["not valid YAML"]),
    ("run-plan-version-9", R("--plan", "{plan_v9}"), 2, ["qplan_plan_version is 9", "qplan suggest --save"]),
    ("run-plan-bad-batch", R("--plan", "{plan_badbatch}"), 2, ["target_effective_batch must be an integer"]),
    ("run-plan-for-another-model", R("--plan", "{plan_other}"), 2, ["was made for llama-3.2-1b", "another shape"]),
    ("run-plan-overrides-conflict", R("--plan", "{plan}", "--no-grad-ckpt", "--offload-activations"), 2, ["needs gradient checkpointing"]),
    ("run-resume-missing", ["run", "--resume", "{tmp}/nope"], 2, ["no such folder"]),
    ("run-resume-not-a-run", ["run", "--resume", "{run_notrun}"], 2, ["not a run folder"]),
    ("run-resume-corrupt", ["run", "--resume", "{run_corrupt}"], 2, ["run.json is damaged", "cannot be resumed"]),
    ("run-resume-future", ["run", "--resume", "{run_future}"], 2, ["damaged", "version 99"]),
    ("run-simulate-on-cpu", R("--simulate-gpu", "rtx-4060"), 2, ["caps a real GPU"]),
    ("run-gpu-unknown", R("--gpu", "rtx-4099"), 2, ["unknown GPU"]),
    ("run-offload-without-ckpt", R("--no-grad-ckpt", "--offload-activations"), 2, ["needs gradient checkpointing"]),
    ("run-completion-only-text", ["run", "--model", "{tiny}", "--data", "{text}", "--cpu", "--completion-only", "--output", "{new}"], 2, ["--completion-only needs"]),
    ("run-chat-without-template", ["run", "--model", "{plain}", "--data", "{chat}", "--cpu", "--output", "{new}"], 2, ["no chat template"]),
    ("run-bad-target", R("--targets", "foo"), 2, ["'foo'"]),
    ("run-seq-too-long", ["run", "--model", "{tiny}", "--data", "{data}", "--cpu", "--seq", "1000", "--output", "{new}"], 2, ["longer than"]),
    ("run-does-not-fit", ["run", "--model", "{llama8b}", "--data", "{data}", "--cpu", "--gpu", "2GB", "--output", "{new}"], 3, ["nothing fits"]),
    ("run-json-error", ["run", "--resume", "{tmp}/nope", "--json"], 2, ['"type": "RunFolderError"']),
    # ---- merge -------------------------------------------------------------------------
    ("merge-adapter-missing", ["merge", "--adapter", "{tmp}/nope", "--output", "{new}"], 2, ["has no adapter_config.json"]),
    ("merge-adapter-config-broken", ["merge", "--adapter", "{adapter_broken}", "--output", "{new}"], 2, ["not a readable adapter config"]),
    ("merge-adapter-names-no-base", ["merge", "--adapter", "{adapter_nobase}", "--output", "{new}"], 2, ["does not name its base model", "--base"]),
    ("merge-output-a-file", ["merge", "--adapter", "{adapter}", "--output", "{file}"], 2, ["--output", "is a file"]),
    ("merge-output-not-empty", ["merge", "--adapter", "{adapter}", "--output", "{notempty}"], 2, ["not empty"]),
    ("merge-output-unwritable", ["merge", "--adapter", "{adapter}", "--output", "{unwritable}/m"], 2, ["cannot write in"]),
    ("merge-base-other-shape", ["merge", "--adapter", "{adapter}", "--base", "{other_shape}", "--output", "{new}"], 2, ["does not fit the base model", "--base"]),
    ("merge-base-not-a-model", ["merge", "--adapter", "{adapter}", "--base", "{nocfg}", "--output", "{new}"], 2, ["not a model directory"]),
    ("merge-dtype", ["merge", "--adapter", "{adapter}", "--output", "{new}", "--dtype", "int8"], 2, ["--dtype"]),
    ("merge-json-error", ["merge", "--adapter", "{tmp}/nope", "--output", "{new}", "--json"], 2, ['"exit_code": 2']),
    # ---- the catalogues, hw, plugins, the group -----------------------------------------
    ("gpus-unknown-option", ["gpus", "--bogus"], 2, ["No such option"]),
    ("models-extra-argument", ["models", "extra"], 2, ["unexpected extra argument"]),
    ("hw-unknown-option", ["hw", "--gpu", "x"], 2, ["No such option"]),
    ("doctor-extra-argument", ["doctor", "x"], 2, ["unexpected extra argument"]),
    ("plugins-extra-argument", ["plugins", "--json", "x"], 2, ["unexpected extra argument"]),
    ("unknown-command", ["sugest", "--model", "llama-3.2-1b"], 2, ["No such command"]),
]


@pytest.mark.parametrize("args, code, needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(world, args, code, needles):
    argv = [a.format(**world) for a in args]
    r = CliRunner().invoke(cli, argv)
    out = r.output
    assert "Traceback" not in out, out
    assert r.exit_code == code, out
    for n in needles:
        assert n.format(**world) in out, out
    assert not Path(world["new"]).exists(), "a refused command left its output behind"


def test_the_table_covers_every_command():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)
    covered = {c[1][0] for c in CASES}
    assert {"suggest", "estimate", "run", "merge", "gpus", "models", "hw", "doctor",
            "plugins"} <= covered


def test_malformed_failpoints_are_refused_before_any_work(world, monkeypatch):
    monkeypatch.setenv("QPLAN_FAILPOINTS", "boom@step=1")
    r = CliRunner().invoke(cli, [a.format(**world) for a in R()])
    assert r.exit_code == 2 and "QPLAN_FAILPOINTS: unknown action 'boom'" in r.output
    assert "Traceback" not in r.output and not Path(world["new"]).exists()


# ---- inputs that are accepted, but now say what they cannot judge --------------------------
def test_a_multimodal_config_is_planned_with_its_tower_named(world):
    r = CliRunner().invoke(cli, ["suggest", "--model", world["llava"], "--gpu", "h100-sxm",
                                 "--json"])
    assert r.exit_code == 0, r.output
    notes = json.loads(r.stdout)["notes"]
    assert any("not counted: vision (clip_vision_model)" in n for n in notes)
