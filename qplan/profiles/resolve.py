"""Resolve ``--model``: a catalogue name, a local directory or config.json, or a hub id.

Order: an existing local path (a directory holding ``config.json``, or a file), then the
catalogue (names and aliases), then, for ``org/name``, the Hugging Face Hub. The hub is
asked only when the optional ``huggingface_hub`` package is installed (``pip install
'qplan[hub]'``), never when ``HF_HUB_OFFLINE`` is set (the local hub cache is still
used), and it is imported only then, never when this module is imported.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from qplan.errors import ConfigError, UnknownModelError
from qplan.profiles.models import ModelProfile
from qplan.profiles.registry import Registry

HUB_CONFIG_URL = "https://huggingface.co/{}/blob/main/config.json"
# A hub repository id: "org/name" (letters, digits, "-", "_", ".").
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_TRUE = {"1", "on", "yes", "true"}


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or the older ``TRANSFORMERS_OFFLINE``) is set to a true value."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the hub's host answers a TCP connection within ``timeout_s`` (True when a
    proxy is configured: only the HTTP client can tell then). huggingface_hub retries an
    unreachable hub for up to a minute; this lets qplan go offline at once instead."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname or "huggingface.co",
                                  url.port or (80 if url.scheme == "http" else 443)),
                                 timeout=timeout_s).close()
        return True
    except OSError:
        return False


def load_config_file(path: Path, name: str, *, hf_id: str = "",
                     source: str = "") -> ModelProfile:
    """A profile from a ``config.json`` on disk; :class:`ConfigError` if it is unusable."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object (a model's config.json)")
    return ModelProfile.from_config_dict(data, name=name, hf_id=hf_id or name,
                                         source=source or str(path))


def _looks_like_path(text: str) -> bool:
    return (text.startswith(("/", "./", "../", "~", ".\\")) or text.endswith(".json")
            or text.count("/") > 1 or "\\" in text)


def _load_local(p: Path, text: str) -> ModelProfile:
    if p.is_dir():
        cfg = p / "config.json"
        if not cfg.is_file():
            raise ConfigError(f"{p} has no config.json; a model directory needs one "
                              "(save_pretrained writes it)")
        return load_config_file(cfg, p.resolve().name, hf_id=str(p))
    if p.is_file():
        # A bare config.json names the directory it sits in (where its weights would be).
        folder = p.resolve().parent
        hf_id = str(p.parent) if p.name == "config.json" else str(p)
        return load_config_file(p, folder.name if p.name == "config.json" else p.stem,
                                hf_id=hf_id)
    raise UnknownModelError(f"{text}: no such file or directory. Pass a model directory "
                            "that holds config.json, a config.json file, a catalogue name "
                            "(see `qplan models`) or a hub id such as Qwen/Qwen3-8B.")


def _unavailable(repo_id: str, reason: str, models: Registry[ModelProfile]) -> UnknownModelError:
    close = models.closest(repo_id) or models.closest(repo_id.split("/", 1)[1])
    hint = f" Closest catalogue entries: {', '.join(close)}." if close else ""
    return UnknownModelError(
        f"model {repo_id!r} is not in qplan's catalogue and its config.json could not be "
        f"fetched from the Hugging Face Hub: {reason}.{hint} To plan for it without the hub, "
        f"download {HUB_CONFIG_URL.format(repo_id)} and pass --model path/to/config.json "
        "(or a local model directory that holds it).")


def _hub_error_reason(e: Exception) -> str:
    names = {c.__name__ for c in type(e).__mro__}
    if "GatedRepoError" in names:
        return ("the repository is gated: accept its licence on the model page and log in "
                "(hf auth login)")
    if "RepositoryNotFoundError" in names:
        return "no such repository, or it is private (log in with hf auth login)"
    if "RevisionNotFoundError" in names:
        return "no such revision"
    if names & {"LocalEntryNotFoundError", "OfflineModeIsEnabled"}:
        if hub_offline():
            return "HF_HUB_OFFLINE is set and the file is not in the local hub cache"
        return ("the hub cannot be reached (no connection within 3 s) and the file is not in "
                "the local hub cache")
    if names & {"EntryNotFoundError", "RemoteEntryNotFoundError"}:
        return "the repository has no config.json"
    text = str(e).splitlines()[0][:200] if str(e) else ""
    return f"{type(e).__name__}{': ' + text if text else ''}"


def fetch_hub_config(repo_id: str) -> Path:
    """Download (or take from the hub cache) ``repo_id``'s config.json; its local path.

    Raises ``ImportError`` when huggingface_hub is not installed, and whatever
    huggingface_hub raises otherwise. Offline mode reads the cache only.
    """
    from huggingface_hub import hf_hub_download  # optional extra: imported only here

    offline = hub_offline() or not hub_reachable()
    return Path(hf_hub_download(repo_id, "config.json", local_files_only=offline))


def resolve_hub_model(repo_id: str, models: Registry[ModelProfile]) -> ModelProfile:
    """A profile from the hub's config.json for ``repo_id``; UnknownModelError if unavailable."""
    try:
        path = fetch_hub_config(repo_id)
    except ImportError:
        raise _unavailable(repo_id, "huggingface_hub is not installed "
                           "(pip install 'qplan[hub]')", models) from None
    except Exception as e:  # network, auth, offline: all become one domain error
        raise _unavailable(repo_id, _hub_error_reason(e), models) from None
    return load_config_file(path, repo_id, hf_id=repo_id, source=HUB_CONFIG_URL.format(repo_id))


def resolve_model(name: str, models: Registry[ModelProfile]) -> ModelProfile:
    """``--model``: a local path, a catalogue name or alias, or a hub id ``org/name``."""
    text = str(name).strip()
    if not text:
        raise UnknownModelError("no model given; see `qplan models` for the catalogue")
    p = Path(text).expanduser()
    if p.is_file() or (p.is_dir() and (p / "config.json").is_file()) or _looks_like_path(text):
        return _load_local(p, text)
    found = models.find(text)
    if found is not None:
        return found
    if p.is_dir():  # an existing directory without config.json
        return _load_local(p, text)
    if HUB_ID.match(text):
        return resolve_hub_model(text, models)
    return models.get(text)  # raises UnknownModelError with the closest matches
