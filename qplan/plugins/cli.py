"""The command line side of plugins: ``qplan plugins`` and plugin-added commands.

:func:`load_plugin_commands` is what ``qplan/cli.py`` calls once its group is built: it
runs every ``register_commands`` hook (qplan's own ``plugins`` command comes that way),
and prints plugin problems as warnings on stderr after each command.
"""
from __future__ import annotations

import functools
import json

import click

from qplan.plugins.manager import LOAD_ENV, PluginProblem, get_plugin_manager


def all_problems(pm, *, build_catalog: bool = False) -> list[PluginProblem]:
    """Load and command problems, and the catalogue's (building it if asked)."""
    from qplan.catalog import cached_problems, get_catalog

    out = list(pm.problems)
    if build_catalog:
        out += get_catalog(pm).problems
    else:
        out += cached_problems(pm)
    return list(dict.fromkeys(out))


@click.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def plugins_command(as_json: bool) -> None:
    """List loaded plugins, their versions and the hooks each implements.

    Also lists plugins that failed to load or raised inside a hook. QPLAN_LOAD_PLUGINS
    limits what loads: unset = every installed plugin, empty = none, "a,b" = only those.

    \b
    Examples:
      qplan plugins
      qplan plugins --json
      QPLAN_LOAD_PLUGINS= qplan plugins
    """
    import os

    from qplan.errors import PluginError

    pm = _group_pm()
    error = None
    try:
        problems = all_problems(pm, build_catalog=True)
    except PluginError as e:  # a duplicate name: still list what is loaded
        problems, error = all_problems(pm), str(e)
    _shown(pm).update(problems)
    infos = pm.plugin_infos()
    if as_json:
        click.echo(json.dumps({
            "plugins": [i.to_dict() for i in infos],
            "problems": [p.to_dict() for p in problems],
            "catalogue_error": error,
            "load_plugins": os.environ.get(LOAD_ENV),
        }, indent=2))
        return
    for i in infos:
        origin = "built-in" if i.builtin else i.distribution
        click.echo(f"{i.name} {i.version} ({origin})")
        click.echo(f"  hooks: {', '.join(i.hooks) or 'none'}")
    if os.environ.get(LOAD_ENV) is not None:
        click.echo(f"{LOAD_ENV}={os.environ[LOAD_ENV]!r} limits which plugins load")
    if problems:
        click.echo("problems:")
        for p in problems:
            click.echo(f"  {p}")
    if error:
        click.echo(f"error: {error}")


def _group_pm():
    """The manager the running group's commands came from (the process's by default)."""
    root = click.get_current_context().find_root().command
    return getattr(root, "_qplan_pm", None) or get_plugin_manager()


def _shown(pm) -> set[PluginProblem]:
    """Problems of ``pm`` already printed (so each warning shows once)."""
    if not hasattr(pm, "_qplan_shown"):
        pm._qplan_shown = set()
    return pm._qplan_shown


def print_problems(pm=None) -> None:
    """Print plugin problems not yet shown, as warnings on stderr."""
    pm = pm or get_plugin_manager()
    shown = _shown(pm)
    for p in all_problems(pm):
        if p not in shown:
            shown.add(p)
            click.echo(f"warning: {p}", err=True)


def load_plugin_commands(cli: click.Group, pm=None) -> None:
    """Run every ``register_commands`` hook on ``cli``, and warn about plugin problems.

    A plugin that raises, or that would replace an existing command, is recorded in
    ``pm.problems`` with its name (its other commands stay out); the rest still load.
    After each command the group prints the problems as warnings on stderr.
    """
    from qplan.plugins.calls import implementations

    explicit_pm = pm
    pm = pm or get_plugin_manager()
    for name, call in implementations(pm, "register_commands", call_order=False):
        before = dict(cli.commands)
        try:
            call(cli=cli)
        except Exception as e:  # noqa: BLE001 - any error inside a plugin is the plugin's
            cli.commands.clear()
            cli.commands.update(before)
            text = " ".join(str(e).split())
            pm.problems.append(PluginProblem(name, "register_commands",
                                             f"{type(e).__name__}: {text}"))
            continue
        replaced = sorted(c for c in before if cli.commands.get(c) is not before[c])
        if replaced:
            for c in replaced:
                cli.commands[c] = before[c]
            pm.problems.append(PluginProblem(
                name, "register_commands", f"tried to replace the command(s) "
                f"{', '.join(replaced)}; kept qplan's"))
    _warn_after_each_command(cli, explicit_pm)


def _warn_after_each_command(cli: click.Group, pm) -> None:
    """Wrap the group's callback so every command ends by printing new plugin problems."""
    if getattr(cli, "_qplan_warns", False):
        return
    original = cli.callback

    @functools.wraps(original or (lambda: None))
    def callback(*args, **kwargs):
        click.get_current_context().call_on_close(functools.partial(print_problems, pm))
        return original(*args, **kwargs) if original is not None else None
    cli.callback = callback
    cli._qplan_warns = True
    cli._qplan_pm = pm
