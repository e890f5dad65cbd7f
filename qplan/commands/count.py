"""``qplan count``: count a model's activation memory with dry runs (for models qplan has no
figures for), stored in the qplan home where every later plan of that shape uses them."""
from __future__ import annotations

import click

from qplan.commands.common import handles_errors, json_option

COUNT_EXAMPLES = """
\b
Examples:
  qplan count --model ./my-model
  qplan count --model ./my-model/config.json --all-regimes
  qplan count --model qwen3-8b --json
"""


@click.command(epilog=COUNT_EXAMPLES)
@click.option("--model", "-m", required=True,
              help="catalogue name, model directory, config.json or hub id")
@click.option("--all-regimes", is_flag=True,
              help="also kbit preparation, LoRA dropout, eager attention, fewer LoRA targets and "
              "plain LoRA (default: the settings the plan search uses)")
@click.option("--force", is_flag=True, help="count even when figures for this shape exist")
@json_option
@handles_errors
def count(model: str, all_regimes: bool, force: bool, as_json: bool) -> None:
    """Count what this model's blocks keep for backward, in every regime qplan plans with,
    by dry-running real training steps on fake tensors (CPU only: no memory is taken and
    no weights are needed, only the config). Takes a minute or a few; needs the training
    stack (pip install 'qplan[train]'). `qplan models` shows which models
    are counted already (the memory column)."""
    from qplan import api, render
    from qplan.planner.activations import counts_for
    from qplan.runner.run import require_training_stack

    m = api.get_model(model)
    have = counts_for(m)
    if have is not None and not force:
        d = {"schema_version": render.SCHEMA_VERSION,
                 "command": "count", "model": m.name, "counted": False, "path": have.source,
             "message": "already counted (figures for this shape exist); --force counts again"}
        if as_json:
            render.print_json(d)
        else:
            render.print_lines([f"{m.name}: already counted ({have.source}); --force counts again"])
        return
    require_training_stack()
    from qplan.runner.counting import count_to_home, regimes, search_regimes

    which = regimes() if all_regimes else search_regimes()
    if not as_json:
        render.print_lines([f"counting {m.name}: {len(which)} regimes (dry runs on the CPU, no "
                            "weights needed)..."])
    path = count_to_home(model, m, which=which)
    d = {"schema_version": render.SCHEMA_VERSION,
             "command": "count", "model": m.name, "counted": True, "path": str(path),
         "regimes": len(which)}
    if as_json:
        render.print_json(d)
    else:
        render.print_lines([f"counted {m.name}: {path}; plans for models of this shape now use it"])
