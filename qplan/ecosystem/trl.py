"""trl (and plain transformers ``Trainer``) configurations: read, model, write.

Three layouts are read, all into one canonical mapping of *sections*, named after the
arguments of the objects a trl script builds::

    trainer: SFTTrainer                  # or Trainer (transformers), whose loss is not chunked
    model: meta-llama/Llama-3.1-8B
    from_pretrained: {dtype: bfloat16, attn_implementation: sdpa}   # model loading kwargs
    quantization_config: {load_in_4bit: true, bnb_4bit_quant_type: nf4, ...}  # BitsAndBytesConfig
    prepare_model_for_kbit_training: {use_gradient_checkpointing: true}        # or absent
    peft_config: {r: 16, lora_alpha: 32, lora_dropout: 0.0, target_modules: all-linear}
    args: {per_device_train_batch_size: 1, max_length: 2048, optim: paged_adamw_8bit, ...}
    env: {PYTORCH_CUDA_ALLOC_CONF: "expandable_segments:True"}

* ``sections``: that mapping, as YAML or JSON (what :func:`qplan.ecosystem.to_hf` returns);
* ``cli``: the flat YAML that ``trl sft --config FILE`` reads (fields of trl's SFTConfig,
  ModelConfig, ScriptArguments and DatasetMixtureConfig), read with trl's own defaults
  (ModelConfig: ``dtype: float32``, ``lora_r: 16``, ``lora_dropout: 0.05``, ...);
* ``script``: a Python training script, read without running it: the literal keyword
  arguments of its ``BitsAndBytesConfig(...)``, ``LoraConfig(...)``, ``SFTConfig(...)`` /
  ``TrainingArguments(...)``, ``prepare_model_for_kbit_training(...)``,
  ``AutoModelForCausalLM.from_pretrained(...)`` and ``SFTTrainer(...)`` / ``Trainer(...)``
  calls, and ``os.environ[...] = ...`` assignments.

How trl's behaviour is modelled (read from trl 1.16's ``SFTTrainer``):

* loss: since trl 1.7 ``SFTTrainer`` computes ``nll`` (and ``dft``) through a fused LM head
  that never holds the full float32 logits: qplan's ``fused`` loss. Before 1.7, and with
  transformers' ``Trainer``, the loss is the model's own (``standard``) unless
  ``use_liger_kernel`` fuses it. ``label_smoothing_factor`` > 0 needs the full logits again.
* preparation: ``prepare_model_for_kbit_training`` casts every non-4-bit weight to float32
  (``kbit``); without it the weights stay in the loading dtype: float32 (``SFTTrainer``
  loading a model by name, and trl's CLI, default to float32) is modelled as ``kbit``,
  16-bit as ``lean``.
* packing: trl packs best-fit-decreasing without padding between examples (positions restart
  per example): ``packed_rows``. Without packing, batches are padded to their longest
  example: the estimate is that of a batch of ``max_length`` examples (the worst step).
* ``activation_offloading``: every saved activation goes to CPU memory; modelled as qplan's
  offload of the checkpointed block inputs. ``use_liger_kernel``: Liger's RMSNorm keeps its
  input and one scale per token (qplan's lean norms).
* ``auto_find_batch_size``: on an out-of-memory error transformers halves
  ``per_device_train_batch_size`` (the accumulation stays, so the effective batch shrinks).
"""
from __future__ import annotations

import ast
import copy
from typing import Any

from qplan.ecosystem import fields_data as F
from qplan.ecosystem.base import (Reading, dropout, optimizer, positive_int, truthy,
                                  unknown_fields, want)
from qplan.errors import ConfigError, NotModelledError
from qplan.planner.config import TrainConfig
from qplan.profiles.models import ModelProfile

# The trl release whose SFTTrainer is modelled when neither the file nor --trl-version
# says, and trl is not installed here.
NEWEST_MODELLED = "1.16.0"
# trl's default SFT loss has been chunked (a fused LM head) since this release.
CHUNKED_SINCE = (1, 7)
SECTIONS = ("trainer", "model", "from_pretrained", "quantization_config",
            "prepare_model_for_kbit_training", "peft_config", "args", "env", "trl_version")
TRAINERS = ("SFTTrainer", "Trainer")
ALLOC_ENV = "PYTORCH_CUDA_ALLOC_CONF"
DTYPES = {"bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16", "half": "fp16",
          "float32": "fp32", "float": "fp32", "fp32": "fp32", "auto": "auto"}
# ModelConfig (trl's CLI) fields and where they go in the sections.
CLI_MODEL_FIELDS = {
    "lora_r": ("peft_config", "r"), "lora_alpha": ("peft_config", "lora_alpha"),
    "lora_dropout": ("peft_config", "lora_dropout"),
    "lora_target_modules": ("peft_config", "target_modules"),
    "lora_modules_to_save": ("peft_config", "modules_to_save"),
    "use_rslora": ("peft_config", "use_rslora"), "use_dora": ("peft_config", "use_dora"),
    "bnb_4bit_quant_type": ("quantization_config", "bnb_4bit_quant_type"),
    "use_bnb_nested_quant": ("quantization_config", "bnb_4bit_use_double_quant"),
    "dtype": ("from_pretrained", "dtype"),
    "attn_implementation": ("from_pretrained", "attn_implementation"),
    "model_name_or_path": ("model",),
}
# ModelConfig's defaults (trl 1.16), which the CLI layout starts from.
CLI_DEFAULTS = {"dtype": "float32", "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
                "bnb_4bit_quant_type": "nf4", "use_bnb_nested_quant": False}


