"""One attempt's training, inside the child process: transformers' ``Trainer`` with qplan's
loss, data order and checkpoints. Imported only by :mod:`qplan.runner.child` (it imports
torch and transformers at the top).

What is changed in ``Trainer``, and why (transformers >= 5.17: CI tests 5.17 and the latest):

* ``compute_loss``: :func:`qplan.runner.techniques.micro_batch_loss` (the training step
  the benchmarks share), weighted by the micro-batch's share of the optimizer step's
  label tokens, which qplan counts itself from the run's row order, so nothing of
  Trainer's own token counting is used; ``loss_is_scaled_for_ga`` (5.20 on) and
  ``model_accepts_loss_kwargs`` (before) keep ``training_step`` from dividing it again.
* the data order: ``train_sampling_strategy="sequential"`` over the run's fixed row order.
* ``_save_checkpoint`` (private): checkpoints are written atomically with a marker
  (:mod:`qplan.runner.checkpoint`), through Trainer's own ``_save_*`` helpers.
* ``_load_optimizer_and_scheduler`` (private): when the optimizer changed since the
  checkpoint, only the learning-rate schedule is loaded.

:func:`qplan.runner.trainer_compat.missing` checks that the private names exist before
training starts, so a transformers that renamed them fails with a message, not mid-run.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from qplan.runner import checkpoint as CK
from qplan.runner import protocol as P
from qplan.runner import techniques as T
from qplan.runner.data import pad_row
from qplan.profiles.gpus import GIB
from qplan.runner.monitor import now, step_info
from qplan.runner.supervise import local_rank


@dataclass
class Context:
    """What the trainer and its callback share during one attempt."""

    spec: P.AttemptSpec
    fp: Any  # failpoints
    stop: Any  # the StopFlag
    progress: Any
    monitor: Any
    steps_file: Any
    step_tokens: list[int]  # label tokens of each optimizer step (index 0 = step 1)
    phase: str = "train"  # train / optimizer / eval: where an OOM happened
    micro: list[list[int]] = field(default_factory=list)  # positions, per micro-batch
    rows: list[int] = field(default_factory=list)  # the data rows at those positions
    step_loss: Any = 0.0
    tokens_this_step: int = 0
    t_step: float = 0.0
    start_step: int = 0
    steps: list[tuple[int, float]] = field(default_factory=list)  # (tokens, seconds) a step
    interrupted: bool = False
    evals: list[P.EvalRecord] = field(default_factory=list)

    @property
    def cfg(self):
        return self.spec.settings


# ---------------------------------------------------------------------------
# data
class Rows(torch.utils.data.Dataset):
    """The run's rows in its fixed order, each padded to ``seq_len``."""

    def __init__(self, rows, order: list[int], seq_len: int, pad_id: int):
        self.rows, self.order, self.seq_len, self.pad_id = rows, order, seq_len, pad_id

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.rows[self.order[i]]
        p = pad_row(r, self.seq_len, self.pad_id)
        return {"input_ids": torch.tensor(p["input_ids"]), "labels": torch.tensor(p["labels"]),
                "position_ids": torch.tensor(p["position_ids"]), "qplan_index": i,
                "qplan_row": self.order[i],
                "qplan_tokens": min(len(r["input_ids"]), self.seq_len),
                "qplan_labels": sum(1 for x in p["labels"][1:] if x != -100)}


def collate(items: list[dict]) -> dict:
    """The micro-batch: tensors stacked; qplan's bookkeeping (row positions, token counts)
    stays Python lists, so that reading it never waits for the GPU (a tensor would be moved
    to the GPU with the batch, and reading it back would wait for every queued kernel)."""
    out = {}
    for k in items[0]:
        v = [it[k] for it in items]
        out[k] = torch.stack(v) if isinstance(v[0], torch.Tensor) else list(v)
    return out


def step_label_tokens(rows, order: list[int], seq_len: int, per_step: int) -> list[int]:
    """Label tokens (after the shift) of each optimizer step's rows."""
    counts: dict[int, int] = {}
    for r in set(order):
        labels = rows[r]["labels"][:seq_len]
        counts[r] = sum(1 for x in labels[1:] if x != -100)
    return [sum(counts[r] for r in order[i:i + per_step]) for i in range(0, len(order), per_step)]


