"""What ``stc ls`` shows of each concept, cached so that a large registry lists at once.

A concept's listing record (name, token, base model, steps, rank max, size, created, and a
cheap check of its weights file) is derived from ``concept.yaml`` and the folder. Records are
kept in ``$STC_HOME/.listing.json`` under a stamp of the files they came from (mtime, size and
inode of ``concept.yaml``, the weights file and the folder); a changed stamp means the record
is rebuilt. The cache is only an accelerator: a missing, stale or unreadable cache costs time,
never correctness, and it is never written where the registry has no folder yet.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from ..atomic import write_file
from ..errors import ConceptNotFound, StcError
from .concept import CONCEPT_FILE, WEIGHTS_FILE
from .storage import folder_size, safetensors_problem

CACHE_FILE = ".listing.json"
CACHE_FORMAT = 1


def _folder_stamp(folder: Path) -> list[int] | None:
    """What must not change for a cached record to hold (None: the entry cannot be stamped)."""
    stamp = []
    base = os.fspath(folder)  # plain strings: pathlib costs more than the stat for thousands of entries
    for path in (base, os.path.join(base, CONCEPT_FILE), os.path.join(base, WEIGHTS_FILE)):
        try:
            info = os.stat(path)
        except OSError:
            return None
        stamp += [info.st_mtime_ns, info.st_size, info.st_ino]
    return stamp


def listing_record(concept) -> dict:
    """The record ``stc ls`` shows for a loaded concept (its weights checked by size and header)."""
    problem = safetensors_problem(concept.weights_path) if concept.weights_path.exists() else "missing"
    return {
        "name": concept.name,
        "token": concept.token,
        "base_model": concept.base_model,
        "steps": concept.steps_done,
        "steps_done": concept.steps_done,
        "steps_planned": concept.steps_planned,
        "complete": concept.complete,
        "rank_max": concept.rank_max,
        "size": folder_size(concept.path),
        "created": concept.created,
        "path": str(concept.path),
        "weights_problem": problem,
        "eval": _eval_brief(concept.evaluation),
    }


def _eval_brief(evaluation: dict) -> dict | None:
    """The latest eval in a listing: when, its suggested rank, on which model and prompts."""
    if not evaluation:
        return None
    return {key: evaluation.get(key) for key in ("finished", "suggested_rank", "model", "prompts")}


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


RECORD_KEYS = {"name", "token", "base_model", "steps", "steps_done", "steps_planned", "complete", "rank_max", "size",
               "created", "path", "weights_problem", "eval"}


def _usable(entry: dict, name: str) -> bool:
    """Is a cached record one that listing_record could have made for ``name`` (the cache is a
    file like any other: a damaged or edited one must cost time, not a crash)?"""
    record = entry.get("record")
    return (isinstance(record, dict) and set(record) == RECORD_KEYS and record["name"] == name
            and type(record["size"]) is int and isinstance(record["created"], str))


def _write_cache(path: Path, entries: dict) -> None:
    if not path.parent.is_dir():
        return  # listing never creates folders
    try:
        write_file(path, json.dumps({"format": CACHE_FORMAT, "entries": entries}))
    except OSError:  # a read-only registry lists, uncached (nothing is left behind: the write is atomic)
        pass


def listing(registry) -> Iterator[tuple[str, dict | None, StcError | None]]:
    """Every entry's listing record, or the error that stops it from loading (in name order)."""
    cache_path = registry.root / CACHE_FILE
    cached, fresh, changed = _read_cache(cache_path), {}, False
    for name in registry.names():
        folder = registry.concepts_dir / name
        stamp = _folder_stamp(folder)
        entry = cached.get(name)
        if stamp is not None and isinstance(entry, dict) and entry.get("stamp") == stamp and _usable(entry, name):
            fresh[name] = entry
            yield name, {**entry["record"], "path": str(folder)}, None  # the root may have moved
            continue
        try:
            record = listing_record(registry.load(name))
        except ConceptNotFound:
            continue  # removed or renamed by another process since the folder was listed
        except StcError as exc:
            yield name, None, exc
            continue
        if record["weights_problem"] and not folder.is_dir():
            continue  # removed or renamed while it was being read
        changed = True
        if stamp is not None:
            fresh[name] = {"stamp": stamp, "record": record}
        yield name, record, None
    if changed or set(fresh) != set(cached):
        _write_cache(cache_path, fresh)
