"""The one atomic write: a file or folder staged beside its target, made durable, and swapped in
with one rename; the previous target stays until the swap has succeeded.

Every writer of stc goes through here: the registry's entries (:func:`commit_folder`), the files
and folders it gives the user (images, grids, plots, ``--force`` exports: ``stc.outputs.staged``),
the registry's listing cache, the shapes world's weights. The guarantee, crash-tested at every
point of the swap (``tests/test_atomic.py``): whenever the process dies, the target is the old one
or the new one, complete, never neither and never a mix. (Where the system cannot exchange two
folders atomically, the old folder waits in ``.old-…`` between two renames, and
``stc.store.storage.sweep`` puts it back after a crash.)
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_write(target: Path, is_dir: bool = False):
    """A temporary file (or folder) beside ``target`` to fill; when the block succeeds it is made
    durable (fsync), given the permissions a plain write would get (the umask), and swapped onto
    ``target``. On any failure (a full disk, Ctrl-C) the target is as it was and the temporary
    is gone."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        temporary = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-{os.getpid()}-", dir=target.parent))
    else:
        handle, name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
        os.close(handle)
        temporary = Path(name)
    try:
        yield temporary
        if is_dir:
            commit_folder(temporary, target)
        else:
            commit_file(temporary, target)
    finally:
        if temporary.is_dir() and not temporary.is_symlink():
            shutil.rmtree(temporary, ignore_errors=True)
        elif temporary.exists():
            temporary.unlink()


def write_file(path: Path, content: bytes | str) -> None:
    """Write ``path`` as a new file through :func:`atomic_write` (never in place: it may be a hard
    link shared with another entry)."""
    with atomic_write(path) as temporary:
        if isinstance(content, str):
            temporary.write_text(content, encoding="utf-8")
        else:
            temporary.write_bytes(content)


def commit_file(staging: Path, path: Path) -> None:
    """Make the file ``staging`` durable and rename it onto ``path`` (one atomic rename)."""
    os.chmod(staging, 0o666 & ~_umask())
    with open(staging, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(staging, path)
    fsync_path(path.parent)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def fsync_path(path: Path) -> None:
    with contextlib.suppress(OSError):  # directories cannot be fsynced everywhere
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder below ``folder`` (and ``folder`` itself)."""
    for directory, _, files in os.walk(folder):
        for file_name in files:
            with open(Path(directory) / file_name, "rb") as handle:
                os.fsync(handle.fileno())
        fsync_path(Path(directory))


def apply_umask(folder: Path) -> None:
    """mkdtemp makes private folders; give the entry the permissions of a normal write."""
    umask = _umask()
    for item in folder.rglob("*"):
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~umask)
    os.chmod(folder, 0o777 & ~umask)


def remove_tree(path: Path) -> None:
    """Delete a folder, or only the link when ``path`` is a symbolic link (never its target)."""
    if path.is_symlink():
        with contextlib.suppress(OSError):
            path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def _exchange(first: Path, second: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    import ctypes  # here, not at the top (nor hashlib below): stc ls and stc --help start faster

    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if function(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def commit_folder(staging: Path, path: Path) -> None:
    """Make ``staging`` durable, then swap it in at ``path``. Where the system can exchange two
    folders atomically, ``path`` is never absent; elsewhere the previous folder waits in
    ``.old-…`` for the moment between two renames and :func:`sweep` puts it back after a crash."""
    apply_umask(staging)
    fsync_tree(staging)
    if not path.exists():
        os.replace(staging, path)
    elif _exchange(staging, path):
        remove_tree(staging)  # now the previous entry (a link, if the entry was one)
    else:
        trash = Path(tempfile.mkdtemp(prefix=f".old-{path.name}-{os.getpid()}-", dir=path.parent))
        os.replace(path, trash / "entry")
        try:
            os.replace(staging, path)
        except BaseException:
            os.replace(trash / "entry", path)  # put the previous state back
            raise
        finally:
            shutil.rmtree(trash, ignore_errors=True)
    fsync_path(path.parent)