# ---------------------------------------------------------------------------
# the trainer
class QplanTrainer(Trainer):
    # compute_loss returns each micro-batch's share of the step's token-mean loss, so
    # training_step must not divide it by the accumulation steps: transformers >= 5.20 reads
    # this attribute; older versions skip the division when the model "accepts loss kwargs"
    loss_is_scaled_for_ga = True

    def __init__(self, *a, ctx: Context, **kw):
        super().__init__(*a, **kw)
        self.ctx = ctx
        self.model_accepts_loss_kwargs = True

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Under FSDP the adapter was loaded before sharding (child._load); the rest of the
        checkpoint (optimizer, schedule, state) is the Trainer's as usual."""
        if self.ctx.cfg.strategy == "fsdp":
            return None
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def create_optimizer(self, *a, **kw):
        """Under FSDP the optimizer is made here, over the sharded parameters (the Trainer
        calls this after wrapping the model); otherwise the one given is used."""
        if self.optimizer is None and self.ctx.cfg.strategy == "fsdp":
            if self.ctx.cfg.offload_params and self.ctx.spec.device == "cuda":
                # the 4-bit layers' constants are not FSDP parameters: left on the host
                # with the offloaded shards, every dequantization would copy them
                T.quant_states_to(self.model, f"cuda:{torch.cuda.current_device()}")
            self.optimizer = T.make_optimizer(self.model.parameters(), self.ctx.cfg,
                                              lr=self.ctx.spec.lr)
            return self.optimizer
        return super().create_optimizer(*a, **kw)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ctx = self.ctx
        index = list(inputs.pop("qplan_index"))
        rows = list(inputs.pop("qplan_row"))
        tokens = sum(inputs.pop("qplan_tokens"))
        labelled = sum(inputs.pop("qplan_labels"))
        step = self.state.global_step + 1
        if model.training:
            ctx.phase = "train"
            if not ctx.micro:
                ctx.fp.fire("train", step)
        else:
            ctx.phase = "eval"
            ctx.fp.fire("eval", self.state.global_step)
        loss = T.micro_batch_loss(
            model, ctx.cfg, inputs["input_ids"], inputs["labels"],
            position_ids=inputs["position_ids"],
            step_tokens=ctx.step_tokens[step - 1] if model.training else None,
            micro_tokens=labelled)
        if model.training and ctx.spec.world_size > 1:
            # each rank's share of the step's token mean; DDP averages the ranks' gradients
            loss = loss * ctx.spec.world_size
        if model.training:
            ctx.micro.append(index)
            ctx.rows += rows
            ctx.step_loss = ctx.step_loss + loss.detach()  # a tensor: no sync per micro-batch
            ctx.tokens_this_step += tokens
        return (loss, {"loss": loss}) if return_outputs else loss

    def _save_checkpoint(self, model, trial) -> None:
        ctx, step = self.ctx, self.state.global_step

        def fill(tmp: Path) -> None:
            self.save_model(str(tmp), _internal_call=True)
            self._save_optimizer_and_scheduler(str(tmp))
            self._save_scaler(str(tmp))
            self._save_rng_state(str(tmp))
            self.state.save_to_json(str(tmp / "trainer_state.json"))

        ranks = ctx.spec.distributed
        if ranks:
            fill = _gathered(ctx, step, fill)
            if fill is None:  # not rank 0: its part is written; wait for the checkpoint
                _barrier()
                return

        spec = ctx.spec
        state = {"step": step, "attempt": spec.attempt, "settings": ctx.cfg.to_dict(),
                 "optim": ctx.cfg.optim, "effective_batch": ctx.cfg.effective_batch,
                 "examples_consumed": step * ctx.cfg.effective_batch,
                 "total_steps": spec.total_steps, "seed": spec.seed}
        root = Path(spec.run_dir) / "checkpoints"
        CK.write(root, step, fill, state, before_marker=lambda: ctx.fp.fire("save", step))
        CK.rotate(root, spec.keep_checkpoints)
        ctx.progress.line(f"checkpoint saved: step {step}")
        if ranks:
            _barrier()

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        spec = self.ctx.spec
        cpu_ranks = spec.world_size > 1 and spec.device == "cpu"
        if checkpoint is None or (spec.load_optimizer and not cpu_ranks):
            return super()._load_optimizer_and_scheduler(checkpoint)
        if spec.load_optimizer:
            # several CPU processes: transformers 5.17 maps the optimizer to its device,
            # "cpu:0", which torch.load cannot restore to; the host is where it lives anyway
            self.optimizer.load_state_dict(torch.load(
                os.path.join(checkpoint, "optimizer.pt"), map_location="cpu", weights_only=True))
        # (else another optimizer than the checkpoint's: keep its learning-rate schedule only)
        self.lr_scheduler.load_state_dict(
            torch.load(os.path.join(checkpoint, "scheduler.pt"), weights_only=True))


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def _gathered(c: Context, step: int, fill):
    """A checkpoint of several ranks: every rank writes its part (Trainer writes the weights,
    optimizer and schedule on rank 0, each rank its random state) into one folder that rank 0
    chose; rank 0 then makes the checkpoint of it as usual (fsync, rename, marker). Returns
    rank 0's fill (moves the folder's files), None on the other ranks."""
    import shutil

    import torch.distributed as dist

    rank = dist.get_rank()
    shared = [str(Path(c.spec.run_dir) / "checkpoints" / f".tmp-ranks-{CK.name_for(step)}-{os.getpid()}")]
    dist.broadcast_object_list(shared, src=0)
    tmp = Path(shared[0])
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    fill(tmp)
    dist.barrier()
    if rank:
        return None

    def move(dest: Path) -> None:
        for f in tmp.iterdir():
            shutil.move(str(f), str(dest / f.name))
        tmp.rmdir()

    return move


