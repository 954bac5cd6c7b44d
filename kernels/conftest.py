"""pytest set-up for kernels/: Triton runs through its CPU interpreter where there is no GPU.

TRITON_INTERPRET must be set before triton is first imported (triton.jit reads it when a kernel is defined), so
this runs at conftest import, before any test module imports a kernel. On a GPU machine nothing is changed.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The kernels' tests never read or write the machine's tuning cache (kernels/tune_cache.py): a test's stand-in picks
# must not reach a real run, nor a real run's picks decide what a tuner test sees. tune_cache_test turns it on in a
# folder of its own.
os.environ["TINYLM_TUNE_CACHE"] = "0"

# Tolerances for a fast kernel against the fp32 PyTorch reference, by the dtype of the inputs. fp32 on a GPU runs
# tl.dot in TF32 (10-bit mantissa), hence its looser GPU bound; the CPU interpreter computes in true fp32.
# Triton 3.7's interpreter gets tl.dot on bf16 wrong (CPU tests of dot kernels use fp32 and fp16) and truncates
# fp32 -> bf16 casts where a GPU rounds to nearest (bf16 CPU results differ from eager by up to one ulp).
_TOLERANCES = {
    (torch.float32, "cpu"): dict(atol=1e-4, rtol=1e-4),
    (torch.float16, "cpu"): dict(atol=5e-3, rtol=5e-3),
    (torch.bfloat16, "cpu"): dict(atol=3e-2, rtol=3e-2),
    (torch.float32, "cuda"): dict(atol=2e-2, rtol=2e-2),
    (torch.float16, "cuda"): dict(atol=1e-2, rtol=1e-2),
    (torch.bfloat16, "cuda"): dict(atol=3e-2, rtol=3e-2),
}


@pytest.fixture
def device() -> str:
    """'cuda' where there is a GPU, else 'cpu' (Triton kernels then run in the interpreter)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def assert_close():
    """assert_close(actual, expected): compares in fp32 with the tolerance of actual's dtype and device."""

    def check(actual: torch.Tensor, expected: torch.Tensor, scale: float = 1.0) -> None:
        tol = _TOLERANCES[(actual.dtype, actual.device.type)]
        torch.testing.assert_close(actual.float(), expected.float(), atol=tol["atol"] * scale, rtol=tol["rtol"] * scale)

    return check
