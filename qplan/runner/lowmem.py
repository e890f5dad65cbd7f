"""Memory-lean building blocks in plain torch (no Triton, so they also run on CPU).

- :class:`OffloadedCheckpoint`: gradient checkpointing of a decoder block whose saved input
  goes to host memory (a bounded pool of pinned buffers) and comes back for backward.
- :class:`LeanRMSNorm`: an RMSNorm that keeps only its 16-bit input and one float32 scale
  per token for backward (transformers' keeps a float32 copy of the input), and works over
  bounded slices of rows so its float32 temporaries stay small.
- :class:`TiledMLP`: a block's MLP run over the sequence in chunks, each chunk recomputed in
  backward, writing into preallocated outputs and input gradients (no concatenation).

torch is imported lazily by :func:`_torch`; the classes are built on first use so that
importing this module costs nothing on the planning path.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable

from qplan.planner import config as _config

_CLASSES: dict[str, Any] = {}
_LOCK = threading.Lock()

# Rows (tokens) per slice of the lean RMSNorm's float32 work, and the elements a slice of a
# narrower norm may take (qplan.planner.config.norm_slice_rows, which the speed model counts)
NORM_ROWS = _config.NORM_ROWS
NORM_ELEMENTS = _config.NORM_ELEMENTS


def norm_slice_rows(width: int) -> int:
    """Rows per slice of the lean RMSNorm over ``width`` features."""
    return _config.norm_slice_rows(width, NORM_ROWS, NORM_ELEMENTS)


def _torch():
    import torch

    return torch


# ---------------------------------------------------------------------------
# pinned host buffers
class PinnedPool:
    """Host buffers for offloaded activations, reused from step to step.

    Buffers are flat byte arrays; a request takes the smallest free one that is large
    enough, else allocates one, page-locked when CUDA is available so that copies are
    asynchronous. At most ``limit_bytes`` are ever page-locked: beyond that, a request
    first evicts free buffers, then takes ordinary (pageable) memory, which is slower to
    copy but never fails for want of page-locked memory. ``pinned`` says whether
    page-locking is tried at all. One step of an 8B model at 64k tokens needs 16 GiB.
    """

    def __init__(self, limit_bytes: int | None = None, pinned: bool | None = None):
        torch = _torch()
        self.pinned = torch.cuda.is_available() if pinned is None else pinned
        self.limit_bytes = limit_bytes
        self.free: list[Any] = []
        self.allocated_bytes = 0
        self.peak_in_use_bytes = 0
        self.in_use_bytes = 0
        self.pinned_failed = False
        # page-locked buffers by address, held here so none is freed while registered (a
        # forward whose backward never runs, after an OOM, drops its buffer otherwise)
        self.registered: dict[int, Any] = {}

    def _alloc(self, nbytes: int):
        """A host buffer of exactly ``nbytes``: ordinary memory, page-locked with
        ``cudaHostRegister`` while the pinned budget allows (``pin_memory=True`` would
        round every buffer up to a power of two: 1 GiB for a 613 MiB block input)."""
        torch = _torch()
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if self.pinned and not self.pinned_failed and nbytes and (
                self.limit_bytes is None or self.allocated_bytes + nbytes <= self.limit_bytes):
            rc = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 0)
            if int(rc) == 0:
                self.allocated_bytes += nbytes
                self.registered[buf.data_ptr()] = buf
            else:  # page-locked memory refused: pageable from now on
                self.pinned_failed = True
        return buf

    def _release(self, buf) -> None:
        if buf.data_ptr() in self.registered:
            _torch().cuda.cudart().cudaHostUnregister(buf.data_ptr())
            del self.registered[buf.data_ptr()]
            self.allocated_bytes -= buf.numel()

    def is_pinned(self, buf) -> bool:
        return buf.data_ptr() in self.registered

    def close(self) -> None:
        """Unpin and drop every free buffer."""
        for b in self.free:
            self._release(b)
        self.free.clear()

    def take(self, like):
        """A host tensor of ``like``'s shape and dtype (contents undefined)."""
        nbytes = like.numel() * like.element_size()
        fit = [b for b in self.free if b.numel() >= nbytes]
        if fit:
            buf = min(fit, key=lambda b: b.numel())
            del self.free[next(i for i, b in enumerate(self.free) if b is buf)]
        else:
            while self.free and self.limit_bytes is not None and \
                    self.allocated_bytes + nbytes > self.limit_bytes:
                self._release(self.free.pop(0))
            buf = self._alloc(nbytes)
        self.in_use_bytes += buf.numel()
        self.peak_in_use_bytes = max(self.peak_in_use_bytes, self.in_use_bytes)
        return buf[:nbytes].view(like.dtype).view(like.shape), buf, self.is_pinned(buf)

    def give(self, buf) -> None:
        self.in_use_bytes -= buf.numel()
        self.free.append(buf)


