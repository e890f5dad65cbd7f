"""What a run is asked to do, and what happened: plain dataclasses, saved as JSON."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from qplan.errors import BadInputError
from qplan.planner.plan import Reason
from qplan.runner.protocol import ERROR, INTERRUPTED, KILLED, OK, OOM, Measured, Simulation

__all__ = ["ERROR", "INTERRUPTED", "KILLED", "OK", "OOM", "FAILED", "LR_SCHEDULERS",
           "MAX_EVAL_SPLIT", "REPORT_VERSION", "Measured", "Simulation", "RunRequest",
           "AttemptReport", "RunReport"]

# How a run ended (an attempt's ending is one of protocol.ENDINGS).
FAILED = "failed"
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                 "constant_with_warmup", "inverse_sqrt")
# Held out for evaluation at most: more would leave less to train on than to evaluate.
MAX_EVAL_SPLIT = 0.5
REPORT_VERSION = 2


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
    use_calibration: bool = True  # --calibration/--no-calibration

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def problems(self) -> list[str]:
        """Every value that cannot be meant, each with what is allowed (the CLI's flags
        check most of them too; this is for library callers and saved requests)."""
        p = []

        def num(flag: str, v, lo: float, hi: float = math.inf, *, lo_open=False,
                hi_open=False) -> None:
            ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                  and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi))
            if not ok:
                rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
                p.append(f"{flag} must be a number in {rng} (got {v!r})")

        num("--lr", self.lr, 0, 1, lo_open=True)
        num("--epochs", self.epochs, 0, 1e6, lo_open=True)
        num("warmup_ratio", self.warmup_ratio, 0, 1, hi_open=True)
        num("max_grad_norm", self.max_grad_norm, 0, lo_open=True)
        num("--eval-split", self.eval_split, 0, MAX_EVAL_SPLIT, hi_open=True)
        num("--seed", self.seed, 0, 2**32 - 1)
        for flag, v, lo in (("--max-steps", self.max_steps, 1), ("--save-steps", self.save_steps, 1),
                            ("eval_steps", self.eval_steps, 1), ("--max-attempts", self.max_attempts, 1),
                            ("keep_checkpoints", self.keep_checkpoints, 1),
                            ("--effective-batch", self.effective_batch, 1)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < lo):
                p.append(f"{flag} must be an integer >= {lo} (got {v!r})")
        if self.lr_scheduler not in LR_SCHEDULERS:
            p.append(f"lr_scheduler {self.lr_scheduler!r} is not one of {', '.join(LR_SCHEDULERS)}")
        if self.eval_data and self.eval_split:
            p.append("give --eval-data or --eval-split, not both")
        return p

    def check(self) -> None:
        """BadInputError listing every problem (see :meth:`problems`)."""
        p = self.problems()
        if p:
            raise BadInputError("; ".join(p))


@dataclass
class AttemptReport:
    """One training process: its settings, what it cost, how it ended."""

    attempt: int
    settings: dict[str, Any]
    change: Reason | None = None  # what changed from the previous attempt, and why
    resumed_from: int = 0  # step of the checkpoint it started from (0 = fresh)
    estimated_peak_gib: float | None = None
    measured: Measured | None = None
    tokens_per_s: float | None = None
    steady_tokens_per_s: float | None = None  # without the attempt's first (warm-up) step
    predicted_tokens_per_s: float | None = None  # the speed model, for the GPU that trains
    steps_done: int = 0  # optimizer steps this attempt completed
    last_step: int = 0  # the run's step count when it ended
    ended: str = ""  # ok / oom / killed / interrupted / error
    error: str | None = None
    oom_phase: str | None = None
    oom_step: int | None = None
    exit_code: int | None = None  # None: its supervising process stopped while it ran
    wall_s: float = 0.0
    # data-parallel attempts (settings' gpus > 1): what each rank measured, rank 0 first
    # (the estimate is per GPU); empty for one process
    rank_measured: list[Measured | None] = field(default_factory=list)


@dataclass
class RunReport:
    """The whole run, across attempts (and across ``--resume``)."""

    output: str
    status: str  # ok / interrupted / killed / failed / running
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
    simulated: Simulation | None = None
    notes: list[str] = field(default_factory=list)
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["qplan_report_version"] = REPORT_VERSION
        return d
