"""``qplan plot``: peak memory against sequence length, drawn for one or more cards."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from qplan.commands.common import handles_errors, json_option, knob_options, knob_values
from qplan.errors import BadInputError

PLOT_EXAMPLES = """
\b
Examples:
  qplan plot --model llama-3.1-8b --gpu rtx-4060 --gpu rtx-4090 -o memory.png
  qplan plot --model qwen2.5-7b --gpu 16GB --seq 4096 --rank 64 -o memory.svg
  qplan suggest --model llama-3.1-8b --gpu rtx-4060 --plot memory.png
"""


@click.command(epilog=PLOT_EXAMPLES)
@click.option("--model", "-m", required=True,
              help="catalogue name (qplan models), model directory, config.json or hub id")
@click.option("--gpu", "-g", "gpus", multiple=True, required=True,
              help="a card (catalogue name or memory size); repeat for several")
@click.option("--vram", type=float, help="GiB of GPU memory (caps every --gpu)")
@click.option("--target-batch", type=click.IntRange(min=1), default=16, show_default=True,
              help="effective batch (batch x accumulation) to reach")
@click.option("--max-seq", type=click.IntRange(min=256), help="the longest sequence drawn "
              "(default: 4 x --seq, at least 8192, at most the context)")
@knob_options(defaults=False, skip=("gpus", "strategy", "offload_params"))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="the picture: FILE.png or FILE.svg")
@json_option
@handles_errors
def plot(model: str, gpus: tuple[str, ...], vram: float | None, target_batch: int,
         max_seq: int | None, output: Path, as_json: bool, **knobs: Any) -> None:
    """Draw estimated peak memory against sequence length for one or more cards.

    For each card: the settings `qplan suggest` chooses there (any knob given is held
    fixed), their peak at every sequence length, the card's memory (solid line), the limit
    plans keep under (dashed), the recommended point and the longest sequence those
    settings fit (x).
    """
    from qplan import api, render
    from qplan.plot import check_path, draw, memory_curves, plot_dict
    from qplan.profiles.gpus import GIB

    check_path(output)
    fixed = knob_values(knobs)
    seq = fixed.pop("seq_len", None) or 2048
    if vram is not None and vram <= 0:
        raise BadInputError(f"--vram must be a positive number of GiB (got {vram:g})")
    m = api.get_model(model)
    if "lora_targets" in fixed:
        m.resolve_targets(fixed["lora_targets"])
    cards = [api.get_gpu(g) for g in gpus]
    data = memory_curves(m, cards, seq_len=seq, target_effective_batch=target_batch, fixed=fixed,
                         capacity_bytes=int(vram * GIB) if vram else None, max_seq=max_seq)
    draw(data, output)
    if as_json:
        render.print_json({"schema_version": render.SCHEMA_VERSION, "command": "plot",
                           "written_to": str(output), **plot_dict(data)})
        return
    lines = [f"wrote {output}: {m.name}, peak memory by sequence length"]
    for c in data.curves:
        pt = f"recommended {c.point[0]:,} tokens at {c.point[1]:.2f} GiB" if c.point else "no plan fits"
        fit = f"; these settings fit up to {c.longest_fit:,} tokens" if c.longest_fit else ""
        lines.append(f"  {c.gpu} ({c.capacity_gib:g} GiB): {pt}{fit}" + (f" ({c.note})" if c.note else ""))
    render.print_lines(lines)
