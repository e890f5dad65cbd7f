"""qplan check / export / to_hf without training: how each trainer's config is read (the
semantics of trl, transformers' Trainer, axolotl and LLaMA-Factory), the edits, the round
trip export -> check, bad input, and the field lists against the installed packages.

Memory numbers are never pinned here (the memory model is being refitted): estimates are
compared with ``qplan.api.estimate`` of the expected configuration, or with each other.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from qplan import api
from qplan.cli import cli
from qplan.ecosystem import check, export, read_file, to_hf
from qplan.ecosystem import fields_data as F
from qplan.ecosystem.check import sniff
from qplan.ecosystem.export import plan_for
from qplan.errors import BadInputError, ConfigError, NotModelledError
from qplan.planner.config import TrainConfig
from qplan.planner.plan import save_plan

FIX = Path(__file__).parent / "fixtures" / "ecosystem"
SEED = dict(seq_len=2048, batch_size=1, grad_accum=16, lora_rank=64, lora_alpha=16,
            lora_targets=None, lora_dropout=0.1, grad_ckpt=True, optim="paged_adamw_8bit",
            prepare="kbit", loss="fused", attn="sdpa", quant="nf4", double_quant=True,
            compute_dtype="bf16", expandable_segments=False)


@pytest.fixture(autouse=True)
def _no_alloc_env(monkeypatch):
    """axolotl and LLaMA-Factory take the allocator setting from the environment."""
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)


def write(tmp_path, name: str, data) -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return p


def sections(**args) -> dict:
    base = yaml.safe_load((FIX / "seed_trl.yaml").read_text())
    base["args"].update(args)
    return base


# ---- trl ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["seed_trl.yaml", "seed_trl.py"])
def test_the_seed_recipe_reads_as_kbit_with_trls_chunked_loss(name):
    r, profile = read_file(FIX / name, trl_version="1.16.0")
    assert r.format == "trl" and r.layout == ("script" if name.endswith(".py") else "sections")
    assert profile.name == "llama-3.1-8b"
    assert r.config == TrainConfig(**SEED)
    assert any("chunks" in s for s in r.semantics)
    assert any("bfloat16" in u for u in r.unmodelled)  # trl's cast of LoRA weights, quantified


def test_trl_before_1_7_and_transformers_trainer_use_the_standard_loss(tmp_path):
    p = write(tmp_path, "s.yaml", sections())
    assert read_file(p, trl_version="1.6.0")[0].config.loss == "standard"
    assert read_file(p, trl_version="1.7.0")[0].config.loss == "fused"
    d = sections()
    d["trainer"] = "Trainer"
    r = read_file(write(tmp_path, "t.yaml", d))[0]
    assert r.config.loss == "standard"
    d["args"]["use_liger_kernel"] = True  # transformers applies Liger's fused linear CE
    r = read_file(write(tmp_path, "u.yaml", d))[0]
    assert r.config.loss == "fused" and r.config.recompute_norms


def test_label_smoothing_needs_the_full_logits_again(tmp_path):
    r = read_file(write(tmp_path, "s.yaml", sections(label_smoothing_factor=0.1)),
                  trl_version="1.16.0")[0]
    assert r.config.loss == "standard"


def test_trl_flags_packing_offloading_liger_and_allocator(tmp_path):
    d = sections(packing=True, activation_offloading=True, use_liger_kernel=True)
    d["env"] = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    c = read_file(write(tmp_path, "s.yaml", d))[0].config
    assert c.packed_rows and c.offload_activations and c.recompute_norms and c.expandable_segments
    # transformers 5.2x's new name for checkpointing wins over the old one; offload through it
    c = read_file(write(tmp_path, "a.yaml", sections(
        activation_checkpointing=False, gradient_checkpointing=True)))[0].config
    d = sections(gradient_checkpointing=False)
    del d["prepare_model_for_kbit_training"]  # which would enable checkpointing
    assert not read_file(write(tmp_path, "b.yaml", d))[0].config.grad_ckpt
    c = read_file(write(tmp_path, "c.yaml", sections(
        activation_checkpointing_kwargs={"offload": True})))[0].config
    assert c.offload_activations


def test_padding_free_without_packing_follows_trls_rules(tmp_path):
    with pytest.raises(ConfigError, match="needs max_length: null"):
        read_file(write(tmp_path, "a.yaml", sections(padding_free=True)))
    p = write(tmp_path, "b.yaml", sections(padding_free=True, max_length=None))
    with pytest.raises(ConfigError, match="give --seq N"):
        read_file(p)
    c = read_file(p, seq_len=4096)[0].config
    assert c.seq_len == 4096 and c.packed_rows


def test_seq_fills_in_a_missing_sequence_length(tmp_path):
    d = sections()
    d["trainer"] = "Trainer"
    d["args"].pop("max_length")
    p = write(tmp_path, "t.yaml", d)
    with pytest.raises(ConfigError, match="--seq N"):
        read_file(p)
    assert read_file(p, seq_len=1536)[0].config.seq_len == 1536


def test_prepare_model_for_kbit_training_turns_checkpointing_on(tmp_path):
    r = read_file(write(tmp_path, "s.yaml", sections(gradient_checkpointing=False)))[0]
    assert r.config.grad_ckpt and any("enables gradient checkpointing" in s for s in r.semantics)


def test_float32_loading_is_kbit_and_16_bit_loading_lean(tmp_path):
    d = sections()
    del d["prepare_model_for_kbit_training"]
    assert read_file(write(tmp_path, "a.yaml", d))[0].config.prepare == "lean"
    d["from_pretrained"]["dtype"] = "float32"
    assert read_file(write(tmp_path, "b.yaml", d))[0].config.prepare == "kbit"


def test_trl_cli_file_uses_trls_modelconfig_defaults():
    r, profile = read_file(FIX / "trl_cli.yaml")
    assert (r.format, r.layout, profile.name) == ("trl", "cli", "qwen2.5-7b")
    c = r.config
    # ModelConfig: dtype float32 (-> kbit), no nested quant, lora_dropout 0.05; SFTConfig:
    # max_length 1024, checkpointing and bf16 on; TrainingArguments: adamw_torch_fused
    assert (c.prepare, c.double_quant, c.lora_dropout, c.seq_len) == ("kbit", False, 0.05, 1024)
    assert (c.grad_ckpt, c.compute_dtype, c.optim, c.packed_rows) == (True, "bf16", "adamw_torch", True)
    assert (c.lora_rank, c.lora_alpha, c.batch_size, c.grad_accum) == (32, 16, 2, 8)


def test_script_and_sections_of_the_same_recipe_read_the_same():
    a = read_file(FIX / "seed_trl.yaml", trl_version="1.16.0")[0]
    b = read_file(FIX / "seed_trl.py", trl_version="1.16.0")[0]
    assert a.config == b.config and a.model == b.model


def test_a_script_whose_memory_settings_are_not_literals_is_refused(tmp_path):
    p = write(tmp_path, "train.py", "from trl import SFTConfig\nimport sys\n"
              "args = SFTConfig(output_dir=sys.argv[1], per_device_train_batch_size=int(sys.argv[2]))\n")
    with pytest.raises(ConfigError, match=r"SFTConfig\(per_device_train_batch_size=int\(sys.argv\[2\]\)\)"):
        read_file(p, model="llama-3.2-1b")


def test_peft_defaults_when_target_modules_is_not_set(tmp_path):
    d = sections()
    del d["peft_config"]["target_modules"]
    r = read_file(write(tmp_path, "s.yaml", d))[0]
    assert r.config.lora_targets == ("q", "v")
    assert any("peft's default" in s for s in r.semantics)


# ---- axolotl, LLaMA-Factory --------------------------------------------------------
def test_axolotl_example_reads_as_axolotl_runs_it():
    r, profile = read_file(FIX / "axolotl_qlora.yaml")
    c = r.config
    assert (r.format, profile.name) == ("axolotl", "llama-3.1-8b")
    assert (c.quant, c.double_quant, c.prepare, c.loss) == ("nf4", True, "kbit", "standard")
    assert (c.seq_len, c.batch_size, c.grad_accum, c.lora_targets) == (4096, 2, 4, None)
    assert (c.attn, c.packed_rows, c.optim) == ("flash_attention_2", True, "adamw_torch")


@pytest.mark.parametrize("extra, field, value", [
    ({"gradient_checkpointing": "offload"}, "offload_activations", True),
    ({"embeddings_skip_upcast": True}, "prepare", "lean"),
    ({"chunked_cross_entropy": True}, "loss", "fused"),
    ({"plugins": ["axolotl.integrations.liger.LigerPlugin"],
      "liger_fused_linear_cross_entropy": True}, "loss", "fused"),
    ({"plugins": ["axolotl.integrations.liger.LigerPlugin"], "liger_rms_norm": True},
     "recompute_norms", True),
    ({"liger_rms_norm": True}, "recompute_norms", False),  # no plugin: nothing happens
    ({"tiled_mlp": True, "tiled_mlp_num_shards": 4}, "mlp_chunk", 1024),
    ({"tiled_mlp": True}, "mlp_chunk", 4096),  # default shards = seq / hidden = 1: not tiled
])
def test_axolotl_settings(tmp_path, extra, field, value):
    d = {**yaml.safe_load((FIX / "axolotl_qlora.yaml").read_text()), **extra}
    if field == "mlp_chunk" and value == 4096:
        value = 0
    assert getattr(read_file(write(tmp_path, "a.yaml", d))[0].config, field) == value


def test_llamafactory_defaults():
    r, _ = read_file(FIX / "llamafactory_qlora.yaml")
    c = r.config
    assert r.format == "llama-factory"
    # lora_alpha defaults to 2 x rank; checkpointing on unless disabled; no upcast: lean
    assert (c.lora_rank, c.lora_alpha, c.grad_ckpt, c.prepare, c.loss) == (8, 16, True, "lean", "standard")
    assert (c.quant, c.double_quant, c.seq_len, c.optim) == ("nf4", True, 2048, "adamw_torch")


def test_llamafactory_liger_fuses_the_loss_and_the_norms(tmp_path):
    d = {**yaml.safe_load((FIX / "llamafactory_qlora.yaml").read_text()), "enable_liger_kernel": True,
         "use_unsloth_gc": True, "neat_packing": True}
    c = read_file(write(tmp_path, "l.yaml", d))[0].config
    assert c.loss == "fused" and c.recompute_norms and c.offload_activations and c.packed_rows


def test_allocator_comes_from_the_environment_for_axolotl(monkeypatch):
    assert not read_file(FIX / "axolotl_qlora.yaml")[0].config.expandable_segments
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    assert read_file(FIX / "axolotl_qlora.yaml")[0].config.expandable_segments


def test_unknown_fields_are_named_with_the_closest_one(tmp_path):
    d = {**yaml.safe_load((FIX / "axolotl_qlora.yaml").read_text()), "micro_bach_size": 4}
    r = read_file(write(tmp_path, "a.yaml", d))[0]
    assert any("micro_bach_size" in u and "did you mean micro_batch_size" in u for u in r.unmodelled)


# ---- the estimate and the edits ------------------------------------------------------
def test_check_estimates_what_the_tool_runs():
    r, profile = read_file(FIX / "seed_trl.yaml")
    gpu = api.get_gpu("rtx-4090")
    res = check(r, profile, gpu)
    want = api.estimate(profile, gpu, r.config)
    assert res.estimate.memory.peak_bytes == want.memory.peak_bytes and res.fits


def test_edits_that_fit_are_in_the_files_own_names_and_do_fit():
    gpu = api.get_gpu("rtx-4090")
    r, profile = read_file(FIX / "axolotl_qlora.yaml")
    res = check(r, profile, gpu)
    assert not res.fits and res.to_fit
    for o in res.to_fit:
        assert o.fits and all(e.field in F.axolotl for e in o.edits)
        assert api.estimate(profile, gpu, o.config).memory.peak_bytes == o.peak_bytes
    best = res.to_fit[0]
    assert len(best.edits) == 1  # one field is enough: chunked_cross_entropy
    assert str(best.edits[0]) == "chunked_cross_entropy: (not set) -> true"


def test_edits_to_a_script_name_the_call_and_argument():
    r, profile = read_file(FIX / "seed_trl.py")
    res = check(r, profile, api.get_gpu("h100-sxm"))
    assert res.faster is not None and res.faster.tokens_per_s > res.estimate.speed.tokens_per_s
    fields = [e.field for e in res.faster.edits]
    assert any(f.startswith("SFTConfig(per_device_train_batch_size") for f in fields)
    kept = ("lora_rank", "lora_alpha", "lora_targets", "seq_len", "optim", "compute_dtype")
    assert not set(res.faster.changes) & set(kept)


def test_edits_keep_the_name_the_file_uses(tmp_path):
    d = sections(activation_checkpointing=False, per_device_train_batch_size=16)
    del d["prepare_model_for_kbit_training"]
    d["args"].pop("gradient_checkpointing")
    r, profile = read_file(write(tmp_path, "s.yaml", d))
    res = check(r, profile, api.get_gpu("rtx-4090"))
    fields = [e.field for o in res.to_fit for e in o.edits]
    assert "args.activation_checkpointing" in fields and "args.gradient_checkpointing" not in fields


def test_no_edit_fits_when_the_tool_cannot_express_what_it_takes():
    r, profile = read_file(FIX / "seed_trl.yaml")
    res = check(r, profile, api.get_gpu("4GB"))
    assert not res.fits and res.to_fit == ()


def test_auto_find_batch_size_halves_the_batch_after_ooms(tmp_path):
    r, profile = read_file(write(tmp_path, "s.yaml", sections(
        per_device_train_batch_size=16, gradient_accumulation_steps=1, auto_find_batch_size=True)))
    gpu = api.get_gpu("rtx-4090")
    res = check(r, profile, gpu)
    a = res.auto_batch
    assert not res.estimate.fits and a is not None and res.fits
    assert a.batch_size < 16 and 16 % a.batch_size == 0 and a.effective_batch == a.batch_size
    assert api.estimate(profile, gpu, r.config.with_(batch_size=a.batch_size)).fits
    assert not api.estimate(profile, gpu, r.config.with_(batch_size=a.batch_size * 2)).fits


# ---- export and the round trip -------------------------------------------------------
PLANS = [("llama-3.1-8b", "rtx-4090", 2048), ("llama-3.1-8b", "rtx-4060", 1024),
         ("qwen2.5-7b", "a100-80gb-sxm", 4096), ("llama-3.2-1b", "t4", 1024),
         ("phi-3.5-mini", "l4", 2048)]


@pytest.mark.parametrize("fmt", ["trl", "axolotl", "llama-factory"])
@pytest.mark.parametrize("model, gpu, seq", PLANS)
def test_check_of_an_exported_file_gives_its_estimate(tmp_path, monkeypatch, fmt, model, gpu, seq):
    profile, g = api.get_model(model), api.get_gpu(gpu)
    plan = api.suggest(profile, g, seq_len=seq)
    e = export(plan, fmt, profile=profile, gpu=g)
    path = tmp_path / e.filename
    path.write_text(e.text)
    if fmt != "trl" and plan.config.expandable_segments:  # the comment asks for it
        monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    r, p2 = read_file(path, trl_version="1.16.0")
    assert p2.name == profile.name and r.format == fmt
    assert r.config == e.config
    res = check(r, p2, g)
    assert res.estimate.memory.peak_bytes == e.peak_bytes
    differ = {f for f in TrainConfig.__dataclass_fields__
              if getattr(plan.config, f) != getattr(e.config, f)}
    assert differ <= {gap.setting for gap in e.gaps}  # every difference is commented
    for gap in e.gaps:
        assert gap.setting in e.text and f"{gap.delta_bytes / 2**30:+.2f} GiB" in e.text
    if not e.gaps:
        assert e.peak_bytes == e.plan_peak_bytes


@pytest.mark.parametrize("fmt", ["trl", "axolotl", "llama-factory"])
def test_plan_for_a_tool_uses_only_what_it_can_express(fmt):
    profile, g = api.get_model("llama-3.1-8b"), api.get_gpu("rtx-4070")
    plan = plan_for(fmt, profile, g, seq_len=1024)
    e = export(plan, fmt, profile=profile, gpu=g)
    assert e.config == plan.config and not e.gaps  # what the tool runs is the plan
    assert e.peak_bytes == plan.memory.peak_bytes <= g.memory_bytes


def test_exported_yaml_names_only_fields_of_the_tool():
    profile, g = api.get_model("llama-3.1-8b"), api.get_gpu("rtx-4060")
    plan = api.suggest(profile, g, seq_len=4096, fixed={"mlp_chunk": 1024, "recompute_norms": True})
    for fmt, known in (("axolotl", F.axolotl), ("llama-factory", F.llamafactory)):
        d = yaml.safe_load(export(plan, fmt, profile=profile, gpu=g).text)
        assert set(d) <= known, set(d) - known


def test_to_hf_kwargs_are_fields_of_the_objects():
    plan = api.suggest(api.get_model("llama-3.1-8b"), api.get_gpu("rtx-4090"))
    hf = plan.to_hf(apply_techniques=False)
    assert set(hf.quantization_config) <= F.BitsAndBytesConfig
    assert set(hf.lora) <= F.LoraConfig
    assert set(hf.training_args) <= F.TrainingArguments
    assert set(hf.sft) <= F.SFTConfig - F.TrainingArguments
    assert hf.model == "meta-llama/Llama-3.1-8B"
    # with qplan's techniques, the trainer must not checkpoint on its own (it would undo the
    # offload), and prepare_model_for_kbit_training is done by apply()
    hf2 = to_hf(plan)
    assert hf2.training_args["gradient_checkpointing"] is False
    assert hf2.prepare_model_for_kbit_training is None


def test_to_hf_sections_are_what_check_reads(tmp_path):
    profile, g = api.get_model("llama-3.1-8b"), api.get_gpu("rtx-4090")
    plan = api.make_plan(profile, g, TrainConfig(seq_len=2048, batch_size=2, grad_accum=8,
                                                 loss="standard", grad_ckpt=True), target=16)
    hf = plan.to_hf(apply_techniques=False)
    r = read_file(write(tmp_path, "hf.yaml", hf.to_dict()), trl_version="1.16.0")[0]
    assert plan.config.loss == "standard" and "loss" in hf.not_expressible
    assert r.config == plan.config.with_(loss="fused")  # trl 1.16's SFTTrainer chunks the loss


# ---- bad input --------------------------------------------------------------------------
def run(*args):
    return CliRunner().invoke(cli, list(args))


@pytest.mark.parametrize("content, match", [
    ("a: [", "not valid YAML"),
    ("- 1\n- 2\n", "expected a mapping"),
    ("foo: 1\n", "looks like no known format"),
    ("base_model: llama-3.1-8b\nadapter: qlora\nload_in_4bit: true\nlora_r: 8\nlora_alpha: 16\n"
     "lora_target_linear: true\nmicro_batch_size: two\n", "micro_batch_size must be an integer"),
    ("base_model: llama-3.1-8b\nadapter: qlora\nload_in_4bit: true\nlora_r: 8\nlora_alpha: 16\n"
     "lora_target_linear: true\noptimizer: lion_8bit\n", "optimizer 'lion_8bit' is not modelled"),
    ("base_model: llama-3.1-8b\nadapter: lora\nload_in_8bit: true\nlora_r: 8\nlora_alpha: 16\n",
     "8-bit"),
    ("model_name_or_path: llama-3.1-8b\nfinetuning_type: full\n", "full"),
    ("sequence_len: 2048\nmicro_batch_size: 1\nadapter: qlora\n", "no model named"),
    ("model: llama-3.1-8b\nargs: {bf16: false, fp16: false}\npeft_config: {r: 8}\n",
     "neither bf16 nor fp16"),
])
def test_bad_files_give_one_message_and_exit_2(tmp_path, content, match):
    p = write(tmp_path, "c.yaml", content)
    r = run("check", str(p), "--gpu", "rtx-4090")
    assert r.exit_code == 2, r.output
    assert match in r.output and "Traceback" not in r.output
    j = json.loads(run("check", str(p), "--gpu", "rtx-4090", "--json").stdout)
    assert j["error"]["exit_code"] == 2 and match in j["error"]["message"]


@pytest.mark.parametrize("args, match", [
    (["check", "missing.yaml", "--gpu", "rtx-4090"], "does not exist"),
    (["check", str(FIX / "seed_trl.yaml"), "--gpu", "rtx-4090", "--format", "toml"], "Invalid value"),
    (["export", "--format", "trl"], "give --plan"),
    (["export", "--plan", "nope.yaml", "--format", "trl"], "does not exist"),
    (["export", "--model", "llama-3.1-8b", "--gpu", "rtx-4090", "--format", "deepspeed"],
     "Invalid value"),
])
def test_bad_flags_exit_2(args, match):
    r = run(*args)
    assert r.exit_code == 2 and match in r.output and "Traceback" not in r.output


def test_exit_codes_follow_estimate():
    assert run("check", str(FIX / "seed_trl.yaml"), "--gpu", "rtx-4090").exit_code == 0
    r = run("check", str(FIX / "seed_trl.yaml"), "--gpu", "rtx-4060")
    assert r.exit_code == 3 and "No edit of seed_trl.yaml makes it fit" in r.output


def test_export_writes_a_file_and_reports_the_gaps(tmp_path):
    save = tmp_path / "plan.yaml"
    profile, g = api.get_model("llama-3.1-8b"), api.get_gpu("rtx-4060")
    cfg = TrainConfig(seq_len=1024, batch_size=1, grad_accum=16, loss="fused", embed_on_cpu=True)
    save_plan(api.make_plan(profile, g, cfg, target=16), save)
    out = tmp_path / "train_trl.py"
    r = run("export", "--plan", str(save), "--format", "trl", "-o", str(out))
    assert r.exit_code == 0, r.output
    assert "not expressible: embed_on_cpu" in r.output and out.is_file()
    compile(out.read_text(), str(out), "exec")
    j = json.loads(run("check", str(out), "--gpu", "rtx-4060", "--json").stdout)
    assert any(s.startswith("trl ") for s in j["semantics"])


# ---- the field lists are those of the installed packages -----------------------------------
def test_field_lists_match_the_installed_trl_transformers_peft():
    import dataclasses
    import importlib.metadata as md
    import inspect

    if md.version("trl") != F.VERSIONS["trl"] or md.version("transformers") != F.VERSIONS["transformers"]:
        pytest.skip(f"fields were read from trl {F.VERSIONS['trl']} / transformers "
                    f"{F.VERSIONS['transformers']}; regenerate with tools/ecosystem_fields.py")
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig, TrainingArguments
    from trl import ModelConfig, SFTConfig

    def names(c):
        return {f.name for f in dataclasses.fields(c) if f.init}
    assert names(SFTConfig) == F.SFTConfig and names(TrainingArguments) == F.TrainingArguments
    assert names(ModelConfig) == F.ModelConfig
    if md.version("peft") == F.VERSIONS["peft"]:
        assert names(LoraConfig) == F.LoraConfig
    assert set(inspect.signature(BitsAndBytesConfig.__init__).parameters) - {"self", "kwargs"} \
        == F.BitsAndBytesConfig


def test_sniff_tells_the_formats_apart():
    assert sniff(FIX / "axolotl_qlora.yaml")[0] == "axolotl"
    assert sniff(FIX / "llamafactory_qlora.yaml")[0] == "llama-factory"
    assert sniff(FIX / "trl_cli.yaml")[:2] == ("trl", "cli")
    assert sniff(FIX / "seed_trl.yaml")[:2] == ("trl", "sections")
    assert sniff(FIX / "seed_trl.py")[:2] == ("trl", "script")
    with pytest.raises(BadInputError, match="not as axolotl"):
        sniff(FIX / "seed_trl.py", "axolotl")


def test_not_modelled_settings_say_what_is(tmp_path):
    d = sections()
    d["quantization_config"] = {"load_in_8bit": True}
    with pytest.raises(NotModelledError, match="load_in_4bit"):
        read_file(write(tmp_path, "s.yaml", d))


# ---- help ---------------------------------------------------------------------------------
@pytest.mark.parametrize("cmd", ["check", "export", "plot"])
def test_help_ends_with_examples_that_run(cmd, tmp_path, monkeypatch):
    import shutil

    out = run(cmd, "--help").output
    tail = out[out.index("Examples:"):]
    lines = [ln.strip() for ln in tail.splitlines()[1:] if ln.strip()]
    assert lines and all(ln.startswith("qplan ") for ln in lines), tail
    monkeypatch.chdir(tmp_path)
    for src, name in (("seed_trl.py", "train.py"), ("trl_cli.yaml", "sft.yaml"),
                      ("axolotl_qlora.yaml", "axolotl.yaml"),
                      ("llamafactory_qlora.yaml", "llamafactory.yaml")):
        shutil.copy(FIX / src, tmp_path / name)
    save_plan(api.suggest(api.get_model("llama-3.1-8b"), api.get_gpu("rtx-4090")), tmp_path / "plan.yaml")
    for ln in lines:
        r = run(*ln.split()[1:])
        assert r.exit_code in (0, 3), (ln, r.output)
