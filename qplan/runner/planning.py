"""Which settings a run starts with, on which device, and what comes after an OOM.

No torch here: the parent process plans; only the training child imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qplan import api
from qplan.errors import BadInputError
from qplan.planner.config import TrainConfig
from qplan.planner.plan import Plan, Reason, load_plan
from qplan.profiles.gpus import GpuProfile
from qplan.profiles.models import ModelProfile
from qplan.runner.protocol import Simulation

# The card whose plan picks the settings when training on CPU (memory is not limited there).
CPU_PLANNING_GPU = "rtx-4090"
DEFAULT_SEQ = 2048
DEFAULT_EFFECTIVE_BATCH = 16


@dataclass
class Setup:
    """The plan a run starts with and where it runs."""

    plan: Plan
    gpu: GpuProfile  # the profile the plan (and the estimates) are for
    device: str  # "cuda" or "cpu"
    device_name: str
    simulate: Simulation | None = None
    notes: list[str] = field(default_factory=list)


def detect_cuda(pm=None) -> tuple[str | None, Any]:
    """(name of GPU 0, its DetectedGpu) from NVML, or (None, hardware notes)."""
    from qplan.planner.hardware import probe

    hw = probe(gpus=api.catalog(pm).gpus)
    if hw.gpus:
        return hw.gpus[0].name, (hw.gpus[0], hw)
    return None, hw


def simulation(gpu: GpuProfile) -> Simulation:
    """The allocator cap that makes a big GPU look like ``gpu``: what that card leaves to
    PyTorch: its memory less the CUDA context, the libraries' workspaces (both outside
    PyTorch's allocator) and what the display and other programs hold on a card of its kind
    (the planner's default reserve)."""
    from qplan.planner.memory import cuda_context, libraries
    from qplan.planner.search import default_reserve_bytes

    ctx = cuda_context(gpu)
    cap = gpu.memory_bytes - ctx - libraries(gpu) - default_reserve_bytes(gpu)
    return Simulation(name=gpu.name, card_bytes=gpu.memory_bytes, context_bytes=ctx,
                      cap_bytes=cap)


def _cpu_settings(cfg: TrainConfig, notes: list[str]) -> TrainConfig:
    changes: dict[str, Any] = {}
    if cfg.compute_dtype != "bf16":
        changes["compute_dtype"] = "bf16"
    if cfg.attn == "flash_attention_2":
        changes["attn"] = "sdpa"
    if changes:
        notes.append("on CPU: " + ", ".join(f"{k} -> {v}" for k, v in changes.items()))
        cfg = cfg.with_(**changes)
    return cfg


def _detected(cpu: bool, pm=None):
    """GPU 0 as detected (None on CPU or with ``cpu``)."""
    if cpu:
        return None
    name, info = detect_cuda(pm)
    return info[0] if name is not None else None


def _gpu(detected, *, gpu_name: str | None, simulate_gpu: str | None, cpu: bool,
         notes: list[str], pm=None) -> GpuProfile:
    """The profile the plan is made for: simulated, named, detected, or the CPU default."""
    if simulate_gpu and detected is None:
        why = "--cpu was given" if cpu else "no NVIDIA GPU was found on this machine"
        raise BadInputError(f"--simulate-gpu {simulate_gpu} caps a real GPU's memory to that "
                            f"card's, but {why}. Run it on a machine with a bigger GPU, or plan "
                            f"without training: qplan suggest --gpu {simulate_gpu}")
    if simulate_gpu:
        gpu = api.get_gpu(simulate_gpu, pm=pm)
        if detected.total_bytes < gpu.memory_bytes:
            raise BadInputError(f"--simulate-gpu {gpu.name} needs a GPU with at least "
                                f"{gpu.memory_gib:g} GiB; GPU 0 ({detected.name}) has "
                                f"{detected.total_gib:.1f} GiB")
        return gpu
    if gpu_name:
        return api.get_gpu(gpu_name, pm=pm)
    if detected is not None:
        notes.append(f"detected GPU 0: {detected.name} -> profile {detected.profile.name}")
        return detected.profile
    return api.get_gpu(CPU_PLANNING_GPU, pm=pm)


def _from_plan_file(plan_file: str, profile: ModelProfile, gpu: GpuProfile, device: str,
                    overrides: dict[str, Any], model_ref: str, notes: list[str], pm=None) -> Plan:
    """``plan_file``'s settings with ``overrides`` applied."""
    try:
        cfg = load_plan(plan_file).config.with_(**overrides)
    except (TypeError, BadInputError) as e:
        raise BadInputError(f"--plan {plan_file}: overrides: {e}") from None
    api.check_fixed(profile, cfg.to_dict())
    if device == "cpu":
        cfg = _cpu_settings(cfg, notes)
    plan = api.make_plan(profile, gpu, cfg, target=cfg.effective_batch, model_ref=model_ref, pm=pm)
    given = sorted(k for k in overrides if k != "packed_rows")
    notes.append(f"settings from {plan_file}"
                 + (f" with {', '.join(given)} overridden" if given else ""))
    if plan.memory is not None and not plan.memory.fits and device == "cuda":
        notes.append(f"the plan's estimate ({plan.memory.peak_gib:.1f} GiB) exceeds "
                     f"{gpu.name}; the run will make it safer if it runs out of memory")
    return plan


def _searched(profile: ModelProfile, gpu: GpuProfile, device: str, overrides: dict[str, Any],
              effective_batch: int | None, flash: bool, model_ref: str, notes: list[str],
              pm=None, use_calibration: bool = True) -> Plan:
    """The planner's choice for ``gpu`` with ``overrides`` held fixed."""
    api.check_fixed(profile, overrides)
    fixed = dict(overrides)
    seq = fixed.pop("seq_len", None) or min(DEFAULT_SEQ, profile.max_position_embeddings)
    if "batch_size" in fixed and "grad_accum" in fixed:
        target = fixed["batch_size"] * fixed["grad_accum"]
    else:
        target = effective_batch or DEFAULT_EFFECTIVE_BATCH
    if device == "cpu" and fixed.get("attn") == "flash_attention_2":
        fixed["attn"] = "sdpa"
    plan = api.suggest(profile, gpu, seq_len=seq, target_effective_batch=target, fixed=fixed,
                       flash_attn_available=flash, model_ref=model_ref, pm=pm,
                       use_calibration=use_calibration)
    cfg = plan.config
    if device == "cpu":
        cfg = _cpu_settings(cfg, notes)
        plan = api.make_plan(profile, gpu, cfg, target=target, model_ref=model_ref, pm=pm,
                             use_calibration=use_calibration)
    if cfg.effective_batch != target:
        notes.append(f"effective batch {cfg.effective_batch} (asked {target}: not a multiple "
                     f"of the per-device batch {cfg.batch_size})")
    return plan


def choose(*, model_ref: str, profile: ModelProfile, plan_file: str | None,
           overrides: dict[str, Any], effective_batch: int | None, gpu_name: str | None,
           simulate_gpu: str | None, cpu: bool, pm=None, use_calibration: bool = True) -> Setup:
    """The starting plan: ``plan_file`` with ``overrides`` applied, or the planner's choice
    for the GPU (detected, named, or simulated) with ``overrides`` held fixed."""
    notes: list[str] = []
    detected = _detected(cpu, pm)
    device = "cuda" if detected is not None else "cpu"
    gpu = _gpu(detected, gpu_name=gpu_name, simulate_gpu=simulate_gpu, cpu=cpu, notes=notes,
               pm=pm)
    if device == "cpu":
        notes.append(f"training on CPU: settings planned for {gpu.name} only to choose them; "
                     "CPU memory is not limited by the plan")
    # the runner's rows restart positions at every example (packing and padding alike)
    overrides = {"packed_rows": True, **overrides}
    if plan_file:
        plan = _from_plan_file(plan_file, profile, gpu, device, overrides, model_ref, notes, pm)
    else:
        flash = bool(detected is not None and _has_flash_attn())
        plan = _searched(profile, gpu, device, overrides, effective_batch, flash, model_ref,
                         notes, pm, use_calibration)
    return Setup(plan=plan, gpu=gpu, device=device,
                 device_name=detected.name if detected is not None else "CPU",
                 simulate=simulation(gpu) if simulate_gpu else None, notes=notes)


def _has_flash_attn() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def _set_aside(cfg: TrainConfig, new: TrainConfig, who: str,
               allow_shorter_seq: bool) -> str | None:
    """Why a plugin's proposal after an OOM cannot be used (None: it can)."""
    if new.effective_batch != cfg.effective_batch:
        return (f"plugin {who!r} proposed effective batch {new.effective_batch}, but a run "
                f"keeps it at {cfg.effective_batch}")
    if new.seq_len < cfg.seq_len and not allow_shorter_seq:
        return (f"plugin {who!r} proposed a shorter sequence ({new.seq_len}), which needs "
                "--allow-shorter-seq")
    if new.seq_len > cfg.seq_len:
        return f"plugin {who!r} proposed a longer sequence ({new.seq_len})"
    if new.gpus != cfg.gpus:
        return (f"plugin {who!r} proposed {new.gpus} GPU(s), but a run keeps the "
                f"{cfg.gpus} it started with")
    if new.strategy != cfg.strategy:
        return (f"plugin {who!r} proposed strategy {new.strategy}, but a run keeps "
                f"{cfg.strategy}: its checkpoints are in that strategy's form")
    if new == cfg:
        return f"plugin {who!r} proposed the same settings"
    return None


def next_config(plan: Plan, model: ModelProfile, gpu: GpuProfile, *, attempt: int,
                error: BaseException, allow_shorter_seq: bool, pm=None
                ) -> tuple[TrainConfig, Reason] | None:
    """The configuration to try after ``plan`` ran out of memory, and why.

    The plugins' ``on_out_of_memory`` hook answers first; a proposal that changes the
    effective batch, or shortens the sequence without ``allow_shorter_seq``, or changes
    nothing, is set aside (the reason says so) for qplan's own ladder,
    :func:`qplan.api.next_safer_config`. None when nothing is left to try.
    """
    from qplan.plugins.calls import propose_after_oom
    from qplan.plugins.manager import get_plugin_manager

    cfg = plan.config
    found = propose_after_oom(pm or get_plugin_manager(), plan=plan, model=model, gpu=gpu,
                              attempt=attempt, error=error)
    aside = None
    if found is not None:
        new, who = found
        aside = _set_aside(cfg, new, who, allow_shorter_seq)
        if aside is None:
            changed = tuple(k for k in cfg.to_dict() if getattr(cfg, k) != getattr(new, k))
            return new, Reason(changed, f"{_diff(cfg, new)} (proposed by plugin {who!r})",
                               source=who)
    nxt = api.next_safer_config(cfg, allow_shorter_seq=allow_shorter_seq)
    if nxt is None:
        return None
    new, why = nxt
    if aside:
        why = Reason(why.settings, f"{aside}; {why.text}", why.source)
    return new, why


def _diff(a: TrainConfig, b: TrainConfig) -> str:
    da, db = a.to_dict(), b.to_dict()
    return ", ".join(f"{k} {da[k]} -> {db[k]}" for k in da if da[k] != db[k])
