"""The training process of one attempt: ``python -m qplan.runner.child ATTEMPT_JSON``.

The parent (:mod:`qplan.runner.run`) writes ``attempt.json`` (a
:class:`~qplan.runner.protocol.AttemptSpec`) and starts this process with the plan's
environment (``PYTORCH_CUDA_ALLOC_CONF`` is set before torch starts). It dies with its
parent (:func:`qplan.runner.supervise.watch_parent`), trains (:mod:`qplan.runner.trainer`),
appends one :class:`~qplan.runner.protocol.StepRecord` per optimizer step to
``steps.jsonl`` and, at the end, writes ``result.json`` (an
:class:`~qplan.runner.protocol.AttemptResult`). Exit codes: 0 ok, 17 out of memory, 18
interrupted (SIGTERM / Ctrl-C), 1 error. A process killed by a signal writes nothing;
the parent sees the signal in its exit code.

Data order: optimizer step k (0-based) consumes the rows at positions
``[k*E, (k+1)*E)`` of one fixed sequence (epochs of seeded permutations of the rows),
split into micro-batches of the current per-device batch. A resumed attempt skips
``k*E`` positions, so every step is done with the same rows whatever the split.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from qplan.runner import protocol as P
from qplan.runner.supervise import local_rank, rank
from qplan.runner.protocol import ERROR, INTERRUPTED, OK, OOM

EXIT_OK, EXIT_ERROR, EXIT_OOM, EXIT_INTERRUPTED = 0, 1, 17, 18
EXIT_CODES = {OK: EXIT_OK, OOM: EXIT_OOM, INTERRUPTED: EXIT_INTERRUPTED, ERROR: EXIT_ERROR}


class StopFlag:
    """SIGTERM / SIGINT: finish the step, save a checkpoint, exit. A second Ctrl-C stops now."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, _frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        print(f"\n{self.signal_name}: stopping after this step and saving a checkpoint "
              "(Ctrl-C again stops at once, without saving)", file=sys.stderr, flush=True)


