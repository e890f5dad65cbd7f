"""``qplan run``'s library side: plan, prepare the data, run attempts, recover, report.

The loop is plan -> attempt -> result -> next plan:

* :func:`_next_spec` turns the current settings and the checkpoints on disk into the
  next :class:`~qplan.runner.protocol.AttemptSpec`;
* :func:`_attempt` runs it in a child process (:mod:`qplan.runner.child`) that cannot
  outlive this one (:mod:`qplan.runner.supervise`), and reads back what it wrote;
* :func:`qplan.runner.outcome.judge` says what the result means: done, stop (with the
  message), or retry after an out-of-memory error;
* :func:`_next_plan` chooses safer settings (plugins' ``on_out_of_memory`` first, then
  :func:`qplan.api.next_safer_config`).

The run folder is locked while this process (or its child) works in it, and everything
the report says is rebuilt from the folder (:mod:`qplan.runner.rundir`), so ``--resume``
after any kill counts every step exactly once.

Output folder::

    run.json            the request and the next attempt's settings (what --resume reads)
    .lock               held while a `qplan run` works here (who holds it, inside)
    plan.yaml           the plan in use (updated when an OOM makes it safer)
    tokenizer/, data/   the tokenizer and the tokenized rows every attempt reads
    attempts/N/         attempt.json, steps.jsonl, result.json, exit.json
    checkpoints/        step-000010/ ... (COMPLETE marks a finished one)
    adapter_model.safetensors, adapter_config.json, tokenizer files   (when done)
    report.json, summary.md
"""
from __future__ import annotations

import dataclasses
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from qplan import api
from qplan.errors import BadInputError, QplanError, RunError
from qplan.planner.config import TrainConfig
from qplan.planner.plan import Plan, load_plan, save_plan
from qplan.profiles.gpus import GpuProfile
from qplan.profiles.models import ModelProfile
from qplan.runner import checkpoint as CK
from qplan.runner import failpoints, outcome, planning, rundir, supervise
from qplan.runner import protocol as P
from qplan.runner.report import build_report, counted_steps, settings_line, write_report
from qplan.runner.rundir import RunLock, RunState
from qplan.runner.types import OK, OOM, RunReport, RunRequest

Notify = Callable[[str], None]
GIB = 1024**3
TRAINING_STACK = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")


def _print(msg: str) -> None:
    print(msg, flush=True)


def default_output(model: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model.rstrip("/")).name or model).strip("-")
    return Path("runs") / f"{slug or 'model'}-{time.strftime('%Y%m%d-%H%M%S')}"


def require_training_stack() -> None:
    """Raise RunError naming what is missing when the training libraries are not installed
    (the core install plans without them; training needs ``qplan[train]``)."""
    import importlib.util

    missing = [m for m in TRAINING_STACK if importlib.util.find_spec(m) is None]
    if missing:
        raise RunError(f"training needs {', '.join(missing)}, which are not installed here; "
                       "install the training extra: pip install 'qplan[train]' (planning "
                       "commands work without it)")


@dataclass
class Run:
    """One run being supervised: its folder, state, request and planning context."""

    dir: Path
    state: RunState
    req: RunRequest
    profile: ModelProfile
    gpu: GpuProfile
    lock: RunLock
    notify: Notify
    pm: object = None
    child_stdout: int | None = None  # where the training process prints (None: inherited)
    # the profile of the GPU the run trains on, when not the one planned for (--simulate-gpu,
    # or --gpu naming another card): the speed prediction set against the measured one is
    # for the GPU that runs, with the plan's settings
    runs_on: GpuProfile | None = None

    @property
    def cfg(self) -> TrainConfig:
        return self.state.settings

    def plan_env(self) -> dict[str, str]:
        p = self.dir / "plan.yaml"
        return load_plan(p).env if p.is_file() else {}


def run(req: RunRequest, *, notify: Notify | None = None, pm=None,
        child_stdout: int | None = None) -> RunReport:
    """Train as ``req`` says; the report. Raises RunError (with ``.report``) when the run
    cannot finish: nothing fits, attempts are exhausted, the process was killed or failed.
    An interrupted run (SIGTERM / Ctrl-C) returns its report with status "interrupted".
    BadInputError (exit 2) for anything wrong with the request, before work starts.
    ``child_stdout``: a file descriptor for the training process's output (its progress)."""
    notify = notify or _print
    require_training_stack()
    if req.resume:
        run_dir = Path(req.resume).expanduser()
        failpoints.from_env()  # a malformed QPLAN_FAILPOINTS: refused before any work
        rundir.read_state(run_dir)  # a clear message before the lock, if it is not a run
        lock, state = RunLock(run_dir).acquire(), None
    else:
        from qplan.runner.newrun import create

        run_dir, state, lock = create(req, notify, pm)
    with lock:
        r = (_resume(run_dir, req, lock, notify, pm) if state is None
             else _context(run_dir, state, state.request, lock, notify, pm))
        r.child_stdout = child_stdout
        return _supervise(r)


