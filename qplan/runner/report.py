"""The run's record: which steps count, ``report.json`` and the human ``summary.md``."""
from __future__ import annotations

import json
import os
from pathlib import Path

from qplan.runner.types import AttemptReport, RunReport


def assemble_steps(attempts: list[AttemptReport], steps: list[list[dict]],
                   last_checkpoint: int | None = None) -> tuple[list[dict], list[dict]]:
    """``(steps that count, steps done then lost)``.

    Attempt i's steps count when they come after the checkpoint it resumed from and are
    not after the checkpoint the next attempt resumed from; later ones were lost (the next
    attempt did them again). The last attempt's steps after ``last_checkpoint`` are lost
    too unless it ended well (pass None then).
    """
    kept: dict[int, dict] = {}
    lost: list[dict] = []
    for i, (a, recs) in enumerate(zip(attempts, steps)):
        upto = attempts[i + 1].resumed_from if i + 1 < len(attempts) else last_checkpoint
        for r in recs:
            if r["step"] <= a.resumed_from:
                continue
            if upto is not None and r["step"] > upto:
                lost.append(r)
            else:
                kept[r["step"]] = r
    return [kept[k] for k in sorted(kept)], lost


def _gib(x) -> str:
    return "n/a" if x is None else f"{x:.2f} GiB"


def _settings(s: dict) -> str:
    parts = [f"seq {s['seq_len']}", f"b{s['batch_size']}x{s['grad_accum']}",
             f"r{s['lora_rank']}", "ckpt" if s["grad_ckpt"] else "no-ckpt", s["optim"],
             f"loss {s['loss']}", s["prepare"], s["attn"]]
    if s.get("offload_activations"):
        parts.append("offload")
    return " ".join(parts)


def _measured(m: dict) -> str:
    if not m:
        return "n/a"
    if m.get("device") == "cpu":
        return f"n/a on CPU (RSS {m.get('host_rss_peak_gib', 0):.2f} GiB)"
    out = f"reserved {_gib(m.get('peak_reserved_gib'))}"
    if "nvml_peak_gib" in m:
        out += f", nvidia-smi {_gib(m['nvml_peak_gib'])}"
        if "cuda_context_gib" in m:
            out += f" (context {_gib(m['cuda_context_gib'])})"
    return out


def summary_text(r: RunReport) -> str:
    lines = [f"# qplan run: {r.model} ({r.status})", "",
             f"- output: {r.output}",
             f"- device: {r.device}; settings planned for {r.planned_for}",
             f"- steps: {r.steps_done}/{r.total_steps}, effective batch {r.effective_batch} rows"]
    if r.simulated:
        s = r.simulated
        lines.append(f"- simulated {s['name']}: allocator capped at {s['cap_bytes'] / 2**30:.2f} GiB"
                     " (speed, bandwidth and paged-optimizer memory are not simulated)")
    d = r.data
    if d:
        lines.append(f"- data: {d.get('records')} {d.get('format')} records, {d.get('examples')} "
                     f"examples, {d.get('rows')} rows ({'packed' if d.get('packing') else 'unpacked'}"
                     f"{', completion only' if d.get('completion_only') else ''})")
    if r.discarded_steps:
        lines.append(f"- steps redone after a failure: {len(r.discarded_steps)}")
    lines += ["", "| attempt | settings | estimated peak | measured peak | tokens/s | steps | ended |",
              "|---|---|---|---|---|---|---|"]
    for a in r.attempts:
        steps = f"{a.resumed_from + 1}-{a.last_step}" if a.last_step > a.resumed_from else "none"
        ended = a.ended if a.ended == "ok" else f"{a.ended} at step {a.last_step + 1}" \
            if a.ended in ("oom",) else a.ended
        tps = f"{a.tokens_per_s:,.0f}" if a.tokens_per_s else "n/a"
        lines.append(f"| {a.attempt} | {_settings(a.settings)} | {_gib(a.estimated_peak_gib)} | "
                     f"{_measured(a.measured)} | {tps} | {steps} | {ended} |")
    changes = [(a.attempt, a.change) for a in r.attempts if a.change]
    if changes:
        lines += ["", "Changes after out-of-memory errors:"]
        lines += [f"- attempt {n}: {c}" for n, c in changes]
    if r.notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in r.notes]
    if r.message:
        lines += ["", r.message]
    return "\n".join(lines) + "\n"


def write_report(r: RunReport) -> None:
    out = Path(r.output)
    for name, text in (("report.json", json.dumps(r.to_dict(), indent=1)),
                       ("summary.md", summary_text(r))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out / name)
