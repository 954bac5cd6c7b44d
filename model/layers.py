"""The primitive ops of the transformer and the small modules around them.

Every hot op the model runs goes through a function here (`attention`, `decode_attention`, `rms_norm`,
`layer_norm`, `add_norm`, `swiglu`, `gelu`, `apply_rope`). Each call site that has one of our `kernels/` (Triton
flash attention, decode attention, fused norms, SwiGLU) runs it on CUDA tensors where `KERNEL_DEFAULTS` turns it on:
only where a committed measurement shows it beating the best PyTorch alternative at the shapes the project runs,
called the way the project calls it (issue 18; the figures are in kernels/README.md's default table). Elsewhere and on
CPU, plain PyTorch. `use_kernels(True / False)` forces every kernel on or off for a scope (tests, the kernels-on/off
benchmarks), `use_kernels(flash_attention=True)` one of them. Inside `torch.compile` the defaults do not apply
(Inductor fuses the plain ops itself): only a kernel a scope switches on explicitly runs there, and only those with a
custom op (`COMPILED_KERNELS`: flash attention and the fused residual + norm, `kernels.compile_ops`), recorded into the
compiled step's CUDA graphs like Inductor's own kernels. Nothing here touches a GPU at import time.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels import compile_ops
from kernels import decode_attention as decode_attention_kernel
from kernels import flash_attention as fa
from kernels import fused_add_norm, swiglu as swiglu_kernel

__all__ = [
    "KERNELS",
    "KERNEL_DEFAULTS",
    "COMPILED_KERNELS",
    "use_kernels",
    "kernel_enabled",
    "attention",
    "decode_attention",
    "split_cache_attention",
    "rms_norm",
    "layer_norm",
    "kernels_apply",
    "add_rms_norm",
    "add_layer_norm",
    "add_norm",
    "swiglu",
    "gelu",
    "rope_cos_sin",
    "apply_rope",
    "RMSNorm",
    "LayerNorm",
]


Where = Literal["on", "decode", "off"]

# Where each kernel runs when no `use_kernels` scope says otherwise. "on": every CUDA call; "decode": decode steps
# only, i.e. inputs (B, 1, C), one new token per row, as the serving engine's CUDA-graph decode step calls it (inside
# a graph the Triton launch path costs nothing; its warm-up call before capture has the same shape, so autotuning
# happens outside the capture); "off": only when switched on. The figure that decides each, and its results file,
# are in kernels/README.md ("What runs by default"): change a default only with a committed measurement.
KERNEL_DEFAULTS: dict[str, Where] = {
    # fwd+bwd 0.38x / 0.77x SDPA (B64 H6 T256 / B16 H12 T1024), fwd 0.92x / 0.91x (T4k / T16k), H200
    "flash_attention": "off",
    # in place over the slot cache, in the decode graph: 0.884 -> 0.264 ms per 256-row step (the gather it replaces
    # cost 314 us), H200 serve-probe; the only call site is forward_cached(attention_in_place=True)
    "decode_attention": "on",
    # in the decode graph: 13 calls in 24-28 us per step (H200 serve-probe); lone calls at training shapes lose,
    # 16384x384 0.20-0.56x, 65536x1024 0.93-1.21x (H200)
    "add_norm": "decode",
    # RMSNorm 16384x384 fwd 0.80x, fwd+bwd 0.23x; 65536x1024 0.96x / 0.78x (H100)
    "norm": "off",
    # 65536x2048 fwd 0.997x, fwd+bwd 0.994x torch.compile (H100); never timed at decode shapes
    "swiglu": "off",
}
KERNELS: tuple[str, ...] = tuple(KERNEL_DEFAULTS)

# None: each kernel's default; True / False: every kernel forced on / off (`use_kernels(enabled)`).
_KERNELS_ON: contextvars.ContextVar[bool | None] = contextvars.ContextVar("tinylm_kernels_on", default=None)
# Per-kernel switches over the above (`use_kernels(name=bool)`), as a tuple of (name, on) pairs.
_KERNEL_SWITCHES: contextvars.ContextVar[tuple[tuple[str, bool], ...]] = contextvars.ContextVar(
    "tinylm_kernel_switches", default=()
)

# The kernels that have a torch custom op (kernels.compile_ops), so that they run inside torch.compile's graph.
COMPILED_KERNELS: tuple[str, ...] = ("flash_attention", "add_norm")
COMPILED = "compiled"  # the `impl` of a call site under torch.compile that runs the kernel's custom op
# The kernels of COMPILED_KERNELS that the innermost `use_kernels` scope switches on explicitly (True, or name=True).
# Dynamo cannot read a ContextVar (it would break the graph), so the scope also sets this module global, which a
# compiled graph reads when it is traced and guards on: entering a scope that changes it recompiles, nothing stale
# runs. Unlike the ContextVars it is one value for the process, not per thread: a scope in one thread is seen by
# torch.compile in another (the kernels-on/off switch is a per-run setting: a trainer job, a benchmark, a test).
_COMPILED_ON: tuple[str, ...] = ()

# SDPA backends for attention with dropout: every one but cuDNN's. On torch 2.11 + CUDA 13 (H200, 2026-11-29), cuDNN's
# attention trains the model's (transposed-view) q, k, v wrongly with dropout: with it alone enabled, shakespeare-char
# stood at loss 2.79 after 300 steps where FlashAttention-2 and the memory-efficient kernel reached 2.05
# (tools/train_probe.py sdpa). PyTorch prefers cuDNN on Hopper once a torch.compile run has reordered the backends'
# priorities, which made an eager run after a compiled one in the same process diverge.
DROPOUT_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _check_kernel(name: str) -> None:
    if name not in KERNEL_DEFAULTS:
        raise ValueError(f"unknown kernel {name!r}: the kernels are {', '.join(KERNELS)}")


@contextlib.contextmanager
def use_kernels(enabled: bool | None = None, **kernels: bool) -> Iterator[None]:
    """Within this scope, run (or not) the `kernels/` versions of the ops on CUDA tensors.

    `enabled` True / False forces every kernel on / off (dropping the switches of enclosing scopes); None keeps the
    enclosing scope's choice (outside any scope: `KERNEL_DEFAULTS`). `name=True / False` (a name of `KERNELS`) turns
    one kernel on / off over that: `use_kernels(False, decode_attention=True)`, `use_kernels(flash_attention=True)`.
    A scope is a context variable: it covers this thread, not threads started inside it (the serving engine's own
    threads run the defaults).
    """
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"use_kernels(enabled) takes True, False or None, got {enabled!r}")
    for name, on in kernels.items():
        _check_kernel(name)
        if not isinstance(on, bool):
            raise TypeError(f"use_kernels({name}=...) takes True or False, got {on!r}")
    global _COMPILED_ON
    switches = () if enabled is not None else _KERNEL_SWITCHES.get()
    switches = tuple((n, on) for n, on in switches if n not in kernels) + tuple(kernels.items())
    token_on = _KERNELS_ON.set(_KERNELS_ON.get() if enabled is None else enabled)
    token_switches = _KERNEL_SWITCHES.set(switches)
    compiled_before = _COMPILED_ON
    _COMPILED_ON = tuple(name for name in COMPILED_KERNELS if _scope_choice(name) is True)
    try:
        yield
    finally:
        _COMPILED_ON = compiled_before
        _KERNEL_SWITCHES.reset(token_switches)
        _KERNELS_ON.reset(token_on)


def _scope_choice(name: str) -> bool | None:
    """What the current scope says of kernel `name`: its own switch, else every kernel's; None where no scope says."""
    for switched, on in _KERNEL_SWITCHES.get():
        if switched == name:
            return on
    return _KERNELS_ON.get()


