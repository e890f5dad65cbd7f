"""``qplan suggest`` and ``qplan estimate``: thin wrappers over :mod:`qplan.api`."""
from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Any

import click

from qplan.commands.common import (MAX_EFFECTIVE_BATCH, FiniteFloat, examples, flag_of, handles_errors, json_option, knob_options,
                                   knob_values, model_notes, resolve_target)
from qplan.commands.common import calibration_option, reserve_option
from qplan.paths import writable_file
from qplan.errors import BadInputError, DoesNotFitError

# Characters per token for --data: a rough average for English text with BPE tokenizers.
CHARS_PER_TOKEN = 4


def _api_default(fn_name: str, param: str) -> Any:
    """A default of :mod:`qplan.api` (so the flag cannot drift from the library)."""
    from qplan import api

    return inspect.signature(getattr(api, fn_name)).parameters[param].default


def count_tokens(path: Path, seq_len: int | None) -> tuple[int, int]:
    """Approximate tokens in a JSONL file: characters of every string value / 4 per record,
    each record truncated to ``seq_len``. Returns (tokens, records)."""
    def chars(v: Any) -> int:
        if isinstance(v, str):
            return len(v)
        if isinstance(v, dict):
            return sum(chars(x) for x in v.values())
        if isinstance(v, list):
            return sum(chars(x) for x in v)
        return 0

    if not path.is_file():
        raise BadInputError(f"--data {str(path)!r} does not exist or is not a file")
    tokens = records = 0
    with path.open(encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadInputError(f"--data {path}: line {n} is not JSON ({e.msg}); "
                                    "expected one JSON object per line (JSONL)") from None
            t = math.ceil(chars(rec) / CHARS_PER_TOKEN)
            tokens += min(t, seq_len) if seq_len else t
            records += 1
    if records == 0:
        raise BadInputError(f"--data {path} holds no records")
    return tokens, records


def _fmt_duration(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    m = s / 60
    if m < 90:
        return f"{m:.0f} min"
    h, m = divmod(round(m), 60)
    return f"{h} h {m:02d} min" if h < 48 else f"{s / 86400:.1f} days"


def why_by_setting(reasons, fixed: dict[str, Any], seq_why: str) -> tuple[dict[str, str], list[str]]:
    """Each setting's reason as text (a flag the user gave: "fixed by --flag", unless a
    plugin's policy changed it), and the reasons about no setting in particular."""
    from qplan.planner.reasons import by_setting

    by = by_setting(reasons)
    out = {k: r.text for k, r in by.items()}
    out["seq_len"] = seq_why
    for k in fixed:
        if k not in by or by[k].source == "qplan":
            out[k] = f"fixed by {flag_of(k)}"
    return out, [r.text for r in reasons if not r.settings]


def _seq_why(longest: bool, seq_given: bool) -> str:
    if longest:
        return "longest sequence that fits (--longest)"
    return "fixed by --seq" if seq_given else "default sequence length (--seq to change)"


# ---------------------------------------------------------------------------
SUGGEST_EXAMPLES = examples(
    "qplan suggest --model llama-3.1-8b",
    "qplan suggest --model llama-3.1-8b --gpu rtx-4060 --seq 1024",
    "qplan suggest --model qwen2.5-7b --gpu 24GB --rank 64 --no-grad-ckpt",
    "qplan suggest --model ./my-model/config.json --vram 12 --longest",
    "qplan suggest --model mistral-7b --gpu a100-80gb --data train.jsonl --epochs 3 --save plan.yaml",
    "qplan suggest --model llama-3.2-1b --gpu rtx-4090 --json",
    "qplan suggest --model llama-3.1-70b --gpu a100-40gb-sxm --gpus 2",
)


@click.command(epilog=SUGGEST_EXAMPLES)
@click.option("--model", "-m", required=True,
              help="catalogue name (qplan models), model directory, config.json or hub id")
@click.option("--gpu", "-g", help="GPU to plan for: a catalogue name (qplan gpus) or a memory "
              "size such as 8GB, with a count for several ('rtx-4090 x2' = --gpus 2); "
              "default: the detected GPU 0")
@click.option("--vram", type=float, help="GiB of GPU memory to plan for (caps --gpu or the "
              "detected GPU; alone: a generic GPU of that size)")
@reserve_option
@click.option("--target-batch", type=click.IntRange(min=1, max=MAX_EFFECTIVE_BATCH),
              default=_api_default("suggest", "target_effective_batch"),
              show_default=True, help="effective batch (batch x accumulation) to reach")
@knob_options(defaults=False)
@click.option("--data", type=click.Path(path_type=Path), help="JSONL training data: tokens "
              "counted approximately (characters / 4) for the wall-time estimate")
@click.option("--tokens", type=click.IntRange(min=1), help="exact training tokens per epoch")
@click.option("--epochs", type=FiniteFloat(min=0, min_open=True), default=1.0,
              show_default=True, help="epochs, for the wall-time estimate")
@click.option("--longest", is_flag=True, help="find the longest sequence that fits instead")
@click.option("--max-gpus", type=click.IntRange(min=1, max=64), help="choose how many of up to "
              "N such cards to use: the fewest that fit (weights on the GPUs first), or with "
              "--min-tokens-per-s the fewest that reach that speed")
@click.option("--min-tokens-per-s", type=FiniteFloat(min=0, min_open=True),
              help="with --max-gpus: the speed to reach (tokens/s over all the GPUs)")
@click.option("--save", type=click.Path(path_type=Path), help="write the plan as YAML for "
              "`qplan run --plan` and for editing")
@click.option("--plot", type=click.Path(path_type=Path), help="also draw peak memory against "
              "sequence length for these settings: FILE.png or FILE.svg (needs matplotlib)")
@calibration_option
@json_option
@handles_errors
def suggest(model: str, gpu: str | None, vram: float | None, reserve: float | None,
            target_batch: int, data: Path | None, tokens: int | None, epochs: float,
            longest: bool, max_gpus: int | None, min_tokens_per_s: float | None,
            save: Path | None, plot: Path | None, calibration: bool,
            as_json: bool, **knobs: Any) -> None:
    """Suggest the fastest QLoRA settings that fit a GPU.

    Every knob flag you give is held fixed; the others are searched (per-device batch,
    gradient checkpointing, loss, activation offload) and chosen by the default policy.
    Prints the settings with the reason for each, the memory breakdown, the headroom, the
    estimated tokens/s and, with --data or --tokens, the estimated wall time.
    """
    from qplan import api, render
    from qplan.planner.search import usable_bytes

    fixed = knob_values(knobs)
    seq = fixed.pop("seq_len", None)
    if plot is not None:
        from qplan.plot import check_path

        check_path(plot)
    if longest and seq is not None:
        raise BadInputError("--longest searches the sequence length; drop --seq or --longest")
    if data is not None and tokens is not None:
        raise BadInputError("give --data FILE or --tokens N, not both")
    if min_tokens_per_s is not None and max_gpus is None:
        raise BadInputError("--min-tokens-per-s chooses the number of GPUs: give --max-gpus N "
                            "(the most you have) with it")
    if max_gpus is not None and longest:
        raise BadInputError("--max-gpus and --longest each search one thing: give --gpus N with "
                            "--longest, or --seq with --max-gpus")
    if save is not None:
        writable_file(save, "--save")
    m = api.get_model(model)
    t = resolve_target(gpu, vram, reserve, allow_count=True)
    api.gpus_from_card(fixed, t.count, gpu)
    api.check_fixed(m, fixed)
    choice = None
    if max_gpus is not None:
        choice = _choose_gpus(m, t, fixed, model, seq, target_batch, max_gpus,
                              min_tokens_per_s, calibration)
        plan = choice.plan
    else:
        plan = _plan(m, t, fixed, model, seq, target_batch, longest, calibration)
    d = render.estimate_dict("suggest", m, t.gpu, plan.config, plan.memory, plan.speed,
                             usable_bytes=usable_bytes(t.gpu, t.capacity_bytes, t.reserve_bytes),
                             notes=t.notes + model_notes(m))
    d["gpu_detected"] = t.detected
    d["gpu_choice"] = None
    if choice is not None:
        d["gpu_choice"] = {"why": choice.why, "tried": [
            {"gpus": n, "fits": p is not None,
             **({"tokens_per_s": round(p.speed.tokens_per_s, 1), "peak_gib": round(p.peak_gib, 3),
                 "strategy": p.config.strategy, "offload_params": p.config.offload_params}
                if p is not None else {})} for n, p in choice.tried]}
        d["notes"] = list(d.get("notes") or []) + [choice.why] + [
            f"{n} GPU{'s' if n > 1 else ''}: "
            + (f"{p.speed.tokens_per_s:,.0f} tokens/s, {p.peak_gib:.1f} GiB per GPU "
               f"({p.config.strategy}{', CPU offload' if p.config.offload_params else ''})"
               if p is not None else "does not fit") for n, p in choice.tried]
    why, rest = why_by_setting(plan.reasons, fixed, _seq_why(longest, seq is not None))
    d["plan"] = render.plan_dict(plan, why)
    d["dataset"] = _dataset(data, tokens, epochs, plan.config.seq_len)
    n = d["dataset"] and d["dataset"]["tokens_per_epoch"]
    d["wall_time_s"] = (round(n * epochs / plan.speed.tokens_per_s, 3)
                        if n and plan.speed and plan.speed.tokens_per_s else None)
    d["saved_to"] = None
    if save is not None:
        from qplan.planner.plan import save_plan

        d["saved_to"] = str(save_plan(plan, save))
    d["plot"] = None
    if plot is not None:
        from qplan.plot import draw, memory_curves

        draw(memory_curves(m, [t.gpu], seq_len=plan.config.seq_len, capacity_bytes=t.capacity_bytes,
                           plans={t.gpu.name: plan}), plot)
        d["plot"] = str(plot)

    if as_json:
        render.print_json(d)
    else:
        _print_suggest(d, m, t, plan, why, rest)


def _plan(m, t, fixed: dict[str, Any], model: str, seq: int | None, target: int,
          longest: bool, use_calibration: bool = True):
    """The plan ``qplan suggest`` prints: the fastest at ``seq``, or the longest."""
    import dataclasses

    from qplan import api

    common = dict(target_effective_batch=target, fixed=fixed,
                  capacity_bytes=t.capacity_bytes, reserve_bytes=t.reserve_bytes,
                  flash_attn_available=t.flash_attn_available, host_ram_bytes=t.host_ram_bytes,
                  use_calibration=use_calibration)
    ref = api.model_ref(model, m)
    if longest:
        return dataclasses.replace(api.longest_sequence(m, t.gpu, **common), model=ref)
    return api.suggest(m, t.gpu, seq_len=seq or _api_default("suggest", "seq_len"),
                       model_ref=ref, **common)


def _choose_gpus(m, t, fixed: dict[str, Any], model: str, seq: int | None, target: int,
                 max_gpus: int, min_tokens_per_s: float | None, use_calibration: bool = True):
    """``qplan suggest --max-gpus N``: :func:`qplan.api.choose_gpus` for this target."""
    from qplan import api

    return api.choose_gpus(m, t.gpu, max_gpus=max_gpus, min_tokens_per_s=min_tokens_per_s,
                           seq_len=seq or _api_default("suggest", "seq_len"),
                           target_effective_batch=target, fixed=fixed,
                           capacity_bytes=t.capacity_bytes, reserve_bytes=t.reserve_bytes,
                           flash_attn_available=t.flash_attn_available,
                           host_ram_bytes=t.host_ram_bytes, use_calibration=use_calibration,
                           model_ref=api.model_ref(model, m))


def _dataset(data: Path | None, tokens: int | None, epochs: float, seq_len: int):
    """The ``dataset`` part of suggest's JSON (None without --data / --tokens)."""
    if data is not None:
        n, records = count_tokens(data, seq_len)
        return {"tokens_per_epoch": n, "approximate": True, "records": records,
                "epochs": epochs, "source": str(data)}
    if tokens is not None:
        return {"tokens_per_epoch": tokens, "approximate": False, "records": None,
                "epochs": epochs, "source": "--tokens"}
    return None


def _header(command: str, m, t, cfg) -> str:
    g = t.gpu
    n = f"{cfg.gpus} x " if cfg.gpus > 1 else ""
    return (f"qplan {command}: {m.name} on {n}{g.name} ({g.memory_gib:g} GiB, cc {g.cc_str}"
            f"{', ' + g.link.name + ' between them' if cfg.gpus > 1 else ''})"
            f"{' [detected]' if t.detected else ''}")


def _memory_title(cfg) -> str:
    return ("Memory per GPU (peak, as nvidia-smi shows it)" if cfg.gpus > 1
            else "Memory (peak, as nvidia-smi shows it)")


def _on_all(cfg) -> str:
    return f" on all {cfg.gpus} GPUs" if cfg.gpus > 1 else ""


def _print_suggest(d: dict[str, Any], m, t, plan, why: dict[str, str], rest: list[str]) -> None:
    from qplan import render

    render.print_lines([_header("suggest", m, t, plan.config)], style="bold")
    render.print_lines([f"note: {n}" for n in d["notes"] if n not in plan.memory.notes])
    render.print_settings(d["settings"], why, title="Settings")
    render.print_lines([f"  {r}" for r in rest])
    render.print_breakdown(d, title=_memory_title(plan.config))
    render.print_lines([f"note: {n}" for n in plan.memory.notes])  # the memory model's
    lines = [f"estimated speed: {d['tokens_per_s']:,.0f} tokens/s{_on_all(plan.config)} "
             f"(±{d['speed_uncertainty']:.0%}; {plan.config.tokens_per_step:,} tokens per "
             f"optimizer step, {d['step_s']:.2f} s a step)"]
    ds = d["dataset"]
    if d["wall_time_s"] is not None:
        n = ds["tokens_per_epoch"]
        how = (f"~{n:,} tokens/epoch from {ds['records']:,} records, approximate: characters/4, "
               f"truncated to {plan.config.seq_len}" if ds["approximate"] else f"{n:,} tokens/epoch")
        lines.append(f"estimated wall time: {_fmt_duration(d['wall_time_s'])} for "
                     f"{ds['epochs']:g} epoch(s) ({how})")
    if plan.env:
        lines.append("environment: " + " ".join(f"{k}={v}" for k, v in plan.env.items()))
    lines.append(f"device_map: {plan.device_map}" + _device_map_note(plan.config))
    if d["saved_to"] is not None:
        lines.append(f"plan saved to {d['saved_to']} (edit it, then `qplan run --plan "
                     f"{d['saved_to']}`)")
    if d.get("plot") is not None:
        lines.append(f"peak memory by sequence length drawn in {d['plot']}")
    render.print_lines(lines)


# ---------------------------------------------------------------------------
ESTIMATE_EXAMPLES = examples(
    "qplan estimate --model llama-3.1-8b --gpu rtx-4060 --seq 1024",
    "qplan estimate --model llama-3.1-8b --gpu rtx-4090 --batch 4 --no-grad-ckpt --loss fused",
    "qplan estimate --model qwen2.5-7b --gpu 16GB --rank 64 --targets q,k,v,o --prepare kbit",
    "qplan estimate --model mistral-7b --gpu t4 --compute-dtype fp16 --json",
)


def _device_map_note(cfg) -> str:
    """What an FSDP plan's device_map means."""
    if cfg.strategy != "fsdp":
        return ""
    if cfg.offload_params:
        return (" (each process loads and quantizes the model in host memory; its shard stays "
                "there, pinned, and each block is copied to the GPU when it runs)")
    return (f" (each process loads and quantizes the model in host memory; FSDP moves 1/"
            f"{cfg.gpus} of it to each GPU as it wraps the blocks)")


def _fit_hint(m, gpu, cfg, capacity_bytes, reserve_bytes=None) -> str | None:
    """Walk the OOM ladder from ``cfg`` to the first configuration that fits with the margin
    `qplan suggest` keeps, if any."""
    from qplan import api
    from qplan.planner.search import usable_bytes

    limit = usable_bytes(gpu, capacity_bytes, reserve_bytes)
    changes = []
    for _ in range(16):
        step = api.next_safer_config(cfg, allow_shorter_seq=True)
        if step is None:
            return None
        cfg, why = step
        changes.append(why.text)
        est = api.estimate(m, gpu, cfg, capacity_bytes=capacity_bytes)
        if est.memory.safe_peak_bytes <= limit:
            return (f"fits ({est.memory.peak_gib:.2f} GiB) after: " + "; ".join(changes)
                    + ". Or let `qplan suggest` search.")
    return None


@click.command(epilog=ESTIMATE_EXAMPLES)
@click.option("--model", "-m", required=True,
              help="catalogue name (qplan models), model directory, config.json or hub id")
@click.option("--gpu", "-g", help="a catalogue name (qplan gpus) or a memory size such as "
              "8GB, with a count for several ('rtx-4090 x2' = --gpus 2); default: the "
              "detected GPU 0")
@click.option("--vram", type=float, help="GiB of GPU memory (caps --gpu or the detected GPU)")
@reserve_option
@knob_options(defaults=True)
@calibration_option
@json_option
@handles_errors
def estimate(model: str, gpu: str | None, vram: float | None, reserve: float | None,
             calibration: bool, as_json: bool, **knobs: Any) -> None:
    """Estimate the memory and speed of one fully specified configuration.

    No search: the flags (defaults as in TrainConfig) are the configuration. Prints the
    memory breakdown and whether it fits; exit code 3 when it does not (the breakdown and
    the largest term are still printed).
    """
    from qplan import api, render
    from qplan.planner.config import FSDP_OPTIM, TrainConfig
    from qplan.planner.search import default_attention, usable_bytes

    values = knob_values(knobs)
    src = click.get_current_context().get_parameter_source
    if values.get("offload_params") and src("strategy") == click.core.ParameterSource.DEFAULT:
        values["strategy"] = "fsdp"  # offload is FSDP's
    if values.get("strategy") == "fsdp" and src("optim") == click.core.ParameterSource.DEFAULT:
        values["optim"] = FSDP_OPTIM  # the optimizer FSDP's sharded parameters take
    m = api.get_model(model)
    t = resolve_target(gpu, vram, reserve, allow_count=True)
    if src("gpus") == click.core.ParameterSource.DEFAULT:
        values.pop("gpus", None)  # --gpu CARD xN may set it
    api.gpus_from_card(values, t.count, gpu)
    values.setdefault("attn", default_attention(m, t.gpu))
    cfg = TrainConfig(**values)
    api.check_fixed(m, cfg.to_dict())
    notes = t.notes + model_notes(m)
    if cfg.compute_dtype == "bf16" and not t.gpu.bf16:
        notes.append(f"{t.gpu.name} (cc {t.gpu.cc_str}) has no bf16; use --compute-dtype fp16")
    est = api.estimate(m, t.gpu, cfg, capacity_bytes=t.capacity_bytes,
                       use_calibration=calibration)
    usable = usable_bytes(t.gpu, t.capacity_bytes, t.reserve_bytes)
    if est.fits and est.memory.safe_peak_bytes > usable:
        notes.append("fits, but the estimate's uncertainty band or the memory the display and "
                     "other programs hold (--reserve) may not leave room: an OOM is possible")
    d = render.estimate_dict("estimate", m, t.gpu, cfg, est.memory, est.speed,
                             usable_bytes=usable, notes=notes)
    d["gpu_detected"] = t.detected
    hint = None if est.fits else _fit_hint(m, t.gpu, cfg, t.capacity_bytes, t.reserve_bytes)
    d["hint"] = hint
    if as_json:
        render.print_json(d)
    else:
        render.print_lines([_header("estimate", m, t, cfg)], style="bold")
        for n in notes:
            render.print_lines([f"note: {n}"])
        render.print_settings(d["settings"], title="Settings")
        render.print_breakdown(d, title=_memory_title(cfg))
        render.print_lines([f"note: {n}" for n in est.memory.notes])  # the memory model's
        render.print_lines([f"estimated speed: {d['tokens_per_s']:,.0f} tokens/s{_on_all(cfg)} "
                            f"(±{d['speed_uncertainty']:.0%}; {d['step_s']:.2f} s per optimizer "
                            "step)"])
        if not est.fits:
            big = est.memory.largest()
            render.print_lines([f"largest term: {big.label} ({big.gib:.2f} GiB): "
                                f"{big.explanation}"])
            if hint:
                render.print_lines([f"hint: {hint}"])
    if not est.fits:
        raise click.exceptions.Exit(DoesNotFitError.exit_code)
