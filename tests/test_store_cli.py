"""stc ls, show, inspect, rm, mv, cp through the CLI (CliRunner, STC_HOME on tmp_path)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from helpers import assert_one_line_error, invoke, save_concept

from stc.cli import store as store_cli
from stc.store.concept import CONCEPT_FILE, Concept, TrainingRecord
from stc.store.registry import Registry
from stc.train.config import TrainConfig


def make_concept(name: str, steps_done: int = 10, seed: int = 0) -> Concept:
    return save_concept(
        name, seed=seed,
        layer_names=[f"down_blocks.{i // 4}.attentions.{i % 4}.transformer_blocks.0.attn2" for i in range(16)],
        training=TrainingRecord(settings=TrainConfig(steps=10, lr=0.008).record_settings(), steps_done=steps_done),
        metrics={"final_loss": 0.125},
    )


@pytest.fixture
def two_concepts():
    first = make_concept("blob")
    second = make_concept("half", steps_done=4, seed=1)
    (second.path / "checkpoint").mkdir()
    (second.path / "checkpoint" / "state.safetensors").write_bytes(b"x" * 5000)
    return first, second


# --------------------------------------------------------------------------- ls


def test_ls_on_an_empty_root_hints_and_creates_nothing(stc_home):
    for args in (("ls",), ("ls", "--json")):
        result = invoke(*args)
        assert result.exit_code == 0 and "stc train" in result.stderr
    assert json.loads(invoke("ls", "--json").stdout) == []
    assert not stc_home.exists()


def test_ls_json_matches_the_table(two_concepts, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    table = invoke("ls")
    records = json.loads(invoke("ls", "--json").stdout)
    assert table.exit_code == 0 and table.stderr == ""
    assert [r["name"] for r in records] == ["blob", "half"]
    blob, half = records
    assert blob["complete"] is True and blob["steps_done"] == blob["steps_planned"] == 10
    assert half["complete"] is False and half["steps_done"] == 4 and half["steps_planned"] == 10
    assert blob["token"] == "<blob>" and blob["rank_max"] == 128 and blob["base_model"] == "builtin:tiny"
    lines = {line.split()[0]: line for line in table.stdout.splitlines()[1:] if line.strip()}
    assert set(lines) == {"blob", "half"}
    for record in records:
        line = lines[record["name"]]
        for value in (record["token"], record["base_model"], str(record["rank_max"]), store_cli._human(record["size"]),
                      record["created"][:10]):
            assert value in line, (value, line)
    assert "4/10 (incomplete)" in lines["half"] and " 10 " in lines["blob"]


def test_ls_counts_checkpoints_and_sorts(two_concepts):
    by_size = json.loads(invoke("ls", "--json", "--sort", "size").stdout)
    assert [r["name"] for r in by_size] == ["half", "blob"]  # the checkpoint makes it larger
    assert by_size[0]["size"] > by_size[1]["size"] + 4900
    assert [r["name"] for r in json.loads(invoke("ls", "--json", "--sort", "created").stdout)] in (
        ["half", "blob"], ["blob", "half"])
    assert invoke("ls", "--sort", "bogus").exit_code == 2  # a usage error


def test_ls_pattern(two_concepts):
    assert [r["name"] for r in json.loads(invoke("ls", "h*", "--json").stdout)] == ["half"]
    assert [r["name"] for r in json.loads(invoke("ls", "lo", "--json").stdout)] == ["blob"]
    nothing = invoke("ls", "zzz")
    assert nothing.exit_code == 0 and "No concept matches" in nothing.stderr


def test_ls_warns_about_corrupt_and_foreign_entries_and_keeps_going(two_concepts, stc_home):
    (stc_home / "concepts" / "half" / CONCEPT_FILE).write_text("name: [oops")
    (stc_home / "concepts" / "README.txt").write_text("not a concept")
    data = (stc_home / "concepts" / "blob" / CONCEPT_FILE).read_text()
    make_concept("future")
    (stc_home / "concepts" / "future" / CONCEPT_FILE).write_text(data.replace("schema_version: 1", "schema_version: 9")
                                                                 .replace("name: blob", "name: future"))
    result = invoke("ls")
    assert result.exit_code == 0
    assert "blob" in result.stdout and "half" not in result.stdout
    assert "Warning:" in result.stderr and "not valid YAML" in result.stderr
    assert "README.txt" in result.stderr and "newer than this stc" in result.stderr
    records = json.loads(invoke("ls", "--json").stdout)
    assert [r["name"] for r in records] == ["blob"]


def test_rich_markup_in_stored_values_is_shown_verbatim(two_concepts, stc_home, tmp_path):
    meta = stc_home / "concepts" / "blob" / CONCEPT_FILE
    meta.write_text(meta.read_text().replace("base_model: builtin:tiny", "base_model: '[/bold]odd[red]'"))
    assert "[/bold]odd[red]" in invoke("ls").stdout
    assert "[/bold]odd[red]" in invoke("show", "blob").stdout
    meta.write_text("name: [/x] [oops")
    result = invoke("ls")
    assert result.exit_code == 0 and "Warning:" in result.stderr


# --------------------------------------------------------------------------- show


def test_show_text_and_json(two_concepts):
    _, half = two_concepts
    (half.path / "previews").mkdir()
    (half.path / "previews" / "step-000002.png").write_bytes(b"p")
    (half.path / "preview.png").write_bytes(b"p")
    (half.path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    record = json.loads(invoke("show", "half", "--json").stdout)
    assert record["token"] == "<half>" and record["base_model"] == "builtin:tiny"
    assert len(record["layer_names"]) == 16 and record["final_loss"] == 0.125
    assert record["training"]["lr"] == 0.008 and record["complete"] is False
    assert record["weights"]["verified"] is True and len(record["weights"]["sha256"]) == 64
    files = {f["path"]: f["size"] for f in record["files"]}
    assert {"concept.yaml", "mapper.safetensors", "metrics.jsonl", "checkpoint/state.safetensors"} <= set(files)
    assert record["size"] == sum(files.values())
    assert record["previews"] == [str(half.path / "previews" / "step-000002.png"), str(half.path / "preview.png")]

    text = invoke("show", "half")
    assert text.exit_code == 0
    for fragment in ("<half>", "builtin:tiny", "down_blocks.3.attentions.3", record["weights"]["sha256"], "yes",
                     "4/10 (incomplete)", "preview.png", "checkpoint/state.safetensors", "0.125"):
        assert fragment in text.stdout, fragment


def test_show_reports_a_weights_mismatch(two_concepts):
    blob, _ = two_concepts
    data = bytearray(blob.weights_path.read_bytes())
    data[-3] ^= 1
    blob.weights_path.write_bytes(bytes(data))
    record = json.loads(invoke("show", "blob", "--json").stdout)
    assert record["weights"]["verified"] is False and "sha256" in record["weights"]["problem"]
    text = invoke("show", "blob")
    assert text.exit_code == 0 and "NO:" in text.stdout and "Warning:" in text.stderr


def test_show_errors(two_concepts, stc_home):
    assert_one_line_error(invoke("show", "blub"), "no concept named 'blub'", "blob")
    assert_one_line_error(invoke("show", "../blob"), "invalid concept name", "'blob'")
    (stc_home / "concepts" / "blob" / CONCEPT_FILE).write_text("schema_version: 7\nname: blob\n")
    assert_one_line_error(invoke("show", "blob"), "schema version 7", "upgrade stc")


# --------------------------------------------------------------------------- inspect


def test_inspect_table_and_json(two_concepts):
    result = invoke("inspect", "blob", "--steps", 5)
    assert result.exit_code == 0, result.output
    for fragment in ("token embedding norm", "bypass vector norm", "999", "749", "250", "down.3.attn.3", "legend",
                     "Suggested: --rank"):
        assert fragment in result.stdout, fragment
    report = json.loads(invoke("inspect", "blob", "--json", "--rank", 8).stdout)
    grid = report["grid"]
    assert grid["rank"] == 8 and len(grid["timesteps"]) == 10
    assert grid["timesteps"][0] == 999 and grid["timesteps"][-1] == 0
    assert len(grid["token"]) == 16 and len(grid["token"][0]) == 10 and len(grid["bypass"]) == 16
    assert [r["rank"] for r in report["ranks"]] == [1, 2, 4, 8, 16, 32, 64, 128]
    assert report["ranks"][-1]["token_mean"] == pytest.approx(1.0, abs=1e-5)
    assert report["suggested_rank"] in [r["rank"] for r in report["ranks"]]


def test_inspect_plot_writes_a_png(two_concepts, tmp_path):
    from PIL import Image

    from stc.render.inspection import plot_size

    target = tmp_path / "norms.png"
    result = invoke("inspect", "blob", "--plot", target, "--steps", 6, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["plot"] == str(target)
    with Image.open(target) as image:
        assert image.format == "PNG" and image.size == plot_size(16, 6, panels=2)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 20


def test_inspect_errors(two_concepts, tmp_path):
    blob, _ = two_concepts
    assert_one_line_error(invoke("inspect", "blob", "--rank", 200), "--rank", "128")
    assert_one_line_error(invoke("inspect", "blob", "--steps", 0), "--steps")
    assert_one_line_error(invoke("inspect", "blob", "--plot", tmp_path / "x.jpg"), ".png")
    assert_one_line_error(invoke("inspect", "blob", "--plot", tmp_path / "missing" / "x.png"), "does not exist")
    blob.weights_path.write_bytes(blob.weights_path.read_bytes()[:-10])
    assert_one_line_error(invoke("inspect", "blob"), str(blob.weights_path), "truncated")


# --------------------------------------------------------------------------- rm


def test_rm_dry_run_deletes_nothing(two_concepts, stc_home):
    result = invoke("rm", "blob", "half", "--dry-run")
    assert result.exit_code == 0
    assert "blob" in result.stdout and "half" in result.stdout and "MB" in result.stdout
    assert "nothing deleted" in result.stderr
    assert Registry().names() == ["blob", "half"]


def test_rm_yes_deletes_and_reports_sizes(two_concepts):
    result = invoke("rm", "blob", "--yes")
    assert result.exit_code == 0 and "Removed blob" in result.stderr
    assert Registry().names() == ["half"]


def test_rm_without_a_terminal_refuses_instead_of_hanging(two_concepts):
    assert_one_line_error(invoke("rm", "blob"), "--yes")
    assert Registry().names() == ["blob", "half"]


@pytest.mark.parametrize("answer, left", [("y\n", ["half"]), ("n\n", ["blob", "half"]), ("", ["blob", "half"])])
def test_rm_asks_on_a_terminal(two_concepts, monkeypatch, answer, left):
    monkeypatch.setattr(store_cli, "_stdin_is_interactive", lambda: True)
    result = invoke("rm", "blob", input=answer)
    assert "Delete 1 concept(s)" in result.output
    assert result.exit_code == (0 if left == ["half"] else 1)
    assert Registry().names() == left


def test_rm_unknown_names_delete_nothing(two_concepts):
    assert_one_line_error(invoke("rm", "blob", "blub", "--yes"), "'blub'", "blob", "Nothing was deleted")
    assert Registry().names() == ["blob", "half"]
    assert invoke("rm").exit_code == 2


def test_rm_removes_a_damaged_entry(two_concepts, stc_home):
    (stc_home / "concepts" / "half" / CONCEPT_FILE).write_text("::: not yaml [")
    result = invoke("rm", "half", "--yes")
    assert result.exit_code == 0 and "damaged" in result.stdout
    assert Registry().names() == ["blob"]


# --------------------------------------------------------------------------- mv, cp


def test_mv_renames_and_the_token_follows(two_concepts, stc_home):
    result = invoke("mv", "blob", "cat-toy")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(stc_home / "concepts" / "cat-toy") and "<cat-toy>" in result.stderr
    records = json.loads(invoke("ls", "--json").stdout)
    assert {r["name"]: r["token"] for r in records} == {"cat-toy": "<cat-toy>", "half": "<half>"}
    assert json.loads(invoke("show", "cat-toy", "--json").stdout)["weights"]["verified"] is True


def test_mv_and_cp_errors(two_concepts):
    assert_one_line_error(invoke("mv", "blob", "half"), "exists already")
    assert_one_line_error(invoke("mv", "blob", "My Cat"), "invalid concept name", "'my-cat'")
    assert_one_line_error(invoke("mv", "blob", "../../etc"), "invalid concept name")
    assert_one_line_error(invoke("cp", "nope", "new"), "no concept named 'nope'")
    assert Registry().names() == ["blob", "half"]


def test_cp_copies(two_concepts):
    result = invoke("cp", "blob", "blob2")
    assert result.exit_code == 0, result.output
    first, second = (json.loads(invoke("show", name, "--json").stdout) for name in ("blob", "blob2"))
    assert second["token"] == "<blob2>" and first["weights"]["verified"] is True
    assert second["weights"]["verified"] is True


# --------------------------------------------------------------------------- error boundary and imports


def test_debug_env_lets_the_exception_through(two_concepts, monkeypatch):
    monkeypatch.setenv("STC_DEBUG", "1")
    result = invoke("show", "blub")
    assert result.exit_code != 0 and result.exception is not None


def test_help_ls_and_show_do_not_import_torch(two_concepts, stc_home):
    script = textwrap.dedent(
        """
        import sys
        from typer.testing import CliRunner
        import stc.cli
        assert "torch" not in sys.modules, "importing the CLI imported torch"
        runner = CliRunner()
        for args in (["--help"], ["ls"], ["ls", "--json"], ["show", "blob"], ["rm", "half", "--dry-run"]):
            result = runner.invoke(stc.cli.app, args)
            assert result.exit_code == 0, (args, result.output)
            assert "torch" not in sys.modules, args
        print("ok")
        """
    )
    env = {**os.environ, "STC_HOME": str(stc_home)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_ls_caches_records_and_notices_every_change(stc_home, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    make_concept("blob")
    first = json.loads(invoke("ls", "--json").stdout)
    assert (stc_home / ".listing.json").is_file()
    assert json.loads(invoke("ls", "--json").stdout) == first  # served from the cache

    import stc.store.listing

    calls = []
    real = stc.store.listing.listing_record
    monkeypatch.setattr(stc.store.listing, "listing_record",
                        lambda concept: calls.append(concept.name) or real(concept))
    invoke("ls")
    assert calls == []  # nothing changed: no concept.yaml was parsed
    assert invoke("mv", "blob", "bloom").exit_code == 0
    make_concept("half", steps_done=4)
    records = json.loads(invoke("ls", "--json").stdout)
    assert [r["name"] for r in records] == ["bloom", "half"] and sorted(calls) == ["bloom", "half"]
    assert records[1]["complete"] is False

    weights = stc_home / "concepts" / "half" / "mapper.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # damaged after it was cached
    result = invoke("ls")
    assert "half" in result.stdout and "Warning: half: its weights file is truncated" in result.stderr


def test_ls_never_creates_folders_for_its_cache(stc_home):
    assert invoke("ls").exit_code == 0
    assert not stc_home.exists()


def test_rm_help_shows_the_type_of_one_name():
    result = invoke("rm", "--help")
    assert result.exit_code == 0
    assert "NAME <str>..." in result.stdout and "list[str]" not in result.stdout
