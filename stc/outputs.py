"""Files stc writes for the user (images, grids, plots, exports): checked before the work starts,
never overwritten unless asked, written whole or not at all.

The one home of that rule: ``stc gen`` and ``stc grid`` take free names (:func:`free_path`),
``stc inspect --plot`` and ``stc export`` refuse an existing target unless ``--force``
(:func:`refuse_existing`), and every writer checks its folder first (:func:`check_folder`) and
writes through :func:`staged`, beside the target, moved into place when complete.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .atomic import atomic_write
from .errors import BadInput


def check_folder(folder: Path, flag: str = "--out") -> Path:
    """``folder`` exists (or is created) and takes a new file: a real write, before any work, so
    a file in its place, permissions, read-only file systems and quotas fail at once."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise BadInput(f"{flag} {folder} is a file; give a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".stc-probe-", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise BadInput(f"cannot write into {folder}: {exc.strerror or exc}; choose another {flag}") from exc
    return folder


def _taken(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def free_path(folder: Path, stem: str, suffix: str = ".png", with_folder: bool = False) -> Path:
    """``folder/stem.png``, or ``stem-1.png``, ``stem-2.png``… if taken: never overwrite. With
    ``with_folder`` the folder ``folder/stem`` (where a grid keeps its cells) must be free too."""
    candidate = folder / f"{stem}{suffix}"
    counter = 1
    while _taken(candidate) or (with_folder and _taken(candidate.with_suffix(""))):
        candidate = folder / f"{stem}-{counter}{suffix}"
        counter += 1
    return candidate


def refuse_existing(paths: list[Path], force: bool, flag: str = "--out") -> None:
    """An existing target is refused unless ``force``."""
    existing = [path for path in paths if _taken(path)]
    if existing and not force:
        raise BadInput(f"{existing[0]} exists already; pass --force to replace it, or choose another {flag}")


staged = atomic_write  # written beside the target, fsynced, swapped in whole (stc/atomic.py)
