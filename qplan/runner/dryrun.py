"""Dry-run one training step without a GPU: count the memory the real stack allocates.

The model is built from its ``config.json`` by transformers, its block linears replaced by
bitsandbytes 4-bit layers, wrapped with peft's LoRA and qplan's memory techniques exactly as
the runner does (:mod:`qplan.runner.techniques`), then one micro-batch goes forward and
backward through qplan's loss under bf16 autocast, all on PyTorch *fake* tensors
(``FakeTensorMode``): shapes, dtypes and storages are real, no arithmetic is done and no
memory is taken. A dispatch-level tracker counts the bytes of every storage alive at each
moment, and hooks on the decoder blocks record what each block keeps for backward and how
much its backward pass needs on top.

What differs from the GPU is emulated, not ignored:

- attention: PyTorch on CUDA runs ``scaled_dot_product_attention`` through the flash kernel
  (no mask) or the memory-efficient kernel (a mask, converted to a 16-bit bias that is kept
  for backward); the CPU would pick other kernels, so the dry run calls the CUDA kernels'
  own operators (their shape functions work on fake tensors);
- autocast: peft asks ``torch.is_autocast_enabled()``, which means CUDA's autocast; during
  the dry run it answers for the CPU autocast that stands in for it;
- bitsandbytes' 4-bit matmul dequantizes its weight to a 16-bit buffer for large inputs on
  the GPU; its fake kernel does not, so the dry run allocates that buffer too.

The planner never imports this module (it needs torch, transformers, peft, bitsandbytes):
``benchmarks/count_activations.py`` runs it over the catalogue and stores the figures as
data (:mod:`qplan.profiles.activations`), and :mod:`qplan.runner.counting` runs it for a
model that is not in the catalogue.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Any, Iterator

from qplan.planner.config import TrainConfig


@dataclass(frozen=True)
class BlockTrace:
    """One decoder block in a dry-run step (bytes)."""

    layer_type: str  # "full_attention", "sliding_attention", ... (config.layer_types)
    kept: int  # growth of live memory over the block's forward (what it keeps, net)
    backward: int  # peak of its backward pass above the live memory when it began
    backward_mlp: int = 0  # the same, inside its tiled MLP's backward (0: not tiled)


@dataclass(frozen=True)
class StepTrace:
    """Memory of one dry-run micro-batch step (bytes; parameters excluded)."""

    batch: int
    seq: int
    prelude: int  # before the first block: embeddings output, masks, rotary tables
    blocks: tuple[BlockTrace, ...]
    head: int  # growth from the last block's output to the end of the forward (loss included)
    loss_backward: int  # peak of the loss' backward above the live memory after the forward
    entering: int  # live memory when the last block's backward begins, above the forward's end
    peak: int  # the step's peak above the parameters

    @property
    def stack(self) -> int:
        """Live memory at the end of the forward pass (above the parameters)."""
        return self.prelude + sum(b.kept for b in self.blocks) + self.head


# ---------------------------------------------------------------------------
# live-storage tracker
def _tracker_class():
    from torch.utils._python_dispatch import TorchDispatchMode

    class LiveBytes(TorchDispatchMode):
        """Counts the bytes of every storage created while active, until it is freed."""

        def __init__(self):
            super().__init__()
            self.live = 0
            self.peak = 0  # since the last reset_peak(), outside any phase
            self.phase_peak = 0  # since the last reset_peak(), inside a phase
            self.max_peak = 0  # since the start
            self._seen: dict[int, int] = {}
            self.paused = 0
            self.in_phase = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not self.paused:
                _count_call(self, func, args, kwargs, out)
            return out

        def track(self, t) -> None:
            _track_storage(self, t)

        def _high(self, value: int) -> None:
            if self.in_phase:
                self.phase_peak = max(self.phase_peak, value)
            elif value > self.peak:
                self.peak = value
            if value > self.max_peak:
                self.max_peak = value

        def _free(self, key: int) -> None:
            self.live -= self._seen.pop(key, 0)

        def reset_peak(self) -> int:
            self.peak = self.live
            self.phase_peak = 0
            return self.live

        @contextlib.contextmanager
        def phase(self):
            """Peaks inside are kept apart (``phase_peak``): a tiled MLP's backward, whose
            peak grows with the batch (one chunk of every row) while the rest of a block's
            backward grows with the tokens: two linear pieces, fitted each on its own."""
            self.in_phase += 1
            try:
                yield
            finally:
                self.in_phase -= 1

    return LiveBytes


def _count_call(mode, func, args, kwargs, out) -> None:
    """What one dispatched call adds to ``mode`` (a LiveBytes tracker)."""
    import torch
    from torch.utils._pytree import tree_leaves

    extra = _transient_bytes(func, args)
    if extra:  # a buffer the GPU kernel allocates and frees inside the call
        mode._high(mode.live + extra + _nbytes(out))
    # an output that shares an input's storage (a view, an in-place result) takes no new
    # memory, even when that storage predates the tracker
    inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs))
              if isinstance(t, torch.Tensor)}
    for t in tree_leaves(out):
        if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in inputs:
            mode.track(t)


def _track_storage(mode, t) -> None:
    """Count ``t``'s storage once, until it is freed."""
    st = t.untyped_storage()
    key = id(st)
    if key in mode._seen:
        return
    n = st.nbytes()
    mode._seen[key] = n
    mode.live += n
    mode._high(mode.live)
    weakref.finalize(st, mode._free, key)


