"""stc.render.inspection: norms per (timestep, layer), rank agreement, the PNG heatmap."""

import pytest
import torch

from stc.errors import BadInput
from stc.method.mapper import MapperConfig, NeTIMapper
from stc.render.inspection import (
    CELL_HEIGHT,
    CELL_WIDTH,
    COLORBAR_SPACE,
    LABEL_WIDTH,
    MARGIN,
    TITLE_HEIGHT,
    colormap,
    colour_scale,
    draw_norm_heatmaps,
    inspect_mapper,
    plot_panels,
    plot_size,
    rank_ladder,
    sampler_timesteps,
    save_norm_heatmaps,
    short_layer_name,
)

LAYERS = [f"up_blocks.{i // 3}.attentions.{i % 3}.transformer_blocks.0.attn2" for i in range(16)]


@pytest.fixture(scope="module")
def mapper():
    config = MapperConfig(text_width=32, norm_scale=0.5)
    return NeTIMapper(config, generator=torch.Generator().manual_seed(0)).eval().requires_grad_(False)


def test_sampler_timesteps_run_from_noisy_to_clean():
    assert sampler_timesteps(10) == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert sampler_timesteps(1) == [999]
    with pytest.raises(BadInput):
        sampler_timesteps(0)


def test_rank_ladder_and_layer_names():
    assert rank_ladder(128) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert rank_ladder(100) == [1, 2, 4, 8, 16, 32, 64, 100]
    assert short_layer_name("mid_block.attentions.0.transformer_blocks.0.attn2") == "mid.attn.0"
    assert short_layer_name("down_blocks.1.attentions.1.transformer_blocks.1.attn2") == "down.1.attn.1.tb1"


def test_grid_cells_are_the_mapper_outputs_at_their_timestep_and_layer(mapper):
    report = inspect_mapper(mapper, "blob", LAYERS, rank=8, num_timesteps=5)
    grid = report.grid
    assert len(grid.token) == 16 and len(grid.token[0]) == 5
    layer_index, column = 11, 3
    output = mapper(torch.tensor([float(grid.timesteps[column])]), torch.tensor([float(layer_index)]), rank=8)
    token, bypass = mapper.split(output)
    assert grid.token[layer_index][column] == pytest.approx(float(token.norm()), rel=1e-5)
    assert grid.bypass[layer_index][column] == pytest.approx(float(bypass.norm()), rel=1e-5)


def test_token_and_bypass_share_the_initializer_norm(mapper):
    grid = inspect_mapper(mapper, "blob", LAYERS).grid
    for token_row, bypass_row in zip(grid.token, grid.bypass):
        for token_norm, bypass_norm in zip(token_row, bypass_row):
            assert token_norm**2 + bypass_norm**2 == pytest.approx(0.5**2, rel=1e-4)


def test_rank_agreement(mapper):
    report = inspect_mapper(mapper, "blob", LAYERS)
    assert [a.rank for a in report.ranks] == rank_ladder(128)
    full = report.ranks[-1]
    assert full.token_mean == pytest.approx(1.0, abs=1e-5) and full.bypass_min == pytest.approx(1.0, abs=1e-5)
    assert all(-1.0 - 1e-6 <= a.token_min <= a.token_mean <= 1.0 + 1e-6 for a in report.ranks)
    assert report.suggested_rank() in rank_ladder(128)
    assert report.suggested_rank(threshold=-2.0) == 1
    data = report.to_dict()
    assert data["suggested_rank"] == report.suggested_rank() and data["grid"]["rank"] == 128


def test_bad_rank_and_steps(mapper):
    with pytest.raises(BadInput, match="--rank"):
        inspect_mapper(mapper, "blob", LAYERS, rank=0)
    with pytest.raises(BadInput, match="--steps"):
        inspect_mapper(mapper, "blob", LAYERS, num_timesteps=1001)


def test_colormap_ends():
    assert colormap(0.0) == (68, 1, 84) and colormap(1.0) == (253, 231, 37)
    assert colormap(-3) == colormap(0.0) and colormap(7) == colormap(1.0)


