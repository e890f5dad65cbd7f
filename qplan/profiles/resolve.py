"""Resolve ``--model``: a catalogue name, a local directory or config.json, or a hub id."""
from __future__ import annotations

import json
from pathlib import Path

from qplan.errors import ConfigError
from qplan.profiles.models import ModelProfile
from qplan.profiles.registry import Registry


def load_config_file(path: Path, name: str) -> ModelProfile:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return ModelProfile.from_config_dict(data, name=name, hf_id=name, source=str(path))


def resolve_model(name: str, models: Registry[ModelProfile]) -> ModelProfile:
    found = models.find(name)
    if found is not None:
        return found
    p = Path(name).expanduser()
    if p.is_dir():
        cfg = p / "config.json"
        if not cfg.is_file():
            raise ConfigError(f"{p} has no config.json; a model directory needs one "
                              "(save_pretrained writes it)")
        return load_config_file(cfg, p.name)
    if p.is_file():
        return load_config_file(p, p.parent.name or p.stem)
    return models.get(name)  # raises UnknownModelError with closest matches
