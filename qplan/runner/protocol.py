"""What the parent (``qplan run``) and a training child say to each other: typed, versioned
dataclasses, written as JSON files in the attempt's folder.

* :class:`AttemptSpec` (``attempts/N/attempt.json``): what the child is to do, written by
  the parent before it starts the child; it also records what the report needs about the
  attempt (what changed and why, the estimate), so a report can always be rebuilt from disk.
* :class:`StepRecord` (``attempts/N/steps.jsonl``, one line per optimizer step), written
  by the child as it trains.
* :class:`AttemptResult` (``attempts/N/result.json``), written by the child when it ends
  (atomically); a child killed by a signal writes none.
* :class:`AttemptExit` (``attempts/N/exit.json``): how the child process ended, as the
  parent saw it. Missing when the parent itself was stopped while the child ran.

Every file carries ``protocol`` (:data:`VERSION`); reading checks the version, refuses
unknown and missing fields and wrong types, and raises :class:`ProtocolError` naming the
file and the field. No torch here: both sides import this module.
"""
from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from qplan.errors import BadInputError
from qplan.planner.config import TrainConfig
from qplan.planner.plan import Reason

VERSION = 1
T = TypeVar("T")

# How an attempt ended.
OK, OOM, KILLED, INTERRUPTED, ERROR = "ok", "oom", "killed", "interrupted", "error"
ENDINGS = (OK, OOM, KILLED, INTERRUPTED, ERROR)
# Where an out-of-memory error happened.
OOM_PHASES = ("load", "train", "optimizer", "eval")


class ProtocolError(BadInputError):
    """A protocol file that is unreadable, of another version, or malformed."""


@dataclass(frozen=True)
class Simulation:
    """``--simulate-gpu``: the allocator cap that makes a big GPU look like ``name``."""

    name: str
    card_bytes: int
    context_bytes: int
    cap_bytes: int
    fraction: float | None = None  # set by the child: cap / the device's memory
    device_total_bytes: int | None = None


@dataclass(frozen=True)
class Measured:
    """Memory one attempt used, as measured in the child (GiB; None where not measured:
    device memory on CPU, NVML where it cannot see the process)."""

    device: str  # "cpu", or the CUDA device's name
    host_rss_peak_gib: float
    peak_reserved_gib: float | None = None  # torch.cuda.max_memory_reserved
    peak_allocated_gib: float | None = None  # torch.cuda.max_memory_allocated
    nvml_peak_gib: float | None = None  # what nvidia-smi shows, CUDA context included
    cuda_context_gib: float | None = None  # NVML's reading before the model loaded


