"""The ``stc`` command line: parse, call the library, render with rich.

Only this package imports typer and rich. Each command's module (``exchange``, ``inspecting``,
``render``, ``store``, ``train``) is imported when that command runs (``_lazy.py``), and heavy
libraries (torch, diffusers, transformers) inside the commands, so ``stc --help`` and ``stc ls``
answer instantly.
"""

from ._base import app


def main() -> None:
    app()


__all__ = ["app", "main"]
