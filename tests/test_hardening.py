"""Hostile and mistaken input: refused up front, in one line, with nothing lost."""

import os
import re

import pytest
from helpers import assert_one_line_error, invoke, save_concept

from stc.errors import BadInput
from stc.render.prompts import parse_prompt
from stc.store.registry import Registry, check_weights


@pytest.mark.parametrize("prompt", ["<cat on the moon", "<cat> on the <moon", "<cat on <moon>"])
def test_unbalanced_brackets_are_refused(prompt):
    with pytest.raises(BadInput, match="unbalanced '<'"):
        parse_prompt(prompt)
    assert_one_line_error(invoke("gen", prompt, "--model", "builtin:tiny"), "unbalanced")


@pytest.mark.parametrize("prompt, fragment", [
    ("<wedge:abc> on the moon", "the rank after ':' must be a whole number"),
    ("<wedge:8x>", "the rank after ':' must be a whole number"),
    ("<wedge: 8>", "without spaces, as in <wedge:8>"),
    ("<wedge:>", "the rank after ':' must be a whole number"),
    ("a <> on the moon", "<> names no concept"),
    ("<x y> on the moon", "<x y> is not a concept reference"),
    ("<wedge_!> here", "is not a concept reference"),
    ("<lyco:foo:0.8> a cat", "A1111 extension tag"),
    ("<lora:> a cat", "write <lora:NAME> or <lora:NAME:0.8>"),
    ("<Wedge:8>", "write <wedge:8>"),
])
def test_anything_that_opens_a_reference_and_is_not_one_is_refused(prompt, fragment):
    """A mistyped reference must not render plain Stable Diffusion without its concept."""
    with pytest.raises(BadInput, match=re.escape(fragment)):
        parse_prompt(prompt)
    assert_one_line_error(invoke("gen", prompt), fragment)  # before any model loads (none is there)


def test_brackets_that_open_no_reference_stay_text():
    assert parse_prompt("a < b > c and 3 <= 4, x -> y").ranks == {}


@pytest.mark.parametrize("args, fragment", [
    (("--cfg", "nan"), "cfg (--cfg) must be a finite number"),
    (("--seed", str(10**23)), "seeds must lie between 0 and"),
    (("--rank", "0"), "rank 0 (--rank): ranks start at 1"),
])
def test_gen_refuses_bad_numbers_before_loading(args, fragment):
    save_concept("pup")
    assert_one_line_error(invoke("gen", "<pup> on the moon", *args), fragment)


def test_train_refuses_bad_numbers(photos):
    for args, fragment in ((("--lr", "nan"), "--lr must be a finite number"),
                           (("--lr", "inf"), "--lr must be a finite number"),
                           (("--adam-beta1", "1.5"), "--adam-beta1 must be a finite number in [0.0, 1.0)"),
                           (("--seed", str(10**23)), "seed (--seed) must lie between")):
        assert_one_line_error(invoke("train", photos, "--name", "x", "--model", "builtin:tiny", *args), fragment)
    assert Registry().names() == []


def test_tiny_photos_are_warned_about(tmp_path):
    from PIL import Image

    from stc.train.images import load_photos

    for index in range(3):
        Image.new("RGB", (1, 1), (index * 80, 0, 0)).save(tmp_path / f"dot{index}.png")
    Image.new("RGB", (64, 80)).save(tmp_path / "fine.png")
    warnings = []
    load_photos(tmp_path, 64, on_warning=warnings.append)
    small = [w for w in warnings if "far below the training resolution" in w]
    assert len(small) == 3 and all("1x1 px" in w for w in small)
    assert not any("fine.png" in w for w in warnings)


def test_inspect_plot_refuses_to_overwrite_without_force(tmp_path):
    save_concept("pup")
    plot = tmp_path / "norms.png"
    plot.write_bytes(b"mine")
    assert_one_line_error(invoke("inspect", "pup", "--plot", plot), "--force")
    assert plot.read_bytes() == b"mine"
    assert invoke("inspect", "pup", "--plot", plot, "--force").exit_code == 0
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_leftovers_of_killed_writers_are_reported_then_swept_and_an_interrupted_swap_is_undone(stc_home):
    import os
    import shutil
    import subprocess
    import sys

    registry = Registry()
    kept = save_concept("kept")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    concepts = registry.concepts_dir
    (concepts / f".tmp-half-{pid}-x1").mkdir()  # a write that never finished
    old = concepts / f".old-kept-{pid}-x2"  # killed between the two renames of an overwrite
    old.mkdir()
    shutil.copytree(kept.path, old / "entry")
    shutil.rmtree(kept.path)
    alive = concepts / f".tmp-busy-{os.getpid()}-x3"  # a write in progress in a live process
    alive.mkdir()

    result = invoke("ls")
    assert result.stderr.count("interrupted write") == 2 and "busy" not in result.stderr
    save_concept("other")  # any write sweeps
    assert sorted(p.name for p in concepts.iterdir()) == [alive.name, "kept", "other"]
    assert check_weights(registry.load("kept")).ok  # the previous entry is back, whole


