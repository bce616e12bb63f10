import json

import pytest
from helpers import assert_one_line_error, invoke


@pytest.fixture
def trained(photos):
    result = invoke("train", photos, "--name", "blob", "--init", "cat", "--steps", 2, "--model", "builtin:tiny",
                    "--grad-accum", 1, "--seed", 3)
    assert result.exit_code == 0, result.output
    return result


def test_train_ls_gen(trained, stc_home, tmp_path):
    assert trained.stdout.strip() == str(stc_home / "concepts" / "blob")
    assert "Trained <blob>" in trained.stderr and "2/2" in trained.stderr
    assert (stc_home / "concepts" / "blob" / "concept.yaml").is_file()
    assert (stc_home / "concepts" / "blob" / "mapper.safetensors").is_file()

    listing = invoke("ls")
    assert listing.exit_code == 0
    assert "blob" in listing.stdout and "builtin:tiny" in listing.stdout
    records = json.loads(invoke("ls", "--json").stdout)
    assert [r["name"] for r in records] == ["blob"] and records[0]["steps"] == 2

    out = tmp_path / "renders"
    result = invoke("gen", "<blob> on the moon", "--rank", 8, "--steps", 4, "-n", 2, "--out", out, "--seed", 5)
    assert result.exit_code == 0, result.output
    paths = result.stdout.split()
    assert len(paths) == 2 and all(p.endswith(".png") for p in paths)
    from PIL import Image

    with Image.open(paths[0]) as image:
        assert image.size == (64, 64)
        assert "<blob> on the moon" in image.text["parameters"]
        assert json.loads(image.text["stc"])["concepts"]["blob"]["rank"] == 8


def test_same_seed_gives_identical_png(trained, tmp_path):
    args = ("gen", "<blob> on the moon", "--steps", 3, "--seed", 9)
    first = invoke(*args, "--out", tmp_path / "a").stdout.strip()
    second = invoke(*args, "--out", tmp_path / "b").stdout.strip()
    other_seed = invoke("gen", "<blob> on the moon", "--steps", 3, "--seed", 10, "--out", tmp_path / "c").stdout.strip()
    rank_one = invoke(*args, "--rank", 1, "--out", tmp_path / "d").stdout.strip()
    data = [open(p, "rb").read() for p in (first, second, other_seed, rank_one)]
    assert data[0] == data[1]
    assert data[0] != data[2] and data[0] != data[3]


def test_gen_never_overwrites_existing_files(trained, tmp_path):
    args = ("gen", "<blob>", "--steps", 2, "--out", tmp_path)
    first = invoke(*args).stdout.strip()
    second = invoke(*args).stdout.strip()
    assert first != second and second.endswith("-1.png")


