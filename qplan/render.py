"""Turn qplan's typed results into JSON-ready dicts (the ``--json`` schemas) and rich tables.

The dict builders are the single source of the schemas documented in
``docs/json-schema.md``; the text output renders from the same dicts, so the two never
disagree. rich is imported inside the functions that print, keeping ``qplan`` quick to start.
"""
from __future__ import annotations

import json
from typing import Any, Iterable

import click

from qplan.profiles.gpus import GIB

# Bump when a key is removed or changes meaning (adding keys keeps the version).
SCHEMA_VERSION = 1


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(float(x), nd)


# ---------------------------------------------------------------------------
# dicts (the --json schemas)
def memory_dict(mem, *, usable_bytes: int | None = None) -> dict[str, Any]:
    """Peak, breakdown and fit of a ``MemoryEstimate``."""
    peak = mem.peak_bytes
    big = mem.largest()
    cap = mem.capacity_bytes
    return {
        "peak_gib": _r(mem.peak_gib),
        "capacity_gib": _r(cap / GIB) if cap is not None else None,
        "usable_gib": _r(usable_bytes / GIB) if usable_bytes is not None else None,
        "headroom_gib": _r(mem.headroom_gib),
        "fits": mem.fits,
        "breakdown": mem.breakdown(),
        "terms": [{"key": t.key, "label": t.label, "gib": _r(t.gib),
                   "share": _r(t.bytes / peak if peak else 0.0, 4), "explanation": t.explanation}
                  for t in mem.terms],
        "largest_term": big.key,
        "host_pinned_gib": _r(mem.host_pinned_bytes / GIB),
        "host_pinned_for": _host_pinned_for(mem.config),
        "band_gib": _r(mem.band_bytes / GIB),
        "basis": mem.basis,
        "paged_optimizer_gib": _r(mem.paged_bytes / GIB),
    }


def _host_pinned_for(cfg) -> list[str]:
    """What the configuration keeps in pinned host memory."""
    return [w for w, on in (
        ("offloaded weights, adapters and optimizer states", cfg.offload_params),
        ("CPU embeddings", cfg.embed_on_cpu),
        ("offloaded activations", cfg.offload_activations and cfg.grad_ckpt)) if on]


def estimate_dict(command: str, model, gpu, cfg, mem, speed, *, usable_bytes=None,
                  notes: Iterable[str] = ()) -> dict[str, Any]:
    """The common part of ``estimate`` and ``suggest`` JSON."""
    d: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "command": command,
        "model": model.name,
        "gpu": gpu.name,
        "settings": cfg.to_dict(),
    }
    d.update(memory_dict(mem, usable_bytes=usable_bytes))
    d["tokens_per_s"] = _r(speed.tokens_per_s, 1) if speed is not None else None
    d["step_s"] = _r(speed.step_s, 4) if speed is not None else None
    d["speed_uncertainty"] = _r(speed.uncertainty, 2) if speed is not None else None
    d["speed_basis"] = speed.basis if speed is not None else None
    d["notes"] = list(notes) + list(mem.notes)
    return d


def plan_dict(plan, why: dict[str, str] | None = None) -> dict[str, Any]:
    """A plan's settings and reasons; ``why`` maps each setting to the reason shown for it."""
    cfg = plan.config
    return {
        "settings": cfg.to_dict(),
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "effective_batch": cfg.effective_batch,
        "target_effective_batch": plan.target_effective_batch,
        "env": dict(plan.env),
        "device_map": dict(plan.device_map),
        "reasons": [r.text for r in plan.reasons],
        "why": dict(why or {}),
    }


def error_dict(err) -> dict[str, Any]:
    """``--json`` output of a command that failed with a qplan error."""
    d: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "error": {"type": type(err).__name__, "message": str(err),
                  "exit_code": getattr(err, "exit_code", 2)},
    }
    alts = getattr(err, "alternatives", None)
    if alts is not None:
        d["error"]["alternatives"] = list(alts)
    est = getattr(err, "estimate", None)
    if est is not None:
        d["error"]["smallest"] = {"settings": est.config.to_dict(), **memory_dict(est)}
    report = getattr(err, "report", None)
    if report is not None:  # a run that could not finish
        d["report"] = report.to_dict()
    return d


def gpu_dict(g) -> dict[str, Any]:
    return {"name": g.name, "marketing_name": g.marketing_name, "memory_gib": g.memory_gib,
            "compute_capability": g.cc_str, "bf16": g.bf16, "tflops_16bit": g.tflops_16bit,
            "bandwidth_gbs": g.bandwidth_gbs, "kind": g.kind, "aliases": list(g.aliases),
            "source": g.source, "provider": g.provider, "notes": g.notes}


