"""Fused residual add + RMSNorm / LayerNorm in Triton, forward and backward (Triton tutorial 05 style).

A pre-norm block computes `residual = x + residual; h = norm(residual)`: two passes over memory in eager PyTorch.
Here one kernel reads x and the residual once and writes the new residual and the normed rows; the backward reads
dy (and the new residual's own gradient) and the saved residual once, writes the one gradient that x and the old
residual share, and leaves per-program partial sums of dweight/dbias that one small kernel (_sum_partials) finishes
in the parameters' dtype: two launches per backward.

Rows are short in this project (384 columns for shakespeare-char), so a program takes a 2D tile of BLOCK_ROWS rows
by BLOCK_C columns. The forward takes one tile per program (rows per program and num_warps autotuned per row width).
The backward is bandwidth-bound on three reads and one write per element: each program streams a run of rows (a
multiple of BWD_ROW_QUANTUM) with two tiles' loads in flight ahead of its arithmetic, and its config (tile, warps,
programs per SM, which sets the number of partials) is tuned with the partial sum included, timed in a CUDA graph as
the compiled trainer runs it. Rows must be contiguous (a non-contiguous input is copied once).

Dtypes: the new residual has residual's dtype (an fp32 residual stream works), the normed output has x's dtype;
all arithmetic is fp32. Rows are the last dim: x (..., C).
"""

from __future__ import annotations

import logging
import math

import torch
import triton
import triton.language as tl

from kernels import tune_cache
from kernels.dispatch import Impl, num_sms, use_triton

__all__ = ["AddNormFunction", "add_layer_norm", "add_rms_norm", "layer_norm", "reference", "rms_norm"]

log = logging.getLogger(__name__)

MAX_FUSED_COLS = 4096  # a row lives in registers; wider rows spill on sm_90 (backward), so they take the reference
MIN_TILE_ELEMS = 1024  # elements of one program's tile: below, too little work per program
# Largest tile and fp32 values per thread that compile without register spills on sm_90 (ptxas, C 384 and 1024),
# forward and backward (which holds dy, s and the gradient at once).
FWD_MAX_TILE, FWD_MAX_PER_THREAD = 8192, 32
BWD_MAX_TILE, BWD_MAX_PER_THREAD = 4096, 16
MIN_ELEMS_PER_THREAD = 8  # fewer leaves threads idle on loads (one 16-byte vector of bf16 is 8)
BWD_ROW_QUANTUM = 16  # the backward's rows per program are a multiple of this, the largest backward BLOCK_ROWS
# Backward programs per SM the tuner tries (16384 rows: 256, 512 or 1024 programs): more keep more tiles in flight
# where registers let more programs share an SM (sm_90: 1-2 programs of 8 warps, ~8 of 2 warps), fewer leave fewer
# dweight partials to sum.
BWD_PROGRAMS_PER_SM, DEFAULT_PROGRAMS_PER_SM = (2, 4, 8), 2
INTERPRET_BLOCK_ROWS = 4  # the CPU interpreter's fixed tile height (no autotuning there): row masks get exercised
# _sum_partials: partial rows and columns per step. A 128-byte line per partial row; at 16384 x 384 the default
# 256 partials are one step. The interpreter takes small blocks so that its loops and masks get exercised.
SUM_BLOCK_P, SUM_BLOCK_COLS, SUM_NUM_WARPS = 256, 32, 8
INTERPRET_SUM_BLOCK_P, INTERPRET_SUM_BLOCK_COLS = 4, 16
AUTOTUNE_WARMUP_MS, AUTOTUNE_REP_MS = 5, 25
BWD_TUNE_REP_MS = 10  # per backward candidate: one CUDA graph of that many ms of calls, replayed 10 times
# False: each width runs default_config() untuned (GPU tests set it, so that their many shapes and dtypes do not each
# compile the whole tuning set)
AUTOTUNE = True
DEFAULT_TILE, DEFAULT_PER_THREAD = 4096, 16  # default_config: the tile and load per thread nearest these


