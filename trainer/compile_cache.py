"""Keep torch.compile's caches hitting from one launch to the next, so a second launch of a config skips most work.

A warm launch reuses Inductor's FX-graph cache (the generated kernels) only through AOTAutograd's cache, which also
skips re-tracing and partitioning the joint forward/backward graph (4.5 s of a 15.5 s warm start on an H200). That
cache refuses any graph holding a call to a Python function it does not know is pure ("Unsupported call_function
target", counted as `autograd_cache_bypass`). Our attention enters `torch.nn.attention.sdpa_kernel` on CUDA when it
drops out (model.layers.DROPOUT_SDPA_BACKENDS keeps cuDNN out), and dynamo records that context manager as calls to
the private `torch.nn.attention._sdpa_kernel` and `_backend_from_string`: every compiled training graph bypassed the
cache. Both calls are pure functions of their arguments, which are constants in the graph (the backends' names), so
the graph's cache key already tells one backend list from another: `cache_friendly()` marks them cacheable, keyed by
the torch version, for the scope of a run (measured on a CPU: bypass -> hit in the second process,
trainer/compile_cache_test.py).
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["CACHEABLE_FUNCTIONS", "cache_friendly"]

CACHEABLE_FUNCTIONS = ("torch.nn.attention._sdpa_kernel", "torch.nn.attention._backend_from_string")


def cache_friendly() -> contextlib.AbstractContextManager:
    """Within this scope, graphs that enter `sdpa_kernel` may be stored in and loaded from AOTAutograd's cache."""
    config = torch._inductor.config
    if not hasattr(config, "unsafe_marked_cacheable_functions"):  # an older torch: nothing to mark
        return contextlib.nullcontext()
    marked = dict(config.unsafe_marked_cacheable_functions)
    marked.update({name: torch.__version__ for name in CACHEABLE_FUNCTIONS})
    return config.patch(unsafe_marked_cacheable_functions=marked)
