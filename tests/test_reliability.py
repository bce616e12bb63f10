"""Crash safety and concurrency of the registry, counted.

Crash safety: a writer (``fault_worker.py``, a subprocess) repeats one registry operation (an
overwrite of an existing concept with new weights, a fresh save, ``Registry.rename``/``stc mv``,
``Registry.copy``/``stc cp``, ``Registry.remove``/``stc rm``) and is SIGKILLed after a seeded
random delay, or the moment it reaches a chosen phase of the write. After each kill every
concept must be the complete old or the complete new version (loaded, sha256 verified, tensors
decoded and equal to the version its concept.yaml names), ``stc ls`` must list them without an
error, and the next write must sweep the killed writer's staging folders.

Concurrency: workers share one registry: create races on the same name (exactly one wins, the
others get ConceptExists, the stored entry is the winner's), then a seeded mix of overwrites of a
shared name, listings, loads with verification, renames, copies and removals.

``STC_FAULT_TRIALS`` sets the number of kills (default 20, each under a second; the full form
runs 200: ``STC_FAULT_TRIALS=200 pytest -m reliability``). Counts: ``build/reliability-counts.json``
and the terminal summary.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import fault_worker
import pytest
import reliability_counts as counts
import torch
from helpers import invoke, make_mapper
from safetensors.torch import load as load_tensors

from stc.errors import ConceptNotFound, StcError
from stc.store.conceptio import read_state_dict, weights_bytes
from stc.store.listing import listing
from stc.store.registry import Registry, check_weights
from stc.store.storage import WORK_FOLDER, leftovers

WORKER = Path(__file__).with_name("fault_worker.py")
VERSIONS = ("A", "B", "C")  # an overwrite run writes B, C, A, B, ...: the old and new version differ
OPS = ("overwrite", "create", "rename", "copy", "delete")
_NEW_ENTRY = ("stage", "fsync", "swap-in", "swap-in-done", "cleanup")
_REMOVAL = ("discard", "discard-rename", "discard-delete")
PHASES = {  # where each operation can be caught (targets of the targeted kills), by swap path
    ("overwrite", "exchange"): ("sweep", "stage", "fsync", "exchange", "exchange-done", "cleanup"),
    ("overwrite", "portable"): ("sweep", "stage", "fsync", "set-aside", "between-renames", "swap-in",
                                "swap-in-done", "cleanup"),
    ("create", None): ("sweep", *_NEW_ENTRY),
    ("rename", None): ("sweep", *_NEW_ENTRY, *_REMOVAL),
    ("copy", None): ("sweep", "verify", *_NEW_ENTRY),
    ("delete", None): ("sweep", "verify", *_NEW_ENTRY, *_REMOVAL),
}
HIDDEN = (".tmp-", ".old-", ".trash-")

pytestmark = pytest.mark.reliability


from reliability_counts import cli_built_once, collector  # noqa: E402,F401  (autouse fixtures)

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    """Three versions of a concept's weights and the metadata the worker builds concepts from."""
    folder = tmp_path_factory.mktemp("fault-spec")
    mapper = make_mapper(0)
    weights, tensors = {}, {}
    for seed, version in enumerate(VERSIONS, start=1):
        content = weights_bytes(make_mapper(seed), "spec")
        (folder / f"{version}.safetensors").write_bytes(content)
        weights[version] = str(folder / f"{version}.safetensors")
        tensors[version] = load_tensors(content)
    data = {"text_width": 32, "layer_names": [f"l{i}" for i in range(16)], "mapper": mapper.config.to_dict(),
            "weights": weights}
    (folder / "spec.json").write_text(json.dumps(data))
    fault_worker.load_spec(str(folder / "spec.json"))
    return {"path": str(folder / "spec.json"), "tensors": tensors, "folder": folder}


@pytest.fixture(scope="module")
def template(spec, tmp_path_factory):
    """A registry every trial starts from (copied): keep (A), x (A), ra (A), src (B), seed (A)."""
    root = tmp_path_factory.mktemp("fault-template") / "home"
    registry = Registry(root)
    for name, version in (("keep", "A"), ("x", "A"), ("ra", "A"), ("src", "B"), ("seed", "A")):
        registry.save(fault_worker.concept(name, version), fault_worker.WEIGHTS[version])
    return root


# --------------------------------------------------------------------------- checks


def entry_version(registry: Registry, name: str, tensors: dict) -> str:
    """The version ("A", "B", "C") of a complete entry; raises AssertionError for anything less."""
    concept = registry.load(name)
    check = check_weights(concept)
    assert check.ok and check.problem is None, f"{name}: {check.problem}"
    version = concept.extra.get("fault_version")
    assert version in tensors, f"{name}: concept.yaml names version {version!r}"
    state = read_state_dict(concept)
    expected = tensors[version]
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected), (
        f"{name}: its tensors are not those of version {version}")
    return version


