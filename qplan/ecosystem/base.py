"""What the ecosystem readers and writers share: the reading of a file, edits, YAML output.

A trainer's config file (trl, axolotl, LLaMA-Factory) is read into a :class:`Reading`: the
qplan :class:`~qplan.planner.config.TrainConfig` that models what that trainer would do
with it, which field of the file set each setting, and how each was interpreted. Every
format module (``trl``, ``axolotl``, ``llamafactory``) has the same four functions:

* ``detect(data) -> bool``: the mapping looks like this tool's config;
* ``read(data, *, source, ...) -> Reading``;
* ``render(cfg, profile, ...) -> dict``: the tool's fields for a qplan configuration (what
  ``qplan export`` writes, and what edits are computed from);
* ``field_name(path, layout) -> str``: how the file spells a field, for messages.

Nothing here imports torch or the tools themselves.
"""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qplan.errors import BadInputError, ConfigError
from qplan.planner.config import TrainConfig

FORMATS = ("trl", "axolotl", "llama-factory")
# Path of a field inside a file: ("args", "max_length") for nested layouts, ("sequence_len",)
# for flat ones.
Path_ = tuple[str, ...]


@dataclass(frozen=True)
class Reading:
    """A trainer config file read as one qplan configuration.

    ``fields`` maps each TrainConfig field to where the file sets it (a path into the
    file's mapping), or to ``None`` when the file cannot express it (the value is then
    the tool's fixed behaviour or this machine's environment). ``semantics`` says how the
    tool's settings were interpreted ("trl 1.16: loss_type nll is chunked -> loss fused");
    ``unmodelled`` lists settings that change memory but that qplan does not model, and
    unknown field names with the closest known ones.
    """

    format: str  # trl | axolotl | llama-factory
    layout: str  # trl: "sections" | "cli" | "script"; others: "yaml"
    source: str  # the file, as given
    model: str  # the model as the file names it
    config: TrainConfig
    fields: dict[str, Path_ | None]
    data: dict[str, Any]  # the file's settings, normalized to the format's canonical layout
    semantics: tuple[str, ...] = ()
    unmodelled: tuple[str, ...] = ()
    tool_version: str | None = None  # the version whose semantics were modelled
    auto_find_batch_size: bool = False


@dataclass(frozen=True)
class Edit:
    """One change to the file: ``field`` as the file spells it, the old and new values
    (``None`` = not set, or removed)."""

    field: str
    old: Any
    new: Any

    def __str__(self) -> str:
        old = "(not set)" if self.old is None else _show(self.old)
        new = "(remove)" if self.new is None else _show(self.new)
        return f"{self.field}: {old} -> {new}"


def _show(v: Any) -> str:
    if isinstance(v, str):
        return v
    return json.dumps(v)


# ---------------------------------------------------------------------------
# reading files
def load_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON file's top-level mapping; ConfigError naming what is wrong."""
    p = Path(path)
    if not p.is_file():
        raise BadInputError(f"{str(p)!r} does not exist or is not a file; give a trl, axolotl "
                            "or LLaMA-Factory config (.yaml, .yml, .json) or a trl script (.py)")
    text = p.read_text(encoding="utf-8", errors="replace")
    try:
        data = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        kind = "JSON" if p.suffix.lower() == ".json" else "YAML"
        raise ConfigError(f"{p}: not valid {kind}: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of field: value at the top level, got "
                          f"{type(data).__name__}")
    return data


def closest(name: str, known, n: int = 1) -> list[str]:
    return difflib.get_close_matches(name, sorted(known), n=n, cutoff=0.75)


def unknown_fields(data: dict[str, Any], known, where: str) -> list[str]:
    """``"name (not a field of WHERE; did you mean X?)"`` for each key of ``data`` not in
    ``known``."""
    out = []
    for k in sorted(data):
        if k not in known:
            c = closest(k, known)
            out.append(f"{k}: not a field of {where}; ignored" + (f" (did you mean {c[0]}?)" if c else ""))
    return out


