import pytest
import torch

from model.presets import get_preset
from model.profile import profile_model
from trainer.mfu import PEAK_TFLOPS, Throughput, peak_flops


def test_no_peak_and_no_mfu_on_cpu():
    assert peak_flops(torch.device("cpu"), "bfloat16") is None
    meter = Throughput(get_preset("tiny"), peak_flops(torch.device("cpu"), "bfloat16"))
    m = meter.update(batch_size=4, dt=0.5)
    assert m["tokens_per_s"] == pytest.approx(4 * 128 / 0.5) and "mfu" not in m
    assert "MFU" not in meter.describe(1.0)


def test_mfu_from_profile_flops_when_a_peak_is_known():
    config = get_preset("shakespeare-char")
    peak = PEAK_TFLOPS["H100"]["bfloat16"] * 1e12
    meter = Throughput(config, peak, world_size=2)  # as on two H100s
    m = meter.update(batch_size=64, dt=0.01)
    expected = 64 * 256 / 0.01 * profile_model(config)["flops"]["training_per_token"] / (2 * peak)
    assert m["mfu"] == pytest.approx(expected) and 0 < m["mfu"] < 1
    assert "MFU" in meter.describe(1.0)


def test_eta_follows_the_smoothed_step_time():
    meter = Throughput(get_preset("tiny"), None)
    meter.update(1, 1.0)
    meter.update(1, 2.0)
    assert meter.eta_s(10) == pytest.approx(10 * (0.9 * 1.0 + 0.1 * 2.0))