def expected_state(op: str, ops_done: int, names: set[str]) -> tuple[dict, set[str]]:
    """What may be in the registry after a kill: {name: allowed versions} that must exist, and
    the names that may exist (with any complete version of the operation)."""
    required = {"keep": {"A"}, "seed": {"A"}}
    optional: set[str] = set()
    if op == "overwrite":
        required["x"] = {VERSIONS[ops_done % 3], VERSIONS[(ops_done + 1) % 3]}  # complete old or new
    else:
        required["x"] = {"A"}
    required["src"] = {"B"}
    if op == "rename":
        for name in names & {"ra", "rb"} or {"ra"}:  # a kill between the two steps of mv leaves both
            required[name] = {"A"}
    else:
        required["ra"] = {"A"}
    if op == "create":
        required.update({f"new{j}": {"A"} for j in range(ops_done)})
        optional.add(f"new{ops_done}")
    if op == "copy":
        required.update({f"cp{j}": {"B"} for j in range(ops_done)})
        optional.add(f"cp{ops_done}")
    if op == "delete":
        optional.add("d")
    return required, optional


def check_entries(registry: Registry, op: str, ops_done: int, tensors: dict, tally: Counter,
                  missing_ok: set[str] = frozenset()) -> list[str]:
    """Every required entry complete, optional ones complete when present, nothing else."""
    names = set(registry.names())
    required, optional = expected_state(op, ops_done, names)
    problems = []
    for name in sorted(names | set(required)):
        if name not in names:
            if name not in missing_ok:
                problems.append(f"{name} is missing")
                tally["concepts_lost"] += 1
            continue
        if name not in required and name not in optional and name != "probe":
            problems.append(f"unexpected entry {name}")
            continue
        try:
            version = entry_version(registry, name, tensors)
        except (AssertionError, StcError) as exc:
            problems.append(f"{name}: {exc}")
            tally["concepts_damaged"] += 1
            continue
        if name == "probe":
            allowed = {"A"}
        elif name in required:
            allowed = required[name]
        else:  # a copy of src (B) or a fresh save (A)
            allowed = {"B"} if op in ("copy", "delete") else {"A"}
        if version not in allowed:
            problems.append(f"{name} is version {version}, expected one of {sorted(allowed)}")
            tally["concepts_damaged"] += 1
        tally["entries_checked"] += 1
    return problems


def set_aside_by_dead_writer(registry: Registry) -> set[str]:
    """Names whose previous entry waits in a dead writer's .old-<name>-* (portable swap path)."""
    found = set()
    for item in leftovers(registry.concepts_dir):
        entry = item / "entry"
        if item.name.startswith(".old-") and entry.is_dir():
            found.add(item.name[len(".old-"):].rsplit("-", 2)[0])
    return found


def stc_ls_json(root: Path):
    return invoke("ls", "--json", env={"STC_HOME": str(root)})


def ls_lists(root: Path, names: set[str], cli: bool = True) -> list[str]:
    """`stc ls --json` exits 0 and lists exactly ``names``; listing.listing reports no problem."""
    problems = []
    registry = Registry(root)
    for name, record, problem in listing(registry):
        if problem is not None:
            problems.append(f"listing: {name}: {problem}")
        elif record["weights_problem"]:
            problems.append(f"listing: {name}: weights {record['weights_problem']}")
    if not cli:
        return problems
    result = stc_ls_json(root)
    if result.exit_code != 0 or "Error" in result.stderr:
        problems.append(f"stc ls failed: {result.exit_code} {result.stderr.strip()}")
    else:
        listed = {record["name"] for record in json.loads(result.stdout)}
        if listed != names:
            problems.append(f"stc ls listed {sorted(listed)}, the registry holds {sorted(names)}")
    return problems


# --------------------------------------------------------------------------- crash safety


