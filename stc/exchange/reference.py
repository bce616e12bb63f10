"""The reference NeTI checkpoint format, read without executing pickled code.

The reference implementation (NeuralTextualInversion/NeTI) saves a concept as two
``torch.save`` pickles:

- ``<name>-mapper.pt``: ``{"state_dict", "cfg", "encoder"}``. ``state_dict`` holds
  ``input_layer.*`` and the identical ``net.0.*`` (one layer registered twice), ``net.1/2/4/5.*``
  and ``output_layer.0.*``; a CPU run adds ``encoder.w``, a CUDA run does not. ``encoder`` is a
  pickled ``models.positional_encoding.NeTIPositionalEncoding`` holding the Fourier matrix ``w``
  (or a ``BasicEncoder`` when ``use_positional_encoding`` was off); ``cfg`` is
  ``pyrallis.encode(RunConfig)``, a plain dict.
- ``<name>-learned_embeds.bin``: ``{placeholder: tensor[768]}``.

``torch.load`` runs whatever code a pickle names, so this module never calls it. A restricted
unpickler reads the zip archive itself: it rebuilds tensors from the archive's raw storages,
accepts a handful of container types, and turns the reference's two encoder classes into inert
stand-ins that only record their pickled state. Any other global is refused before it can run.
The mapper is then converted to stc's layout and built through
:func:`stc.store.conceptio.mapper_from_state`, like every other mapper stc runs.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import BadInput
from ..method.mapper import MapperConfig, NeTIMapper

# The reference's ModelConfig defaults (training/config.py), for checkpoints whose cfg is partial.
REFERENCE_MODEL_DEFAULTS: dict[str, Any] = {
    "use_nested_dropout": True,
    "nested_dropout_prob": 0.5,
    "target_norm": None,
    "use_positional_encoding": True,
    "pe_sigmas": {"sigma_t": 0.03, "sigma_l": 2.0},
    "num_pe_time_anchors": 10,
    "output_bypass": True,
}
INPUT_LAYER_KEYS = ("input_layer.weight", "input_layer.bias", "net.0.weight", "net.0.bias")
MAPPER_KEYS = tuple(f"{layer}.{param}" for layer in ("net.1", "net.2", "net.4", "net.5", "output_layer.0")
                    for param in ("weight", "bias"))
ENCODER_W_KEY = "encoder.w"


class UnsafeCheckpoint(BadInput):
    """A checkpoint whose pickle names code to run (anything but tensors, containers and NeTI classes)."""


class BadCheckpoint(BadInput):
    """A file that is not a readable torch zip checkpoint, or not one in the reference NeTI layout."""


class UnsupportedReference(BadInput):
    """A well-formed reference checkpoint trained with an option stc's mapper does not have."""


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


class PickledModule:
    """An inert stand-in for a pickled reference ``nn.Module``: it records its state, nothing else."""

    kind = "module"

    def __setstate__(self, state: Any) -> None:
        self.state = state


class PickledPositionalEncoding(PickledModule):
    """Stands in for ``models.positional_encoding.NeTIPositionalEncoding``."""

    kind = "positional"


