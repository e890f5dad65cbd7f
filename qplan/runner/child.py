"""The training process of one attempt: ``python -m qplan.runner.child ATTEMPT_JSON``.

The parent (:mod:`qplan.runner.run`) writes ``attempt.json`` and starts this process with
the plan's environment (``PYTORCH_CUDA_ALLOC_CONF`` is set before torch starts). It trains
with transformers' ``Trainer`` and the plan's techniques (:mod:`qplan.runner.techniques`),
writes one line per optimizer step to ``steps.jsonl`` and, at the end, ``result.json``:
``{"status": "ok" | "oom" | "interrupted" | "error", "global_step": N, ...}``. Exit codes:
0 ok, 17 out of memory, 18 interrupted (SIGTERM / Ctrl-C: checkpoint saved), 1 error.
A process killed by a signal writes nothing; the parent sees the signal in its exit code.

Data order: optimizer step k (0-based) consumes the examples at positions
``[k*E, (k+1)*E)`` of one fixed sequence (epochs of seeded permutations of the rows),
split into micro-batches of the current per-device batch. A resumed attempt skips
``k*E`` positions, so every step is done with the same examples whatever the split.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from qplan.runner.types import ERROR, INTERRUPTED, OK, OOM

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


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


class Context:
    """What the trainer and its callback share during one attempt."""

    def __init__(self, spec: dict, cfg, fp, stop: StopFlag, progress, monitor, steps_file):
        self.spec, self.cfg, self.fp, self.stop = spec, cfg, fp, stop
        self.progress, self.monitor, self.steps_file = progress, monitor, steps_file
        self.phase = "train"  # train / optimizer / eval: where an OOM happened
        self.micro: list[list[int]] = []  # positions in the run's example order, per micro-batch
        self.rows: list[int] = []  # the data rows at those positions
        self.step_loss = 0.0
        self.step_tokens = 0
        self.t_step = 0.0
        self.start_step = 0
        self.steps_done = 0
        self.tokens = 0
        self.train_s = 0.0
        self.interrupted = False
        self.evals: list[dict] = []


def _rows_dataset(rows, order: list[int], seq_len: int, pad_id: int):
    import torch

    from qplan.runner.data import pad_row

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(order)

        def __getitem__(self, i: int) -> dict[str, Any]:
            r = rows[order[i]]
            real = min(len(r["input_ids"]), seq_len)
            p = pad_row(r, seq_len, pad_id)
            return {"input_ids": torch.tensor(p["input_ids"]), "labels": torch.tensor(p["labels"]),
                    "position_ids": torch.tensor(p["position_ids"]), "qplan_index": i,
                    "qplan_row": order[i], "qplan_tokens": real}

    return Rows()


def collate(items: list[dict]) -> dict:
    import torch

    out = {}
    for k in items[0]:
        v = [it[k] for it in items]
        out[k] = torch.stack(v) if isinstance(v[0], torch.Tensor) else torch.tensor(v)
    return out


def _make_trainer_classes():
    import torch
    from transformers import Trainer, TrainerCallback

    from qplan.runner import checkpoint as CK
    from qplan.runner import techniques as T
    from qplan.runner.monitor import now, step_info

    class QplanTrainer(Trainer):
        # compute_loss returns each micro-batch's share of the step's token-mean loss
        loss_is_scaled_for_ga = True

        def __init__(self, *a, ctx: Context, **kw):
            super().__init__(*a, **kw)
            self.ctx = ctx
            self.model_accepts_loss_kwargs = True  # count the step's label tokens
            self._loss_shifts_labels = True

        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ctx = self.ctx
            index = inputs.pop("qplan_index").tolist()
            rows = inputs.pop("qplan_row").tolist()
            tokens = int(inputs.pop("qplan_tokens").sum())
            labels = inputs["labels"]
            if model.training:
                ctx.phase = "train"
                if not ctx.micro:
                    ctx.fp.fire("train", self.state.global_step + 1)
            else:
                ctx.phase = "eval"
                ctx.fp.fire("eval", self.state.global_step)
            dev = inputs["input_ids"].device.type
            with torch.autocast(dev, dtype=T.torch_dtype(ctx.cfg)):
                loss = T.causal_lm_loss(model, ctx.cfg, inputs["input_ids"], labels,
                                        position_ids=inputs["position_ids"])
            if model.training:
                if num_items_in_batch is not None:
                    n = (labels[..., 1:] != -100).sum()
                    loss = loss * n / num_items_in_batch
                else:
                    loss = loss / self.current_gradient_accumulation_steps
                ctx.micro.append(index)
                ctx.rows += rows
                ctx.step_loss = ctx.step_loss + loss.detach()  # a tensor: no sync per micro-batch
                ctx.step_tokens += tokens
            return (loss, {"loss": loss}) if return_outputs else loss

        def _save_checkpoint(self, model, trial) -> None:
            ctx, step = self.ctx, self.state.global_step

            def fill(tmp: Path) -> None:
                self.save_model(str(tmp), _internal_call=True)
                self._save_optimizer_and_scheduler(str(tmp))
                self._save_scaler(str(tmp))
                self._save_rng_state(str(tmp))
                self.state.save_to_json(str(tmp / "trainer_state.json"))

            state = {"step": step, "attempt": ctx.spec["attempt"], "settings": ctx.cfg.to_dict(),
                     "optim": ctx.cfg.optim, "effective_batch": ctx.cfg.effective_batch,
                     "examples_consumed": step * ctx.cfg.effective_batch,
                     "total_steps": ctx.spec["total_steps"], "seed": ctx.spec["seed"]}
            root = Path(ctx.spec["run_dir"]) / "checkpoints"
            CK.write(root, step, fill, state, before_marker=lambda: ctx.fp.fire("save", step))
            CK.rotate(root, ctx.spec["keep_checkpoints"])
            ctx.progress.line(f"checkpoint saved: step {step}")

        def _load_optimizer_and_scheduler(self, checkpoint) -> None:
            if checkpoint is None or self.ctx.spec["load_optimizer"]:
                return super()._load_optimizer_and_scheduler(checkpoint)
            # another optimizer than the checkpoint's: keep its learning-rate schedule only
            self.lr_scheduler.load_state_dict(
                torch.load(os.path.join(checkpoint, "scheduler.pt"), weights_only=True))

    class QplanCallback(TrainerCallback):
        def __init__(self, ctx: Context):
            self.ctx = ctx

        def on_train_begin(self, args, state, control, **kw):
            self.ctx.start_step = state.global_step

        def on_step_begin(self, args, state, control, **kw):
            c = self.ctx
            c.micro, c.rows, c.step_loss, c.step_tokens, c.t_step = [], [], 0.0, 0, now()

        def on_pre_optimizer_step(self, args, state, control, **kw):
            self.ctx.phase = "optimizer"

        def on_optimizer_step(self, args, state, control, **kw):
            self.ctx.phase = "train"

        def on_step_end(self, args, state, control, **kw):
            c = self.ctx
            c.step_loss = float(c.step_loss)  # waits for the step to finish on the GPU
            dt = now() - c.t_step
            c.steps_done += 1
            c.tokens += c.step_tokens
            c.train_s += dt
            rec = {"step": state.global_step, "attempt": c.spec["attempt"],
                   "positions": [i for mb in c.micro for i in mb], "micro_batches": c.micro,
                   "rows": c.rows,
                   "loss": round(c.step_loss, 6), "tokens": c.step_tokens,
                   "seconds": round(dt, 4)}
            c.steps_file.write(json.dumps(rec) + "\n")
            c.steps_file.flush()
            c.progress.update(state.global_step,
                              step_info(c.step_loss, c.step_tokens / max(dt, 1e-9), c.monitor))
            if c.stop.requested and state.global_step < state.max_steps:
                c.interrupted = True
                control.should_save = True
                control.should_training_stop = True

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            if metrics and "eval_loss" in metrics:
                self.ctx.evals.append({"step": state.global_step,
                                       "eval_loss": round(float(metrics["eval_loss"]), 6)})
                self.ctx.progress.line(f"eval at step {state.global_step}: loss "
                                       f"{metrics['eval_loss']:.4f}")

    return QplanTrainer, QplanCallback


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


def train(spec: dict, stop: StopFlag) -> dict[str, Any]:
    """One attempt, from loading the model to saving the adapter; the result record."""
    quiet_libraries()
    import torch
    from datasets import load_from_disk
    from transformers import AutoTokenizer, PrinterCallback, TrainingArguments

    from qplan import api
    from qplan.planner.config import TrainConfig
    from qplan.runner import failpoints as F
    from qplan.runner import techniques as T
    from qplan.runner.data import pad_token_id, step_order
    from qplan.runner.monitor import MemoryMonitor, Progress

    cfg = TrainConfig.from_dict(spec["settings"])
    cuda = spec["device"] == "cuda"
    run_dir = Path(spec["run_dir"])
    adir = Path(spec["attempt_dir"])
    fp = F.Failpoints(F.from_env(), spec["attempt"])
    monitor = MemoryMonitor(cuda).start()
    result: dict[str, Any] = {"status": ERROR, "global_step": spec["resumed_from"],
                              "start_step": spec["resumed_from"]}

    tok = AutoTokenizer.from_pretrained(str(run_dir / "tokenizer"))
    profile = api.get_model(spec["model_ref"])
    model = T.load_model(spec["model_path"], cfg, device_map={"": 0} if cuda else None)
    T.prepare_for_training(model, cfg)
    from transformers import set_seed

    set_seed(spec["seed"])  # the LoRA initialization (a resumed attempt loads the checkpoint's)
    model = T.add_lora(model, profile, cfg)
    if spec.get("simulate"):
        s = spec["simulate"]
        total = torch.cuda.get_device_properties(0).total_memory
        frac = min(1.0, s["cap_bytes"] / total)
        torch.cuda.set_per_process_memory_fraction(frac, 0)
        result["simulate"] = {**s, "fraction": round(frac, 5), "device_total_bytes": total}
    optimizer = T.make_optimizer(model.parameters(), cfg, lr=spec["lr"])
    fp.fire("load", 0)

    E = cfg.effective_batch
    rows = load_from_disk(str(run_dir / "data" / "train"))
    pad = pad_token_id(tok)
    train_ds = _rows_dataset(rows, step_order(len(rows), spec["total_steps"] * E, spec["seed"]),
                             cfg.seq_len, pad)
    eval_ds = None
    if (run_dir / "data" / "eval").is_dir():
        ev = load_from_disk(str(run_dir / "data" / "eval"))
        eval_ds = _rows_dataset(ev, list(range(len(ev))), cfg.seq_len, pad)

    progress = Progress(spec["total_steps"], spec["resumed_from"], spec["attempt"], spec["progress"])
    steps_file = open(adir / "steps.jsonl", "a")
    ctx = Context(spec, cfg, fp, stop, progress, monitor, steps_file)
    QplanTrainer, QplanCallback = _make_trainer_classes()
    args = TrainingArguments(
        output_dir=str(adir / "trainer"), per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        max_steps=spec["total_steps"], learning_rate=spec["lr"],
        lr_scheduler_type=spec["lr_scheduler"], warmup_steps=spec["warmup_steps"],
        max_grad_norm=spec["max_grad_norm"], logging_steps=1, save_strategy="steps",
        save_steps=spec["save_steps"], eval_strategy="steps" if eval_ds is not None else "no",
        eval_steps=spec["eval_steps"] if eval_ds is not None else None, report_to="none",
        disable_tqdm=True, remove_unused_columns=False, bf16=cfg.compute_dtype == "bf16",
        fp16=cfg.compute_dtype == "fp16" and cuda, use_cpu=not cuda, seed=spec["seed"],
        dataloader_num_workers=0, dataloader_pin_memory=cuda, prediction_loss_only=True,
        log_level="error")
    trainer = QplanTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                           processing_class=tok, data_collator=collate,
                           optimizers=(optimizer, None), callbacks=[QplanCallback(ctx)], ctx=ctx)
    trainer.remove_callback(PrinterCallback)  # qplan's progress shows the loss
    progress.line(f"attempt {spec['attempt']}: " + (f"resuming after step {spec['resumed_from']} "
                                                   f"of {spec['total_steps']}" if spec["resume_from"]
                                                   else f"training {spec['total_steps']} steps")
                  + f" ({E} rows a step: batch {cfg.batch_size} x accumulation {cfg.grad_accum}, "
                  f"seq {cfg.seq_len})")
    oom = None
    try:
        trainer.train(resume_from_checkpoint=spec["resume_from"])
    except Exception as e:  # noqa: BLE001 - only out-of-memory errors are handled here
        if not is_oom(e):
            raise
        oom = " ".join(str(e).split())[:600]
    finally:
        progress.stop()
        steps_file.close()
    result.update(global_step=trainer.state.global_step, start_step=ctx.start_step,
                  steps_done=ctx.steps_done, tokens=ctx.tokens, train_seconds=round(ctx.train_s, 3),
                  tokens_per_s=round(ctx.tokens / ctx.train_s, 1) if ctx.train_s else None,
                  evals=ctx.evals)
    if oom is not None:
        result.update(status=OOM, error=oom, oom_phase=ctx.phase,
                      emergency_checkpoint=_save_after_oom(trainer, ctx, model))
    elif ctx.interrupted:
        result.update(status=INTERRUPTED, signal=stop.signal_name)
    else:
        trainer.save_model(str(run_dir))
        result.update(status=OK)
    monitor.stop()
    result["memory"] = monitor.report()
    return result


def _save_after_oom(trainer, ctx: Context, model) -> int | None:
    """After an OOM outside the optimizer step, the parameters, optimizer and scheduler are
    still those of the last completed step: save them, so the next attempt loses nothing.
    An OOM inside ``optimizer.step()`` may have updated some parameters: no save then."""
    from qplan.runner import checkpoint as CK
    from qplan.runner.techniques import free_cached_memory

    step = trainer.state.global_step
    if ctx.phase == "optimizer" or step <= ctx.start_step:
        return None
    try:
        model.zero_grad(set_to_none=True)
        free_cached_memory()
        if not CK.is_complete(Path(ctx.spec["run_dir"]) / "checkpoints" / CK.name_for(step)):
            trainer._save_checkpoint(model, None)
        return step
    except Exception as e:  # noqa: BLE001 - the last regular checkpoint still stands
        print(f"could not save a checkpoint after the OOM: {e}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    adir = Path(spec["attempt_dir"])
    stop = StopFlag()
    stop.install()
    t0 = time.time()
    try:
        result = train(spec, stop)
    except KeyboardInterrupt:
        result = {"status": INTERRUPTED, "error": "stopped at once by a second Ctrl-C (no checkpoint)"}
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which explains it
        oom = False
        try:
            oom = is_oom(e)
        except Exception:  # noqa: BLE001
            pass
        result = {"status": OOM if oom else ERROR, "error": f"{type(e).__name__}: {e}",
                  "traceback": traceback.format_exc()}
        if oom:  # training catches its own OOMs: this one came while loading or preparing
            result["oom_phase"] = "load"
    result["wall_s"] = round(time.time() - t0, 2)
    write_json(adir / "result.json", result)
    return EXIT_CODES.get(result["status"], EXIT_ERROR)


if __name__ == "__main__":
    sys.exit(main())