def start_worker(args: dict) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.Popen([sys.executable, str(WORKER), json.dumps(args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=str(WORKER.parent))


def read_marker(path: Path) -> tuple[int, str]:
    text = path.read_text().split("\n")[0]
    ops, phase = text.split(maxsplit=1)
    return int(ops), phase.strip()


def kill_at_phase(process: subprocess.Popen, marker: Path, phase: str, limit: float = 1.0) -> bool:
    """SIGKILL as soon as the worker marks ``phase`` (within ``limit`` seconds); False if it never did."""
    fd = os.open(marker, os.O_RDONLY)
    try:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if os.pread(fd, 32, 0)[9:31].decode(errors="replace").strip() == phase:
                process.kill()
                return True
        process.kill()
        return False
    finally:
        os.close(fd)


# Every (operation, swap path, phase) a targeted kill aims at, interleaved so that a short run
# covers every operation: the first phase of each, then the second, ...
TARGETS = [combo for _, combo in sorted(
    ((position, order), (op, mode, phase))
    for order, ((op, mode), phases) in enumerate(PHASES.items()) for position, phase in enumerate(phases))]


def run_trial(index: int, rng: random.Random, spec: dict, template: Path, work: Path, tally: Counter,
              landed: Counter, landed_targets: set) -> list[str]:
    """Odd trials aim at the next target of TARGETS (the worker pauses there); even trials kill
    the next operation of OPS after a random delay of 0-250 ms."""
    targeted = index % 2 == 1
    if targeted:
        op, mode, target = TARGETS[(index // 2) % len(TARGETS)]
        no_exchange = mode == "portable" if mode else rng.random() < 0.5
    else:
        op, mode, target = OPS[(index // 2) % len(OPS)], None, None
        no_exchange = rng.random() < 0.5
    via_cli = op in ("rename", "copy", "delete") and rng.random() < 0.3
    root = work / f"trial-{index}"
    shutil.copytree(template, root)
    marker = work / f"trial-{index}.marker"
    process = start_worker({"mode": "crash", "spec": spec["path"], "root": str(root), "op": op,
                            "marker": str(marker), "no_exchange": no_exchange, "cli": via_cli, "hold": target})
    try:
        line = process.stdout.readline()
        assert line.strip() == b"ready", process.stderr.read().decode()
        if targeted:  # the worker pauses at the target phase: the kill lands exactly there
            kill_at_phase(process, marker, target)
            tally["kills_targeted"] += 1
        else:
            time.sleep(rng.uniform(0.0, 0.25))
            process.kill()
            tally["kills_random"] += 1
    finally:
        process.kill()
        process.wait()  # reaped: a zombie's pid would still look alive to the sweep
    stderr = process.stderr.read().decode()
    assert "Traceback" not in stderr, stderr
    ops_done, phase = read_marker(marker)
    if targeted:
        tally["kills_targeted_landed_on_target"] += phase == target
        if phase == target:
            landed_targets.add((op, mode, target))
    tally["trials"] += 1
    tally[f"trials_{op}"] += 1
    tally["trials_cli"] += via_cli
    tally["trials_portable_swap"] += no_exchange
    tally["operations_completed"] += ops_done
    mid = phase not in ("idle", "ready")
    tally["kills_mid_operation"] += mid
    landed[f"{op}:{phase}"] += 1

    registry = Registry(root)
    problems = []
    # Before any other write: what a reader sees right after the crash.
    aside = set_aside_by_dead_writer(registry)
    missing_ok = aside if no_exchange else set()  # the portable swap's documented window
    problems += [f"after the kill: {p}" for p in check_entries(registry, op, ops_done, spec["tensors"], tally,
                                                               missing_ok)]
    tally["recoverable_only_by_sweep"] += len(aside - set(registry.names()))
    problems += [f"after the kill: {p}" for p in ls_lists(root, set(registry.names()))]
    stray = [item.name for item in leftovers(registry.concepts_dir)]
    tally["stray_folders_after_kill"] += len(stray)
    owners = {int(WORK_FOLDER.fullmatch(name)["pid"]) for name in stray}
    if owners - {process.pid}:
        problems.append(f"stray folders not named after the killed writer ({process.pid}): {stray}")
    for prefix in HIDDEN:
        tally[f"stray_{prefix.strip('.-')}"] += sum(name.startswith(prefix) for name in stray)
    # The next write sweeps the dead writer's folders and puts a set-aside entry back.
    registry.save(fault_worker.concept("probe", "A"), fault_worker.WEIGHTS["A"])
    hidden = sorted(p.name for p in registry.concepts_dir.iterdir() if p.name.startswith(HIDDEN))
    if hidden:
        problems.append(f"not swept by the next write: {hidden}")
        tally["stray_folders_not_swept"] += len(hidden)
    problems += [f"after the sweep: {p}" for p in check_entries(registry, op, ops_done, spec["tensors"], tally)]
    problems += [f"after the sweep: {p}" for p in ls_lists(root, set(registry.names()), cli=False)]
    return [f"trial {index} ({op}, killed at {phase}, {ops_done} ops done, "
            f"{'portable swap' if no_exchange else 'exchange'}{', cli' if via_cli else ''}): {p}" for p in problems]


def test_sigkill_at_random_points_loses_nothing(spec, template, tmp_path):
    trials = counts.trials()
    rng = random.Random(20240611)
    tally, landed, landed_targets = Counter(), Counter(), set()
    problems: list[str] = []
    started = time.perf_counter()
    for index in range(trials):
        problems += run_trial(index, rng, spec, template, tmp_path, tally, landed, landed_targets)
    elapsed = time.perf_counter() - started
    for key, value in tally.items():
        counts.record("crash", key, value)
    counts.record("crash", "violations", len(problems))
    counts.record("crash", "concepts_lost", 0)
    phases = Counter(key.split(":", 1)[1] for key in landed.elements())
    counts.detail("crash", "kills_by_phase", dict(sorted(phases.items())))
    counts.detail("crash", "seconds_per_trial", round(elapsed / trials, 3))
    assert not problems, "\n".join(problems[:20])
    assert tally["concepts_lost"] == 0 and tally["concepts_damaged"] == 0
    assert tally["kills_mid_operation"] >= trials // 2, f"too few kills landed mid-write: {dict(phases)}"
    assert tally["kills_targeted_landed_on_target"] == tally["kills_targeted"]
    counts.detail("crash", "targets_covered", f"{len(landed_targets)} of {len(TARGETS)} (operation, swap path, phase)")
    if trials >= 2 * len(TARGETS):
        assert landed_targets == set(TARGETS)


# --------------------------------------------------------------------------- concurrency


def test_concurrent_writers_readers_and_create_races(spec, template, tmp_path):
    trials = counts.trials()
    workers = 4
    races, slot = trials, 0.1
    seconds = 2.0 + trials / 20
    root = tmp_path / "home"
    shutil.copytree(template, root)
    registry = Registry(root)
    registry.save(fault_worker.concept("hot", "A"), fault_worker.WEIGHTS["A"])
    registry.save(fault_worker.concept("mv-a", "A"), fault_worker.WEIGHTS["A"])
    start = time.time() + 1.0  # after every worker has started
    processes, outputs = [], []
    for worker in range(workers):
        out = tmp_path / f"worker-{worker}.json"
        outputs.append(out)
        processes.append(start_worker({
            "mode": "stress", "spec": spec["path"], "root": str(root), "worker": worker, "workers": workers,
            "seed": 1000 + worker, "start": start, "races": races, "slot": slot, "seconds": seconds,
            "out": str(out),
        }))
    for process in processes:
        _, stderr = process.communicate(timeout=races * slot + seconds + 120)
        assert process.returncode == 0, stderr.decode()
    results = [json.loads(out.read_text()) for out in outputs]

    violations = [v for result in results for v in result["violations"]]
    tally = Counter()
    for result in results:
        tally.update(result["counts"])
    # Create races: exactly one winner, every other contender told ConceptExists, the entry is the winner's.
    by_race: dict[int, list[dict]] = {}
    for result in results:
        for attempt in result["races"]:
            by_race.setdefault(attempt["race"], []).append(attempt)
    race_violations = []
    for race, attempts in sorted(by_race.items()):
        winners = [a for a in attempts if a["outcome"] == "won"]
        others = [a for a in attempts if a["outcome"] not in ("won", "exists")]
        stored = registry.load(f"race-{race}")
        if len(winners) != 1 or others:
            race_violations.append(f"race {race}: {attempts}")
        elif stored.extra.get("race_tag", "seed") != winners[0]["tag"] or not check_weights(stored).ok:
            race_violations.append(f"race {race}: the entry is {stored.extra.get('race_tag')!r}, the winner "
                                   f"{winners[0]['tag']!r} (silently overwritten)")
        tally["race_contenders"] += len(attempts)
        tally["race_contenders_by_copy"] += sum(a["by_copy"] for a in attempts)
    # Afterwards everything is whole: one of mv-a/mv-b, hot and every own-<i>, no staging folders.
    final = set(registry.names())
    final_problems = []
    if len(final & {"mv-a", "mv-b"}) != 1:
        final_problems.append(f"renamed concept: {sorted(final & {'mv-a', 'mv-b'})}")
    for name in sorted(final):
        try:
            entry_version(registry, name, spec["tensors"])
        except (AssertionError, StcError) as exc:
            final_problems.append(f"{name}: {exc}")
    hidden = [p.name for p in registry.concepts_dir.iterdir() if p.name.startswith(HIDDEN)]
    final_problems += [f"left behind: {name}" for name in hidden]
    final_problems += ls_lists(root, final)

    counts.record("concurrency", "processes", workers)
    counts.record("concurrency", "races_run", len(by_race))
    counts.record("concurrency", "race_violations", len(race_violations))
    counts.record("concurrency", "reader_violations", len(violations))
    counts.record("concurrency", "final_state_problems", len(final_problems))
    for key, value in tally.items():
        counts.record("concurrency", key, value)
    assert len(by_race) == races
    assert not race_violations, "\n".join(race_violations[:10])
    assert not violations, "\n".join(violations[:20])
    assert not final_problems, "\n".join(final_problems)
    assert tally["read_verified"] > 0 and tally["save_hot"] > 0 and tally["renames"] > 0


# --------------------------------------------------------------------------- readers (deterministic)


def test_a_reader_racing_a_save_is_told_so_not_that_the_concept_is_damaged(spec, stc_home):
    """Readers take no lock: a save between reading concept.yaml and hashing the weights makes
    the check fail; it says another process saved the concept, and the next load verifies."""
    registry = Registry()
    registry.save(fault_worker.concept("hot", "A"), fault_worker.WEIGHTS["A"])
    loaded = registry.load("hot")
    registry.save(fault_worker.concept("hot", "B"), fault_worker.WEIGHTS["B"], overwrite=True)
    check = check_weights(loaded)
    assert not check.ok and "saved again by another process" in check.problem
    registry.rename("hot", "cold")
    assert "renamed or removed by another process" in check_weights(loaded).problem
    fresh = registry.load("cold")
    assert check_weights(fresh).ok and entry_version(registry, "cold", spec["tensors"]) == "B"
    with pytest.raises(ConceptNotFound):
        registry.load("hot")


def test_a_reader_racing_two_saves_that_restore_the_same_content_is_told_so(spec, stc_home, monkeypatch):
    """A -> B -> A while one reader checks: it read concept.yaml of A, hashes B's weights, and
    finds concept.yaml recording A again. The content is the same, the file is not: still a
    race, never "damaged" (the one failure of the stress test above under heavy load)."""
    from stc.store import registry as registry_module

    registry = Registry()
    registry.save(fault_worker.concept("hot", "A"), fault_worker.WEIGHTS["A"])
    loaded = registry.load("hot")
    registry.save(fault_worker.concept("hot", "B"), fault_worker.WEIGHTS["B"], overwrite=True)
    real_hash = registry_module.sha256_file

    def hash_then_restore_a(path):
        digest = real_hash(path)  # B's weights
        registry.save(fault_worker.concept("hot", "A"), fault_worker.WEIGHTS["A"], overwrite=True)
        return digest

    monkeypatch.setattr(registry_module, "sha256_file", hash_then_restore_a)
    check = check_weights(loaded)
    monkeypatch.undo()
    assert registry.load("hot").weights_sha256 == loaded.weights_sha256  # the same content again
    assert not check.ok and "saved again by another process" in check.problem, check.problem
    # ... and the stress test's readers count it as a race, not as damage (CI once saw them not).
    assert fault_worker.raced_a_write(registry, "hot", loaded, check)
    assert check_weights(registry.load("hot")).ok


def test_a_load_racing_a_removal_is_not_found_not_damaged(stc_home, monkeypatch):
    """A listing saw the folder; it is removed before concept.yaml is read: ConceptNotFound."""
    from helpers import save_concept

    registry = Registry()
    save_concept("gone")
    real_folder_of = Registry.folder_of
    calls = []

    def folder_of_then_removed(self, name):
        path = real_folder_of(self, name)
        if not calls:  # the first look finds it; then another process removes it
            calls.append(name)
            shutil.rmtree(path)
        return path

    monkeypatch.setattr(Registry, "folder_of", folder_of_then_removed)
    with pytest.raises(ConceptNotFound):
        registry.load("gone")


def test_read_state_dict_never_returns_weights_it_did_not_verify(spec, stc_home, monkeypatch):
    import stc.store.conceptio as conceptio

    registry = Registry()
    registry.save(fault_worker.concept("hot", "A"), fault_worker.WEIGHTS["A"])
    loaded = registry.load("hot")
    real_check = conceptio.check_weights

    def check_then_saved(concept, hash_file=True):
        result = real_check(concept, hash_file)
        registry.save(fault_worker.concept("hot", "B"), fault_worker.WEIGHTS["B"], overwrite=True)
        return result

    monkeypatch.setattr(conceptio, "check_weights", check_then_saved)
    try:
        state = read_state_dict(loaded)
    except StcError:
        return  # refusing is fine
    assert all(torch.equal(state[key], spec["tensors"]["A"][key]) for key in state)
