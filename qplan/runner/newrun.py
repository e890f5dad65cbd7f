"""A new run: every input checked before any work, then the run folder created and locked.

Order: the request's values and the output folder, the model (and the plan's model, if
both are given), the plan, the data (read, checked, tokenized). Only when all of that
holds is the folder created, locked, and filled with the tokenizer, the tokenized rows,
``plan.yaml`` and ``run.json``. A mistake therefore leaves nothing behind.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from qplan import api
from qplan.errors import BadInputError, NotModelledError, QplanError
from qplan.paths import writable_folder
from qplan.planner.plan import Plan, load_plan, save_plan
from qplan.profiles.models import ModelProfile
from qplan.runner import failpoints, planning, rundir
from qplan.runner.report import settings_line
from qplan.runner.rundir import RunLock, RunState
from qplan.runner.types import RunRequest

Notify = Callable[[str], None]
GIB = 1024**3
# Rows one run may train on (optimizer steps x effective batch): the order is a list in memory.
MAX_POSITIONS = 100_000_000


@dataclass
class Model:
    """The model a run trains: as the user named it, where it loads from, its shape."""

    name: str  # as the plan and the report name it (a local directory: absolute)
    path: str  # what from_pretrained loads: an absolute directory or a hub id
    profile: ModelProfile
    local: bool


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


def _go_offline(local: bool) -> bool:
    """Go offline at once when the hub cannot be reached (instead of retrying for a
    minute): the hub cache is used, and what is not in it fails with a clear message."""
    from qplan.profiles.resolve import hub_offline, hub_reachable

    if local or hub_offline() or hub_reachable():
        return False
    os.environ["HF_HUB_OFFLINE"] = "1"  # this process and the training processes
    return True


def resolve_model(name: str, pm=None) -> Model:
    path = _model_path(name)
    local = Path(path).is_dir()
    profile = api.get_model(path if local else name, pm=pm)
    if profile.unmodelled:
        raise NotModelledError(
            f"{name} is multimodal: {profile.unmodelled} besides the language model. qplan "
            "neither counts that memory nor trains such a model (LoRA would also reach the "
            "tower's layers); train a text-only model (see `qplan models`)")
    if not local and profile.hf_id and "/" not in name:
        path = profile.hf_id  # a catalogue name: load its hub repository
    return Model(api.model_ref(name, profile, pm=pm), path, profile, local)


def _params(m: ModelProfile) -> str:
    n = m.total_params
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _shape(m: ModelProfile) -> dict:
    """What the plan's settings and estimate depend on, with every derived field resolved:
    a model's own config.json spells out what the catalogue leaves to transformers'
    defaults (``head_dim``, ``layer_types``), and its context length does not change the
    memory of a step."""
    from qplan.planner.activations import shape_of

    d = shape_of(m)
    kinds = m.layer_kinds()
    d.update(vocab_size=m.vocab_size, tie_word_embeddings=m.tie_word_embeddings,
             layer_kinds=kinds, sliding_window=m.sliding_window if "sliding_attention" in kinds else None)
    return d


def check_plan_model(plan: Plan, plan_file: str, model: Model, given: str, pm=None) -> str | None:
    """A plan made for another model is refused; a note when it cannot be checked."""
    try:
        planned = api.get_model(plan.model, pm=pm)
    except QplanError as e:
        return (f"could not check that {plan_file} (made for {plan.model}) suits --model "
                f"{given}: {str(e).split(';')[0]}")
    if _shape(planned) != _shape(model.profile):
        raise BadInputError(
            f"--plan {plan_file} was made for {plan.model} ({_params(planned)} parameters), but "
            f"--model {given} has another shape ({_params(model.profile)}): the plan's settings "
            f"and estimate do not apply to it. Make a plan for it (qplan suggest --model "
            f"{given} --save plan.yaml), or drop --model to train {plan.model}")
    return None


# ---------------------------------------------------------------------------
def _check_request(req: RunRequest) -> Path | None:
    """The request's own values and the output folder; the folder (None: default)."""
    if not req.model and not req.plan:
        raise BadInputError("--model is required (a hub id or a local model directory)")
    if not req.data:
        raise BadInputError("--data is required (a .jsonl file or a `datasets` directory)")
    req.check()
    failpoints.from_env()  # a malformed QPLAN_FAILPOINTS is refused here, not in the child
    if req.output:
        out = Path(req.output).expanduser()
        if (out / rundir.RUN_FILE).exists():
            raise BadInputError(f"{out} already holds a run; continue it with "
                                f"`qplan run --resume {out}`, or choose another --output")
        return writable_folder(out, "--output")
    return None


