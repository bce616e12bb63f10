"""What keeps ``stc`` quick to start: commands load on demand, parameters convert without pydantic.

* :class:`LazyGroup` imports a command's module only when that command runs: ``stc ls`` imports
  ``store.py`` and nothing of ``render.py`` (``stc.render.generation``) or ``exchange.py``
  (``stc.exchange.formats``). ``stc --help`` imports no command module at all; it lists :data:`COMMANDS`,
  whose one-line summaries tests/test_cli.py keeps equal to the commands' own help.
  ``stc CMD --help`` is the command's real help.
* typer (0.2x) converts every parameter value, an absent one included, through a pydantic
  ``TypeAdapter``: importing pydantic and building the adapters cost about 0.1 s per run.
  :class:`QuickConversion` converts the values the stc commands take (str, int, float, Path, an
  Enum choice, lists of str) as typer does and hands anything else (a malformed number, an
  unknown choice, an unreadable path) to typer's own conversion, so every result and every error
  message is typer's. Other typer versions (without that machinery) are left as they are.
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
from enum import Enum
from pathlib import Path

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
}


def command_name(info) -> str:
    """The name typer gives a registered command (its own, else the function's)."""
    return info.name or info.callback.__name__.lower().replace("_", "-")


class LazyGroup(TyperGroup):
    """The ``stc`` group: builds a command (and imports its module) when it is asked for."""

    _listing = False  # True while the group's own help is written: summaries from COMMANDS

    def parse_args(self, ctx, args):
        quicken(self.get_params(ctx))
        return super().parse_args(ctx, args)

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
        from ._base import app  # the Typer the command modules register on

        importlib.import_module(f"{__package__}.{COMMANDS[name][0]}")
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


# --------------------------------------------------------------------------- parameter conversion

_UNKNOWN = object()  # "not a value this module converts": typer's own conversion decides
_INT = re.compile(r"-?[0-9]{1,18}")
_FLOAT = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]{1,3})?")


def _plain_path_options(info) -> bool:
    """A Path parameter without typer's path checks beyond its default (readable when it exists)."""
    return (not info.exists and info.file_okay and info.dir_okay and not info.writable and info.readable
            and not info.resolve_path and not info.allow_dash and info.path_type is None)


def _convert(annotation, value, info, ctx):
    """``value`` as typer would convert it to ``annotation``, or _UNKNOWN."""
    kind = type(value)
    if annotation is str:
        return value if kind is str else _UNKNOWN
    if annotation is bool:
        return value if kind is bool else _UNKNOWN
    if annotation is int:
        if kind is int:
            return value
        return int(value) if kind is str and _INT.fullmatch(value) else _UNKNOWN
    if annotation is float:
        if kind is float:
            return value
        if kind is int:
            return float(value)
        return float(value) if kind is str and _FLOAT.fullmatch(value) else _UNKNOWN
    if annotation is Path:
        if not _plain_path_options(info):
            return _UNKNOWN
        if isinstance(value, Path):
            path = value
        elif kind is str and value and "\0" not in value:
            path = Path(value)
        else:
            return _UNKNOWN
        if os.path.exists(path) and not os.access(path, os.R_OK):
            return _UNKNOWN  # typer's message: "path '...' is not readable."
        return path
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        if not info.case_sensitive or getattr(ctx, "token_normalize_func", None) is not None:
            return _UNKNOWN
        if isinstance(value, annotation):
            return value
        if kind is str:
            for member in annotation:
                if str(member.value) == value:
                    return member
        return _UNKNOWN
    return _UNKNOWN


class QuickConversion:
    """Stands in for typer's per-parameter conversion object (its ``coerce`` method)."""

    def __init__(self, descriptor):
        self.descriptor = descriptor
        self.typers = None  # typer's own conversion, built when a value needs it

    def coerce(self, value, param, ctx):
        multiple = param.multiple or param.nargs == -1
        if value is None:
            return () if multiple else None
        descriptor = self.descriptor
        if multiple:
            item_type = getattr(descriptor.annotation, "__args__", (None,))[0]
            converted = _UNKNOWN
            if isinstance(value, (list, tuple)) and getattr(descriptor.annotation, "__origin__", None) is list:
                items = [_convert(item_type, item, descriptor.parameter_info, ctx) for item in value]
                converted = _UNKNOWN if any(item is _UNKNOWN for item in items) else items
        else:
            converted = _convert(descriptor.annotation, value, descriptor.parameter_info, ctx)
        if converted is not _UNKNOWN:
            return converted
        if self.typers is None:
            from typer._coercion import build_runtime_param

            self.typers = build_runtime_param(descriptor)
        return self.typers.coerce(value, param=param, ctx=ctx)


class QuickCommand(TyperCommand):
    """A command whose parameters convert with :class:`QuickConversion`."""

    def parse_args(self, ctx, args):
        quicken(self.get_params(ctx))
        return super().parse_args(ctx, args)


class QuickTyper(typer.Typer):
    """A Typer whose commands are :class:`QuickCommand` s unless they name another class."""

    def command(self, *args, cls=None, **kwargs):
        return super().command(*args, cls=cls or QuickCommand, **kwargs)


def quicken(params) -> None:
    """Give ``params`` (the help option included) :class:`QuickConversion` where typer would build
    pydantic adapters (a typer without them is left alone), once."""
    for param in params:
        descriptor = getattr(param, "type_descriptor", None)
        if descriptor is None or getattr(param, "_runtime_param", _UNKNOWN) is not None:
            continue
        info = descriptor.parameter_info
        if (descriptor.file_annotation is not None or info.parser is not None or info.min is not None
                or info.max is not None):
            continue
        param._runtime_param = QuickConversion(descriptor)
