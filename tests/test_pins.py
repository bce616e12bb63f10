"""Pins for behaviour that the rest of the suite does not catch when it breaks:

* ``Registry.save`` takes the per-name lock (a concurrent save waits for it);
* images between 1x and 2x the pixel limit (where Pillow only warns) are refused too;
* two-process training draws different batches per process and synchronises gradients.
"""

import inspect
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import make_concept, make_mapper
from PIL import Image

from stc.errors import BadInput
from stc.store.registry import Registry

TESTS = Path(__file__).resolve().parent

# --------------------------------------------------------------------------- registry lock


def save_with_mapper(registry: Registry, concept, mapper, **options):
    """``registry.save`` with the mapper's weights in whichever form ``save`` takes: a
    state dict (``save(concept, state_dict, ...)``) or the bytes of ``mapper.safetensors``
    (``save(concept, weights: bytes, ...)``, made by ``stc.store.conceptio.weights_bytes``)."""
    parameters = list(inspect.signature(registry.save).parameters.values())
    second = parameters[1]  # bound method: (concept, <weights>, ...)
    if second.name == "weights" or second.annotation in (bytes, "bytes"):
        from stc.store.conceptio import weights_bytes

        return registry.save(concept, weights_bytes(mapper, concept.name), **options)
    return registry.save(concept, mapper.state_dict(), **options)


def test_save_waits_for_the_lock_of_its_name():
    registry = Registry()
    save_with_mapper(registry, make_concept("warmup"), make_mapper(1))  # imports and folders ready
    concept, mapper = make_concept("locked"), make_mapper(0)
    started, finished = threading.Event(), threading.Event()
    outcome = {}

    def save_in_thread():
        started.set()
        try:
            outcome["concept"] = save_with_mapper(registry, concept, mapper)
        except BaseException as exc:  # reported by the main thread
            outcome["error"] = exc
        finally:
            finished.set()

    worker = threading.Thread(target=save_in_thread, daemon=True)
    with registry.lock("locked"):
        worker.start()
        assert started.wait(2)
        blocked = not finished.wait(0.5)
        exists_while_locked = registry.exists("locked")
    # released: the save goes through
    assert finished.wait(5), "save did not finish after the lock was released"
    worker.join(1)
    assert "error" not in outcome, outcome.get("error")
    assert blocked, "Registry.save wrote the concept while another holder had its lock"
    assert not exists_while_locked
    assert registry.exists("locked") and outcome["concept"].name == "locked"
    # another name's lock does not block a save
    with registry.lock("other"):
        save_with_mapper(registry, make_concept("free"), make_mapper(2))
    assert registry.exists("free")


# --------------------------------------------------------------------------- decompression bombs


def test_images_between_one_and_two_times_the_pixel_limit_are_refused(tmp_path, monkeypatch):
    """Pillow raises only above 2x MAX_IMAGE_PIXELS and merely warns above 1x: stc refuses both."""
    import stc.train.images
    from stc.train.images import load_photo, load_photos

    monkeypatch.setattr(stc.train.images, "MAX_PIXELS", 1000)
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (40, 40), (10, 200, 30)).save(folder / "bomb.png")  # 1600 px: 1x < 1600 < 2x
    Image.new("RGB", (30, 30), (200, 10, 30)).save(folder / "fine.png")  # 900 px: under the limit
    with pytest.raises(BadInput, match="decompression bomb"):
        load_photo(folder / "bomb.png", 16)
    assert load_photo(folder / "fine.png", 16).size == (16, 16)

    warnings = []
    loaded = load_photos(folder, 16, on_warning=warnings.append)
    assert [p.name for p in loaded.paths] == ["fine.png"]
    assert [p.name for p in loaded.skipped] == ["bomb.png"]
    assert "decompression bomb" in loaded.skipped[folder / "bomb.png"]
    assert any("bomb.png" in w and "decompression bomb" in w for w in warnings), warnings


# --------------------------------------------------------------------------- two processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_draw_different_batches_and_keep_identical_mappers(photos, stc_home, tmp_path):
    out = tmp_path / "probe"
    env = {**os.environ, "STC_HOME": str(stc_home), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS.parent), env.get("PYTHONPATH")]))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(TESTS / "dist_probe.py"), str(photos), str(out), "2",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["num_processes"] == 2 for r in ranks)

    first, second = (r["first_batch"] for r in ranks)
    assert first["noise_sum"] != second["noise_sum"], "both processes drew the same noise"
    assert (first["image_index"], first["flip"], first["timesteps"]) != (
        second["image_index"], second["flip"], second["timesteps"]
    ), "both processes drew the same images and timesteps"
    assert ranks[0]["losses"] != ranks[1]["losses"]  # they trained on different data...

    assert ranks[0]["before"]["sha256"] == ranks[1]["before"]["sha256"]  # ...from the same start
    assert ranks[0]["after"]["sha256"] != ranks[0]["before"]["sha256"], "the mapper did not learn"
    differing = {
        name: (ranks[0]["after"]["sums"][name], ranks[1]["after"]["sums"][name])
        for name in ranks[0]["after"]["sums"]
        if ranks[0]["after"]["sums"][name] != ranks[1]["after"]["sums"][name]
    }
    assert ranks[0]["after"]["sha256"] == ranks[1]["after"]["sha256"], (
        f"the processes' mappers diverged (gradients not synchronised): {differing}"
    )