def test_gen_without_concept_is_plain_sd_with_a_note(tmp_path):
    result = invoke("gen", "a cat on the moon", "--model", "builtin:tiny", "--steps", 2, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert "plain Stable Diffusion" in result.stderr


def test_error_cases_are_one_line_without_traceback(trained, photos, tmp_path):
    assert_one_line_error(invoke("train", photos, "--name", "blob", "--model", "builtin:tiny"), "exists already")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(invoke("train", empty, "--name", "other", "--model", "builtin:tiny"), "no usable images")
    assert_one_line_error(
        invoke("train", photos, "--name", "other", "--init", "hippopotamus", "--model", "builtin:tiny"),
        "single token", "--init",
    )
    assert_one_line_error(invoke("train", photos, "--name", "Bad/Name", "--model", "builtin:tiny"), "bad-name")
    assert_one_line_error(invoke("gen", "<blub> on the moon"), "blob")  # suggests the close name
    assert_one_line_error(invoke("gen", "<blob:999>"), "rank")


def test_debug_env_shows_the_traceback(photos, monkeypatch):
    monkeypatch.setenv("STC_DEBUG", "1")
    result = invoke("train", photos, "--name", "Bad Name", "--model", "builtin:tiny")
    assert result.exit_code != 0 and result.exception is not None


def test_ls_on_a_missing_root_creates_nothing(stc_home):
    result = invoke("ls")
    assert result.exit_code == 0
    assert "stc train" in result.stderr
    assert not stc_home.exists()


def test_help_explains_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("train", "gen", "ls"):
        assert command in result.stdout
    assert "--rank" in invoke("gen", "--help").stdout


# --------------------------------------------------------------------------- start-up (issue 10)

# One `stc ARGS` run in a fresh interpreter: its output, exit code and every module it imported.
STARTUP_PROBE = """
import contextlib, importlib, io, json, sys
preload = json.loads(sys.argv[2])  # command modules built before the run (none: the lazy start)
sys.argv = ["stc", *json.loads(sys.argv[1])]
for module in preload:
    importlib.import_module(module)
from stc.cli import main
out, err, code = io.StringIO(), io.StringIO(), 0
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
print(json.dumps({"stdout": out.getvalue(), "stderr": err.getvalue(), "code": code, "modules": sorted(sys.modules)}))
"""
COMMAND_MODULES = {"stc.cli.exchange", "stc.cli.inspecting", "stc.cli.render", "stc.cli.store", "stc.cli.train"}
NEVER_AT_START = {"torch", "diffusers", "transformers", "safetensors", "accelerate", "PIL"}


def run_fresh(*args, columns: int = 100, preload: tuple = ()) -> dict:
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "COLUMNS": str(columns), "NO_COLOR": "1"}
    done = subprocess.run([sys.executable, "-c", STARTUP_PROBE, json.dumps([str(arg) for arg in args]),
                           json.dumps(list(preload))],
                          capture_output=True, text=True, timeout=120, env=env, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    result["roots"] = {name.split(".")[0] for name in result["modules"]} | set(result["modules"])
    return result


def typer_alone_imports_pydantic() -> bool:
    """typer 0.2x converts parameters with pydantic; stc.cli._lazy keeps it from being imported.
    (Should a typer import pydantic up front, the start-up tests cannot ask that of stc.)"""
    import subprocess
    import sys

    probe = "import sys, typer; print('pydantic' in sys.modules)"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "True"


def test_help_lists_every_command_without_importing_one():
    from stc.cli._lazy import COMMANDS

    result = run_fresh("--help")
    assert result["code"] == 0
    assert not result["roots"] & (COMMAND_MODULES | NEVER_AT_START | {"yaml"})
    if not typer_alone_imports_pydantic():
        assert "pydantic" not in result["roots"]
    lines = result["stdout"].splitlines()
    listed = [line.split()[0] for line in lines[lines.index("Commands:") + 1:] if line.startswith("  ")]
    assert listed == list(COMMANDS)


def test_the_lazy_help_is_the_help_of_the_commands_themselves():
    """`stc --help` (no command module imported: one-line summaries from COMMANDS) prints what
    it prints with every command built, and COMMANDS names each command's module."""
    import importlib
    import inspect

    import typer.main

    from stc.cli import app
    from stc.cli._lazy import COMMANDS, command_name

    for module in {module for module, _ in COMMANDS.values()}:
        importlib.import_module(f"stc.cli.{module}")
    registered = {command_name(info): info for info in app.registered_commands}
    assert set(registered) == set(COMMANDS)
    for name, (module, summary) in COMMANDS.items():
        command = typer.main.get_command_from_info(registered[name], pretty_exceptions_short=True,
                                                   rich_markup_mode=app.rich_markup_mode)
        assert registered[name].callback.__module__ == f"stc.cli.{module}", name
        assert inspect.cleandoc(command.help).split("\n\n")[0] == summary, name
    built = run_fresh("--help", preload=tuple(sorted(COMMAND_MODULES)))
    assert built["code"] == 0 and COMMAND_MODULES <= set(built["modules"])
    assert run_fresh("--help")["stdout"] == built["stdout"]


@pytest.mark.parametrize("args, module", [
    (["ls"], "stc.cli.store"),
    (["show", "nosuch"], "stc.cli.store"),
    (["gen", "<nosuch> on the moon"], "stc.cli.render"),
    (["train", ".", "--name", "BAD!"], "stc.cli.train"),
    (["train", ".", "--name", "x", "--steps", "0", "--lr", "0.002", "--scale-lr"], "stc.cli.train"),
])
def test_a_command_imports_its_own_module_only(args, module):
    result = run_fresh(*args)
    assert result["code"] == (0 if args == ["ls"] else 1), result["stderr"]
    assert result["roots"] & COMMAND_MODULES == {module}
    assert not result["roots"] & NEVER_AT_START


def test_ls_of_a_cached_registry_reads_no_yaml():
    from helpers import save_concept

    save_concept("blob")
    first = run_fresh("ls")  # reads concept.yaml, writes the listing cache
    assert first["code"] == 0 and "blob" in first["stdout"]
    again = run_fresh("ls")
    assert again["stdout"] == first["stdout"]
    assert "yaml" not in again["roots"]


def test_a_mistyped_command_gets_a_suggestion():
    result = run_fresh("lss")
    assert result["code"] == 2
    assert "No such command 'lss'. Did you mean 'ls'?" in result["stderr"]


def test_help_at_80_columns_shows_every_option_whole_and_defaults_one_way():
    """Every option's name in full, descriptions wrapped at the terminal's width, plain flags
    without a type, every default written as [default: ...]; -h is --help."""
    import importlib

    import typer.main

    from stc.cli import app
    from stc.cli._lazy import COMMANDS, command_name

    for module in {module for module, _ in COMMANDS.values()}:
        importlib.import_module(f"stc.cli.{module}")
    registered = {command_name(info): info for info in app.registered_commands}
    for name in COMMANDS:
        text = run_fresh(name, "--help", columns=80)["stdout"]
        command = typer.main.get_command_from_info(registered[name], pretty_exceptions_short=True,
                                                   rich_markup_mode=app.rich_markup_mode)
        for param in command.params:
            for flag in [*param.opts, *param.secondary_opts]:
                if flag.startswith("--"):
                    assert flag in text, (name, flag)
        assert "<bool>" not in text, name
        assert "(default" not in text and "Default:" not in text, name
        assert max(len(line) for line in text.splitlines()) <= 80, name
        assert run_fresh(name, "-h", columns=80)["stdout"] == text


def test_progress_shows_no_time_left_until_the_pace_is_known(monkeypatch):
    """The first step carries the warm-up: "about 15m00s left" after it, for a run of two
    minutes, was a guess. The time left comes once steps after the first have set the pace."""
    import io
    import time

    from rich.console import Console

    import stc.cli._base as base

    clock = iter([0.0, 100.0, 110.0, 130.0, 160.0])
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    console = Console(file=io.StringIO(), width=200)
    monkeypatch.setattr(base, "err", console)
    with base.progress_bar("rendering", "steps") as progress:
        for done in (1, 2, 4, 10):  # at 100 s (the warm-up), 110 s, 130 s, 160 s
            progress(done, 10)
    lines = console.file.getvalue().splitlines()
    assert [line.split(":")[1].split("(")[0].strip() for line in lines] == ["1/10 steps", "2/10 steps", "4/10 steps",
                                                                          "10/10 steps"]
    assert "left" not in lines[0] and "left" not in lines[1] and "left" not in lines[3]
    assert "about 1m00s left" in lines[2]  # 30 s for the 3 steps after the first, 6 to go


# One exit code per kind of mistake, whichever command makes it: a name, a concept, a rank, a
# file or any other value that cannot be used is one "Error:" line and exit 1 (usage errors that
# Click itself finds, an unknown option or a missing argument, are exit 2; Ctrl-C is 130).
SAME_KIND = {
    "bad name": [("show", "Bad/Name"), ("rm", "Bad/Name", "--yes"), ("mv", "pup", "Bad/Name"), ("cp", "pup", "Bad"),
                 ("export", "Bad/Name", "-f", "ti"), ("inspect", "Bad/Name"), ("gen", "<Bad/Name>")],
    "missing concept": [("show", "nope"), ("rm", "nope", "--yes"), ("mv", "nope", "other"), ("cp", "nope", "x"),
                        ("export", "nope", "-f", "ti"), ("gen", "<nope>"), ("grid", "<nope>"), ("inspect", "nope"),
                        ("train", "--resume", "nope")],
    "bad rank": [("gen", "<pup>", "--rank", "0"), ("gen", "<pup:0>"), ("gen", "<pup>", "--rank", "500"),
                 ("grid", "<pup>", "--ranks", "0"), ("export", "pup", "-f", "ti", "--rank", "0"),
                 ("inspect", "pup", "--rank", "500")],
    "bad value": [("gen", "<pup>", "-n", "0"), ("gen", "<pup>", "--steps", "0"), ("--threads", "0", "ls"),
                  ("gen", "<pup>", "--prediction-type", "x0"), ("gen", "<pup>", "--scheduler", "x"),
                  ("train", "--resume", "pup", "--lr", "1"), ("train", "--name", "x")],
    "bad file": [("import", "/nonexistent"), ("train", "/nonexistent", "--name", "x"),
                 ("grid", "--prompts", "/nonexistent")],
}


@pytest.mark.parametrize("kind", SAME_KIND)
def test_one_exit_code_and_one_error_line_per_kind_of_mistake(kind, tmp_path):
    from helpers import save_concept

    save_concept("pup")
    fragment = {"bad name": "invalid concept name", "missing concept": "no concept named 'nope'",
                "bad rank": "rank"}.get(kind, "")
    for args in SAME_KIND[kind]:
        result = invoke(*args)
        assert result.exit_code == 1, (args, result.output)
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and "Usage:" not in result.stderr, (args, result.stderr)
        if kind != "bad name" or not args[0] == "gen":  # a prompt's <Bad/Name> is "not a concept reference"
            assert fragment in errors[0], (args, errors[0])