def is_oom(e: BaseException) -> bool:
    import torch

    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def quiet_libraries() -> None:
    """Keep the console for qplan's progress: no library progress bars or deprecation chatter."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*[Pp]aged optimizers are not supported on CPU.*")
    warnings.filterwarnings("ignore", message=".*Consider using tensor.detach.*")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import datasets

    datasets.disable_progress_bars()


# ---------------------------------------------------------------------------
# one attempt
def _load(spec: P.AttemptSpec, fp):
    """The tokenizer, the prepared LoRA model and its optimizer (the ``load`` failpoint
    fires after them); the simulated cap is set here."""
    from transformers import AutoTokenizer, set_seed

    from qplan import api
    from qplan.runner import techniques as T

    cfg, cuda = spec.settings, spec.device == "cuda"
    tok = AutoTokenizer.from_pretrained(str(Path(spec.run_dir) / "tokenizer"))
    model = T.load_model(spec.model_path, cfg, device_map=_device_map(cfg, cuda))
    T.prepare_for_training(model, cfg)
    set_seed(spec.seed)  # the LoRA initialization (a resumed attempt loads the checkpoint's)
    model = T.add_lora(model, api.get_model(spec.model_ref), cfg)
    if cfg.strategy == "fsdp" and spec.resume_from:
        # before sharding: the Trainer's resume would copy whole tensors into sharded ones
        T.load_adapter_weights(model, spec.resume_from)
    simulate = _simulate(spec.simulate) if spec.simulate else None
    # FSDP: the optimizer is made over the sharded parameters, after the Trainer wraps them
    optimizer = (None if cfg.strategy == "fsdp"
                 else T.make_optimizer(model.parameters(), cfg, lr=spec.lr))
    fp.fire("load", 0)
    return tok, model, optimizer, simulate


def _device_map(cfg, cuda: bool):
    """Where ``from_pretrained`` puts (and quantizes) the weights: this rank's GPU; under
    FSDP the host (each GPU then receives only its shard, one block at a time, when the
    Trainer wraps the model: a whole 4-bit copy need not fit one GPU). ``QPLAN_FSDP_LOAD=gpu``
    quantizes on the GPU instead (faster; the whole model must fit it while loading)."""
    if not cuda:
        return None
    if cfg.strategy == "fsdp" and os.environ.get("QPLAN_FSDP_LOAD", "cpu") != "gpu":
        return {"": "cpu"}
    return {"": local_rank()}


def _simulate(s: P.Simulation) -> P.Simulation:
    import torch

    dev = local_rank()
    total = torch.cuda.get_device_properties(dev).total_memory
    frac = min(1.0, s.cap_bytes / total)
    torch.cuda.set_per_process_memory_fraction(frac, dev)
    return dataclasses.replace(s, fraction=round(frac, 5), device_total_bytes=total)


def _datasets(spec: P.AttemptSpec, tok):
    """(train rows in the run's order, eval rows or None, label tokens of each step)."""
    from datasets import load_from_disk

    from qplan.runner.data import pad_token_id, step_order
    from qplan.runner.trainer import Rows, step_label_tokens

    cfg, run_dir = spec.settings, Path(spec.run_dir)
    rows = load_from_disk(str(run_dir / "data" / "train"))
    order = step_order(len(rows), spec.total_steps * cfg.effective_batch, spec.seed)
    pad = pad_token_id(tok)
    per_step = step_label_tokens(rows, order, cfg.seq_len, cfg.effective_batch)
    eval_ds = None
    if (run_dir / "data" / "eval").is_dir():
        ev = load_from_disk(str(run_dir / "data" / "eval"))
        eval_ds = Rows(ev, list(range(len(ev))), cfg.seq_len, pad)
    return Rows(rows, order, cfg.seq_len, pad), eval_ds, per_step


def _trainer(spec, tok, model, optimizer, train_ds, eval_ds, ctx):
    from transformers import PrinterCallback

    from qplan.runner.trainer import QplanCallback, QplanTrainer, collate, training_arguments

    args = training_arguments(spec, spec.device == "cuda", eval_ds is not None)
    trainer = QplanTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                           processing_class=tok, data_collator=collate,
                           optimizers=(optimizer, None) if optimizer is not None else (None, None),
                           callbacks=[QplanCallback(ctx)], ctx=ctx)
    trainer.remove_callback(PrinterCallback)  # qplan's progress shows the loss
    return trainer


def _speeds(ctx, spec: P.AttemptSpec) -> tuple[float | None, float | None]:
    """Tokens/s over the attempt's steps (the examples' tokens), and the steady state: every
    row's tokens (padding included: what the GPU computes, what the speed model predicts) over
    the median time of the steps after the first two (warm-up)."""
    import statistics

    t = sum(s for _, s in ctx.steps)
    speed = round(sum(n for n, _ in ctx.steps) / t, 1) if ctx.steps and t > 0 else None
    late = [s for _, s in ctx.steps[2:]] or [s for _, s in ctx.steps[1:]]
    cfg = spec.settings
    steady = (round(cfg.tokens_per_step / statistics.median(late), 1)
              if late and statistics.median(late) > 0 else None)
    return speed, steady


