"""stc inspect: a concept's token and bypass norms per (timestep, layer), and its ranks.

Terminal heatmaps with rich; the PNG and the numbers come from ``stc.render.inspection``. torch is
imported inside the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table
from rich.text import Text

from ._base import JsonOpt, app, command_env, err, handle_errors, open_registry, out, print_json
from .store import NameArg


def _cell_style(fraction: float) -> str:
    from ..render.inspection import colormap

    red, green, blue = colormap(fraction)
    text = "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 140 else "white"
    return f"{text} on rgb({red},{green},{blue})"


def _heatmap_table(title: str, grid, values: list[list[float]]) -> Table:
    from ..render.inspection import colour_scale, fraction_in, short_layer_name

    low, high = colour_scale(values)  # from 0, as in the plot: near-constant norms get nearly one colour
    numbers = out.width >= 16 + 6 * len(grid.timesteps)
    table = Table(title=title, title_justify="left", box=None, padding=(0, 1), collapse_padding=True,
                  header_style="bold", pad_edge=False)
    table.add_column("layer \\ t", no_wrap=True)
    for timestep in grid.timesteps:
        table.add_column(str(timestep), justify="right", no_wrap=True)
    for layer_name, row in zip(grid.layer_names, values):
        cells = [Text(f"{value:.3f}" if numbers else "  ", style=_cell_style(fraction_in(value, low, high)))
                 for value in row]
        table.add_row(Text(short_layer_name(layer_name)), *cells)
    return table


def _legend(values: list[list[float]]) -> Text:
    from ..render.inspection import colour_scale, value_range

    low, high = colour_scale(values)
    legend = Text("  legend: ")
    legend.append(f"{low:.3f} ")
    for step in range(16):
        legend.append("  ", style=_cell_style(step / 15))
    legend.append(f" {high:.3f}  (values from {value_range(values)[0]:.3f} to {value_range(values)[1]:.3f})")
    return legend


def _rank_table(report) -> Table:
    suggested = report.suggested_rank()
    has_bypass = report.ranks[0].bypass_mean is not None
    table = Table(title="Rank r vs full concept (cosine similarity)",
                  title_justify="left", box=None, header_style="bold", pad_edge=False)
    table.add_column("rank", justify="right")
    table.add_column("token mean", justify="right")
    table.add_column("token min", justify="right")
    if has_bypass:
        table.add_column("bypass mean", justify="right")
        table.add_column("bypass min", justify="right")
    for agreement in report.ranks:
        row = [str(agreement.rank), f"{agreement.token_mean:.4f}", f"{agreement.token_min:.4f}"]
        if has_bypass:
            row += [f"{agreement.bypass_mean:.4f}", f"{agreement.bypass_min:.4f}"]
        table.add_row(*row, style="bold green" if agreement.rank == suggested else "")
    return table


def _print_inspection(report) -> None:
    from ..render.inspection import AGREEMENT_THRESHOLD, rank_label, value_range

    grid = report.grid
    label = rank_label(grid.rank)
    out.print(_heatmap_table(f"<{report.name}> token embedding norm ({label})", grid, grid.token))
    out.print(_legend(grid.token))
    if grid.token_deviation is not None:
        low, high = value_range(grid.token_deviation)
        out.print(f"  NeTI rescales every token embedding to the initializer's norm; their direction varies: "
                  f"|e - mean| / |mean| from {low:.3f} to {high:.3f} (drawn by --plot).", highlight=False)
    if grid.bypass is not None:
        out.print()
        out.print(_heatmap_table(f"<{report.name}> bypass vector norm ({label})", grid, grid.bypass))
        out.print(_legend(grid.bypass))
    out.print()
    if not report.ranks:
        out.print(f"<{report.name}> has no ranks (no nested dropout): it renders the same at every --rank.",
                  highlight=False)
        return
    out.print(_rank_table(report))
    out.print(
        f"Suggested: --rank {report.suggested_rank()} (the smallest rank whose token embeddings keep a mean "
        f"cosine of {AGREEMENT_THRESHOLD} to the full concept). Lower ranks are coarser and easier to edit "
        "with the prompt; higher ranks are more faithful.",
        highlight=False,
    )


@app.command("inspect")
@handle_errors
def inspect_concept(
    ctx: typer.Context,
    name: NameArg,
    rank: Annotated[
        Optional[int], typer.Option("--rank", "-r", help="Rank of the heatmaps, from 1 to the concept's maximum."
                                    "  [default: full]")
    ] = None,
    steps: Annotated[
        int, typer.Option("--steps", "-k", help="Timesteps shown, evenly spaced from 999 down to 0.")
    ] = 10,
    as_json: JsonOpt = False,
    plot: Annotated[
        Optional[Path], typer.Option("--plot", help="Also write a PNG heatmap: the token embeddings' "
                                               "deviation from their mean and the bypass norms, side by side.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --plot file.")] = False,
) -> None:
    """Show the token and bypass norms per (timestep, layer) and how outputs change with rank."""
    from ..render import inspection

    registry = open_registry(command_env(ctx))
    concept = registry.load(name)
    if plot is not None:
        inspection.check_plot_path(plot, force)
    report = inspection.inspect_concept(concept, rank=rank, num_timesteps=steps)
    if plot is not None:
        inspection.save_norm_heatmaps(report.grid, plot, concept.name, force=force)
        err.print(Text(f"Wrote {plot}"), soft_wrap=True)
    if as_json:
        print_json({**report.to_dict(), "plot": str(plot) if plot else None})
    else:
        _print_inspection(report)


