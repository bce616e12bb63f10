"""stc grid: truncation grids, their layout, their files and their text-encoder budget."""

import json
import math

import numpy as np
import pytest
from helpers import invoke, make_concept, make_mapper

from stc.errors import BadInput
from stc.method.encoding import text_transformer
from stc.method.spacetime import cross_attention_layer_names
from stc.render.generation import Renderer, RenderSettings
from stc.render.grid import (
    MAX_CELL,
    MIN_CELL,
    Grid,
    GridCell,
    GridOutput,
    compose_grid,
    fit_label,
    grid_layout,
    grid_title,
    parse_ranks,
    parse_seeds,
    read_prompts,
    render_grid,
)
from stc.store.conceptio import weights_bytes
from stc.store.registry import Registry

CELL = 128  # builtin:tiny's 64 px images, shown twice as large




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


# --------------------------------------------------------------------------- layout and title


def test_small_images_are_scaled_up_by_a_whole_factor_and_large_ones_capped():
    small = grid_layout(32, 32)  # builtin:shapes
    assert small.cell_size == (128, 128) and small.scale_note == "32x32 px images shown 4x larger (nearest neighbour)"
    assert grid_layout(64, 64).cell_size == (MIN_CELL, MIN_CELL)  # builtin:tiny
    assert grid_layout(100, 60).cell_size == (200, 120)  # a whole factor: crisp pixels
    assert grid_layout(256, 256).cell_size == (256, 256) and grid_layout(256, 256).scale_note == ""
    large = grid_layout(1024, 1024)  # SDXL
    assert large.cell_size == (MAX_CELL, MAX_CELL) and "shown at 512x512 (full size in the folder)" in large.scale_note
    assert grid_layout(1024, 768).cell_size == (512, 384)
    for side in (8, 32, 64, 128, 512, 1024, 4096):  # labels legible at every model size
        layout = grid_layout(side, side)
        assert 14 <= layout.font_size <= 28 and layout.title_font_size > layout.font_size
        assert MIN_CELL <= max(layout.cell_size) <= max(MAX_CELL, 2 * MIN_CELL)


def fake_grid(side: int, ranks=(1, 8), seeds=(0,)) -> Grid:
    """A grid of flat grey side x side images with a render's metadata (nothing rendered)."""
    from PIL import Image

    from stc.render.generation import RenderedImage

    metadata = {"prompt": "<mydog> on the moon", "steps": 30, "cfg": 7.5, "scheduler": "dpm",
                "base_model": "stabilityai/stable-diffusion-xl-base-1.0", "concepts": {"mydog": {"rank": 1}}}
    cells = [GridCell(row, column, 0, "<mydog> on the moon", seed, rank,
                      RenderedImage(Image.new("RGB", (side, side), (90, 90, 90)), "<mydog> on the moon", seed,
                                    {"mydog": rank}, {**metadata, "seed": seed}))
             for row, seed in enumerate(seeds) for column, rank in enumerate(ranks)]
    return Grid(["<mydog> on the moon"], list(seeds), list(ranks), cells)


def test_a_1024_px_grid_shows_its_cells_at_the_cap():
    grid = fake_grid(1024)
    image = compose_grid(grid, padding=4)
    label_width = image.width - 2 * (MAX_CELL + 4)
    assert 0 < label_width < 200 and image.height < 400 + MAX_CELL  # one row of 512 px cells under the title
    pixels = np.asarray(image)
    top = image.height - (MAX_CELL + 4)
    assert (pixels[top : top + MAX_CELL, label_width : label_width + MAX_CELL] == 90).all()
    assert (pixels[top + MAX_CELL :, label_width:] == 255).all()  # nothing below: the cell is 512 px, not 1024
    assert grid_title(grid, grid_layout(1024, 1024))[-1] == (
        "1024x1024 px images shown at 512x512 (full size in the folder)")


def title_rows(image, header_height: int) -> int:
    """How many pixel rows above the header hold dark (text) pixels."""
    pixels = np.asarray(image.convert("L"))[:header_height]
    return int((pixels < 128).any(axis=1).sum())


