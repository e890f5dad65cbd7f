"""A plan: the chosen settings for one model on one machine, with its estimates.

Plans are saved as YAML (``qplan suggest --save plan.yaml``) for ``qplan run`` to read
and for a person to edit; :func:`load_plan` validates every field and reports all
problems together.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qplan.errors import ConfigError
from qplan.planner.config import TrainConfig
from qplan.planner.memory import MemoryEstimate
from qplan.planner.speed import SpeedEstimate

PLAN_VERSION = 1


@dataclass(frozen=True)
class Reason:
    """Why settings have their values, or why they changed: data, not prose to parse.

    ``settings`` are the :class:`TrainConfig` fields it explains (empty: about the plan as a
    whole); ``text`` is the sentence a person reads; ``source`` is ``"qplan"`` or the name
    of the plugin that decided.
    """

    settings: tuple[str, ...]
    text: str
    source: str = "qplan"

    def __post_init__(self) -> None:
        object.__setattr__(self, "settings", tuple(self.settings))

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Plan:
    """Settings chosen for ``model`` on ``gpu``, with why, and what they should cost."""

    model: str  # catalogue name, local path or hub id, as the user gave it
    gpu: str
    config: TrainConfig
    target_effective_batch: int = 16
    device_map: dict[str, Any] = field(default_factory=lambda: {"": 0})
    env: dict[str, str] = field(default_factory=dict)
    reasons: tuple[Reason, ...] = ()
    memory: MemoryEstimate | None = field(default=None, compare=False)
    speed: SpeedEstimate | None = field(default=None, compare=False)

    @property
    def peak_gib(self) -> float | None:
        return self.memory.peak_gib if self.memory else None

    def to_dict(self) -> dict[str, Any]:
        """The editable, serializable part (estimates are recomputed on load)."""
        d: dict[str, Any] = {
            "qplan_plan_version": PLAN_VERSION,
            "model": self.model,
            "gpu": self.gpu,
            "target_effective_batch": self.target_effective_batch,
            "settings": self.config.to_dict(),
            "device_map": dict(self.device_map),
            "env": dict(self.env),
        }
        if self.reasons:
            d["reasons"] = [r.text for r in self.reasons]
        if self.memory is not None:
            d["estimate"] = {"peak_gib": round(self.memory.peak_gib, 3),
                             "breakdown": self.memory.breakdown()}
        if self.speed is not None:
            d["estimate"] = d.get("estimate", {})
            d["estimate"]["tokens_per_s"] = round(self.speed.tokens_per_s, 1)
        return d

    def to_hf(self, *, profile=None, apply_techniques: bool = True):
        """The plan as Hugging Face kwargs (BitsAndBytesConfig, LoraConfig,
        TrainingArguments / SFTConfig) and qplan's techniques for a model you load yourself:
        :class:`qplan.ecosystem.hf.HFKwargs` (see :func:`qplan.ecosystem.to_hf`)."""
        from qplan.ecosystem.hf import to_hf

        return to_hf(self, profile, apply_techniques=apply_techniques)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "plan") -> "Plan":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: a plan is a mapping with keys model, gpu, settings")
        problems = _problems(d)
        if problems:
            raise ConfigError(f"{source}: " + "; ".join(problems))
        try:
            cfg = TrainConfig.from_dict(d["settings"])
        except Exception as e:  # BadInputError / ConfigError / TypeError
            raise ConfigError(f"{source}: settings: {e}") from None
        return cls(model=str(d["model"]), gpu=str(d.get("gpu") or ""), config=cfg,
                   target_effective_batch=d.get("target_effective_batch") or cfg.effective_batch,
                   device_map=dict(d.get("device_map") or {"": 0}),
                   env={str(k): str(v) for k, v in (d.get("env") or {}).items()},
                   reasons=tuple(Reason((), str(r)) for r in d.get("reasons") or ()))


_FIELDS = {"qplan_plan_version", "model", "gpu", "target_effective_batch", "settings",
           "device_map", "env", "reasons", "estimate"}


def _problems(d: dict[str, Any]) -> list[str]:
    """Everything wrong with a plan mapping, each with what is expected."""
    p = []
    version = d.get("qplan_plan_version", PLAN_VERSION)
    if version != PLAN_VERSION:
        p.append(f"qplan_plan_version is {version!r}, but this qplan reads version "
                 f"{PLAN_VERSION}; make the plan again with `qplan suggest --save`")
    unknown = sorted(set(d) - _FIELDS)
    if unknown:
        p.append(f"unknown field(s) {', '.join(map(str, unknown))} (known: "
                 f"{', '.join(sorted(_FIELDS))})")
    p += [f"missing field {k!r}" for k in ("model", "settings") if k not in d]
    if "model" in d and (not isinstance(d["model"], str) or not d["model"].strip()):
        p.append("'model' must be a model name, directory or hub id")
    if "settings" in d and not isinstance(d["settings"], dict):
        p.append("'settings' must be a mapping of setting: value")
    t = d.get("target_effective_batch")
    if t is not None and (not isinstance(t, int) or isinstance(t, bool) or t < 1):
        p.append(f"target_effective_batch must be an integer >= 1 (got {t!r})")
    for k in ("device_map", "env"):
        if d.get(k) is not None and not isinstance(d[k], dict):
            p.append(f"{k!r} must be a mapping")
    if d.get("reasons") is not None and not isinstance(d["reasons"], list):
        p.append("'reasons' must be a list")
    return p


def save_plan(plan: Plan, path: str | Path) -> Path:
    """Write ``plan`` as YAML; :class:`ConfigError` when ``path`` cannot be written."""
    import yaml

    p = Path(path)
    header = ("# qplan plan: edit any setting, then `qplan run --plan "
              f"{p.name}` (estimate is informational and recomputed).\n")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(header + yaml.safe_dump(plan.to_dict(), sort_keys=False))
    except OSError as e:
        raise ConfigError(f"cannot write the plan to {str(p)!r}: {e.strerror or e}; "
                          "give a file path in a folder you can write") from None
    return p


def load_plan(path: str | Path) -> Plan:
    import yaml

    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"plan file {str(p)!r} is a directory; give the .yaml file "
                          "`qplan suggest --save` wrote")
    if not p.is_file():
        raise ConfigError(f"plan file {str(p)!r} does not exist; save one with "
                          "`qplan suggest --model NAME --save plan.yaml`")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"plan file {str(p)!r} is not valid YAML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read plan file {str(p)!r}: {e}") from None
    return Plan.from_dict(data, source=str(p))
