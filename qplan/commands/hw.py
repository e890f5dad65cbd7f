"""``qplan hw`` (alias ``qplan doctor``): what qplan detects on this machine."""
from __future__ import annotations

import click

from qplan.commands.common import examples, handles_errors, json_option

HW_EXAMPLES = examples("qplan hw", "qplan doctor --json")


@click.command(epilog=HW_EXAMPLES)
@json_option
@handles_errors
def hw(as_json: bool) -> None:
    """Show the detected hardware: GPUs (NVML) matched to catalogue profiles, RAM and the
    container's memory limit, CPUs, flash-attn / liger-kernel, and library versions
    (read from package metadata; nothing is imported)."""
    from qplan import api, render
    from qplan.planner.hardware import library_versions, probe

    d = render.hardware_dict(probe(gpus=api.catalog().gpus), library_versions())
    if as_json:
        render.print_json(d)
    else:
        render.print_hardware(d)
