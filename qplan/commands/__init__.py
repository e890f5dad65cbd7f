"""qplan's built-in commands, each a thin click wrapper over :mod:`qplan.api`.

Commands turn the library's domain errors into messages and exit codes
(:mod:`qplan.commands.common`); they hold no planning logic of their own.
"""
from __future__ import annotations

import click


def register(cli: click.Group) -> None:
    """Add every built-in command to ``cli``."""
    from qplan.commands import catalog, ecosystem, hw, planner, plot

    for cmd in (planner.suggest, planner.estimate, ecosystem.check, ecosystem.export, plot.plot,
                catalog.gpus, catalog.models, hw.hw):
        cli.add_command(cmd)
    cli.add_command(hw.hw, name="doctor")