def train(spec: P.AttemptSpec, stop: StopFlag) -> P.AttemptResult:
    """One attempt, from loading the model to saving the adapter; the result."""
    quiet_libraries()
    from qplan.runner import checkpoint as CK
    from qplan.runner import failpoints as F
    from qplan.runner.monitor import MemoryMonitor, Progress
    from qplan.runner.trainer import Context
    from qplan.runner.trainer_compat import check

    check()
    fp = F.Failpoints(F.from_env(), spec.attempt, rank())
    if spec.device == "cuda":  # rank k trains on GPU k: its context, monitor and cap there
        import torch

        torch.cuda.set_device(local_rank())
    # QPLAN_SAMPLE_INTERVAL_S: the memory sampler's period (benchmarks compare it; 0.02 s)
    monitor = MemoryMonitor(spec.device == "cuda",
                            interval_s=_env_seconds("QPLAN_SAMPLE_INTERVAL_S", 0.02)).start()
    tok, model, optimizer, simulate = _load(spec, fp)
    train_ds, eval_ds, per_step = _datasets(spec, tok)
    progress = Progress(spec.total_steps, spec.resumed_from, spec.attempt, spec.progress)
    with open(Path(spec.attempt_dir) / "steps.jsonl", "a") as steps_file:
        ctx = Context(spec, fp, stop, progress, monitor, steps_file, per_step)
        trainer = _trainer(spec, tok, model, optimizer, train_ds, eval_ds, ctx)
        _announce(spec, progress)
        oom = _train(trainer, spec, progress)
    status, extra = _ending(trainer, ctx, model, oom, fp)
    monitor.stop()
    speed, steady = _speeds(ctx, spec)
    step = trainer.state.global_step
    return P.AttemptResult(
        status=status, global_step=step, start_step=ctx.start_step, steps_done=len(ctx.steps),
        tokens=sum(n for n, _ in ctx.steps), train_seconds=round(sum(s for _, s in ctx.steps), 3),
        tokens_per_s=speed, steady_tokens_per_s=steady, evals=ctx.evals,
        measured=monitor.report(), simulate=simulate,
        checkpoint_saved=CK.is_complete(Path(spec.run_dir) / "checkpoints" / CK.name_for(step)),
        parallel=_parallel(trainer) if spec.distributed else None, **extra)


def _parallel(trainer) -> str:
    """How transformers' accelerator ran the ranks ("ddp x2"): a check that they did."""
    acc = trainer.accelerator
    kind = "fsdp" if getattr(trainer, "is_fsdp_enabled", False) else "ddp"
    return f"{kind} x{acc.num_processes}"


def _announce(spec: P.AttemptSpec, progress) -> None:
    cfg = spec.settings
    what = (f"resuming after step {spec.resumed_from} of {spec.total_steps}" if spec.resume_from
            else f"training {spec.total_steps} steps")
    progress.line(f"attempt {spec.attempt}: {what} ({cfg.effective_batch} rows a step: batch "
                  f"{cfg.batch_size} x accumulation {cfg.grad_accum}, seq {cfg.seq_len})")


def _train(trainer, spec: P.AttemptSpec, progress) -> str | None:
    """Train; the out-of-memory error's text if one stopped it (other errors propagate)."""
    try:
        trainer.train(resume_from_checkpoint=spec.resume_from)
    except Exception as e:  # noqa: BLE001 - only out-of-memory errors are handled here
        if not is_oom(e):
            raise
        return " ".join(str(e).split())[:600]
    finally:
        progress.stop()
    return None


def _ending(trainer, ctx, model, oom: str | None, fp) -> tuple[str, dict[str, Any]]:
    """The status and what goes with it; after success the adapter is saved."""
    if oom is not None:
        _save_after_oom(trainer, ctx, model)
        step = trainer.state.global_step + (0 if ctx.phase == "eval" else 1)
        return OOM, dict(error=oom, oom_phase=ctx.phase, oom_step=step)
    if ctx.interrupted:
        return INTERRUPTED, dict(signal=ctx.stop.signal_name)
    fp.fire("end", trainer.state.global_step)
    if rank() == 0 or ctx.cfg.strategy == "fsdp":  # FSDP: every rank joins the gather
        trainer.save_model(ctx.spec.run_dir)
    return OK, {}


def _save_after_oom(trainer, ctx, model) -> None:
    """After an OOM outside the optimizer step, the parameters, optimizer and scheduler are
    still those of the last completed step: save them, so the next attempt loses nothing.
    An OOM inside ``optimizer.step()`` may have updated some parameters: no save then."""
    from qplan.runner import checkpoint as CK
    from qplan.runner.techniques import free_cached_memory

    step = trainer.state.global_step
    if ctx.phase == "optimizer" or step <= ctx.start_step or rank() != 0:
        return
    if ctx.cfg.strategy == "fsdp":  # saving gathers from every rank; the others have stopped
        return
    try:
        model.zero_grad(set_to_none=True)
        free_cached_memory()
        if not CK.is_complete(Path(ctx.spec.run_dir) / "checkpoints" / CK.name_for(step)):
            trainer._save_checkpoint(model, None)
    except Exception as e:  # noqa: BLE001 - the last regular checkpoint still stands
        print(f"could not save a checkpoint after the OOM: {e}", file=sys.stderr)