def test_os_errors_outside_the_registry_are_one_line(monkeypatch, tmp_path):
    from stc.models.backbones import SD_LAYER_NAMES

    save_concept("pup", layer_names=SD_LAYER_NAMES)
    import stc.render.pngmeta

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "out"))

    monkeypatch.setattr(stc.render.pngmeta, "save_png", full_disk)
    monkeypatch.setattr("stc.cli.render.save_png", full_disk, raising=False)
    result = invoke("gen", "<pup>", "--steps", 1, "--out", tmp_path / "out")
    assert_one_line_error(result, "No space left on device")


# --------------------------------------------------------------------------- found by a newcomer run


def test_settings_and_folders_that_cannot_work_are_named_before_anything_loads(tmp_path, monkeypatch, photos):
    import stc.models.base

    monkeypatch.setattr(stc.models.base, "load_base_model", lambda *a, **k: pytest.fail("loaded a model"))
    home_file = tmp_path / "home-file"
    home_file.write_text("not a folder")
    monkeypatch.setenv("STC_HOME", str(home_file))
    assert_one_line_error(invoke("ls"), "is a file, not a folder", "STC_HOME")
    monkeypatch.setenv("STC_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "config.yaml").write_text("model: [unclosed\n")
    assert_one_line_error(invoke("gen", "a cat"), "config.yaml", "must be YAML")
    (tmp_path / "home" / "config.yaml").unlink()
    monkeypatch.setenv("STC_THREADS", "abc")
    assert_one_line_error(invoke("gen", "a cat", "--model", "builtin:tiny"), "STC_THREADS) must be a whole number")
    monkeypatch.delenv("STC_THREADS")
    loop = tmp_path / "loop"
    loop.mkdir()
    (loop / "a").symlink_to(loop / "b")
    (loop / "b").symlink_to(loop / "a")
    assert_one_line_error(invoke("train", loop / "a", "--name", "x", "--model", "builtin:tiny"), "photos folder")
    unusable = tmp_path / "unusable"
    unusable.mkdir()
    (unusable / "broken.jpg").write_bytes(b"garbage")
    assert_one_line_error(invoke("train", unusable, "--name", "x", "--model", "builtin:tiny"), "no usable images")
    assert_one_line_error(invoke("train", photos, "--name", "x", "--init", "", "--model", "builtin:tiny"),
                          "the initializer word (--init) must be a word")


def test_odd_files_among_the_photos_are_named_and_many_warnings_are_counted(tmp_path):
    from PIL import Image

    from stc.train.images import load_photos

    os.mkfifo(tmp_path / "pipe.png")  # opening it would block for ever
    for index in range(8):
        Image.new("RGB", (4, 4), (index * 30, 0, 0)).save(tmp_path / f"dot{index}.png")
    warnings = []
    load_photos(tmp_path, 64, on_warning=warnings.append)
    assert any("pipe.png" in w and "not a regular file" in w for w in warnings)
    small = [w for w in warnings if "far below the training resolution" in w]
    assert len(small) == 5 and "... and 3 more photo(s) far below 64 px" in warnings


def test_messages_are_cut_at_a_sentence_not_mid_word():
    from stc.errors import one_line

    text = ("Cannot load model x: the model is not fully cached locally (pass 'local_files_only=False' as "
            "input.) and an error occurred while trying to fetch metadata from the Hub. Please check out "
            "the root cause in the stacktrace above. " * 3)
    cut = one_line(text, 200)
    assert len(cut) <= 200 and cut.endswith(".") and "local_files_only=False' as input.)" in cut
    assert one_line("word " * 100, 50).endswith(" …") and one_line("short\n text") == "short text"


def test_rm_and_mv_of_a_name_in_training_say_so_before_its_first_save(tmp_path):
    registry = Registry()
    with registry.training_lock("early"):  # the run holds its name; nothing is saved yet
        for args, fragment in ((("rm", "early", "--yes"), "cannot remove 'early'"),
                               (("mv", "early", "later"), "cannot rename 'early'")):
            assert_one_line_error(invoke(*args), fragment, "being trained by process")
