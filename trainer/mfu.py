"""Training throughput: tokens/s, model FLOPs utilisation (MFU) against the GPU's peak, and time left.

MFU = achieved model FLOPs / peak FLOPs, where the model FLOPs of a training token are 3x its forward FLOPs
(forward + backward) as `model.profile` counts them (PaLM appendix B). Peaks are the vendor's dense numbers;
on a CPU or an unknown GPU there is no peak and MFU is left out rather than guessed.
"""

from __future__ import annotations

import torch

from model.config import ModelConfig
from model.profile import profile_model

__all__ = ["PEAK_TFLOPS", "peak_flops", "Throughput"]

# Dense tensor-core peaks (TFLOP/s) by device-name fragment, per autocast dtype; "float32" means TF32.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bfloat16": 989.5, "float16": 989.5, "float32": 494.7},
    "H100 PCIe": {"bfloat16": 756.0, "float16": 756.0, "float32": 378.0},
    "H100": {"bfloat16": 989.5, "float16": 989.5, "float32": 494.7},  # SXM / HBM3
    "A100": {"bfloat16": 312.0, "float16": 312.0, "float32": 156.0},
}
_EMA = 0.9  # smoothing of the step time shown and used for the ETA


def peak_flops(device: torch.device, dtype: str) -> float | None:
    """Peak FLOP/s of `device` for `dtype` autocast, or None (CPU, or a GPU not in PEAK_TFLOPS)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, peaks in PEAK_TFLOPS.items():  # most specific first ("H100 PCIe" before "H100")
        if fragment in name:
            return peaks[dtype] * 1e12
    return None


class Throughput:
    """Per-step tokens/s and MFU for a model of `config` on `world_size` devices of `peak` FLOP/s each (None: no MFU)."""

    def __init__(self, config: ModelConfig, peak: float | None, *, world_size: int = 1):
        self.block_size = config.block_size
        self.peak = None if peak is None else peak * world_size
        self.flops_per_token = _train_flops_per_token(config) if self.peak else 0.0
        self.step_s: float | None = None
        self.last: dict[str, float] = {}

    def update(self, batch_size: int, dt: float) -> dict[str, float]:
        """Metrics of one optimizer step of `batch_size` sequences that took `dt` seconds."""
        self.step_s = dt if self.step_s is None else _EMA * self.step_s + (1 - _EMA) * dt
        tokens_per_s = batch_size * self.block_size / max(dt, 1e-9)
        self.last = {"tokens_per_s": tokens_per_s, "step_s": dt}
        if self.peak:
            self.last["mfu"] = tokens_per_s * self.flops_per_token / self.peak
        return dict(self.last)

    def eta_s(self, steps_left: int) -> float:
        return (self.step_s or 0.0) * steps_left

    def describe(self, loss: float) -> str:
        """The progress bar's text: loss, tokens/s, MFU when known."""
        text = f"loss {loss:.4f} | {self.last.get('tokens_per_s', 0.0):,.0f} tok/s"
        if "mfu" in self.last:
            text += f" | MFU {100 * self.last['mfu']:.1f}%"
        return text


def _train_flops_per_token(config: ModelConfig) -> float:
    return float(profile_model(config)["flops"]["training_per_token"])
