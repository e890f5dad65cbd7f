"""``qplan run`` and ``qplan merge``: thin commands over :mod:`qplan.runner`.

Importing this module is cheap: torch loads only when a command runs (in the training
process, or in ``merge``).
"""
from __future__ import annotations

import click

from qplan.commands.common import (MAX_EFFECTIVE_BATCH, FiniteFloat, calibration_option, examples,
                                   handles_errors,
                                   json_option, knob_options, knob_values)
from qplan.runner.types import MAX_EVAL_SPLIT

RUN_EXAMPLES = examples(
    "qplan run --model meta-llama/Llama-3.1-8B --data train.jsonl",
    "qplan run --model ./my-model --data chat.jsonl --completion-only --seq 1024 --max-steps 500",
    "qplan run --plan plan.yaml --data train.jsonl --batch 2 --output runs/try2",
    "qplan run --model meta-llama/Llama-3.1-8B --data train.jsonl --simulate-gpu rtx-4060",
    "qplan run --resume runs/Llama-3.1-8B-20261126-101500",
    "qplan run --resume runs/try2 --json",
)

MERGE_EXAMPLES = examples(
    "qplan merge --adapter runs/Llama-3.1-8B-20261126-101500 --output merged/",
    "qplan merge --adapter runs/try2 --base ./my-model --output merged/ --dtype fp16",
    "qplan merge --adapter runs/try2 --output merged/ --json",
)

EXIT_INTERRUPTED = 130


def _print_report(report, as_json: bool) -> None:
    from qplan import render
    from qplan.runner.report import summary_text

    if as_json:
        render.print_json({"schema_version": render.SCHEMA_VERSION, **report.to_dict()})
    else:
        click.echo("")
        click.echo(summary_text(report))


@click.command("run", epilog=RUN_EXAMPLES)
@click.option("--model", help="hub id or local model directory (config.json, weights, tokenizer)")
@click.option("--data", type=click.Path(), help=".jsonl (text, prompt/completion, Alpaca or "
              "chat records) or a `datasets` directory")
@click.option("--plan", "plan_file", type=click.Path(), help="a plan saved by `qplan suggest --save`")
@knob_options(defaults=False)
@click.option("--effective-batch", type=click.IntRange(min=1, max=MAX_EFFECTIVE_BATCH),
              help="rows per optimizer step when qplan chooses the plan (default 16)")
@click.option("--output", type=click.Path(), help="run folder (default ./runs/<model>-<time>)")
@click.option("--max-steps", type=click.IntRange(min=1), help="optimizer steps (default: --epochs)")
@click.option("--epochs", type=FiniteFloat(min=0, min_open=True), default=1.0,
              show_default=True)
@click.option("--lr", type=FiniteFloat(min=0, max=1, min_open=True), default=2e-4,
              show_default=True, help="peak learning rate")
@click.option("--eval-data", type=click.Path(), help="evaluation data (same formats)")
@click.option("--eval-split", type=FiniteFloat(0, MAX_EVAL_SPLIT, max_open=True),
              default=0.0, help="hold out this share of --data for evaluation (below "
              f"{MAX_EVAL_SPLIT:g})")
@click.option("--completion-only", is_flag=True, help="loss on the answers only")
@click.option("--skip-bad-lines", is_flag=True, help="leave out malformed records instead of stopping")
@click.option("--packing/--no-packing", default=True, show_default=True,
              help="put several examples in one row (attention stays within each)")
@click.option("--allow-shorter-seq", is_flag=True,
              help="after out-of-memory errors, a shorter sequence may be tried (last resort)")
@click.option("--max-attempts", type=click.IntRange(min=1), default=4, show_default=True,
              help="training processes to try before giving up on out-of-memory errors")
@click.option("--save-steps", type=click.IntRange(min=1),
              help="checkpoint every N steps (default: about 10 per run, at most every 100)")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=42, show_default=True)
@click.option("--simulate-gpu", help="cap this GPU's memory to what that card leaves PyTorch "
              "(e.g. rtx-4060); needs a bigger CUDA GPU")