def _is_decode_step(t: torch.Tensor) -> bool:
    """x (B, 1, C): one new token per row, the serving engine's decode step."""
    return t.dim() == 3 and t.shape[1] == 1


def kernel_enabled(name: str, t: torch.Tensor) -> bool:
    """Whether kernel `name` is switched on for input `t` (the scope's switches, else its default); the device and
    torch.compile aside (`_kernel_impl` adds those)."""
    _check_kernel(name)
    chosen = _scope_choice(name)
    if chosen is not None:
        return chosen
    where = KERNEL_DEFAULTS[name]
    return where == "on" or (where == "decode" and _is_decode_step(t))


def _compiled_op_device(t: torch.Tensor) -> bool:
    """Whether the custom ops serve `t`'s device under torch.compile: CUDA (the CPU tests patch this to run them
    through Triton's interpreter)."""
    return t.is_cuda


def _kernel_impl(t: torch.Tensor, kernel: str) -> str | None:
    """The `impl` to run `kernel` with for tensor `t`, or None for plain PyTorch.

    Eager: our kernels serve CUDA tensors where switched on (`kernel_enabled`). Under torch.compile: COMPILED (the
    kernel's custom op) where a `use_kernels` scope switched a kernel of COMPILED_KERNELS on, else Inductor's fusion.
    """
    if torch.compiler.is_compiling():  # first: dynamo folds it to a constant, so the ContextVars are never traced
        return COMPILED if kernel in _COMPILED_ON and _compiled_op_device(t) else None
    return "auto" if t.is_cuda and kernel_enabled(kernel, t) else None


