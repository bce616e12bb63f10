"""Truncation grids: one prompt (or several) at many ranks and seeds, in one labelled PNG.

Columns are ranks; rows are seeds, or (prompt, seed) pairs when several prompts are given
(prompt-major: every seed of prompt 1, then of prompt 2, ...). The column's rank is the
default rank of every concept in the prompt; a concept with an inline rank (``<mydog:4>``)
keeps it in every column.

The picture: a title says what it shows (the prompt, the concept(s), the model, steps, CFG,
sampler, seeds); cells smaller than MIN_CELL px (the shapes world's 32 px) are scaled up by a
whole factor with nearest neighbour, cells larger than MAX_CELL px (SDXL's 1024) are shown
scaled down to it, with full-size files in the folder beside it; the title says which.

Speed: each (prompt, rank) is encoded once for the whole schedule and shared by all seeds;
cells are rendered rank by rank in batches of ``settings.batch_size`` (the seeds of one rank
form one batch when they fit), and cells that would be identical (a prompt without concepts,
or whose concepts all have inline ranks) are rendered once.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInput
from ..outputs import free_path, staged
from ..settings import MAX_SEED
from .generation import ProgressCallback, RenderedImage, RenderRequest, RenderSettings
from .pngmeta import a1111_parameters, save_png, slug
from .prompts import parse_prompt

DEFAULT_SEEDS = (0, 1, 2, 3)
ROW_LABEL_CHARS = 60  # a prompt label is cut to this many characters


# --------------------------------------------------------------------------- inputs


def _int_list(text: str, flag: str) -> list[int]:
    """'0,1,2' or '0-3' or '0-3,8' -> ints (duplicates dropped, order kept)."""
    values: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            if "-" in part[1:]:
                low, high = (int(v) for v in part.split("-", 1))
                if high < low:
                    raise ValueError
                values.extend(range(low, high + 1))
            else:
                values.append(int(part))
        except ValueError:
            raise BadInput(f"{flag}: {part!r} is not a number or a range like 0-3 (e.g. {flag} 1,2,4,8)") from None
    if not values:
        raise BadInput(f"{flag} is empty; give a comma-separated list such as {flag} 1,2,4,8")
    return list(dict.fromkeys(values))


def parse_ranks(text: str) -> list[int]:
    """Positive ranks; whether each fits its concepts is checked when the grid's requests resolve."""
    ranks = _int_list(text, "--ranks")
    bad = [rank for rank in ranks if rank < 1]
    if bad:
        raise BadInput(f"ranks {', '.join(map(str, bad))} (--ranks): ranks start at 1 (1..128 for concepts trained "
                       "by stc)")
    return ranks


def parse_seeds(text: str) -> list[int]:
    seeds = _int_list(text, "--seeds")
    bad = [seed for seed in seeds if not 0 <= seed <= MAX_SEED]
    if bad:
        raise BadInput(f"seeds (--seeds) must be non-negative integers; got {', '.join(map(str, bad))}")
    return seeds


