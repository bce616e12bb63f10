"""stc grid: truncation grids, their layout, their files and their text-encoder budget."""

import json
import math

import numpy as np
import pytest
from helpers import invoke, make_concept, make_mapper

from stc.errors import BadInput
from stc.method.encoding import _text_transformer
from stc.method.spacetime import cross_attention_layer_names
from stc.render.generation import Renderer, RenderSettings
from stc.render.grid import (
    compose_grid,
    fit_label,
    parse_ranks,
    parse_seeds,
    read_prompts,
    render_grid,
    save_grid,
)
from stc.store.conceptio import weights_bytes
from stc.store.registry import Registry

CELL = 64





@pytest.fixture
def renderer(tiny):
    unet = tiny.pipeline.unet
    return Renderer(tiny, {"mydog": (make_concept("mydog", cross_attention_layer_names(unet)), make_mapper(1)),
                           "mycat": (make_concept("mycat", cross_attention_layer_names(unet)), make_mapper(2))})


@pytest.fixture
def saved_concepts(tiny):
    registry = Registry()
    for name, seed in (("mydog", 1), ("mycat", 2)):
        registry.save(make_concept(name, cross_attention_layer_names(tiny.pipeline.unet)),
                      weights_bytes(make_mapper(seed), name))
    return registry


def count_calls(module) -> list:
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


# --------------------------------------------------------------------------- inputs


def test_rank_and_seed_lists():
    assert parse_ranks("1,2,4,8,16,32,64,128") == [1, 2, 4, 8, 16, 32, 64, 128]
    assert parse_ranks(" 8, 1-3 ,8") == [8, 1, 2, 3]
    assert parse_seeds("0-3,10") == [0, 1, 2, 3, 10]
    assert parse_ranks("129") == [129]  # whether a rank fits is each concept's business (checked on render)
    for bad, fragment in (("", "empty"), ("1,x", "'x'"), ("0,8", "ranks start at 1"), ("4-2", "4-2")):
        with pytest.raises(BadInput, match=fragment):
            parse_ranks(bad)
    with pytest.raises(BadInput, match="--seeds"):
        parse_seeds("-1")


