"""qplan's own plugin: the catalogues, the default policy and the ``plugins`` command.

Registered (as ``"qplan"``) through the same hooks a third-party plugin uses, so the
core has no special case for built-ins.
"""
from __future__ import annotations

from qplan.plugins.hookspecs import hookimpl


@hookimpl
def register_models(register):
    from qplan.profiles.model_catalog import builtin_models

    for m in builtin_models():
        register(m)


@hookimpl
def register_gpus(register):
    from qplan.profiles.gpu_catalog import builtin_gpus

    for g in builtin_gpus():
        register(g)


@hookimpl
def plan_policy(model, gpu, config):
    """The default policy's hardware rule: bf16 compute needs a GPU with bf16.

    The search starts from fp16 on such cards; this vetoes bf16 there when it was asked
    for (transformers' Trainer refuses ``bf16=True`` below compute capability 8.0).
    """
    if config.compute_dtype == "bf16" and not gpu.bf16:
        return False
    return None


@hookimpl
def register_commands(cli):
    from qplan.plugins.cli import plugins_command

    cli.add_command(plugins_command)