@pytest.mark.parametrize("spec, side, cell", [("builtin:shapes", 32, 128), ("builtin:tiny-sdxl", 64, 128)])
def test_grid_title_and_cell_size_on_real_models(spec, side, cell, tmp_path):
    """A grid of the shapes world (32 px) and of tiny-sdxl: cells scaled up to a readable size,
    a title with the prompt, concept, model, steps and CFG, and both in the PNG's record."""
    import torch
    from PIL import Image

    from stc.method.mapper import MapperConfig, NeTIMapper
    from stc.models.base import load_base_model

    base = load_base_model(spec, device="cpu")
    layers = cross_attention_layer_names(base.pipeline.unet)
    widths = list(base.encoder_widths)
    several = len(widths) > 1
    config = MapperConfig(text_width=sum(widths), norm_scale=0.5, num_layers=len(layers), hidden_dim=8,
                          encoder_widths=widths if several else None,
                          norm_scales=[0.5] * len(widths) if several else None)
    mapper = NeTIMapper(config, generator=torch.Generator().manual_seed(0)).eval().requires_grad_(False)
    concept = make_concept("blob", layers, base_model=spec, text_width=sum(widths), mapper=config.to_dict())
    renderer = Renderer(base, {"blob": (concept, mapper)})
    grid = render_grid(renderer, ["a photo of <blob>"], [1, 8], [0, 1], RenderSettings(steps=1, cfg=3.0))
    assert grid.cells[0].rendered.image.size == (side, side)
    title = grid_title(grid, grid_layout(side, side))
    assert title[0] == "“a photo of <blob>”"
    assert title[1] == f"concept blob · model {spec}"
    assert title[2].startswith("1 step · CFG 3.0 · ") and "seeds 0, 1" in title[2]
    assert title[3] == f"{side}x{side} px images shown {cell // side}x larger (nearest neighbour)"

    saved = GridOutput(tmp_path / "grid.png").finish(grid)
    with Image.open(saved.path) as image:
        record = json.loads(image.text["stc-grid"])
        assert record["title"] == title and record["cell_size"] == [cell, cell]
        label_width = image.width - 2 * (cell + 4)
        header_height = image.height - 2 * (cell + 4)
        pixels = np.asarray(image.convert("RGB"))
        first = grid.cells[0].rendered.image.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST)
        assert np.array_equal(pixels[header_height : header_height + cell, label_width : label_width + cell],
                              np.asarray(first))
        # four title lines of at least 14 + 4 px type, above the column labels
        assert title_rows(image, header_height) >= 4 * 14


# --------------------------------------------------------------------------- rendering


def test_grid_layout_labels_and_distinct_cells(renderer, tmp_path):
    from PIL import Image

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
    assert label_width > 10 and header_height > 5  # room for "seed 1" and "rank 128"
    header = image[:header_height, label_width:]
    labels = image[header_height:, :label_width]
    assert (header < 128).any() and (labels < 128).any()  # dark text drawn on white
    for column in range(len(ranks)):  # every column has its own label, just above its cells
        x = column * (CELL + 4)
        assert (header[-20:, x : x + CELL] < 128).any()
    cells = {}
    for cell in grid.cells:
        x, y = label_width + cell.column * (CELL + 4), header_height + cell.row * (CELL + 4)
        cells[cell.seed, cell.rank] = image[y : y + CELL, x : x + CELL]
        shown = cell.rendered.image.convert("RGB").resize((CELL, CELL), Image.Resampling.NEAREST)
        assert np.array_equal(cells[cell.seed, cell.rank], np.asarray(shown))
    assert not np.array_equal(cells[0, 1], cells[0, 128])  # ranks differ
    assert not np.array_equal(cells[0, 8], cells[1, 8])  # seeds differ

    # a cell equals the same image rendered on its own
    [alone] = renderer.render("<mydog> on the moon", [1], RenderSettings(steps=2, rank=8))
    # batch 4 vs batch 1: other GEMM shapes, latents equal to rounding, pixels at most one level off
    alone_shown = np.asarray(alone.image.resize((CELL, CELL), Image.Resampling.NEAREST)).astype(int)
    diff = np.abs(alone_shown - cells[1, 8]).max()
    assert diff <= 1


def test_grid_text_encoder_calls_do_not_depend_on_seeds(renderer):
    encoder = text_transformer(renderer.base.pipeline.text_encoder).encoder
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


def test_a_grid_output_never_overwrites(renderer, tmp_path):
    grid = render_grid(renderer, ["<mydog>"], [2, 64], [5], RenderSettings(steps=1))
    first = GridOutput(tmp_path / "out" / "g.png").finish(grid)
    second = GridOutput(tmp_path / "out" / "g.png").finish(grid)
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
        GridOutput(tmp_path / "grid.jpg").finish(grid)


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
        assert image.width > 2 * CELL and image.height > 2 * CELL

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two rows\n<mydog> on the moon\n<mycat> in the snow\n", encoding="utf-8")
    result = invoke("grid", "--prompts", prompts, "--ranks", "4,8,16", "--steps", 1, "--out", tmp_path / "p.png",
                    "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["path"] == str(tmp_path / "p.png") and record["seeds"] == [0]
    assert len(record["images"]) == 2 * 3
    with Image.open(record["path"]) as image:
        rows_height = image.height - 2 * (CELL + 4)
        assert 0 < rows_height < 200  # two rows (one per prompt) under a title and a header


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
    calls = count_calls(text_transformer(renderer.base.pipeline.text_encoder).encoder)
    grid = render_grid(renderer, ["<mydog:8> on the moon", "<mydog> on the moon"], [8], [0], RenderSettings(steps=2))
    assert len(calls) == 1 + 1  # the negative + one schedule for both rows
    first, second = (cell.rendered for cell in grid.cells)
    assert (first.prompt, second.prompt) == ("<mydog:8> on the moon", "<mydog> on the moon")
    assert first.metadata["prompt"] != second.metadata["prompt"] and first.ranks == second.ranks == {"mydog": 8}
    assert np.array_equal(np.asarray(first.image), np.asarray(second.image))