def model_dict(m) -> dict[str, Any]:
    return {"name": m.name, "hf_id": m.hf_id, "family": m.family, "model_type": m.model_type,
            "params_b": _r(m.total_params / 1e9), "num_hidden_layers": m.num_hidden_layers,
            "hidden_size": m.hidden_size, "intermediate_size": m.intermediate_size,
            "num_attention_heads": m.num_attention_heads,
            "num_key_value_heads": m.num_key_value_heads, "vocab_size": m.vocab_size,
            "max_position_embeddings": m.max_position_embeddings, "moe": m.is_moe,
            "aliases": list(m.aliases), "source": m.source, "provider": m.provider,
            "notes": m.notes, "memory_basis": memory_basis(m)}


def memory_basis(m) -> str:
    """How qplan estimates this model's activation memory: "counted" (dry-run figures of
    its architecture ship with qplan or were made here by ``qplan count``), "analytic" (terms
    fitted to Llama-like blocks, with the wider band) or "not modelled" (mixtures of experts)."""
    from qplan.planner.activations import counts_for

    if m.is_moe:
        return "not modelled"
    return "counted" if counts_for(m) is not None else "analytic"


def hardware_dict(hw, versions: dict[str, str | None]) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "gpus": [{"index": g.index, "name": g.name, "total_gib": _r(g.total_gib),
                  "free_gib": _r(g.free_gib), "compute_capability": f"{g.compute_capability[0]}."
                  f"{g.compute_capability[1]}", "driver_version": g.driver_version,
                  "profile": g.profile.name, "matched": g.matched, "source": g.source}
                 for g in hw.gpus],
        "ram_gib": _r(hw.ram_bytes / GIB),
        "ram_available_gib": _r(hw.ram_available_bytes / GIB),
        "cgroup_memory_limit_gib": _r(hw.cgroup_memory_limit_bytes / GIB)
        if hw.cgroup_memory_limit_bytes is not None else None,
        "ram_limit_gib": _r(hw.ram_limit_bytes / GIB),
        "cpu_count": hw.cpu_count,
        "cpu_quota": hw.cpu_quota,
        "usable_cpus": hw.usable_cpus,
        "cpu_model": hw.cpu_model,
        "flash_attn": hw.flash_attn,
        "liger_kernel": hw.liger_kernel,
        "packages": versions,
        "notes": list(hw.notes),
    }


def print_json(d: dict[str, Any]) -> None:
    click.echo(json.dumps(d, indent=2))


# ---------------------------------------------------------------------------
# text
def console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=False)


def _table(title: str | None = None, *cols: tuple[str, str], show_header: bool = True,
           no_wrap: tuple[int, ...] = (0,)):
    """A table whose name column (the first, unless ``no_wrap`` says) never wraps."""
    from rich.table import Table

    t = Table(title=title, title_justify="left", title_style="bold", show_header=show_header)
    for i, (name, justify) in enumerate(cols):
        t.add_column(name, justify=justify, no_wrap=i in no_wrap)  # type: ignore[arg-type]
    return t


def _fmt(v: Any) -> str:
    if v is None:  # only lora_targets may be None: every linear layer
        return "all"
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return str(v)


def print_breakdown(d: dict[str, Any], *, title: str = "Memory (peak, as nvidia-smi shows it)",
                    fit_line: bool = True) -> None:
    """The memory table and (unless ``fit_line`` is False) the fit line, from a
    :func:`memory_dict`."""
    t = _table(title, ("term", "left"), ("GiB", "right"), ("share", "right"))
    for term in d["terms"]:
        if term["key"] == "attention_mask" and not term["gib"]:
            continue  # only with packed rows and sdpa/eager: noise otherwise
        t.add_row(term["label"], f"{term['gib']:.2f}", f"{term['share'] * 100:.0f}%")
    t.add_section()
    t.add_row("total peak", f"{d['peak_gib']:.2f}", "100%")
    c = console()
    c.print(t)
    cap = d.get("capacity_gib")
    if cap is not None and fit_line:
        verdict = "[green]fits[/green]" if d["fits"] else "[red]does not fit[/red]"
        line = (f"peak {d['peak_gib']:.2f} GiB (+{d.get('band_gib') or 0:.2f} uncertainty) of "
                f"{cap:.2f} GiB: {verdict}, headroom {d['headroom_gib']:+.2f} GiB")
        if d.get("usable_gib") is not None:
            line += f" (plans keep peak + uncertainty under {d['usable_gib']:.2f} GiB)"
        c.print(line)
    if d.get("basis") == "analytic":
        c.print("memory: this architecture has no dry-run counts; analytic terms with a wider "
                "uncertainty band (`qplan count --model ...` counts it, with the training stack)")
    if d.get("paged_optimizer_gib"):
        c.print(f"paged optimizer states: {d['paged_optimizer_gib']:.2f} GiB of managed memory, "
                "paged in for the optimizer step (after the activations are freed)")
    if d.get("host_pinned_gib"):
        n = (d.get("settings") or {}).get("gpus") or 1
        what = ", ".join(d.get("host_pinned_for") or ()) or "pinned"
        c.print(f"host memory ({what}): {d['host_pinned_gib']:.2f} GiB"
                + (f" per GPU's process ({n * d['host_pinned_gib']:.2f} GiB for {n})" if n > 1 else ""))


