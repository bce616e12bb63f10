import warnings
from pathlib import Path

import numpy as np
import pytest

warnings.filterwarnings("ignore")


@pytest.fixture(autouse=True)
def stc_home(tmp_path, monkeypatch):
    """Every test gets its own registry root; no test touches the real one."""
    home = tmp_path / "stc-home"
    monkeypatch.setenv("STC_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


@pytest.fixture
def photos(tmp_path) -> Path:
    """Four small synthetic photos of one 'subject' (a coloured disc on a background)."""
    from PIL import Image, ImageDraw

    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(4):
        image = Image.fromarray((rng.random((72, 80, 3)) * 60 + 100).astype("uint8"))
        draw = ImageDraw.Draw(image)
        offset = 8 * index
        draw.ellipse((10 + offset, 12, 50 + offset, 56), fill=(200, 60, 30))
        image.save(folder / f"photo{index}.png")
    return folder


@pytest.fixture
def tiny():
    """A fresh builtin:tiny base model on the CPU (fp32)."""
    from stc.models.base import load_base_model

    return load_base_model("builtin:tiny", device="cpu")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The suite runs with one torch thread (and subprocesses with OMP_NUM_THREADS=1): on a
    shared 2-core machine more threads only oversubscribe the cores."""
    import os

    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("STC_THREADS", "1")
    torch.set_num_threads(1)
    yield


@pytest.fixture
def no_network(monkeypatch):
    """Every socket opened during the test raises and is recorded; none may be. HF_HUB_OFFLINE is
    unset, so nothing may rely on it. Yields the list of attempts."""
    import socket

    opened = []

    class NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            opened.append(args)
            raise OSError("network access in an offline test")

    monkeypatch.setattr(socket, "socket", NoSocket)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield opened
    assert opened == [], "a socket was opened"