def _nbytes(out) -> int:
    import torch
    from torch.utils._pytree import tree_leaves

    return sum(t.untyped_storage().nbytes() for t in tree_leaves(out) if isinstance(t, torch.Tensor))


_ATTN_BACKWARD = ("aten::_scaled_dot_product_flash_attention_backward",
                  "aten::_scaled_dot_product_efficient_attention_backward")


def _transient_bytes(func, args) -> int:
    """Device memory a kernel takes and gives back within one call, invisible to fake
    tensors (each measured on the GPU machine: benchmarks/results/sdpa_workspace.json):

    - bitsandbytes' 4-bit matmul dequantizes its weight into a 16-bit buffer when the input
      has more than ``_BNB_CUSTOM_MAX_TOKENS`` rows (its own GEMM below);
    - the attention backward accumulates the query gradient in float32 (4 bytes per query
      element), and with fewer key/value heads than query heads (GQA) first computes
      key/value gradients for every query head (2 + 2 bytes per query element): PyTorch
      2.11's cuDNN kernel on an H200, and FlashAttention 2, both do."""
    schema = getattr(func, "_schema", None)
    if schema is None:
        return 0
    if schema.name == "bitsandbytes::gemm_4bit":
        a, shape_b = args[0], args[2]
        rows = a.numel() // a.shape[-1]
        if rows <= _BNB_CUSTOM_MAX_TOKENS:
            return 0
        return int(shape_b[0]) * int(shape_b[1]) * a.element_size()
    if schema.name in _ATTN_BACKWARD:
        q, k = args[1], args[2]
        extra = 4 * q.numel()
        if k.shape[1] != q.shape[1]:
            extra += 4 * q.numel()
        return extra
    return 0


# ---------------------------------------------------------------------------
# what the GPU does differently, emulated for the length of a dry run
_SDPA_FLASH_MAX_HEAD_DIM = 256  # flash kernel limit (PyTorch on sm80+)
_BNB_CUSTOM_MAX_TOKENS = 512  # bitsandbytes uses its own 4-bit GEMM only below this


