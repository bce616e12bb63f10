"""The one atomic write (stc/atomic.py): whenever the writing process dies, the target is the old
one or the new one, whole: never neither, never a mix. The child process below is killed (SIGKILL)
at every event of the swap in turn: each rename and fsync (before and after), the folder exchange,
and the moment the new content is written; the next step of the count runs until one is not
killed, so every point is covered whatever the path takes."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stc import atomic
from stc.store.storage import sweep

CHILD = textwrap.dedent("""
    import json, os, signal, sys
    from pathlib import Path
    from stc import atomic

    target, kill_at, is_dir, exchange = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "dir", sys.argv[4] == "1"
    events = []

    def event(name):
        events.append(name)
        Path(sys.argv[5]).write_text(json.dumps(events))
        if len(events) - 1 == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(module, name):
        original = getattr(module, name)

        def wrapped(*args, **kwargs):
            event(f"before {name}")
            result = original(*args, **kwargs)
            event(f"after {name}")
            return result
        setattr(module, name, wrapped)

    wrap(os, "replace")
    wrap(os, "fsync")
    if exchange:
        wrap(atomic, "_exchange")
    else:
        atomic._exchange = lambda first, second: False  # the portable path: set aside, then rename in
    with atomic.atomic_write(target, is_dir=is_dir) as temporary:
        if is_dir:
            for name in ("a.txt", "b.txt"):
                (temporary / name).write_text("new " + name)
        else:
            temporary.write_text("new")
        event("written")
    event("done")
""")


def state(target: Path, is_dir: bool):
    if not target.exists():
        return None
    if is_dir:
        return {item.name: item.read_text() for item in sorted(target.iterdir())}
    return target.read_text()


OLD_DIR = {"a.txt": "old a.txt", "c.txt": "old c.txt"}
NEW_DIR = {"a.txt": "new a.txt", "b.txt": "new b.txt"}


@pytest.mark.parametrize("kind,exchange", [("file", True), ("dir", True), ("dir", False)])
def test_a_write_killed_at_any_point_leaves_the_old_or_the_new_target(tmp_path, kind, exchange):
    is_dir = kind == "dir"
    old, new = (OLD_DIR, NEW_DIR) if is_dir else ("old", "new")
    seen, killed = set(), 0
    for kill_at in range(60):
        parent = tmp_path / f"run{kill_at}"
        parent.mkdir()
        target = parent / "target"
        if is_dir:
            target.mkdir()
            for name, text in OLD_DIR.items():
                (target / name).write_text(text)
        else:
            target.write_text("old")
        log = tmp_path / f"events{kill_at}.json"
        child = subprocess.run([sys.executable, "-c", CHILD, str(target), str(kill_at), kind, str(int(exchange)),
                                str(log)], capture_output=True, text=True, timeout=60)
        events = json.loads(log.read_text())
        if child.returncode == 0:
            assert events[-1] == "done" and state(target, is_dir) == new
            break
        assert child.returncode == -signal.SIGKILL, child.stderr
        killed += 1
        sweep(parent)  # what the registry does when it next opens a folder: an entry set aside comes back
        found = state(target, is_dir)
        assert found in (old, new), f"killed at {events[-1]!r}: {found!r}"
        seen.add(events[-1])
        leftovers = sorted(item.name for item in parent.iterdir() if item.name != "target")
        assert all(name.startswith(".") for name in leftovers), leftovers  # hidden work files only
    else:
        pytest.fail("the write never completed")
    assert killed >= 5 and "written" in seen  # the kills really landed inside the swap
    if is_dir and exchange:
        assert {"before _exchange", "after _exchange"} <= seen
    elif is_dir:
        assert "after replace" in seen  # between the two renames of the portable path


def test_a_failed_write_keeps_the_target_and_leaves_nothing(tmp_path):
    target = tmp_path / "out.png"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic.atomic_write(target) as temporary:
        temporary.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "keep").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic.atomic_write(folder, is_dir=True) as temporary:
        (temporary / "keep").write_text("new")
        raise KeyboardInterrupt
    assert (folder / "keep").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["export",
                                                                                                    "out.png"]


def test_written_files_get_the_umask_s_permissions(tmp_path):
    previous = os.umask(0o027)
    try:
        with atomic.atomic_write(tmp_path / "f") as temporary:
            temporary.write_text("x")
        with atomic.atomic_write(tmp_path / "d", is_dir=True) as temporary:
            (temporary / "g").write_text("y")
    finally:
        os.umask(previous)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "d" / "g").stat().st_mode & 0o777 == 0o640