def _resume(run_dir: Path, req: RunRequest, lock: RunLock, notify: Notify, pm) -> Run:
    state = rundir.read_state(run_dir)
    saved = state.request
    saved.max_attempts, saved.progress = req.max_attempts, req.progress
    notify(f"resuming the run in {run_dir}")
    if lock.stale_note():
        notify(f"note: {lock.stale_note()}")
    return _context(run_dir, state, saved, lock, notify, pm)


def _context(run_dir: Path, state: RunState, req: RunRequest, lock: RunLock, notify: Notify,
             pm) -> Run:
    profile = api.get_model(state.model_ref, pm=pm)
    gpu = api.get_gpu(state.planned_for, pm=pm)
    return Run(run_dir, state, req, profile, gpu, lock, notify, pm,
               runs_on=_runs_on(state, gpu, pm))


def _runs_on(state: RunState, gpu: GpuProfile, pm) -> GpuProfile | None:
    """The detected GPU's profile when it is not ``gpu``, the card planned for (None on the
    CPU, or when they are the same)."""
    if state.device != "cuda":
        return None
    detected = planning._detected(False, pm)
    if detected is None or detected.profile.name == gpu.name:
        return None
    return detected.profile


# ---------------------------------------------------------------------------
# the loop: plan -> attempt -> result -> next plan
def _supervise(r: Run) -> RunReport:
    history = rundir.load_attempts(r.dir)
    if history and outcome.ending(history[-1]) == OK:
        return _finish(r, history, OK, "the run had already finished")
    for _ in range(r.req.max_attempts):
        spec = _next_spec(r, history)
        history.append(_attempt(r, spec))
        _calibrate(r, history[-1])
        done = len(counted_steps(r.dir, history)[0])
        verdict = outcome.judge(history, r.dir, done, r.state.total_steps)
        if verdict.status is not None:
            return _finish(r, history, verdict.status, verdict.message)
        r.notify(verdict.message)
        if not _next_plan(r, history):
            return _finish(r, history, "failed", outcome.nothing_fits(r.cfg, r.req.allow_shorter_seq))
    return _finish(r, history, "failed",
                   f"gave up after {r.req.max_attempts} attempt(s) (--max-attempts); the last ran "
                   f"out of memory. Continue with more: qplan run --resume {r.dir} --max-attempts N")


def rows_as_run(cfg: TrainConfig, data: dict | None) -> TrainConfig:
    """``cfg`` with the rows as this run's data makes them. Plans assume packed rows (a
    mask keeps examples apart); when every example was longer than the sequence, each row is
    one whole example with no padding, transformers builds no mask, and the estimate (the
    report's, the re-plan threshold's, the calibration store's) is the unpacked one."""
    d = data or {}
    if cfg.packed_rows and d.get("examples") and d.get("train_truncated", 0) >= d["examples"]:
        return cfg.with_(packed_rows=False)
    return cfg


def _estimate(r: Run, cfg: TrainConfig, gpu: GpuProfile | None = None):
    """The planner's estimate of ``cfg`` for this run's rows on ``gpu`` (default: the card
    planned for); None when it cannot make one."""
    cfg = rows_as_run(cfg, r.state.data)
    try:
        return api.estimate(r.profile, gpu or r.gpu, cfg, pm=r.pm,
                            use_calibration=r.req.use_calibration)
    except QplanError:
        return None


def predicted_speed(r: Run, cfg: TrainConfig) -> float | None:
    """The speed model's steady-state tokens/s of ``cfg`` on the GPU that trains (under
    --simulate-gpu the real GPU's rates, not the simulated card's); None on the CPU."""
    if r.state.device != "cuda":
        return None
    est = _estimate(r, cfg, r.runs_on)
    return round(est.speed.tokens_per_s, 1) if est and est.speed else None


def _calibrate(r: Run, rec: rundir.AttemptRecord) -> None:
    """Add what the attempt measured to this machine's calibration store (qplan calibrate):
    later plans for this GPU, architecture and regime are corrected by it. Only attempts
    measured on a GPU; never with --no-calibration or QPLAN_NO_CALIBRATION=1."""
    from qplan.planner import store

    res = rec.result
    if not r.req.use_calibration or store.disabled() or res is None or res.measured is None:
        return
    est = _estimate(r, rec.spec.settings)
    if est is None:
        return
    entry = store.attempt_record(
        gpu=r.gpu.name, model=r.profile, memory=est.memory, speed=est.speed,
        measured=dataclasses.asdict(res.measured),
        steady_tokens_per_s=res.steady_tokens_per_s if res.status == "ok" else None,
        simulated=res.simulate is not None)
    if entry is None:
        return
    entry["status"] = res.status
    extra = []
    runs_on = r.runs_on
    if runs_on is not None and entry.get("measured_tokens_per_s"):
        # the steps ran on another GPU than the card planned for: they teach its speed
        real = _estimate(r, rec.spec.settings, runs_on)
        if real is not None and real.speed is not None:
            extra.append(store.speed_record(
                gpu=runs_on.name, model=r.profile, memory=real.memory, speed=real.speed,
                steady_tokens_per_s=entry["measured_tokens_per_s"],
                device=res.measured.device))
    try:
        for e in [entry, *extra]:
            store.Store().add(e)
    except OSError as e:  # a read-only home must not fail the run
        r.notify(f"could not write the calibration store ({e}); continuing without it")


