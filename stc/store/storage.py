"""Files and folders that survive crashes: locks, checks, sweeping up after killed writers; the
one atomic write itself is ``stc/atomic.py``'s.

A folder is written complete in a hidden staging folder beside its target, fsynced, then
swapped in (``atomic.commit_folder``); a failure at any point leaves the previous folder intact.
Weights files are checked from their safetensors header (JSON) without torch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from ..atomic import fsync_path, remove_tree

# --------------------------------------------------------------------------- checks


def sha256_file(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete safetensors file (header and data extent), or None.

    Reads only the header, so it needs no torch and catches truncated files cheaply.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                return f"truncated: {size} bytes, shorter than a safetensors header"
            header_size = int.from_bytes(prefix, "little")
            if header_size > size - 8:
                return f"truncated: its header claims {header_size} bytes but the file has {size}"
            header = json.loads(handle.read(header_size))
        extents = [_tensor_extent(key, entry) for key, entry in header.items() if key != "__metadata__"]
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError) as exc:
        return f"not a safetensors file ({exc})"
    expected = 8 + header_size + max(extents, default=0)
    if size < expected:
        return f"truncated: {size} of {expected} bytes"
    if size > expected:
        return f"followed by {size - expected} unexpected trailing bytes"
    return None


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
                "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _tensor_extent(key: str, entry) -> int:
    """The end offset of one tensor's data, after checking its header entry is coherent
    (ValueError otherwise): a hostile header may lie about shapes and offsets."""
    offsets, shape = entry["data_offsets"], entry["shape"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(value) is int for value in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise ValueError(f"tensor {key!r} has bad data offsets {str(offsets)[:60]}")
    if not (isinstance(shape, list) and all(type(value) is int and value >= 0 for value in shape)):
        raise ValueError(f"tensor {key!r} has a bad shape {str(shape)[:60]}")
    size = _DTYPE_BYTES.get(entry.get("dtype"))
    if size is None:
        raise ValueError(f"tensor {key!r} has a dtype stc does not know: {str(entry.get('dtype'))[:20]}")
    if math.prod(shape) * size != offsets[1] - offsets[0]:
        raise ValueError(f"tensor {key!r}: its shape {shape} does not fit its {offsets[1] - offsets[0]} bytes")
    return offsets[1]


def folder_files(folder: Path) -> list[tuple[str, int]]:
    """(path relative to ``folder``, size in bytes) of every regular file below it, sorted."""
    found = []
    for directory, _, files in os.walk(folder):
        for file_name in files:
            full = Path(directory) / file_name
            with contextlib.suppress(OSError):
                if full.is_file() and not full.is_symlink():
                    found.append((full.relative_to(folder).as_posix(), full.stat().st_size))
    return sorted(found)


def folder_size(folder: Path) -> int:
    return sum(size for _, size in folder_files(folder))


# --------------------------------------------------------------------------- locks


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive advisory lock on ``path`` (created if needed), released on exit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open_lock_file(path) as handle:
        try:
            import fcntl
        except ImportError:  # Windows: best effort
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def open_lock_file(path: Path):
    """``path`` opened for appending, created if needed; a symbolic link there is refused
    (ELOOP), never followed: a lock file must not create or change a file outside the registry."""
    flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
    return os.fdopen(os.open(path, flags, 0o666), "a+")


def try_lock(handle) -> bool:
    """Take an exclusive lock on the open file ``handle`` without waiting; False if it is held."""
    try:
        import fcntl
    except ImportError:  # Windows: best effort
        return True
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def with_header_metadata(content: bytes, **metadata: str) -> bytes:
    """A safetensors file's bytes with ``metadata`` set in its header (tensors untouched)."""
    header_size = int.from_bytes(content[:8], "little")
    header = json.loads(content[8 : 8 + header_size])
    header["__metadata__"] = {**header.get("__metadata__", {}), **metadata}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format pads headers to 8 bytes
    return len(encoded).to_bytes(8, "little") + encoded + content[8 + header_size :]


# --------------------------------------------------------------------------- atomic folders


def clone_tree(source: Path, target: Path, hard_links: bool) -> None:
    """Copy the files of ``source`` into the existing folder ``target`` (hard links when asked
    and possible: a rename must not double the disk use). Symlinks are not followed."""
    for directory, _, files in os.walk(source):
        relative = Path(directory).relative_to(source)
        (target / relative).mkdir(parents=True, exist_ok=True)
        for file_name in files:
            origin, copy = Path(directory) / file_name, target / relative / file_name
            if origin.is_symlink():
                continue
            if hard_links:
                try:
                    os.link(origin, copy)
                    continue
                except OSError:
                    pass
            shutil.copy2(origin, copy)


# Hidden work folders carry their writer's pid: ``.tmp-<name>-<pid>-<random>`` (a write being
# built), ``.old-…`` (the previous entry during a swap), ``.trash-…`` (an entry being deleted).
WORK_FOLDER = re.compile(r"\.(tmp|old|trash)-(?P<name>.+)-(?P<pid>\d+)-[^-]+")
STALE_WITHOUT_PID = 600  # seconds: work folders written before pids were recorded


@contextlib.contextmanager
def staging_folder(parent: Path, name: str):
    """A private hidden folder in ``parent``; removed unless committed (moved away)."""
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-{os.getpid()}-", dir=parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def discard_folder(path: Path) -> None:
    """Remove a folder: first move it out of sight (atomic), then delete the files."""
    trash = Path(tempfile.mkdtemp(prefix=f".trash-{path.name}-{os.getpid()}-", dir=path.parent))
    os.replace(path, trash / "entry")
    fsync_path(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _stale(item: Path) -> bool:
    """Was the work folder ``item`` left by a writer that is gone?"""
    match = WORK_FOLDER.fullmatch(item.name)
    if match is not None:
        return not _alive(int(match["pid"]))
    try:  # written before pids were recorded: stale once old
        return time.time() - item.stat().st_mtime > STALE_WITHOUT_PID
    except OSError:
        return False


def leftovers(parent: Path) -> list[Path]:
    """Work folders in ``parent`` whose writer is gone (killed mid-write)."""
    if not parent.is_dir():
        return []
    with os.scandir(parent) as entries:  # no stat for the (many) entries that are not work folders
        found = sorted(entry.name for entry in entries if entry.name.startswith((".tmp-", ".old-", ".trash-"))
                       and (entry.is_dir() or entry.is_symlink()))
    return [parent / name for name in found if _stale(parent / name)]


def sweep(parent: Path) -> list[Path]:
    """Clean up after writers that were killed: a previous entry caught between two renames is
    put back where its folder is missing; everything else is deleted. Returns what was swept."""
    swept = []
    for item in leftovers(parent):
        match = WORK_FOLDER.fullmatch(item.name)
        entry = item / "entry"
        if (item.name.startswith(".old-") and match and not item.is_symlink() and entry.is_dir()
                and not (parent / match["name"]).exists()):
            os.replace(entry, parent / match["name"])
        remove_tree(item)  # a planted link is removed, never followed
        swept.append(item)
    if swept:
        fsync_path(parent)
    return swept