# ---------------------------------------------------------------------------
# detection and layouts
def layout_of(data: dict[str, Any]) -> str | None:
    """``sections`` or ``cli`` when ``data`` is a trl config, else None."""
    if set(data) & {"args", "peft_config", "quantization_config", "from_pretrained",
                    "prepare_model_for_kbit_training"} and set(data) <= set(SECTIONS) | {"qplan"}:
        return "sections"
    trl_only = (F.SFTConfig - F.TrainingArguments) | F.ModelConfig | F.ScriptArguments
    keys = set(data)
    if keys & trl_only or (keys & F.SFTConfig and "model_name_or_path" in keys):
        return "cli"
    return None


def detect(data: dict[str, Any]) -> bool:
    return layout_of(data) is not None


def cli_to_sections(data: dict[str, Any]) -> dict[str, Any]:
    """trl's CLI YAML (``trl sft --config``) as sections, the way ``trl/scripts/sft.py``
    builds its objects: the model loaded by SFTTrainer with ModelConfig's dtype and
    attention, ``get_quantization_config`` and ``get_peft_config``."""
    d = {**CLI_DEFAULTS, **data}
    s: dict[str, Any] = {"trainer": "SFTTrainer", "model": d.get("model_name_or_path"),
                         "from_pretrained": {"dtype": d["dtype"]}, "args": {}, "env": {}}
    if d.get("attn_implementation") is not None:
        s["from_pretrained"]["attn_implementation"] = d["attn_implementation"]
    for k, v in (d.get("model_init_kwargs") or {}).items():
        s["from_pretrained"][k] = v
    if d.get("load_in_8bit"):
        s["quantization_config"] = {"load_in_8bit": True}
    elif d.get("load_in_4bit"):
        s["quantization_config"] = {"load_in_4bit": True,
                                    "bnb_4bit_compute_dtype": d["dtype"],
                                    "bnb_4bit_quant_type": d["bnb_4bit_quant_type"],
                                    "bnb_4bit_use_double_quant": d["use_bnb_nested_quant"]}
    if d.get("use_peft"):
        s["peft_config"] = {"r": d["lora_r"], "lora_alpha": d["lora_alpha"],
                            "lora_dropout": d["lora_dropout"],
                            "target_modules": d.get("lora_target_modules"),
                            "use_dora": d.get("use_dora", False)}
    for k, v in data.items():
        if k in F.SFTConfig and k != "model_init_kwargs":
            s["args"][k] = v
    if isinstance(data.get("env"), dict):
        s["env"] = dict(data["env"])
    return s


def cli_name(path: tuple[str, ...]) -> str:
    """The CLI layout's field for a section path."""
    for name, p in CLI_MODEL_FIELDS.items():
        if p == path:
            return name
    if path[0] == "args":
        return path[1]
    if path[0] == "env":
        return f"env.{path[1]}"
    if path[0] == "quantization_config":
        return "load_in_4bit"
    if path[0] == "peft_config":
        return "use_peft"
    return ".".join(path)


def field_name(path: tuple[str, ...], layout: str) -> str:
    """How a file of ``layout`` spells the field at ``path``."""
    if layout == "cli":
        return cli_name(path)
    if layout == "script":
        calls = {"quantization_config": "BitsAndBytesConfig", "peft_config": "LoraConfig",
                 "args": "SFTConfig", "from_pretrained": "from_pretrained",
                 "prepare_model_for_kbit_training": "prepare_model_for_kbit_training"}
        if path[0] == "env":
            return f'os.environ["{path[1]}"]'
        if path[0] in calls:
            return f"{calls[path[0]]}({path[1]}=...)" if len(path) > 1 else f"{calls[path[0]]}(...)"
        return ".".join(path)
    return ".".join(path)


# ---------------------------------------------------------------------------
# scripts, read without running them
# Keyword arguments that change memory: a script must give them as literals.
MEMORY_ARGS = frozenset({
    "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "max_seq_length",
    "gradient_checkpointing", "activation_checkpointing", "gradient_checkpointing_kwargs",
    "activation_checkpointing_kwargs", "optim", "bf16", "fp16", "packing", "padding_free",
    "activation_offloading", "use_liger_kernel", "liger_kernel_config", "loss_type",
    "label_smoothing_factor", "auto_find_batch_size", "r", "lora_alpha", "lora_dropout",
    "target_modules", "use_dora", "load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type",
    "bnb_4bit_use_double_quant", "dtype", "torch_dtype", "attn_implementation",
    "use_gradient_checkpointing", "model_init_kwargs"})
