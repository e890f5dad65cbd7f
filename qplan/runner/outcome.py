"""What an attempt's files mean: how it ended, and what the run does next.

:func:`ending` reads one attempt's record (its result, how its process exited, or that
its supervising process stopped while it ran); :func:`judge` turns the newest attempt
into a :class:`Verdict`: the run is over (with its status and message), or it retries
after an out-of-memory error. No torch here.
"""
from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path

from qplan.planner.config import TrainConfig
from qplan.runner import checkpoint as CK
from qplan.runner.rundir import AttemptRecord
from qplan.runner.types import ERROR, INTERRUPTED, KILLED, OK, OOM

ORPHANED = ("no result: the `qplan run` process supervising it stopped while it ran (it was "
            "killed, or the machine went down); the training process was stopped with it")


def ending(rec: AttemptRecord) -> str:
    """ok / oom / interrupted / error / killed."""
    if rec.result is not None:
        return rec.result.status
    if rec.exit is None:
        return KILLED  # its parent died; the child died with it
    rc = rec.exit.exit_code
    if rc < 0:
        return INTERRUPTED if -rc in (signal.SIGTERM, signal.SIGINT) else KILLED
    return ERROR


def error_of(rec: AttemptRecord) -> str | None:
    """What went wrong, in words (None for an attempt that ended well)."""
    if rec.result is not None and rec.result.error:
        return rec.result.error
    if rec.exit is None:
        return None if rec.result is not None else ORPHANED
    if rec.exit.exit_code < 0:
        return f"killed by signal {rec.exit.signal or -rec.exit.exit_code}"
    if rec.result is None:
        return f"exit code {rec.exit.exit_code} without a result"
    return None


def last_step(rec: AttemptRecord) -> int:
    """The run's step count when the attempt ended."""
    return max([rec.spec.resumed_from] + [s.step for s in rec.steps])


@dataclass(frozen=True)
class Verdict:
    status: str | None  # the run's status when it ends here; None: try again (after an OOM)
    message: str


def _checkpoint_step(run_dir: Path) -> int:
    last = CK.latest(run_dir / "checkpoints")
    return CK.step_of(last) if last else 0


def _interrupted(rec: AttemptRecord, run_dir: Path) -> Verdict:
    res, step = rec.result, last_step(rec)
    how = f"Continue with: qplan run --resume {run_dir}"
    if res is not None and res.checkpoint_saved:
        return Verdict(INTERRUPTED, f"interrupted after step {step} ({res.signal or 'signal'}); "
                                    f"checkpoint saved. {how}")
    why = (res.error if res is not None and res.error else
           f"stopped by {rec.exit.signal if rec.exit else 'a signal'}")
    return Verdict(INTERRUPTED, f"{why} after step {step}, without saving a checkpoint; the "
                                f"last checkpoint is step {_checkpoint_step(run_dir)} (the steps "
                                f"after it are done again). {how}")


def _oom_where(rec: AttemptRecord) -> str:
    res = rec.result
    step = res.oom_step if res and res.oom_step is not None else last_step(rec) + 1
    return {"eval": f"in evaluation after step {step}",
            "optimizer": f"in the optimizer step of step {step}"}.get(
        res.oom_phase if res else None, f"in training at step {step}")


def judge(history: list[AttemptRecord], run_dir: Path, steps_done: int, total: int) -> Verdict:
    """What the newest attempt means for the run."""
    rec = history[-1]
    end, n, err = ending(rec), rec.spec.attempt, error_of(rec) or ""
    if end == OK:
        return Verdict(OK, f"done: {steps_done}/{total} steps in {len(history)} attempt(s); "
                           f"adapter in {run_dir}")
    if end == INTERRUPTED:
        return _interrupted(rec, run_dir)
    if end == KILLED:
        return Verdict(KILLED, (
            f"the training process was killed ({err}) after step {last_step(rec)}. If nobody "
            "killed it, the host ran out of memory (the kernel's OOM killer: see `dmesg`). "
            f"Steps after the last checkpoint (step {_checkpoint_step(run_dir)}) are lost. "
            f"Continue with: qplan run --resume {run_dir}"))
    if end != OOM:
        tb = ((rec.result and rec.result.traceback) or "").strip().splitlines()[-12:]
        return Verdict("failed", f"attempt {n} failed: {err or 'no reason given'}"
                                 + ("\n" + "\n".join(tb) if tb else ""))
    if rec.result and rec.result.oom_phase == "load":
        return Verdict("failed", (
            f"attempt {n} ran out of GPU memory while loading and preparing the model, before "
            f"training: {err[:300]}. The model does not fit this GPU with these settings (is "
            "another process using it?); try a smaller model or a bigger GPU."))
    return Verdict(None, f"attempt {n} ran out of GPU memory {_oom_where(rec)}: {err[:200]}")


def nothing_fits(cfg: TrainConfig, allow_shorter_seq: bool) -> str:
    from qplan.runner.report import settings_line

    return (f"nothing fits: the last attempt ran out of memory with the safest settings qplan "
            f"knows ({settings_line(cfg)})"
            + ("" if allow_shorter_seq else "; --allow-shorter-seq would also try shorter "
               "sequences") + ". Try a smaller model, a shorter --seq, or a bigger GPU.")
