"""Torch pickle files, read without running them and written so that every loader takes them.

``torch.load`` runs whatever code a pickle names, so stc never calls it on a file it did not
write. :func:`read_torch_file` reads both of torch's layouts itself: the zip archive (torch
1.6 and later: ``<folder>/data.pkl`` and its storages) and the legacy format (five pickles in a
row, then the storages' raw bytes). One restricted unpickler serves both: it rebuilds tensors
from the file's storages, accepts a handful of container types (``nn.ParameterDict``, the
original textual-inversion layout, becomes a plain dict) and whatever stand-ins a format adds
(the reference NeTI encoder classes, :mod:`stc.exchange.neti`), and refuses any other global
before it can run.

:func:`portable_torch_save` writes the zip layout with only the members the A1111 webui's safe
loader accepts (``data.pkl``, ``data/<n>``, ``version``), which ``torch.load`` and its
``weights_only=True`` read as well.

Why two pickle-safety paths exist in stc: single-file *model* checkpoints (``.ckpt``, gigabytes)
are read by torch's own ``torch.load(weights_only=True)`` (``stc.models.backbones.single_file``), which memory-maps
them and knows every tensor type a training framework pickles; files of the formats here are
small, and some name classes ``weights_only`` refuses (the reference's encoder), which the
stand-ins below read as inert data.
"""

from __future__ import annotations

import io
import pickle
import re
import types
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import BadInput


class UnsafeCheckpoint(BadInput):
    """A file whose pickle names code to run (anything but tensors, containers and a format's stand-ins)."""


class BadCheckpoint(BadInput):
    """A file that is not an intact torch file, or not one in the layout its format expects."""


# --------------------------------------------------------------------------- restricted unpickler


@dataclass(frozen=True)
class _StorageType:
    """What ``torch.FloatStorage`` and friends unpickle to: only their dtype matters."""

    name: str
    dtype: torch.dtype


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128, "UntypedStorage": torch.uint8,
}


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None) -> torch.Tensor:
    """``torch._utils._rebuild_tensor_v2`` on a storage read by this module (bounds checked)."""
    if not isinstance(storage, torch.Tensor):
        raise ValueError("a tensor record does not point at a storage")
    return torch.as_strided(storage, tuple(size), tuple(stride), int(storage_offset))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None) -> torch.Tensor:
    """``torch._utils._rebuild_parameter``: the plain tensor (stc wants no Parameters here)."""
    if not isinstance(data, torch.Tensor):
        raise ValueError("a parameter record does not hold a tensor")
    return data


class _ParameterDict(dict):
    """What ``torch.nn.ParameterDict`` unpickles to here: a plain dict of its tensors. The original
    textual-inversion layout (A1111, kohya) stores ``string_to_param`` as one; its pickled state
    is data (``_parameters``), so nothing runs to read it."""

    def __setstate__(self, state: Any) -> None:
        parameters = state.get("_parameters") if isinstance(state, dict) else None
        if not isinstance(parameters, dict):
            raise ValueError("a pickled ParameterDict without its _parameters")
        self.update(parameters)


ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
    ("torch.nn.modules.container", "ParameterDict"): _ParameterDict,
    **{(module, kind.__name__): kind for module in ("builtins", "__builtin__")
       for kind in (set, frozenset, dict, list, tuple)},
    **{("torch", name): _StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()},
}

StorageReader = Callable[[str, torch.dtype, int], torch.Tensor]  # (key, dtype, numel) -> 1-d tensor


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a torch file's object pickle, resolving only ``allowed`` globals; tensor storages
    come from ``read_storage`` (the zip archive's members, or a legacy file's data)."""

    def __init__(self, data: bytes, source: Path, read_storage: StorageReader | None = None,
                 allowed: dict | None = None):
        super().__init__(io.BytesIO(data))
        self.source, self.read_storage = source, read_storage
        self.allowed = allowed if allowed is not None else ALLOWED_GLOBALS
        self.storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        found = self.allowed.get((module, name))
        if found is None:
            raise UnsafeCheckpoint(
                f"{self.source} wants to run {module}.{name} when loaded; stc loads only tensors and "
                "data, so it is refused"
            )
        # A pickle's BUILD opcode sets state on what this returns (even on a frozen dataclass, through
        # its __dict__): hand out copies, so that no file changes how later files are read.
        if isinstance(found, types.FunctionType):
            found = types.FunctionType(found.__code__, found.__globals__, found.__name__, found.__defaults__,
                                       found.__closure__)
        elif isinstance(found, _StorageType):
            found = _StorageType(found.name, found.dtype)
        return found

    def persistent_load(self, pid: Any) -> torch.Tensor:
        """A storage record: ``('storage', type, key, location, numel)`` in zip files, with a sixth
        entry (a view of another storage, or None) in legacy ones, which also record each pickled
        module's class (one of the stand-ins ``find_class`` gave). Every location maps to the CPU."""
        if isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "module":  # legacy files: a module's class
            if isinstance(pid[1], type) and pid[1] in self.allowed.values():  # already through find_class
                return pid[1]
            raise ValueError(f"a module record of {str(pid[1])[:60]}")
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[4], int) and self.read_storage):
            raise ValueError(f"unknown persistent record {str(pid)[:80]}")
        storage_type, key, numel = pid[1], str(pid[2]), pid[4]
        if key not in self.storages:
            self.storages[key] = self.read_storage(key, storage_type.dtype, numel)
        storage = self.storages[key]
        view = pid[5] if len(pid) == 6 else None
        if view is None:
            return storage
        view_key, offset, size = view
        if not (isinstance(offset, int) and isinstance(size, int) and 0 <= offset <= offset + size <= numel):
            raise ValueError(f"a storage view {str(view)[:60]} outside its storage")
        return self.storages.setdefault(str(view_key), storage[offset : offset + size])


