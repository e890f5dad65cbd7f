"""The run's record: which steps count, ``report.json`` and the human ``summary.md``."""
from __future__ import annotations

import json
import os
from pathlib import Path

from qplan.planner.config import TrainConfig
from qplan.runner import checkpoint as CK
from qplan.runner import outcome
from qplan.runner.protocol import Measured
from qplan.runner.rundir import AttemptRecord, RunState
from qplan.runner.types import OK, AttemptReport, RunReport


def assemble_steps(attempts: list[AttemptRecord], last_checkpoint: int | None = None
                   ) -> tuple[list[dict], list[dict]]:
    """``(steps that count, steps done then lost)``.

    Attempt i's steps count when they come after the checkpoint it resumed from and are
    not after the checkpoint the next attempt resumed from; later ones were lost (the next
    attempt did them again). The last attempt's steps after ``last_checkpoint`` are lost
    too unless it ended well (pass None then).
    """
    kept: dict[int, dict] = {}
    lost: list[dict] = []
    for i, a in enumerate(attempts):
        upto = attempts[i + 1].spec.resumed_from if i + 1 < len(attempts) else last_checkpoint
        for r in a.steps:
            if r.step <= a.spec.resumed_from:
                continue
            if upto is not None and r.step > upto:
                lost.append(r.to_dict())
            else:
                kept[r.step] = r.to_dict()
    return [kept[k] for k in sorted(kept)], lost


def counted_steps(run_dir: Path, attempts: list[AttemptRecord]) -> tuple[list[dict], list[dict]]:
    """:func:`assemble_steps` with the last checkpoint on disk (unless the run ended well)."""
    upto = None
    if attempts and outcome.ending(attempts[-1]) != OK:
        last = CK.latest(run_dir / "checkpoints")
        upto = CK.step_of(last) if last else 0
    return assemble_steps(attempts, upto)


def attempt_report(rec: AttemptRecord) -> AttemptReport:
    res, spec = rec.result, rec.spec
    return AttemptReport(
        attempt=spec.attempt, settings=spec.settings.to_dict(), change=spec.change,
        resumed_from=spec.resumed_from, estimated_peak_gib=spec.estimated_peak_gib,
        measured=res.measured if res else None, tokens_per_s=res.tokens_per_s if res else None,
        steady_tokens_per_s=res.steady_tokens_per_s if res else None,
        predicted_tokens_per_s=spec.predicted_tokens_per_s,
        steps_done=len([s for s in rec.steps if s.step > spec.resumed_from]),
        last_step=outcome.last_step(rec), ended=outcome.ending(rec), error=outcome.error_of(rec),
        oom_phase=res.oom_phase if res else None, oom_step=res.oom_step if res else None,
        exit_code=rec.exit.exit_code if rec.exit else None,
        wall_s=rec.exit.wall_s if rec.exit else (res.wall_s if res else 0.0),
        rank_measured=[r.measured if r else None for r in rec.ranks])


def build_report(run_dir: Path, state: RunState, attempts: list[AttemptRecord], status: str,
                 message: str = "") -> RunReport:
    """The run's report, from the attempts on disk."""
    kept, discarded = counted_steps(run_dir, attempts)
    simulated = next((a.result.simulate for a in reversed(attempts)
                      if a.result and a.result.simulate), state.simulate)
    return RunReport(
        output=str(run_dir), status=status, model=state.model,
        device=state.device_name if state.device == "cuda" else "CPU",
        planned_for=state.planned_for, total_steps=state.total_steps, steps_done=len(kept),
        effective_batch=state.effective_batch, attempts=[attempt_report(a) for a in attempts],
        steps=kept, discarded_steps=discarded, data=dict(state.data), simulated=simulated,
        notes=list(state.notes), message=message)


def settings_line(cfg: TrainConfig) -> str:
    """One line naming a configuration's settings (the run's messages)."""
    parts = [f"seq {cfg.seq_len}", f"batch {cfg.batch_size} x accum {cfg.grad_accum}",
             f"LoRA r{cfg.lora_rank}/a{cfg.lora_alpha}",
             "checkpointing" if cfg.grad_ckpt else "no checkpointing", cfg.optim,
             f"loss {cfg.loss}", f"prepare {cfg.prepare}", cfg.attn, cfg.quant, cfg.compute_dtype]
    if cfg.offload_activations:
        parts.append("activation offload")
    if cfg.gpus > 1 or cfg.strategy == "fsdp":
        parts.append(f"{cfg.gpus} GPU{'s' if cfg.gpus > 1 else ''} {cfg.strategy}")
    if cfg.offload_params:
        parts.append("weights offloaded to the CPU")
    return ", ".join(parts)