# ---------------------------------------------------------------------------
def _stash(hidden, pool: PinnedPool):
    """Send a checkpointed block input to host memory: ``(host tensor, pool buffer, pinned)``
    (on a CPU run, a copy stands in)."""
    if hidden.device.type == "cpu":
        return hidden.detach().clone(), None, False
    host, buf, pinned = pool.take(hidden)
    host.copy_(hidden.detach(), non_blocking=pinned)
    return host, buf, pinned


def _unstash(ctx):
    """Bring a stashed block input back to its device for the block's backward."""
    if ctx.device.type == "cpu":
        return ctx.host
    hidden = ctx.host.to(ctx.device, non_blocking=ctx.pinned)
    # the copy is queued before anything that could overwrite the buffer (the next
    # forward's copy into it), so it can go back to the pool now
    ctx.pool.give(ctx.buf)
    return hidden


def _offload_forward(ctx, run, pool, preserve_rng, hidden, args):
    """OffloadedCheckpoint.forward: remember how to recompute, send ``hidden`` to the host."""
    torch = _torch()
    from torch.utils.checkpoint import get_device_states

    ctx.run, ctx.pool, ctx.preserve_rng = run, pool, preserve_rng
    ctx.nargs = len(args)
    ctx.device = hidden.device
    ctx.hidden_requires_grad = hidden.requires_grad
    dev = hidden.device.type
    ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
    ctx.cpu_autocast = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
    if preserve_rng:
        ctx.cpu_rng = torch.get_rng_state()
        ctx.had_device = dev != "cpu"
        if ctx.had_device:
            ctx.devices, ctx.device_states = get_device_states(hidden, *args)
    ctx.host, ctx.buf, ctx.pinned = _stash(hidden, pool)
    ctx.args = args
    with torch.no_grad():
        return run(hidden, *args)


def _recompute(ctx, hidden):
    """Re-run the block on ``hidden`` with autograd, the forward's RNG and autocast."""
    torch = _torch()
    from torch.utils.checkpoint import set_device_states

    dev, on, dtype = ctx.autocast
    rng_devices = ctx.devices if ctx.preserve_rng and ctx.had_device else []
    with torch.random.fork_rng(devices=rng_devices, enabled=ctx.preserve_rng,
                               device_type=dev if dev != "cpu" else "cuda"):
        if ctx.preserve_rng:
            torch.set_rng_state(ctx.cpu_rng)
            if rng_devices:
                set_device_states(ctx.devices, ctx.device_states, device_type=dev)
        with torch.enable_grad(), torch.autocast(dev, enabled=on, dtype=dtype), \
                torch.autocast("cpu", enabled=ctx.cpu_autocast[0], dtype=ctx.cpu_autocast[1]):
            return ctx.run(hidden, *ctx.args)