def test_png_heatmap(mapper, tmp_path):
    grid = inspect_mapper(mapper, "blob", LAYERS, num_timesteps=7).grid
    path = save_norm_heatmaps(grid, tmp_path / "norms.png", "blob")
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == plot_size(16, 7, panels=2)
        pixels = image.convert("RGB")
        assert len(set(pixels.getdata())) > 50  # cells, colour bars and text, not a blank page
    grid.bypass = None
    assert draw_norm_heatmaps(grid).size == plot_size(16, 7, panels=1)
    with pytest.raises(BadInput, match=".png"):
        save_norm_heatmaps(grid, tmp_path / "norms.jpg")


class WobblyConstantMapper(NeTIMapper):
    """A concept whose token and bypass are one vector each at every (t, layer), up to a relative
    wobble of 1e-6 (rounding noise, as NeTI's rescaling to the initializer's norm leaves)."""

    def forward(self, timesteps, layers, rank=None, dropout_groups=None, generator=None):
        width = self.config.text_width
        base = torch.linspace(0.1, 1.0, 2 * width)
        wobble = 1e-6 * torch.sin(timesteps.float() * 0.37 + layers.float() * 1.3).unsqueeze(-1)  # N, 1
        rows = base * (1 + wobble * torch.cos(torch.arange(2 * width).float()))  # N, 2D
        token, bypass = rows[:, :width], rows[:, width:]
        scale = self.config.norm_scale / rows.norm(dim=-1, keepdim=True)
        return torch.cat([token, bypass], dim=-1) * scale


def panel_cells(image, panel: int, timesteps: int, layers: int = 16):
    """The colours of one panel's cells in :func:`draw_norm_heatmaps`'s image."""
    panel_width = LABEL_WIDTH + timesteps * CELL_WIDTH + COLORBAR_SPACE
    left = MARGIN + panel * (panel_width + MARGIN) + LABEL_WIDTH
    top = MARGIN + TITLE_HEIGHT
    return set(image.crop((left, top, left + timesteps * CELL_WIDTH, top + layers * CELL_HEIGHT)).getdata())


def test_a_concept_constant_in_time_and_space_is_drawn_flat():
    mapper = WobblyConstantMapper(MapperConfig(text_width=32, norm_scale=0.5),
                                  generator=torch.Generator().manual_seed(0)).eval()
    grid = inspect_mapper(mapper, "flat", LAYERS, num_timesteps=7).grid
    token_norms = [value for row in grid.token for value in row]
    assert max(token_norms) > min(token_norms)  # the norms do wobble (in the 7th digit)...
    assert max(value for row in grid.token_deviation for value in row) < 1e-5  # ...around one embedding
    (token_title, _, token_scale), (bypass_title, _, bypass_scale) = plot_panels(grid)
    assert token_title.endswith("range 0.000 to 0.000") and token_scale[0] == 0.0 and token_scale[1] >= 0.05
    assert bypass_scale[0] == 0.0
    image = draw_norm_heatmaps(grid, "flat").convert("RGB")
    assert len(panel_cells(image, 0, 7)) == 1  # one colour: flat, not rounding noise stretched to the full bar
    assert len(panel_cells(image, 1, 7)) == 1


def test_a_near_constant_panel_gets_nearly_one_colour():
    """Norms between 0.305 and 0.316 (what the token panel used to stretch over the whole bar) sit
    in the top 4 % of a bar anchored at 0; values that vary a lot span it."""
    low, high = colour_scale([[0.305, 0.316], [0.31, 0.312]])
    assert (low, high) == (0.0, 0.316) and 0.305 / high > 0.96
    assert colour_scale([[0.0, 0.0]], floor=0.05) == (0.0, 0.05)
    assert colour_scale([[0.069, 0.388]], floor=0.05) == (0.0, 0.388)


def test_per_layer_norms_stay_in_the_json(mapper):
    data = inspect_mapper(mapper, "blob", LAYERS, num_timesteps=3).to_dict()
    assert len(data["grid"]["token"]) == 16 and len(data["grid"]["token"][0]) == 3
    assert len(data["grid"]["bypass"]) == 16 and len(data["grid"]["token_deviation"]) == 16
