"""Registry commands: stc ls, show, rm, mv, cp (``inspect`` is in ``inspecting.py``).

None of them imports torch.
"""

from __future__ import annotations

import fnmatch
import json
import sys
from enum import Enum
from typing import Annotated, Optional

import typer
from rich.control import strip_control_codes
from rich.markup import escape
from rich.text import Text

from ..errors import ConceptNotFound, ConfirmationRequired
from ._base import (
    JsonOpt,
    ManyArgumentsCommand,
    app,
    command_env,
    err,
    handle_errors,
    open_registry,
    out,
    print_json,
)

NameArg = Annotated[
    str, typer.Argument(help="Concept name (used in prompts as <name>).", metavar="NAME", show_default=False)
]
FIRST_CONCEPT_HINT = "Train one:\n  stc train ./photos --name mydog --init dog"


# --------------------------------------------------------------------------- helpers


def _human(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)


def _warn(message: str) -> None:
    err.print(f"[yellow]Warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def _matches(name: str, pattern: str | None) -> bool:
    """Glob match (``dog*``); a pattern without wildcards matches anywhere in the name."""
    if not pattern:
        return True
    if any(char in pattern for char in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern in name


def _steps_text(record: dict) -> str:
    done, planned = record["steps_done"], record["steps_planned"]
    if done is None:
        return "-"
    if not record["complete"]:
        return f"{done}/{planned} (incomplete)"
    return str(done)


# --------------------------------------------------------------------------- ls


class SortKey(str, Enum):
    name = "name"
    created = "created"
    size = "size"


def _sorted_records(records: list[dict], sort: SortKey) -> list[dict]:
    if sort is SortKey.created:
        return sorted(records, key=lambda record: (record["created"], record["name"]), reverse=True)
    if sort is SortKey.size:
        return sorted(records, key=lambda record: (-record["size"], record["name"]))
    return sorted(records, key=lambda record: record["name"])


LS_COLUMNS = (("name", "<"), ("token", "<"), ("base model", "<"), ("steps", ">"), ("rank max", ">"),
              ("size", ">"), ("created", "<"))


def _ls_rows(records: list[dict]) -> list[tuple[str, ...]]:
    return [(
        record["name"], record["token"], record["base_model"], _steps_text(record),
        str(record["rank_max"] if record["rank_max"] is not None else "-"), _human(record["size"]),
        record["created"][:10],
    ) for record in records]


def _print_ls_table(records: list[dict]) -> None:
    """Aligned plain columns (fast for thousands of concepts; long values widen their column)."""
    rows = _ls_rows(records)
    header = tuple(title for title, _ in LS_COLUMNS)
    widths = [max(len(row[index]) for row in (header, *rows)) for index in range(len(header))]

    def line(row) -> str:
        cells = [f"{value:{align}{width}}" for value, (_, align), width in zip(row, LS_COLUMNS, widths)]
        return "  ".join(cells).rstrip()

    # one Text with a style span per line: the same output as joining a Text per line, built
    # without a thousand Text objects
    lines = [strip_control_codes(line(row)) for row in (header, *rows)]
    styles = ["bold"] + ["" if record["complete"] and not record.get("weights_problem") else "yellow"
                         for record in records]
    text, start = Text("\n".join(lines)), 0
    for plain, style in zip(lines, styles):
        text.stylize(style, start, start + len(plain))
        start += len(plain) + 1
    out.print(text, soft_wrap=True, highlight=False)


@app.command("ls")
@handle_errors
def ls(
    ctx: typer.Context,
    pattern: Annotated[
        Optional[str],
        typer.Argument(help="Only names matching this glob (e.g. 'dog*'); plain text matches anywhere in the name.",
                       metavar="PATTERN"),
    ] = None,
    as_json: JsonOpt = False,
    sort: Annotated[
        SortKey, typer.Option("--sort", help="name (A-Z), created (newest first) or size (largest first).")
    ] = SortKey.name,
) -> None:
    """List the concepts in the registry (damaged or foreign entries are reported on stderr)."""
    from ..store.listing import listing

    registry = open_registry(command_env(ctx))
    records = []
    for name, record, problem in listing(registry):
        if not _matches(name, pattern):
            continue
        if problem is not None:
            _warn(f"{name}: {problem}")
            continue
        if record["weights_problem"]:
            _warn(f"{name}: its weights file is {record['weights_problem']}; see stc show {name}, or remove it: "
                  f"stc rm {name}")
        records.append(record)
    from ..store.storage import leftovers

    for path in leftovers(registry.concepts_dir):
        _warn(f"{path.name} was left by an interrupted write; the next write to the registry cleans it up")
    for path, reason in registry.foreign_entries():
        if _matches(path.name, pattern):
            _warn(f"{path} is not a concept: {reason}")
    records = _sorted_records(records, sort)
    if as_json:
        print_json(records)
    elif records:
        _print_ls_table(records)
    if not records:
        _hint_when_empty(registry, pattern)


def _hint_when_empty(registry, pattern: str | None) -> None:
    if pattern and registry.names():
        err.print(Text(f"No concept matches {pattern!r}. Run 'stc ls' to see them all."))
    elif not registry.names():
        err.print(Text(f"No concepts in {registry.concepts_dir} yet. {FIRST_CONCEPT_HINT}"))


# --------------------------------------------------------------------------- show


def _show_record(registry, concept) -> dict:
    from ..store.registry import check_weights, preview_paths
    from ..store.storage import folder_files

    check = check_weights(concept)
    files = [{"path": path, "size": size} for path, size in folder_files(concept.path)]
    return {
        "name": concept.name,
        "token": concept.token,
        "path": str(concept.path),
        "base_model": concept.base_model,
        "initializer": concept.initializer,
        "text_width": concept.text_width,
        "layer_names": concept.layer_names,
        "base_fingerprint": concept.base_fingerprint or None,
        "fits": _fits(concept),
        "rank_max": concept.rank_max,
        "steps_done": concept.steps_done,
        "steps_planned": concept.steps_planned,
        "complete": concept.complete,
        "final_loss": concept.metrics.final_loss,
        "training": concept.training.to_dict(),
        "metrics": concept.metrics.to_dict(),
        "mapper": concept.mapper,
        "created": concept.created,
        "stc_version": concept.stc_version,
        "schema_version": concept.schema_version,
        "migrated_from": concept.migrated_from,
        "weights": {
            "file": str(concept.weights_path),
            "sha256": concept.weights_sha256 or None,
            "sha256_on_disk": check.sha256,
            "verified": check.ok and bool(concept.weights_sha256),
            "problem": check.problem,
        },
        "files": files,
        "size": sum(file["size"] for file in files),
        "previews": [str(path) for path in preview_paths(concept.path)],
        "extra": concept.extra,
        "eval": concept.evaluation or None,
    }


def _fits(concept) -> str:
    """Which base models a concept works with, in words."""
    from ..models.backbones import label_of_widths

    family = label_of_widths(concept.encoder_widths)
    exact = f"; exactly {concept.base_model}" + (f" (token embeddings {concept.base_fingerprint})"
                                                  if concept.base_fingerprint else "")
    return (f"base models with a {concept.text_width}-wide text encoder and these {len(concept.layer_names)} "
            f"cross-attention layers ({family}){exact}; other fine-tunes of it render with a note")


def _compact(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return f"[{len(value)} items]" if len(value) > 6 else ", ".join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value, default=str)
    return str(value)


def _key_values(title: str, rows: list[tuple[str, object]]) -> None:
    from rich.table import Table  # here, not at the top: stc ls prints plain columns

    out.print(Text(title, style="bold"))
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim", no_wrap=True)
    grid.add_column(overflow="fold")
    for key, value in rows:
        grid.add_row(Text(f"  {key}"), value if isinstance(value, Text) else Text(_compact(value)))
    out.print(grid)


def _weights_status(weights: dict) -> Text:
    if weights["verified"]:
        return Text("yes", style="green")
    if weights["problem"] and weights["sha256"] is None and weights["sha256_on_disk"]:
        return Text("unknown (no sha256 recorded)", style="yellow")
    return Text(f"NO: {weights['problem']}", style="bold red")


def _print_show(record: dict) -> None:
    steps = _steps_text(record)
    schema = str(record["schema_version"])
    if record["migrated_from"] is not None:
        schema += f" (file is schema {record['migrated_from']}; updated on the next write)"
    _key_values(record["token"], [
        ("path", record["path"]),
        ("base model", record["base_model"]),
        ("fits", record["fits"]),
        ("initializer", record["initializer"]),
        ("text width", record["text_width"]),
        ("rank max", record["rank_max"]),
        ("steps", steps),
        ("final loss", record["final_loss"] if record["final_loss"] is not None else "-"),
        ("created", record["created"]),
        ("stc version", record["stc_version"]),
        ("schema", schema),
    ])
    _key_values("weights", [
        ("file", record["weights"]["file"]),
        ("sha256", record["weights"]["sha256"] or "-"),
        ("verifies", _weights_status(record["weights"])),
    ])
    _key_values(f"layers ({len(record['layer_names'])})", list(enumerate(record["layer_names"])))
    _key_values("training", sorted(record["training"].items()))
    if record["metrics"]:
        _key_values("metrics", sorted(record["metrics"].items()))
    _key_values(f"files ({_human(record['size'])})", [(file["path"], _human(file["size"])) for file in record["files"]])
    if record["previews"]:
        _key_values("previews", [(str(index), path) for index, path in enumerate(record["previews"], 1)])
    if record.get("eval"):
        _print_eval(record["eval"])
    if record["extra"]:
        _key_values("other keys (kept as they are)", sorted(record["extra"].items()))


def _print_eval(evaluation: dict) -> None:
    """The latest stc eval: its suggested rank and what it measured."""
    rows = [("suggested rank", evaluation.get("suggested_rank") if evaluation.get("suggested_rank") is not None
             else "-"), ("finished", evaluation.get("finished")), ("model", evaluation.get("model")),
            ("prompts", f"{evaluation.get('prompts')} ({evaluation.get('prompt_count')} prompts), seeds "
                        f"{_compact(evaluation.get('seeds') or [])}, {evaluation.get('steps')} steps"),
            ("by", " and ".join(evaluation.get("suggested_by") or []) or "-"), ("folder", evaluation.get("folder"))]
    _key_values("latest eval (stc eval)", rows)


@app.command("show")
@handle_errors
def show(ctx: typer.Context, name: NameArg, as_json: JsonOpt = False) -> None:
    """Show a concept's metadata: base model, layers, training, weights check, files, previews."""
    registry = open_registry(command_env(ctx))
    concept = registry.load(name)
    record = _show_record(registry, concept)
    if not record["weights"]["verified"] and record["weights"]["problem"]:
        _warn(record["weights"]["problem"])
    if as_json:
        print_json(record)
    else:
        _print_show(record)


# --------------------------------------------------------------------------- rm, mv, cp


def _stdin_is_interactive() -> bool:
    """Whether a confirmation can be asked (tests replace this)."""
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False


def _removal_plan(registry, names: list[str]) -> list[dict]:
    from ..errors import StcError

    plan, missing = [], []
    for name in dict.fromkeys(names):  # unique, in the order given
        registry.refuse_if_training(name, "remove")  # first: a run may not have saved its first step yet
        try:
            path = registry.folder_of(name)
        except ConceptNotFound as exc:
            missing.append(str(exc))
            continue
        try:
            registry.load(name)
            state = "ok"
        except StcError:
            state = "damaged"
        plan.append({"name": name, "path": str(path), "size": registry.size(name), "state": state})
    if missing:
        raise ConceptNotFound(" ".join(missing) + " Nothing was deleted.")
    return plan


@app.command("rm", cls=ManyArgumentsCommand)
@handle_errors
def rm(
    ctx: typer.Context,
    names: Annotated[list[str], typer.Argument(help="Concept names to delete.", metavar="NAME", show_default=False)],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Delete without asking.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show what would be deleted.")] = False,
) -> None:
    """Delete concepts (shows what goes and its size, then asks unless --yes)."""
    from rich.table import Table

    registry = open_registry(command_env(ctx))
    plan = _removal_plan(registry, names)
    total = sum(entry["size"] for entry in plan)
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("name", "size", "path"):
        table.add_column(column, justify="right" if column == "size" else "left", no_wrap=column == "name")
    for entry in plan:
        label = entry["name"] + (" (damaged)" if entry["state"] != "ok" else "")
        table.add_row(label, _human(entry["size"]), Text(entry["path"]))
    out.print(table)
    if dry_run:
        err.print(f"Dry run: would delete {len(plan)} concept(s), {_human(total)}; nothing deleted.", highlight=False)
        return
    if not yes:
        _confirm_removal(len(plan), total)
    for entry in plan:
        registry.remove(entry["name"])
        err.print(f"Removed {entry['name']} ({_human(entry['size'])})", highlight=False)


def _confirm_removal(count: int, total: int) -> None:
    if not _stdin_is_interactive():
        raise ConfirmationRequired(
            "not deleting: there is no terminal to confirm on; pass --yes to delete without asking "
            "(or --dry-run to only see the plan)"
        )
    if not typer.confirm(f"Delete {count} concept(s), {_human(total)}?", default=False, err=True):
        err.print("Nothing deleted.")
        raise typer.Exit(1)


@app.command("mv")
@handle_errors
def mv(ctx: typer.Context, old: NameArg,
       new: Annotated[str, typer.Argument(help="New name (the token becomes <new>).", metavar="NEW")]) -> None:
    """Rename a concept; its token follows the name (<old> becomes <new>)."""
    concept = open_registry(command_env(ctx)).rename(old, new)
    err.print(f"Renamed <{old}> to {concept.token}; use {concept.token} in prompts now.", highlight=False)
    out.print(Text(str(concept.path)), soft_wrap=True)


@app.command("cp")
@handle_errors
def cp(ctx: typer.Context, source: NameArg,
       target: Annotated[str, typer.Argument(help="Name of the copy.", metavar="DST")]) -> None:
    """Copy a concept under a new name (its weights are verified first)."""
    concept = open_registry(command_env(ctx)).copy(source, target)
    err.print(f"Copied <{source}> to {concept.token}.", highlight=False)
    out.print(Text(str(concept.path)), soft_wrap=True)