class PickledBasicEncoder(PickledModule):
    """Stands in for ``models.positional_encoding.BasicEncoder``."""

    kind = "basic"


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


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
    ("models.positional_encoding", "NeTIPositionalEncoding"): PickledPositionalEncoding,
    ("models.positional_encoding", "BasicEncoder"): PickledBasicEncoder,
    **{(module, kind.__name__): kind for module in ("builtins", "__builtin__")
       for kind in (set, frozenset, dict, list, tuple)},
    **{("torch", name): _StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _ParameterDict(dict):
    """What ``torch.nn.ParameterDict`` unpickles to here: a plain dict of its tensors. The original
    textual-inversion layout (A1111, kohya) stores ``string_to_param`` as one; its pickled state
    is data (``_parameters``), so nothing runs to read it."""

    def __setstate__(self, state: Any) -> None:
        parameters = state.get("_parameters") if isinstance(state, dict) else None
        if not isinstance(parameters, dict):
            raise ValueError("a pickled ParameterDict without its _parameters")
        self.update(parameters)


_ALLOWED_GLOBALS[("torch.nn.modules.container", "ParameterDict")] = _ParameterDict

StorageReader = Callable[[str, torch.dtype, int], torch.Tensor]  # (key, dtype, numel) -> 1-d tensor


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a torch checkpoint's object pickle, resolving only ``_ALLOWED_GLOBALS``; tensor
    storages come from ``read_storage`` (the zip archive's members, or a legacy file's data)."""

    def __init__(self, data: bytes, source: Path, read_storage: StorageReader | None = None):
        super().__init__(io.BytesIO(data))
        self.source, self.read_storage = source, read_storage
        self.storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise UnsafeCheckpoint(
                f"{self.source} wants to run {module}.{name} when loaded; stc loads only tensors and "
                "the reference's NeTI classes, so it is refused"
            )
        return found

    def persistent_load(self, pid: Any) -> torch.Tensor:
        """A storage record: ``('storage', type, key, location, numel)`` in zip files, with a sixth
        entry (a view of another storage, or None) in legacy ones, which also record each pickled
        module's class (one of the stand-ins ``find_class`` gave). Every location maps to the CPU."""
        if isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "module":  # legacy files: a module's class
            if isinstance(pid[1], type) and pid[1] in _ALLOWED_GLOBALS.values():  # already through find_class
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


def _read_archive(archive: zipfile.ZipFile, path: Path) -> Any:
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

    return RestrictedUnpickler(archive.read(prefix + "data.pkl"), path, read_storage).load()


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


def _read_legacy(data: bytes, path: Path) -> Any:
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

    RestrictedUnpickler(data[object_start:object_end], path, note).load()
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

    return RestrictedUnpickler(data[object_start:object_end], path, stored).load()


def read_torch_checkpoint(path: str | Path) -> Any:
    """The object a ``torch.save`` file holds (zip format, or the legacy format of torch < 1.6),
    rebuilt without running its pickle's code.

    Tensors come back on the CPU in their saved dtype; the reference's encoder classes come back
    as :class:`PickledModule` stand-ins and ``nn.ParameterDict`` as a plain dict. Raises
    :class:`UnsafeCheckpoint` for any other global and :class:`BadCheckpoint` for files that are
    not intact torch checkpoints.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadCheckpoint(f"{path} cannot be read: {exc.strerror or exc}") from exc
    zip_format = data.startswith(b"PK\x03\x04")  # a zip archive's first local header
    try:
        if zip_format:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                return _read_archive(archive, path)
        return _read_legacy(data, path)
    except (UnsafeCheckpoint, BadCheckpoint):
        raise
    except Exception as exc:  # any malformed pickle or archive member: report, never crash
        kind = "zip-format" if zip_format else "legacy-format"
        raise BadCheckpoint(f"{path} is a damaged {kind} torch checkpoint: {type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------- reference layout


@dataclass
class ReferenceCheckpoint:
    """A reference ``<name>-mapper.pt``, read and checked but not yet converted.

    ``encoder``: ``kind`` ("positional" or "basic"), ``w`` (the Fourier matrix, or None),
    ``sigma_t``, ``sigma_l``, ``num_w`` (None where the pickle lacks them).
    """

    state_dict: dict[str, torch.Tensor]
    cfg: dict
    encoder: dict
    path: Path

    @property
    def placeholder_token(self) -> str | None:
        return self._data_field("placeholder_token")

    @property
    def super_category_token(self) -> str | None:
        return self._data_field("super_category_token")

    def _data_field(self, name: str) -> str | None:
        data = self.cfg.get("data")
        value = data.get(name) if isinstance(data, dict) else None
        return value if isinstance(value, str) else None


def _tensor_dict(value: Any, what: str, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(value, Mapping) or not value:
        raise BadCheckpoint(f"{path}: {what} is a {type(value).__name__}, not a dict of tensors")
    for key, tensor in value.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise BadCheckpoint(f"{path}: {what} has an entry {str(key)[:60]!r} that is not a named tensor")
    return dict(value)


def _encoder_fields(encoder: Any, path: Path) -> dict:
    if not isinstance(encoder, PickledModule):
        raise BadCheckpoint(f"{path}: 'encoder' is a {type(encoder).__name__}, not the reference's "
                            "NeTIPositionalEncoding")
    state = getattr(encoder, "state", None)
    if not isinstance(state, dict):
        raise BadCheckpoint(f"{path}: the pickled {type(encoder).__name__} has no attribute state")
    fields = {"kind": encoder.kind, "w": None, "sigma_t": state.get("sigma_t"), "sigma_l": state.get("sigma_l"),
              "num_w": state.get("num_w")}
    for holder in (state, state.get("_parameters") or {}, state.get("_buffers") or {}):
        if isinstance(holder, dict) and holder.get("w") is not None:
            fields["w"] = holder["w"]
            break
    w = fields["w"]
    if w is not None and not (isinstance(w, torch.Tensor) and w.ndim == 2 and w.shape[1] == 2):
        raise BadCheckpoint(f"{path}: the encoder's w is not an N x 2 matrix")
    return fields


def _check_keys(state_dict: dict, kind: str, path: Path) -> None:
    required = MAPPER_KEYS + (INPUT_LAYER_KEYS if kind == "positional" else ())
    missing = [key for key in required if key not in state_dict]
    unexpected = sorted(set(state_dict) - set(required) - {ENCODER_W_KEY})
    if missing or unexpected:
        problems = ([f"lacks {', '.join(missing)}"] if missing else []) + (
            [f"has unexpected {', '.join(unexpected[:8])}"] if unexpected else [])
        raise BadCheckpoint(f"{path} is not a reference NeTI mapper: its state_dict {' and '.join(problems)}")


def read_reference_mapper(path: str | Path) -> ReferenceCheckpoint:
    """Read a reference ``<name>-mapper.pt`` (restricted unpickler) and check its structure."""
    path = Path(path)
    content = read_torch_checkpoint(path)
    if not isinstance(content, dict):
        raise BadCheckpoint(f"{path} holds a {type(content).__name__}, not the reference's "
                            "{state_dict, cfg, encoder} dict")
    missing = [key for key in ("state_dict", "cfg", "encoder") if key not in content]
    if missing:
        raise BadCheckpoint(f"{path} is not a reference NeTI mapper: it lacks {', '.join(missing)}")
    if not isinstance(content["cfg"], dict):
        raise BadCheckpoint(f"{path}: cfg is a {type(content['cfg']).__name__}, not a dict")
    encoder = _encoder_fields(content["encoder"], path)
    state_dict = _tensor_dict(content["state_dict"], "state_dict", path)
    _check_keys(state_dict, encoder["kind"], path)
    return ReferenceCheckpoint(state_dict=state_dict, cfg=content["cfg"], encoder=encoder, path=path)


def read_learned_embeds(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a reference ``<name>-learned_embeds.bin``: ``{placeholder: embedding}``."""
    path = Path(path)
    return _tensor_dict(read_torch_checkpoint(path), "the learned embeddings file", path)


# --------------------------------------------------------------------------- conversion


def _model_cfg(ckpt: ReferenceCheckpoint) -> dict:
    model = ckpt.cfg.get("model", {})
    if not isinstance(model, dict):
        raise BadCheckpoint(f"{ckpt.path}: cfg['model'] is not a dict")
    return {**REFERENCE_MODEL_DEFAULTS, **model}


def _sigmas(ckpt: ReferenceCheckpoint, model: dict) -> tuple[float, float]:
    """The sigmas ``w`` was drawn with: the pickled encoder's, else the cfg's ``pe_sigmas``."""
    if ckpt.encoder["sigma_t"] is not None and ckpt.encoder["sigma_l"] is not None:
        return float(ckpt.encoder["sigma_t"]), float(ckpt.encoder["sigma_l"])
    sigmas = model["pe_sigmas"]
    if isinstance(sigmas, Mapping):
        return float(sigmas["sigma_t"]), float(sigmas["sigma_l"])
    sigma_t, sigma_l = sigmas
    return float(sigma_t), float(sigma_l)


def _refuse_basic_encoder(ckpt: ReferenceCheckpoint) -> None:
    if ckpt.encoder["kind"] == "basic" or _model_cfg(ckpt)["use_positional_encoding"] is False:
        raise UnsupportedReference(
            f"{ckpt.path} was trained with use_positional_encoding off (its encoder is a BasicEncoder); "
            "stc's mapper always uses the Fourier positional encoding, so it cannot import this concept"
        )


def reference_mapper_config(ckpt: ReferenceCheckpoint) -> MapperConfig:
    """The :class:`~stc.method.mapper.MapperConfig` that reproduces ``ckpt``'s reference mapper."""
    _refuse_basic_encoder(ckpt)
    model = _model_cfg(ckpt)
    if model["target_norm"] is None:
        raise UnsupportedReference(
            f"{ckpt.path} was trained without output normalisation (cfg model.target_norm is None); "
            "stc's mapper always scales its output to the initializer word's norm"
        )
    sd = ckpt.state_dict
    out_rows = sd["output_layer.0.weight"].shape[0]
    num_anchors, in_cols = sd["net.0.weight"].shape
    try:
        bypass, time_anchors = bool(model["output_bypass"]), int(model["num_pe_time_anchors"])
        num_w = int(ckpt.encoder["num_w"] or in_cols // 2)
        if (bypass and out_rows % 2) or in_cols != 2 * num_w or num_anchors % time_anchors:
            raise ValueError(f"output {out_rows} rows (bypass {bypass}), input {num_anchors} x {in_cols} "
                             f"for {num_w} Fourier features and {time_anchors} time anchors")
        sigma_t, sigma_l = _sigmas(ckpt, model)
        return MapperConfig(
            text_width=out_rows // 2 if bypass else out_rows, norm_scale=float(model["target_norm"]),
            num_layers=num_anchors // time_anchors, num_time_anchors=time_anchors, num_fourier_features=num_w,
            sigma_t=sigma_t, sigma_l=sigma_l, hidden_dim=sd["net.1.weight"].shape[0], bypass=bypass,
            nested_dropout=bool(model["use_nested_dropout"]),
            nested_dropout_prob=float(model["nested_dropout_prob"]),
        )
    except (ValueError, TypeError, KeyError, ZeroDivisionError) as exc:
        raise BadCheckpoint(f"{ckpt.path}: its cfg does not fit its weights: {exc}") from exc


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def reference_state_dict(ckpt: ReferenceCheckpoint) -> dict[str, torch.Tensor]:
    """``ckpt``'s weights under stc's names: the duplicate ``input_layer.*`` dropped after checking
    it is ``net.0.*``, and ``encoding.w`` from the pickled encoder (cross-checked with
    ``encoder.w`` where the state_dict has it)."""
    _refuse_basic_encoder(ckpt)
    sd, path = ckpt.state_dict, ckpt.path
    for param in ("weight", "bias"):
        if not _same(sd[f"input_layer.{param}"], sd[f"net.0.{param}"]):
            raise BadCheckpoint(f"{path}: input_layer.{param} differs from net.0.{param}; the reference "
                                "registers one layer under both names, so the file is inconsistent")
    w, saved_w = ckpt.encoder["w"], sd.get(ENCODER_W_KEY)
    if w is None and saved_w is None:
        raise BadCheckpoint(f"{path} has no Fourier matrix w (neither in its encoder nor as {ENCODER_W_KEY})")
    if w is not None and saved_w is not None and not _same(w, saved_w):
        raise BadCheckpoint(f"{path}: the pickled encoder's w differs from state_dict['{ENCODER_W_KEY}']")
    state = {key: value for key, value in sd.items()
             if not key.startswith("input_layer.") and key != ENCODER_W_KEY}
    state["encoding.w"] = w if w is not None else saved_w
    return state


def mapper_from_reference(ckpt: ReferenceCheckpoint) -> NeTIMapper:
    """A :class:`~stc.method.mapper.NeTIMapper` (eval, fp32, CPU) with ``ckpt``'s weights, built through
    :func:`stc.store.conceptio.mapper_from_state`. ``mapper(t, l, rank=r)`` is the reference's
    ``mapper(t, l, truncation_idx=r)`` (rank 128 or None: no truncation; like the reference, a
    mapper trained without nested dropout ignores the rank)."""
    from ..store.conceptio import mapper_from_state

    config = reference_mapper_config(ckpt)
    return mapper_from_state(config, reference_state_dict(ckpt), source=str(ckpt.path))
