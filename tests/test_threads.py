"""The thread count is chosen, never inherited."""

import pytest
import torch
from helpers import invoke

from stc.errors import BadInput
from stc.models.threads import SMALL_MODEL_PARAMETERS, choose_threads, free_cores
from stc.settings import requested_threads


def test_small_models_get_one_thread_large_ones_the_free_cores(monkeypatch):
    monkeypatch.setattr("stc.models.threads.available_cores", lambda: 8)
    monkeypatch.setattr("os.getloadavg", lambda: (3.2, 0.0, 0.0))
    assert free_cores() == 5  # never more than the cores that are not busy
    assert choose_threads(SMALL_MODEL_PARAMETERS - 1) == 1
    assert choose_threads(860_000_000) == 5
    assert choose_threads(860_000_000, requested=3) == 3
    monkeypatch.setattr("os.getloadavg", lambda: (20.0, 0.0, 0.0))
    assert free_cores() == 1


def test_requests_come_from_the_flag_or_the_environment(monkeypatch):
    monkeypatch.setenv("STC_THREADS", "2")
    assert requested_threads() == 2 and requested_threads(4) == 4
    monkeypatch.setenv("STC_THREADS", "")
    assert requested_threads() is None
    for bad in ("x", "0"):
        monkeypatch.setenv("STC_THREADS", bad)
        with pytest.raises(BadInput, match="STC_THREADS"):
            requested_threads()


def test_loading_a_model_sets_the_threads(monkeypatch):
    from stc.models.base import load_base_model

    monkeypatch.delenv("STC_THREADS", raising=False)
    torch.set_num_threads(2)
    try:
        load_base_model("builtin:tiny", device="cpu")
        assert torch.get_num_threads() == 1  # builtin:tiny is small
        monkeypatch.setenv("STC_THREADS", "2")
        load_base_model("builtin:tiny", device="cpu")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


def test_the_threads_flag_reaches_the_model_load_not_the_environment(monkeypatch, tmp_path):
    import os

    monkeypatch.delenv("STC_THREADS", raising=False)
    result = invoke("--threads", 0, "ls")
    assert result.exit_code == 1 and "Error: --threads must be at least 1, got 0" in result.stderr
    try:
        result = invoke("--threads", 3, "gen", "a cat", "--model", "builtin:tiny", "--steps", 1, "--out", tmp_path)
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == 3 and "STC_THREADS" not in os.environ  # passed as a setting
    finally:
        torch.set_num_threads(1)