def _storage_from_bytes(raw: bytes, dtype: torch.dtype, numel: int, name: str, byteorder: str) -> torch.Tensor:
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(raw) != numel * itemsize:
        raise ValueError(f"{name} holds {len(raw)} bytes, not {numel} x {itemsize}")
    if not raw:
        return torch.empty(0, dtype=dtype)
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    if byteorder == "big" and itemsize > 1:
        data = data.view(-1, itemsize).flip(-1).contiguous().view(-1)
    return data.view(dtype)


def _archive_prefix(archive: zipfile.ZipFile, path: Path) -> str:
    pickles = [name for name in archive.namelist() if name.count("/") == 1 and name.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise BadCheckpoint(f"{path} is a zip archive but not a torch checkpoint: it has no single data.pkl")
    return pickles[0][: -len("data.pkl")]


def _byteorder(archive: zipfile.ZipFile, prefix: str, path: Path) -> str:
    name = prefix + "byteorder"
    if name not in archive.namelist():
        return "little"
    order = archive.read(name).decode("ascii", "replace").strip()
    if order not in ("little", "big"):
        raise BadCheckpoint(f"{path} declares an unknown byte order {order!r}")
    return order


def _read_archive(archive: zipfile.ZipFile, path: Path, allowed: dict) -> Any:
    prefix = _archive_prefix(archive, path)
    byteorder = _byteorder(archive, prefix, path)
    names = set(archive.namelist())

    def read_storage(key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        name = f"{prefix}data/{key}"
        if name not in names:
            raise ValueError(f"the archive has no {name} for a tensor it refers to")
        itemsize = torch.empty((), dtype=dtype).element_size()
        declared = archive.getinfo(name).file_size  # before reading: a small file may inflate hugely
        if declared != numel * itemsize:
            raise ValueError(f"{name} holds {declared} bytes, not {numel} x {itemsize}")
        return _storage_from_bytes(archive.read(name), dtype, numel, name, byteorder)

    return RestrictedUnpickler(archive.read(prefix + "data.pkl"), path, read_storage, allowed).load()

# The legacy format (torch.save before torch 1.6, or _use_new_zipfile_serialization=False): five
# pickles in a row (magic number, protocol version, system info, the object, its storage keys),
# then each storage's data as an int64 element count and the raw little-endian bytes.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

LEGACY_PROTOCOL = 1001


def _pickle_end(data: bytes, start: int) -> int:
    """Where the pickle starting at ``start`` ends, found by parsing its opcodes (nothing runs)."""
    import pickletools

    for opcode, _, position in pickletools.genops(io.BytesIO(data[start:])):
        if opcode.name == "STOP":
            return start + position + 1
    raise ValueError("a pickle without its end")


def _read_legacy(data: bytes, path: Path, allowed: dict) -> Any:
    header, position = [], 0
    for _ in range(3):  # magic number, protocol version, system info: plain data, no globals
        try:
            end = _pickle_end(data, position)
            header.append(RestrictedUnpickler(data[position:end], path).load())
        except Exception as exc:
            if header:
                raise
            raise BadCheckpoint(f"{path} is not a torch checkpoint (neither a zip archive nor the legacy "
                                "format)") from exc
        if header[0] != LEGACY_MAGIC or header[1:2] not in ([], [LEGACY_PROTOCOL]):
            raise BadCheckpoint(f"{path} is not a torch checkpoint (neither a zip archive nor the legacy format)")
        position = end
    object_start, object_end = position, _pickle_end(data, position)
    keys_end = _pickle_end(data, object_end)
    keys = RestrictedUnpickler(data[object_end:keys_end], path).load()
    if not (isinstance(keys, list) and all(isinstance(key, str) for key in keys)):
        raise ValueError("the storage key list is not a list of names")
    declared = {}  # key -> (dtype, numel), from the object's storage records (a first, inert pass)

    def note(key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        if numel < 0 or numel * torch.empty((), dtype=dtype).element_size() > len(data):
            raise ValueError(f"storage {key} claims {numel} elements, more than the file holds")
        declared[key] = (dtype, numel)
        return torch.zeros(numel, dtype=dtype)

    RestrictedUnpickler(data[object_start:object_end], path, note, allowed).load()
    storages, position = {}, keys_end
    for key in keys:
        if key not in declared:
            raise ValueError(f"storage {key} is listed but no tensor uses it")
        dtype, numel = declared[key]
        count = int.from_bytes(data[position : position + 8], "little", signed=True)
        if count != numel:
            raise ValueError(f"storage {key} holds {count} elements, not {numel}")
        size = numel * torch.empty((), dtype=dtype).element_size()
        raw = data[position + 8 : position + 8 + size]
        storages[key] = _storage_from_bytes(raw, dtype, numel, f"storage {key}", "little")
        position += 8 + size

    def stored(key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        if key not in storages:
            raise ValueError(f"the file has no data for storage {key}")
        return storages[key]

    return RestrictedUnpickler(data[object_start:object_end], path, stored, allowed).load()


def read_torch_file(path: str | Path, extra_globals: dict | None = None) -> Any:
    """The object a ``torch.save`` file holds (zip format, or the legacy format of torch < 1.6),
    rebuilt without running its pickle's code.

    Tensors come back on the CPU in their saved dtype and ``nn.ParameterDict`` as a plain dict;
    ``extra_globals`` maps further (module, name) pairs to the stand-ins a format reads them as.
    Raises :class:`UnsafeCheckpoint` for any other global and :class:`BadCheckpoint` for files
    that are not intact torch files.
    """
    allowed = {**ALLOWED_GLOBALS, **(extra_globals or {})}
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadCheckpoint(f"{path} cannot be read: {exc.strerror or exc}") from exc
    zip_format = data.startswith(b"PK\x03\x04")  # a zip archive's first local header
    try:
        if zip_format:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                return _read_archive(archive, path, allowed)
        return _read_legacy(data, path, allowed)
    except (UnsafeCheckpoint, BadCheckpoint):
        raise
    except Exception as exc:  # any malformed pickle or archive member: report, never crash
        kind = "zip-format" if zip_format else "legacy-format"
        raise BadCheckpoint(f"{path} is a damaged {kind} torch checkpoint: {type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------- writing

# The zip members a torch checkpoint needs: its pickle, its tensors' storages, its version. The
# A1111 webui's safe unpickler (modules/safe.py) refuses a file with any other member, and today's
# torch.save also writes .format_version, .storage_alignment, byteorder and .data/serialization_id.
_NEEDED_MEMBER = re.compile(r"data\.pkl|version|data/\d+")

_ZIP_ALIGNMENT = 64  # torch aligns storages to 64 bytes in the archive (its reader does not need it)

_PADDING_FIELD = 0x4246  # the zip "extra" field id torch's own writer pads with ("FB")


def portable_torch_save(obj, folder: str) -> bytes:
    """``torch.save(obj)`` as bytes whose archive holds only ``<folder>/data.pkl``,
    ``<folder>/data/<n>`` and ``<folder>/version``: every torch since 1.6 reads it
    (``torch.load(weights_only=True)`` included, little-endian being the default byte order)
    and so does the webui's default safe loader. Deterministic: the same object gives the same bytes."""
    import io
    import struct
    import zipfile

    import torch

    written = io.BytesIO()
    torch.save(obj, written)
    out = io.BytesIO()
    with zipfile.ZipFile(written) as source, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            member = info.filename.split("/", 1)[1]
            if not _NEEDED_MEMBER.fullmatch(member):
                continue
            entry = zipfile.ZipInfo(f"{folder}/{member}", date_time=(1980, 1, 1, 0, 0, 0))
            header = 30 + len(entry.filename.encode()) + 4  # local header, name, padding field's own header
            padding = -(out.tell() + header) % _ZIP_ALIGNMENT
            entry.extra = struct.pack("<HH", _PADDING_FIELD, padding) + b"Z" * padding
            target.writestr(entry, source.read(info))
    return out.getvalue()