def _offload_backward(ctx, grads):
    """OffloadedCheckpoint.backward: bring ``hidden`` back, recompute, backpropagate."""
    torch = _torch()
    hidden = _unstash(ctx)
    ctx.host = ctx.buf = None
    hidden = hidden.detach().requires_grad_(ctx.hidden_requires_grad)
    out = _recompute(ctx, hidden)
    outs = out if isinstance(out, tuple) else (out,)
    pairs = [(o, g) for o, g in zip(outs, grads)
             if torch.is_tensor(o) and o.requires_grad and g is not None]
    if pairs:
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    ctx.run = ctx.args = None
    return (None, None, None, hidden.grad if ctx.hidden_requires_grad else None) + \
        (None,) * ctx.nargs


def _build_offloaded_checkpoint():
    torch = _torch()

    class OffloadedCheckpoint(torch.autograd.Function):
        """Checkpoint ``run(hidden, *args)``: run it without saving anything, send
        ``hidden`` to the host, and in backward bring it back, re-run ``run`` with autograd
        and backpropagate through it (gradients of parameters used by ``run`` are
        accumulated there, as reentrant checkpointing does).

        The device->host copy is queued on the current stream, so the caching allocator's
        stream order keeps ``hidden`` alive until it is done; the host->device copy in
        backward is likewise ordered before the recomputation that reads it.
        """

        @staticmethod
        def forward(ctx, run, pool, preserve_rng, hidden, *args):
            return _offload_forward(ctx, run, pool, preserve_rng, hidden, args)

        @staticmethod
        def backward(ctx, *grads):
            return _offload_backward(ctx, grads)

    return OffloadedCheckpoint


def offloaded_checkpoint(pool: PinnedPool, preserve_rng: bool = False) -> Callable:
    """A ``_gradient_checkpointing_func`` for transformers' decoder layers: called as
    ``f(run, hidden, *args)`` (keyword arguments are bound into ``run``). ``preserve_rng``
    replays dropout exactly in the recomputation (needed when LoRA dropout is on)."""
    torch = _torch()
    Fn = _cls("offload", _build_offloaded_checkpoint)

    def checkpoint(run, hidden, *args, **kwargs):
        if kwargs:
            from functools import partial

            run = partial(run, **kwargs)
        if torch.is_grad_enabled() and not hidden.requires_grad:
            # the block's output must require grad for backward to reach its LoRA weights
            hidden = hidden.detach().requires_grad_()
        return Fn.apply(run, pool, preserve_rng, hidden, *args)

    checkpoint.pool = pool
    return checkpoint


# ---------------------------------------------------------------------------
def _build_lean_rmsnorm():
    torch = _torch()

    class LeanRMSNorm(torch.autograd.Function):
        """``y = w * (x / rms(x))`` computed in float32 a slice of rows at a time, exactly
        as transformers' Llama-style RMSNorm (``offset=False``: ``w * n.to(x.dtype)``) or
        Gemma's (``offset=True``: ``(n * (1 + w.float())).to(x.dtype)``). Saves ``x`` and
        the per-row ``1/rms`` only; the weight is frozen (no gradient)."""

        @staticmethod
        def forward(ctx, x, weight, eps, offset):
            shape = x.shape
            x2 = x.reshape(-1, shape[-1])
            rows = x2.shape[0]
            rstd = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
            out_dtype = x.dtype if offset else torch.result_type(weight, x.new_empty(0))
            y = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
            k = norm_slice_rows(shape[-1])
            for i in range(0, rows, k):
                xf = x2[i:i + k].to(torch.float32)
                r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
                rstd[i:i + k] = r
                n = xf * r
                if offset:
                    y[i:i + k] = (n * (1.0 + weight.float())).to(x.dtype)
                else:
                    y[i:i + k] = weight * n.to(x.dtype)
            ctx.save_for_backward(x, weight, rstd)
            ctx.offset = offset
            return y.view(*shape[:-1], shape[-1])

        @staticmethod
        def backward(ctx, gy):
            x, weight, rstd = ctx.saved_tensors
            shape = x.shape
            x2 = x.reshape(-1, shape[-1])
            g2 = gy.reshape(-1, shape[-1])
            gx = torch.empty_like(x2)
            k = norm_slice_rows(shape[-1])
            for i in range(0, x2.shape[0], k):
                r = rstd[i:i + k]
                n = x2[i:i + k].to(torch.float32) * r
                if ctx.offset:
                    gn = g2[i:i + k].float() * (1.0 + weight.float())
                else:
                    # d/dn of w * n.to(dtype): the gradient reaches n in the rounded dtype
                    gn = (g2[i:i + k] * weight).to(x.dtype).float()
                dot = (gn * n).mean(-1, keepdim=True)
                gx[i:i + k] = ((gn - n * dot) * r).to(x.dtype)
            return gx.view(shape), None, None, None

    return LeanRMSNorm


