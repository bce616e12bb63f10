"""Look inside a concept: what its mapper outputs across space and time, and across ranks.

For every (timestep, layer) the mapper gives a token embedding and a bypass vector; their
norms show where the concept puts its weight. NeTI rescales every output to the initializer
word's norm, so the token norms barely move; what does move is the direction: the deviation of
each (t, layer) embedding from the concept's mean embedding (its "plain average", the one a
textual-inversion export starts from), ``||e(t, l) - ē|| / ||ē||``. Comparing the rank-r output with the full one
(cosine similarity, per rank 1, 2, 4, ..., 128) shows how much a truncated concept keeps, so
a user can choose ``--rank``. Also draws the norms as a PNG heatmap (Pillow only).

No typer or rich here; torch is imported inside the functions that need it.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import BadInput

DEFAULT_TIMESTEPS = 10
MAX_TIMESTEPS = 100  # the terminal table and the PNG stay readable
NUM_TRAIN_TIMESTEPS = 1000
AGREEMENT_THRESHOLD = 0.95  # mean cosine at which a rank counts as "close to the full concept"


# --------------------------------------------------------------------------- inputs


def sampler_timesteps(count: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """``count`` timesteps evenly spaced from the noisiest (999) down to 0, like a sampler."""
    if not 1 <= count <= num_train_timesteps:
        raise BadInput(f"steps (--steps) must be between 1 and {num_train_timesteps}, got {count}")
    if count == 1:
        return [num_train_timesteps - 1]
    last = num_train_timesteps - 1
    return [round(last * (1 - index / (count - 1))) for index in range(count)]


def rank_ladder(hidden_dim: int) -> list[int]:
    """1, 2, 4, ... up to and including ``hidden_dim`` (128: 1..128, eight ranks)."""
    ranks, rank = [], 1
    while rank < hidden_dim:
        ranks.append(rank)
        rank *= 2
    return ranks + [hidden_dim]


def rank_label(rank: int | None) -> str:
    """How a grid's rank is shown: "rank 8", or "no ranks" for a concept without them."""
    return "no ranks" if rank is None else f"rank {rank}"


def short_layer_name(name: str) -> str:
    """'up_blocks.3.attentions.2.transformer_blocks.0.attn2' -> 'up.3.attn.2'."""
    short = re.sub(r"\.transformer_blocks\.0\.attn2$", "", name)
    short = short.replace(".transformer_blocks.", ".tb").replace(".attn2", "")
    return short.replace("_blocks", "").replace("_block", "").replace("attentions", "attn")


# --------------------------------------------------------------------------- results


@dataclass
class NormGrid:
    """Norms of the mapper outputs at one rank: ``token[layer][timestep_index]``."""

    rank: int | None  # None: a concept without ranks
    timesteps: list[int]
    layer_names: list[str]
    token: list[list[float]]
    bypass: list[list[float]] | None  # None when the concept has no textual bypass
    # ||e(t, l) - ē|| / ||ē||, ē the mean token embedding over t in {0, 10, …, 990} and every layer
    token_deviation: list[list[float]] | None = None


@dataclass
class RankAgreement:
    """How close the rank-r outputs are to the full ones (cosine, mean and worst over the grid)."""

    rank: int
    token_mean: float
    token_min: float
    bypass_mean: float | None
    bypass_min: float | None


@dataclass
class Inspection:
    name: str
    norm_scale: float  # norm of the whole (token, bypass) output: the initializer word's
    grid: NormGrid
    ranks: list[RankAgreement]

    def suggested_rank(self, threshold: float = AGREEMENT_THRESHOLD) -> int | None:
        """The smallest rank whose token embeddings keep ``threshold`` mean cosine to the full ones
        (None for a concept without ranks)."""
        for agreement in self.ranks:
            if agreement.token_mean >= threshold:
                return agreement.rank
        return self.ranks[-1].rank if self.ranks else None

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "norm_scale": self.norm_scale,
            "grid": asdict(self.grid),
            "ranks": [asdict(agreement) for agreement in self.ranks],
            "suggested_rank": self.suggested_rank(),
            "suggested_rank_threshold": AGREEMENT_THRESHOLD,
        }


