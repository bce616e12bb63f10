"""The on-disk concept store: names, schema, atomic writes, locks, weights verification."""

import os
import threading
import time

import helpers
import pytest
import torch
import yaml
from helpers import make_mapper, save_concept, scan

from stc.errors import (
    BadInput,
    ConceptExists,
    ConceptNotFound,
    CorruptConcept,
    DamagedWeights,
    InvalidName,
    RegistryWriteError,
    UnsupportedSchema,
)
from stc.method.mapper import MapperConfig, NeTIMapper
from stc.names import suggest_name, validate_name
from stc.store import registry as registry_module
from stc.store.concept import CONCEPT_FILE, SCHEMA_VERSION, Concept
from stc.store.conceptio import load_mapper, read_state_dict, weights_bytes
from stc.store.registry import Registry, check_weights
from stc.store.storage import sha256_file


def make_concept(registry: Registry, name: str, steps_done: int = 10, seed: int = 0, **extra) -> Concept:
    return save_concept(name, seed=seed, registry=registry, steps_done=steps_done, metrics={"final_loss": 0.25},
                        extra=extra)


def retrain(registry: Registry, name: str) -> Concept:
    """Overwrite ``name`` the way training does: a new Concept (no unknown keys), new weights."""
    stored = registry.load(name)
    fresh = Concept(**{**stored.__dict__, "path": None, "extra": {}, "weights_sha256": ""})
    mapper = NeTIMapper(MapperConfig(text_width=32, norm_scale=0.5), generator=torch.Generator().manual_seed(7))
    return registry.save(fresh, weights_bytes(mapper, name), overwrite=True)


def read_yaml(registry: Registry, name: str) -> dict:
    return yaml.safe_load((registry.path_of(name) / CONCEPT_FILE).read_text())


def write_yaml(registry: Registry, name: str, data) -> None:
    (registry.path_of(name) / CONCEPT_FILE).write_text(yaml.safe_dump(data, sort_keys=False))


def entry_bytes(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def weights_header_name(concept) -> str:
    from safetensors import safe_open

    with safe_open(concept.weights_path, "pt") as handle:
        return handle.metadata()["name"]


def tensors_equal(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[key], b[key]) for key in a)


def hidden_leftovers(registry: Registry) -> list:
    return [p.name for p in registry.concepts_dir.iterdir() if p.name.startswith(".")]


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["a", "dog", "my-dog_2", "0cat", "x" * 64])
def test_valid_names_pass(name):
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "..", ".", "../etc", "a/b", "a\\b", "/abs", "My Dog", "dog ", "dog\n", "-dog", "_dog", "x" * 65,
     "dög", "mydоg", "ｍｙｄｏｇ", "a\x00b", "DOG", "dog.v2", "~dog"],
)
def test_hostile_names_are_refused_with_a_valid_suggestion(name):
    with pytest.raises(InvalidName) as caught:
        validate_name(name)
    suggestion = suggest_name(name)
    assert validate_name(suggestion) == suggestion
    assert repr(suggestion) in str(caught.value)


def test_suggestions_fold_look_alikes_and_separators():
    assert suggest_name("mydоg") == "mydog"  # Cyrillic о
    assert suggest_name("ｍｙｄｏｇ") == "mydog"  # full-width
    assert suggest_name("My Dog") == "my-dog"
    assert suggest_name("../etc/passwd") == "etc-passwd"
    assert suggest_name("..") == "my-concept"


def test_hostile_names_never_reach_the_file_system(stc_home):
    registry = Registry()
    for name in ("../outside", "a/b", ".."):
        with pytest.raises(InvalidName):
            registry.load(name)
        with pytest.raises(InvalidName):
            registry.rename("x", name)
    assert not stc_home.exists()


# --------------------------------------------------------------------------- save and load


def test_save_load_round_trip(stc_home):
    registry = Registry()
    saved = make_concept(registry, "blob")
    loaded = registry.load("blob")
    assert loaded.token == "<blob>" and loaded.path == stc_home / "concepts" / "blob"
    assert loaded.weights_sha256 == sha256_file(loaded.weights_path) == saved.weights_sha256
    assert read_yaml(registry, "blob")["schema_version"] == SCHEMA_VERSION
    assert loaded.complete and loaded.steps_done == 10 and loaded.rank_max == 128
    assert check_weights(loaded).ok
    mapper = load_mapper(loaded)
    assert mapper.config.text_width == 32


