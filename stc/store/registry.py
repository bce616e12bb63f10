"""The on-disk concept store: bytes and metadata, never tensors.

Layout: ``$STC_HOME/concepts/<name>/{concept.yaml, mapper.safetensors}`` plus whatever
training adds (``metrics.jsonl``, ``preview.png``, ``previews/``, ``checkpoint/``); the format
is specified in ``docs/concept-format.md``. Every write builds a complete entry in a hidden
staging folder, fsyncs it and swaps it in (``storage.py``), under a per-concept lock (renames
and copies also take a registry-wide lock). Only writing operations create folders.

This module imports neither torch nor the mapper, so ``stc ls`` stays light; turning weights
into a mapper is ``conceptio.py``'s job.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .. import __version__
from ..atomic import commit_folder, write_file
from ..errors import (
    BadInput,
    ConceptBusy,
    ConceptExists,
    ConceptNotFound,
    CorruptConcept,
    DamagedWeights,
    RegistryWriteError,
    one_line,
)
from ..names import is_valid_name, suggest_name, validate_name
from ..safe_yaml import yaml_load
from ..settings import registry_root
from .concept import CONCEPT_FILE, KNOWN_KEYS, WEIGHTS_FILE, Concept
from .storage import (
    clone_tree,
    discard_folder,
    file_lock,
    folder_size,
    open_lock_file,
    safetensors_problem,
    sha256_file,
    staging_folder,
    sweep,
    try_lock,
    with_header_metadata,
)

PREVIEW_FILE = "preview.png"
PREVIEWS_DIR = "previews"
RENAMES_LOCK = "_renames"  # cannot clash with a concept name (those never start with '_')


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _sha256(data: bytes) -> str:
    import hashlib  # here, not at the top (nor socket, yaml): stc ls never hashes, locks or parses

    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- weights checks


@dataclass
class WeightsCheck:
    """Result of checking a concept's weights file against ``concept.yaml``."""

    ok: bool
    sha256: str | None  # of the file on disk (None when missing or not hashed)
    problem: str | None  # what is wrong, ready to show


def check_weights(concept: Concept, hash_file: bool = True) -> WeightsCheck:
    """Is ``mapper.safetensors`` present, complete, and (with ``hash_file``) the file
    ``concept.yaml`` recorded?"""
    weights = concept.weights_path
    if not weights.is_file():
        return WeightsCheck(False, None, _changed_meanwhile(concept) or f"{weights} is missing")
    problem = safetensors_problem(weights)
    try:
        actual = sha256_file(weights) if hash_file or problem else None
    except OSError as exc:  # removed since the check above
        reason = f"{weights} cannot be read: {exc.strerror or exc}"
        return WeightsCheck(False, None, _changed_meanwhile(concept) or reason)
    if problem:
        return WeightsCheck(False, actual, _changed_meanwhile(concept) or f"{weights} is {problem}")
    if not hash_file:
        return WeightsCheck(True, None, None)
    if concept.weights_sha256 and actual != concept.weights_sha256:
        return WeightsCheck(
            False, actual, _changed_meanwhile(concept) or
            f"{weights} does not match the sha256 recorded in {CONCEPT_FILE} (the file was changed or is damaged)",
        )
    if not concept.weights_sha256:
        return WeightsCheck(True, actual, f"{CONCEPT_FILE} records no sha256 for {weights}; it cannot be verified")
    return WeightsCheck(True, actual, None)