def _cuda_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False):
    """``scaled_dot_product_attention`` as PyTorch runs it on a CUDA GPU (sm80 and newer):
    the flash kernel without a mask, else the memory-efficient kernel with the mask turned
    into an additive 16-bit bias (which its backward keeps), else the math path."""
    import torch

    if torch.is_autocast_enabled("cpu"):  # CUDA autocast runs SDPA in the low precision
        dt = torch.get_autocast_dtype("cpu")
        query, key, value = (t.to(dt) for t in (query, key, value))
    hd = query.shape[-1]
    low = query.dtype in (torch.float16, torch.bfloat16)
    if attn_mask is None and low and hd <= _SDPA_FLASH_MAX_HEAD_DIM and hd % 8 == 0 \
            and key.shape[-1] == hd == value.shape[-1]:
        # (the flash kernel reads shared key/value heads in place: no repeat for GQA)
        out = torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, dropout_p, is_causal, False, scale=scale)[0]
        return out
    if enable_gqa and key.shape[1] != query.shape[1]:
        rep = query.shape[1] // key.shape[1]
        key, value = (t.repeat_interleave(rep, dim=1) for t in (key, value))
    bias = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            bias = torch.zeros(attn_mask.shape, dtype=query.dtype).masked_fill_(
                attn_mask.logical_not(), float("-inf"))
        else:
            bias = attn_mask.to(query.dtype)
        s = bias.shape[-1]
        if s % 16:  # the kernel wants the bias' rows aligned to 16 elements
            padded = torch.zeros(*bias.shape[:-1], s + 16 - s % 16, dtype=bias.dtype)
            padded[..., :s] = bias
            bias = padded[..., :s]
        bias = bias.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    out = torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, bias, True, dropout_p, is_causal, scale=scale)[0]
    return out


_TRACKERS: list = []  # the tracker of the trace in progress (host copies are not device memory)


def _host_stash(hidden, pool):
    if _TRACKERS:
        _TRACKERS[-1].paused += 1
    try:
        return hidden.detach().clone(), None, False
    finally:
        if _TRACKERS:
            _TRACKERS[-1].paused -= 1


def _phased(backward):
    """A Function's backward whose memory the trace in progress keeps apart."""
    def wrapped(ctx, *grads):
        t = _TRACKERS[-1] if _TRACKERS else None
        if t is None or not hasattr(t, "phase"):
            return backward(ctx, *grads)
        with t.phase():
            return backward(ctx, *grads)
    return wrapped


def _cuda_dropout(input, p=0.5, training=True, inplace=False):
    """CUDA's fused dropout keeps a boolean mask for backward; the CPU kernel would keep a
    16-bit noise tensor instead."""
    import torch

    if not training or p == 0.0:
        return input
    return torch.native_dropout(input, p, True)[0]


def _fake_friendly_apply(self, fn, recurse=True):
    """``Module._apply`` that re-registers converted parameters instead of swapping them
    (PyTorch swaps fake parameters, which fails while the fake mode holds weak references;
    a dry run's modules are never shared, so re-registering is equivalent)."""
    import torch

    if recurse:
        for m in self.children():
            m._apply(fn)
    for k, p in list(self._parameters.items()):
        if p is None:
            continue
        with torch.no_grad():
            new = fn(p)
        if new is not p:
            self._parameters[k] = torch.nn.Parameter(new, requires_grad=p.requires_grad)
    for k, b in list(self._buffers.items()):
        if b is not None:
            self._buffers[k] = fn(b)
    return self


def _real_twin_style(original):
    """``lowmem._same_forward`` compares the lean norm with the module's own forward on a
    probe; fake weights have no values, so the probe runs on a real twin of the module
    (same class, same epsilon, random weight)."""
    import torch

    def same_forward(module, eps, offset):
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        cls = type(module)
        n = module.weight.shape[-1]
        with unset_fake_temporarily():
            try:
                twin = cls(n)
            except TypeError:
                return False
            for a in ("variance_epsilon", "eps", "epsilon"):
                if hasattr(module, a):
                    setattr(twin, a, getattr(module, a))
            with torch.no_grad():
                twin.weight.copy_(torch.randn(n, generator=torch.Generator().manual_seed(1)) * 0.1 + 1)
            return original(twin, eps, offset)

    return same_forward


