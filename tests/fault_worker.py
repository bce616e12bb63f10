"""A registry writer for the reliability tests: run as a subprocess, then killed or raced.

It imports only the torch-free registry (about 0.1 s to start), so a test can start hundreds.
Arguments: one JSON object (see ``crash`` and ``stress`` below). The weights bytes and the
concept metadata come from files the test wrote (``spec.json``: mapper config, layer names and
the paths of each version's ``mapper.safetensors`` bytes).

``crash``: prints ``ready`` on stdout, then repeats one operation until it is killed. Before
every step it writes where it is (``<ops done> <phase>``) into the first bytes of a small file
with one ``pwrite``, so the test knows where each SIGKILL landed. The phases are marked by
wrapping the registry's storage functions: ``sweep``, ``stage`` (staging folder being filled),
``fsync``, ``swap`` (the folder swap or rename), ``cleanup`` (previous entry being deleted),
``verify`` (a copy's sha256 check), ``discard`` (a removal's rename and delete), ``idle``.

``stress``: runs for a fixed time with other workers on the same registry: create races on
scheduled time slots, then a seeded mix of saves, reads, listings, renames, copies and removals.
Writes its counts and any violation into a JSON file.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

from stc import atomic
from stc.errors import ConceptExists, ConceptNotFound, StcError
from stc.store import registry as registry_module
from stc.store import storage
from stc.store.concept import Concept, MetricsRecord, TrainingRecord
from stc.store.registry import Registry, check_weights

SPEC: dict = {}
WEIGHTS: dict[str, bytes] = {}


def load_spec(path: str) -> None:
    SPEC.update(json.loads(Path(path).read_text()))
    for version, weights_path in SPEC["weights"].items():
        WEIGHTS[version] = Path(weights_path).read_bytes()


def concept(name: str, version: str, **extra) -> Concept:
    """A concept of ``version`` ("A" or "B"): its concept.yaml says which (key ``fault_version``)."""
    return Concept(
        name=name, base_model="builtin:tiny", initializer="cat", text_width=SPEC["text_width"],
        layer_names=list(SPEC["layer_names"]), mapper=dict(SPEC["mapper"]),
        training=TrainingRecord(), metrics=MetricsRecord(), extra={"fault_version": version, **extra},
    )


# --------------------------------------------------------------------------- crash mode


class Marker:
    """Where the worker is, in the first 32 bytes of a file (one pwrite per step). With ``hold``
    it pauses 50 ms each time it reaches that phase, so that a kill aimed there lands there."""

    def __init__(self, path: str, hold: str | None = None):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        self.ops = 0
        self.hold = hold

    def __call__(self, phase: str) -> None:
        os.pwrite(self.fd, f"{self.ops:08d} {phase:<22}\n".encode(), 0)
        if phase == self.hold:
            time.sleep(0.05)


def instrument(mark: Marker, no_exchange: bool) -> None:
    """Wrap the storage steps so that every kill can be placed in a phase: ``sweep``, ``verify``
    (a copy's sha256 check), ``stage`` (files written into the staging folder), ``fsync``, then
    the swap: ``exchange``/``exchange-done`` (atomic exchange; the previous entry is deleted
    after it) or, on the portable path, ``set-aside``/``between-renames``/``swap-in``; a new name
    only has ``swap-in``/``swap-in-done``; ``cleanup`` once committed; a removal has ``discard``,
    ``discard-rename`` and ``discard-delete`` (the entry already gone, its files being deleted)."""
    import contextlib

    original_sweep = storage.sweep
    original_staging = storage.staging_folder
    original_fsync_tree = atomic.fsync_tree
    original_commit = atomic.commit_folder
    original_discard = storage.discard_folder
    original_check = registry_module.check_weights
    original_exchange = atomic._exchange
    original_replace = os.replace

    def sweep(parent):
        mark("sweep")
        return original_sweep(parent)

    @contextlib.contextmanager
    def staging_folder(parent, name):
        mark("stage")
        with original_staging(parent, name) as staging:
            yield staging

    def fsync_tree(folder):
        mark("fsync")
        original_fsync_tree(folder)

    def commit_folder(staging, path):
        original_commit(staging, path)
        mark("cleanup")

    def discard_folder(path):
        mark("discard")
        return original_discard(path)

    def check_weights(concept, hash_file=True):
        mark("verify")
        return original_check(concept, hash_file)

    def exchange(first, second):
        mark("exchange")
        done = original_exchange(first, second)
        if done:
            mark("exchange-done")
        return done

    def replace(source, target, *args, **kwargs):
        source, target = Path(source), Path(target)
        if target.name == "entry" and target.parent.name.startswith(".old-"):
            before, after = "set-aside", "between-renames"
        elif target.name == "entry" and target.parent.name.startswith(".trash-"):
            before, after = "discard-rename", "discard-delete"
        elif source.name.startswith(".tmp-"):
            before, after = "swap-in", "swap-in-done"
        else:  # files renamed inside a staging folder, a set-aside entry put back
            return original_replace(source, target, *args, **kwargs)
        mark(before)
        original_replace(source, target, *args, **kwargs)
        mark(after)

    os.replace = replace
    atomic.fsync_tree = fsync_tree  # called from atomic.commit_folder
    for module in (storage, registry_module):
        for name, function in (("sweep", sweep), ("staging_folder", staging_folder),
                               ("commit_folder", commit_folder), ("discard_folder", discard_folder)):
            setattr(module, name, function)
    registry_module.check_weights = check_weights
    # The portable path (no atomic exchange): the previous entry is set aside in .old-*, then
    # the new one renamed in; a crash between the two renames is undone by the next sweep.
    atomic._exchange = (lambda first, second: False) if no_exchange else exchange


def crash(args: dict) -> None:
    load_spec(args["spec"])
    mark = Marker(args["marker"], args.get("hold"))
    instrument(mark, args.get("no_exchange", False))
    os.environ["STC_HOME"] = args["root"]  # what the CLI opens
    registry = Registry(Path(args["root"]))
    op, via_cli = args["op"], args.get("cli", False)
    if via_cli:
        from stc.cli import app

        def cli(*argv):
            code = app(list(argv), standalone_mode=False)  # errors come back as an exit code
            if code not in (None, 0):
                raise RuntimeError(f"stc {' '.join(argv)} exited with {code}")
    mark("ready")
    print("ready", flush=True)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # the CLI's output must not fill the pipe the test stopped reading
    index = 0
    while True:
        if op == "overwrite":  # a training run's checkpoints: the same name, new weights each time
            version = "ABC"[(index + 1) % 3]  # B, C, A, B, ...: the old and the new version differ
            registry.save(concept("x", version), WEIGHTS[version], overwrite=True)
        elif op == "create":
            registry.save(concept(f"new{index}", "A"), WEIGHTS["A"], overwrite=False)
        elif op == "rename":
            old, new = ("ra", "rb") if index % 2 == 0 else ("rb", "ra")
            cli("mv", old, new) if via_cli else registry.rename(old, new)
        elif op == "copy":
            cli("cp", "src", f"cp{index}") if via_cli else registry.copy("src", f"cp{index}")
        elif op == "delete":  # copy then remove: a removal lands on a complete entry each time
            if index % 2 == 0:
                registry.copy("src", "d")
            else:
                cli("rm", "d", "--yes") if via_cli else registry.remove("d")
        else:
            raise SystemExit(f"unknown op {op}")
        index += 1
        mark.ops = index
        mark("idle")


# --------------------------------------------------------------------------- stress mode


def raced_a_write(registry, name: str, loaded: Concept, check) -> bool:
    """Whether a failed check of ``loaded`` is a torn read, not damage. Readers take no lock:
    another process may have renamed, removed or re-saved the entry between reading concept.yaml
    and hashing the weights. The sha256 check stops such a read from being used; it must be
    reported as that, and never happen otherwise. A re-save with the same weights (A, then B,
    then A again) leaves the sha256 as it was: the stamp of concept.yaml (a new file each save)
    tells it apart, as the registry's own check does."""
    try:
        again = registry.load(name)
        changed = (again.weights_sha256, again.source_stamp) != (loaded.weights_sha256, loaded.source_stamp)
    except ConceptNotFound:
        changed = True
    except StcError:
        changed = False
    return changed and "by another process while it was being read" in (check.problem or "")


def stress(args: dict) -> None:
    load_spec(args["spec"])
    from stc.store.listing import listing

    registry = Registry(Path(args["root"]))
    worker = args["worker"]
    rng = random.Random(args["seed"])
    counts: dict[str, int] = {}
    violations: list[str] = []
    races: list[dict] = []

    def count(key: str) -> None:
        counts[key] = counts.get(key, 0) + 1

    def read(name: str) -> None:
        """A reader: a load either fails with ConceptNotFound or gives a concept that verifies."""
        try:
            loaded = registry.load(name)
        except ConceptNotFound:
            count("read_not_found")
            return
        except StcError as exc:
            violations.append(f"load {name}: {type(exc).__name__}: {exc}")
            return
        check = check_weights(loaded)
        if check.ok and check.problem is None:
            count("read_verified")
            if loaded.extra.get("fault_version") not in ("A", "B"):
                violations.append(f"load {name}: unknown version {loaded.extra.get('fault_version')!r}")
            return
        if raced_a_write(registry, name, loaded, check):
            count("read_raced_a_write")
        else:
            violations.append(f"verify {name}: {check.problem}")

    # Phase 1: create races. Every worker tries to create race-<k> at the same moment, some by
    # saving (overwrite=False) and some by copying: exactly one may win.
    start = args["start"]
    for k in range(args["races"]):
        delay = start + k * args["slot"] - time.time()
        if delay > 0:
            time.sleep(delay)
        name = f"race-{k}"
        by_copy = (worker + k) % 3 == 0
        tag = f"w{worker}-k{k}"
        try:
            if by_copy:
                registry.copy("seed", name)
                tag = "seed"  # a copy carries its source's metadata
            else:
                registry.save(concept(name, "A", race_tag=tag), WEIGHTS["A"], overwrite=False)
            outcome = "won"
        except ConceptExists:
            outcome = "exists"
        except StcError as exc:
            outcome = f"error: {type(exc).__name__}: {exc}"
        races.append({"race": k, "worker": worker, "by_copy": by_copy, "tag": tag, "outcome": outcome})

    # Phase 2: a mix of every operation on shared names until the deadline.
    deadline = start + args["races"] * args["slot"] + args["seconds"]
    own = f"own-{worker}"
    index = 0
    while time.time() < deadline:
        index += 1
        roll = rng.random()
        if worker == 0:  # a dedicated reader: loads of the hot name between listings
            roll = 0.3 if roll < 0.9 else 0.6
        version = "A" if index % 2 else "B"
        try:
            if roll < 0.20:  # training-like checkpoint saves of one name shared by every worker
                registry.save(concept("hot", version, writer=worker, step=index), WEIGHTS[version], overwrite=True)
                count("save_hot")
            elif roll < 0.30:
                registry.save(concept(own, version, step=index), WEIGHTS[version], overwrite=True)
                count("save_own")
            elif roll < 0.55:
                for name in ["hot", *rng.sample([own, "own-1", "mv-a", "mv-b", "seed", "cp-1", "eph"], 2)]:
                    read(name)
            elif roll < 0.70:
                listed = 0
                for name, record, problem in listing(registry):
                    if problem is not None:
                        violations.append(f"listing {name}: {type(problem).__name__}: {problem}")
                    elif record is not None and record["weights_problem"]:
                        violations.append(f"listing {name}: weights {record['weights_problem']}")
                    listed += 1
                count("listings")
            elif roll < 0.80:
                old, new = ("mv-a", "mv-b") if rng.random() < 0.5 else ("mv-b", "mv-a")
                registry.rename(old, new)
                count("renames")
            elif roll < 0.90:
                registry.copy("hot", f"cp-{worker}")
                count("copies")
                registry.remove(f"cp-{worker}")
                count("removes")
            else:
                if rng.random() < 0.5:
                    registry.save(concept("eph", version), WEIGHTS[version], overwrite=False)
                    count("creates")
                else:
                    registry.remove("eph")
                    count("removes")
        except (ConceptNotFound, ConceptExists) as exc:
            count(f"expected_{type(exc).__name__}")
        except Exception as exc:  # noqa: BLE001 - anything else is a finding
            import traceback

            frames = reversed(traceback.extract_tb(exc.__traceback__))
            where = " <- ".join(f"{frame.name}:{frame.lineno}" for frame in frames)
            violations.append(f"op {index}: {type(exc).__name__}: {exc} (at {where})")
    Path(args["out"]).write_text(json.dumps({"counts": counts, "violations": violations, "races": races}))


if __name__ == "__main__":
    arguments = json.loads(sys.argv[1])
    {"crash": crash, "stress": stress}[arguments["mode"]](arguments)