def _next_spec(r: Run, history: list[rundir.AttemptRecord]) -> P.AttemptSpec:
    """The next attempt: the current settings, from the newest complete checkpoint."""
    ckroot = r.dir / "checkpoints"
    gone = CK.remove_incomplete(ckroot)
    if gone:
        r.notify(f"ignored incomplete checkpoint(s): {', '.join(gone)}")
    last = CK.latest(ckroot)
    ck_optim = CK.read_state(last).get("optim") if last else None
    load_opt = not last or ck_optim == r.cfg.optim
    if last and not load_opt:
        r.notify(f"optimizer changed ({ck_optim} -> {r.cfg.optim}): its moments start again; "
                 "the learning-rate schedule continues")
    n = rundir.next_attempt_number(r.dir)
    adir = rundir.attempt_dir(r.dir, n)
    s, q = r.state, r.req
    est = _estimate(r, r.cfg)
    return P.AttemptSpec(
        attempt=n, run_dir=str(r.dir.resolve()), attempt_dir=str(adir.resolve()),
        model_path=s.model_path, model_ref=s.model_ref, settings=r.cfg,
        total_steps=s.total_steps, lr=q.lr, lr_scheduler=q.lr_scheduler,
        warmup_steps=s.warmup_steps, max_grad_norm=q.max_grad_norm, save_steps=s.save_steps,
        eval_steps=s.eval_steps, keep_checkpoints=q.keep_checkpoints, seed=q.seed,
        resume_from=str(last.resolve()) if last else None,
        resumed_from=CK.step_of(last) if last else 0, load_optimizer=load_opt, device=s.device,
        progress=q.progress, simulate=s.simulate, change=s.next_change,
        estimated_peak_gib=round(est.memory.peak_gib, 3) if est else None,
        # the speed model predicts a GPU: none on CPU; for the GPU that trains
        predicted_tokens_per_s=predicted_speed(r, r.cfg),
        replan_above_gib=(round(est.memory.peak_gib + est.memory.band_gib, 3)
                          if est and s.device == "cuda" else None),
        world_size=_world_size(r))


def _world_size(r: Run) -> int:
    """The data-parallel processes of the next attempt (the settings' ``gpus``)."""
    return r.cfg.gpus


def set_allocator(env: dict[str, str], expandable: bool) -> None:
    """``env``'s PYTORCH_CUDA_ALLOC_CONF with expandable segments as the plan says (its other
    options kept)."""
    alloc = [x for x in env.get("PYTORCH_CUDA_ALLOC_CONF", "").split(",")
             if x and not x.startswith("expandable_segments")]
    if expandable:
        alloc.append("expandable_segments:True")
    if alloc:
        env["PYTORCH_CUDA_ALLOC_CONF"] = ",".join(alloc)
    else:
        env.pop("PYTORCH_CUDA_ALLOC_CONF", None)