def _cls(name: str, build: Callable):
    with _LOCK:
        if name not in _CLASSES:
            _CLASSES[name] = build()
        return _CLASSES[name]


def rms_norm_style(module) -> str | None:
    """``"llama"`` or ``"gemma"`` for the RMSNorm modules :func:`make_norms_lean` can
    replace, else None (LayerNorm, norms with biases, other formulas).

    Class names are only a first guess (Gemma3n's norm is named like Gemma's but has no
    ``1 +`` offset; Olmo2's multiplies before casting): a candidate counts only if the lean
    forward reproduces the module's own forward bit for bit on a probe input, in bfloat16
    and float32."""
    name = type(module).__name__
    weight = getattr(module, "weight", None)
    if not name.endswith("RMSNorm") or weight is None or getattr(module, "bias", None) is not None:
        return None
    guesses = (["gemma", "llama"] if "Gemma" in name else ["llama", "gemma"])
    for style in guesses:
        eps = getattr(module, "variance_epsilon" if style == "llama" else "eps", None)
        if eps is not None and _same_forward(module, eps, style == "gemma"):
            return style
    return None


def _same_forward(module, eps: float, offset: bool) -> bool:
    torch = _torch()
    Fn = _cls("norm", _build_lean_rmsnorm)
    w = module.weight
    gen = torch.Generator(device="cpu").manual_seed(0)
    probe = torch.randn(3, w.shape[-1], generator=gen) * 3
    try:
        with torch.no_grad():
            for dtype in (torch.bfloat16, torch.float32):
                x = probe.to(device=w.device, dtype=dtype)
                want = module.forward(x)
                got = Fn.forward(_Ctx(), x, w, eps, offset)
                if want.dtype != got.dtype or not torch.equal(want, got):
                    return False
    except Exception:  # a forward with other arguments or shapes: not ours to replace
        return False
    return True


def make_norms_lean(model) -> int:
    """Replace the forward of every recognised RMSNorm in ``model`` by :class:`LeanRMSNorm`
    (same results; less saved for backward). Returns how many were replaced."""
    torch = _torch()
    Fn = _cls("norm", _build_lean_rmsnorm)
    n = 0
    for module in model.modules():
        style = rms_norm_style(module)
        if style is None or getattr(module, "_qplan_lean", False):
            continue
        eps = module.variance_epsilon if style == "llama" else module.eps
        offset = style == "gemma"

        def forward(x, _m=module, _eps=eps, _offset=offset, _inner=module.forward):
            if _m.weight.requires_grad:  # a trained norm: transformers' own code
                return _inner(x)
            if not torch.is_grad_enabled():
                return Fn.forward(_Ctx(), x, _m.weight, _eps, _offset)
            return Fn.apply(x, _m.weight, _eps, _offset)

        module.forward = forward
        module._qplan_lean = True
        n += 1
    return n


class _Ctx:
    """A stand-in autograd context for running a Function's forward without autograd."""

    def save_for_backward(self, *a):
        pass


