"""What the commands share: the training-knob flags, GPU resolution, error handling.

The knob flags are generated from :class:`~qplan.planner.config.TrainConfig`: names as in
the docs, choices from the config module's tuples, defaults from the dataclass, so the
CLI cannot drift from the library.
"""
from __future__ import annotations

import functools
import math
from dataclasses import MISSING, dataclass, fields
from typing import Any, Callable

import click

from qplan.errors import BadInputError, DoesNotFitError, NoGpuError, QplanError
from qplan.planner import config as C


class FiniteFloat(click.FloatRange):
    """A float in a range that is a number: click's FloatRange lets nan and inf through."""

    def convert(self, value, param, ctx):
        v = super().convert(value, param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return v


@dataclass(frozen=True)
class Knob:
    """One ``TrainConfig`` field as a flag."""

    field: str
    flag: str  # "--seq", or "--grad-ckpt/--no-grad-ckpt" for booleans
    help: str
    type: Any = None  # click type; None for booleans

    @property
    def param(self) -> str:
        return self.field


KNOBS: tuple[Knob, ...] = (
    Knob("seq_len", "--seq", "sequence length in tokens", click.IntRange(min=1)),
    Knob("batch_size", "--batch", "per-device micro-batch size", click.IntRange(min=1)),
    Knob("grad_accum", "--grad-accum", "gradient accumulation steps", click.IntRange(min=1)),
    Knob("lora_rank", "--rank", "LoRA rank r", click.IntRange(min=1)),
    Knob("lora_alpha", "--alpha", "LoRA alpha", click.IntRange(min=1)),
    Knob("lora_targets", "--targets",
         "LoRA target modules: 'all' (every linear layer in the blocks) or a comma list "
         "such as q,k,v,o or q_proj,v_proj", str),
    Knob("lora_dropout", "--lora-dropout", "LoRA dropout probability",
         FiniteFloat(0.0, 1.0, max_open=True)),
    Knob("grad_ckpt", "--grad-ckpt/--no-grad-ckpt", "gradient checkpointing"),
    Knob("optim", "--optim", "optimizer", click.Choice(C.OPTIMIZERS)),
    Knob("prepare", "--prepare",
         "kbit = peft prepare_model_for_kbit_training (non-4-bit params to float32); "
         "lean = keep them 16-bit", click.Choice(C.PREPARE_MODES)),
    Knob("loss", "--loss", "standard cross-entropy, or fused (never materializes float32 "
         "logits)", click.Choice(C.LOSS_MODES)),
    Knob("attn", "--attn", "attention implementation", click.Choice(C.ATTN_IMPLS)),
    Knob("quant", "--quant", "4-bit quantization type (none = plain LoRA on 16-bit weights)",
         click.Choice(C.QUANT_TYPES)),
    Knob("double_quant", "--double-quant/--no-double-quant", "double quantization"),
    Knob("compute_dtype", "--compute-dtype", "compute dtype (bf16 needs compute capability "
         ">= 8.0)", click.Choice(C.DTYPES)),
    Knob("expandable_segments", "--expandable-segments/--no-expandable-segments",
         "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"),
    Knob("offload_activations", "--offload-activations/--no-offload-activations",
         "keep each checkpointed block's input in (pinned) CPU memory until its backward"),
    Knob("loss_chunk", "--loss-chunk", "logit elements per chunk of the fused loss "
         "(rows = this / vocabulary size)", click.IntRange(min=1024)),
    Knob("mlp_chunk", "--mlp-chunk", "run each block's MLP over the sequence in recomputed "
         "chunks of this many tokens (0 = off)", click.IntRange(min=0)),
    Knob("embed_on_cpu", "--embed-on-cpu/--no-embed-on-cpu",
         "keep the frozen input embeddings in CPU memory (untied embeddings only)"),
    Knob("recompute_norms", "--recompute-norms/--no-recompute-norms",
         "RMSNorms keep only their input for backward, not a float32 copy"),
    Knob("packed_rows", "--packed-rows/--no-packed-rows",
         "rows pack several examples, as qplan run does (sdpa/eager then need a seq x seq mask)"),
    Knob("gpus", "--gpus", "GPUs, one training process each: every optimizer step's "
         "micro-batches are split across them (same effective batch); memory figures are per "
         "GPU", click.IntRange(min=1, max=64)),
    Knob("strategy", "--strategy", "how the --gpus share the model: ddp = a whole copy on "
         "each; fsdp = weights, adapters and optimizer sharded across them (for a model one "
         "GPU cannot hold)", click.Choice(C.STRATEGIES)),
    Knob("offload_params", "--offload-params/--no-offload-params",
         "FSDP with CPU offload: the weights' shards, adapters and optimizer states in pinned "
         "host memory, each block copied to the GPU when it runs (slow; for a model the GPUs "
         "cannot hold even sharded; also on one GPU). suggest falls back to it when nothing "
         "else fits unless --no-offload-params"),
)
KNOB_BY_FIELD = {k.field: k for k in KNOBS}


def config_defaults() -> dict[str, Any]:
    """``TrainConfig``'s field defaults (the flag defaults of ``qplan estimate``)."""
    return {f.name: f.default for f in fields(C.TrainConfig) if f.default is not MISSING}


def knob_options(*, defaults: bool, skip: tuple[str, ...] = ()) -> Callable:
    """Decorator adding every knob flag. ``defaults=False`` (suggest): unset flags are None,
    meaning "search this"; ``defaults=True`` (estimate): TrainConfig's defaults."""
    dflt = config_defaults()

    def deco(fn):
        for k in reversed(KNOBS):
            if k.field in skip:
                continue
            d = dflt[k.field] if defaults else None
            if k.field == "lora_targets" and defaults:
                d = "all" if d is None else ",".join(d)
            kw: dict[str, Any] = dict(default=d, help=k.help, show_default=defaults)
            if k.field == "attn" and defaults:  # the model's: Gemma 2 has no sdpa
                kw.update(default=None, show_default=False,
                          help=k.help + "  [default: sdpa; eager for models transformers has "
                          "no sdpa for (Gemma 2)]")
            if k.type is not None:
                kw["type"] = k.type
            fn = click.option(k.flag, k.field, **kw)(fn)
        return fn
    return deco


def knob_values(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pop the knob flags from a command's kwargs: field -> value, unset (None) dropped."""
    out = {}
    for k in KNOBS:
        v = kwargs.pop(k.field, None)
        if v is None:
            continue
        if k.field == "lora_targets":
            parts = tuple(p.strip() for p in v.split(",") if p.strip())
            v = None if parts in ((), ("all",), ("all-linear",)) else parts
            if v is None:
                continue
        out[k.field] = v
    return out


def flag_of(field: str) -> str:
    """The flag a user types for ``field`` (``--grad-ckpt`` for ``grad_ckpt``)."""
    return KNOB_BY_FIELD[field].flag.split("/")[0]


# ---------------------------------------------------------------------------
@dataclass
class Target:
    """The GPU a command plans for, and what was learned about the machine."""

    gpu: Any  # GpuProfile
    capacity_bytes: int | None
    detected: bool
    flash_attn_available: bool
    host_ram_bytes: int | None
    notes: list[str]
    reserve_bytes: int | None = None  # --reserve; None: by the card's kind
    count: int | None = None  # --gpu CARD xN: N (None: one card named)


NO_GPU_MESSAGE = (
    "no NVIDIA GPU was found on this machine ({why}). Name the card to plan for: "
    "--gpu rtx-4060, or a memory size: --gpu 8GB (or --vram 8). `qplan gpus` lists the "
    "catalogue.")


def resolve_target(gpu: str | None, vram: float | None, reserve: float | None = None,
                   allow_count: bool = False) -> Target:
    """``--gpu`` / ``--vram`` / ``--reserve``, else the detected GPU 0; :class:`NoGpuError`
    when neither. With ``allow_count``, ``--gpu rtx-4090 x2`` is 2 of that card
    (``Target.count``); elsewhere a count is refused."""
    import dataclasses

    from qplan import api
    from qplan.errors import BadInputError

    count = None
    if gpu is not None:
        card, count = api.split_gpu_count(gpu)
        if count is not None and not allow_count:
            raise BadInputError(f"--gpu {gpu!r} names {count} cards; this command takes one "
                                f"(--gpu {card})")
        gpu = card
    t = dataclasses.replace(_resolve_gpu(gpu, vram), count=count)
    if reserve is None:
        return t
    from qplan.profiles.gpus import GIB

    if not 0 <= reserve < t.gpu.memory_gib:
        from qplan.errors import BadInputError

        raise BadInputError(f"--reserve must be between 0 and the card's {t.gpu.memory_gib:g} GiB "
                            f"(got {reserve:g}); it is GiB the display and other programs hold")
    return dataclasses.replace(t, reserve_bytes=int(reserve * GIB))


calibration_option = click.option(
    "--calibration/--no-calibration", default=True, show_default=True,
    help="correct estimates with what `qplan run` measured on this machine (qplan calibrate)")

reserve_option = click.option(
    "--reserve", type=FiniteFloat(min=0), help="GiB the card loses to the display and other programs "
    "(default: 0.5 for desktop cards, 0.3 laptops, 0 datacentre cards)")


def _check_vram(vram: float | None) -> None:
    from qplan.errors import BadInputError

    if vram is not None and not (math.isfinite(vram) and 0 < vram <= 4096):
        raise BadInputError(f"--vram must be a positive number of GiB up to 4096, such as 8 "
                            f"or 11.5 (got {vram:g})")


def _cap(vram: float | None, card: str, card_bytes: int, notes: list[str]) -> int | None:
    """``--vram`` as bytes, refused when larger than the card it caps."""
    from qplan.errors import BadInputError
    from qplan.profiles.gpus import GIB

    if vram is None:
        return None
    cap = int(vram * GIB)
    if cap > card_bytes:
        raise BadInputError(f"--vram {vram:g} is more than {card}'s {card_bytes / GIB:g} GiB; "
                            "--vram can only lower the memory planned for. Drop --vram, or "
                            f"give --gpu {vram:g}GB to plan for a card of that size")
    notes.append(f"memory capped at {vram:g} GiB by --vram")
    return cap


def _resolve_gpu(gpu: str | None, vram: float | None) -> Target:
    """``--gpu`` / ``--vram``, else the detected GPU 0; :class:`NoGpuError` when neither."""
    from qplan import api

    _check_vram(vram)
    notes: list[str] = []
    if gpu is not None:
        g = api.get_gpu(gpu)
        cap = _cap(vram, g.name, g.memory_bytes, notes)
        if g.notes:
            notes.append(g.notes)
        return Target(g, cap, False, False, None, notes)

    from qplan.planner.hardware import probe

    hw = probe(gpus=api.catalog().gpus)
    if not hw.gpus:
        if vram is not None:
            g = api.get_gpu(f"{vram:g}")
            return Target(g, None, False, False, None, [g.notes])
        why = hw.notes[0] if hw.notes else "NVML reports no devices"
        raise NoGpuError(NO_GPU_MESSAGE.format(why=why))
    d = hw.gpus[0]
    g = d.profile
    notes.append(f"detected GPU 0: {d.name} ({d.total_gib:.1f} GiB, cc "
                 f"{d.compute_capability[0]}.{d.compute_capability[1]}) -> profile {g.name}")
    if len(hw.gpus) > 1:
        same = sum(1 for x in hw.gpus if x.profile.name == g.name)
        notes.append(f"{len(hw.gpus)} GPUs detected; planning for GPU 0 ({g.name}) only: "
                     f"--gpus N plans data-parallel training on N of them (one process each; "
                     f"{same} are {g.name})")
    if not d.matched:
        notes.append(g.notes)
    if d.free_bytes is not None and d.free_bytes < 0.9 * d.total_bytes:
        notes.append(f"GPU 0 has only {d.free_gib:.1f} GiB free of {d.total_gib:.1f} GiB: "
                     "other processes use it; the plan assumes the whole card")
    cap = _cap(vram, f"GPU 0 ({d.name})", d.total_bytes, notes)
    return Target(g, cap, True, hw.flash_attn, hw.ram_limit_bytes, notes)


def model_notes(model) -> list[str]:
    """What a plan for ``model`` leaves out (a multimodal model's vision tower)."""
    if not model.unmodelled:
        return []
    return [f"{model.name}: not counted: {model.unmodelled}; the estimate is for the "
            "language model alone"]


# ---------------------------------------------------------------------------
def fail(err: QplanError, *, as_json: bool) -> None:
    """Report a domain error and exit with its code (2 bad input, 3 does not fit, ...)."""
    from qplan import render

    if as_json:
        render.print_json(render.error_dict(err))
    elif isinstance(err, DoesNotFitError):
        render.print_lines([f"does not fit: {err}"], style="bold red")
        if err.estimate is not None:
            c = err.estimate.config
            render.print_breakdown(render.memory_dict(err.estimate),
                                   title="Smallest configuration tried", fit_line=False)
            render.print_lines([
                f"  (batch {c.batch_size}, gradient checkpointing "
                f"{'on' if c.grad_ckpt else 'off'}, loss {c.loss}, prepare {c.prepare}, "
                f"optimizer {c.optim}, activation offload "
                f"{'on' if c.offload_activations else 'off'})"])
        if err.alternatives:
            render.print_lines(["Nearest plans that fit:"] + [f"  {a}" for a in err.alternatives])
        else:
            render.print_lines(["No nearby plan fits (tried a shorter sequence, a smaller model "
                                "of the same family and bigger cards)."])
    else:
        render.print_error(str(err))
    raise click.exceptions.Exit(getattr(err, "exit_code", 2))


def fail_unexpected(err: BaseException, *, as_json: bool) -> None:
    """A file-system error or a bug, as a message: never a traceback (QPLAN_DEBUG=1 re-raises).

    An OSError (a path that cannot be read or written) is the user's input: exit 2. Any
    other exception is a bug in qplan or a plugin: exit 1, and how to see the traceback."""
    import os

    if os.environ.get("QPLAN_DEBUG"):
        raise err
    if isinstance(err, OSError):
        where = f" {err.filename!r}" if err.filename else ""
        e = BadInputError(f"cannot use{where}: {err.strerror or err}; check the path and its "
                          "permissions")
        fail(e, as_json=as_json)
    e = QplanError(f"unexpected error: {type(err).__name__}: {err}. This is a bug; run again "
                   "with QPLAN_DEBUG=1 for the traceback and report it")
    e.exit_code = 1
    fail(e, as_json=as_json)


def reporting_errors(call: Callable[[], Any], *, as_json: bool = False):
    """``call()``, whatever it raises turned into a message and its exit code: qplan's
    domain errors with their own code, the rest through :func:`fail_unexpected`."""
    try:
        return call()
    except QplanError as e:
        fail(e, as_json=as_json)
    except (click.exceptions.Exit, click.ClickException, click.Abort, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - see fail_unexpected
        fail_unexpected(e, as_json=as_json)


def handles_errors(fn: Callable) -> Callable:
    """A command whose errors are messages (:func:`reporting_errors`), as JSON with --json."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return reporting_errors(functools.partial(fn, *args, **kwargs),
                                as_json=bool(kwargs.get("as_json")))
    return wrapper


def examples(*commands: str) -> str:
    """A command's help epilog: literal example invocations."""
    return "\n\b\nExamples:\n" + "".join(f"  {c}\n" for c in commands)


# The largest effective batch (rows per optimizer step) qplan plans for.
MAX_EFFECTIVE_BATCH = 1 << 20

json_option = click.option("--json", "as_json", is_flag=True,
                           help="print JSON (schema: docs/json-schema.md)")
__all__ = ["KNOBS", "FiniteFloat", "MAX_EFFECTIVE_BATCH", "Target", "examples", "fail",
           "fail_unexpected", "handles_errors", "json_option", "reporting_errors",
           "knob_options", "knob_values", "model_notes", "resolve_target", "config_defaults",
           "flag_of", "NoGpuError", "reserve_option", "calibration_option"]