def read_prompts(path: Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInput(f"prompts (--prompts): {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"prompts (--prompts): cannot read {path}: {exc}") from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [line for line in prompts if line and not line.startswith("#")]
    if not prompts:
        raise BadInput(f"prompts (--prompts): {path} holds no prompts (one per line; blank lines and # comments are "
                       "skipped)")
    for prompt in prompts:
        parse_prompt(prompt)  # bad inline ranks fail before anything loads
    return prompts


# --------------------------------------------------------------------------- rendering


@dataclass
class GridCell:
    row: int
    column: int
    prompt_index: int
    prompt: str
    seed: int
    rank: int
    rendered: RenderedImage


@dataclass
class Grid:
    prompts: list[str]
    seeds: list[int]
    ranks: list[int]
    cells: list[GridCell]  # row-major

    @property
    def rows(self) -> list[tuple[int, int]]:
        """(prompt index, seed) of every row."""
        return [(index, seed) for index in range(len(self.prompts)) for seed in self.seeds]

    def row_label(self, row: int) -> tuple[str | None, str | None]:
        """(prompt, "seed N") of a row; the prompt only with several prompts, the seed only with several seeds."""
        prompt_index, seed = self.rows[row]
        prompt = self.prompts[prompt_index] if len(self.prompts) > 1 else None
        if prompt is not None and len(prompt) > ROW_LABEL_CHARS:
            prompt = prompt[: ROW_LABEL_CHARS - 1] + "…"
        seed_text = f"seed {seed}" if len(self.seeds) > 1 or prompt is None else None
        return prompt, seed_text


def fit_label(prompt: str | None, seed_text: str | None, chars_per_line: int, max_lines: int) -> str:
    """Wrap a row label into at most ``max_lines`` lines; the seed line always survives."""
    lines = textwrap.wrap(prompt, width=chars_per_line) if prompt else []
    budget = max(1, max_lines - (1 if seed_text else 0))
    if len(lines) > budget:
        lines = lines[:budget]
        lines[-1] = lines[-1][: max(1, chars_per_line - 1)].rstrip() + "…"
    if seed_text:
        lines.append(seed_text)
    return "\n".join(lines)


def grid_requests(prompts: list[str], ranks: list[int], seeds: list[int]) -> list[RenderRequest]:
    """Every cell's request, rank-major within a prompt: the seeds of one rank are consecutive,
    so they share batches."""
    if not prompts or not ranks or not seeds:
        raise BadInput("a grid needs at least one prompt, one rank and one seed")
    return [RenderRequest(prompt, seed, rank) for prompt in prompts for rank in ranks for seed in seeds]


def render_grid(
    renderer, prompts: list[str], ranks: list[int], seeds: list[int], settings: RenderSettings,
    progress: ProgressCallback | None = None, on_cell=None,
) -> Grid:
    """Render every (prompt, seed) row at every rank; ``on_cell(cell)`` is called for each cell as
    soon as its image exists (identical cells, rendered once, each get their call)."""
    from .generation import resolve_request

    requests = grid_requests(prompts, ranks, seeds)
    order = [(p, rank, seed) for p in range(len(prompts)) for rank in ranks for seed in seeds]
    positions = {(p, seed): row for row, (p, seed) in enumerate((p, s) for p in range(len(prompts)) for s in seeds)}
    waiting: dict[tuple, list[tuple]] = {}  # image key -> the cells (prompt, rank, seed) that show it
    for key, request in zip(order, requests):
        waiting.setdefault(resolve_request(request, settings, renderer.concepts).image_key, []).append(key)
    cells: dict[tuple, GridCell] = {}
    for rendered in renderer.iter_render(requests, settings, progress):
        for p, rank, seed in waiting[rendered.key]:
            cell = GridCell(positions[p, seed], ranks.index(rank), p, prompts[p], seed, rank, rendered)
            cells[p, rank, seed] = cell
            if on_cell is not None:
                on_cell(cell)
    ordered = [cells[p, rank, seed] for p in range(len(prompts)) for seed in seeds for rank in ranks]
    return Grid(prompts=list(prompts), seeds=list(seeds), ranks=list(ranks), cells=ordered)


# --------------------------------------------------------------------------- composing

MIN_CELL = 128  # a smaller image is scaled up by a whole factor (nearest neighbour) to at least this
MAX_CELL = 512  # a larger one is shown scaled down to this (its file in the folder keeps its full size)
MIN_FONT, MAX_FONT = 14, 28  # label font size in pixels, whatever the model's image size


@dataclass(frozen=True)
class GridLayout:
    """How a grid shows cells of ``image_size``: at ``cell_size``, with labels of ``font_size`` px."""

    image_size: tuple[int, int]  # a rendered image's (width, height)
    cell_size: tuple[int, int]  # the same image in the grid
    font_size: int
    title_font_size: int

    @property
    def scale_note(self) -> str:
        """How the cells are shown, for the title: '' when at their own size."""
        (width, height), (shown_width, shown_height) = self.image_size, self.cell_size
        if shown_width > width:
            return f"{width}x{height} px images shown {shown_width // width}x larger (nearest neighbour)"
        if shown_width < width:
            return f"{width}x{height} px images shown at {shown_width}x{shown_height} (full size in the folder)"
        return ""


def grid_layout(width: int, height: int) -> GridLayout:
    """The layout for rendered images of ``width`` x ``height``: images under MIN_CELL px are
    scaled up by the smallest whole factor that reaches it, images over MAX_CELL px are scaled
    down to it (so a 1024 px SDXL grid stays a few megapixels), others are shown as they are."""
    if width < 1 or height < 1:
        raise BadInput(f"a grid cell must have a size, got {width}x{height}")
    longest = max(width, height)
    if longest < MIN_CELL:
        factor = -(-MIN_CELL // longest)
        cell = (width * factor, height * factor)
    elif longest > MAX_CELL:
        cell = (max(1, round(width * MAX_CELL / longest)), max(1, round(height * MAX_CELL / longest)))
    else:
        cell = (width, height)
    font = max(MIN_FONT, min(MAX_FONT, max(cell) // 9))
    return GridLayout(image_size=(width, height), cell_size=cell, font_size=font, title_font_size=font + 4)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _shown(image, size: tuple[int, int]):
    """``image`` at ``size``: nearest neighbour up (crisp pixels), Lanczos down."""
    from PIL import Image

    if image.size == tuple(size):
        return image
    method = Image.Resampling.NEAREST if size[0] >= image.size[0] else Image.Resampling.LANCZOS
    return image.resize(size, method)


def _wrap(text: str, font, width: int) -> list[str]:
    """``text`` in lines no wider than ``width`` pixels; a word wider than that is broken."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and font.getlength(lines[-1] + " " + word) <= width:
            lines[-1] += " " + word
            continue
        lines.append("")
        for char in word:
            if lines[-1] and font.getlength(lines[-1] + char) > width:
                lines.append("")
            lines[-1] += char
    return lines


def tile_images(rows: list[list], column_labels: list[str] | None = None, row_labels: list[str] | None = None,
                padding: int = 4, title: list[str] | None = None, layout: GridLayout | None = None):
    """Equally sized images laid out in rows on white, with an optional title (lines, wrapped to
    the grid's width), a header row of column labels and a left column of (multi-line) row
    labels. ``layout`` gives the shown cell size and the fonts (default: the images as they are,
    labels scaled to them). Grids and training previews use it."""
    from PIL import Image, ImageDraw

    if layout is None:
        width, height = rows[0][0].size
        font_size = max(10, min(28, height // 10))
        layout = GridLayout((width, height), (width, height), font_size, font_size + 4)
    cell_width, cell_height = layout.cell_size
    font, title_font = _font(layout.font_size), _font(layout.title_font_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def box(text: str, face=font) -> tuple[int, int]:
        left, top, right, bottom = measure.multiline_textbbox((0, 0), text, font=face)
        return right - left, bottom - top

    def bottom(text: str, face=font) -> int:
        return measure.multiline_textbbox((0, 0), text, font=face)[3]

    label_width = max(box(label)[0] for label in row_labels) + 2 * padding if row_labels else 0
    # the text's bottom below where it is drawn (its box starts below the line's top): no overlap with the cells
    header_height = max(bottom(label) for label in column_labels) + 2 * padding if column_labels else 0
    columns = len(rows[0])
    grid_width = label_width + columns * (cell_width + padding)
    title_lines = [line for text in title or [] for line in _wrap(text, title_font, grid_width - 2 * padding)]
    title_text = "\n".join(title_lines)
    title_height = bottom(title_text, title_font) + 3 * padding if title_lines else 0
    top = title_height + header_height
    canvas = Image.new("RGB", (grid_width, top + len(rows) * (cell_height + padding)), "white")
    draw = ImageDraw.Draw(canvas)
    if title_lines:
        draw.multiline_text((padding, padding), title_text, fill="black", font=title_font)
    for column, text in enumerate(column_labels or []):
        x = label_width + column * (cell_width + padding) + (cell_width - box(text)[0]) // 2
        draw.text((x, title_height + padding), text, fill="black", font=font)
    for row, label in enumerate(row_labels or []):
        y = top + row * (cell_height + padding) + (cell_height - box(label)[1]) // 2
        draw.multiline_text((padding, max(top, y)), label, fill="black", font=font)
    for row, images in enumerate(rows):
        for column, image in enumerate(images):
            canvas.paste(_shown(image, layout.cell_size), (label_width + column * (cell_width + padding),
                                                          top + row * (cell_height + padding)))
    return canvas


def _seed_text(seeds: list[int]) -> str:
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"seeds {seeds[0]}-{seeds[-1]}"
    return f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"


def grid_title(grid: Grid, layout: GridLayout | None = None) -> list[str]:
    """What the grid shows, for its title: the prompt (or how many), the concept(s), the model,
    steps, CFG, sampler, seeds, and how the cells are scaled."""
    first = grid.cells[0].rendered.metadata
    names = list(dict.fromkeys(name for cell in grid.cells for name in cell.rendered.metadata.get("concepts", {})))
    if len(grid.prompts) == 1:
        what = f"“{grid.prompts[0]}”"
    else:
        what = f"{len(grid.prompts)} prompts (one row per prompt and seed)"
    concepts = f"concept{'s' if len(names) != 1 else ''} {', '.join(names) if names else '(none)'}"
    steps = first.get("steps")
    settings = [f"{steps} step{'' if steps == 1 else 's'}", f"CFG {first.get('cfg')}", str(first.get("scheduler")),
                _seed_text(grid.seeds)]
    lines = [what, f"{concepts} · model {first.get('base_model')}", " · ".join(settings)]
    if layout is not None and layout.scale_note:
        lines.append(layout.scale_note)
    return lines


def compose_grid(grid: Grid, padding: int = 4):
    """The labelled grid image: a title (prompt, concepts, model, settings), a header row of
    ranks ("rank 8"), a left column of row labels; cells scaled by :func:`grid_layout`."""
    from PIL import Image, ImageDraw

    layout = grid_layout(*grid.cells[0].rendered.image.size)
    cell_width, cell_height = layout.cell_size
    font = _font(layout.font_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_height = max(1, measure.multiline_textbbox((0, 0), "Ag\nAg", font=font)[3]
                      - measure.multiline_textbbox((0, 0), "Ag", font=font)[3])
    chars_per_line = max(12, cell_width // max(1, int(font.getlength("x"))))
    max_lines = max(1, cell_height // line_height)
    labels = [fit_label(*grid.row_label(row), chars_per_line, max_lines) for row in range(len(grid.rows))]
    rows = [[cell.rendered.image for cell in grid.cells if cell.row == row] for row in range(len(grid.rows))]
    return tile_images(rows, [f"rank {rank}" for rank in grid.ranks], labels, padding, grid_title(grid, layout), layout)


# --------------------------------------------------------------------------- saving


@dataclass
class SavedGrid:
    path: Path  # the labelled grid PNG
    folder: Path  # the individual images
    images: list[Path]  # row-major, like Grid.cells


def default_grid_path(prompts: list[str], prompts_file: Path | None = None) -> Path:
    name = slug(prompts_file.stem) if prompts_file else slug(parse_prompt(prompts[0]).text)
    return Path("stc-out") / f"grid-{name}.png"


def free_grid_path(path: Path) -> Path:
    """``path``, or ``stem-1.png``... such that neither the PNG nor its folder exists yet."""
    if path.suffix.lower() != ".png":
        raise BadInput(f"out (--out) must name a .png file, got {path}")
    return free_path(path.parent, path.stem, path.suffix, with_folder=True)


class GridOutput:
    """Where a grid is written: its cells as they are rendered (``write_cell``), then the labelled
    grid (``finish``). The PNG and its folder get a free name near ``path``; nothing is overwritten."""

    def __init__(self, path: Path):
        self.path = free_grid_path(Path(path))
        self.folder = self.path.with_suffix("")
        self.written: dict[tuple[int, int], Path] = {}  # (row, column) -> the cell's file

    def write_cell(self, cell: GridCell) -> Path:
        """``<grid stem>/p{prompt}-s{seed}-r{rank}.png``, with the cell's own metadata."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = save_png(cell.rendered, self.folder, stem=f"p{cell.prompt_index}-s{cell.seed}-r{cell.rank}")
        self.written[cell.row, cell.column] = path
        return path

    def finish(self, grid: Grid) -> SavedGrid:
        """Write the cells not yet written and the grid PNG, which carries the first cell's
        ``parameters`` and an ``stc-grid`` JSON chunk."""
        from PIL.PngImagePlugin import PngInfo

        for cell in grid.cells:
            if (cell.row, cell.column) not in self.written:
                self.write_cell(cell)
        images = [self.written[cell.row, cell.column] for cell in grid.cells]
        first = grid.cells[0].rendered.metadata
        layout = grid_layout(*grid.cells[0].rendered.image.size)
        record = {
            "prompts": grid.prompts, "seeds": grid.seeds, "ranks": grid.ranks,
            "title": grid_title(grid, layout), "cell_size": list(layout.cell_size),
            "images": [str(image.relative_to(self.path.parent)) for image in images],
            **{key: value for key, value in first.items() if key not in ("prompt", "seed", "concepts")},
        }
        info = PngInfo()
        info.add_text("parameters", a1111_parameters(first))  # the first cell's, like A1111 grids
        info.add_text("stc-grid", json.dumps(record, sort_keys=True))
        with staged(self.path) as temporary:
            compose_grid(grid).save(temporary, format="PNG", pnginfo=info)
        return SavedGrid(path=self.path, folder=self.folder, images=images)