def _load_tokenizer(model: Model, offline: bool):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model.path, local_files_only=offline)
    except Exception as e:  # noqa: BLE001 - any loading failure is the user's input
        raise BadInputError(f"could not load the tokenizer of {model.path!r}: "
                            f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def _data(req: RunRequest, tok, cfg):
    """Tokenized train and eval rows; refused when a step would repeat rows."""
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
    if len(rows) < E:
        raise BadInputError(
            f"{Path(req.data).name}: {summary.examples} example(s) make {len(rows)} row(s) of "
            f"up to {cfg.seq_len} tokens, but one optimizer step takes {E} rows (batch "
            f"{cfg.batch_size} x accumulation {cfg.grad_accum}): every step would repeat "
            "rows. Give more data, or a smaller effective batch (--effective-batch, or --batch "
            "and --grad-accum)" + (", or --no-packing" if req.packing and summary.examples >= E
                                   else ""))
    return rows, eval_rows, summary


def _save_rows(rows, path: Path) -> None:
    """The rows as a saved dataset (prepare() may have written them as one already: then
    they are moved, not copied)."""
    import datasets

    folder = getattr(rows, "_qplan_folder", None)
    if folder is not None:
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


def _lock_new_folder(run_dir: Path) -> RunLock:
    """Create ``run_dir`` and lock it; refused if another run got there first."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir).acquire()
    if any(p.name != rundir.LOCK_FILE for p in run_dir.iterdir()):
        lock.release()
        raise BadInputError(f"--output {run_dir} is not empty any more (another run?); "
                            "choose another folder")
    return lock


def create(req: RunRequest, notify: Notify, pm=None) -> tuple[Path, RunState, RunLock]:
    """Check everything, then create, lock and fill the run folder; its state and lock."""
    out = _check_request(req)
    plan_file = load_plan(req.plan) if req.plan else None
    model = resolve_model(req.model or plan_file.model, pm=pm)
    notes: list[str] = []
    if plan_file is not None and req.model:
        note = check_plan_model(plan_file, req.plan, model, req.model, pm=pm)
        notes += [note] if note else []
    setup = planning.choose(model_ref=model.name, profile=model.profile, plan_file=req.plan,
                            overrides=dict(req.overrides), effective_batch=req.effective_batch,
                            gpu_name=req.gpu, simulate_gpu=req.simulate_gpu, cpu=req.cpu, pm=pm,
                            use_calibration=req.use_calibration)
    cfg = setup.plan.config
    _check_gpus(cfg.gpus, setup.device, cfg.strategy)
    _check_strategy(cfg.strategy, setup.device, cfg.offload_params)
    offline = _go_offline(model.local)
    if offline:
        notes.append("the Hugging Face Hub cannot be reached: using the local hub cache only "
                     "(HF_HUB_OFFLINE=1)")
    tok = _load_tokenizer(model, offline)
    rows, eval_rows, summary = _data(req, tok, cfg)
    state = _state(req, model, setup, summary, len(rows), len(eval_rows),
                   notes + setup.notes + summary.notes)
    run_dir = out or _default_output(model.name)
    lock = _lock_new_folder(run_dir)
    try:
        tok.save_pretrained(str(run_dir / "tokenizer"))
        _save_rows(rows, run_dir / "data" / "train")
        if eval_rows:
            _save_rows(eval_rows, run_dir / "data" / "eval")
        save_plan(setup.plan, run_dir / "plan.yaml")
        rundir.write_state(run_dir, state)
    except BaseException:
        lock.release()
        raise
    _announce(state, setup, req, run_dir, notify)
    return run_dir, state, lock


def _check_gpus(gpus: int, device: str, strategy: str = "ddp") -> None:
    """``gpus`` data-parallel processes on CUDA need as many visible GPUs (one each)."""
    if gpus > 1 and device == "cuda":
        from qplan.planner.hardware import probe

        n = len(probe(gpus=api.catalog().gpus).gpus)
        if n < gpus:
            how = ("the effective batch stays: each GPU runs more of every step's "
                   "micro-batches" if strategy != "fsdp" else
                   f"this plan shards the model across {gpus} GPUs: plan again for {n} "
                   f"with `qplan suggest --gpus {n}`")
            raise BadInputError(
                f"--gpus {gpus} starts one training process per GPU, but {n} GPU(s) are "
                f"visible (CUDA_VISIBLE_DEVICES); give --gpus {n} or fewer ({how}), or --cpu "
                "to run the processes on the CPU")


def _check_strategy(strategy: str, device: str, offload: bool = False) -> None:
    """FSDP shards across CUDA GPUs only: accelerate runs CPU processes data-parallel."""
    if strategy == "fsdp" and device != "cuda":
        what = ("keeps the weights in host memory for GPUs (strategy fsdp with CPU offload)"
                if offload else "shards the model across GPUs (strategy fsdp)")
        raise BadInputError(
            f"this plan {what}, but the run would be on the CPU (--cpu, or no CUDA GPU "
            "here), where accelerate runs the processes data-parallel only. Run it on a "
            "machine with the plan's GPUs, or train on the CPU with --strategy ddp"
            + (" --no-offload-params" if offload else "") + " (each process holds the whole "
            "model)")


def _default_output(model: str) -> Path:
    from qplan.runner.run import default_output

    return writable_folder(default_output(model), "--output")


def _state(req: RunRequest, model: Model, setup, summary, rows: int, eval_rows: int,
           notes: list[str]) -> RunState:
    cfg = setup.plan.config
    E = cfg.effective_batch
    total = req.max_steps or max(1, math.ceil(req.epochs * rows / E))
    if total * E > MAX_POSITIONS:
        raise BadInputError(
            f"{total:,} optimizer steps of {E} rows are {total * E:,} rows to train on; a run "
            f"takes at most {MAX_POSITIONS:,} (its row order is kept in memory). Give fewer "
            "--max-steps or --epochs, or split the training into several runs")
    save_steps = req.save_steps or max(1, min(100, total // 10))
    return RunState(
        request=req, model=model.name, model_path=model.path,
        model_ref=model.path if model.local else model.name, settings=cfg, effective_batch=E,
        total_steps=total, save_steps=save_steps, eval_steps=req.eval_steps or save_steps,
        warmup_steps=int(math.ceil(req.warmup_ratio * total)), device=setup.device,
        device_name=setup.device_name, planned_for=setup.gpu.name, data=summary.to_dict(),
        eval_rows=eval_rows, simulate=setup.simulate, notes=notes)


def _announce(state: RunState, setup, req: RunRequest, run_dir: Path, notify: Notify) -> None:
    cfg = state.settings
    for n in state.notes:
        notify(f"note: {n}")
    notify(f"plan for {state.model} ({'CPU' if setup.device == 'cpu' else setup.device_name}; "
           f"settings for {setup.gpu.name}): {settings_line(cfg)}")
    if setup.simulate:
        s = setup.simulate
        notify(f"simulating {s.name}: PyTorch's allocator capped at {s.cap_bytes / GIB:.2f} GiB "
               f"(card {s.card_bytes / GIB:g} GiB less {s.context_bytes / GIB:.2f} GiB CUDA "
               "context). Not simulated: speed (this GPU's), memory bandwidth, and the paged "
               "optimizer's managed memory, which lies outside the cap")
    d = state.data
    notify(f"data: {d['records']} {d['format']} records -> {d['examples']} examples in "
           f"{d['rows']} rows of up to {cfg.seq_len} tokens "
           f"({'packed' if req.packing else 'one example a row'}"
           f"{', loss on answers only' if req.completion_only else ''})"
           + (f"; {state.eval_rows} eval rows" if state.eval_rows else ""))
    notify(f"{state.total_steps} optimizer steps of {state.effective_batch} rows; "
           f"output: {run_dir}")
