import json

import pytest
from helpers import assert_one_line_error, invoke


@pytest.fixture
def trained(photos):
    result = invoke("train", photos, "--name", "blob", "--init", "cat", "--steps", 2, "--model", "builtin:tiny",
                    "--grad-accum", 1, "--seed", 3)
    assert result.exit_code == 0, result.output
    return result


def test_train_ls_gen(trained, stc_home, tmp_path):
    assert trained.stdout.strip() == str(stc_home / "concepts" / "blob")
    assert "Trained <blob>" in trained.stderr and "2/2" in trained.stderr
    assert (stc_home / "concepts" / "blob" / "concept.yaml").is_file()
    assert (stc_home / "concepts" / "blob" / "mapper.safetensors").is_file()

    listing = invoke("ls")
    assert listing.exit_code == 0
    assert "blob" in listing.stdout and "builtin:tiny" in listing.stdout
    records = json.loads(invoke("ls", "--json").stdout)
    assert [r["name"] for r in records] == ["blob"] and records[0]["steps"] == 2

    out = tmp_path / "renders"
    result = invoke("gen", "<blob> on the moon", "--rank", 8, "--steps", 4, "-n", 2, "--out", out, "--seed", 5)
    assert result.exit_code == 0, result.output
    paths = result.stdout.split()
    assert len(paths) == 2 and all(p.endswith(".png") for p in paths)
    from PIL import Image

    with Image.open(paths[0]) as image:
        assert image.size == (64, 64)
        assert "<blob> on the moon" in image.text["parameters"]
        assert json.loads(image.text["stc"])["concepts"]["blob"]["rank"] == 8


def test_same_seed_gives_identical_png(trained, tmp_path):
    args = ("gen", "<blob> on the moon", "--steps", 3, "--seed", 9)
    first = invoke(*args, "--out", tmp_path / "a").stdout.strip()
    second = invoke(*args, "--out", tmp_path / "b").stdout.strip()
    other_seed = invoke("gen", "<blob> on the moon", "--steps", 3, "--seed", 10, "--out", tmp_path / "c").stdout.strip()
    rank_one = invoke(*args, "--rank", 1, "--out", tmp_path / "d").stdout.strip()
    data = [open(p, "rb").read() for p in (first, second, other_seed, rank_one)]
    assert data[0] == data[1]
    assert data[0] != data[2] and data[0] != data[3]


def test_gen_never_overwrites_existing_files(trained, tmp_path):
    args = ("gen", "<blob>", "--steps", 2, "--out", tmp_path)
    first = invoke(*args).stdout.strip()
    second = invoke(*args).stdout.strip()
    assert first != second and second.endswith("-1.png")


def test_gen_without_concept_is_plain_sd_with_a_note(tmp_path):
    result = invoke("gen", "a cat on the moon", "--model", "builtin:tiny", "--steps", 2, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert "plain Stable Diffusion" in result.stderr


def test_error_cases_are_one_line_without_traceback(trained, photos, tmp_path):
    assert_one_line_error(invoke("train", photos, "--name", "blob", "--model", "builtin:tiny"), "exists already")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(invoke("train", empty, "--name", "other", "--model", "builtin:tiny"), "no images")
    assert_one_line_error(
        invoke("train", photos, "--name", "other", "--init", "hippopotamus", "--model", "builtin:tiny"),
        "single token", "--init",
    )
    assert_one_line_error(invoke("train", photos, "--name", "Bad/Name", "--model", "builtin:tiny"), "bad-name")
    assert_one_line_error(invoke("gen", "<blub> on the moon"), "blob")  # suggests the close name
    assert_one_line_error(invoke("gen", "<blob:999>"), "rank")


def test_debug_env_shows_the_traceback(photos, monkeypatch):
    monkeypatch.setenv("STC_DEBUG", "1")
    result = invoke("train", photos, "--name", "Bad Name", "--model", "builtin:tiny")
    assert result.exit_code != 0 and result.exception is not None


def test_ls_on_a_missing_root_creates_nothing(stc_home):
    result = invoke("ls")
    assert result.exit_code == 0
    assert "stc train" in result.stderr
    assert not stc_home.exists()


def test_help_explains_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("train", "gen", "ls"):
        assert command in result.stdout
    assert "--rank" in invoke("gen", "--help").stdout
