"""The local calibration store: what ``qplan run`` measured on this machine, for later plans.

Every attempt of ``qplan run`` on a GPU adds one record (JSON Lines, in the qplan home:
``$QPLAN_HOME``, default ``~/.cache/qplan``): the GPU, the architecture (its shape), the
regime the memory figures came from, the estimate's parts and what was measured (memory
without the CUDA context, steady-state tokens per second). Later estimates on this machine
for the same GPU, architecture and regime are corrected by the largest ratio measured
(memory: never below the model; speed: the median ratio), and say so.

``qplan calibrate --show`` lists the records, ``--reset`` deletes them; ``--no-calibration``
(or ``QPLAN_NO_CALIBRATION=1``) plans without them. No torch here.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STORE_VERSION = 1
FILENAME = "calibration.jsonl"
# How far a correction may move an estimate (a wild record must not wreck every plan).
MEMORY_FACTOR_RANGE = (1.0, 1.5)
SPEED_FACTOR_RANGE = (0.5, 1.5)


def qplan_home() -> Path:
    """Where qplan keeps what it learns on this machine."""
    if os.environ.get("QPLAN_HOME"):
        return Path(os.environ["QPLAN_HOME"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qplan"


def disabled() -> bool:
    return os.environ.get("QPLAN_NO_CALIBRATION", "") not in ("", "0")


def architecture_key(model) -> str:
    """One string per architecture shape (what the activation figures depend on)."""
    from qplan.planner.activations import shape_of

    s = shape_of(model)
    return (f"{s['model_type']}:h{s['hidden_size']}:i{s['intermediate_size']}:"
            f"a{s['num_attention_heads']}/{s['num_key_value_heads']}x{s['head_dim']}")


@dataclass(frozen=True)
class Correction:
    """What the store says about one (GPU, architecture, regime)."""

    memory_factor: float = 1.0  # multiplies the activation terms
    speed_factor: float = 1.0  # multiplies the predicted tokens/s
    records: int = 0

    @property
    def used(self) -> bool:
        return self.records > 0


class Store:
    """The records of one machine (``path`` defaults to the qplan home's file)."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else qplan_home() / FILENAME
        self._cache: list[dict] | None = None

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    def records(self) -> list[dict]:
        if self._cache is None:
            out = []
            if self.path.is_file():
                for line in self.path.read_text().splitlines():
                    try:
                        d = json.loads(line)
                    except ValueError:
                        continue  # a torn line from a killed run: skipped
                    if isinstance(d, dict) and d.get("version") == STORE_VERSION:
                        out.append(d)
            self._cache = out
        return self._cache

    def add(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rec = {"version": STORE_VERSION, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **record}
        with open(self.path, "a") as f:  # one write of one line: concurrent runs interleave whole lines
            f.write(json.dumps(rec, sort_keys=True) + "\n")
        self._cache = None

    def reset(self) -> int:
        n = len(self.records())
        if self.path.exists():
            self.path.unlink()
        self._cache = None
        return n

    def correction(self, gpu: str, arch: str, regime: str) -> Correction:
        """The correction for estimates of ``arch`` in ``regime`` on ``gpu``."""
        rel = [r for r in self.records()
               if r.get("gpu") == gpu and r.get("arch") == arch and r.get("regime") == regime]
        if not rel:
            return Correction()
        mem = [r["measured_dynamic_gib"] / r["estimated_dynamic_gib"] for r in rel
               if r.get("measured_dynamic_gib") and r.get("estimated_dynamic_gib")]
        spd = [r["measured_tokens_per_s"] / r["predicted_tokens_per_s"] for r in rel
               if r.get("measured_tokens_per_s") and r.get("predicted_tokens_per_s")
               and not r.get("simulated")]  # a simulated card's speed is the real GPU's
        lo, hi = MEMORY_FACTOR_RANGE
        mf = min(hi, max(lo, max(mem))) if mem else 1.0
        lo, hi = SPEED_FACTOR_RANGE
        sf = min(hi, max(lo, statistics.median(spd))) if spd else 1.0
        return Correction(memory_factor=round(mf, 4), speed_factor=round(sf, 4), records=len(rel))


def attempt_record(*, gpu: str, model, memory, speed, measured: dict[str, Any],
                   steady_tokens_per_s: float | None, simulated: bool = False
                   ) -> dict[str, Any] | None:
    """The store's record of one attempt (None when nothing was measured on a GPU).

    ``memory`` is the attempt's :class:`~qplan.planner.memory.MemoryEstimate`; the dynamic
    part is everything above the weights, adapters, their gradients and the CUDA context,
    measured as NVML's peak of the process less its context less those static terms."""
    from qplan.profiles.gpus import GIB

    nvml, ctx = measured.get("nvml_peak_gib"), measured.get("cuda_context_gib")
    if not nvml or ctx is None:
        return None
    static_keys = ("base_weights_4bit", "unquantized_weights", "lora_adapters", "gradients",
                   "optimizer_states", "libraries", "cuda_context")
    static = sum(t.bytes for t in memory.terms if t.key in static_keys) / GIB
    context_term = memory.term("cuda_context").gib
    est_dynamic = memory.peak_gib - static
    meas_dynamic = nvml - ctx - (static - context_term)
    return {"gpu": gpu, "arch": architecture_key(model), "model": model.name,
            "regime": memory.regime or memory.basis, "settings": memory.config.to_dict(),
            "estimated_peak_gib": round(memory.peak_gib, 3), "measured_nvml_gib": nvml,
            "measured_context_gib": ctx, "estimated_dynamic_gib": round(est_dynamic, 4),
            "measured_dynamic_gib": round(meas_dynamic, 4),
            "predicted_tokens_per_s": round(speed.tokens_per_s, 1) if speed else None,
            "measured_tokens_per_s": steady_tokens_per_s, "simulated": simulated,
            "device": measured.get("device")}


def speed_record(*, gpu: str, model, memory, speed, steady_tokens_per_s: float,
                 device: str | None = None) -> dict[str, Any]:
    """A speed-only record: the steady tokens/s an attempt measured on ``gpu``, the GPU that
    trained, against the prediction for it, when the attempt's plan was for another card
    (``--simulate-gpu``, or ``--gpu`` naming another card): no memory figures (the card's
    record has them), so only the speed correction of ``gpu`` uses it."""
    return {"gpu": gpu, "arch": architecture_key(model), "model": model.name,
            "regime": memory.regime or memory.basis, "settings": memory.config.to_dict(),
            "predicted_tokens_per_s": round(speed.tokens_per_s, 1),
            "measured_tokens_per_s": steady_tokens_per_s, "simulated": False,
            "speed_only": True, "device": device}
