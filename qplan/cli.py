"""qplan's command line: a thin click group over :mod:`qplan.api`.

Commands live in :mod:`qplan.commands`; this module only builds the group. Exit codes:
0 success, 2 bad input, 3 does not fit, 4 a run failed (``QplanError.exit_code``).
"""
from __future__ import annotations

import click

from qplan import __version__

CLI_EXAMPLES = """
\b
Examples:
  qplan suggest --model llama-3.1-8b
  qplan suggest --model llama-3.1-8b --gpu rtx-4060 --seq 1024
  qplan estimate --model llama-3.1-8b --gpu rtx-4090 --batch 4
  qplan check train.py --gpu rtx-4090
  qplan export --plan plan.yaml --format axolotl -o axolotl.yaml
  qplan gpus
  qplan hw
"""


class QplanGroup(click.Group):
    """A group that turns any error escaping a command (a plugin's too) into a message and
    its exit code instead of a traceback (QPLAN_DEBUG=1 shows the traceback)."""

    def invoke(self, ctx: click.Context):
        import functools

        from qplan.commands.common import reporting_errors

        return reporting_errors(functools.partial(super().invoke, ctx))


@click.group(cls=QplanGroup, epilog=CLI_EXAMPLES)
@click.version_option(__version__, prog_name="qplan")
def cli() -> None:
    """Plan and run QLoRA / LoRA fine-tuning that fits your GPU."""


def _register_builtin_commands() -> None:
    from qplan.commands import register

    register(cli)


_register_builtin_commands()


def _load_plugin_commands() -> None:
    """Let plugins add commands (``register_commands`` hook; ``qplan plugins`` comes this
    way). A plugin that raises is reported by name and the other commands still work."""
    from qplan.plugins.cli import load_plugin_commands

    load_plugin_commands(cli)


_load_plugin_commands()


def main() -> None:
    cli()