# ---------------------------------------------------------------------------
def _build_tiled_mlp():
    torch = _torch()

    class TiledMLP(torch.autograd.Function):
        """``mlp(x)`` over chunks of ``rows`` tokens (dimension 1). Saves ``x`` only; in
        backward each chunk is recomputed with autograd and backpropagated, its input
        gradient written into one preallocated tensor (parameter gradients accumulate as in
        reentrant checkpointing). LoRA dropout inside the MLP is replayed exactly: the RNG
        state before each chunk is restored for its recomputation (``preserve_rng``)."""

        @staticmethod
        def forward(ctx, x, mlp, rows, preserve_rng):
            ctx.mlp, ctx.rows = mlp, rows
            dev = x.device.type
            ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
            ctx.rng = [] if preserve_rng else None
            with torch.no_grad():
                outs = _chunked(mlp, x, rows, ctx.rng)
            ctx.save_for_backward(x)
            return outs

        @staticmethod
        def backward(ctx, gout):
            (x,) = ctx.saved_tensors
            gx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
            dev, on, dtype = ctx.autocast
            for k, i in enumerate(range(0, x.shape[1], ctx.rows)):
                part = x[:, i:i + ctx.rows].detach().requires_grad_(gx is not None)
                rng = _restored_rng(x.device, ctx.rng[k]) if ctx.rng is not None else contextlib.nullcontext()
                with rng, torch.enable_grad(), \
                        torch.autocast(dev, enabled=on, dtype=dtype):
                    o = ctx.mlp(part)
                if o.requires_grad:
                    torch.autograd.backward(o, gout[:, i:i + ctx.rows])
                if gx is not None:
                    gx[:, i:i + ctx.rows] = part.grad if part.grad is not None else 0
            ctx.mlp = None
            return gx, None, None, None

    return TiledMLP


def _chunked(mlp, x, rows, rng_states=None):
    """``mlp`` over chunks of ``rows`` tokens, written into one output tensor."""
    torch = _torch()
    outs = None
    for i in range(0, x.shape[1], rows):
        if rng_states is not None:
            rng_states.append(_rng_state(x.device))
        o = mlp(x[:, i:i + rows])
        if outs is None:
            outs = torch.empty(x.shape[0], x.shape[1], *o.shape[2:], dtype=o.dtype, device=o.device)
        outs[:, i:i + rows] = o
    return outs


def _rng_state(device):
    torch = _torch()
    cuda = device.type == "cuda"
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if cuda else None)


class _restored_rng:
    def __init__(self, device, state):
        self.device, self.state = device, state

    def __enter__(self):
        torch = _torch()
        self.saved = _rng_state(self.device)
        torch.set_rng_state(self.state[0])
        if self.state[1] is not None:
            torch.cuda.set_rng_state(self.state[1], self.device)

    def __exit__(self, *exc):
        torch = _torch()
        torch.set_rng_state(self.saved[0])
        if self.saved[1] is not None:
            torch.cuda.set_rng_state(self.saved[1], self.device)


def tiled(mlp_forward: Callable, rows: int, preserve_rng: bool = False) -> Callable:
    """``mlp_forward`` wrapped to run in chunks of ``rows`` tokens: through
    :class:`TiledMLP` when autograd records, in plain chunks otherwise (no-grad forward of
    a checkpointed block still never holds the whole sequence's MLP tensors)."""
    torch = _torch()
    Fn = _cls("mlp", _build_tiled_mlp)

    def forward(x):
        if x.dim() != 3 or x.shape[1] <= rows:
            return mlp_forward(x)
        if torch.is_grad_enabled():
            if not x.requires_grad:
                # the output must require grad for backward to reach the MLP's LoRA weights
                x = x.detach().requires_grad_()
            return Fn.apply(x, mlp_forward, rows, preserve_rng)
        return _chunked(mlp_forward, x, rows)

    return forward