# --------------------------------------------------------------------------- computation


def mapper_outputs(mapper, timesteps: list[int], num_layers: int, rank: int | None):
    """Token and bypass outputs on the (layer, timestep) grid: L x K x D each (bypass may be None)."""
    import torch

    from ..method.encoding import spacetime_rows

    row_timesteps, row_layers = spacetime_rows(torch.tensor(timesteps), num_layers)  # K·L, time-major
    with torch.no_grad():
        outputs = mapper(row_timesteps, row_layers, rank=rank)  # K·L, out_dim
    token, bypass = mapper.split(outputs)

    def per_layer(values):  # K·L x D -> L x K x D
        return values.reshape(len(timesteps), num_layers, -1).transpose(0, 1)

    return per_layer(token), None if bypass is None else per_layer(bypass)


MEAN_TIMESTEPS = range(0, NUM_TRAIN_TIMESTEPS, 10)  # where the mean embedding is taken, as the ti export does


def mean_token_embedding(mapper, num_layers: int, rank: int | None):
    """The token embedding averaged over t in {0, 10, …, 990} and every layer: D (fp64)."""
    token, _ = mapper_outputs(mapper, list(MEAN_TIMESTEPS), num_layers, rank)
    return token.double().mean(dim=(0, 1))


def norm_grid(mapper, layer_names: list[str], timesteps: list[int], rank: int) -> NormGrid:
    token, bypass = mapper_outputs(mapper, timesteps, len(layer_names), rank)
    mean = mean_token_embedding(mapper, len(layer_names), rank)
    deviation = (token.double() - mean).norm(dim=-1) / mean.norm().clamp_min(1e-30)
    return NormGrid(
        rank=rank,
        timesteps=list(timesteps),
        layer_names=list(layer_names),
        token=token.norm(dim=-1).tolist(),
        bypass=None if bypass is None else bypass.norm(dim=-1).tolist(),
        token_deviation=deviation.tolist(),
    )


def rank_agreements(mapper, timesteps: list[int], num_layers: int) -> list[RankAgreement]:
    import torch.nn.functional as F

    full_token, full_bypass = mapper_outputs(mapper, timesteps, num_layers, rank=None)
    agreements = []
    for rank in rank_ladder(mapper.config.hidden_dim):
        token, bypass = mapper_outputs(mapper, timesteps, num_layers, rank=rank)
        token_cosine = F.cosine_similarity(token, full_token, dim=-1)
        bypass_cosine = None if bypass is None else F.cosine_similarity(bypass, full_bypass, dim=-1)
        agreements.append(RankAgreement(
            rank=rank,
            token_mean=float(token_cosine.mean()),
            token_min=float(token_cosine.min()),
            bypass_mean=None if bypass_cosine is None else float(bypass_cosine.mean()),
            bypass_min=None if bypass_cosine is None else float(bypass_cosine.min()),
        ))
    return agreements


def inspect_mapper(mapper, name: str, layer_names: list[str], rank: int | None = None,
                   num_timesteps: int = DEFAULT_TIMESTEPS) -> Inspection:
    from ..method.mapper_config import check_rank

    limit = mapper.config.rank_max  # None: a concept without ranks, inspected in full
    rank = limit if rank is None else check_rank(name, rank, limit, f"--rank {rank}")
    num_layers = mapper.config.num_layers
    if len(layer_names) != num_layers:
        layer_names = [f"layer {index}" for index in range(num_layers)]
    if not 1 <= num_timesteps <= MAX_TIMESTEPS:
        raise BadInput(f"steps (--steps) must be between 1 and {MAX_TIMESTEPS}, got {num_timesteps}")
    timesteps = sampler_timesteps(num_timesteps)
    return Inspection(
        name=name,
        norm_scale=float(mapper.config.norm_scale),
        grid=norm_grid(mapper, layer_names, timesteps, rank),
        ranks=rank_agreements(mapper, timesteps, num_layers) if limit is not None else [],
    )


