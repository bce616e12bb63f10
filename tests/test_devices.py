"""--device auto|cpu|cuda[:N]|mps and the precision per device; stc.models.base.check_device is the one
place devices are validated. GPUs are simulated where the test machine has none."""

import pytest
import torch
from helpers import assert_one_line_error, invoke

from stc.errors import ModelError
from stc.models import base as models
from stc.models.base import check_device, default_device, default_dtype, load_base_model, torch_dtype


@pytest.fixture
def two_gpus(monkeypatch):
    """torch as it looks on a machine with two CUDA GPUs that have bf16 (nothing runs on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "_mps_available", lambda: False)


def test_auto_is_the_best_available_device(no_gpu, monkeypatch):
    assert check_device("auto") == check_device(None) == default_device() == "cpu"
    monkeypatch.setattr(models, "_mps_available", lambda: True)
    assert check_device("auto") == "mps"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert check_device("auto") == "cuda"  # CUDA first, then MPS, then the CPU


def test_unknown_and_unavailable_devices_are_clear_errors(no_gpu):
    assert check_device("cpu") == "cpu"
    for bad in ("gpu", "cuda:x", "cpu:0", "mps:1", ""):
        with pytest.raises(ModelError, match="unknown device"):
            check_device(bad)
    for device in ("cuda", "cuda:0"):
        with pytest.raises(ModelError, match="no CUDA GPU is available; use the CPU"):
            check_device(device)
    with pytest.raises(ModelError, match="MPS is not available"):
        check_device("mps")


def test_cuda_indices_are_checked_against_the_gpus_there_are(two_gpus):
    assert check_device("cuda") == "cuda" and check_device("cuda:1") == "cuda:1"
    with pytest.raises(ModelError, match=r"only 2 CUDA GPU\(s\) \(cuda:0 to cuda:1\)"):
        check_device("cuda:2")


def test_each_device_gets_a_sensible_precision(two_gpus, monkeypatch):
    assert (default_dtype("cpu"), default_dtype("cuda"), default_dtype("cuda:1"), default_dtype("mps")) == (
        "fp32", "fp16", "fp16", "fp16")
    assert torch_dtype(None, "cpu") == torch.float32
    assert torch_dtype(None, "cuda:1") == torch.float16
    assert torch_dtype("bf16", "cpu") == torch.bfloat16
    assert torch_dtype("bf16", "cuda") == torch.bfloat16
    with pytest.raises(ModelError, match=r"fp16 \(--dtype\) is not supported on the CPU; use fp32 or bf16"):
        torch_dtype("fp16", "cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)  # e.g. a T4 or V100
    with pytest.raises(ModelError, match=r"bf16 \(--dtype\) is not supported on this CUDA device; use fp16 or fp32"):
        torch_dtype("bf16", "cuda")
    with pytest.raises(ModelError, match=r"dtype \(--dtype\) must be one of fp32, fp16, bf16"):
        torch_dtype("fp64", "cpu")


def test_auto_loads_on_the_cpu_here(no_gpu):
    base = load_base_model("builtin:tiny", device="auto")
    assert base.device == "cpu" and base.dtype == torch.float32


def test_the_cli_takes_auto_and_refuses_bad_devices_before_loading(no_gpu, photos, tmp_path, monkeypatch):
    result = invoke("gen", "a cat", "--model", "builtin:tiny", "--device", "auto", "--steps", 1, "--out", tmp_path)
    assert result.exit_code == 0, result.output

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "_builtin_pipeline", no_loading)
    assert_one_line_error(invoke("gen", "a cat", "--model", "builtin:tiny", "--device", "gpu", "--steps", 1),
                          "unknown device 'gpu'")
    assert_one_line_error(invoke("train", photos, "--name", "dev", "--model", "builtin:tiny", "--device", "cuda",
                                 "--steps", 1), "no CUDA GPU is available")
    assert_one_line_error(invoke("gen", "a cat", "--model", "builtin:tiny", "--device", "cpu", "--dtype", "fp16"),
                          "fp16 (--dtype) is not supported on the CPU")
