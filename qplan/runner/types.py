"""What a run is asked to do, and what happened: plain dataclasses, saved as JSON."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

# How an attempt ended.
OK, OOM, KILLED, INTERRUPTED, ERROR = "ok", "oom", "killed", "interrupted", "error"


@dataclass
class RunRequest:
    """Everything ``qplan run`` needs; every field has the CLI flag's meaning.

    ``overrides`` maps :class:`~qplan.planner.config.TrainConfig` field names to values
    that replace the plan's (``{"seq_len": 1024, "batch_size": 2}``).
    """

    model: str | None = None
    data: str | None = None
    plan: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    effective_batch: int | None = None  # target when qplan chooses the plan
    output: str | None = None  # default ./runs/<model>-<timestamp>
    max_steps: int | None = None
    epochs: float = 1.0
    lr: float = 2e-4
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    eval_data: str | None = None
    eval_split: float = 0.0
    eval_steps: int | None = None  # default: at every checkpoint
    completion_only: bool = False
    skip_bad_lines: bool = False
    packing: bool = True
    allow_shorter_seq: bool = False
    max_attempts: int = 4
    save_steps: int | None = None  # default: about 10 checkpoints per run, at most every 100 steps
    keep_checkpoints: int = 2
    seed: int = 42
    simulate_gpu: str | None = None
    gpu: str | None = None
    cpu: bool = False
    resume: str | None = None
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunRequest":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class AttemptReport:
    """One training process: its settings, what it cost, how it ended."""

    attempt: int
    settings: dict[str, Any]
    change: str | None = None  # what changed from the previous attempt, and why
    resumed_from: int = 0  # step of the checkpoint it started from (0 = fresh)
    estimated_peak_gib: float | None = None
    measured: dict[str, Any] = field(default_factory=dict)
    tokens_per_s: float | None = None
    steps_done: int = 0  # optimizer steps this attempt completed
    last_step: int = 0  # the run's step count when it ended
    ended: str = ""  # ok / oom / killed / interrupted / error
    error: str | None = None
    exit_code: int | None = None
    wall_s: float = 0.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AttemptReport":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class RunReport:
    """The whole run, across attempts (and across ``--resume``)."""

    output: str
    status: str  # ok / interrupted / killed / failed
    model: str
    device: str
    planned_for: str  # the GPU profile the plan was made for
    total_steps: int
    steps_done: int
    effective_batch: int
    attempts: list[AttemptReport] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)  # the steps that count, in order
    discarded_steps: list[dict[str, Any]] = field(default_factory=list)  # done, then lost
    data: dict[str, Any] = field(default_factory=dict)
    simulated: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["qplan_report_version"] = 1
        return d