def _all_ranks(c: Context) -> None:
    """The step's loss and tokens over every data-parallel rank (each saw its share of the
    step's micro-batches; its loss was scaled by the world size for DDP's mean)."""
    import torch.distributed as dist

    t = torch.tensor([float(c.step_loss) / c.spec.world_size, float(c.tokens_this_step)],
                     dtype=torch.float64)
    dev = c.spec.device
    t = t.to(f"cuda:{local_rank()}" if dev == "cuda" else "cpu")
    dist.all_reduce(t)
    c.step_loss, c.tokens_this_step = float(t[0]), int(t[1])
    parts: list = [None] * c.spec.world_size
    dist.all_gather_object(parts, (c.micro, c.rows))
    # the step's micro-batches in the run's order: the k-th goes to rank k mod world_size
    micro, rows = [], []
    for j in range(max(len(m) for m, _ in parts)):
        for m, r in parts:
            if j < len(m):
                micro.append(m[j])
                rows += r[j * len(m[j]):(j + 1) * len(m[j])]
    c.micro, c.rows = micro, rows


def check_first_step(c: Context) -> None:
    """After the attempt's first step on a GPU: a peak above the estimate's band means the
    plan was wrong for this model, and a later step may run out of memory. Stop now, as an
    out-of-memory error (the parent re-plans with safer settings, the sequence never longer),
    rather than wait for it."""
    limit = c.spec.replan_above_gib
    if limit is None or len(c.steps) != 1 or not getattr(c.monitor, "cuda", False):
        return
    c.monitor.sample()
    peak = c.monitor.nvml_peak / GIB if c.monitor.nvml_peak else None
    if peak is None or peak <= limit:
        return
    raise torch.cuda.OutOfMemoryError(
        f"re-planning: the first step peaked at {peak:.2f} GiB (nvidia-smi), above the "
        f"estimate and its uncertainty band ({limit:.2f} GiB); a later step could run out of "
        "memory")


