"""Counts of the reliability tests, collected for the whole session.

Each reliability test file records what it tried (``record(section, key, n)``); at the end of the
session the counts are written to ``build/reliability-counts.json`` (or ``$STC_RELIABILITY_COUNTS``)
and printed, one summary line per section, in pytest's terminal summary. Sections are merged into
an existing file, so separate runs of separate files add up to one report.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from pathlib import Path

COUNTS: dict[str, Counter] = defaultdict(Counter)
DETAILS: dict[str, dict] = defaultdict(dict)
_STATE = {"registered": False, "root": None}


def record(section: str, key: str, amount: int = 1) -> None:
    COUNTS[section][key] += amount


def detail(section: str, key: str, value) -> None:
    """A non-additive figure (a distribution, a setting) shown with the section."""
    DETAILS[section][key] = value


def output_path() -> Path:
    override = os.environ.get("STC_RELIABILITY_COUNTS")
    if override:
        return Path(override)
    return Path(_STATE["root"] or ".") / "build" / "reliability-counts.json"


def write() -> Path | None:
    if not COUNTS and not DETAILS:
        return None
    path = output_path()
    try:
        existing = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        existing = {}
    for section in sorted(set(COUNTS) | set(DETAILS)):
        existing[section] = {**dict(sorted(COUNTS[section].items())), **DETAILS[section]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(existing, indent=2, sort_keys=True) + "\n")
    return path


def summary_lines() -> list[str]:
    lines = []
    for section in sorted(set(COUNTS) | set(DETAILS)):
        figures = ", ".join(f"{key}={value}" for key, value in sorted(COUNTS[section].items()))
        extra = "; ".join(f"{key}: {value}" for key, value in sorted(DETAILS[section].items()))
        lines.append(f"reliability[{section}]: {figures}" + (f"; {extra}" if extra else ""))
    return lines


class _SummaryPlugin:
    def pytest_terminal_summary(self, terminalreporter):
        path = write()
        if path is None:
            return
        terminalreporter.section("reliability counts")
        for line in summary_lines():
            terminalreporter.write_line(line)
        terminalreporter.write_line(f"(written to {path})")


def attach(config) -> None:
    """Print and write the counts at the end of this session (once, whichever file asks first)."""
    if not _STATE["registered"]:
        _STATE["registered"] = True
        _STATE["root"] = str(config.rootpath)
        config.pluginmanager.register(_SummaryPlugin(), "stc-reliability-counts")


def trials(default: int = 20) -> int:
    """The trial count: ``STC_FAULT_TRIALS`` (default 20; the full form runs 200)."""
    try:
        return max(1, int(os.environ.get("STC_FAULT_TRIALS", default)))
    except ValueError:
        return default


# Fixtures shared by the reliability test modules (imported there; pytest finds them by name).
import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def collector(request):
    attach(request.config)
    yield
    write()


@pytest.fixture(autouse=True, scope="module")
def cli_built_once():
    """typer rebuilds the command tree on every CliRunner.invoke (~0.1 s); build it once here."""
    import typer.testing

    built = {}
    original = typer.testing._get_command

    def get_command(app):
        if id(app) not in built:
            built[id(app)] = original(app)
        return built[id(app)]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(typer.testing, "_get_command", get_command)
        yield