def inspect_concept(concept, rank: int | None = None, num_timesteps: int = DEFAULT_TIMESTEPS) -> Inspection:
    """Inspect a stored concept (its weights are verified on load)."""
    from ..store.conceptio import load_mapper

    mapper = load_mapper(concept)
    return inspect_mapper(mapper, concept.name, concept.layer_names, rank, num_timesteps)


# --------------------------------------------------------------------------- colours

_VIRIDIS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]


def colormap(fraction: float) -> tuple[int, int, int]:
    """Viridis-like colour for ``fraction`` in [0, 1] (clamped)."""
    fraction = min(max(float(fraction), 0.0), 1.0) * (len(_VIRIDIS) - 1)
    index = min(int(fraction), len(_VIRIDIS) - 2)
    mix = fraction - index
    low, high = _VIRIDIS[index], _VIRIDIS[index + 1]
    return tuple(round(a + (b - a) * mix) for a, b in zip(low, high))


def value_range(values: list[list[float]]) -> tuple[float, float]:
    flat = [value for row in values for value in row]
    return min(flat), max(flat)


def fraction_in(value: float, low: float, high: float) -> float:
    return 0.5 if high - low < 1e-12 else (value - low) / (high - low)


MIN_DEVIATION_SCALE = 0.05  # the deviation bar reaches at least 5 % of the mean embedding's norm


def colour_scale(values: list[list[float]], floor: float = 0.0) -> tuple[float, float]:
    """The colour bar of a panel of non-negative values: from 0 to the largest value (at least
    ``floor``). Anchored at 0, values that vary little relative to their size get nearly one
    colour, and a constant panel gets exactly one."""
    return 0.0, max(value_range(values)[1], floor, 1e-12)


# --------------------------------------------------------------------------- PNG heatmap

CELL_WIDTH, CELL_HEIGHT = 32, 20
LABEL_WIDTH = 110  # room for the layer names left of the cells
MARGIN = 16
TITLE_HEIGHT = 46  # two lines: the concept and rank, the panel's quantity and range
AXIS_HEIGHT = 40  # timestep labels and the axis title below the cells
COLORBAR_WIDTH = 14
COLORBAR_SPACE = 80  # bar, ticks and tick labels right of the cells


def plot_size(num_layers: int, num_timesteps: int, panels: int) -> tuple[int, int]:
    """Width and height in pixels of :func:`draw_norm_heatmaps`'s image."""
    panel_width = LABEL_WIDTH + num_timesteps * CELL_WIDTH + COLORBAR_SPACE
    width = MARGIN + panels * panel_width + (panels - 1) * MARGIN + MARGIN
    height = MARGIN + TITLE_HEIGHT + num_layers * CELL_HEIGHT + AXIS_HEIGHT + MARGIN
    return width, height


def plot_panels(grid: NormGrid) -> list[tuple[str, list[list[float]], tuple[float, float]]]:
    """(title, values, colour scale) of each panel of the plot: the token embeddings' deviation
    from their mean (what varies with t and layer), then the bypass norms. Each title states the
    values' range; each colour bar runs from 0 (:func:`colour_scale`)."""
    deviation = grid.token_deviation if grid.token_deviation is not None else [[0.0] * len(row) for row in grid.token]
    title = "token: |e - mean| / |mean| (deviation from the mean embedding)"
    panels = [(title, deviation, colour_scale(deviation, MIN_DEVIATION_SCALE))]
    if grid.bypass is not None:
        panels.append(("bypass vector norm", grid.bypass, colour_scale(grid.bypass)))
    return [(f"{title}, range {value_range(values)[0]:.3f} to {value_range(values)[1]:.3f}", values, scale)
            for title, values, scale in panels]


