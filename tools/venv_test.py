"""Tests run on the project's venv interpreter, with the pinned torch and the generated protos importable."""

import pathlib
import sys


def test_interpreter_is_the_project_venv():
    assert sys.prefix != sys.base_prefix, "tests must run inside .venv (see tools/bazel/venv.bzl)"
    assert pathlib.Path(sys.prefix).name == ".venv"


def test_torch_is_the_pinned_cpu_build():
    import torch

    pins = {}
    for line in pathlib.Path("requirements-torch.txt").read_text().splitlines():  # cwd: repo root or runfiles
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip()] = version.strip()
    assert torch.__version__.split("+")[0] == pins["torch"]
    assert pathlib.Path(torch.__file__).is_relative_to(pathlib.Path(sys.prefix))
    x = torch.randn(8, 8)
    assert torch.allclose(x @ torch.eye(8), x)


def test_pinned_packages_import():
    import grpc
    import onnxruntime
    import redis
    import safetensors
    import triton

    assert "CPUExecutionProvider" in onnxruntime.get_available_providers()
    assert grpc and redis and safetensors and triton