def print_settings(settings: dict[str, Any], reasons: dict[str, str] | None = None,
                   title: str = "Settings", third: str = "why") -> None:
    reasons = reasons or {}
    cols = [("setting", "left"), ("value", "left")]
    if reasons:
        cols.append((third, "left"))
    t = _table(title, *cols)
    for k, v in settings.items():
        row = [k, _fmt(v)]
        if reasons:
            row.append(reasons.get(k, ""))
        t.add_row(*row)
    console().print(t)


def print_lines(lines: Iterable[str], *, style: str | None = None) -> None:
    c = console()
    for line in lines:
        c.print(line, style=style, markup=False)


def print_error(message: str, *, hints: Iterable[str] = ()) -> None:
    c = console(stderr=True)
    from rich.markup import escape

    # the message is plain text: brackets in it (pip install 'qplan[train]') are not markup
    c.print(f"[bold red]error:[/bold red] {escape(message)}", soft_wrap=True, markup=True)
    for h in hints:
        c.print(f"  {h}", markup=False, soft_wrap=True)


def print_rows(title: str, headers: Iterable[str], rows: Iterable[Iterable[str]]) -> None:
    """A plain table of string cells (first column left-aligned, the rest right)."""
    headers = list(headers)
    t = _table(title, *[(h, "left" if i == 0 else "right") for i, h in enumerate(headers)])
    for r in rows:
        t.add_row(*r)
    console().print(t)


def print_gpus(rows: list[dict[str, Any]]) -> None:
    t = _table(f"GPUs ({len(rows)})", ("name", "left"), ("GiB", "right"), ("cc", "right"),
               ("bf16", "center"), ("TFLOP/s 16-bit", "right"), ("GB/s", "right"),
               ("kind", "left"), ("aliases", "left"))
    for g in rows:
        t.add_row(g["name"], f"{g['memory_gib']:g}", g["compute_capability"],
                  "yes" if g["bf16"] else "no", f"{g['tflops_16bit']:g}",
                  f"{g['bandwidth_gbs']:g}", g["kind"], ", ".join(g["aliases"]))
    console().print(t)


def print_models(rows: list[dict[str, Any]]) -> None:
    t = _table(f"Models ({len(rows)}; hub ids and sources: --json)", ("name", "left"),
               ("params B", "right"), ("layers", "right"), ("hidden", "right"),
               ("vocab", "right"), ("context", "right"), ("family", "left"), ("memory", "left"))
    for m in rows:
        fam = m["family"] + (" (MoE)" if m["moe"] else "")
        t.add_row(m["name"], f"{m['params_b']:.2f}", str(m["num_hidden_layers"]),
                  str(m["hidden_size"]), f"{m['vocab_size']:,}",
                  f"{m['max_position_embeddings']:,}", fam, m.get("memory_basis", ""))
    console().print(t)


def print_hardware(d: dict[str, Any]) -> None:
    c = console()
    if d["gpus"]:
        t = _table("GPUs (NVML)", ("#", "right"), ("device", "left"), ("total GiB", "right"),
                   ("free GiB", "right"), ("cc", "right"), ("driver", "left"),
                   ("profile", "left"), no_wrap=(1,))
        for g in d["gpus"]:
            prof = g["profile"] if g["matched"] else f"{g['profile']} (not in catalogue)"
            free = "?" if g["free_gib"] is None else f"{g['free_gib']:.2f}"
            t.add_row(str(g["index"]), g["name"], f"{g['total_gib']:.2f}", free,
                      g["compute_capability"], g["driver_version"] or "?", prof)
        c.print(t)
    else:
        c.print("GPUs: none detected")
    t = _table("Host", ("", "left"), ("", "left"), show_header=False)
    t.add_row("RAM", f"{d['ram_gib']:.1f} GiB ({d['ram_available_gib']:.1f} GiB available)")
    lim = d["cgroup_memory_limit_gib"]
    t.add_row("cgroup memory limit", "none" if lim is None else f"{lim:.1f} GiB")
    t.add_row("usable RAM", f"{d['ram_limit_gib']:.1f} GiB")
    quota = d["cpu_quota"]
    t.add_row("CPUs", f"{d['cpu_count']}" + ("" if quota is None else f" (cgroup quota {quota:g})"))
    t.add_row("CPU model", d["cpu_model"])
    t.add_row("flash-attn", "importable" if d["flash_attn"] else "not installed")
    t.add_row("liger-kernel", "importable" if d["liger_kernel"] else "not installed")
    for name, ver in d["packages"].items():
        if name not in ("flash-attn", "liger-kernel"):
            t.add_row(name, ver or "not installed")
    c.print(t)
    for n in d["notes"]:
        c.print(f"note: {n}", markup=False)
