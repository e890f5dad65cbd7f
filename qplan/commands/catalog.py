"""``qplan gpus`` and ``qplan models``: the catalogues, as tables or JSON."""
from __future__ import annotations

import click

from qplan.commands.common import examples, handles_errors, json_option

GPUS_EXAMPLES = examples("qplan gpus", "qplan gpus --json")

MODELS_EXAMPLES = examples("qplan models", "qplan models --json")


@click.command(epilog=GPUS_EXAMPLES)
@json_option
@handles_errors
def gpus(as_json: bool) -> None:
    """List the GPU catalogue: memory, compute capability, 16-bit TFLOP/s, bandwidth."""
    from qplan import api, render

    rows = [render.gpu_dict(g) for g in sorted(api.catalog().gpus,
                                               key=lambda g: (g.kind, g.memory_gib, g.name))]
    if as_json:
        render.print_json({"schema_version": render.SCHEMA_VERSION, "gpus": rows})
    else:
        render.print_gpus(rows)


@click.command(epilog=MODELS_EXAMPLES)
@json_option
@handles_errors
def models(as_json: bool) -> None:
    """List the model catalogue: parameters, layers, hidden size, vocabulary, context, and
    how its activation memory is estimated (counted: dry-run figures; analytic: wider band)."""
    from qplan import api, render

    rows = [render.model_dict(m) for m in sorted(api.catalog().models,
                                                 key=lambda m: (m.family, m.total_params))]
    if as_json:
        render.print_json({"schema_version": render.SCHEMA_VERSION, "models": rows})
    else:
        render.print_models(rows)
