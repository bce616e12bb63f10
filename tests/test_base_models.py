"""Base models as users keep them: the default model, offline use, local folders."""

import socket

import pytest
from helpers import assert_one_line_error, invoke

from stc.errors import ModelError
from stc.models import DEFAULT_MODEL, default_model, load_base_model


def test_the_default_model_comes_from_stc_model_then_the_config_file(stc_home, monkeypatch):
    monkeypatch.delenv("STC_MODEL", raising=False)
    assert default_model() == DEFAULT_MODEL
    stc_home.mkdir()
    (stc_home / "config.yaml").write_text("model: my-org/my-model\n")
    assert default_model() == "my-org/my-model"
    monkeypatch.setenv("STC_MODEL", "builtin:tiny")
    assert default_model() == "builtin:tiny"
    monkeypatch.delenv("STC_MODEL")
    (stc_home / "config.yaml").write_text("model: [1, 2]\n")
    with pytest.raises(ModelError, match="config.yaml"):
        default_model()


def test_stc_model_is_honoured_by_train_and_gen(photos, monkeypatch, tmp_path):
    monkeypatch.setenv("STC_MODEL", "builtin:tiny")
    result = invoke("train", photos, "--name", "envy", "--init", "cat", "--steps", 1, "--batch-size", 1,
                    "--grad-accum", 1, "--save-every", 0)
    assert result.exit_code == 0, result.output
    assert invoke("show", "envy", "--json").stdout.count('"base_model": "builtin:tiny"') == 1
    result = invoke("gen", "a cat", "--steps", 1, "--out", tmp_path, "--json")  # no concept: the default model
    assert result.exit_code == 0, result.output
    assert '"base_model": "builtin:tiny"' in result.stdout


def test_offline_never_opens_a_socket_and_names_what_to_download(monkeypatch):
    opened = []

    class NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            opened.append(args)
            raise OSError("network access in an offline test")

    monkeypatch.setattr(socket, "socket", NoSocket)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    result = invoke("--offline", "gen", "a cat", "--model", "nobody/not-downloaded", "--steps", 1)
    assert_one_line_error(result, "nobody/not-downloaded", "hf download nobody/not-downloaded", "offline")
    assert opened == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="hf download"):
        load_base_model("nobody/not-downloaded", device="cpu")
    assert opened == []