@dataclass(frozen=True)
class EvalRecord:
    step: int
    eval_loss: float


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step: which positions of the run's row order it consumed, how they
    were split into micro-batches, and its loss (the mean over its label tokens)."""

    step: int
    attempt: int
    positions: list[int]
    micro_batches: list[list[int]]
    rows: list[int]
    loss: float
    tokens: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class AttemptSpec:
    """What one training process does (parent -> child)."""

    attempt: int
    run_dir: str
    attempt_dir: str
    model_path: str
    model_ref: str
    settings: TrainConfig
    total_steps: int
    lr: float
    lr_scheduler: str
    warmup_steps: int
    max_grad_norm: float
    save_steps: int
    eval_steps: int
    keep_checkpoints: int
    seed: int
    resume_from: str | None  # the checkpoint folder, None = a fresh start
    resumed_from: int  # its step (0 = fresh)
    load_optimizer: bool  # False when the optimizer changed since the checkpoint
    device: str  # "cuda" or "cpu"
    progress: bool = True
    simulate: Simulation | None = None
    # for the report (the child does not read them)
    change: Reason | None = None  # what changed from the previous attempt, and why
    estimated_peak_gib: float | None = None
    predicted_tokens_per_s: float | None = None
    # the child stops after its first step when it measured more than this (NVML, context
    # included: the estimate plus its uncertainty band): a re-plan before an OOM
    replan_above_gib: float | None = None
    # data-parallel training processes (DDP; rank from the RANK environment variable): each
    # runs grad_accum / world_size micro-batches of every optimizer step
    world_size: int = 1
    protocol: int = VERSION

    @property
    def distributed(self) -> bool:
        """Whether the attempt runs as ranks of a torch.distributed group: several
        processes, or one under FSDP (CPU offload on one GPU shards across a group of 1)."""
        return self.world_size > 1 or self.settings.strategy == "fsdp"


@dataclass(frozen=True)
class AttemptResult:
    """How one training process ended (child -> parent)."""

    status: str  # ok / oom / interrupted / error
    global_step: int  # the run's step count when it ended
    start_step: int
    steps_done: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    tokens_per_s: float | None = None  # over every step of the attempt
    steady_tokens_per_s: float | None = None  # rows x seq over the median late step
    evals: list[EvalRecord] = field(default_factory=list)
    measured: Measured | None = None
    error: str | None = None
    traceback: str | None = None
    oom_phase: str | None = None  # load / train / optimizer / eval
    oom_step: int | None = None  # the step being trained (or evaluated after) at the OOM
    checkpoint_saved: bool = False  # a checkpoint of global_step exists (interrupt, OOM)
    signal: str | None = None  # SIGTERM / SIGINT for an interrupted attempt
    simulate: Simulation | None = None
    # how the ranks ran (``--gpus N``), as transformers' accelerator set them up: "ddp x2"
    # (None: one process)
    parallel: str | None = None
    wall_s: float = 0.0
    protocol: int = VERSION

    def __post_init__(self) -> None:
        if self.status not in (OK, OOM, INTERRUPTED, ERROR):
            raise ValueError(f"status {self.status!r} is not one of ok, oom, interrupted, error")
        if self.oom_phase is not None and self.oom_phase not in OOM_PHASES:
            raise ValueError(f"oom_phase {self.oom_phase!r} is not one of {', '.join(OOM_PHASES)}")


@dataclass(frozen=True)
class AttemptExit:
    """How the child process ended, as its parent saw it."""

    exit_code: int  # negative: killed by that signal
    wall_s: float
    signal: str | None = None
    protocol: int = VERSION


# ---------------------------------------------------------------------------
# (de)serialization
def to_dict(obj: Any) -> Any:
    """A JSON-ready value of a protocol dataclass (TrainConfig through its own to_dict)."""
    if isinstance(obj, TrainConfig):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _convert(tp: Any, value: Any, where: str) -> Any:
    """``value`` checked (and built) as type ``tp``; ValueError naming ``where``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, where)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ValueError(f"{where} must be a list (got {type(value).__name__})")
        inner = typing.get_args(tp)[0]
        out = [_convert(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return out if origin is list else tuple(out)
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping (got {type(value).__name__})")
        return dict(value)
    if tp is TrainConfig:
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping of settings")
        return TrainConfig.from_dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ValueError(f"{where} must be {tp.__name__} (got {value!r})")
    if tp is Any or tp in (int, float, str, bool):
        return value
    raise TypeError(f"{where}: unsupported type {tp!r}")  # a bug in this module


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """An instance of dataclass ``cls`` from ``data``: every field checked."""
    name = where or cls.__name__
    if not isinstance(data, dict):
        raise ValueError(f"{name} must be a JSON object (got {type(data).__name__})")
    hints = typing.get_type_hints(cls)
    fs = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fs))
    if unknown:
        raise ValueError(f"{name}: unknown field(s) {', '.join(unknown)}")
    missing = [n for n, f in fs.items() if n not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{name}: missing field(s) {', '.join(missing)}")
    if "protocol" in fs and data.get("protocol", VERSION) != VERSION:
        raise ValueError(f"{name}: protocol version {data.get('protocol')!r}; this qplan "
                         f"speaks version {VERSION}")
    kwargs = {k: _convert(hints[k], v, f"{name}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def write(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as JSON atomically (a temporary file renamed over ``path``)."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(to_dict(obj), indent=1))
    os.replace(tmp, path)


def read(cls: type[T], path: str | Path) -> T:
    """Read and check a protocol file; :class:`ProtocolError` naming what is wrong."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ProtocolError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"{path} is unreadable or not valid JSON ({e})") from None
    try:
        return from_dict(cls, data, path.name)
    except (ValueError, TypeError, BadInputError) as e:
        raise ProtocolError(f"{path}: {e}") from None


def read_steps(path: str | Path) -> list[StepRecord]:
    """The steps in a ``steps.jsonl``; a line cut short by a kill ends the list."""
    path = Path(path)
    out: list[StepRecord] = []
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            out.append(from_dict(StepRecord, json.loads(line)))
        except (json.JSONDecodeError, ValueError, TypeError):
            break
    return out