def test_incomplete_training_is_visible():
    concept = make_concept(Registry(), "half", steps_done=4)
    assert not concept.complete and concept.steps_done == 4 and concept.steps_planned == 10


def test_reading_creates_no_folders(stc_home):
    registry = Registry()
    assert registry.names() == [] and list(scan(registry)) == [] and registry.foreign_entries() == []
    with pytest.raises(ConceptNotFound):
        registry.load("blob")
    with pytest.raises(ConceptNotFound):
        registry.remove("blob")
    assert not stc_home.exists()


def test_unknown_keys_survive_every_rewrite():
    registry = Registry()
    make_concept(registry, "blob")
    data = read_yaml(registry, "blob")
    data["future_field"] = {"kept": True}
    write_yaml(registry, "blob", data)
    assert registry.load("blob").extra == {"future_field": {"kept": True}}

    registry.rename("blob", "blob2")
    assert read_yaml(registry, "blob2")["future_field"] == {"kept": True}
    registry.copy("blob2", "blob3")
    assert read_yaml(registry, "blob3")["future_field"] == {"kept": True}
    retrain(registry, "blob3")  # a fresh Concept without the key replaces the entry
    assert read_yaml(registry, "blob3")["future_field"] == {"kept": True}


# --------------------------------------------------------------------------- schema


def test_schema_0_is_migrated_and_rewritten_as_current():
    registry = Registry()
    make_concept(registry, "old")
    data = read_yaml(registry, "old")
    del data["schema_version"], data["metrics"]
    data["sha256"] = data.pop("weights_sha256")
    write_yaml(registry, "old", data)

    concept = registry.load("old")
    assert concept.migrated_from == 0 and concept.schema_version == SCHEMA_VERSION
    assert concept.weights_sha256 == sha256_file(concept.weights_path) and concept.extra == {}
    registry.rename("old", "renewed")
    rewritten = read_yaml(registry, "renewed")
    assert rewritten["schema_version"] == SCHEMA_VERSION and "sha256" not in rewritten
    assert rewritten["weights_sha256"] == sha256_file(registry.path_of("renewed") / "mapper.safetensors")
    assert check_weights(registry.load("renewed")).ok


def test_newer_schema_is_a_clear_error():
    registry = Registry()
    make_concept(registry, "future")
    data = read_yaml(registry, "future")
    data["schema_version"] = SCHEMA_VERSION + 1
    write_yaml(registry, "future", data)
    with pytest.raises(UnsupportedSchema, match="newer than this stc understands.*upgrade stc"):
        registry.load("future")


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("name: [unclosed", "is not valid YAML"),
        ("- just\n- a list\n", "does not hold a mapping"),
        ("name: blob\n", "lacks"),
        ("schema_version: banana\n", "invalid schema_version"),
    ],
)
def test_corrupt_yaml_is_a_clear_error_naming_the_file(text, fragment):
    registry = Registry()
    make_concept(registry, "blob")
    (registry.path_of("blob") / CONCEPT_FILE).write_text(text)
    with pytest.raises(CorruptConcept, match=fragment) as caught:
        registry.load("blob")
    assert CONCEPT_FILE in str(caught.value)


def test_wrong_types_and_foreign_names_are_corrupt():
    registry = Registry()
    make_concept(registry, "blob")
    data = read_yaml(registry, "blob")
    write_yaml(registry, "blob", {**data, "layer_names": "l0"})
    with pytest.raises(CorruptConcept, match="layer_names"):
        registry.load("blob")
    write_yaml(registry, "blob", {**data, "name": "other"})
    with pytest.raises(CorruptConcept, match="folder is 'blob'"):
        registry.load("blob")


def test_scan_reports_problems_and_foreign_entries_without_raising():
    registry = Registry()
    make_concept(registry, "good")
    make_concept(registry, "bad")
    (registry.path_of("bad") / CONCEPT_FILE).write_text(":\n  - [")
    (registry.concepts_dir / "empty").mkdir()
    (registry.concepts_dir / "Not A Name").mkdir()
    (registry.concepts_dir / "notes.txt").write_text("hi")
    results = {name: (concept, problem) for name, concept, problem in scan(registry)}
    assert results["good"][0] is not None and results["good"][1] is None
    assert isinstance(results["bad"][1], CorruptConcept)
    assert "has no concept.yaml" in str(results["empty"][1])
    foreign = {path.name: reason for path, reason in registry.foreign_entries()}
    assert set(foreign) == {"Not A Name", "notes.txt"}
    assert "not-a-name" in foreign["Not A Name"]