# ---------------------------------------------------------------------------
def _failed(spec: P.AttemptSpec, e: BaseException) -> P.AttemptResult:
    oom = False
    try:
        oom = is_oom(e)
    except Exception:  # noqa: BLE001 - torch itself may be what failed
        pass
    # training catches its own OOMs: this one came while loading or preparing
    return P.AttemptResult(status=OOM if oom else ERROR, global_step=spec.resumed_from,
                           start_step=spec.resumed_from, error=f"{type(e).__name__}: {e}",
                           traceback=traceback.format_exc(), oom_phase="load" if oom else None)


def _profiled(fn, *args):
    """``fn(*args)``, under cProfile when ``QPLAN_PROFILE`` names a file (rank 0 only): the
    host time of a training process by function (benchmarks/ddp_gpu.py --profile), written
    there as text."""
    path = os.environ.get("QPLAN_PROFILE")
    if not path or rank() != 0:
        return fn(*args)
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    try:
        return prof.runcall(fn, *args)
    finally:
        out = io.StringIO()
        st = pstats.Stats(prof, stream=out)
        st.sort_stats("tottime").print_stats(45)
        st.sort_stats("cumulative").print_stats(60)
        Path(path).write_text(out.getvalue())


def _env_seconds(name: str, default: float) -> float:
    """A benchmark's or a diagnosis's period in seconds from the environment; ``default`` when
    unset, not a number or not positive (these settings are for measuring, not for failing)."""
    try:
        v = float(os.environ.get(name) or default)
    except ValueError:
        return default
    return v if v > 0 and v == v and v != float("inf") else default


def _dump_stacks_when_stuck(spec) -> None:
    """``QPLAN_HANG_DUMP_S=N``: every N seconds, each thread's Python stack into
    ``stacks-rank{R}.txt`` in the attempt's folder (a hang between ranks, found on the GPU
    machine after the fact; faulthandler writes from a C thread, so a stuck collective or a
    held lock does not stop it). Diagnostics only: it reads other threads' states without
    their locks, and one two-GPU run with it on ended in a segmentation fault."""
    every = _env_seconds("QPLAN_HANG_DUMP_S", 0.0)
    if every <= 0:
        return
    import faulthandler

    f = open(Path(spec.attempt_dir) / f"stacks-rank{rank()}.txt", "w")  # noqa: SIM115 - kept open
    faulthandler.dump_traceback_later(every, repeat=True, file=f)


def main(argv: list[str] | None = None) -> int:
    from qplan.runner.supervise import watch_parent

    watch_parent()
    argv = sys.argv[1:] if argv is None else argv
    try:
        spec = P.read(P.AttemptSpec, argv[0])
    except P.ProtocolError as e:  # written by another qplan, or damaged
        P.write(Path(argv[0]).parent / "result.json", P.AttemptResult(
            status=ERROR, global_step=0, start_step=0, error=str(e)))
        return EXIT_ERROR
    stop = StopFlag()
    stop.install()
    _dump_stacks_when_stuck(spec)
    t0 = time.time()
    try:
        result = _profiled(train, spec, stop)
    except KeyboardInterrupt:
        result = P.AttemptResult(status=INTERRUPTED, global_step=spec.resumed_from,
                                 start_step=spec.resumed_from, signal="SIGINT",
                                 error="stopped at once by a second Ctrl-C")
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which explains it
        result = _failed(spec, e)
    result = dataclasses.replace(result, wall_s=round(time.time() - t0, 2))
    P.write(Path(spec.attempt_dir) / "result.json", result)
    code = EXIT_CODES.get(result.status, EXIT_ERROR)
    if result.status != OK and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # one of several ranks that ended badly: leave now. The interpreter's teardown
        # (the process group's, CUDA's) could wait for collectives the peers will never
        # join; the supervisor stops the peers (supervise.wait_ranks).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