@click.option("--gpu", help="plan for this card (catalogue name or memory size) instead of "
              "the detected one")
@click.option("--cpu", is_flag=True, help="train on CPU even if a GPU is present (slow)")
@click.option("--resume", type=click.Path(), help="continue the run in this folder")
@click.option("--quiet", is_flag=True, help="no progress bar")
@calibration_option
@json_option
@handles_errors
def run_command(model, data, plan_file, effective_batch, output, max_steps, epochs, lr,
                eval_data, eval_split, completion_only, skip_bad_lines, packing,
                allow_shorter_seq, max_attempts, save_steps, seed, simulate_gpu, gpu, cpu,
                resume, quiet, calibration, as_json, **knobs):
    """Fine-tune with a plan that fits: QLoRA with transformers + peft + bitsandbytes.

    Plans for the detected GPU (or uses --plan; any setting can be overridden by its flag),
    trains in a child process, and after a CUDA out-of-memory error continues from the
    last checkpoint with safer settings (same effective batch). Writes the adapter,
    tokenizer, plan.yaml, report.json and summary.md to --output. With --json, progress
    goes to stderr and the report (report.json's content) to stdout.
    """
    from qplan.errors import RunError
    from qplan.runner.report import summary_text
    from qplan.runner.run import run
    from qplan.runner.types import INTERRUPTED, RunRequest

    overrides = knob_values(knobs)
    say = (lambda m: click.echo(m, err=True)) if as_json else click.echo
    if resume and (model or data or plan_file or overrides):
        click.echo("note: --resume continues with the run's own model, data and settings; "
                   "the others given are ignored", err=True)
    req = RunRequest(model=model, data=data, plan=plan_file, overrides=overrides,
                     effective_batch=effective_batch, output=output, max_steps=max_steps,
                     epochs=epochs, lr=lr, eval_data=eval_data, eval_split=eval_split,
                     completion_only=completion_only, skip_bad_lines=skip_bad_lines,
                     packing=packing, allow_shorter_seq=allow_shorter_seq,
                     max_attempts=max_attempts, save_steps=save_steps, seed=seed,
                     simulate_gpu=simulate_gpu, gpu=gpu, cpu=cpu, resume=resume,
                     progress=not quiet, use_calibration=calibration)
    try:
        report = run(req, notify=say, child_stdout=2 if as_json else None)
    except RunError as e:  # the run's summary, then the message (handles_errors)
        if getattr(e, "report", None) is not None and not as_json:
            click.echo(summary_text(e.report).rsplit("\n\n", 1)[0], err=True)
        raise
    except KeyboardInterrupt:
        click.echo("interrupted before training started; nothing to resume", err=True)
        raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
    _print_report(report, as_json)
    if report.status == INTERRUPTED:
        raise click.exceptions.Exit(EXIT_INTERRUPTED)


@click.command("merge", epilog=MERGE_EXAMPLES)
@click.option("--adapter", required=True, type=click.Path(), help="adapter folder (a run's --output)")
@click.option("--output", required=True, type=click.Path(), help="folder for the merged model")
@click.option("--base", help="base model (default: the one named in adapter_config.json)")
@click.option("--dtype", type=click.Choice(("bf16", "fp16", "fp32")), default="bf16",
              show_default=True, help="dtype of the merged weights")
@json_option
@handles_errors
def merge_command(adapter, output, base, dtype, as_json):
    """Merge a LoRA adapter into its 16-bit base model (peft merge_and_unload) and save the
    model and tokenizer, ready to serve without peft."""
    import dataclasses

    from qplan import render
    from qplan.runner.merge import merge

    r = merge(adapter, output, base=base, dtype=dtype)
    if as_json:
        render.print_json({"schema_version": render.SCHEMA_VERSION, **dataclasses.asdict(r)})
    else:
        click.echo(f"merged {r.adapter} into {r.base} ({r.dtype}, {r.parameters:,} parameters): "
                   f"{r.output}")
