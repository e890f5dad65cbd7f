"""``qplan check``'s library side: read a trainer's config, estimate it, find the edits.

The edits are changes to the user's own file, in its own field names. Each candidate qplan
configuration is written in the tool's fields (the format's ``render``), the fields that
differ are applied to the user's file, and the edited file is read again: so an option's
estimate is that of what the tool would run with the edited file, not of the qplan
configuration that suggested it (a tool that cannot express a setting does not get it).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from qplan.ecosystem import axolotl as AX
from qplan.ecosystem import llamafactory as LF
from qplan.ecosystem import trl as TRL
from qplan.ecosystem.base import Edit, Reading, load_mapping
from qplan.errors import BadInputError, ConfigError, DoesNotFitError
from qplan.planner.config import TrainConfig

MODULES = {"trl": TRL, "axolotl": AX, "llama-factory": LF}
# qplan settings a "run faster" suggestion leaves as the user set them (they change what is
# learned, or the data, not only memory and speed).
KEEP = ("seq_len", "lora_rank", "lora_alpha", "lora_targets", "lora_dropout", "quant",
        "double_quant", "compute_dtype", "attn", "optim", "packed_rows")
FASTER_BY = 1.03  # a "faster" option must be at least 3% faster


@dataclass(frozen=True)
class Option:
    """Edits to the file and what the edited file would cost."""

    edits: tuple[Edit, ...]
    config: TrainConfig  # what the tool runs with the edited file
    changes: dict[str, tuple[Any, Any]]  # qplan setting -> (as the file stands, after the edits)
    peak_bytes: int
    tokens_per_s: float
    fits: bool  # within the card's memory less qplan's planning margin
    why: str = ""


@dataclass(frozen=True)
class AutoBatch:
    """What ``auto_find_batch_size`` would do after out-of-memory errors."""

    batch_size: int
    effective_batch: int
    peak_bytes: int


@dataclass(frozen=True)
class CheckResult:
    reading: Reading
    model: Any  # ModelProfile
    gpu: Any  # GpuProfile
    estimate: Any  # qplan.api.Estimate
    usable_bytes: int
    auto_batch: AutoBatch | None
    to_fit: tuple[Option, ...]
    faster: Option | None

    @property
    def fits(self) -> bool:
        """Fits the card as the file stands (or after auto_find_batch_size's halving)."""
        return self.estimate.fits or self.auto_batch is not None


# ---------------------------------------------------------------------------
# reading a file
def sniff(path: str | Path, fmt: str | None = None) -> tuple[str, str, dict[str, Any], list[str]]:
    """``(format, layout, data, unreadable)`` of a config file or trl script."""
    p = Path(path)
    skipped: list[str] = []
    if p.suffix == ".py":
        if fmt not in (None, "trl"):
            raise BadInputError(f"{p}: a Python script is read as a trl/transformers script, not "
                                f"as {fmt}")
        if not p.is_file():
            raise BadInputError(f"{str(p)!r} does not exist or is not a file")
        sections, skipped = TRL.script_to_sections(p.read_text(encoding="utf-8"), str(p))
        return "trl", "script", sections, skipped
    data = load_mapping(p)
    if fmt is None:
        found = detect(data)
        if len(found) != 1:
            what = "several formats (" + ", ".join(found) + ")" if found else "no known format"
            raise ConfigError(
                f"{p}: looks like {what}. qplan check reads trl configs (an SFTConfig's fields with "
                "model_name_or_path, as `trl sft --config` reads, or sections model / "
                "quantization_config / peft_config / args, or a training script), axolotl YAML "
                "(base_model, sequence_len, micro_batch_size, ...) and LLaMA-Factory YAML "
                "(model_name_or_path, cutoff_len, finetuning_type, ...); name it with --format")
        fmt = found[0]
    if fmt not in MODULES:
        raise BadInputError(f"--format {fmt!r} is not one of {', '.join(MODULES)}")
    layout = "yaml"
    if fmt == "trl":
        layout = TRL.layout_of(data) or "cli"
        if layout == "cli":
            raw, data = data, TRL.cli_to_sections(data)
            data["_raw"] = raw
    return fmt, layout, data, skipped


def detect(data: dict[str, Any]) -> list[str]:
    """The formats ``data`` may be: trl's sections layout by its section names; otherwise
    the format with the most field names that only it has (trl's CLI layout: SFTConfig,
    ModelConfig, ScriptArguments)."""
    from qplan.ecosystem import fields_data as F

    if TRL.layout_of(data) == "sections":
        return ["trl"]
    sets = {"trl": F.SFTConfig | F.ModelConfig | F.ScriptArguments, "axolotl": F.axolotl,
            "llama-factory": F.llamafactory}
    score = {}
    for name, known in sets.items():
        others = set().union(*(v for k, v in sets.items() if k != name))
        score[name] = len([k for k in data if k in known and k not in others])
    score = {k: v for k, v in score.items() if v and MODULES[k].detect(data)}
    if not score:
        return []
    top = max(score.values())
    return [k for k, v in score.items() if v == top]


def model_name(fmt: str, data: dict[str, Any]) -> str | None:
    return MODULES[fmt].model_of(data)


def interpret(fmt: str, layout: str, data: dict[str, Any], profile, *, source: str,
              trl_version: str | None = None, skipped: list[str] | None = None,
              seq_len: int | None = None) -> Reading:
    """The Reading of ``data`` (canonical sections for trl)."""
    if fmt == "trl":
        raw = data.get("_raw")
        sections = {k: v for k, v in data.items() if k != "_raw"}
        r = TRL.read(sections, profile, source=source, layout=layout, trl_version=trl_version,
                     raw=raw, skipped=skipped, seq_len=seq_len)
        if layout == "cli":
            r = replace(r, data=raw)  # edits apply to the user's flat file
        return r
    return MODULES[fmt].read(data, profile, source=source)


def read_file(path: str | Path, *, model: str | None = None, fmt: str | None = None,
              trl_version: str | None = None, seq_len: int | None = None, pm=None):
    """``(Reading, ModelProfile)`` of a trl / axolotl / LLaMA-Factory config or trl script.

    ``model`` overrides the model the file names (a local path that does not exist here);
    ``seq_len`` gives the sequence length where the file has none (transformers' Trainer).
    """
    from qplan import api

    fmt, layout, data, skipped = sniff(path, fmt)
    name = model or model_name(fmt, data)
    if not name:
        field = {"trl": "model_name_or_path (or model)", "axolotl": "base_model",
                 "llama-factory": "model_name_or_path"}[fmt]
        raise BadInputError(f"{path}: no model named ({field}); give --model NAME "
                            "(a catalogue name, model directory, config.json or hub id)")
    profile = api.get_model(name, pm=pm)
    reading = interpret(fmt, layout, data, profile, source=str(path), trl_version=trl_version,
                        skipped=skipped, seq_len=seq_len)
    if reading.config.attn == "sdpa" and not profile.sdpa_supported:
        from qplan.profiles.models import NO_SDPA

        reading = replace(reading, config=reading.config.with_(attn="eager"), semantics=(
            *reading.semantics, f"sdpa attention: transformers has none for {profile.name} "
            f"({NO_SDPA[profile.model_type]}): eager (recent versions refuse sdpa for it)"))
    if model:
        reading = replace(reading, semantics=reading.semantics + (f"model {model} (--model)",))
    if seq_len is not None and reading.config.seq_len != seq_len:
        reading = replace(reading, config=reading.config.with_(seq_len=seq_len),
                          semantics=reading.semantics + (f"sequence length {seq_len} (--seq)",))
    return reading, profile


# ---------------------------------------------------------------------------
# edits
def _space(reading: Reading) -> dict[str, Any]:
    """The mapping edits apply to: the user's file (trl: sections, or the flat CLI file)."""
    return reading.data


def _render(reading: Reading, cfg: TrainConfig, profile) -> dict[str, Any]:
    mod = MODULES[reading.format]
    if reading.format == "trl":
        s = TRL.render(cfg, profile, model=reading.model,
                       trainer=reading.data.get("trainer", "SFTTrainer")
                       if reading.layout != "cli" else "SFTTrainer")
        return TRL.render_cli(s) if reading.layout == "cli" else s
    return mod.render(cfg, profile, model=reading.model)


def _set(d: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    cur = d
    for k in path[:-1]:
        if not isinstance(cur.get(k), dict):
            cur[k] = {}
        cur = cur[k]
    if value is None:
        cur.pop(path[-1], None)
    else:
        cur[path[-1]] = copy.deepcopy(value)


def field_label(reading: Reading, setting: str) -> str:
    """Where the file sets ``setting``, as the file spells it; or why it has no field."""
    path = reading.fields.get(setting)
    if path is None:
        if setting == "expandable_segments":
            return "(the environment: PYTORCH_CUDA_ALLOC_CONF)"
        return f"({reading.format} has no setting for it)"
    if reading.format == "trl" and reading.layout == "cli" and setting == "prepare":
        return "dtype"  # trl's CLI has no prepare_model_for_kbit_training: float32 loading
    return _field(reading, path)


def _field(reading: Reading, path: tuple[str, ...]) -> str:
    if reading.format == "trl" and reading.layout == "cli":
        return TRL.cli_name(path) if len(path) > 1 or path[0] in ("model",) else path[0]
    if reading.format == "trl":
        if reading.layout == "script" and reading.data.get("_loaded_by_trainer") and \
                path[0] == "from_pretrained" and len(path) > 1:
            return f"SFTConfig(model_init_kwargs={{'{path[1]}': ...}})"
        if reading.layout == "cli":
            return ".".join(path)
        return TRL.field_name(path, reading.layout)
    return ".".join(path)


# Fields a file may spell another way: edit the name the file uses.
ALIASES = {"gradient_checkpointing": "activation_checkpointing",
           "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
           "max_length": "max_seq_length", "dtype": "torch_dtype"}


def _user_path(reading: Reading, space: dict[str, Any], path: tuple[str, ...]) -> tuple[str, ...]:
    from qplan.ecosystem.trl import get_path

    alias = ALIASES.get(path[-1])
    if reading.format != "trl" or alias is None:
        return path
    alt = path[:-1] + (alias,)
    if get_path(space, alt) is not None and get_path(space, path) is None:
        return alt
    return path


def edits_for(reading: Reading, profile, new: TrainConfig, *, pm=None,
              trl_version: str | None = None) -> tuple[tuple[Edit, ...], Reading]:
    """The edits that turn the file into one the tool runs as close to ``new`` as it can,
    and the reading of the edited file."""
    from qplan.ecosystem.trl import get_path, sections_equal_paths

    old_r = _render(reading, reading.config, profile)
    new_r = _render(reading, new, profile)
    diffs = sections_equal_paths(old_r, new_r)
    space = copy.deepcopy(_space(reading))
    edits = []
    for path, _a, b in diffs:
        if path[0] in ("model", "model_name_or_path", "base_model", "trainer"):
            continue
        path = _user_path(reading, space, path)
        old = get_path(space, path)
        if old == b:
            continue
        _set(space, path, b)
        edits.append(Edit(field=_field(reading, path), old=old, new=b))
    if not edits:
        return (), reading
    if reading.format == "trl" and reading.layout == "cli":
        sections = TRL.cli_to_sections(space)
        sections["_raw"] = space
        data = sections
    else:
        data = space
    r = interpret(reading.format, reading.layout, data, profile, source=reading.source,
                  trl_version=trl_version or reading.tool_version, seq_len=reading.config.seq_len)
    if r.config.seq_len != new.seq_len and reading.config.seq_len == new.seq_len:
        r = replace(r, config=r.config.with_(seq_len=reading.config.seq_len))
    return tuple(edits), r


def _option(reading: Reading, profile, gpu, new: TrainConfig, *, capacity_bytes, usable,
            why: str, pm=None) -> Option | None:
    from qplan import api

    edits, r = edits_for(reading, profile, new, pm=pm)
    if not edits or r.config == reading.config:
        return None
    try:
        est = api.estimate(profile, gpu, r.config, capacity_bytes=capacity_bytes, pm=pm)
    except BadInputError:
        return None
    changes = {f: (getattr(reading.config, f), getattr(r.config, f))
               for f in TrainConfig.__dataclass_fields__
               if getattr(reading.config, f) != getattr(r.config, f)}
    return Option(edits=edits, config=r.config, changes=changes, peak_bytes=est.memory.peak_bytes,
                  tokens_per_s=est.speed.tokens_per_s, fits=est.memory.safe_peak_bytes <= usable,
                  why=why)


# The out-of-memory ladder's moves, each on its own (qplan.api.next_safer_config applies them
# in order; here each is tried alone first, so one small edit is found when one suffices).
def _single_moves(c: TrainConfig) -> list[tuple[TrainConfig, str]]:
    out = []
    if c.batch_size > 1:
        out.append((c.with_(batch_size=1, grad_accum=c.grad_accum * c.batch_size),
                    f"per-device batch {c.batch_size} -> 1, accumulation x{c.batch_size} "
                    "(same effective batch)"))
    if not c.grad_ckpt:
        out.append((c.with_(grad_ckpt=True), "gradient checkpointing"))
    if c.optim != "paged_adamw_8bit":
        out.append((c.with_(optim="paged_adamw_8bit"), "paged 8-bit AdamW"))
    if c.loss != "fused":
        out.append((c.with_(loss="fused"), "chunked (fused) loss"))
    if c.prepare != "lean":
        out.append((c.with_(prepare="lean"), "16-bit embeddings and lm_head"))
    if not c.expandable_segments:
        out.append((c.with_(expandable_segments=True), "expandable allocator segments"))
    if not c.offload_activations:
        out.append((c.with_(offload_activations=True, grad_ckpt=True),
                    "checkpointed activations in CPU memory"))
    if not c.recompute_norms:
        out.append((c.with_(recompute_norms=True), "lean RMSNorms"))
    if not c.mlp_chunk and c.seq_len >= 2048:
        out.append((c.with_(mlp_chunk=max(256, c.seq_len // 8 // 256 * 256)), "tiled MLP"))
    return out


def to_fit_options(reading: Reading, profile, gpu, *, capacity_bytes=None, usable: int,
                   pm=None, limit: int = 3) -> list[Option]:
    """Up to ``limit`` edit sets that bring the estimate under ``usable`` bytes: single moves
    first (fewest edits, then fastest), else the whole ladder, else a shorter sequence."""
    from qplan import api

    c = reading.config
    kw = dict(capacity_bytes=capacity_bytes, usable=usable, pm=pm)
    singles = [o for cfg, why in _single_moves(c)
               if (o := _option(reading, profile, gpu, cfg, why=why, **kw)) is not None]
    fitting = sorted((o for o in singles if o.fits), key=lambda o: (len(o.edits), -o.tokens_per_s))
    if fitting:
        return fitting[:limit]
    cur, whys = c, []
    for _ in range(16):  # the ladder, cumulatively, without shortening the sequence
        step = api.next_safer_config(cur, allow_shorter_seq=False)
        if step is None:
            break
        cur, why = step
        whys.append(why.text)
        o = _option(reading, profile, gpu, cur, why="; ".join(whys), **kw)
        if o is not None and o.fits:
            return [o]
    best = cur

    def shorter(s: int) -> Option | None:
        o = _option(reading, profile, gpu, best.with_(seq_len=s),
                    why=f"the settings above and a shorter sequence ({s})", **kw)
        return o if o is not None and o.fits else None

    s = best.seq_len // 2
    while s >= 128:
        o = shorter(s)
        if o is not None:  # the longest multiple of 256 below 2s that fits
            lo, hi = s // 256, (2 * s - 1) // 256
            while lo < hi:
                mid = (lo + hi + 1) // 2
                m = shorter(mid * 256) if mid * 256 > s else None
                if m is not None:
                    lo, o = mid, m
                else:
                    hi = mid - 1
            return [o]
        s //= 2
    return []


def faster_option(reading: Reading, profile, gpu, *, capacity_bytes=None, usable: int,
                  tokens_per_s: float, pm=None) -> Option | None:
    """The fastest configuration that fits with the user's learning settings kept, as edits,
    if it is at least 3% faster than the file as it stands."""
    from qplan import api

    c = reading.config
    fixed = {k: getattr(c, k) for k in KEEP}
    fixed.update({f: getattr(c, f) for f, where in reading.fields.items()
                  if where is None and f in TrainConfig.__dataclass_fields__})
    fixed.pop("grad_accum", None)
    try:
        plan = api.suggest(profile, gpu, seq_len=c.seq_len, target_effective_batch=c.effective_batch,
                           fixed={k: v for k, v in fixed.items() if k != "seq_len"},
                           capacity_bytes=capacity_bytes, pm=pm, find_alternatives=False)
    except (DoesNotFitError, BadInputError):
        return None
    o = _option(reading, profile, gpu, plan.config, capacity_bytes=capacity_bytes, usable=usable,
                why="the fastest settings that fit, keeping rank, targets, sequence, optimizer "
                    "and precision", pm=pm)
    if o is None or not o.fits or o.tokens_per_s < FASTER_BY * tokens_per_s:
        return None
    return o


def _auto_batch(reading: Reading, profile, gpu, capacity_bytes, pm) -> AutoBatch | None:
    """The batch transformers' ``auto_find_batch_size`` settles at (halving after each OOM,
    accumulation unchanged), or None when the file's batch fits or it is off."""
    from qplan import api

    if not reading.auto_find_batch_size:
        return None
    c = reading.config
    b = c.batch_size
    while b > 1:
        b //= 2
        est = api.estimate(profile, gpu, c.with_(batch_size=b), capacity_bytes=capacity_bytes, pm=pm)
        if est.fits:
            return AutoBatch(b, b * c.grad_accum, est.memory.peak_bytes)
    return None


def check(reading: Reading, profile, gpu, *, capacity_bytes: int | None = None,
          pm=None) -> CheckResult:
    """Estimate what the tool runs with this file on ``gpu``; the edits that make it fit
    (when it does not, or only inside qplan's safety margin) or run faster (when it fits)."""
    from qplan import api
    from qplan.planner.search import usable_bytes

    profile.resolve_targets(reading.config.lora_targets)
    est = api.estimate(profile, gpu, reading.config, capacity_bytes=capacity_bytes, pm=pm)
    usable = usable_bytes(gpu, capacity_bytes)
    auto = None if est.fits else _auto_batch(reading, profile, gpu, capacity_bytes, pm)
    to_fit: list[Option] = []
    faster = None
    if est.memory.safe_peak_bytes > usable:
        to_fit = to_fit_options(reading, profile, gpu, capacity_bytes=capacity_bytes,
                                usable=usable, pm=pm)
    else:
        faster = faster_option(reading, profile, gpu, capacity_bytes=capacity_bytes,
                               usable=usable, tokens_per_s=est.speed.tokens_per_s, pm=pm)
    return CheckResult(reading=reading, model=profile, gpu=gpu, estimate=est, usable_bytes=usable,
                       auto_batch=auto, to_fit=tuple(to_fit), faster=faster)
