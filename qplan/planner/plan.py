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
class Plan:
    """Settings chosen for ``model`` on ``gpu``, with why, and what they should cost."""

    model: str  # catalogue name, local path or hub id, as the user gave it
    gpu: str
    config: TrainConfig
    target_effective_batch: int = 16
    device_map: dict[str, Any] = field(default_factory=lambda: {"": 0})
    env: dict[str, str] = field(default_factory=dict)
    reasons: tuple[str, ...] = ()
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
            d["reasons"] = list(self.reasons)
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
        known = {"qplan_plan_version", "model", "gpu", "target_effective_batch", "settings",
                 "device_map", "env", "reasons", "estimate"}
        problems = []
        unknown = sorted(set(d) - known)
        if unknown:
            problems.append(f"unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        for k in ("model", "settings"):
            if k not in d:
                problems.append(f"missing field {k!r}")
        if problems:
            raise ConfigError(f"{source}: " + "; ".join(problems))
        if not isinstance(d["settings"], dict):
            raise ConfigError(f"{source}: 'settings' must be a mapping of setting: value")
        try:
            cfg = TrainConfig.from_dict(d["settings"])
        except Exception as e:  # BadInputError / ConfigError / TypeError
            raise ConfigError(f"{source}: settings: {e}") from None
        return cls(model=str(d["model"]), gpu=str(d.get("gpu", "")), config=cfg,
                   target_effective_batch=int(d.get("target_effective_batch", cfg.effective_batch)),
                   device_map=dict(d.get("device_map") or {"": 0}),
                   env={str(k): str(v) for k, v in (d.get("env") or {}).items()},
                   reasons=tuple(d.get("reasons") or ()))


def save_plan(plan: Plan, path: str | Path) -> Path:
    import yaml

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    header = ("# qplan plan: edit any setting, then `qplan run --plan "
              f"{p.name}` (estimate is informational and recomputed).\n")
    p.write_text(header + yaml.safe_dump(plan.to_dict(), sort_keys=False))
    return p


def load_plan(path: str | Path) -> Plan:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"plan file {str(p)!r} does not exist; save one with "
                          "`qplan suggest --model NAME --save plan.yaml`")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"plan file {str(p)!r} is not valid YAML: {e}") from None
    return Plan.from_dict(data, source=str(p))
