"""qplan's built-in commands, each a thin click wrapper over :mod:`qplan.api`.

Commands turn the library's domain errors into messages and exit codes
(:mod:`qplan.commands.common`); they hold no planning logic of their own.
"""
from __future__ import annotations

import click


def register(cli: click.Group) -> None:
    """Add every built-in command to ``cli``."""
    from qplan.commands import calibrate, catalog, count, ecosystem, hw, planner, plot, run

    for cmd in (planner.suggest, planner.estimate, run.run_command, run.merge_command,
                ecosystem.check, ecosystem.export, plot.plot, catalog.gpus, catalog.models,
                hw.hw, calibrate.calibrate, count.count):
        cli.add_command(cmd)
    cli.add_command(hw.hw, name="doctor")
