"""What keeps ``stc`` quick to start: commands load on demand (the hf CLI does the same).

:class:`LazyGroup` imports a command's module only when that command runs: ``stc ls`` imports
``store.py`` and nothing of ``render.py`` (``stc.render.generation``) or ``exchange.py``
(``stc.exchange.formats``). ``stc --help`` imports no command module at all; it lists
:data:`COMMANDS`, whose one-line summaries tests/test_cli.py keeps equal to the commands' own
help. ``stc CMD --help`` is the command's real help. Only typer's public API is used; its
parameter conversion (pydantic, about 0.1 s of a command's start) is its own
(``BENCHMARKS.md``, "CLI start-up").
"""

from __future__ import annotations

import difflib
import importlib

import typer
import typer.main
from typer.core import TyperCommand, TyperGroup

# name -> (module in stc.cli, the first paragraph of its help), in the order `stc --help` lists them
COMMANDS: dict[str, tuple[str, str]] = {
    "export": ("exchange", "Export a concept for other tools; prints the written paths. Formats (each keeps and "
                           "loses):"),
    "import": ("exchange", "Import a concept into the registry; pickled files are read without running their code."),
    "ls": ("store", "List the concepts in the registry (damaged or foreign entries are reported on stderr)."),
    "show": ("store", "Show a concept's metadata: base model, layers, training, weights check, files, previews."),
    "rm": ("store", "Delete concepts (shows what goes and its size, then asks unless --yes)."),
    "mv": ("store", "Rename a concept; its token follows the name (<old> becomes <new>)."),
    "cp": ("store", "Copy a concept under a new name (its weights are verified first)."),
    "inspect": ("inspecting", "Show the token and bypass norms per (timestep, layer) and how outputs change with "
                              "rank."),
    "gen": ("render", "Render images of a prompt; prints the paths of the PNG files (never overwrites)."),
    "grid": ("render", "Render a truncation grid (ranks x seeds, or ranks x prompts); prints the grid's path."),
    "train": ("train", "Train a concept from a folder of photos and save it in the registry."),
    "eval": ("evaluating", "Measure a concept at several ranks (CLIP image/text similarity, the shapes checker) and "
                           "suggest a rank."),
    "comfyui": ("comfyui", "Install stc's ComfyUI nodes into a ComfyUI folder (custom_nodes/stc_neti) and export "
                           "concepts into its models/stc_concepts; prints the written paths."),
}


def command_name(info) -> str:
    """The name typer gives a registered command (its own, else the function's)."""
    return info.name or info.callback.__name__.lower().replace("_", "-")


class LazyGroup(TyperGroup):
    """The ``stc`` group: builds a command (and imports its module) when it is asked for."""

    _listing = False  # True while the group's own help is written: summaries from COMMANDS

    def list_commands(self, ctx) -> list[str]:
        return list(dict.fromkeys([*COMMANDS, *super().list_commands(ctx)]))

    def get_command(self, ctx, cmd_name: str):
        if self._listing and cmd_name in COMMANDS:  # a summary line, without importing the command's module
            return TyperCommand(name=cmd_name, help=COMMANDS[cmd_name][1])
        command = super().get_command(ctx, cmd_name)
        if command is None and cmd_name in COMMANDS:
            command = self._load(cmd_name)
        return command

    def _load(self, name: str):
        module = importlib.import_module(f"{__package__}.{COMMANDS[name][0]}")
        app = module.app  # the Typer the command modules register on (_base's, which builds this group)
        for info in app.registered_commands:
            if command_name(info) == name:
                command = typer.main.get_command_from_info(
                    info, pretty_exceptions_short=app.pretty_exceptions_short, rich_markup_mode=app.rich_markup_mode,
                )
                self.commands[name] = command
                return command
        return None

    def format_help(self, ctx, formatter) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False

    def resolve_command(self, ctx, args):
        """typer suggests close names from the commands built so far; suggest from all of them."""
        try:
            return super().resolve_command(ctx, args)
        except Exception as error:
            message = getattr(error, "message", None)
            if (isinstance(message, str) and message.startswith("No such command") and "Did you mean" not in message
                    and args and getattr(self, "suggest_commands", True)):
                matches = difflib.get_close_matches(args[0], self.list_commands(ctx))
                if matches:
                    error.message = f"{message.rstrip('.')}. Did you mean {', '.join(map(repr, matches))}?"
            raise
