"""``qplan check`` and ``qplan export``: thin wrappers over :mod:`qplan.ecosystem`."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from qplan.commands.common import handles_errors, json_option, resolve_target
from qplan.errors import BadInputError, DoesNotFitError

CHECK_EXAMPLES = """
\b
Examples:
  qplan check train.py --gpu rtx-4090
  qplan check sft.yaml --gpu 24GB
  qplan check axolotl.yaml --gpu rtx-4060 --json
  qplan check llamafactory.yaml --gpu 12GB --model llama-3.1-8b
"""


def _edit_dict(e) -> dict[str, Any]:
    return {"field": e.field, "old": e.old, "new": e.new}


def _option_dict(o) -> dict[str, Any]:
    from qplan.profiles.gpus import GIB

    return {"edits": [_edit_dict(e) for e in o.edits],
            "changes": {k: [a, b] for k, (a, b) in o.changes.items()},
            "peak_gib": round(o.peak_bytes / GIB, 3), "tokens_per_s": round(o.tokens_per_s, 1),
            "fits": o.fits, "why": o.why}


def check_dict(res, notes: list[str]) -> dict[str, Any]:
    from qplan import render
    from qplan.profiles.gpus import GIB

    r = res.reading
    d = render.estimate_dict("check", res.model, res.gpu, r.config, res.estimate.memory,
                             res.estimate.speed, usable_bytes=res.usable_bytes, notes=notes)
    d["file"] = r.source
    d["format"] = r.format
    d["layout"] = r.layout
    d["tool_version"] = r.tool_version
    d["file_model"] = r.model
    from qplan.ecosystem.check import field_label

    d["fields"] = {k: (None if v is None else field_label(r, k)) for k, v in r.fields.items()}
    d["semantics"] = list(r.semantics)
    d["unmodelled"] = list(r.unmodelled)
    a = res.auto_batch
    d["auto_find_batch_size"] = None if a is None else {
        "batch_size": a.batch_size, "effective_batch": a.effective_batch,
        "peak_gib": round(a.peak_bytes / GIB, 3)}
    d["to_fit"] = [_option_dict(o) for o in res.to_fit]
    d["faster"] = _option_dict(res.faster) if res.faster else None
    return d


def _print_option(o, title: str, file: str) -> None:
    from qplan import render

    lines = [f"{title} (edits to {file}):"]
    lines += [f"  {e}" for e in o.edits]
    lines.append(f"  => peak {o.peak_bytes / 2**30:.2f} GiB, {o.tokens_per_s:,.0f} tokens/s"
                 + (f" ({o.why})" if o.why else ""))
    render.print_lines(lines)


@click.command(epilog=CHECK_EXAMPLES)
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--gpu", "-g", help="a catalogue name (qplan gpus) or a memory size such as 8GB; "
              "default: the detected GPU 0")
@click.option("--vram", type=float, help="GiB of GPU memory (caps --gpu or the detected GPU)")
@click.option("--model", "-m", help="the model, when the file's cannot be read here (a local "
              "path elsewhere): catalogue name, model directory, config.json or hub id")
@click.option("--format", "fmt", type=click.Choice(["trl", "axolotl", "llama-factory"]),
              help="the file's format, when it cannot be told from its fields")
@click.option("--trl-version", help="model this trl release's SFTTrainer (default: the "
              "installed trl)")
@click.option("--seq", type=click.IntRange(min=1), help="sequence length, for configs that have "
              "none (transformers' Trainer)")
@json_option
@handles_errors
def check(file: Path, gpu: str | None, vram: float | None, model: str | None, fmt: str | None,
          trl_version: str | None, seq: int | None, as_json: bool) -> None:
    """Check a trl, axolotl or LLaMA-Factory config against a GPU.

    FILE is a trl training script (.py), the YAML `trl sft --config` reads, a trl sections
    file (model, quantization_config, peft_config, args, as `qplan export` and Plan.to_hf()
    write them), an axolotl YAML or a LLaMA-Factory YAML. qplan models what that trainer
    does with it (trl's chunked loss, packing, Liger, activation offloading, checkpointing,
    auto_find_batch_size) and prints the memory breakdown, whether it fits, and the
    smallest edits to FILE, in its own field names, that make it fit or run faster.
    Exit codes as `qplan estimate`: 0 fits, 3 does not fit, 2 bad input.
    """
    from qplan import render
    from qplan.ecosystem import check as run_check, read_file

    reading, profile = read_file(file, model=model, fmt=fmt, trl_version=trl_version, seq_len=seq)
    t = resolve_target(gpu, vram)
    notes = list(t.notes)
    cfg = reading.config
    if cfg.compute_dtype == "bf16" and not t.gpu.bf16:
        notes.append(f"{t.gpu.name} (cc {t.gpu.cc_str}) has no bf16: the file asks for it")
    res = run_check(reading, profile, t.gpu, capacity_bytes=t.capacity_bytes)
    d = check_dict(res, notes)
    d["gpu_detected"] = t.detected
    if as_json:
        render.print_json(d)
    else:
        g = t.gpu
        tool = {"trl": f"trl {reading.tool_version}", "axolotl": f"axolotl {reading.tool_version}",
                "llama-factory": f"LLaMA-Factory {reading.tool_version}"}[reading.format]
        kind = {"script": "training script", "cli": "`trl sft --config` file",
                "sections": "sections file", "yaml": "config"}[reading.layout]
        render.print_lines([f"qplan check: {file} ({tool} {kind}) for {profile.name} on "
                            f"{g.name} ({g.memory_gib:g} GiB, cc {g.cc_str})"
                            f"{' [detected]' if t.detected else ''}"], style="bold")
        for n in notes:
            render.print_lines([f"note: {n}"])
        render.print_lines(["How qplan reads it:"] + [f"  - {s}" for s in reading.semantics])
        if reading.unmodelled:
            render.print_lines(["Not modelled or not read:"]
                               + [f"  - {s}" for s in reading.unmodelled])
        from qplan.ecosystem.check import field_label

        where = {k: field_label(reading, k) for k in reading.fields}
        render.print_settings(d["settings"], where, title="Settings", third="field in the file")
        render.print_breakdown(d)
        unc = f"±{d['speed_uncertainty']:.0%}; " if d.get("speed_uncertainty") else ""
        render.print_lines([f"estimated speed: {d['tokens_per_s']:,.0f} tokens/s "
                            f"({unc}{d['step_s']:.2f} s per optimizer step)"])
        a = res.auto_batch
        if a is not None:
            render.print_lines([
                f"auto_find_batch_size: after out-of-memory errors transformers retries with "
                f"per-device batch {a.batch_size} (peak {a.peak_bytes / 2**30:.2f} GiB); the "
                f"effective batch drops from {cfg.effective_batch} to {a.effective_batch}"])
        if not res.estimate.fits or res.estimate.memory.peak_bytes > res.usable_bytes:
            if not res.estimate.fits:
                big = res.estimate.memory.largest()
                render.print_lines([f"largest term: {big.label} ({big.gib:.2f} GiB): "
                                    f"{big.explanation}"])
            else:
                render.print_lines(["fits, but inside the safety margin qplan keeps free "
                                    "(estimate error, other processes): an OOM is possible"])
            for i, o in enumerate(res.to_fit, 1):
                _print_option(o, f"To fit, option {i}", file.name)
            if not res.to_fit:
                render.print_lines([f"No edit of {file.name} makes it fit: {reading.format} "
                                    "cannot express what it would take. `qplan suggest --model "
                                    f"{profile.name} --gpu {g.name}` plans it for `qplan run` "
                                    "(CPU embeddings, a tiled MLP), or try a smaller model or "
                                    "a bigger card."])
        elif res.faster:
            _print_option(res.faster, "To run faster", file.name)
        else:
            render.print_lines([f"No edit of {file.name} runs it more than 3% faster on "
                                f"{g.name} (rank, targets, sequence, optimizer and precision "
                                "kept)."])
    if not res.fits:
        raise click.exceptions.Exit(DoesNotFitError.exit_code)


# ---------------------------------------------------------------------------
EXPORT_EXAMPLES = """
\b
Examples:
  qplan export --plan plan.yaml --format trl -o train_trl.py
  qplan export --plan plan.yaml --format axolotl -o axolotl.yaml --data train.jsonl
  qplan export --model llama-3.1-8b --gpu rtx-4090 --format llama-factory