def draw_norm_heatmaps(grid: NormGrid, name: str = ""):
    """A PIL image: the token embeddings' deviation from their mean and the bypass norms, side
    by side (layers x timesteps), labelled axes, one colour bar each (from 0)."""
    from PIL import Image, ImageDraw, ImageFont

    panels = plot_panels(grid)
    size = plot_size(len(grid.layer_names), len(grid.timesteps), len(panels))
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    panel_width = LABEL_WIDTH + len(grid.timesteps) * CELL_WIDTH + COLORBAR_SPACE
    for index, (title, values, scale) in enumerate(panels):
        left = MARGIN + index * (panel_width + MARGIN)
        lines = (f"{name + ': ' if name else ''}{rank_label(grid.rank)}", title)
        heading = "\n".join(_fit(draw, font, line, panel_width) for line in lines)
        draw.multiline_text((left, MARGIN), heading, fill="black", font=font, spacing=2)
        _draw_panel(draw, font, grid, values, scale, left + LABEL_WIDTH, MARGIN + TITLE_HEIGHT)
    return image


def check_plot_path(path: Path, force: bool = False) -> Path:
    """Refuse a plot path that cannot be written (or exists, unless ``force``), before any work."""
    from ..outputs import refuse_existing

    path = Path(path)
    refuse_existing([path], force, "--plot")
    if path.suffix.lower() != ".png":
        raise BadInput(f"plot (--plot) writes a PNG; give a file name ending in .png, not {path.name!r}")
    if not path.parent.is_dir():
        raise BadInput(f"plot (--plot): the folder {path.parent} does not exist; create it first")
    if path.is_dir():
        raise BadInput(f"plot (--plot): {path} is a folder; give a file name ending in .png")
    return path


def save_norm_heatmaps(grid: NormGrid, path: Path, name: str = "", force: bool = False) -> Path:
    from ..outputs import staged

    path = check_plot_path(path, force)
    with staged(path) as temporary:
        draw_norm_heatmaps(grid, name).save(temporary, format="PNG")
    return path


def _draw_panel(draw, font, grid: NormGrid, values: list[list[float]], scale: tuple[float, float],
                left: int, top: int) -> None:
    low, high = scale
    draw.text((left - 6, top - 3), "layer", fill="black", font=font, anchor="rd")
    for row, layer_values in enumerate(values):
        y = top + row * CELL_HEIGHT
        label = _fit(draw, font, short_layer_name(grid.layer_names[row]), LABEL_WIDTH - 6)
        draw.text((left - 6, y + CELL_HEIGHT // 2), label, fill="black", font=font, anchor="rm")
        for column, value in enumerate(layer_values):
            x = left + column * CELL_WIDTH
            colour = colormap(fraction_in(value, low, high))
            draw.rectangle((x, y, x + CELL_WIDTH - 1, y + CELL_HEIGHT - 1), fill=colour)
    bottom = top + len(values) * CELL_HEIGHT
    _draw_timestep_axis(draw, font, grid.timesteps, left, bottom)
    _draw_colorbar(draw, font, low, high, left + len(grid.timesteps) * CELL_WIDTH + 8, top, bottom)


def _draw_timestep_axis(draw, font, timesteps: list[int], left: int, top: int) -> None:
    for column, timestep in enumerate(timesteps):
        x = left + column * CELL_WIDTH + CELL_WIDTH // 2
        draw.line((x, top, x, top + 3), fill="black")
        draw.text((x, top + 5), str(timestep), fill="black", font=font, anchor="mt")
    right = left + len(timesteps) * CELL_WIDTH
    draw.text(((left + right) // 2, top + 22), "timestep", fill="black", font=font, anchor="mt")


def _draw_colorbar(draw, font, low: float, high: float, left: int, top: int, bottom: int) -> None:
    height = bottom - top
    for offset in range(height):
        colour = colormap(1 - offset / max(height - 1, 1))
        draw.line((left, top + offset, left + COLORBAR_WIDTH - 1, top + offset), fill=colour)
    draw.rectangle((left, top, left + COLORBAR_WIDTH - 1, bottom - 1), outline="black")
    for fraction in (0.0, 0.5, 1.0):
        y = round(bottom - 1 - fraction * (height - 1))
        draw.line((left + COLORBAR_WIDTH, y, left + COLORBAR_WIDTH + 3, y), fill="black")
        value = low + fraction * (high - low)
        draw.text((left + COLORBAR_WIDTH + 6, y), f"{value:.3f}", fill="black", font=font, anchor="lm")


def _fit(draw, font, text: str, width: int) -> str:
    """``text``, shortened with '…' until it fits in ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"