def test_prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# my prompts\n<mydog> on the moon\n\n   \n  <mydog:4> in the snow  \n#skip\n", encoding="utf-8")
    assert read_prompts(path) == ["<mydog> on the moon", "<mydog:4> in the snow"]
    path.write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(BadInput, match="no prompts"):
        read_prompts(path)
    with pytest.raises(BadInput, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")
    path.write_text("<mydog:4> and <mydog:8>\n", encoding="utf-8")
    with pytest.raises(BadInput, match="two different ranks"):
        read_prompts(path)


def test_long_labels_fit_their_row():
    label = fit_label("a very long prompt " * 10, "seed 3", chars_per_line=12, max_lines=4)
    lines = label.split("\n")
    assert len(lines) == 4 and lines[-1] == "seed 3" and lines[-2].endswith("…")
    assert fit_label(None, "seed 0", 12, 4) == "seed 0"


# --------------------------------------------------------------------------- rendering


def test_grid_layout_labels_and_distinct_cells(renderer, tmp_path):
    ranks, seeds = [1, 8, 128], [0, 1]
    settings = RenderSettings(steps=2, batch_size=4)
    grid = render_grid(renderer, ["<mydog> on the moon"], ranks, seeds, settings)
    assert [(c.row, c.column, c.seed, c.rank) for c in grid.cells] == [
        (row, column, seed, rank) for row, seed in enumerate(seeds) for column, rank in enumerate(ranks)
    ]
    image = np.asarray(compose_grid(grid, padding=4).convert("RGB")).astype(int)
    height, width, _ = image.shape
    label_width = width - len(ranks) * (CELL + 4)
    header_height = height - len(seeds) * (CELL + 4)
    assert label_width > 10 and header_height > 5  # room for "seed 1" and "r=128"
    header = image[:header_height, label_width:]
    labels = image[header_height:, :label_width]
    assert (header < 128).any() and (labels < 128).any()  # dark text drawn on white
    for column in range(len(ranks)):  # every column has its own label
        x = column * (CELL + 4)
        assert (header[:, x : x + CELL] < 128).any()
    cells = {}
    for cell in grid.cells:
        x, y = label_width + cell.column * (CELL + 4), header_height + cell.row * (CELL + 4)
        cells[cell.seed, cell.rank] = image[y : y + CELL, x : x + CELL]
        assert np.array_equal(cells[cell.seed, cell.rank], np.asarray(cell.rendered.image.convert("RGB")))
    assert not np.array_equal(cells[0, 1], cells[0, 128])  # ranks differ
    assert not np.array_equal(cells[0, 8], cells[1, 8])  # seeds differ

    # a cell equals the same image rendered on its own
    [alone] = renderer.render("<mydog> on the moon", [1], RenderSettings(steps=2, rank=8))
    # batch 4 vs batch 1: other GEMM shapes, latents equal to rounding, pixels at most one level off
    diff = np.abs(np.asarray(alone.image).astype(int) - cells[1, 8]).max()
    assert diff <= 1


def test_grid_text_encoder_calls_do_not_depend_on_seeds(renderer):
    encoder = _text_transformer(renderer.base.pipeline.text_encoder).encoder
    calls, unet_calls = count_calls(encoder), count_calls(renderer.base.pipeline.unet)
    ranks, steps = [1, 4, 16, 128], 4
    budget = 1 + len(ranks) * math.ceil(steps * 16 / 256)  # negative + one schedule per rank
    counts, batches = [], []
    for seeds in ([0], [0, 1, 2]):
        calls.clear()
        unet_calls.clear()
        render_grid(renderer, ["<mydog> next to <mycat>"], ranks, seeds, RenderSettings(steps=steps, batch_size=3))
        counts.append(len(calls))
        batches.append(len(unet_calls) // steps)
    assert counts == [budget, budget]
    # 4 single-seed cells fill batches of 3 across ranks; with 3 seeds each rank is one batch (CFG included)
    assert batches == [2, len(ranks)]
    # a small batch size mixes ranks in one batch and still encodes each rank once
    calls.clear()
    unet_calls.clear()
    render_grid(renderer, ["<mydog>"], ranks, [0], RenderSettings(steps=steps, batch_size=4))
    assert len(calls) == budget and len(unet_calls) == steps


def test_grid_reuses_identical_cells(renderer):
    unet_calls = count_calls(renderer.base.pipeline.unet)
    prompts = ["a plain cat", "<mydog:4> on the moon"]  # neither depends on the column's rank
    grid = render_grid(renderer, prompts, [1, 128], [0, 1], RenderSettings(steps=2, batch_size=8))
    assert len(unet_calls) == 2  # four distinct images, one batch, two steps
    for row in range(4):
        first, second = [c.rendered.image for c in grid.cells if c.row == row]
        assert np.array_equal(np.asarray(first), np.asarray(second))
    assert [c.rendered.ranks for c in grid.cells if c.prompt_index == 1] == [{"mydog": 4}] * 4


def test_save_grid_never_overwrites(renderer, tmp_path):
    grid = render_grid(renderer, ["<mydog>"], [2, 64], [5], RenderSettings(steps=1))
    first = save_grid(grid, tmp_path / "out" / "g.png")
    second = save_grid(grid, tmp_path / "out" / "g.png")
    assert first.path == tmp_path / "out" / "g.png" and second.path == tmp_path / "out" / "g-1.png"
    assert first.folder == tmp_path / "out" / "g"
    assert sorted(p.name for p in first.folder.iterdir()) == ["p0-s5-r2.png", "p0-s5-r64.png"]
    from PIL import Image

    with Image.open(first.path) as image:
        record = json.loads(image.text["stc-grid"])
        assert record["ranks"] == [2, 64] and record["seeds"] == [5] and record["images"][0] == "g/p0-s5-r2.png"
        assert image.text["parameters"].startswith("<mydog>\n")
    with Image.open(first.images[1]) as image:
        assert json.loads(image.text["stc"])["concepts"]["mydog"]["rank"] == 64
    with pytest.raises(BadInput, match=".png"):
        save_grid(grid, tmp_path / "grid.jpg")


# --------------------------------------------------------------------------- CLI


def test_grid_cli(saved_concepts, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("grid", "<mydog> on the moon", "--ranks", "1,128", "--seeds", "0,1", "--steps", 2)
    assert result.exit_code == 0, result.output
    path = tmp_path / "stc-out" / "grid-mydog-on-the-moon.png"
    assert result.stdout.strip() == str(path.relative_to(tmp_path))
    assert len(list((tmp_path / "stc-out" / "grid-mydog-on-the-moon").iterdir())) == 4
    from PIL import Image

    with Image.open(path) as image:
        assert image.width > 2 * 64 and image.height > 2 * 64

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two rows\n<mydog> on the moon\n<mycat> in the snow\n", encoding="utf-8")
    result = invoke("grid", "--prompts", prompts, "--ranks", "4,8,16", "--steps", 1, "--out", tmp_path / "p.png",
                    "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["path"] == str(tmp_path / "p.png") and record["seeds"] == [0]
    assert len(record["images"]) == 2 * 3
    with Image.open(record["path"]) as image:
        rows_height = image.height - 2 * (64 + 4)
        assert 0 < rows_height < 64  # two rows (one per prompt) under a header


@pytest.mark.parametrize("args, fragment", [
    (("<mydog>", "--ranks", "0,8"), "--ranks"),
    (("<mydog>", "--ranks", "1,200"), "mydog has ranks 1..128; rank 200"),
    (("<mydog:200> on the moon",), "mydog has ranks 1..128; <mydog:200>"),
    (("<mydog>", "--seeds", "a"), "--seeds"),
    (("<mydog>", "--out", "grid.jpg"), ".png"),
    ((), "PROMPT or --prompts"),
    (("<mydgo>",), "mydog"),
])
def test_grid_cli_errors(saved_concepts, tmp_path, args, fragment):
    result = invoke("grid", *args, "--steps", 1)
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr


def test_grid_cli_empty_prompts_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n", encoding="utf-8")
    result = invoke("grid", "--prompts", empty)
    assert result.exit_code == 1 and "no prompts" in result.stderr


def test_prompts_that_differ_only_in_inline_ranks_share_the_encoding_not_the_metadata(renderer):
    calls = count_calls(_text_transformer(renderer.base.pipeline.text_encoder).encoder)
    grid = render_grid(renderer, ["<mydog:8> on the moon", "<mydog> on the moon"], [8], [0], RenderSettings(steps=2))
    assert len(calls) == 1 + 1  # the negative + one schedule for both rows
    first, second = (cell.rendered for cell in grid.cells)
    assert (first.prompt, second.prompt) == ("<mydog:8> on the moon", "<mydog> on the moon")
    assert first.metadata["prompt"] != second.metadata["prompt"] and first.ranks == second.ranks == {"mydog": 8}
    assert np.array_equal(np.asarray(first.image), np.asarray(second.image))