def _child_env(cfg: TrainConfig, plan_env: dict[str, str], device: str) -> dict[str, str]:
    """The training processes' environment: the plan's, the allocator setting, and the GPUs
    they may see: none on CPU, else the first ``cfg.gpus`` of those visible (rank k uses the
    k-th). Left to see every GPU, transformers' Trainer would run one process over all of
    them (DataParallel) with a per-device batch times their number: seen on 2 H200s, a
    1-GPU plan's micro-batch doubled and peaked at twice its estimate."""
    import os

    env = dict(os.environ)
    env.update(plan_env)
    set_allocator(env, cfg.expandable_segments)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        seen = env.get("CUDA_VISIBLE_DEVICES")
        ids = ([x.strip() for x in seen.split(",") if x.strip()] if seen is not None
               else [str(k) for k in range(cfg.gpus)])
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[:cfg.gpus])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _attempt(r: Run, spec: P.AttemptSpec) -> rundir.AttemptRecord:
    """Run one attempt in a child process; what it left on disk."""
    adir = Path(spec.attempt_dir)
    adir.mkdir(parents=True)
    P.write(adir / "attempt.json", spec)
    if r.state.next_change is not None:  # recorded in the attempt: the next one has none
        r.state.next_change = None
        rundir.write_state(r.dir, r.state)
    r.notify(f"attempt {spec.attempt}: {settings_line(spec.settings)}"
             + (f"; estimated peak {spec.estimated_peak_gib:.2f} GiB"
                if spec.estimated_peak_gib is not None else "")
             + (f"; from checkpoint step {spec.resumed_from}" if spec.resume_from else ""))
    t0 = time.time()
    env = _child_env(spec.settings, r.plan_env(), spec.device)
    if spec.distributed:
        rc = _attempt_ranks(r, spec, adir, env)
    else:
        proc = supervise.start(adir / "attempt.json", env, (r.lock.fd,), stdout=r.child_stdout)
        r.lock.update(child_pid=proc.pid)
        rc = supervise.wait(proc)
    r.lock.update(child_pid=None)
    P.write(adir / "exit.json", P.AttemptExit(
        exit_code=rc, wall_s=round(time.time() - t0, 2),
        signal=signal.Signals(-rc).name if rc < 0 else None))
    (rec,) = [a for a in rundir.load_attempts(r.dir) if a.spec.attempt == spec.attempt]
    return rec


def _attempt_ranks(r: Run, spec: P.AttemptSpec, adir: Path, env: dict[str, str]) -> int:
    """One attempt as ``spec.world_size`` data-parallel processes (rank 0 in the attempt's
    folder, rank k in its ``rank{k}`` subfolder): when one ends badly the others are stopped
    (they would wait for it in the gradient all-reduce). The attempt's result is rank 0's
    when all ended well, else the rank's that ran out of memory (or ended badly first): rank
    0's own is kept as ``result.rank0.json``. Returns that rank's exit code."""
    specs = [adir / "attempt.json"]
    for k in range(1, spec.world_size):
        d = adir / f"rank{k}"
        d.mkdir()
        P.write(d / "attempt.json", dataclasses.replace(spec, attempt_dir=str(d.resolve())))
        specs.append(d / "attempt.json")
    procs = supervise.start_ranks(specs, env, (r.lock.fd,), stdout=r.child_stdout)
    r.lock.update(child_pid=procs[0].pid)
    dirs = [adir] + [adir / f"rank{k}" for k in range(1, spec.world_size)]
    codes, first = supervise.wait_ranks(procs, [d / "result.json" for d in dirs])
    if first is None:
        return 0
    # the rank that ran out of memory, not a peer that then saw the collective break
    oom = [k for k, d in enumerate(dirs) if _status(d / "result.json") == OOM]
    first = oom[0] if oom else first
    other = adir / f"rank{first}" / "result.json"
    if first and other.exists():  # rank 0 only saw its peer go (a collective broke)
        if (adir / "result.json").exists():
            (adir / "result.json").rename(adir / "result.rank0.json")
        (adir / "result.json").write_text(other.read_text())
    return codes[first]


def _status(path: Path) -> str | None:
    try:
        return P.read(P.AttemptResult, path).status
    except (OSError, P.ProtocolError):
        return None


def _next_plan(r: Run, history: list[rundir.AttemptRecord]) -> bool:
    """After an out-of-memory error: the next, safer settings saved as the run's (False
    when nothing is left to try)."""
    last = history[-1]
    current = Plan(model=r.state.model, gpu=r.gpu.name, config=r.cfg,
                   target_effective_batch=r.cfg.effective_batch, env=r.plan_env())
    nxt = planning.next_config(current, r.profile, r.gpu,
                               attempt=sum(outcome.ending(a) == OOM for a in history),
                               error=_OomError((last.result and last.result.error) or "out of memory"),
                               allow_shorter_seq=r.req.allow_shorter_seq, pm=r.pm)
    if nxt is None:
        return False
    cfg, why = nxt
    r.notify(f"next attempt: {why.text}")
    r.state.settings, r.state.next_change = cfg, why
    rundir.write_state(r.dir, r.state)
    save_plan(api.make_plan(r.profile, r.gpu, cfg, target=cfg.effective_batch,
                            model_ref=r.state.model, pm=r.pm), r.dir / "plan.yaml")
    return True


class _OomError(RuntimeError):
    """The child's out-of-memory error, as the ``on_out_of_memory`` hook's ``error``."""


def _finish(r: Run, history: list[rundir.AttemptRecord], status: str, message: str) -> RunReport:
    """Write the report; return it, or raise RunError carrying it when the run failed."""
    report = build_report(r.dir, r.state, history, status, message)
    write_report(report)
    if status in (OK, "interrupted"):
        r.notify(message)
        return report
    e = RunError(message)
    e.report = report
    raise e


__all__ = ["run", "RunRequest", "RunReport", "BadInputError", "default_output",
           "require_training_stack", "settings_line"]