@contextlib.contextmanager
def gpu_emulation(packed: bool) -> Iterator[None]:
    """Patches that make a CPU dry run allocate what a CUDA training step allocates
    (module docstring). ``packed``: whether rows hold several examples; transformers reads
    that off the position ids, which fake tensors cannot show, so the dry run tells it.
    Everything patched is restored on exit."""
    import bitsandbytes as bnb
    import torch
    import torch.nn.functional as F
    from transformers import masking_utils

    from qplan.runner import lowmem

    saved: list[tuple[Any, str, Any]] = []

    def patch(obj, name, value):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    orig_enabled = torch.is_autocast_enabled

    def is_autocast_enabled(*args, **kwargs):
        if not args and not kwargs:
            return orig_enabled("cpu")  # peft's question "is (CUDA) autocast on?"
        return orig_enabled(*args, **kwargs)

    if "dynamic" not in bnb.functional.name2qmap:  # built with .tolist(): not under fake mode
        bnb.functional.name2qmap["dynamic"] = bnb.functional.create_dynamic_map()
    patch(torch, "is_autocast_enabled", is_autocast_enabled)
    patch(F, "scaled_dot_product_attention", _cuda_sdpa)
    patch(torch.nn.Module, "_apply", _fake_friendly_apply)
    patch(lowmem, "_same_forward", _real_twin_style(lowmem._same_forward))
    # offloaded block inputs live in host memory; their way back is a new device tensor
    patch(lowmem, "_stash", _host_stash)
    patch(lowmem, "_unstash", lambda ctx: ctx.host.clone())
    patch(F, "dropout", _cuda_dropout)
    mlp_fn = lowmem._cls("mlp", lowmem._build_tiled_mlp)
    patch(mlp_fn, "backward", staticmethod(_phased(mlp_fn.backward)))
    find = masking_utils.find_packed_sequence_indices
    patch(masking_utils, "find_packed_sequence_indices",
          lambda position_ids: find(position_ids) if packed else None)
    try:
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


