"""Truncation grids: one prompt (or several) at many ranks and seeds, in one labelled PNG.

Columns are ranks; rows are seeds, or (prompt, seed) pairs when several prompts are given
(prompt-major: every seed of prompt 1, then of prompt 2, ...). The column's rank is the
default rank of every concept in the prompt; a concept with an inline rank (``<mydog:4>``)
keeps it in every column.

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
        raise BadInput(f"--ranks {', '.join(map(str, bad))}: ranks start at 1 (1..128 for concepts trained by stc)")
    return ranks


def parse_seeds(text: str) -> list[int]:
    seeds = _int_list(text, "--seeds")
    bad = [seed for seed in seeds if not 0 <= seed <= MAX_SEED]
    if bad:
        raise BadInput(f"--seeds must be non-negative integers; got {', '.join(map(str, bad))}")
    return seeds


def read_prompts(path: Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInput(f"--prompts: {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"--prompts: cannot read {path}: {exc}") from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [line for line in prompts if line and not line.startswith("#")]
    if not prompts:
        raise BadInput(f"--prompts: {path} holds no prompts (one per line; blank lines and # comments are skipped)")
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


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def tile_images(rows: list[list], column_labels: list[str] | None = None, row_labels: list[str] | None = None,
                padding: int = 4):
    """Equally sized images laid out in rows on white, with an optional header row of column
    labels and a left column of (multi-line) row labels. Grids and training previews use it."""
    from PIL import Image, ImageDraw

    cell_width, cell_height = rows[0][0].size
    font = _font(max(10, min(28, cell_height // 10)))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def box(text: str) -> tuple[int, int]:
        left, top, right, bottom = measure.multiline_textbbox((0, 0), text, font=font)
        return right - left, bottom - top

    label_width = max(box(label)[0] for label in row_labels) + 2 * padding if row_labels else 0
    header_height = max(box(label)[1] for label in column_labels) + 2 * padding if column_labels else 0
    columns = len(rows[0])
    size = (label_width + columns * (cell_width + padding), header_height + len(rows) * (cell_height + padding))
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    for column, text in enumerate(column_labels or []):
        x = label_width + column * (cell_width + padding) + (cell_width - box(text)[0]) // 2
        draw.text((x, padding), text, fill="black", font=font)
    for row, label in enumerate(row_labels or []):
        y = header_height + row * (cell_height + padding) + (cell_height - box(label)[1]) // 2
        draw.multiline_text((padding, max(header_height, y)), label, fill="black", font=font)
    for row, images in enumerate(rows):
        for column, image in enumerate(images):
            canvas.paste(image, (label_width + column * (cell_width + padding),
                                 header_height + row * (cell_height + padding)))
    return canvas


def compose_grid(grid: Grid, padding: int = 4):
    """The labelled grid image: a header row of ranks ("r=8"), a left column of row labels."""
    from PIL import Image, ImageDraw

    cell_width, cell_height = grid.cells[0].rendered.image.size
    font = _font(max(10, min(28, cell_height // 10)))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_height = max(1, measure.multiline_textbbox((0, 0), "Ag\nAg", font=font)[3]
                      - measure.multiline_textbbox((0, 0), "Ag", font=font)[3])
    chars_per_line = max(12, cell_width // max(1, int(font.getlength("x"))))
    max_lines = max(1, cell_height // line_height)
    labels = [fit_label(*grid.row_label(row), chars_per_line, max_lines) for row in range(len(grid.rows))]
    rows = [[cell.rendered.image for cell in grid.cells if cell.row == row] for row in range(len(grid.rows))]
    return tile_images(rows, [f"r={rank}" for rank in grid.ranks], labels, padding)


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
        raise BadInput(f"--out must name a .png file, got {path}")
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
        record = {
            "prompts": grid.prompts, "seeds": grid.seeds, "ranks": grid.ranks,
            "images": [str(image.relative_to(self.path.parent)) for image in images],
            **{key: value for key, value in first.items() if key not in ("prompt", "seed", "concepts")},
        }
        info = PngInfo()
        info.add_text("parameters", a1111_parameters(first))  # the first cell's, like A1111 grids
        info.add_text("stc-grid", json.dumps(record, sort_keys=True))
        with staged(self.path) as temporary:
            compose_grid(grid).save(temporary, format="PNG", pnginfo=info)
        return SavedGrid(path=self.path, folder=self.folder, images=images)


def save_grid(grid: Grid, path: Path) -> SavedGrid:
    """Write the grid PNG at a free name near ``path`` and every cell into a folder beside it."""
    return GridOutput(path).finish(grid)