def _changed_meanwhile(concept: Concept) -> str | None:
    """Why the weights no longer fit a loaded concept when another process renamed, removed or
    re-saved the entry since it was loaded (readers take no lock), else None: a damaged entry."""
    import yaml  # here, not at the top: a registry that only lists (stc ls) never parses YAML

    meta = concept.path / CONCEPT_FILE
    try:
        data = yaml_load(meta.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return (f"{concept.name!r} was renamed or removed by another process while it was being read "
                f"(run 'stc ls' to see what is there)")
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    recorded = data.get("weights_sha256", data.get("sha256")) if isinstance(data, dict) else None
    resaved = f"{concept.name!r} was saved again by another process while it was being read; try again"
    if concept.weights_sha256 and recorded and recorded != concept.weights_sha256:
        return resaved
    try:  # saved again with the same content meanwhile (A, then B, then A again): a new file
        if concept.source_stamp is not None and _file_stamp(os.stat(meta)) != concept.source_stamp:
            return resaved
    except OSError:
        return None
    return None


def _file_stamp(info: os.stat_result) -> tuple:
    return (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_ctime_ns)


def read_concept(path: Path) -> Concept:
    """The concept whose folder is ``path`` (in a registry or out of one: a copy, a backup, a
    rescued run); the stamp of its ``concept.yaml`` is kept for later checks."""
    import yaml

    meta = path / CONCEPT_FILE
    try:
        if not meta.is_file():
            raise FileNotFoundError(meta)
        with open(meta, "rb") as handle:  # the stamp of the very file that is read
            stamp = _file_stamp(os.fstat(handle.fileno()))
            data = yaml_load(handle.read().decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise CorruptConcept(f"{meta} is not valid YAML: {one_line(exc)}") from exc
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise CorruptConcept(
                f"{path} has no {CONCEPT_FILE}; it is not a usable concept (remove it: stc rm {path.name}, or "
                "Registry.remove)"
            ) from None
        raise CorruptConcept(f"{meta} cannot be read: {exc.strerror or exc}") from exc
    if not isinstance(data, dict):
        raise CorruptConcept(f"{meta} does not hold a mapping")
    concept = Concept.from_yaml_dict(data, path)
    concept.source_stamp = stamp
    return concept


def concept_files(folder: Path) -> dict[str, Path]:
    """The files of a concept folder beside its metadata and weights (metrics, previews, a
    training checkpoint), by their path inside it: what a copy of the concept carries along."""
    from .storage import folder_files

    skip = {CONCEPT_FILE, WEIGHTS_FILE}
    return {relative: folder / relative for relative, _ in folder_files(folder) if relative not in skip}


def preview_paths(folder: Path) -> list[Path]:
    """Training previews (``previews/*.png`` in order) then the final ``preview.png``, if present."""
    paths = sorted((folder / PREVIEWS_DIR).glob("*.png")) if (folder / PREVIEWS_DIR).is_dir() else []
    if (folder / PREVIEW_FILE).is_file():
        paths.append(folder / PREVIEW_FILE)
    return paths


def _lock_owner(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip() or "another process"
    except OSError:
        return "another process"


@functools.cache
def _dumper():
    """The safe dumper, except that strings holding U+0085 (NEL) are double-quoted: in the other
    styles PyYAML writes it raw and reads it back as a space. (Built on first use: importing
    yaml costs ~15 ms that ``stc ls`` and ``stc --help`` do not need.)"""
    import yaml

    class _Dumper(yaml.SafeDumper):
        pass

    _Dumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
        "tag:yaml.org,2002:str", text, style='"') if "\x85" in text else dumper.represent_str(text))
    return _Dumper


def _yaml_text(concept: Concept) -> str:
    import yaml

    return yaml.dump(concept.to_yaml_dict(), Dumper=_dumper(), sort_keys=False, allow_unicode=True)


# --------------------------------------------------------------------------- the registry


def _entries(folder: Path) -> list[os.DirEntry]:
    """``folder``'s entries in name order. ``os.scandir`` knows from the listing itself whether an
    entry is a folder (``DirEntry.is_dir`` follows links, as ``Path.is_dir`` does), so a registry
    of thousands of concepts costs no stat per entry."""
    with os.scandir(folder) as entries:
        return sorted(entries, key=lambda entry: entry.name)


class Registry:
    """The concept store under ``root`` (default: :func:`registry_root`)."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else registry_root()
        if self.root.exists() and not self.root.is_dir():
            raise BadInput(f"the registry root {self.root} (STC_HOME) is a file, not a folder; point STC_HOME at a "
                           "folder (or unset it for the default)")

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
        try:
            return read_concept(path)
        except CorruptConcept:
            self.folder_of(name)  # ConceptNotFound when another process removed or renamed it meanwhile
            raise

    def names(self) -> list[str]:
        """Names of the entries (folders with a valid name), loadable or not."""
        if not self.concepts_dir.is_dir():
            return []
        return [entry.name for entry in _entries(self.concepts_dir) if entry.is_dir() and is_valid_name(entry.name)]

    def foreign_entries(self) -> list[tuple[Path, str]]:
        """Things in the concepts folder that are not concepts (hidden staging folders excluded)."""
        if not self.concepts_dir.is_dir():
            return []
        found = []
        for entry in _entries(self.concepts_dir):
            if entry.name.startswith("."):
                continue
            item = self.concepts_dir / entry.name
            if not entry.is_dir():
                found.append((item, "a file, not a concept folder"))
            elif not is_valid_name(entry.name):
                found.append((item, f"not a valid concept name (e.g. {suggest_name(entry.name)!r})"))
        return found

    def close_names(self, name: str) -> list[str]:
        import difflib

        return difflib.get_close_matches(name, self.names(), n=3, cutoff=0.5)

    def size(self, name: str) -> int:
        """Bytes on disk of the entry ``name`` (weights, metadata, previews, checkpoint, ...)."""
        return folder_size(self.folder_of(name))

    # ----------------------------------------------------------------- locking

    @contextlib.contextmanager
    def lock(self, name: str):
        """An exclusive lock on one concept name (advisory, released on exit)."""
        with file_lock(self.root / ".locks" / f"{validate_name(name)}.lock"):
            yield

    def _training_lock_path(self, name: str) -> Path:
        return self.root / ".locks" / f"{validate_name(name)}.training"

    @contextlib.contextmanager
    def training_lock(self, name: str):
        """Held by a training run for its whole length: one run per name, and ``rm``/``mv`` of
        the name wait for none and refuse. The lock dies with its process (a killed run leaves
        nothing to clean up); the file tells the next one who holds it."""
        path = self._training_lock_path(name)
        with self._writing(name):
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = open_lock_file(path)  # a planted link is refused, never written through
        try:
            if not try_lock(handle):
                raise ConceptBusy(f"{name!r} is being trained by {_lock_owner(path)}; wait for it to finish "
                                  "or stop it (Ctrl-C saves a checkpoint), then try again")
            import socket

            handle.seek(0)
            handle.truncate()
            handle.write(f"process {os.getpid()} on {socket.gethostname()} since {_now()}")
            handle.flush()
            yield
        finally:
            handle.close()  # releases the lock

    def refuse_if_training(self, name: str, action: str) -> None:
        """ConceptBusy when another process trains ``name``."""
        path = self._training_lock_path(name)
        if not path.exists():
            return
        with open(path) as handle:
            if try_lock(handle):
                return
        raise ConceptBusy(f"cannot {action} {name!r}: it is being trained by {_lock_owner(path)}; wait for the run "
                          "to finish or stop it first")

    def check_writable(self) -> None:
        """A real write into the concepts folder, before hours of work depend on it."""
        with self._writing("the registry"):
            self.concepts_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(prefix=".probe-", dir=self.concepts_dir):
                pass

    @contextlib.contextmanager
    def _writing(self, what: str):
        """OS errors during a registry write become one-line errors; the previous state is kept."""
        try:
            yield
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename else ""
            raise RegistryWriteError(
                f"could not write {what} in {self.root}: {exc.strerror or exc}{where}; nothing was changed"
            ) from exc

    @contextlib.contextmanager
    def _rename_locks(self, *names: str):
        """The registry-wide rename lock, then each name's lock in sorted order (no deadlocks)."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(file_lock(self.root / ".locks" / f"{RENAMES_LOCK}.lock"))
            for name in sorted(set(names)):
                stack.enter_context(self.lock(name))
            yield

    # ----------------------------------------------------------------- writing

    def save(self, concept: Concept, weights: bytes, overwrite: bool = False,
             extra_files: dict | None = None) -> Concept:
        """Write ``concept`` and its weights file (the bytes of ``mapper.safetensors``, see
        ``conceptio.weights_bytes``) atomically; returns the stored concept.

        ``extra_files`` maps file names to bytes or to paths to copy (previews, checkpoints).
        Overwriting keeps the unknown ``concept.yaml`` keys of the entry it replaces.
        """
        path = self.path_of(concept.name)
        if not overwrite:
            self.refuse_if_training(concept.name, "create")
        with self._writing(repr(concept.name)), self.lock(concept.name):
            sweep(self.concepts_dir)
            if path.exists() and not overwrite:
                raise ConceptExists(
                    f"a concept named {concept.name!r} exists already; choose another name, or "
                    f"remove it first (stc rm {concept.name}, or Registry.remove)"
                )
            concept.extra = {**self._unknown_keys_on_disk(path), **concept.extra}
            with staging_folder(self.concepts_dir, concept.name) as staging:
                (staging / WEIGHTS_FILE).write_bytes(weights)
                concept.weights_sha256 = _sha256(weights)
                concept.created = concept.created or _now()
                concept.stc_version = __version__
                for file_name, content in (extra_files or {}).items():
                    target = staging / file_name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    if isinstance(content, (bytes, bytearray)):
                        target.write_bytes(content)
                    else:
                        target.write_bytes(Path(content).read_bytes())
                write_file(staging / CONCEPT_FILE, _yaml_text(concept))
                commit_folder(staging, path)
        concept.path = path
        concept.migrated_from = None
        concept.source_stamp = None  # not read from disk: nothing to compare a later check with
        return concept

    def record_eval(self, name: str, summary: dict) -> Concept:
        """Record ``summary`` (plain data) as the concept's latest eval in its ``concept.yaml``,
        written atomically under the concept's lock; the weights and other files are not touched."""
        self.refuse_if_training(name, "record an eval of")
        with self._writing(f"the eval of {name!r}"), self.lock(name):
            concept = self.load(name)
            concept.evaluation = dict(summary)
            write_file(concept.path / CONCEPT_FILE, _yaml_text(concept))
        return concept

    def rename(self, old: str, new: str) -> Concept:
        """Rename a concept (its token follows: ``<new>``); the weights are not rewritten.

        The new entry is complete before the old one goes: a crash in between leaves both.
        """
        validate_name(old)
        self.refuse_if_training(old, "rename")  # first: a run may not have saved its first step yet
        self._check_distinct(old, new)
        self.refuse_if_training(new, "rename onto")
        with self._writing(repr(new)), self._rename_locks(old, new):
            sweep(self.concepts_dir)
            concept = self.load(old)
            source = concept.path
            self._refuse_links(source, old, "rename")
            self._refuse_existing(new)
            concept.name = new
            self._write_clone(source, concept, hard_links=True)
            discard_folder(source)
        return concept

    def copy(self, source_name: str, target_name: str) -> Concept:
        """Copy a concept (weights verified first) under a new name, with a fresh created time."""
        self._check_distinct(source_name, target_name)
        self.refuse_if_training(target_name, "copy onto")
        with self._writing(repr(target_name)), self._rename_locks(source_name, target_name):
            sweep(self.concepts_dir)
            concept = self.load(source_name)
            self._refuse_links(concept.path, source_name, "copy")
            check = check_weights(concept)
            if not check.ok:
                raise DamagedWeights(f"cannot copy {source_name!r}: {check.problem}")
            source = concept.path
            self._refuse_existing(target_name)
            concept.name = target_name
            concept.created = _now()
            self._write_clone(source, concept, hard_links=False)
        return concept

    def remove(self, name: str) -> int:
        """Delete the entry ``name`` (loadable or not); returns the bytes freed."""
        self.refuse_if_training(name, "remove")  # first: a run may not have saved its first step yet
        self.folder_of(name)
        with self._writing(repr(name)), self.lock(name):
            sweep(self.concepts_dir)
            path = self.folder_of(name)
            freed = folder_size(path)
            discard_folder(path)
        return freed

    # ----------------------------------------------------------------- helpers

    def _write_clone(self, source: Path, concept: Concept, hard_links: bool) -> None:
        """A new entry for ``concept`` holding ``source``'s files and a new ``concept.yaml``."""
        target = self.path_of(concept.name)
        with staging_folder(self.concepts_dir, concept.name) as staging:
            clone_tree(source, staging, hard_links=hard_links)
            weights = staging / WEIGHTS_FILE
            if weights.is_file():  # the header names the concept: it follows the new name
                renamed = with_header_metadata(weights.read_bytes(), name=concept.name)
                write_file(weights, renamed)
                concept.weights_sha256 = _sha256(renamed)
            write_file(staging / CONCEPT_FILE, _yaml_text(concept))
            commit_folder(staging, target)
        concept.path = target
        concept.migrated_from = None

    def _check_distinct(self, source: str, target: str) -> None:
        validate_name(source)
        validate_name(target)
        if source == target:
            raise BadInput(f"source and destination are both {source!r}; pass a different new name")
        self.folder_of(source)

    def _refuse_links(self, folder: Path, name: str, action: str) -> None:
        """mv and cp write a new entry from the files of ``folder``; they never follow a symbolic
        link out of the registry (copying what it points to), nor drop the weights behind one."""
        for path in (folder, folder / CONCEPT_FILE, folder / WEIGHTS_FILE):
            if path.is_symlink():
                kind = "folder" if path == folder else "file"
                raise BadInput(
                    f"cannot {action} {name!r}: {path} is a symbolic link (to {os.readlink(path)}); stc does not "
                    f"follow links out of the registry. Replace the link with the real {kind}, or remove the "
                    f"entry (stc rm {name}, or Registry.remove, removes only the link)"
                )

    def _refuse_existing(self, name: str) -> None:
        if self.path_of(name).exists():
            raise ConceptExists(
                f"a concept named {name!r} exists already; choose another name or remove it first (stc rm {name}, "
                "or Registry.remove)"
            )

    def _unknown_keys_on_disk(self, path: Path) -> dict:
        import yaml

        try:
            data = yaml_load((path / CONCEPT_FILE).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {key: value for key, value in data.items() if key not in KNOWN_KEYS and key != "sha256"}
