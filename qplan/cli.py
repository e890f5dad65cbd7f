"""qplan's command line: a thin layer over :mod:`qplan.api`."""
from __future__ import annotations

import click

from qplan import __version__


@click.group()
@click.version_option(__version__, prog_name="qplan")
def cli() -> None:
    """Plan and run QLoRA / LoRA fine-tuning that fits your GPU."""


def main() -> None:
    cli()