def _configs(max_rows: int, warps: tuple[int, ...]) -> list[triton.Config]:
    rows = [r for r in (1, 2, 4, 8, 16, 32, 64) if r <= max_rows]
    return [triton.Config({"BLOCK_ROWS": r}, num_warps=w) for r in rows for w in warps]


FWD_CONFIGS = _configs(64, (2, 4, 8))  # ~9 per row width after pruning: compiling them is the tuning time
# tiles (16 warps cap a thread at 128 registers: spills) x programs per SM (the grid only: no extra compile)
BWD_CONFIGS = [
    triton.Config({**c.kwargs, "PROGRAMS_PER_SM": p}, num_warps=c.num_warps)
    for c in _configs(BWD_ROW_QUANTUM, (2, 4, 8))
    for p in BWD_PROGRAMS_PER_SM
]


def _fits(config: triton.Config, block_c: int, max_tile: int, max_per_thread: int) -> bool:
    """Whether a config's tile suits rows of block_c (padded) columns: enough work, no spills, no idle threads."""
    rows = config.kwargs["BLOCK_ROWS"]
    tile = rows * block_c
    per_thread = tile // (config.num_warps * 32)
    if rows == 1:  # a wide row: one row per program, as many warps as keep every thread busy
        return MIN_ELEMS_PER_THREAD <= per_thread <= max(max_per_thread, block_c // (16 * 32))
    return MIN_TILE_ELEMS <= tile <= max_tile and MIN_ELEMS_PER_THREAD <= per_thread <= max_per_thread


def configs_for(configs: list[triton.Config], block_c: int) -> list[triton.Config]:
    """The configs the autotuner tries for rows of block_c padded columns (never empty)."""
    limits = (BWD_MAX_TILE, BWD_MAX_PER_THREAD) if configs is BWD_CONFIGS else (FWD_MAX_TILE, FWD_MAX_PER_THREAD)
    kept = [c for c in configs if _fits(c, block_c, *limits)]
    if kept:
        return kept
    # narrow rows (a tile under MIN_TILE_ELEMS even at the most rows): the biggest tile that keeps threads busy
    tile = lambda c: c.kwargs["BLOCK_ROWS"] * block_c
    busy = [c for c in configs if tile(c) // (c.num_warps * 32) >= MIN_ELEMS_PER_THREAD] or configs
    return [max(busy, key=lambda c: (tile(c), -c.num_warps))]


def default_config(configs: list[triton.Config], block_c: int) -> triton.Config:
    """The config taken without tuning: of configs_for's, the tile nearest DEFAULT_TILE elements and
    DEFAULT_PER_THREAD per thread."""

    def distance(c: triton.Config) -> tuple[float, float, bool]:
        tile = c.kwargs["BLOCK_ROWS"] * block_c
        programs = c.kwargs.get("PROGRAMS_PER_SM", DEFAULT_PROGRAMS_PER_SM)
        per_thread = tile / (32 * c.num_warps)
        return (
            abs(math.log2(tile / DEFAULT_TILE)),
            abs(math.log2(per_thread / DEFAULT_PER_THREAD)),
            programs != DEFAULT_PROGRAMS_PER_SM,
        )

    return min(configs_for(configs, block_c), key=distance)


def _prune_fwd(configs, named_args, **kwargs):
    return configs_for(FWD_CONFIGS, kwargs["BLOCK_C"])


def _autotune_bench(kernel_call, quantiles):
    """Short timing windows (Triton's default is 25/100 ms): the configs differ by far more than the noise."""
    return triton.testing.do_bench(kernel_call, warmup=AUTOTUNE_WARMUP_MS, rep=AUTOTUNE_REP_MS, quantiles=quantiles)


def _autotune(configs: list[triton.Config], key: list[str], prune):
    return triton.autotune(
        configs=configs, key=key, prune_configs_by={"early_config_prune": prune}, do_bench=_autotune_bench
    )


@triton.jit
def _add_norm_fwd(
    X,
    RES,
    W,
    B,
    Y,
    RES_OUT,
    MEAN,
    RSTD,
    n_rows,
    n_cols,
    eps,
    IS_RMS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One program: BLOCK_ROWS contiguous rows. s = x + residual (stored), y = norm(s) * w (+ b); keeps mean, 1/std."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    s = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(RES + offs, mask=mask, other=0.0).to(tl.float32)
        s_out = (s + r).to(RES_OUT.dtype.element_ty)  # rounded as an eager add would round it
        tl.store(RES_OUT + offs, s_out, mask=mask)
        s = s_out.to(tl.float32)
    if IS_RMS:
        rstd = 1.0 / tl.sqrt(tl.sum(s * s, 1) / n_cols + eps)
        xhat = s * rstd[:, None]
    else:
        mean = tl.sum(s, 1) / n_cols
        centred = tl.where(mask, s - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 1) / n_cols + eps)
        xhat = centred * rstd[:, None]
        tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)
    y = xhat * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _load_bwd_tile(DY, DRES_OUT, S, MEAN, RSTD, start, row_end, n_cols, cols, col_ok, IS_RMS, HAS_DRES, BLOCK_ROWS):
    """One backward tile's inputs, as stored (no conversion yet): rows at or past row_end load nothing."""
    rows = start + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < row_end
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    s = tl.load(S + offs, mask=mask, other=0.0)
    dy = tl.load(DY + offs, mask=mask, other=0.0)
    dres = 0.0  # a placeholder of one type in every iteration
    if HAS_DRES:
        dres = tl.load(DRES_OUT + offs, mask=mask, other=0.0)
    rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
    mean = 0.0
    if not IS_RMS:
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
    return s, dy, dres, mean, rstd


@triton.jit
def _add_norm_bwd(
    DY,
    DRES_OUT,
    S,
    W,
    MEAN,
    RSTD,
    DS,
    DX,
    PARTIAL,
    n_rows,
    n_cols,
    rows_per_program,
    IS_RMS: tl.constexpr,
    HAS_DRES: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DX: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Program p: rows [p * rows_per_program, +rows_per_program), BLOCK_ROWS at a time, the loads of the tile after
    next issued before this tile's arithmetic (so a program always has two tiles in flight). ds = d(norm input)
    (+ the new residual's own gradient), also written as DX in x's dtype when that differs; PARTIAL[p] holds this
    program's dweight (and dbias) sums, (n_programs, 1 or 2, n_cols) fp32, for _sum_partials."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < n_cols
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    # (rows, cols) accumulators, summed over rows once at the end: no cross-warp reduction per tile
    dw = tl.zeros([BLOCK_ROWS, BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_ROWS, BLOCK_C], dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    # two tiles in flight ahead of the arithmetic: loads cost registers only for the raw values, so a second tile in
    # flight is cheaper than a taller tile (whose fp32 temporaries grow too)
    s, dy, dres, mean, rstd = _load_bwd_tile(
        DY, DRES_OUT, S, MEAN, RSTD, row_start, row_end, n_cols, cols, col_ok, IS_RMS, HAS_DRES, BLOCK_ROWS
    )
    s1, dy1, dres1, mean1, rstd1 = _load_bwd_tile(
        DY, DRES_OUT, S, MEAN, RSTD, row_start + BLOCK_ROWS, row_end, n_cols, cols, col_ok, IS_RMS, HAS_DRES, BLOCK_ROWS
    )
    for start in range(row_start, row_end, BLOCK_ROWS):
        s2, dy2, dres2, mean2, rstd2 = _load_bwd_tile(
            DY,
            DRES_OUT,
            S,
            MEAN,
            RSTD,
            start + 2 * BLOCK_ROWS,
            row_end,
            n_cols,
            cols,
            col_ok,
            IS_RMS,
            HAS_DRES,
            BLOCK_ROWS,
        )
        rows = start + tl.arange(0, BLOCK_ROWS)
        mask = (rows < row_end)[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
        s32, dy32 = s.to(tl.float32), dy.to(tl.float32)
        if IS_RMS:
            xhat = s32 * rstd[:, None]
        else:
            xhat = tl.where(mask, (s32 - mean[:, None]) * rstd[:, None], 0.0)
        wdy = w[None, :] * dy32
        c1 = tl.sum(xhat * wdy, 1) / n_cols
        if IS_RMS:
            ds = (wdy - xhat * c1[:, None]) * rstd[:, None]
        else:
            c2 = tl.sum(wdy, 1) / n_cols
            ds = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DRES:  # the new residual also flows on to the next block
            ds += dres.to(tl.float32)
        tl.store(DS + offs, ds.to(DS.dtype.element_ty), mask=mask)
        if HAS_DX:
            tl.store(DX + offs, ds.to(DX.dtype.element_ty), mask=mask)
        dw += dy32 * xhat
        if HAS_BIAS:
            db += dy32
        s, dy, dres, mean, rstd = s1, dy1, dres1, mean1, rstd1
        s1, dy1, dres1, mean1, rstd1 = s2, dy2, dres2, mean2, rstd2
    n_sums: tl.constexpr = 2 if HAS_BIAS else 1
    tl.store(PARTIAL + pid * n_sums * n_cols + cols, tl.sum(dw, 0), mask=col_ok)
    if HAS_BIAS:
        tl.store(PARTIAL + pid * n_sums * n_cols + n_cols + cols, tl.sum(db, 0), mask=col_ok)


@triton.jit
def _sum_partials(
    PARTIAL, DW, DB, n_partials, n_cols, HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_COLS: tl.constexpr
):
    """Program (c, k): column block c of sum k (0: dweight into DW, 1: dbias into DB) over the n_partials rows of
    PARTIAL (n_partials, 1 or 2, n_cols) fp32, written in the parameter's dtype (no separate cast)."""
    n_sums: tl.constexpr = 2 if HAS_BIAS else 1
    which = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_ok = cols < n_cols
    acc = tl.zeros([BLOCK_P, BLOCK_COLS], dtype=tl.float32)
    for start in range(0, n_partials, BLOCK_P):
        parts = start + tl.arange(0, BLOCK_P)
        offs = parts.to(tl.int64)[:, None] * (n_sums * n_cols) + which * n_cols + cols[None, :]
        acc += tl.load(PARTIAL + offs, mask=(parts < n_partials)[:, None] & col_ok[None, :], other=0.0)
    total = tl.sum(acc, 0)
    if which == 0:
        tl.store(DW + cols, total.to(DW.dtype.element_ty), mask=col_ok)
    if HAS_BIAS:
        if which == 1:
            tl.store(DB + cols, total.to(DB.dtype.element_ty), mask=col_ok)


_FLAGS = ["n_cols", "IS_RMS", "HAS_BIAS"]
_add_norm_fwd_tuned = _autotune(FWD_CONFIGS, _FLAGS + ["HAS_RESIDUAL"], _prune_fwd)(_add_norm_fwd)


# (kernel, n_cols, constexpr flags, dtypes) -> the config the tuner chose: later calls launch the plain kernel with
# it, skipping the autotuner's own per-call host work (at 16384 x 384 a call's host time is as long as its GPU time)
_TUNED: dict[tuple, triton.Config] = {}


def _key(kernel, n_cols: int, args: tuple, meta: dict) -> tuple:
    return (kernel, n_cols, *meta.items(), *(getattr(a, "dtype", None) for a in args))


def _recall(key: tuple, candidates: list[triton.Config]) -> triton.Config | None:
    """A pick an earlier process made for this key on this GPU (kernels.tune_cache), remembered in _TUNED too."""
    if not tune_cache.enabled():
        return None
    config = tune_cache.recall(_kernel_name(key), key[1:], torch.cuda.get_device_name(), candidates)
    if config is not None:
        _TUNED[key] = config
    return config


def _remember(key: tuple, config: triton.Config) -> None:
    _TUNED[key] = config
    if tune_cache.enabled():
        tune_cache.remember(_kernel_name(key), key[1:], torch.cuda.get_device_name(), config)


def _kernel_name(key: tuple) -> str:
    return getattr(key[0], "__name__", str(key[0]))


def _launch_forward(n_rows: int, n_cols: int, *args, **meta) -> None:
    """Autotuned on a GPU (or default_config when AUTOTUNE is off); the interpreter's fixed tile on CPU. Grid: one
    program per row tile."""
    if not args[0].is_cuda:
        _add_norm_fwd[(triton.cdiv(n_rows, INTERPRET_BLOCK_ROWS),)](*args, **meta, BLOCK_ROWS=INTERPRET_BLOCK_ROWS)
        return
    grid = lambda m: (triton.cdiv(n_rows, m["BLOCK_ROWS"]),)
    key = _key(_add_norm_fwd, n_cols, args, meta)
    config = _TUNED.get(key) if AUTOTUNE else default_config(FWD_CONFIGS, meta["BLOCK_C"])
    if config is None:
        config = _recall(key, configs_for(FWD_CONFIGS, meta["BLOCK_C"]))
    if config is None:
        _add_norm_fwd_tuned[grid](*args, **meta)
        _remember(key, _add_norm_fwd_tuned.best_config)
        log.info("add_norm forward %s: %s", key[1:], _TUNED[key])
    else:
        _add_norm_fwd[grid(config.kwargs)](*args, **meta, **config.all_kwargs())


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., C) -> contiguous (N, C) (a view where possible)."""
    return t.reshape(-1, t.shape[-1]).contiguous()


def _forward(x, residual, weight, bias, eps: float, is_rms: bool):
    """(y, new_residual or None, mean or None, rstd) over contiguous rows of x (N, C)."""
    n_rows, n_cols = x.shape
    y = torch.empty_like(x)
    res_out = torch.empty_like(residual) if residual is not None else None
    mean = None if is_rms else torch.empty(n_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    _launch_forward(
        n_rows,
        n_cols,
        x,
        residual,
        weight,
        bias,
        y,
        res_out,
        mean,
        rstd,
        n_rows,
        n_cols,
        eps,
        IS_RMS=is_rms,
        HAS_RESIDUAL=residual is not None,
        HAS_BIAS=bias is not None,
        BLOCK_C=triton.next_power_of_2(n_cols),
    )
    return y, res_out, mean, rstd


def _bwd_rows_per_program(n_rows: int, device: torch.device, programs_per_sm: int = DEFAULT_PROGRAMS_PER_SM) -> int:
    """Rows per backward program: a multiple of BWD_ROW_QUANTUM, about programs_per_sm programs per SM."""
    programs = max(1, min(triton.cdiv(n_rows, BWD_ROW_QUANTUM), num_sms(device) * programs_per_sm))
    return triton.cdiv(triton.cdiv(n_rows, programs), BWD_ROW_QUANTUM) * BWD_ROW_QUANTUM


def _launch_backward(config: triton.Config | None, partial: torch.Tensor, dw, db, tensors: tuple, meta: dict) -> None:
    """The backward kernel over tensors (dy, dres_out, s, weight, mean, rstd, ds, dx) with one config (None: the
    interpreter's fixed tile), then _sum_partials over its partials (the first rows of `partial`, which may be
    larger) into dw and db."""
    dy, s = tensors[0], tensors[2]
    n_rows, n_cols = s.shape
    programs_per_sm = DEFAULT_PROGRAMS_PER_SM if config is None else config.kwargs["PROGRAMS_PER_SM"]
    rows_per_program = _bwd_rows_per_program(n_rows, dy.device, programs_per_sm)
    n_partials = triton.cdiv(n_rows, rows_per_program)
    assert partial.shape[0] >= n_partials, (partial.shape, n_partials)
    if config is None:
        tile, launch = dict(BLOCK_ROWS=INTERPRET_BLOCK_ROWS), {}
        block_p, block_cols = INTERPRET_SUM_BLOCK_P, INTERPRET_SUM_BLOCK_COLS
    else:
        tile, launch = dict(BLOCK_ROWS=config.kwargs["BLOCK_ROWS"]), dict(num_warps=config.num_warps)
        block_p, block_cols = SUM_BLOCK_P, SUM_BLOCK_COLS
    _add_norm_bwd[(n_partials,)](*tensors, partial, n_rows, n_cols, rows_per_program, **meta, **tile, **launch)
    sums = partial.shape[1]
    _sum_partials[(triton.cdiv(n_cols, block_cols), sums)](
        partial,
        dw,
        db,
        n_partials,
        n_cols,
        HAS_BIAS=sums == 2,
        BLOCK_P=block_p,
        BLOCK_COLS=block_cols,
        **({} if config is None else dict(num_warps=SUM_NUM_WARPS)),
    )


def _graph_ms(fn) -> float:
    """Device milliseconds per call of fn, replayed in a CUDA graph as the compiled trainer runs it (no host launch
    cost, which at 16384 x 384 is as long as the kernels)."""
    return triton.testing.do_bench_cudagraph(fn, rep=BWD_TUNE_REP_MS, return_mode="median")


def _backward_config(key: tuple, block_c: int, run, scratch) -> triton.Config:
    """The backward's config for this key: default_config untuned; else, on the first call, the fastest of
    configs_for's by run(config, partial) (kernel and partial sum together, timed in a CUDA graph; partial =
    scratch(), room for any candidate's partials), remembered in _TUNED. A first call inside a CUDA-graph capture
    (which cannot time anything) takes default_config without remembering it."""
    config = _TUNED.get(key) if AUTOTUNE else default_config(BWD_CONFIGS, block_c)
    if config is None:
        config = _recall(key, configs_for(BWD_CONFIGS, block_c))
    if config is None and torch.cuda.is_current_stream_capturing():
        return default_config(BWD_CONFIGS, block_c)
    if config is None:
        torch.cuda.synchronize()  # the tuner's graphs run on their own stream: the inputs must be ready
        partial = scratch()
        timed = [(_graph_ms(lambda: run(c, partial)), i, c) for i, c in enumerate(configs_for(BWD_CONFIGS, block_c))]
        best_ms, _, config = min(timed)
        _remember(key, config)
        worst_ms = max(t[0] for t in timed)
        log.info(
            "add_norm backward %s: %s, %.4f ms per call in a CUDA graph (slowest of %d tried: %.4f ms)",
            key[1:],
            config,
            best_ms,
            len(timed),
            worst_ms,
        )
    return config


def _backward(dy, dres_out, s, weight, bias, mean, rstd, grad_dtype: torch.dtype, x_dtype: torch.dtype):
    """(ds, dx, dweight, dbias or None): ds is the gradient of the norm's input (x + residual) in grad_dtype, dx the
    same in x_dtype (ds itself when the dtypes agree)."""
    n_rows, n_cols = s.shape
    dy = _rows(dy)
    dres_out = _rows(dres_out) if dres_out is not None else None
    ds = torch.empty((n_rows, n_cols), dtype=grad_dtype, device=s.device)
    dx = ds if x_dtype == grad_dtype else torch.empty((n_rows, n_cols), dtype=x_dtype, device=s.device)
    dw = torch.empty_like(weight)
    db = torch.empty_like(bias) if bias is not None else None
    tensors = (dy, dres_out, s, weight, mean, rstd, ds, dx)
    meta = dict(
        IS_RMS=mean is None,
        HAS_DRES=dres_out is not None,
        HAS_BIAS=bias is not None,
        HAS_DX=dx is not ds,
        BLOCK_C=triton.next_power_of_2(n_cols),
    )
    n_sums = 2 if bias is not None else 1

    def partials(programs_per_sm: int) -> torch.Tensor:
        n_partials = triton.cdiv(n_rows, _bwd_rows_per_program(n_rows, s.device, programs_per_sm))
        return torch.empty((n_partials, n_sums, n_cols), dtype=torch.float32, device=s.device)

    if not s.is_cuda:
        config = None
    else:
        config = _backward_config(
            _key(_add_norm_bwd, n_cols, (*tensors, bias), meta),
            meta["BLOCK_C"],
            lambda c, partial: _launch_backward(c, partial, dw, db, tensors, meta),
            lambda: partials(max(BWD_PROGRAMS_PER_SM)),
        )
    programs_per_sm = DEFAULT_PROGRAMS_PER_SM if config is None else config.kwargs["PROGRAMS_PER_SM"]
    partial = partials(programs_per_sm)
    _launch_backward(config, partial, dw, db, tensors, meta)
    return ds, dx, dw, (db if bias is not None else None)


class AddNormFunction(torch.autograd.Function):
    """Autograd for the fused kernels. With a residual it returns (normed, new_residual), else normed."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps: float, is_rms: bool):
        shape = x.shape
        x2, res2 = _rows(x), (_rows(residual) if residual is not None else None)
        y, res_out, mean, rstd = _forward(x2, res2, weight, bias, eps, is_rms)
        ctx.save_for_backward(res_out if res_out is not None else x2, weight, bias, mean, rstd)
        ctx.set_materialize_grads(False)  # an unused new residual (the last block's) gives None, not a zero tensor
        ctx.shape, ctx.x_dtype = shape, x.dtype
        ctx.res_dtype = residual.dtype if residual is not None else None
        if res_out is None:
            return y.view(shape)
        return y.view(shape), res_out.view(shape)

    @staticmethod
    def backward(ctx, dy, dres_out=None):
        s, weight, bias, mean, rstd = ctx.saved_tensors
        if dy is None:  # only the new residual was used
            dy = torch.zeros(ctx.shape, dtype=ctx.x_dtype, device=s.device)
        # one gradient for x and the old residual, made in the residual's dtype (an fp32 stream stays fp32)
        grad_dtype = ctx.res_dtype if ctx.res_dtype is not None else ctx.x_dtype
        ds, dx, dw, db = _backward(dy, dres_out, s, weight, bias, mean, rstd, grad_dtype, ctx.x_dtype)
        dres = ds.view(ctx.shape) if ctx.res_dtype is not None else None
        return dx.view(ctx.shape), dres, dw, db, None, None


def reference(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    is_rms: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(norm(x + residual) * weight + bias in x's dtype, x + residual in residual's dtype); fp32 arithmetic."""
    s = x if residual is None else (x.float() + residual.float()).to(residual.dtype)
    h = s.float()
    if not is_rms:
        h = h - h.mean(-1, keepdim=True)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    h = h * weight.float()
    if bias is not None:
        h = h + bias.float()
    return h.to(x.dtype), (s if residual is not None else None)


def _check(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    C = x.shape[-1]
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    if weight.shape != (C,):
        raise ValueError(f"weight must be ({C},), got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (C,):
        raise ValueError(f"bias must be ({C},), got {tuple(bias.shape)}")


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _norm(x, residual, weight, bias, eps: float, is_rms: bool, impl: Impl):
    _check(x, residual, weight, bias)
    tensors = [t for t in (x, residual, weight, bias) if t is not None]
    if not use_triton(impl, *tensors, supported=x.shape[-1] <= MAX_FUSED_COLS and x.numel() > 0):
        normed, new_residual = reference(x, residual, weight, bias, eps, is_rms)
        return normed if residual is None else (normed, new_residual)
    if _needs_grad(x, residual, weight, bias):
        return AddNormFunction.apply(x, residual, weight, bias, eps, is_rms)
    # inference: no autograd node (its set-up costs more host time than the kernel takes at small shapes)
    y, res_out, _, _ = _forward(_rows(x), _rows(residual) if residual is not None else None, weight, bias, eps, is_rms)
    return y.view(x.shape) if res_out is None else (y.view(x.shape), res_out.view(x.shape))


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, impl: Impl = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """new_residual = x + residual; returns (rms_norm(new_residual) * weight, new_residual). x, residual (..., C)."""
    return _norm(x, residual, weight, None, eps, True, impl)


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    impl: Impl = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """new_residual = x + residual; returns (layer_norm(new_residual) * weight + bias, new_residual)."""
    return _norm(x, residual, weight, bias, eps, False, impl)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, impl: Impl = "auto") -> torch.Tensor:
    """rms_norm(x) * weight over the last dim of x (..., C)."""
    return _norm(x, None, weight, None, eps, True, impl)


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, eps: float = 1e-5, *, impl: Impl = "auto"
) -> torch.Tensor:
    """layer_norm(x) * weight + bias over the last dim of x (..., C)."""
    return _norm(x, None, weight, bias, eps, False, impl)
