"""``qplan run``'s library side: plan, prepare the data, run attempts, recover, report.

Each attempt trains in a child process (:mod:`qplan.runner.child`) that this parent
watches: a CUDA out-of-memory error (the child reports it in ``result.json``) makes the
parent choose the next safer settings (plugins' ``on_out_of_memory`` first, then
:func:`qplan.api.next_safer_config`) and start a new attempt from the last complete
checkpoint; a child killed by a signal (the host's OOM killer) or interrupted
(SIGTERM / Ctrl-C) ends the run, which ``--resume`` continues.

Output folder::

    run.json            the request and the current settings (what --resume reads)
    plan.yaml           the plan in use (updated when an OOM makes it safer)
    tokenizer/, data/   the tokenizer and the tokenized rows every attempt reads
    attempts/N/         attempt.json, steps.jsonl (one line per optimizer step), result.json
    checkpoints/        step-000010/ ... (COMPLETE marks a finished one)
    adapter_model.safetensors, adapter_config.json, tokenizer files   (when done)
    report.json, summary.md
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from qplan import api
from qplan.errors import BadInputError, QplanError, RunError
from qplan.planner.config import TrainConfig
from qplan.planner.plan import Plan, load_plan, save_plan
from qplan.runner import checkpoint as CK
from qplan.runner import planning
from qplan.runner.report import assemble_steps, write_report
from qplan.runner.types import (ERROR, INTERRUPTED, KILLED, OK, OOM, AttemptReport, RunReport,
                                RunRequest)

Notify = Callable[[str], None]
RUN_FILE = "run.json"
GIB = 1024**3


def _print(msg: str) -> None:
    print(msg, flush=True)


def default_output(model: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model.rstrip("/")).name or model).strip("-")
    return Path("runs") / f"{slug or 'model'}-{time.strftime('%Y%m%d-%H%M%S')}"


def _model_path(model: str) -> str:
    """A local directory as an absolute path (checked), else the hub id as given."""
    p = Path(model).expanduser()
    if p.exists():
        if not p.is_dir():
            raise BadInputError(f"--model {model!r} is a file; give a model directory "
                                "(config.json, weights, tokenizer) or a hub id")
        if not (p / "config.json").is_file():
            raise BadInputError(f"{p} has no config.json; a model directory needs one "
                                "(save_pretrained writes it)")
        return str(p.resolve())
    return model


def _load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_path)
    except Exception as e:  # noqa: BLE001 - any loading failure is the user's input
        raise BadInputError(f"could not load the tokenizer of {model_path!r}: "
                            f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def _save_rows(rows, path: Path) -> None:
    import datasets

    folder = getattr(rows, "_qplan_folder", None)
    if folder is not None:  # prepare() wrote it as a saved dataset already: move, not copy
        import shutil

        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(folder), str(path))
        return

    shown = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        ds = rows if isinstance(rows, datasets.Dataset) else datasets.Dataset.from_list(rows)
        ds.save_to_disk(str(path))
    finally:
        if shown:
            datasets.enable_progress_bars()


def _save_run(run_dir: Path, state: dict) -> None:
    tmp = run_dir / (RUN_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, run_dir / RUN_FILE)


# ---------------------------------------------------------------------------
def _new_run(req: RunRequest, notify: Notify, pm) -> tuple[Path, dict]:
    if not req.model and not req.plan:
        raise BadInputError("--model is required (a hub id or a local model directory)")
    if not req.data:
        raise BadInputError("--data is required (a .jsonl file or a `datasets` directory)")
    if req.eval_data and req.eval_split:
        raise BadInputError("give --eval-data or --eval-split, not both")
    if not 0 <= req.eval_split < 1:
        raise BadInputError(f"--eval-split must be in [0, 1) (got {req.eval_split})")
    if req.max_attempts < 1:
        raise BadInputError("--max-attempts must be at least 1")
    if req.max_steps is not None and req.max_steps < 1:
        raise BadInputError("--max-steps must be at least 1")
    if req.epochs <= 0:
        raise BadInputError("--epochs must be positive")
    model = req.model
    if model is None:
        model = load_plan(req.plan).model
    run_dir = Path(req.output) if req.output else default_output(model)
    if (run_dir / RUN_FILE).exists():
        raise BadInputError(f"{run_dir} already holds a run; continue it with "
                            f"`qplan run --resume {run_dir}`, or choose another --output")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise BadInputError(f"--output {run_dir} exists and is not empty; choose another folder")
    model_path = _model_path(model)
    local = Path(model_path).is_dir()
    profile = api.get_model(model_path if local else model, pm=pm)
    if not local and profile.hf_id and "/" not in model:
        model_path = profile.hf_id  # a catalogue name: load its hub repository
    setup = planning.choose(model_ref=model, profile=profile, plan_file=req.plan,
                            overrides=dict(req.overrides), effective_batch=req.effective_batch,
                            gpu_name=req.gpu, simulate_gpu=req.simulate_gpu, cpu=req.cpu, pm=pm)
    cfg = setup.plan.config

    tok = _load_tokenizer(model_path)
    from qplan.runner import data as D

    rows, eval_rows, summary, _bad = D.prepare(
        req.data, tok, seq_len=cfg.seq_len, completion_only=req.completion_only,
        skip_bad_lines=req.skip_bad_lines, packing=req.packing, eval_fraction=req.eval_split,
        seed=req.seed)
    if req.eval_data:
        eval_rows, _ev, _s, _b = D.prepare(req.eval_data, tok, seq_len=cfg.seq_len,
                                           completion_only=req.completion_only,
                                           skip_bad_lines=req.skip_bad_lines, packing=req.packing)
    E = cfg.effective_batch
    total = req.max_steps or max(1, math.ceil(req.epochs * len(rows) / E))
    save_steps = req.save_steps or max(1, min(100, total // 10))
    run_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(run_dir / "tokenizer"))
    _save_rows(rows, run_dir / "data" / "train")
    if eval_rows:
        _save_rows(eval_rows, run_dir / "data" / "eval")
    save_plan(setup.plan, run_dir / "plan.yaml")
    state = {
        "request": req.to_dict(), "model": model, "model_path": model_path,
        "model_ref": model_path if local else model,
        "settings": cfg.to_dict(), "effective_batch": E, "total_steps": total,
        "save_steps": save_steps, "eval_steps": req.eval_steps or save_steps,
        "warmup_steps": int(math.ceil(req.warmup_ratio * total)),
        "device": setup.device, "device_name": setup.device_name, "planned_for": setup.gpu.name,
        "simulate": setup.simulate, "data": summary.to_dict(),
        "eval_rows": len(eval_rows), "notes": setup.notes + summary.notes,
    }
    _save_run(run_dir, state)
    for n in state["notes"]:
        notify(f"note: {n}")
    notify(f"plan for {model} ({'CPU' if setup.device == 'cpu' else setup.device_name}; "
           f"settings for {setup.gpu.name}): {_settings_line(cfg)}")
    if setup.simulate:
        s = setup.simulate
        notify(f"simulating {s['name']}: PyTorch's allocator capped at "
               f"{s['cap_bytes'] / GIB:.2f} GiB (card {s['card_bytes'] / GIB:g} GiB less "
               f"{s['context_bytes'] / GIB:.2f} GiB CUDA context). Not simulated: speed (this "
               "GPU's), memory bandwidth, and the paged optimizer's managed memory, which lies "
               "outside the cap")
    notify(f"data: {summary.records} {summary.format} records -> {summary.examples} examples "
           f"in {summary.rows} rows of up to {cfg.seq_len} tokens "
           f"({'packed' if req.packing else 'one example a row'}"
           f"{', loss on answers only' if req.completion_only else ''})"
           + (f"; {len(eval_rows)} eval rows" if eval_rows else ""))
    notify(f"{total} optimizer steps of {E} rows; output: {run_dir}")
    return run_dir, state


def _settings_line(cfg: TrainConfig) -> str:
    parts = [f"seq {cfg.seq_len}", f"batch {cfg.batch_size} x accum {cfg.grad_accum}",
             f"LoRA r{cfg.lora_rank}/a{cfg.lora_alpha}",
             "checkpointing" if cfg.grad_ckpt else "no checkpointing", cfg.optim,
             f"loss {cfg.loss}", f"prepare {cfg.prepare}", cfg.attn, cfg.quant, cfg.compute_dtype]
    if cfg.offload_activations:
        parts.append("activation offload")
    return ", ".join(parts)


def _child_env(cfg: TrainConfig, plan_env: dict[str, str], device: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(plan_env)
    alloc = env.get("PYTORCH_CUDA_ALLOC_CONF", "")
    if cfg.expandable_segments:
        if "expandable_segments" not in alloc:
            env["PYTORCH_CUDA_ALLOC_CONF"] = ",".join(
                x for x in (alloc, "expandable_segments:True") if x)
    elif "expandable_segments:True" in alloc:
        rest = ",".join(x for x in alloc.split(",") if x and x != "expandable_segments:True")
        if rest:
            env["PYTORCH_CUDA_ALLOC_CONF"] = rest
        else:
            env.pop("PYTORCH_CUDA_ALLOC_CONF")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _wait(proc: subprocess.Popen, notify: Notify) -> int:
    """Wait for the child; forward SIGTERM to it, and let Ctrl-C reach it (it saves)."""
    if threading.current_thread() is not threading.main_thread():
        return proc.wait()

    def on_term(signum, _frame):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    def on_int(signum, _frame):
        pass  # the child got the same Ctrl-C (same process group) and stops cleanly

    old = {s: signal.signal(s, h) for s, h in ((signal.SIGTERM, on_term), (signal.SIGINT, on_int))}
    try:
        while True:
            try:
                return proc.wait()
            except InterruptedError:
                continue
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _read_steps(path: Path) -> list[dict]:
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a kill
    return out


def _estimate(profile, gpu, cfg: TrainConfig, pm) -> float | None:
    try:
        return round(api.estimate(profile, gpu, cfg, pm=pm).memory.peak_gib, 3)
    except QplanError:
        return None


def _load_report(run_dir: Path) -> tuple[list[AttemptReport], list[list[dict]]]:
    rep = _read_json(run_dir / "report.json") or {}
    attempts = [AttemptReport.from_dict(a) for a in rep.get("attempts", [])]
    steps = [_read_steps(run_dir / "attempts" / str(a.attempt) / "steps.jsonl") for a in attempts]
    return attempts, steps


TRAINING_STACK = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")


def require_training_stack() -> None:
    """Raise RunError naming what is missing when the training libraries are not installed
    (the core install plans without them; training needs ``qplan[train]``)."""
    import importlib.util

    missing = [m for m in TRAINING_STACK if importlib.util.find_spec(m) is None]
    if missing:
        raise RunError(f"training needs {', '.join(missing)}, which are not installed here; "
                       "install the training extra: pip install 'qplan[train]' (planning "
                       "commands work without it)")


def run(req: RunRequest, *, notify: Notify | None = None, pm=None) -> RunReport:
    """Train as ``req`` says; the report. Raises RunError (with ``.report``) when the run
    cannot finish: nothing fits, attempts are exhausted, the process was killed or failed.
    An interrupted run (SIGTERM / Ctrl-C) returns its report with status "interrupted"."""
    notify = notify or _print
    require_training_stack()
    if req.resume:
        run_dir = Path(req.resume)
        state = _read_json(run_dir / RUN_FILE)
        if state is None:
            raise BadInputError(f"--resume {run_dir}: no {RUN_FILE} there; give the --output "
                                "folder of an earlier `qplan run`")
        saved = RunRequest.from_dict(state["request"])
        saved.max_attempts, saved.progress = req.max_attempts, req.progress
        req = saved
        notify(f"resuming the run in {run_dir}")
    else:
        run_dir, state = _new_run(req, notify, pm)
    return _attempts(run_dir, state, req, notify, pm)


def _attempts(run_dir: Path, state: dict, req: RunRequest, notify: Notify, pm) -> RunReport:
    profile = api.get_model(state["model_ref"], pm=pm)
    gpu = api.get_gpu(state["planned_for"], pm=pm)
    attempts, steps = _load_report(run_dir)
    ckroot = run_dir / "checkpoints"
    cfg = TrainConfig.from_dict(state["settings"])
    plan_env = load_plan(run_dir / "plan.yaml").env if (run_dir / "plan.yaml").is_file() else {}
    change: str | None = None
    report = _report(run_dir, state, attempts, steps, "running")
    if attempts and attempts[-1].ended == OK:
        report.status, report.message = OK, "the run had already finished"
        return report
    for _ in range(req.max_attempts):
        n = (attempts[-1].attempt if attempts else 0) + 1
        gone = CK.remove_incomplete(ckroot)
        if gone:
            notify(f"ignored incomplete checkpoint(s): {', '.join(gone)}")
        last = CK.latest(ckroot)
        resumed_from = CK.step_of(last) if last else 0
        ck_state = CK.read_state(last) if last else {}
        load_opt = not last or ck_state.get("optim") == cfg.optim
        if last and not load_opt:
            notify(f"optimizer changed ({ck_state.get('optim')} -> {cfg.optim}): its moments "
                   "start again; the learning-rate schedule continues")
        adir = run_dir / "attempts" / str(n)
        adir.mkdir(parents=True, exist_ok=True)
        for stale in ("result.json", "steps.jsonl"):
            (adir / stale).unlink(missing_ok=True)
        spec = {
            "attempt": n, "run_dir": str(run_dir.resolve()), "attempt_dir": str(adir.resolve()),
            "model_path": state["model_path"], "model_ref": state["model_ref"],
            "settings": cfg.to_dict(), "total_steps": state["total_steps"],
            "lr": req.lr, "lr_scheduler": req.lr_scheduler, "warmup_steps": state["warmup_steps"],
            "max_grad_norm": req.max_grad_norm, "save_steps": state["save_steps"],
            "eval_steps": state["eval_steps"], "keep_checkpoints": req.keep_checkpoints,
            "seed": req.seed, "resume_from": str(last.resolve()) if last else None,
            "resumed_from": resumed_from, "load_optimizer": load_opt, "device": state["device"],
            "simulate": state.get("simulate"), "progress": req.progress,
        }
        (adir / "attempt.json").write_text(json.dumps(spec, indent=1))
        est = _estimate(profile, gpu, cfg, pm)
        notify(f"attempt {n}: {_settings_line(cfg)}"
               + (f"; estimated peak {est:.2f} GiB" if est is not None else "")
               + (f"; from checkpoint step {resumed_from}" if last else ""))
        t0 = time.time()
        proc = subprocess.Popen([sys.executable, "-m", "qplan.runner.child", str(adir / "attempt.json")],
                                env=_child_env(cfg, plan_env, state["device"]))
        rc = _wait(proc, notify)
        res = _read_json(adir / "result.json") or {}
        a_steps = _read_steps(adir / "steps.jsonl")
        ended = res.get("status") if res else None
        if rc < 0:
            ended = INTERRUPTED if -rc in (signal.SIGTERM, signal.SIGINT) and ended is None else KILLED
            res.setdefault("error", f"killed by signal {signal.Signals(-rc).name}")
        ended = ended or ERROR
        last_step = max([resumed_from] + [s["step"] for s in a_steps])
        att = AttemptReport(
            attempt=n, settings=cfg.to_dict(), change=change, resumed_from=resumed_from,
            estimated_peak_gib=est, measured=res.get("memory", {}),
            tokens_per_s=res.get("tokens_per_s"), steps_done=len(a_steps), last_step=last_step,
            ended=ended, error=res.get("error"), exit_code=rc, wall_s=round(time.time() - t0, 2))
        if res.get("simulate"):
            state["simulate"] = res["simulate"]
        attempts.append(att)
        steps.append(a_steps)
        report = _report(run_dir, state, attempts, steps, "running")
        if ended == OK:
            report.status = OK
            report.message = (f"done: {report.steps_done}/{report.total_steps} steps in "
                              f"{len(attempts)} attempt(s); adapter in {run_dir}")
            write_report(report)
            notify(report.message)
            return report
        if ended == INTERRUPTED:
            report.status = INTERRUPTED
            report.message = (f"interrupted after step {last_step} ({res.get('signal') or 'signal'});"
                              f" checkpoint saved. Continue with: qplan run --resume {run_dir}")
            write_report(report)
            notify(report.message)
            return report
        if ended == KILLED:
            report.status = KILLED
            report.message = (
                f"the training process was killed ({res['error']}) after step {last_step}. If "
                "nobody killed it, the host ran out of memory (the kernel's OOM killer: see "
                "`dmesg`). Steps after the last checkpoint "
                f"(step {(CK.step_of(CK.latest(ckroot)) if CK.latest(ckroot) else 0)}) are "
                f"lost. Continue with: qplan run --resume {run_dir}")
            write_report(report)
            raise _fail(report)
        if ended != OOM:
            report.status = "failed"
            tb = (res.get("traceback") or "").strip().splitlines()[-12:]
            report.message = (f"attempt {n} failed: {res.get('error') or f'exit code {rc}'}"
                              + ("\n" + "\n".join(tb) if tb else ""))
            write_report(report)
            raise _fail(report)
        if res.get("oom_phase") == "load":
            report.status = "failed"
            report.message = (f"attempt {n} ran out of GPU memory while loading and preparing "
                              f"the model, before training: {(res.get('error') or '')[:300]}. The "
                              "model does not fit this GPU with these settings (is another "
                              "process using it?); try a smaller model or a bigger GPU.")
            write_report(report)
            raise _fail(report)
        # out of memory: make the plan safer
        where = {"eval": "in evaluation", "optimizer": "in the optimizer step"}.get(
            res.get("oom_phase"), "in training")
        notify(f"attempt {n} ran out of GPU memory {where} at step {last_step + 1}: "
               f"{(res.get('error') or '')[:200]}")
        current = Plan(model=state["model"], gpu=gpu.name, config=cfg,
                       target_effective_batch=cfg.effective_batch, env=plan_env)
        nxt = planning.next_config(current, profile, gpu, attempt=sum(a.ended == OOM for a in attempts),
                                   error=_OomError(res.get("error") or "out of memory"),
                                   allow_shorter_seq=req.allow_shorter_seq, pm=pm)
        if nxt is None:
            report.status = "failed"
            report.message = (f"nothing fits: attempt {n} ran out of memory with the safest "
                              f"settings qplan knows ({_settings_line(cfg)})"
                              + ("" if req.allow_shorter_seq else "; --allow-shorter-seq would "
                                 "also try shorter sequences")
                              + ". Try a smaller model, a shorter --seq, or a bigger GPU.")
            write_report(report)
            raise _fail(report)
        cfg, change = nxt
        notify(f"next attempt: {change}")
        state["settings"] = cfg.to_dict()
        _save_run(run_dir, state)
        save_plan(api.make_plan(profile, gpu, cfg, target=cfg.effective_batch,
                                model_ref=state["model"], pm=pm), run_dir / "plan.yaml")
    report.status = "failed"
    report.message = (f"gave up after {req.max_attempts} attempt(s) (--max-attempts); the "
                      f"last ran out of memory. Continue with more: qplan run --resume {run_dir} "
                      "--max-attempts N")
    write_report(report)
    raise _fail(report)


class _OomError(RuntimeError):
    """The child's out-of-memory error, as the ``on_out_of_memory`` hook's ``error``."""


def _fail(report: RunReport) -> RunError:
    e = RunError(report.message)
    e.report = report
    return e


def _report(run_dir: Path, state: dict, attempts: list[AttemptReport], steps: list[list[dict]],
            status: str) -> RunReport:
    upto = None
    if attempts and attempts[-1].ended != OK:
        last = CK.latest(run_dir / "checkpoints")
        upto = CK.step_of(last) if last else 0
    kept, discarded = assemble_steps(attempts, steps, upto)
    device = state["device_name"] if state["device"] == "cuda" else "CPU"
    return RunReport(
        output=str(run_dir), status=status, model=state["model"], device=device,
        planned_for=state["planned_for"], total_steps=state["total_steps"],
        steps_done=len(kept), effective_batch=state["effective_batch"], attempts=list(attempts),
        steps=kept, discarded_steps=discarded, data=state.get("data", {}),
        simulated=state.get("simulate"), notes=list(state.get("notes", [])))