# --------------------------------------------------------------------------- weights


def test_sha_mismatch_is_a_clear_error_naming_the_file():
    registry = Registry()
    concept = make_concept(registry, "blob")
    data = bytearray(concept.weights_path.read_bytes())
    data[-1] ^= 0xFF  # same size, one flipped byte
    concept.weights_path.write_bytes(bytes(data))
    with pytest.raises(DamagedWeights, match="sha256") as caught:
        load_mapper(registry.load("blob"))
    assert str(concept.weights_path) in str(caught.value)
    assert not check_weights(registry.load("blob")).ok


def test_truncated_weights_are_a_clear_error_even_with_a_matching_sha():
    registry = Registry()
    concept = make_concept(registry, "blob")
    weights = concept.weights_path
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    def wording(message):  # the message without its paths (pytest's tmp_path holds the test's name)
        return str(message).replace(str(weights), "<weights>").replace(str(registry.root), "<root>")

    with pytest.raises(DamagedWeights) as caught:
        read_state_dict(registry.load("blob"))
    assert str(weights) in str(caught.value)
    assert "truncated" in wording(caught.value), str(caught.value)
    data = read_yaml(registry, "blob")  # someone "fixed" the hash: still caught
    write_yaml(registry, "blob", {**data, "weights_sha256": sha256_file(weights)})
    with pytest.raises(DamagedWeights) as caught:
        read_state_dict(registry.load("blob"))
    assert "truncated" in wording(caught.value), str(caught.value)
    weights.write_bytes(b"\x01")
    check = check_weights(registry.load("blob"))
    assert not check.ok and "truncated" in wording(check.problem), check.problem


def test_missing_weights_are_reported():
    registry = Registry()
    concept = make_concept(registry, "blob")
    concept.weights_path.unlink()
    with pytest.raises(DamagedWeights) as caught:
        read_state_dict(registry.load("blob"))
    # matched without the paths: pytest's tmp_path holds the test's name, which says "missing"
    wording = str(caught.value).replace(str(concept.weights_path), "<weights>").replace(str(registry.root), "<root>")
    assert "missing" in wording, str(caught.value)


# --------------------------------------------------------------------------- atomic writes


def test_a_save_that_fails_half_way_leaves_the_previous_state(monkeypatch):
    registry = Registry()
    make_concept(registry, "blob", seed=0)
    before = entry_bytes(registry.path_of("blob"))

    from pathlib import Path

    real_write_bytes = Path.write_bytes

    def half_written(path, data):
        if path.name == "mapper.safetensors":  # the disk fills up while the weights are written
            real_write_bytes(path, data[:1000])
            raise OSError(28, "No space left on device")
        return real_write_bytes(path, data)

    monkeypatch.setattr(Path, "write_bytes", half_written)
    with pytest.raises(RegistryWriteError, match="No space left on device; nothing was changed"):
        retrain(registry, "blob")
    with pytest.raises(RegistryWriteError):
        make_concept(registry, "fresh")
    assert entry_bytes(registry.path_of("blob")) == before
    assert check_weights(registry.load("blob")).ok
    assert not registry.path_of("fresh").exists()
    assert hidden_leftovers(registry) == []


def test_a_failed_swap_puts_the_previous_entry_back(monkeypatch):
    registry = Registry()
    make_concept(registry, "blob", seed=0)
    before = entry_bytes(registry.path_of("blob"))
    real_replace = os.replace

    def failing_replace(source, target):
        if ".tmp-" in str(source) and str(target).endswith("blob"):
            raise OSError(5, "Input/output error")
        return real_replace(source, target)

    import stc.atomic

    monkeypatch.setattr(stc.atomic, "_exchange", lambda first, second: False)  # two renames, not one swap
    monkeypatch.setattr(registry_module.os, "replace", failing_replace)
    with pytest.raises(RegistryWriteError, match="Input/output"):
        retrain(registry, "blob")
    assert entry_bytes(registry.path_of("blob")) == before
    assert hidden_leftovers(registry) == []


def test_save_refuses_to_overwrite_unless_asked():
    registry = Registry()
    make_concept(registry, "blob")
    with pytest.raises(ConceptExists, match="stc rm blob"):
        make_concept(registry, "blob")


# --------------------------------------------------------------------------- rename, copy, remove