def kernels_apply(t: torch.Tensor) -> bool:
    """Whether the fused residual + norm kernel serves the blocks' input `t` (B, T, C) here (CUDA, "add_norm"
    switched on; under torch.compile, by a scope): the model then takes the fused path (`add_norm`), otherwise its
    plain PyTorch code."""
    return _add_norm_impl(t) is not None


def _add_norm_impl(x: torch.Tensor) -> str | None:
    """`_kernel_impl` of the fused residual + norm for x (..., C); plain PyTorch under torch.compile for rows too wide
    for the kernel (eager calls fall back inside `kernels.fused_add_norm`)."""
    impl = _kernel_impl(x, "add_norm")
    return None if impl == COMPILED and x.shape[-1] > fused_add_norm.MAX_FUSED_COLS else impl


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Scaled dot-product attention with grouped K/V heads.

    q (B, H, T, D); k, v (B, Hkv, S, D) with H % Hkv == 0 (MHA: Hkv = H, GQA, MQA: Hkv = 1).
    `causal`: query t sees keys 0..t (requires S == T). `mask`: bool, broadcastable to (B, H, T, S),
    True = may attend. Returns (B, H, T, D).
    """
    n_head, n_kv_head = q.shape[1], k.shape[1]
    assert n_head % n_kv_head == 0, f"n_head={n_head} is not a multiple of n_kv_head={n_kv_head}"
    # our kernel draws its dropout mask in-kernel (Philox), so the training path (dropout > 0) takes it too
    T = q.shape[2]
    flash_ok = mask is None and k.shape[2] == T and q.shape[-1] in fa.SUPPORTED_HEAD_DIMS
    flash_ok = flash_ok and (dropout_p == 0.0 or T <= fa.MAX_DROPOUT_T)
    impl = _kernel_impl(q, "flash_attention")
    if impl and flash_ok:
        if torch.is_autocast_enabled(q.device.type):
            # autocast casts SDPA's inputs itself; our kernel takes one dtype (RoPE leaves q, k fp32 beside a bf16 v)
            q, k, v = (t.to(torch.get_autocast_dtype(q.device.type)) for t in (q, k, v))
        if q.dtype == k.dtype == v.dtype and q.dtype in fa.SUPPORTED_DTYPES:
            # GQA natively: no repeated K/V heads
            if impl == COMPILED or (dropout_p > 0.0 and q.is_cuda and torch.cuda.is_current_stream_capturing()):
                # the op draws its dropout seed on the device: fresh in every replay of a CUDA graph (torch.compile's,
                # or a captured eager step: trainer.step_graph), where the eager kernel's int seed would repeat
                return compile_ops.flash_attention(q, k, v, causal=causal, dropout_p=dropout_p)
            return fa.flash_attention(q, k, v, causal=causal, dropout_p=dropout_p, impl=impl)
    if n_kv_head != n_head:
        # Repeat each K/V head for its group of query heads (explicit, so every backend and
        # exporter sees a plain MHA graph).
        k = k.repeat_interleave(n_head // n_kv_head, dim=1)  # (B, H, S, D)
        v = v.repeat_interleave(n_head // n_kv_head, dim=1)  # (B, H, S, D)
    # Not cuDNN with dropout (see DROPOUT_SDPA_BACKENDS), nor with an explicit mask (the serving engine's prefill):
    # cuDNN builds a plan per new shape, and a server's prefill shapes keep changing. On the H200 (5aed646) the first
    # 256-prompt batch of new shapes waited 658 ms for its first tokens, the same batch again 33 ms.
    no_cudnn = q.is_cuda and (dropout_p > 0.0 or mask is not None)
    backends = sdpa_kernel(DROPOUT_SDPA_BACKENDS) if no_cudnn else contextlib.nullcontext()
    with backends:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor | None, lengths: torch.Tensor
) -> torch.Tensor:
    """One query per row over each row's slot of the KV cache, read in place: q (B, H, D), k_cache / v_cache
    (n_slots, Hkv, S, D), slots / lengths (B,) -> (B, H, D) (`kernels.decode_attention`; its PyTorch reference, a
    gather and a masked softmax, where the kernel is off)."""
    impl = _kernel_impl(q, "decode_attention") or "reference"
    return decode_attention_kernel.decode_attention(q, k_cache, v_cache, slots, lengths, impl=impl)


def split_cache_attention(
    q: torch.Tensor,
    k_past: torch.Tensor,
    v_past: torch.Tensor,
    past_lengths: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
) -> torch.Tensor:
    """Attention over a fixed-size cache buffer and the new tokens beside it, without concatenating the K/V.

    q (B, H, T, D); k_past / v_past (B, Hkv, S, D), row b's first past_lengths[b] positions valid; k_new / v_new
    (B, Hkv, T, D), causal among themselves. Only the scores (B, H, T, S + T) are joined for one softmax, so an
    exported graph reads the buffer in place (the ONNX fixed-KV decode graph). Plain PyTorch. Returns (B, H, T, D).
    """
    B, H, T, D = q.shape
    n_kv, S = k_past.shape[1], k_past.shape[2]
    assert H % n_kv == 0, f"n_head={H} is not a multiple of n_kv_head={n_kv}"
    qg = q.reshape(B, n_kv, (H // n_kv) * T, D) * D**-0.5  # a K/V head's query heads as rows: no repeated K/V
    scores = torch.cat((qg @ k_past.transpose(-1, -2), qg @ k_new.transpose(-1, -2)), dim=-1)  # (B, Hkv, G*T, S+T)
    past_ok = torch.arange(S, device=q.device)[None, :] < past_lengths[:, None]  # (B, S)
    new_ok = torch.ones(T, T, dtype=torch.bool, device=q.device).tril().repeat(H // n_kv, 1)  # (G*T, T)
    ok = torch.cat((past_ok[:, None, None, :].expand(B, 1, new_ok.shape[0], S), new_ok.expand(B, 1, -1, T)), -1)
    p = torch.softmax(scores.masked_fill(~ok, float("-inf")), dim=-1)
    y = p[..., :S] @ v_past + p[..., S:] @ v_new  # (B, Hkv, G*T, D)
    return y.reshape(B, H, T, D)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight over the last dimension. x (..., C), weight (C,)."""
    impl = _kernel_impl(x, "norm")
    if impl:
        return fused_add_norm.rms_norm(x, weight, eps, impl=impl)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """(x - mean) / std * weight + bias over the last dimension. x (..., C), weight/bias (C,)."""
    impl = _kernel_impl(x, "norm")
    if impl:
        return fused_add_norm.layer_norm(x, weight, bias, eps, impl=impl)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """new_residual = residual + x; returns (rms_norm(new_residual) * weight, new_residual). x, residual (..., C).

    One fused kernel where ours apply (the normed rows in x's dtype, the new residual in residual's); else the add
    and `F.rms_norm`, as the unfused model computes them."""
    impl = _add_norm_impl(x)
    if impl == COMPILED:
        return compile_ops.add_rms_norm(x, residual, weight, eps)
    if impl:
        return fused_add_norm.add_rms_norm(x, residual, weight, eps, impl=impl)
    s = residual + x
    return F.rms_norm(s, (s.shape[-1],), weight, eps), s