def want(value: Any, kind: type | tuple, what: str, source: str) -> Any:
    """``value`` if it is of ``kind`` (bools are not ints); else ConfigError."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        names = " or ".join("a number" if k is float else {int: "an integer", bool: "true or false",
                                                             str: "a string", dict: "a mapping",
                                                             list: "a list"}.get(k, k.__name__)
                            for k in kinds)
        raise ConfigError(f"{source}: {what} must be {names} (got {value!r})")
    return value


def positive_int(value: Any, what: str, source: str) -> int:
    v = want(value, int, what, source)
    if v < 1:
        raise ConfigError(f"{source}: {what} must be at least 1 (got {v})")
    return v


def dropout(value: Any, what: str, source: str) -> float:
    v = float(want(value, (int, float), what, source))
    if not 0.0 <= v < 1.0:
        raise ConfigError(f"{source}: {what} must be in [0, 1) (got {value!r})")
    return v


def truthy(value: Any, what: str, source: str) -> bool:
    if isinstance(value, bool) or value is None:
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ConfigError(f"{source}: {what} must be true or false (got {value!r})")


# Optimizer names the tools accept (transformers' OptimizerNames, axolotl's aliases) that qplan
# models, by the qplan optimizer whose memory they have.
OPTIMIZERS = {
    "paged_adamw_8bit": "paged_adamw_8bit",
    "adamw_bnb_8bit": "adamw_8bit",
    "adamw_8bit": "adamw_8bit",
    "adamw_torch": "adamw_torch",
    "adamw_torch_fused": "adamw_torch",
    # 32-bit moments (8 bytes a parameter), paged or not: adamw_torch's memory
    "paged_adamw_32bit": "adamw_torch",
    "adamw_bnb_32bit": "adamw_torch",
    "paged_adamw": "adamw_torch",
}


def optimizer(name: Any, what: str, source: str, notes: list[str] | None = None) -> str:
    """The qplan optimizer with ``name``'s memory; NotModelledError for others."""
    from qplan.errors import NotModelledError

    want(name, str, what, source)
    q = OPTIMIZERS.get(name)
    if q is None:
        raise NotModelledError(f"{source}: {what} {name!r} is not modelled by qplan; modelled "
                               f"optimizers: {', '.join(OPTIMIZERS)}")
    if notes is not None and name not in ("paged_adamw_8bit", "adamw_torch", "adamw_8bit"):
        notes.append(f"{what} {name}: two {'8' if q == 'adamw_8bit' else '32'}-bit moments a "
                     f"parameter, as qplan's {q}")
    return q


# ---------------------------------------------------------------------------
# writing YAML with comments
def yaml_value(value: Any) -> str:
    """One value as YAML flow text (``true``, ``[q_proj, v_proj]``, ``"8"``)."""
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False,
                          width=10_000).strip().removesuffix("...").strip()


@dataclass
class YamlDoc:
    """A YAML document written key by key, each key with optional comment lines above it."""

    header: list[str] = field(default_factory=list)
    items: list[tuple[str, Any, list[str]]] = field(default_factory=list)

    def add(self, key: str, value: Any, *comments: str) -> None:
        self.items.append((key, value, [c for c in comments if c]))

    def text(self) -> str:
        lines = [f"# {h}" if h else "#" for h in self.header]
        for key, value, comments in self.items:
            lines += [f"# {c}" for c in comments]
            if isinstance(value, (dict, list)) and value and not _flat(value):
                body = yaml.safe_dump({key: value}, sort_keys=False, default_flow_style=False)
                lines += body.rstrip("\n").splitlines()
            else:
                lines.append(f"{key}: {yaml_value(value)}")
        return "\n".join(lines) + "\n"


def _flat(value: Any) -> bool:
    if isinstance(value, list):
        return all(not isinstance(v, (dict, list)) for v in value)
    return False


def gib(b: float) -> str:
    return f"{b / 2**30:+.2f} GiB"