class _ScriptReader(ast.NodeVisitor):
    CALLS = {"BitsAndBytesConfig": "quantization_config", "LoraConfig": "peft_config",
             "SFTConfig": "args", "TrainingArguments": "args",
             "prepare_model_for_kbit_training": "prepare_model_for_kbit_training",
             "SFTTrainer": "trainer", "Trainer": "trainer"}

    def __init__(self, source: str):
        self.source = source
        self.consts: dict[str, Any] = {}
        self.found: dict[str, tuple[str, dict[str, Any], int]] = {}
        self.model: Any = None
        self.env: dict[str, str] = {}
        self.skipped: list[str] = []
        self.unreadable: list[str] = []  # memory settings that are not literals

    def value(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                node.value.id == "torch":
            return node.attr  # torch.bfloat16 -> "bfloat16"
        if isinstance(node, ast.Name) and node.id in self.consts:
            return self.consts[node.id]
        return ast.literal_eval(node)

    def call_name(self, node: ast.Call) -> str | None:
        f = node.func
        if isinstance(f, ast.Name):
            return f.id
        if isinstance(f, ast.Attribute):
            if f.attr == "from_pretrained":
                owner = f.value.id if isinstance(f.value, ast.Name) else ""
                return "from_pretrained" if ("ForCausalLM" in owner or owner.startswith("AutoModel")) else None
            return f.attr
        return None

    def kwargs(self, node: ast.Call, name: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for kw in node.keywords:
            try:
                v = self.value(kw.value)
            except (ValueError, TypeError, SyntaxError, RecursionError):
                if kw.arg is None:
                    self.skipped.append(f"{name}(**{ast.unparse(kw.value)}): not a literal; not read")
                elif kw.arg in MEMORY_ARGS:
                    self.unreadable.append(f"{name}({kw.arg}={ast.unparse(kw.value)})")
                continue
            if kw.arg is None:
                if isinstance(v, dict):
                    out.update(v)
                continue
            out[kw.arg] = v
        return out

    def visit_Module(self, node: ast.Module) -> None:
        for stmt in node.body:  # module-level constants: NAME = literal
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and \
                    isinstance(stmt.targets[0], ast.Name):
                try:
                    self.consts[stmt.targets[0].id] = self.value(stmt.value)
                except (ValueError, TypeError, SyntaxError, RecursionError):
                    pass
        self.generic_visit(node)

    def visit_Assign(self, node: ast.Assign) -> None:
        t = node.targets[0] if len(node.targets) == 1 else None
        if isinstance(t, ast.Subscript) and ast.unparse(t.value) == "os.environ":
            try:
                self.env[str(self.value(t.slice))] = str(self.value(node.value))
            except (ValueError, TypeError, SyntaxError):
                pass
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        name = self.call_name(node)
        if name == "setdefault" and isinstance(node.func, ast.Attribute) and \
                ast.unparse(node.func.value) == "os.environ" and len(node.args) == 2:
            try:
                self.env.setdefault(str(self.value(node.args[0])), str(self.value(node.args[1])))
            except (ValueError, TypeError, SyntaxError):
                pass
        elif name == "from_pretrained":
            kw = self.kwargs(node, "from_pretrained")
            if node.args:
                try:
                    self.model = self.value(node.args[0])
                except (ValueError, TypeError, SyntaxError):
                    self.skipped.append(f"from_pretrained({ast.unparse(node.args[0])}, ...): the "
                                        "model is not a literal; give --model")
            kw.pop("pretrained_model_name_or_path", None)
            self._put("from_pretrained", name, kw, node.lineno)
        elif name in self.CALLS:
            section = self.CALLS[name]
            kw = self.kwargs(node, name)
            if section == "trainer":
                if isinstance(kw.get("model"), str):
                    self.model = kw["model"]
                kw = {"trainer": name}
            self._put(section, name, kw, node.lineno)
        self.generic_visit(node)

    def _put(self, section: str, name: str, kw: dict, line: int) -> None:
        if section in self.found:
            prev = self.found[section]
            raise ConfigError(f"{self.source}: {prev[0]}(...) is called twice (lines {prev[2]} and "
                              f"{line}); qplan reads a script with one of each")
        self.found[section] = (name, kw, line)


def script_to_sections(text: str, source: str) -> tuple[dict[str, Any], list[str]]:
    """The sections of a training script (no code is run) and what could not be read."""
    try:
        tree = ast.parse(text, filename=source)
    except SyntaxError as e:
        raise ConfigError(f"{source}:{e.lineno}: not valid Python ({e.msg})") from None
    r = _ScriptReader(source)
    r.visit(tree)
    if r.unreadable:
        raise ConfigError(f"{source}: qplan reads scripts without running them, and these "
                          f"settings are not literal values: {', '.join(r.unreadable)}; write "
                          "the values in the script (or check a YAML config instead)")
    if "args" not in r.found and "trainer" not in r.found:
        raise ConfigError(f"{source}: no SFTConfig(...), TrainingArguments(...), SFTTrainer(...) "
                          "or Trainer(...) call found; qplan check reads trl/transformers "
                          "training scripts, or YAML/JSON configs")
    s: dict[str, Any] = {"env": dict(r.env)}
    for section, (name, kw, _line) in r.found.items():
        if section == "trainer":
            s["trainer"] = kw["trainer"]
        elif section == "args":
            s["args"] = kw
            s.setdefault("trainer", "SFTTrainer" if name == "SFTConfig" else "Trainer")
        else:
            s[section] = kw
    s.setdefault("args", {})
    s["model"] = r.model
    if "from_pretrained" not in s and isinstance(r.model, str):
        # SFTTrainer(model="name") loads the model itself with args.model_init_kwargs
        s["from_pretrained"] = dict(s["args"].get("model_init_kwargs") or {})
        s["from_pretrained"].setdefault("dtype", "float32")
        s["_loaded_by_trainer"] = True
    return s, r.skipped


# ---------------------------------------------------------------------------
# versions
def installed_trl() -> str | None:
    import importlib.metadata as md

    try:
        return md.version("trl")
    except md.PackageNotFoundError:
        return None


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in str(v).split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


# ---------------------------------------------------------------------------
# reading: sections -> TrainConfig
def model_of(sections: dict[str, Any]) -> str | None:
    m = sections.get("model")
    return m if isinstance(m, str) and m.strip() else None


def _dtype(value: Any, what: str, source: str) -> str:
    if value is None:
        return "auto"
    name = str(value).removeprefix("torch.")
    if name not in DTYPES:
        raise ConfigError(f"{source}: {what} {value!r} is not a dtype; use bfloat16, float16, "
                          "float32 or auto")
    return DTYPES[name]


def _targets(value: Any, profile: ModelProfile, source: str, what: str) -> tuple[str, ...] | None:
    if value is None:
        # peft's default for the architecture (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)
        if profile.fused_projections:
            raise ConfigError(f"{source}: {what} is not set and peft has no default targets for "
                              f"{profile.model_type}; set it (e.g. all-linear)")
        return ("q", "v")
    if isinstance(value, str):
        if value in ("all-linear", "all"):
            return None
        value = [value]
    want(value, list, what, source)
    names = profile.target_names
    mods = [str(x) for x in value]
    if set(mods) >= set(names.values()) or set(mods) >= set(names):
        return None
    return profile.resolve_targets(tuple(mods))


def read(sections: dict[str, Any], profile: ModelProfile, *, source: str, layout: str,
         trl_version: str | None = None, raw: dict[str, Any] | None = None,
         skipped: list[str] | None = None, seq_len: int | None = None) -> Reading:
    """What ``sections`` make trl (or transformers) do, as one TrainConfig."""
    s = sections
    sem: list[str] = []
    unmodelled: list[str] = list(skipped or [])
    raw = raw if raw is not None else s
    trainer = s.get("trainer") or "SFTTrainer"
    if trainer not in TRAINERS:
        raise ConfigError(f"{source}: trainer {trainer!r} is not one of {', '.join(TRAINERS)}")
    for sec in ("from_pretrained", "quantization_config", "peft_config", "args", "env"):
        if s.get(sec) is not None:
            want(s[sec], dict, sec, source)
    args = dict(s.get("args") or {})
    fp = dict(s.get("from_pretrained") or {})
    q = s.get("quantization_config")
    peft = s.get("peft_config")
    env = dict(s.get("env") or {})
    prep = s.get("prepare_model_for_kbit_training")
    if prep is True:
        prep = {}
    elif prep is False:
        prep = None
    if prep is not None:
        want(prep, dict, "prepare_model_for_kbit_training", source)

    # field names
    known = F.SFTConfig if trainer == "SFTTrainer" else F.TrainingArguments
    where = (f"trl {F.VERSIONS['trl']}'s SFTConfig" if trainer == "SFTTrainer" else
             f"transformers {F.VERSIONS['transformers']}'s TrainingArguments")
    if layout == "cli":
        unmodelled += unknown_fields(raw, F.SFTConfig | F.ModelConfig | F.ScriptArguments | {"env"},
                                     f"trl {F.VERSIONS['trl']}'s CLI config (SFTConfig, ModelConfig, "
                                     "ScriptArguments)")
    else:
        unmodelled += unknown_fields(args, known, where)
        if q is not None:
            unmodelled += unknown_fields(q, F.BitsAndBytesConfig, "BitsAndBytesConfig")
        if peft is not None:
            unmodelled += unknown_fields(peft, F.LoraConfig, "peft's LoraConfig")
        if layout == "sections":
            unmodelled += unknown_fields(raw, set(SECTIONS) | {"qplan"}, "a trl sections config")

    # version
    version = trl_version or s.get("trl_version")
    if version is None:
        version = installed_trl()
        if version is None:
            version = NEWEST_MODELLED
            sem.append(f"trl is not installed here: trl {NEWEST_MODELLED}'s SFTTrainer is modelled "
                       "(give --trl-version for another)")
    version = str(version)
    chunked = trainer == "SFTTrainer" and _version_tuple(version) >= CHUNKED_SINCE

    cfg: dict[str, Any] = {}
    fields: dict[str, tuple[str, ...] | None] = {}

    # sequence, batch
    seq_key = "max_length" if "max_length" in args or "max_seq_length" not in args else "max_seq_length"
    packing_on = trainer == "SFTTrainer" and truthy(args.get("packing", False), "packing", source)
    padding_free = (trainer == "SFTTrainer" and not packing_on
                    and truthy(args.get("padding_free", False), "padding_free", source))
    if padding_free:
        # trl: "When padding_free=True without packing, max_length is not enforced": it refuses
        # any max_length but null, and the longest example sets the row
        if args.get(seq_key, 1024) is not None:
            raise ConfigError(f"{source}: padding_free without packing needs max_length: null "
                              "(trl refuses any other value, max_length defaults to 1024); set "
                              "it, or turn packing on")
        if seq_len is None:
            raise ConfigError(f"{source}: padding_free without packing has no max_length: give "
                              "--seq N, the longest tokenized example")
        cfg["seq_len"] = seq_len
        sem.append(f"padding_free: each micro-batch is one row of its examples with positions "
                   f"restarting; modelled as rows of {seq_len} tokens (--seq) with a packed mask")
    elif trainer == "SFTTrainer":
        seq = args.get(seq_key, 1024)
        if seq is None and seq_len is None:
            raise ConfigError(f"{source}: {seq_key} is null (no truncation): qplan needs the "
                              "longest sequence a step can hold; set max_length, or give --seq N")
        cfg["seq_len"] = positive_int(seq if seq is not None else seq_len, seq_key, source)
        if seq_key == "max_seq_length":
            sem.append("max_seq_length is the name older trl releases used for max_length")
    else:
        seq = args.get("max_length") or args.get("max_seq_length") or seq_len
        if seq is None:
            raise ConfigError(f"{source}: a transformers Trainer config has no sequence length; "
                              "give it with --seq N (the longest tokenized example)")
        cfg["seq_len"] = positive_int(seq, "max_length", source)
    fields["seq_len"] = ("args", "max_length")
    cfg["batch_size"] = positive_int(args.get("per_device_train_batch_size", 8),
                                     "per_device_train_batch_size", source)
    fields["batch_size"] = ("args", "per_device_train_batch_size")
    cfg["grad_accum"] = positive_int(args.get("gradient_accumulation_steps", 1),
                                     "gradient_accumulation_steps", source)
    fields["grad_accum"] = ("args", "gradient_accumulation_steps")
    auto_batch = truthy(args.get("auto_find_batch_size", False), "auto_find_batch_size", source)

    # precision
    bf16 = args.get("bf16")
    fp16 = truthy(args.get("fp16", False), "fp16", source)
    if bf16 is None:
        bf16 = trainer == "SFTTrainer" and not fp16  # trl: bf16 unless fp16
    bf16 = truthy(bf16, "bf16", source)
    if bf16 and fp16:
        raise ConfigError(f"{source}: bf16 and fp16 are both true; choose one")
    if not (bf16 or fp16):
        raise NotModelledError(f"{source}: neither bf16 nor fp16 is set, so training runs in "
                               "float32 without autocast, which qplan does not model; set "
                               "bf16: true (or fp16: true on cards older than Ampere)")
    cfg["compute_dtype"] = "bf16" if bf16 else "fp16"
    fields["compute_dtype"] = ("args", "bf16")

    # quantization
    if q is None or not (q.get("load_in_4bit") or q.get("load_in_8bit")):
        cfg["quant"] = "none"
        cfg["double_quant"] = False
    elif q.get("load_in_8bit"):
        raise NotModelledError(f"{source}: 8-bit bitsandbytes quantization (load_in_8bit) is not "
                               "modelled; qplan models 4-bit QLoRA (load_in_4bit) and plain LoRA")
    else:
        qt = q.get("bnb_4bit_quant_type", "fp4")
        if qt not in ("nf4", "fp4"):
            raise ConfigError(f"{source}: bnb_4bit_quant_type {qt!r} is not nf4 or fp4")
        cfg["quant"] = qt
        cfg["double_quant"] = truthy(q.get("bnb_4bit_use_double_quant", False),
                                     "bnb_4bit_use_double_quant", source)
        if "bnb_4bit_quant_type" not in q:
            sem.append("bnb_4bit_quant_type is not set: BitsAndBytesConfig's default is fp4")
    fields["quant"] = ("quantization_config", "bnb_4bit_quant_type")
    fields["double_quant"] = ("quantization_config", "bnb_4bit_use_double_quant")

    # preparation: float32 non-4-bit weights, or 16-bit ones
    load_dtype = _dtype(fp.get("dtype", fp.get("torch_dtype", "auto")), "dtype", source)
    if prep is not None:
        if cfg["quant"] == "none":
            sem.append("prepare_model_for_kbit_training on an unquantized model only freezes it")
        cfg["prepare"] = "kbit"
        sem.append("prepare_model_for_kbit_training: every non-4-bit weight in float32 (kbit)")
    elif load_dtype == "fp32":
        if cfg["quant"] == "none":
            raise NotModelledError(f"{source}: an unquantized model loaded in float32 is not "
                                   "modelled (qplan's plain LoRA keeps 16-bit weights); load it "
                                   "with dtype: bfloat16")
        cfg["prepare"] = "kbit"
        how = ("SFTTrainer loads a model given by name in float32 unless model_init_kwargs sets "
               "dtype" if s.get("_loaded_by_trainer") else "dtype float32")
        sem.append(f"{how}: embeddings, lm_head and norms in float32, as kbit preparation")
    else:
        cfg["prepare"] = "lean"
    fields["prepare"] = ("prepare_model_for_kbit_training",)

    # LoRA
    if peft is None:
        if layout == "cli":
            raise NotModelledError(f"{source}: use_peft is not true: full fine-tuning is not "
                                   "modelled; set use_peft: true (LoRA) or load_in_4bit: true too "
                                   "(QLoRA)")
        raise NotModelledError(f"{source}: no LoraConfig (peft_config): full fine-tuning is not "
                               "modelled; qplan models LoRA and QLoRA")
    cfg["lora_rank"] = positive_int(peft.get("r", 8), "r", source)
    cfg["lora_alpha"] = positive_int(peft.get("lora_alpha", 8), "lora_alpha", source)
    cfg["lora_dropout"] = dropout(peft.get("lora_dropout", 0.0), "lora_dropout", source)
    cfg["lora_targets"] = _targets(peft.get("target_modules"), profile, source, "target_modules")
    if peft.get("target_modules") is None:
        sem.append("target_modules is not set: peft's default for "
                   f"{profile.model_type} ({', '.join(profile.target_names[t] for t in ('q', 'v'))})")
    for k in ("r", "lora_alpha", "lora_dropout", "target_modules"):
        fields[{"r": "lora_rank", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
                "target_modules": "lora_targets"}[k]] = ("peft_config", k)
    if peft.get("use_dora"):
        unmodelled.append("use_dora: DoRA's magnitude vectors and extra activations are not "
                          "modelled (the estimate is low)")
    if trainer == "SFTTrainer" and cfg["quant"] != "none":
        from qplan.planner.memory import lora_param_count

        n = lora_param_count(profile, TrainConfig(lora_rank=cfg["lora_rank"],
                                                  lora_targets=cfg["lora_targets"]))
        unmodelled.append(f"SFTTrainer casts the LoRA weights of a quantized model to bfloat16: "
                          f"LoRA weights and gradients take {4 * n / 2**30:.2f} GiB less than "
                          "modelled (float32)")
    if peft.get("modules_to_save"):
        unmodelled.append("modules_to_save: fully trained copies of those modules are not "
                          "modelled (the estimate is low)")

    # checkpointing
    # transformers 5.2x renamed gradient_checkpointing(_kwargs) to activation_checkpointing(_kwargs)
    ck_name = "activation_checkpointing" if args.get("activation_checkpointing") is not None \
        else "gradient_checkpointing"
    ckpt = args.get(ck_name)
    ckpt = truthy(trainer == "SFTTrainer" if ckpt is None else ckpt, ck_name, source)
    if prep is not None and prep.get("use_gradient_checkpointing", True) and not ckpt:
        ckpt = True
        sem.append("prepare_model_for_kbit_training enables gradient checkpointing "
                   "(use_gradient_checkpointing defaults to true)")
    cfg["grad_ckpt"] = ckpt
    fields["grad_ckpt"] = ("args", "gradient_checkpointing")
    gk_name = "activation_checkpointing_kwargs" if args.get("activation_checkpointing_kwargs") \
        else "gradient_checkpointing_kwargs"
    gk = args.get(gk_name) or {}
    if isinstance(gk, dict) and int(gk.get("every_n_layers", 1) or 1) > 1:
        unmodelled.append(f"{gk_name}.every_n_layers {gk['every_n_layers']}: the layers left "
                          "uncheckpointed keep their activations (not modelled: the estimate is low)")
    ckpt_offload = isinstance(gk, dict) and bool(gk.get("offload")) and ckpt

    cfg["optim"] = optimizer(args.get("optim", "adamw_torch_fused"), "optim", source, sem)
    fields["optim"] = ("args", "optim")

    # attention
    attn = fp.get("attn_implementation") or "sdpa"
    want(attn, str, "attn_implementation", source)
    if attn.startswith("flash_attention") or "flash-attn" in attn:
        if attn != "flash_attention_2":
            sem.append(f"attn_implementation {attn}: modelled as flash_attention_2")
        attn = "flash_attention_2"
    elif attn not in ("sdpa", "eager"):
        raise NotModelledError(f"{source}: attn_implementation {attn!r} is not modelled; "
                               "modelled: sdpa, flash_attention_2, eager")
    cfg["attn"] = attn
    fields["attn"] = ("from_pretrained", "attn_implementation")

    # Liger, loss
    liger = truthy(args.get("use_liger_kernel", False), "use_liger_kernel", source)
    lk = args.get("liger_kernel_config") or {}
    cfg["recompute_norms"] = liger and lk.get("rms_norm", True) is not False
    fields["recompute_norms"] = ("args", "use_liger_kernel")
    if liger:
        sem.append("use_liger_kernel: Liger's RMSNorm keeps its input and one scale per token "
                   "(lean norms); its SwiGLU and RoPE kernels are not modelled")
    smoothing = float(args.get("label_smoothing_factor", 0) or 0)
    loss_type = args.get("loss_type", "nll")
    if trainer == "SFTTrainer" and loss_type not in ("nll", "dft", "chunked_nll"):
        raise ConfigError(f"{source}: loss_type {loss_type!r} is not one of nll, dft, chunked_nll")
    if chunked and smoothing == 0:
        cfg["loss"] = "fused"
        sem.append(f"trl {version}: SFTTrainer's loss ({loss_type}) is computed in chunks by a "
                   "fused LM head, never holding the float32 logits: loss fused")
    elif chunked:
        cfg["loss"] = "standard"
        sem.append(f"label_smoothing_factor {smoothing:g}: trl {version} computes this loss from "
                   "the full logits: loss standard")
    elif liger and lk.get("fused_linear_cross_entropy", True) is not False:
        cfg["loss"] = "fused"
        sem.append("use_liger_kernel: Liger's fused linear cross-entropy: loss fused")
    elif trainer == "SFTTrainer" and loss_type == "chunked_nll":
        cfg["loss"] = "fused"
    else:
        cfg["loss"] = "standard"
        sem.append(("transformers' Trainer" if trainer == "Trainer" else f"trl {version}")
                   + ": the model's own cross-entropy over the full logits: loss standard")
    fields["loss"] = ("args", "use_liger_kernel") if not chunked else None

    # packing, offloading, environment
    packing = packing_on
    cfg["packed_rows"] = packing or padding_free
    fields["packed_rows"] = ("args", "packing") if trainer == "SFTTrainer" else None
    if packing:
        strategy = args.get("packing_strategy", "bfd")
        sem.append(f"packing ({strategy}): examples share rows with positions restarting"
                   + (", flattened into one row per micro-batch (padding-free)"
                      if strategy in ("bfd", "bfd_split") else ""))
        if cfg["batch_size"] > 1 and attn != "flash_attention_2" and strategy in ("bfd", "bfd_split"):
            b, L = cfg["batch_size"], cfg["seq_len"]
            extra = (b * L) ** 2 - b * L * L
            if extra >= 2**27:
                unmodelled.append(f"padding-free packing with {attn}: the micro-batch is one row of "
                                  f"{b * L} tokens, so its attention mask is {extra / 2**30:.2f} "
                                  "GiB larger than modelled (per-row masks)")
    elif trainer == "SFTTrainer" and not padding_free:
        sem.append("no packing: batches are padded to their longest example; the estimate is a "
                   f"batch of {cfg['seq_len']}-token examples (the largest step)")
    off = truthy(args.get("activation_offloading", False), "activation_offloading", source) \
        if trainer == "SFTTrainer" else False
    if ckpt_offload:
        sem.append(f"{gk_name}.offload: the checkpointed activations wait in pinned host memory")
    cfg["offload_activations"] = (off or ckpt_offload) and cfg["grad_ckpt"]
    fields["offload_activations"] = ("args", "activation_offloading") if trainer == "SFTTrainer" else None
    if off:
        sem.append("activation_offloading: saved activations wait in CPU memory; modelled as "
                   "qplan's offload of the checkpointed block inputs")
    alloc = env.get(ALLOC_ENV)
    cfg["expandable_segments"] = "expandable_segments:true" in str(alloc or "").replace(" ", "").lower()
    fields["expandable_segments"] = ("env", ALLOC_ENV)
    if alloc is None:
        sem.append(f"{ALLOC_ENV} is not set in the file: PyTorch's default allocator "
                   "(no expandable segments)")
    for f in ("mlp_chunk", "embed_on_cpu", "loss_chunk"):
        fields[f] = None
    for k in ("deepspeed", "fsdp"):
        if args.get(k):
            unmodelled.append(f"{k}: sharding across GPUs is not modelled; the estimate is for "
                              "one GPU holding everything")
    if int(args.get("per_device_eval_batch_size", 8) or 8) > cfg["batch_size"] and \
            args.get("eval_strategy", "no") not in ("no", None):
        unmodelled.append("per_device_eval_batch_size is larger than the training batch: "
                          "evaluation may peak higher (not modelled)")
    config = TrainConfig(**cfg)
    return Reading(format="trl", layout=layout, source=source, model=model_of(s) or "",
                   config=config, fields=fields, data=s, semantics=tuple(sem),
                   unmodelled=tuple(unmodelled), tool_version=version,
                   auto_find_batch_size=auto_batch)


# ---------------------------------------------------------------------------
# writing: TrainConfig -> sections
def target_modules(cfg: TrainConfig, profile: ModelProfile) -> str | list[str]:
    if cfg.lora_targets is None:
        return "all-linear"
    names = profile.target_names
    return [names[t] for t in profile.resolve_targets(cfg.lora_targets)]


def torch_dtype_name(cfg: TrainConfig) -> str:
    return "bfloat16" if cfg.compute_dtype == "bf16" else "float16"


def render(cfg: TrainConfig, profile: ModelProfile, *, model: str,
           trainer: str = "SFTTrainer") -> dict[str, Any]:
    """The sections that make trl run ``cfg`` as closely as it can (see :func:`unexpressible`
    for what it cannot)."""
    dt = torch_dtype_name(cfg)
    s: dict[str, Any] = {"trainer": trainer, "model": model,
                         "from_pretrained": {"dtype": dt, "attn_implementation": cfg.attn}}
    if cfg.quant != "none":
        s["quantization_config"] = {"load_in_4bit": True, "bnb_4bit_quant_type": cfg.quant,
                                    "bnb_4bit_use_double_quant": cfg.double_quant,
                                    "bnb_4bit_compute_dtype": dt}
    if cfg.prepare == "kbit" and cfg.quant != "none":
        s["prepare_model_for_kbit_training"] = {"use_gradient_checkpointing": cfg.grad_ckpt}
    s["peft_config"] = {"r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha,
                        "lora_dropout": cfg.lora_dropout,
                        "target_modules": target_modules(cfg, profile),
                        "bias": "none", "task_type": "CAUSAL_LM"}
    args: dict[str, Any] = {
        "per_device_train_batch_size": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum // cfg.gpus,  # per process
        "max_length": cfg.seq_len,
        "gradient_checkpointing": cfg.grad_ckpt,
    }
    if cfg.grad_ckpt:
        args["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    args["optim"] = {"paged_adamw_8bit": "paged_adamw_8bit", "adamw_8bit": "adamw_bnb_8bit",
                     "adamw_torch": "adamw_torch"}[cfg.optim]
    args["bf16"] = cfg.compute_dtype == "bf16"
    args["fp16"] = cfg.compute_dtype == "fp16"
    if trainer == "SFTTrainer":
        args["packing"] = cfg.packed_rows
        if cfg.offload_activations and cfg.grad_ckpt:
            args["activation_offloading"] = True
    if cfg.recompute_norms or (trainer == "Trainer" and cfg.loss == "fused"):
        args["use_liger_kernel"] = True
    s["args"] = args
    s["env"] = {ALLOC_ENV: "expandable_segments:True"} if cfg.expandable_segments else {}
    return s


def render_cli(sections: dict[str, Any]) -> dict[str, Any]:
    """Sections as trl's CLI YAML (``trl sft --config``): prepare_model_for_kbit_training has
    no CLI field, so it becomes ``dtype: float32`` (the same float32 weights)."""
    s = sections
    out: dict[str, Any] = {"model_name_or_path": s["model"]}
    fp = s.get("from_pretrained") or {}
    kbit = s.get("prepare_model_for_kbit_training") is not None
    out["dtype"] = "float32" if kbit else fp.get("dtype", "bfloat16")
    if fp.get("attn_implementation"):
        out["attn_implementation"] = fp["attn_implementation"]
    q = s.get("quantization_config")
    if q:
        out["load_in_4bit"] = True
        out["bnb_4bit_quant_type"] = q.get("bnb_4bit_quant_type", "nf4")
        out["use_bnb_nested_quant"] = bool(q.get("bnb_4bit_use_double_quant"))
    p = s.get("peft_config")
    if p:
        out["use_peft"] = True
        out["lora_r"] = p["r"]
        out["lora_alpha"] = p["lora_alpha"]
        out["lora_dropout"] = p["lora_dropout"]
        out["lora_target_modules"] = p["target_modules"]
    out.update(s.get("args") or {})
    if s.get("env"):
        out["env"] = dict(s["env"])
    return out


def unexpressible(cfg: TrainConfig, trainer: str = "SFTTrainer",
                  version: str = NEWEST_MODELLED) -> dict[str, str]:
    """qplan settings of ``cfg`` that trl cannot express: setting -> what trl does instead."""
    out = {}
    chunked = trainer == "SFTTrainer" and _version_tuple(version) >= CHUNKED_SINCE
    if cfg.embed_on_cpu:
        out["embed_on_cpu"] = "trl keeps the input embeddings on the GPU"
    if cfg.mlp_chunk:
        out["mlp_chunk"] = "trl does not tile the MLP"
    if cfg.loss == "standard" and chunked:
        out["loss"] = (f"trl {version}'s SFTTrainer always computes the loss in chunks (a fused "
                       "LM head): less memory than planned")
    if cfg.loss == "fused" and cfg.loss_chunk != TrainConfig().loss_chunk and chunked:
        out["loss_chunk"] = "trl's fused LM head uses its own tiles (4096 tokens x 32768 vocabulary)"
    if cfg.offload_activations and not cfg.grad_ckpt:
        out["offload_activations"] = "offloading applies to checkpointed blocks only"
    if trainer == "Trainer" and cfg.packed_rows:
        out["packed_rows"] = "transformers' Trainer does not pack"
    return out


def sections_equal_paths(a: Any, b: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any, Any]]:
    """Every path where two nested mappings differ: ``(path, a's value, b's value)``."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in list(a) + [k for k in b if k not in a]:
            if k.startswith("_"):
                continue
            out += sections_equal_paths(a.get(k), b.get(k), path + (k,))
        return out
    return [] if a == b else [(path, a, b)]


def get_path(data: dict[str, Any], path: tuple[str, ...]) -> Any:
    cur: Any = data
    for k in path:
        if not isinstance(cur, dict) or k not in cur:
            return None
        cur = cur[k]
    return copy.deepcopy(cur)