def add_layer_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """new_residual = residual + x; returns (layer_norm(new_residual) * weight + bias, new_residual)."""
    impl = _add_norm_impl(x)
    if impl == COMPILED:
        return compile_ops.add_layer_norm(x, residual, weight, bias, eps)
    if impl:
        return fused_add_norm.add_layer_norm(x, residual, weight, bias, eps, impl=impl)
    s = residual + x
    return F.layer_norm(s, (s.shape[-1],), weight, bias, eps), s


def add_norm(norm: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(residual + x), residual + x) for an `RMSNorm` or `LayerNorm` module `norm`, in one kernel where ours
    apply: the residual add of a pre-norm block fused with the norm that follows it."""
    if isinstance(norm, RMSNorm):
        return add_rms_norm(x, residual, norm.weight, norm.eps)
    if isinstance(norm, LayerNorm):
        return add_layer_norm(x, residual, norm.weight, norm.bias, norm.eps)
    raise TypeError(f"add_norm takes an RMSNorm or LayerNorm module, got {type(norm).__name__}")


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up, the gated unit of a SwiGLU MLP. gate, up (..., hidden)."""
    impl = _kernel_impl(gate, "swiglu")
    if impl:
        return swiglu_kernel.swiglu(gate, up, impl=impl)
    return F.silu(gate) * up


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU, as in nanoGPT/GPT-2 training."""
    return F.gelu(x)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables for integer `positions` (...,): returns cos, sin of shape (..., head_dim).

    Computed in float32 on the fly (cheap next to attention, exact at any dtype of the model, and free
    of buffers that `model.to(bfloat16)` would round). Uses the "rotate half" layout (GPT-NeoX / HF Llama):
    dimension i pairs with i + head_dim/2.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (..., head_dim/2)
    angles = torch.cat((angles, angles), dim=-1)  # (..., head_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by position; cos/sin broadcastable to it, e.g. (1 or B, 1, T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class RMSNorm(nn.Module):
    """RMSNorm with a learned scale (no bias, as in Llama)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1; nanoGPT does the same)."""

    def __init__(self, dim: int, eps: float, bias: bool) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps)