"""


@click.command(epilog=EXPORT_EXAMPLES)
@click.option("--plan", "plan_file", type=click.Path(path_type=Path),
              help="a plan saved by `qplan suggest --save`")
@click.option("--model", "-m", help="instead of --plan: plan this model for the tool (only "
              "settings the tool can express)")
@click.option("--gpu", "-g", help="the card (with --model; default: the plan's)")
@click.option("--vram", type=float, help="GiB of GPU memory (caps --gpu)")
@click.option("--seq", type=click.IntRange(min=1), default=2048, show_default=True,
              help="sequence length (with --model)")
@click.option("--target-batch", type=click.IntRange(min=1), default=16, show_default=True,
              help="effective batch (with --model)")
@click.option("--format", "fmt", required=True,
              type=click.Choice(["trl", "axolotl", "llama-factory"]),
              help="trl: a runnable SFTTrainer script; axolotl, llama-factory: their YAML")
@click.option("--data", help="the training data the file names (default: a placeholder)")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="write the file here (default: print it)")
@json_option
@handles_errors
def export(plan_file: Path | None, model: str | None, gpu: str | None, vram: float | None,
           seq: int, target_batch: int, fmt: str, data: str | None, output: Path | None,
           as_json: bool) -> None:
    """Write a plan as a trl script, an axolotl YAML or a LLaMA-Factory YAML.

    Every plan setting the tool cannot express (CPU embeddings, a tiled MLP, ...) gets a
    comment with what the tool does instead and what that costs in memory; the estimate in
    the file's header is that of what the tool runs with it, which `qplan check FILE` gives
    back. With --model instead of --plan, the plan is made for the tool: only settings it
    can express.
    """
    from qplan import api, render
    from qplan.ecosystem import export as run_export
    from qplan.ecosystem.export import plan_for
    from qplan.planner.plan import load_plan

    if (plan_file is None) == (model is None):
        raise BadInputError("give --plan plan.yaml (from `qplan suggest --save`) or --model NAME "
                            "(to plan for the tool), one of them")
    if plan_file is not None:
        plan = load_plan(plan_file)
        t = resolve_target(gpu or plan.gpu or None, vram)
        profile = api.get_model(plan.model)
    else:
        profile = api.get_model(model)
        t = resolve_target(gpu, vram)
        plan = plan_for(fmt, profile, t.gpu, seq_len=seq, target=target_batch,
                        capacity_bytes=t.capacity_bytes, model_ref=model)
    e = run_export(plan, fmt, profile=profile, gpu=t.gpu, data=data,
                   capacity_bytes=t.capacity_bytes)
    acc_path = None
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(e.text)
        if fmt == "trl":
            output.chmod(0o755)
        if e.accelerate_config:
            from qplan.ecosystem.export import ACCELERATE_CONFIG

            acc_path = output.parent / ACCELERATE_CONFIG
            acc_path.write_text(e.accelerate_config)
    if as_json:
        from qplan.profiles.gpus import GIB

        render.print_json({
            "schema_version": render.SCHEMA_VERSION, "command": "export", "format": fmt,
            "model": profile.name, "gpu": t.gpu.name, "written_to": str(output) if output else None,
            "plan_settings": plan.config.to_dict(), "settings": e.config.to_dict(),
            "plan_peak_gib": round(e.plan_peak_bytes / GIB, 3),
            "peak_gib": round(e.peak_bytes / GIB, 3), "fits": e.peak_bytes <= (
                t.capacity_bytes or t.gpu.memory_bytes),
            "tokens_per_s": round(e.tokens_per_s, 1),
            "gaps": [{"setting": g.setting, "planned": g.planned, "tool": g.tool, "why": g.why,
                      "delta_gib": round(g.delta_bytes / GIB, 3)} for g in e.gaps],
            "text": e.text if output is None else None, "launch": e.launch,
            "accelerate_config": e.accelerate_config,
            "accelerate_config_written_to": str(acc_path) if acc_path else None})
        return
    if output is None:
        click.echo(e.text, nl=False)
        if e.accelerate_config:
            click.echo("\n# accelerate_config.yaml (written beside the file with -o):\n"
                       + e.accelerate_config, nl=False)
        return
    lines = [f"wrote {output} ({fmt}): estimated peak {e.peak_bytes / 2**30:.2f} GiB on "
             f"{t.gpu.name}, {e.tokens_per_s:,.0f} tokens/s (the plan: "
             f"{e.plan_peak_bytes / 2**30:.2f} GiB)"]
    if acc_path is not None:
        lines.append(f"wrote {acc_path} ({plan.config.gpus} processes); start with: {e.launch}")
    elif e.launch:
        lines.append(f"start with: {e.launch}")
    for g in e.gaps:
        from qplan.ecosystem.export import _v

        lines.append(f"  not expressible: {g.setting} (planned {_v(g.planned)}, here {_v(g.tool)}): "
                     f"{g.why} ({g.delta_bytes / 2**30:+.2f} GiB)")
    if e.peak_bytes > (t.capacity_bytes or t.gpu.memory_bytes):
        lines.append(f"warning: as {fmt} runs it, it does not fit {t.gpu.name}; plan for the "
                     f"tool with `qplan export --model {plan.model} --gpu {t.gpu.name} "
                     f"--format {fmt}`")
    render.print_lines(lines)
