"""A compiled training step that enters sdpa_kernel (as our attention does on CUDA with dropout) is stored in and loaded
from AOTAutograd's cache by a second process under `cache_friendly()`. (Without it the first process counts
`autograd_cache_bypass` and saves nothing: seen with torch 2.13 on a CPU; left out here to keep the test under a minute.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# One compiled forward + backward of attention with dropout inside sdpa_kernel (model.layers' CUDA path; on a CPU the
# same graph nodes arise), with or without the trainer's cache_friendly(); prints the aot_autograd counters as JSON.
_STEP = """
import json, sys
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.nn.attention import sdpa_kernel
from model.layers import DROPOUT_SDPA_BACKENDS
from trainer.compile_cache import cache_friendly

def step(q, k, v):
    with sdpa_kernel(DROPOUT_SDPA_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1, is_causal=True)

torch.set_num_threads(1)
q, k, v = (torch.randn(2, 2, 16, 8, requires_grad=True) for _ in range(3))
with cache_friendly() if sys.argv[1] == "friendly" else torch._inductor.config.patch({}):
    torch.compile(step)(q, k, v).sum().backward()
print(json.dumps(dict(counters["aot_autograd"])))
"""


def _launch(mode: str, cache: Path) -> dict[str, int]:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache), PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", _STEP, mode], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(sys.platform == "win32", reason="Inductor's C++ backend is not set up on Windows")
def test_second_launch_hits_aot_autograd_cache_when_cache_friendly(tmp_path):
    first = _launch("friendly", tmp_path / "friendly")
    assert first.get("autograd_cache_miss") == 1 and first.get("autograd_cache_saved") == 1
    second = _launch("friendly", tmp_path / "friendly")
    assert second.get("autograd_cache_hit") == 1 and not second.get("autograd_cache_bypass")
