"""A name -> entry registry with aliases, collision checks and closest-match errors.

The host (qplan) owns one :class:`Registry` per catalogue; built-ins and plugins add
entries through the same ``register`` callback, so names, aliases and collisions are
handled in this one place.
"""
from __future__ import annotations

import difflib
import re
from typing import Callable, Generic, Iterator, TypeVar

from qplan.errors import PluginError

T = TypeVar("T")


def normalize(name: str) -> str:
    """Case-, space- and punctuation-insensitive key: ``"RTX 4090"`` -> ``"rtx4090"``."""
    return re.sub(r"[^a-z0-9.]", "", name.lower())


class Registry(Generic[T]):
    """Entries by name; each entry has ``name``, ``aliases`` and ``provider``."""

    def __init__(self, kind: str, not_found: Callable[[str], Exception]):
        self.kind = kind  # "model" or "GPU", for messages
        self._not_found = not_found
        self._entries: dict[str, T] = {}
        self._keys: dict[str, str] = {}  # normalized name or alias -> name

    def register(self, entry: T, *, provider: str | None = None) -> None:
        """Add ``entry``; a name or alias already taken raises :class:`PluginError`."""
        if provider is not None and getattr(entry, "provider", provider) != provider:
            entry = _with_provider(entry, provider)
        names = [entry.name, *getattr(entry, "aliases", ())]  # type: ignore[attr-defined]
        for n in names:
            key = normalize(n)
            if key in self._keys:
                other = self._entries[self._keys[key]]
                raise PluginError(
                    f"{self.kind} name {n!r} is registered twice: by "
                    f"{getattr(other, 'provider', '?')} ({other.name}) and by "  # type: ignore[attr-defined]
                    f"{getattr(entry, 'provider', '?')} ({entry.name}). "  # type: ignore[attr-defined]
                    "Rename one, or limit which plugins load with QPLAN_LOAD_PLUGINS.")
        self._entries[entry.name] = entry  # type: ignore[attr-defined]
        for n in names:
            self._keys[normalize(n)] = entry.name  # type: ignore[attr-defined]

    def find(self, name: str) -> T | None:
        key = self._keys.get(normalize(name))
        return self._entries[key] if key else None

    def get(self, name: str) -> T:
        """The entry named ``name`` (or an alias); else the domain error with suggestions."""
        found = self.find(name)
        if found is None:
            raise self._not_found(name)
        return found

    def closest(self, name: str, n: int = 3) -> list[str]:
        """Up to ``n`` registered names closest to ``name``."""
        key = normalize(name)
        hits = difflib.get_close_matches(key, list(self._keys), n=n * 3, cutoff=0.4)
        # also: entries whose key contains the query or vice versa
        hits += [k for k in self._keys if key and (key in k or k in key)]
        out: list[str] = []
        for h in hits:
            nm = self._keys[h]
            if nm not in out:
                out.append(nm)
        return out[:n]

    def __iter__(self) -> Iterator[T]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: str) -> bool:
        return self.find(name) is not None

    def names(self) -> list[str]:
        return list(self._entries)


def _with_provider(entry, provider):
    import dataclasses
    return dataclasses.replace(entry, provider=provider)
