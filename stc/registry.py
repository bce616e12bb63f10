"""The on-disk concept store.

Layout: ``$STC_HOME/concepts/<name>/{concept.yaml, mapper.safetensors}``. Writes go to a
temporary folder beside the target, are fsynced, then swapped in with ``os.replace``, under
a per-concept lock. Only writing operations create folders.
"""

from __future__ import annotations

import contextlib
import hashlib
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
    ConceptExists,
    ConceptNotFound,
    CorruptConcept,
    InvalidName,
    StcError,
)

SCHEMA_VERSION = 1
CONCEPT_FILE = "concept.yaml"
WEIGHTS_FILE = "mapper.safetensors"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def registry_root() -> Path:
    """``$STC_HOME`` if set, else the platform's user data folder for stc."""
    env = os.environ.get("STC_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("stc"))


def suggest_name(name: str) -> str:
    """A valid spelling close to ``name`` (ASCII-folded, lower-case, separators to '-')."""
    folded = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode().lower()
    cleaned = re.sub(r"[^a-z0-9_-]+", "-", folded).strip("-_")
    return cleaned[:64] or "my-concept"


def validate_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise InvalidName(
            f"invalid concept name {name!r}: use 1-64 lower-case letters, digits, '-' or '_', "
            f"starting with a letter or digit (e.g. {suggest_name(name)!r})"
        )
    return name


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

    @property
    def token(self) -> str:
        return f"<{self.name}>"

    @property
    def weights_path(self) -> Path:
        assert self.path is not None
        return self.path / WEIGHTS_FILE

    def to_yaml_dict(self) -> dict:
        return {
            "schema_version": self.schema_version,
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

    @classmethod
    def from_yaml_dict(cls, data: dict, path: Path) -> "Concept":
        required = ("name", "base_model", "initializer", "text_width", "layer_names", "mapper")
        missing = [key for key in required if key not in data]
        if missing:
            raise CorruptConcept(f"{path / CONCEPT_FILE} lacks {', '.join(missing)}")
        version = data.get("schema_version", 0)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise CorruptConcept(
                f"{path / CONCEPT_FILE} has schema version {version}, newer than this stc understands "
                f"({SCHEMA_VERSION}); upgrade stc (pip install -U stc)"
            )
        return cls(
            name=str(data["name"]),
            base_model=str(data["base_model"]),
            initializer=str(data["initializer"]),
            text_width=int(data["text_width"]),
            layer_names=[str(name) for name in data["layer_names"]],
            mapper=dict(data["mapper"]),
            training=dict(data.get("training") or {}),
            metrics=dict(data.get("metrics") or {}),
            weights_sha256=str(data.get("weights_sha256", "")),
            created=str(data.get("created", "")),
            stc_version=str(data.get("stc_version", "")),
            schema_version=SCHEMA_VERSION,
            path=path,
        )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_tree(folder: Path) -> None:
    for item in folder.iterdir():
        if item.is_file():
            with open(item, "rb") as handle:
                os.fsync(handle.fileno())
    with contextlib.suppress(OSError):  # directories cannot be fsynced everywhere
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _apply_umask(folder: Path) -> None:
    """mkdtemp makes private folders; give the entry the permissions of a normal write."""
    umask = os.umask(0)
    os.umask(umask)
    for item in folder.rglob("*"):
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~umask)
    os.chmod(folder, 0o777 & ~umask)


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

    def load(self, name: str) -> Concept:
        path = self.path_of(name)
        meta = path / CONCEPT_FILE
        if not meta.exists():
            hint = self.close_names(name)
            extra = f" Did you mean: {', '.join(hint)}?" if hint else " Run 'stc ls' to see what is there."
            raise ConceptNotFound(f"no concept named {name!r} in {self.concepts_dir}.{extra}")
        try:
            data = yaml.safe_load(meta.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise CorruptConcept(f"{meta} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise CorruptConcept(f"{meta} does not hold a mapping")
        return Concept.from_yaml_dict(data, path)

    def names(self) -> list[str]:
        if not self.concepts_dir.is_dir():
            return []
        return sorted(p.name for p in self.concepts_dir.iterdir() if p.is_dir() and NAME_RE.match(p.name))

    def scan(self) -> Iterator[tuple[str, Concept | None, StcError | None]]:
        """Every entry with its concept, or the error that stops it from loading."""
        for name in self.names():
            try:
                yield name, self.load(name), None
            except StcError as exc:
                yield name, None, exc

    def close_names(self, name: str) -> list[str]:
        import difflib

        return difflib.get_close_matches(name, self.names(), n=3, cutoff=0.5)

    # ----------------------------------------------------------------- writing

    @contextlib.contextmanager
    def lock(self, name: str):
        """An exclusive lock on one concept name (advisory, released on exit)."""
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{validate_name(name)}.lock", "a+") as handle:
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

    def save(self, concept: Concept, state_dict: dict, overwrite: bool = False, extra_files: dict | None = None) -> Concept:
        """Write ``concept`` and its weights atomically; returns the stored concept.

        ``extra_files`` maps file names to bytes or to paths to copy (previews, checkpoints).
        """
        from safetensors.torch import save_file

        path = self.path_of(concept.name)
        with self.lock(concept.name):
            if path.exists() and not overwrite:
                raise ConceptExists(
                    f"a concept named {concept.name!r} exists already; choose another --name, or "
                    f"remove it first (stc rm {concept.name})"
                )
            self.concepts_dir.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".tmp-{concept.name}-", dir=self.concepts_dir))
            try:
                tensors = {key: value.detach().to("cpu").contiguous() for key, value in state_dict.items()}
                save_file(tensors, staging / WEIGHTS_FILE, metadata={"format": "stc-concept", "name": concept.name})
                concept.weights_sha256 = sha256_file(staging / WEIGHTS_FILE)
                concept.created = concept.created or datetime.now(timezone.utc).isoformat(timespec="seconds")
                concept.stc_version = __version__
                for file_name, content in (extra_files or {}).items():
                    target = staging / file_name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    if isinstance(content, (bytes, bytearray)):
                        target.write_bytes(content)
                    else:
                        shutil.copy2(content, target)
                text = yaml.safe_dump(concept.to_yaml_dict(), sort_keys=False, allow_unicode=True)
                (staging / CONCEPT_FILE).write_text(text, encoding="utf-8")
                _apply_umask(staging)
                _fsync_tree(staging)
                self._swap_in(staging, path)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        concept.path = path
        return concept

    def _swap_in(self, staging: Path, path: Path) -> None:
        if not path.exists():
            os.replace(staging, path)
            return
        trash = Path(tempfile.mkdtemp(prefix=f".old-{path.name}-", dir=self.concepts_dir))
        os.replace(path, trash / "entry")
        try:
            os.replace(staging, path)
        except BaseException:
            os.replace(trash / "entry", path)  # put the previous state back
            raise
        finally:
            shutil.rmtree(trash, ignore_errors=True)

    # ----------------------------------------------------------------- weights

    def load_state_dict(self, concept: Concept, verify: bool = True) -> dict:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        weights = concept.weights_path
        if not weights.exists():
            raise CorruptConcept(f"{weights} is missing; the concept {concept.name!r} cannot be used")
        if verify and concept.weights_sha256 and sha256_file(weights) != concept.weights_sha256:
            raise CorruptConcept(
                f"{weights} does not match the sha256 recorded in {CONCEPT_FILE}: the file was changed "
                "or is damaged"
            )
        try:
            return load_file(weights)
        except (SafetensorError, OSError, ValueError) as exc:
            raise CorruptConcept(f"{weights} is not a readable safetensors file: {exc}") from exc

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
