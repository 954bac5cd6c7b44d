"""pytest set-up for model/: where there is no GPU, Triton kernels reached through model.layers run in the
interpreter. TRITON_INTERPRET must be set before triton is first imported, hence here, at conftest import."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