class QplanCallback(TrainerCallback):
    """Per step: the data it used, its loss and speed (``steps.jsonl``), the progress line,
    and a requested stop (SIGTERM / Ctrl-C: save, then end)."""

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def on_train_begin(self, args, state, control, **kw):
        self.ctx.start_step = state.global_step

    def on_step_begin(self, args, state, control, **kw):
        c = self.ctx
        c.micro, c.rows, c.step_loss, c.tokens_this_step, c.t_step = [], [], 0.0, 0, now()

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self.ctx.phase = "optimizer"

    def on_optimizer_step(self, args, state, control, **kw):
        self.ctx.phase = "train"

    def on_step_end(self, args, state, control, **kw):
        c = self.ctx
        if c.spec.world_size > 1:
            _all_ranks(c)
        c.step_loss = float(c.step_loss)  # waits for the step to finish on the GPU
        dt = now() - c.t_step
        c.steps.append((c.tokens_this_step, dt))
        rec = P.StepRecord(step=state.global_step, attempt=c.spec.attempt,
                           positions=[i for mb in c.micro for i in mb], micro_batches=c.micro,
                           rows=c.rows, loss=round(c.step_loss, 6), tokens=c.tokens_this_step,
                           seconds=round(dt, 4))
        c.steps_file.write(json.dumps(rec.to_dict()) + "\n")
        c.steps_file.flush()
        c.progress.update(state.global_step,
                          step_info(c.step_loss, c.tokens_this_step / max(dt, 1e-9), c.monitor))
        check_first_step(c)
        if c.stop.requested and state.global_step < state.max_steps:
            c.interrupted = True
            control.should_save = True
            control.should_training_stop = True

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        if metrics and "eval_loss" in metrics:
            loss = round(float(metrics["eval_loss"]), 6)
            self.ctx.evals.append(P.EvalRecord(step=state.global_step, eval_loss=loss))
            self.ctx.progress.line(f"eval at step {state.global_step}: loss {loss:.4f}")


def training_arguments(spec: P.AttemptSpec, cuda: bool, has_eval: bool):
    from transformers import TrainingArguments

    cfg = spec.settings
    ddp = {}
    if spec.distributed:  # each rank runs its share of the step's micro-batches
        ddp = dict(ddp_backend="nccl" if cuda else "gloo", ddp_find_unused_parameters=False,
                   average_tokens_across_devices=False)
        if cfg.strategy == "fsdp":
            ddp.update(fsdp_arguments(offload=cfg.offload_params))
    return TrainingArguments(
        output_dir=str(Path(spec.attempt_dir) / "trainer"),
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum // spec.world_size, max_steps=spec.total_steps,
        learning_rate=spec.lr, lr_scheduler_type=spec.lr_scheduler,
        warmup_steps=spec.warmup_steps, max_grad_norm=spec.max_grad_norm, logging_steps=1,
        save_strategy="steps", save_steps=spec.save_steps,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=spec.eval_steps if has_eval else None, report_to="none", disable_tqdm=True,
        remove_unused_columns=False, bf16=cfg.compute_dtype == "bf16",
        fp16=cfg.compute_dtype == "fp16" and cuda, use_cpu=not cuda, seed=spec.seed,
        dataloader_num_workers=0, dataloader_pin_memory=cuda, prediction_loss_only=True,
        log_level="error", train_sampling_strategy="sequential", **ddp)


def fsdp_arguments(offload: bool = False) -> dict:
    """TrainingArguments for FSDP-QLoRA: FSDP2 through accelerate, every decoder block its
    own unit (the model's ``_no_split_modules``), resharded after its forward; the
    adapter's checkpoint saved whole. The model is loaded on the host first
    (:func:`qplan.runner.child._device_map`) and sharded onto the GPUs as it is wrapped.
    ``offload``: the shards stay in pinned host memory (FSDP2's ``CPUOffloadPolicy``), each
    block copied to the GPU when it runs; the optimizer steps on the CPU."""
    return dict(fsdp=True,
                fsdp_config={"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                             "reshard_after_forward": True, "cpu_ram_efficient_loading": False,
                             "state_dict_type": "FULL_STATE_DICT", "cpu_offload": offload})