def _gib(x) -> str:
    return "n/a" if x is None else f"{x:.2f} GiB"


def _settings(s: dict) -> str:
    parts = [f"seq {s['seq_len']}", f"b{s['batch_size']}x{s['grad_accum']}",
             f"r{s['lora_rank']}", "ckpt" if s["grad_ckpt"] else "no-ckpt", s["optim"],
             f"loss {s['loss']}", s["prepare"], s["attn"]]
    if s.get("offload_activations"):
        parts.append("offload")
    if (s.get("gpus") or 1) > 1 or s.get("strategy") == "fsdp":
        parts.append(f"{s.get('strategy', 'ddp')} x{s.get('gpus') or 1}")
    if s.get("offload_params"):
        parts.append("cpu-offload")
    return " ".join(parts)


def _measured(m: Measured | None) -> str:
    if m is None:
        return "n/a"
    if m.device == "cpu":
        return f"n/a on CPU (RSS {m.host_rss_peak_gib:.2f} GiB)"
    out = f"reserved {_gib(m.peak_reserved_gib)}"
    if m.nvml_peak_gib is not None:
        out += f", nvidia-smi {_gib(m.nvml_peak_gib)}"
        if m.cuda_context_gib is not None:
            out += f" (context {_gib(m.cuda_context_gib)})"
    return out


def _ended(a: AttemptReport) -> str:
    if a.ended == "oom":
        where = {"eval": "in eval after step", "optimizer": "in optimizer step"}.get(
            a.oom_phase or "", "at step")
        return f"oom {where} {a.oom_step if a.oom_step is not None else a.last_step + 1}"
    return a.ended


def _head(r: RunReport) -> list[str]:
    lines = [f"# qplan run: {r.model} ({r.status})", "",
             f"- output: {r.output}",
             f"- device: {r.device}; settings planned for {r.planned_for}",
             f"- steps: {r.steps_done}/{r.total_steps}, effective batch {r.effective_batch} rows"]
    if r.simulated:
        lines.append(f"- simulated {r.simulated.name}: allocator capped at "
                     f"{r.simulated.cap_bytes / 2**30:.2f} GiB (speed, bandwidth and "
                     "paged-optimizer memory are not simulated: the predicted tokens/s are "
                     "for the GPU that trained)")
    d = r.data
    if d:
        lines.append(f"- data: {d.get('records')} {d.get('format')} records, {d.get('examples')} "
                     f"examples, {d.get('rows')} rows ({'packed' if d.get('packing') else 'unpacked'}"
                     f"{', completion only' if d.get('completion_only') else ''})")
    if r.discarded_steps:
        lines.append(f"- steps redone after a failure: {len(r.discarded_steps)}")
    return lines


def summary_text(r: RunReport) -> str:
    lines = _head(r) + [
        "", "| attempt | settings | estimated peak | measured peak | tokens/s | steady tokens/s "
        "(predicted) | steps | ended |", "|---|---|---|---|---|---|---|---|"]
    for a in r.attempts:
        steps = f"{a.resumed_from + 1}-{a.last_step}" if a.last_step > a.resumed_from else "none"
        tps = f"{a.tokens_per_s:,.0f}" if a.tokens_per_s else "n/a"
        steady = f"{a.steady_tokens_per_s:,.0f}" if a.steady_tokens_per_s else "n/a"
        if a.predicted_tokens_per_s:
            steady += f" ({a.predicted_tokens_per_s:,.0f})"
        lines.append(f"| {a.attempt} | {_settings(a.settings)} | {_gib(a.estimated_peak_gib)} | "
                     f"{_measured(a.measured)} | {tps} | {steady} | {steps} | {_ended(a)} |")
    ranked = [a for a in r.attempts if a.rank_measured]
    if ranked:
        lines += ["", "Each GPU's process (the estimate is per GPU):"]
        lines += [f"- attempt {a.attempt}, rank {k}: {_measured(m)}"
                  for a in ranked for k, m in enumerate(a.rank_measured)]
    changes = [(a.attempt, a.change) for a in r.attempts if a.change]
    if changes:
        lines += ["", "Changes after out-of-memory errors:"]
        lines += [f"- attempt {n}: {c.text}" for n, c in changes]
    if r.notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in r.notes]
    if r.message:
        lines += ["", r.message]
    return "\n".join(lines) + "\n"


def write_report(r: RunReport) -> None:
    """``report.json`` and ``summary.md`` in the run folder (each written atomically)."""
    out = Path(r.output)
    for name, text in (("report.json", json.dumps(r.to_dict(), indent=1)),
                       ("summary.md", summary_text(r))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out / name)