# ---------------------------------------------------------------------------
# the model
def build_fake_model(config: dict[str, Any], cfg: TrainConfig, fake_mode):
    """The architecture of ``config`` (a ``config.json`` dict), on fake tensors, quantized
    as ``cfg`` says (4-bit NF4/FP4 block linears, or 16-bit for ``quant='none'``).

    Only the decoder blocks' linear layers are quantized, as transformers' bitsandbytes
    integration does (embeddings, lm_head and norms stay 16-bit)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from qplan.runner.techniques import quantization_config, torch_dtype

    hf = AutoConfig.for_model(**config)
    hf.use_cache = False
    with fake_mode:
        # the attention the runner loads with (a default could differ: Gemma 2 defaults to
        # eager for its soft-capping; the runner asks for sdpa)
        model = AutoModelForCausalLM.from_config(
            hf, dtype=torch_dtype(cfg), attn_implementation="eager" if cfg.attn == "eager" else "sdpa")
    q = quantization_config(cfg)
    if q is None:
        return model
    import bitsandbytes as bnb
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    weights = {n: m.weight for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in n}
    biases = {n: m.bias for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and ".layers." in n and m.bias is not None}
    model = replace_with_bnb_linear(model, modules_to_not_convert=["lm_head"],
                                    quantization_config=q)
    with fake_mode:
        for name, mod in model.named_modules():
            if not isinstance(mod, bnb.nn.Linear4bit):
                continue
            packed, state = bnb.functional.quantize_4bit(
                weights[name], blocksize=64, compress_statistics=cfg.double_quant,
                quant_type=cfg.quant, quant_storage=torch.uint8)
            # a plain (fake) tensor with Params4bit's attributes: Params4bit cannot wrap
            # a fake tensor, and Linear4bit/peft only read these attributes
            packed.quant_state, packed.quant_type = state, cfg.quant
            packed.compress_statistics, packed.blocksize = cfg.double_quant, 64
            packed.bnb_quantized, packed.quant_storage = True, torch.uint8
            del mod._parameters["weight"]
            mod.weight = packed
            mod.quant_state = state
            if mod.bias is not None:  # the model's own (fake) bias, not the new module's
                mod.bias = torch.nn.Parameter(biases[name].detach().to(torch_dtype(cfg)),
                                              requires_grad=False)
    model.is_loaded_in_4bit = True
    return model


def _first_tensor(x):
    import torch

    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)):
        for y in x:
            t = _first_tensor(y)
            if t is not None:
                return t
    return getattr(x, "last_hidden_state", None) if not isinstance(x, dict) else None


class _Recorder:
    """Hooks on the decoder blocks that read the tracker at each block boundary."""

    def __init__(self, tracker, layers, final_norm):
        self.t = tracker
        self.layers = layers
        self.n = len(layers)
        self.pre = [None] * (self.n + 1)  # live memory entering block k (n: the final norm)
        self.bwd_start = [None] * self.n  # live memory when block k's backward begins
        self.bwd_peak = [0] * self.n
        self.bwd_mlp = [0] * self.n
        self.active = None  # block whose backward is running
        self.loss_peak = None  # peak from the forward's end to the first block backward
        self.backward = False
        self.handles = []
        for k, layer in enumerate(layers):
            self.handles.append(layer.register_forward_pre_hook(self._pre(k)))
            self.handles.append(layer.register_forward_hook(self._post(k)))
        if final_norm is not None:
            self.handles.append(final_norm.register_forward_pre_hook(self._pre(self.n)))

    def _pre(self, k):
        def hook(module, args):
            if not self.backward and self.pre[k] is None:
                self.pre[k] = self.t.live
        return hook

    def _post(self, k):
        def hook(module, args, out):
            t = _first_tensor(out)
            if self.backward or t is None or not t.requires_grad:
                return
            t.register_hook(self._grad(k))
        return hook

    def _grad(self, k):
        def hook(grad):
            if self.active is None and self.loss_peak is None:  # the first block backward
                self.loss_peak = self.t.peak
            self._close()
            self.active = k
            self.bwd_start[k] = self.t.live
            self.t.reset_peak()
        return hook

    def _close(self) -> None:
        if self.active is not None:
            k = self.active
            self.bwd_peak[k] = max(self.bwd_peak[k], self.t.peak - self.bwd_start[k])
            ph = getattr(self.t, "phase_peak", 0)
            if ph:
                self.bwd_mlp[k] = max(self.bwd_mlp[k], ph - self.bwd_start[k])
            self.active = None

    def finish(self) -> None:
        self._close()
        for h in self.handles:
            h.remove()


def _decoder_parts(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base, list(base.model.layers), getattr(base.model, "norm", None)


def _layer_types(hf_config, n: int) -> list[str]:
    types = getattr(hf_config, "layer_types", None)
    if types:
        return list(types)[:n]
    return ["full_attention"] * n


class _CudaCounter:
    """The tracker's interface over PyTorch's CUDA allocator counters (a real run)."""

    paused = 0

    def __init__(self):
        import torch

        self.torch = torch
        self.max_peak = 0
        self._base_peak = 0

    @property
    def live(self) -> int:
        return self.torch.cuda.memory_allocated()

    @property
    def peak(self) -> int:
        p = self.torch.cuda.max_memory_allocated()
        self.max_peak = max(self.max_peak, p)
        return p

    def reset_peak(self) -> int:
        self.max_peak = max(self.max_peak, self.torch.cuda.max_memory_allocated())
        self.torch.cuda.reset_peak_memory_stats()
        return self.live

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.peak  # noqa: B018 - folds the last window into max_peak


class DryRun:
    """A model of ``config`` set up for ``cfg`` (as the runner sets it up), ready to trace
    micro-batches of any size: ``with DryRun(config, cfg) as dr: dr.trace(b, s)``.
    ``packed`` (default ``cfg.packed_rows``) gives every row two examples, positions
    restarting, as ``qplan run``'s packed rows have.

    ``device="fake"`` (default) is the dry run: fake tensors on the CPU, the GPU's kernels
    emulated. ``device="cuda"`` runs the same step for real on a GPU and reads PyTorch's
    allocator at the same moments: the yardstick the dry run is checked against
    (``benchmarks/count_activations.py --device cuda``)."""

    def __init__(self, config: dict[str, Any], cfg: TrainConfig, *, packed: bool | None = None,
                 device: str = "fake", model_dir: str | None = None):
        self.config, self.cfg = config, cfg
        self.packed = cfg.packed_rows if packed is None else packed
        self.device = device
        self.model_dir = model_dir  # a real run's saved random-weight model (else made here)
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "DryRun":
        from qplan.runner import techniques as T

        try:
            if self.device == "fake":
                from torch._subclasses.fake_tensor import FakeTensorMode

                self._stack.enter_context(gpu_emulation(self.packed))
                self.mode = FakeTensorMode(allow_non_fake_inputs=True)
                model = build_fake_model(self.config, self.cfg, self.mode)
            else:
                self.mode = contextlib.nullcontext()
                model = self._real_model()
            with self.mode:
                T.prepare_for_training(model, self.cfg)
                self.model = T.add_lora(model, _profile_for(self.config), self.cfg)
        except BaseException:
            self._stack.close()
            raise
        return self

    def _real_model(self):
        """Random weights saved and loaded in 4 bits exactly as the runner loads a model."""
        import tempfile

        from qplan.runner import techniques as T

        path = self.model_dir
        if path is None:
            path = self._stack.enter_context(tempfile.TemporaryDirectory(prefix="qplan-count-"))
            save_random_model(self.config, path, self.device)
        return T.load_model(path, self.cfg, device_map={"": 0} if self.device == "cuda" else None)

    def __exit__(self, *exc) -> None:
        model = getattr(self, "model", None)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        pool = getattr(base, "_qplan_offload_pool", None)
        if pool is not None:  # page-locked buffers go back before the next model's
            pool.close()
        self.model = None
        self._stack.close()

    def _inputs(self, batch: int, seq: int):
        import torch

        dev = "cpu" if self.device == "fake" else self.device
        with self.mode:
            ids = torch.zeros(batch, seq, dtype=torch.long, device=dev)
            labels = torch.zeros(batch, seq, dtype=torch.long, device=dev)
            pos = None
            if self.packed:
                half = seq // 2
                pos = torch.cat([torch.arange(half), torch.arange(seq - half)]).expand(batch, seq)
                pos = pos.to(dev)
        return ids, labels, pos

    def trace(self, batch: int, seq: int) -> StepTrace:
        """One micro-batch of ``batch`` rows of ``seq`` tokens, forward and backward."""
        import torch

        from qplan.runner import techniques as T

        cfg, model = self.cfg, self.model
        ids, labels, pos = self._inputs(batch, seq)
        for p in model.parameters():  # each trace allocates its own gradients
            p.grad = None
        if self.device == "cuda":
            T.free_cached_memory()
        base, layers, norm = _decoder_parts(model)
        tracker = _CudaCounter() if self.device == "cuda" else _tracker_class()()
        rec = _Recorder(tracker, layers, norm)
        _TRACKERS.append(tracker)
        autocast = "cpu" if self.device == "fake" else "cuda"
        try:
            with self.mode, tracker:
                start = tracker.reset_peak()
                tracker.max_peak = start
                with torch.autocast(autocast, dtype=T.torch_dtype(cfg)):
                    loss = T.causal_lm_loss(model, cfg, ids, labels, position_ids=pos)
                end_forward = tracker.reset_peak()
                rec.backward = True
                loss.backward()
                rec.finish()
                del loss
        finally:
            rec.finish()
            _TRACKERS.pop()
        pre = rec.pre
        if pre[rec.n] is None:
            pre[rec.n] = end_forward
        types = _layer_types(base.config, rec.n)
        blocks = tuple(BlockTrace(types[k], pre[k + 1] - pre[k], rec.bwd_peak[k], rec.bwd_mlp[k])
                       for k in range(rec.n))
        last = rec.bwd_start[rec.n - 1]
        return StepTrace(batch=batch, seq=seq, prelude=pre[0] - start, blocks=blocks,
                         head=end_forward - pre[rec.n],
                         loss_backward=(rec.loss_peak or end_forward) - end_forward,
                         entering=(last if last is not None else end_forward) - end_forward,
                         peak=tracker.max_peak - start)


def save_random_model(config: dict[str, Any], path: str, device: str = "cuda") -> None:
    """A random-weight bf16 model of ``config`` in ``path`` (for real runs)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from qplan.runner import techniques as T

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.bfloat16)
    model.save_pretrained(path)
    del model
    T.free_cached_memory()


def step_trace(config: dict[str, Any], cfg: TrainConfig, *, batch: int | None = None,
               seq: int | None = None, packed: bool | None = None) -> StepTrace:
    """Dry-run one micro-batch of ``cfg`` (``batch`` x ``seq``, default the config's) on the
    architecture ``config``: what it allocated (see :class:`StepTrace`)."""
    with DryRun(config, cfg, packed=packed) as dr:
        return dr.trace(batch or cfg.batch_size, seq or cfg.seq_len)


def _profile_for(config: dict[str, Any]):
    from qplan.profiles.models import ModelProfile

    return ModelProfile.from_config_dict(config, name=config.get("_name_or_path") or "dry-run")
