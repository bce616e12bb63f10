"""The ``stc`` command line: parse, call the library, render with rich.

Only this package imports typer and rich. Heavy libraries (torch, diffusers, transformers) are
imported inside commands, so ``stc --help`` and ``stc ls`` answer instantly.
"""

from . import exchange, inspecting, render, store, train  # noqa: F401  (registers the commands)
from ._base import app


def main() -> None:
    app()


__all__ = ["app", "main"]
