"""The parts of transformers' ``Trainer`` the runner relies on beyond its public API.

:mod:`qplan.runner.trainer` overrides two private methods and calls three private
helpers, and sets an option that older versions lack. pyproject's floors are the
lowest versions CI tests (it tests the latest too); :func:`check` refuses a version that
lacks any of them before a model is loaded, naming what is missing, instead of failing
in the middle of a run.
"""
from __future__ import annotations

from qplan.errors import RunError

# Private methods overridden or called (and what for).
PRIVATE = {
    "_save_checkpoint": "overridden: atomic checkpoints with a COMPLETE marker",
    "_load_optimizer_and_scheduler": "overridden: keep only the schedule when the optimizer changed",
    "_save_optimizer_and_scheduler": "called when writing a checkpoint",
    "_save_scaler": "called when writing a checkpoint",
    "_save_rng_state": "called when writing a checkpoint",
}
# Public names newer than some versions pyproject once allowed.
PUBLIC: dict[str, str] = {}
ARGUMENTS = {"train_sampling_strategy": "TrainingArguments field (transformers >= 5.5)"}


def missing() -> list[str]:
    """What the installed transformers lacks of what the runner uses."""
    import dataclasses

    from transformers import Trainer, TrainingArguments

    out = [f"Trainer.{n} ({why})" for n, why in {**PRIVATE, **PUBLIC}.items()
           if not hasattr(Trainer, n)]
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    out += [f"TrainingArguments.{n} ({why})" for n, why in ARGUMENTS.items() if n not in fields]
    return out


def check() -> None:
    gone = missing()
    if gone:
        import transformers

        raise RunError(f"transformers {transformers.__version__} lacks what qplan's runner "
                       f"uses: {'; '.join(gone)}. Install a version qplan supports: pip install "
                       "'qplan[train]' (see pyproject.toml)")
