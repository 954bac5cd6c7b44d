"""pytest set-up for bench_svc/benches/: kernel case modules import Triton, which runs through its CPU interpreter
where there is no GPU (TRITON_INTERPRET must be set before triton is first imported, as kernels/conftest.py)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
