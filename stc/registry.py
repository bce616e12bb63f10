"""The on-disk concept store.

Layout: ``$STC_HOME/concepts/<name>/{concept.yaml, mapper.safetensors}`` plus whatever
training adds (``metrics.jsonl``, ``preview.png``, ``previews/``, ``checkpoint/``).

Every write builds a complete entry in a hidden staging folder beside the target, fsyncs it,
then swaps it in with ``os.replace``, under a per-concept lock (renames and copies also take
a registry-wide lock). A write that fails half-way leaves the previous state intact. Only
writing operations create folders. ``concept.yaml`` carries a ``schema_version``: older
schemas are migrated on load, newer ones are refused, and keys this version does not know
are kept and written back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

from . import __version__
from .errors import (
    BadInput,
    ConceptExists,
    ConceptNotFound,
    CorruptConcept,
    DamagedWeights,
    InvalidName,
    StcError,
    UnsupportedSchema,
)

SCHEMA_VERSION = 1
CONCEPT_FILE = "concept.yaml"
WEIGHTS_FILE = "mapper.safetensors"
PREVIEW_FILE = "preview.png"
PREVIEWS_DIR = "previews"
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
RENAMES_LOCK = "_renames"  # cannot clash with a concept name (those never start with '_')

# Characters that look like ASCII letters but are not (Cyrillic, Greek), for suggestions.
_LOOKALIKES = str.maketrans({
    "а": "a", "в": "b", "е": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c",
    "т": "t", "у": "y", "х": "x", "і": "i", "ј": "j", "ѕ": "s", "ԁ": "d", "ɡ": "g", "ӏ": "l",
    "α": "a", "β": "b", "ε": "e", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "τ": "t",
    "υ": "u", "χ": "x",
})


def registry_root() -> Path:
    """``$STC_HOME`` if set, else the platform's user data folder for stc."""
    env = os.environ.get("STC_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("stc"))


# --------------------------------------------------------------------------- names


def is_valid_name(name: str) -> bool:
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None


def suggest_name(name: str) -> str:
    """A valid spelling close to ``name`` (look-alikes and accents folded, lower-case,
    separators to '-'); always passes :func:`validate_name`."""
    lowered = unicodedata.normalize("NFKC", str(name)).lower().translate(_LOOKALIKES)
    folded = unicodedata.normalize("NFKD", lowered).encode("ascii", "ignore").decode()
    cleaned = re.sub(r"[^a-z0-9_-]+", "-", folded).strip("-_")
    return cleaned[:64].rstrip("-_") or "my-concept"


def validate_name(name: str) -> str:
    if not is_valid_name(name):
        raise InvalidName(
            f"invalid concept name {name!r}: use 1-64 lower-case ASCII letters, digits, '-' or '_', "
            f"starting with a letter or digit (e.g. {suggest_name(name)!r})"
        )
    return name


# --------------------------------------------------------------------------- concept.yaml


def _migrate_0_to_1(data: dict) -> dict:
    """Schema 0 (before stc 0.1; no ``schema_version``): the weights hash was stored as
    ``sha256`` and there was no ``metrics`` mapping."""
    data = dict(data)
    if "sha256" in data and "weights_sha256" not in data:
        data["weights_sha256"] = data.pop("sha256")
    data.setdefault("metrics", {})
    data["schema_version"] = 1
    return data


MIGRATIONS = {0: _migrate_0_to_1}  # version -> function returning the next version's mapping


def migrate(data: dict, source: Path) -> dict:
    """Bring a ``concept.yaml`` mapping up to :data:`SCHEMA_VERSION` (``source`` names the file)."""
    version = data.get("schema_version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise CorruptConcept(f"{source} has an invalid schema_version {version!r}")
    if version > SCHEMA_VERSION:
        raise UnsupportedSchema(
            f"{source} has schema version {version}, newer than this stc understands ({SCHEMA_VERSION}); "
            "upgrade stc (pip install -U stc)"
        )
    while version < SCHEMA_VERSION:
        data = MIGRATIONS[version](data)
        version = data["schema_version"]
    return data


KNOWN_KEYS = (
    "schema_version", "stc_version", "name", "token", "initializer", "base_model", "text_width",
    "layer_names", "mapper", "training", "metrics", "created", "weights_sha256",
)
REQUIRED_KEYS = ("name", "base_model", "initializer", "text_width", "layer_names", "mapper")


@dataclass
class Concept:
    """A concept's metadata (``concept.yaml``); weights live in ``mapper.safetensors``."""

    name: str
    base_model: str
    initializer: str
    text_width: int
    layer_names: list[str]
    mapper: dict
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    weights_sha256: str = ""
    created: str = ""
    stc_version: str = __version__
    schema_version: int = SCHEMA_VERSION
    path: Path | None = None
    extra: dict = field(default_factory=dict)  # keys this stc does not know; written back as they are
    migrated_from: int | None = None  # schema version of the file on disk, when older than ours

    @property
    def token(self) -> str:
        return f"<{self.name}>"

    @property
    def weights_path(self) -> Path:
        assert self.path is not None
        return self.path / WEIGHTS_FILE

    @property
    def steps_planned(self) -> int | None:
        return _optional_int(self.training.get("steps"))

    @property
    def steps_done(self) -> int | None:
        done = _optional_int(self.training.get("steps_done"))
        return done if done is not None else self.steps_planned

    @property
    def complete(self) -> bool:
        """False while training has stopped short of its planned steps (resumable)."""
        done, planned = self.steps_done, self.steps_planned
        return done is None or planned is None or done >= planned

    @property
    def rank_max(self) -> int | None:
        return _optional_int(self.mapper.get("hidden_dim", 128))

    def to_yaml_dict(self) -> dict:
        data = {
            "schema_version": SCHEMA_VERSION,
            "stc_version": self.stc_version,
            "name": self.name,
            "token": self.token,
            "initializer": self.initializer,
            "base_model": self.base_model,
            "text_width": self.text_width,
            "layer_names": list(self.layer_names),
            "mapper": dict(self.mapper),
            "training": dict(self.training),
            "metrics": dict(self.metrics),
            "created": self.created,
            "weights_sha256": self.weights_sha256,
        }
        data.update({key: value for key, value in self.extra.items() if key not in data})
        return data

    @classmethod
    def from_yaml_dict(cls, data: dict, path: Path) -> "Concept":
        source = path / CONCEPT_FILE
        original_version = data.get("schema_version", 0)
        data = migrate(data, source)
        missing = [key for key in REQUIRED_KEYS if key not in data]
        if missing:
            raise CorruptConcept(f"{source} lacks {', '.join(missing)}")
        try:
            concept = cls(
                name=_expect(data, "name", str, source),
                base_model=str(data["base_model"]),
                initializer=str(data["initializer"]),
                text_width=int(data["text_width"]),
                layer_names=[str(name) for name in _expect(data, "layer_names", list, source)],
                mapper=dict(_expect(data, "mapper", dict, source)),
                training=dict(_expect(data, "training", dict, source, default={})),
                metrics=dict(_expect(data, "metrics", dict, source, default={})),
                weights_sha256=str(data.get("weights_sha256") or ""),
                created=str(data.get("created") or ""),
                stc_version=str(data.get("stc_version") or ""),
                schema_version=SCHEMA_VERSION,
                path=path,
                extra={key: value for key, value in data.items() if key not in KNOWN_KEYS},
                migrated_from=original_version if original_version != SCHEMA_VERSION else None,
            )
        except (TypeError, ValueError) as exc:
            raise CorruptConcept(f"{source} has a value of the wrong type: {exc}") from exc
        if concept.name != path.name:
            raise CorruptConcept(
                f"{source} names the concept {concept.name!r} but its folder is {path.name!r}; "
                f"set 'name: {path.name}' in the file, or move the folder back"
            )
        return concept


def _expect(data: dict, key: str, kind: type, source: Path, default=None):
    value = data.get(key, default)
    if value is None and default is not None:
        value = default
    if not isinstance(value, kind):
        raise CorruptConcept(f"{source}: '{key}' should be a {kind.__name__}, not {type(value).__name__}")
    return value


def _optional_int(value) -> int | None:
    try:
        return int(value) if value is not None and not isinstance(value, bool) else None
    except (TypeError, ValueError):
        return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- files


def sha256_file(path: Path) -> str:
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
        extents = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        return f"not a safetensors file ({exc})"
    expected = 8 + header_size + max(extents, default=0)
    if size < expected:
        return f"truncated: {size} of {expected} bytes"
    if size > expected:
        return f"has {size - expected} unexpected trailing bytes"
    return None


@dataclass
class WeightsCheck:
    """Result of checking a concept's weights file against ``concept.yaml``."""

    ok: bool
    sha256: str | None  # of the file on disk (None when missing)
    problem: str | None  # what is wrong, ready to show


def check_weights(concept: Concept) -> WeightsCheck:
    """Is ``mapper.safetensors`` present, complete, and the file ``concept.yaml`` recorded?"""
    weights = concept.weights_path
    if not weights.is_file():
        return WeightsCheck(False, None, f"{weights} is missing")
    problem = safetensors_problem(weights)
    actual = sha256_file(weights)
    if problem:
        return WeightsCheck(False, actual, f"{weights} is {problem}")
    if concept.weights_sha256 and actual != concept.weights_sha256:
        return WeightsCheck(
            False, actual,
            f"{weights} does not match the sha256 recorded in {CONCEPT_FILE} (the file was changed or is damaged)",
        )
    if not concept.weights_sha256:
        return WeightsCheck(True, actual, f"{CONCEPT_FILE} records no sha256 for {weights}; it cannot be verified")
    return WeightsCheck(True, actual, None)


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


def preview_paths(folder: Path) -> list[Path]:
    """Training previews (``previews/*.png`` in order) then the final ``preview.png``, if present."""
    paths = sorted((folder / PREVIEWS_DIR).glob("*.png")) if (folder / PREVIEWS_DIR).is_dir() else []
    if (folder / PREVIEW_FILE).is_file():
        paths.append(folder / PREVIEW_FILE)
    return paths


def _write_yaml(folder: Path, concept: Concept) -> None:
    """(Re)write ``concept.yaml`` in ``folder`` as a new file (never in place: it may be a hard link)."""
    text = yaml.safe_dump(concept.to_yaml_dict(), sort_keys=False, allow_unicode=True)
    temporary = folder / f".{CONCEPT_FILE}.tmp"
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, folder / CONCEPT_FILE)


def _fsync_path(path: Path) -> None:
    with contextlib.suppress(OSError):  # directories cannot be fsynced everywhere
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """fsync every file and folder below ``folder`` (and ``folder`` itself)."""
    for directory, _, files in os.walk(folder):
        for file_name in files:
            with open(Path(directory) / file_name, "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_path(Path(directory))


def _apply_umask(folder: Path) -> None:
    """mkdtemp makes private folders; give the entry the permissions of a normal write."""
    umask = os.umask(0)
    os.umask(umask)
    for item in folder.rglob("*"):
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~umask)
    os.chmod(folder, 0o777 & ~umask)


def _clone_tree(source: Path, target: Path, hard_links: bool) -> None:
    """Copy the files of ``source`` into the existing folder ``target`` (hard links when asked
    and possible: a rename must not double the disk use)."""
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


# --------------------------------------------------------------------------- the registry


class Registry:
    """The concept store under ``root`` (default: :func:`registry_root`)."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else registry_root()

    @property
    def concepts_dir(self) -> Path:
        return self.root / "concepts"

    def path_of(self, name: str) -> Path:
        return self.concepts_dir / validate_name(name)

    def exists(self, name: str) -> bool:
        return (self.path_of(name) / CONCEPT_FILE).exists()

    # ----------------------------------------------------------------- reading

    def folder_of(self, name: str) -> Path:
        """The folder of an existing entry (loadable or not); ConceptNotFound otherwise."""
        path = self.path_of(name)
        if not path.is_dir():
            hint = self.close_names(name)
            extra = f" Did you mean: {', '.join(hint)}?" if hint else " Run 'stc ls' to see what is there."
            raise ConceptNotFound(f"no concept named {name!r} in {self.concepts_dir}.{extra}")
        return path

    def load(self, name: str) -> Concept:
        path = self.folder_of(name)
        meta = path / CONCEPT_FILE
        if not meta.is_file():
            raise CorruptConcept(
                f"{path} has no {CONCEPT_FILE}; it is not a usable concept (remove it: stc rm {name})"
            )
        try:
            data = yaml.safe_load(meta.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise CorruptConcept(f"{meta} is not valid YAML: {_one_line(exc)}") from exc
        except OSError as exc:
            raise CorruptConcept(f"{meta} cannot be read: {exc.strerror or exc}") from exc
        if not isinstance(data, dict):
            raise CorruptConcept(f"{meta} does not hold a mapping")
        return Concept.from_yaml_dict(data, path)

    def names(self) -> list[str]:
        """Names of the entries (folders with a valid name), loadable or not."""
        if not self.concepts_dir.is_dir():
            return []
        return sorted(p.name for p in self.concepts_dir.iterdir() if p.is_dir() and is_valid_name(p.name))

    def scan(self) -> Iterator[tuple[str, Concept | None, StcError | None]]:
        """Every entry with its concept, or the error that stops it from loading."""
        for name in self.names():
            try:
                yield name, self.load(name), None
            except StcError as exc:
                yield name, None, exc

    def foreign_entries(self) -> list[tuple[Path, str]]:
        """Things in the concepts folder that are not concepts (hidden staging folders excluded)."""
        if not self.concepts_dir.is_dir():
            return []
        found = []
        for item in sorted(self.concepts_dir.iterdir()):
            if item.name.startswith("."):
                continue
            if not item.is_dir():
                found.append((item, "a file, not a concept folder"))
            elif not is_valid_name(item.name):
                found.append((item, f"not a valid concept name (e.g. {suggest_name(item.name)!r})"))
        return found

    def close_names(self, name: str) -> list[str]:
        import difflib

        return difflib.get_close_matches(name, self.names(), n=3, cutoff=0.5)

    def size(self, name: str) -> int:
        """Bytes on disk of the entry ``name`` (weights, metadata, previews, checkpoint, ...)."""
        return folder_size(self.folder_of(name))

    def verify(self, concept: Concept) -> WeightsCheck:
        return check_weights(concept)

    # ----------------------------------------------------------------- locking

    @contextlib.contextmanager
    def lock(self, name: str):
        """An exclusive lock on one concept name (advisory, released on exit)."""
        with self._flock(validate_name(name)):
            yield

    @contextlib.contextmanager
    def _flock(self, lock_name: str):
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{lock_name}.lock", "a+") as handle:
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

    @contextlib.contextmanager
    def _rename_locks(self, *names: str):
        """The registry-wide rename lock, then each name's lock in sorted order (no deadlocks)."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(self._flock(RENAMES_LOCK))
            for name in sorted(set(names)):
                stack.enter_context(self.lock(name))
            yield

    # ----------------------------------------------------------------- writing

    def save(self, concept: Concept, state_dict: dict, overwrite: bool = False, extra_files: dict | None = None) -> Concept:
        """Write ``concept`` and its weights atomically; returns the stored concept.

        ``extra_files`` maps file names to bytes or to paths to copy (previews, checkpoints).
        Overwriting keeps the unknown ``concept.yaml`` keys of the entry it replaces.
        """
        from safetensors.torch import save_file

        path = self.path_of(concept.name)
        with self.lock(concept.name):
            if path.exists() and not overwrite:
                raise ConceptExists(
                    f"a concept named {concept.name!r} exists already; choose another --name, or "
                    f"remove it first (stc rm {concept.name})"
                )
            concept.extra = {**self._unknown_keys_on_disk(path), **concept.extra}
            with self._staging(concept.name) as staging:
                tensors = {key: value.detach().to("cpu").contiguous() for key, value in state_dict.items()}
                save_file(tensors, staging / WEIGHTS_FILE, metadata={"format": "stc-concept", "name": concept.name})
                concept.weights_sha256 = sha256_file(staging / WEIGHTS_FILE)
                concept.created = concept.created or _now()
                concept.stc_version = __version__
                for file_name, content in (extra_files or {}).items():
                    target = staging / file_name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    if isinstance(content, (bytes, bytearray)):
                        target.write_bytes(content)
                    else:
                        shutil.copy2(content, target)
                _write_yaml(staging, concept)
                self._commit(staging, path)
        concept.path = path
        concept.migrated_from = None
        return concept

    def rename(self, old: str, new: str) -> Concept:
        """Rename a concept (its token follows: ``<new>``); the weights are not rewritten.

        The new entry is complete before the old one goes: a crash in between leaves both.
        """
        self._check_distinct(old, new)
        with self._rename_locks(old, new):
            concept = self.load(old)
            source = concept.path
            self._refuse_existing(new)
            concept.name = new
            with self._staging(new) as staging:
                _clone_tree(source, staging, hard_links=True)
                _write_yaml(staging, concept)
                self._commit(staging, self.path_of(new))
            self._discard(source)
        concept.path = self.path_of(new)
        concept.migrated_from = None
        return concept

    def copy(self, source_name: str, target_name: str) -> Concept:
        """Copy a concept (weights verified first) under a new name, with a fresh created time."""
        self._check_distinct(source_name, target_name)
        with self._rename_locks(source_name, target_name):
            concept = self.load(source_name)
            check = check_weights(concept)
            if not check.ok:
                raise DamagedWeights(f"cannot copy {source_name!r}: {check.problem}")
            source = concept.path
            self._refuse_existing(target_name)
            concept.name = target_name
            concept.created = _now()
            with self._staging(target_name) as staging:
                _clone_tree(source, staging, hard_links=False)
                _write_yaml(staging, concept)
                self._commit(staging, self.path_of(target_name))
        concept.path = self.path_of(target_name)
        concept.migrated_from = None
        return concept

    def remove(self, name: str) -> int:
        """Delete the entry ``name`` (loadable or not); returns the bytes freed."""
        path = self.folder_of(name)
        with self.lock(name):
            path = self.folder_of(name)
            freed = folder_size(path)
            self._discard(path)
        return freed

    # ----------------------------------------------------------------- helpers

    def _check_distinct(self, source: str, target: str) -> None:
        validate_name(source)
        validate_name(target)
        if source == target:
            raise BadInput(f"source and destination are both {source!r}; pass a different new name")
        self.folder_of(source)

    def _refuse_existing(self, name: str) -> None:
        if self.path_of(name).exists():
            raise ConceptExists(
                f"a concept named {name!r} exists already; choose another name or remove it first (stc rm {name})"
            )

    def _unknown_keys_on_disk(self, path: Path) -> dict:
        try:
            data = yaml.safe_load((path / CONCEPT_FILE).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {key: value for key, value in data.items() if key not in KNOWN_KEYS and key != "sha256"}

    @contextlib.contextmanager
    def _staging(self, name: str):
        """A private folder beside the entries; removed unless committed (moved away)."""
        self.concepts_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=self.concepts_dir))
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _commit(self, staging: Path, path: Path) -> None:
        """Make ``staging`` durable, then swap it in at ``path`` (the previous entry survives a failure)."""
        _apply_umask(staging)
        _fsync_tree(staging)
        if not path.exists():
            os.replace(staging, path)
        else:
            trash = Path(tempfile.mkdtemp(prefix=f".old-{path.name}-", dir=self.concepts_dir))
            os.replace(path, trash / "entry")
            try:
                os.replace(staging, path)
            except BaseException:
                os.replace(trash / "entry", path)  # put the previous state back
                raise
            finally:
                shutil.rmtree(trash, ignore_errors=True)
        _fsync_path(self.concepts_dir)

    def _discard(self, path: Path) -> None:
        """Remove an entry: first move it out of sight (atomic), then delete the files."""
        trash = Path(tempfile.mkdtemp(prefix=f".trash-{path.name}-", dir=self.concepts_dir))
        os.replace(path, trash / "entry")
        _fsync_path(self.concepts_dir)
        shutil.rmtree(trash, ignore_errors=True)

    # ----------------------------------------------------------------- weights

    def load_state_dict(self, concept: Concept, verify: bool = True) -> dict:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        weights = concept.weights_path
        if not weights.exists():
            raise DamagedWeights(f"{weights} is missing; the concept {concept.name!r} cannot be used")
        problem = safetensors_problem(weights)
        if problem:
            raise DamagedWeights(f"{weights} is {problem}; the concept {concept.name!r} cannot be used")
        if verify and concept.weights_sha256 and sha256_file(weights) != concept.weights_sha256:
            raise DamagedWeights(
                f"{weights} does not match the sha256 recorded in {CONCEPT_FILE}: the file was changed "
                "or is damaged"
            )
        try:
            return load_file(weights)
        except (SafetensorError, OSError, ValueError) as exc:
            raise DamagedWeights(f"{weights} is not a readable safetensors file: {exc}") from exc

    def load_mapper(self, concept: Concept):
        """The concept's mapper in eval mode (fp32, CPU), weights verified."""
        import torch

        from .mapper import MapperConfig, NeTIMapper

        try:
            config = MapperConfig.from_dict(concept.mapper)
        except (TypeError, ValueError) as exc:
            raise CorruptConcept(f"{concept.path / CONCEPT_FILE}: bad mapper config: {exc}") from exc
        mapper = NeTIMapper(config, generator=torch.Generator().manual_seed(0))
        try:
            mapper.load_state_dict(self.load_state_dict(concept))
        except RuntimeError as exc:
            raise CorruptConcept(f"{concept.weights_path} does not fit its mapper config: {exc}") from exc
        return mapper.eval().requires_grad_(False)


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())