def test_rename_moves_the_entry_and_the_token_follows():
    registry = Registry()
    original = make_concept(registry, "blob")
    (original.path / "preview.png").write_bytes(b"png")
    tensors = read_state_dict(original)
    renamed = registry.rename("blob", "cat-toy")
    assert renamed.token == "<cat-toy>" and not registry.path_of("blob").exists()
    loaded = registry.load("cat-toy")
    assert loaded.name == "cat-toy" and read_yaml(registry, "cat-toy")["token"] == "<cat-toy>"
    assert check_weights(loaded).ok and weights_header_name(loaded) == "cat-toy"  # the header follows
    assert tensors_equal(read_state_dict(loaded), tensors)
    assert (loaded.path / "preview.png").read_bytes() == b"png"
    assert registry.names() == ["cat-toy"] and hidden_leftovers(registry) == []


def test_rename_errors():
    registry = Registry()
    make_concept(registry, "blob")
    make_concept(registry, "other")
    with pytest.raises(ConceptExists):
        registry.rename("blob", "other")
    with pytest.raises(ConceptNotFound, match="blob"):
        registry.rename("blub", "new")
    with pytest.raises(BadInput):
        registry.rename("blob", "blob")
    assert registry.names() == ["blob", "other"]


def test_copy_is_independent_and_refuses_damaged_weights():
    registry = Registry()
    source = make_concept(registry, "blob")
    copy = registry.copy("blob", "blob-copy")
    assert copy.name == "blob-copy" and registry.load("blob").name == "blob"
    assert tensors_equal(read_state_dict(copy), read_state_dict(source)) and weights_header_name(copy) == "blob-copy"
    assert check_weights(copy).ok and not os.path.samefile(copy.weights_path, source.weights_path)
    source.weights_path.write_bytes(source.weights_path.read_bytes()[:100])
    with pytest.raises(DamagedWeights, match="cannot copy"):
        registry.copy("blob", "another")
    assert not registry.path_of("another").exists()


def test_remove_deletes_damaged_entries_too():
    registry = Registry()
    concept = make_concept(registry, "blob")
    (concept.path / CONCEPT_FILE).write_text("{{{")
    freed = registry.remove("blob")
    assert freed > 0 and registry.names() == [] and hidden_leftovers(registry) == []


def test_rename_waits_for_the_concept_lock():
    registry = Registry()
    make_concept(registry, "blob")
    finished = threading.Event()

    def rename():
        registry.rename("blob", "moved")
        finished.set()

    with registry.lock("blob"):
        worker = threading.Thread(target=rename)
        worker.start()
        time.sleep(0.3)
        assert not finished.is_set()  # blocked while a writer holds "blob"
    worker.join(timeout=10)
    assert finished.is_set() and registry.names() == ["moved"]


@pytest.mark.parametrize("overwrite", [False, True], ids=["new entry", "replaced entry"])
def test_every_staged_file_is_fsynced_before_the_entry_is_swapped_in(monkeypatch, overwrite):
    """The durability promise, file by file: when a save makes its staging folder the entry (a
    rename or the atomic exchange), every file and folder in it has been fsynced."""
    import stc.atomic as atomic
    import stc.store.storage as storage

    if overwrite:
        save_concept("durable", seed=1)
    synced: set[str] = set()
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.add(os.path.realpath(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    swaps = []

    def check_staging(staging):
        staged = [os.path.join(d, name) for d, _, files in os.walk(staging) for name in files]
        staged += [d for d, _, _ in os.walk(staging)]
        missing = [path for path in staged if os.path.realpath(path) not in synced]
        swaps.append(staging)
        assert staged and not missing, f"swapped in before fsync: {missing}"

    real_replace, real_exchange = storage.os.replace, atomic._exchange

    def replace(source, target):
        if os.path.basename(str(source)).startswith(".tmp-durable-"):
            check_staging(source)
        return real_replace(source, target)

    def exchange(first, second):
        check_staging(first)
        return real_exchange(first, second)

    monkeypatch.setattr(storage.os, "fsync", recording_fsync)
    monkeypatch.setattr(storage.os, "replace", replace)
    monkeypatch.setattr(atomic, "_exchange", exchange)
    registry = Registry()
    concept = registry.load("durable") if overwrite else helpers.make_concept("durable")
    registry.save(concept, weights_bytes(make_mapper(2), "durable"), overwrite=overwrite,
                  extra_files={"previews/step-000001.png": b"png"})  # a file in a subfolder too
    assert len(swaps) == 1
