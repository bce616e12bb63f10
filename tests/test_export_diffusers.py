"""stc export --format diffusers: the export renders in plain diffusers exactly as stc gen does."""

import ast
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_same_render, invoke, save_concept
from PIL import Image
from safetensors.torch import load

from stc import __version__
from stc.errors import BadInput
from stc.exchange.diffusers_folder import (
    EXPORT_FORMAT,
    module_source,
    read_diffusers_export,
    write_diffusers_export,
)
from stc.method.spacetime import cross_attention_layer_names
from stc.models.schedulers import SCHEDULERS

# Runs where stc cannot be imported: a plain diffusers pipeline, the export's module, nothing else.
RENDER_WITHOUT_STC = r"""
import json, sys
sys.modules["stc"] = None  # `import stc` raises ImportError from here on
try:
    import stc
    stc_blocked = False
except ImportError:
    stc_blocked = True
import torch
from diffusers import StableDiffusionPipeline

model, cat, dog, out, threads = sys.argv[1:6]
torch.set_num_threads(int(threads))
sys.path.insert(0, cat)
from stc_concept import load_concept


def render(pipe, prompt, name):
    image = pipe(prompt, num_inference_steps=4, guidance_scale=7.5,
                 generator=torch.Generator().manual_seed(3)).images[0]
    image.save(f"{out}/{name}.png")


pipe = StableDiffusionPipeline.from_pretrained(model)
pipe.set_progress_bar_config(disable=True)
scheduler = type(pipe.scheduler).__name__
token = load_concept(pipe, cat, rank=8)
render(pipe, "<cat> on the moon", "cat")
render(pipe, "a cat on the moon", "plain-hooked")  # after a concept render: the hooks must let go
load_concept(pipe, cat, rank=4)
render(pipe, "<cat> on the moon", "cat-rank4")
load_concept(pipe, cat, rank=8)
load_concept(pipe, dog, rank=8)
render(pipe, "<cat> next to <dog>", "cat-dog")

untouched = StableDiffusionPipeline.from_pretrained(model)
untouched.set_progress_bar_config(disable=True)
render(untouched, "a cat on the moon", "plain-untouched")
print(json.dumps({"stc_blocked": stc_blocked, "scheduler": scheduler, "token": token}))
"""


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> tuple[Path, list[str]]:
    """builtin:tiny saved as a local diffusers folder (read only), and its layer names."""
    from stc.models.base import load_base_model

    pipeline = load_base_model("builtin:tiny", device="cpu").pipeline
    folder = tmp_path_factory.mktemp("model") / "tiny-model"
    pipeline.save_pretrained(folder)
    return folder, cross_attention_layer_names(pipeline.unet)


@pytest.fixture
def model_folder(tiny_folder) -> Path:
    return tiny_folder[0]


@pytest.fixture
def make_concept(tiny_folder):
    """make_concept(name, seed): a random-mapper concept on the saved builtin:tiny, in the registry."""
    folder, layer_names = tiny_folder

    def make(name: str, seed: int):
        return save_concept(name, seed, layer_names=layer_names, base_model=str(folder))

    return make


def export(concept, target: Path, **kwargs) -> Path:
    target.mkdir(parents=True)
    write_diffusers_export(concept, concept.weights_path.read_bytes(), target, **kwargs)
    return target


def stc_gen(prompt: str, folder: Path, out: Path) -> Path:
    result = invoke("gen", prompt, "--model", folder, "--seed", 3, "--steps", 4, "--rank", 8, "--out", out)
    assert result.exit_code == 0, result.output
    return Path(result.stdout.strip().splitlines()[-1])


def test_the_export_renders_in_plain_diffusers_exactly_as_stc_gen(tmp_path, model_folder, make_concept):
    cat, dog = make_concept("cat", 1), make_concept("dog", 2)
    stc_cat = stc_gen("<cat> on the moon", model_folder, tmp_path / "stc")
    stc_cat_dog = stc_gen("<cat> next to <dog>", model_folder, tmp_path / "stc")
    cat_dir, dog_dir = export(cat, tmp_path / "cat-export"), export(dog, tmp_path / "dog-export")
    out = tmp_path / "diffusers"
    out.mkdir()

    run = subprocess.run(
        [sys.executable, "-c", RENDER_WITHOUT_STC, model_folder, cat_dir, dog_dir, out, str(torch.get_num_threads())],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report == {"stc_blocked": True, "scheduler": SCHEDULERS["dpm"][0], "token": "<cat>"}

    # the same image: plain diffusers (its pipeline not frozen: other GEMM paths on some CPUs) vs stc gen
    assert_same_render(pixels(out / "cat.png"), pixels(stc_cat))
    assert_same_render(pixels(out / "cat-dog.png"), pixels(stc_cat_dog))  # two concepts in one prompt
    # stc's processors with no concept in the prompt vs diffusers' own: the same image to rounding
    assert_same_render(pixels(out / "plain-hooked.png"), pixels(out / "plain-untouched.png"))
    # the comparison can fail: another rank, or no concept, gives another image
    assert not np.array_equal(pixels(out / "cat-rank4.png"), pixels(stc_cat))
    assert not np.array_equal(pixels(out / "plain-hooked.png"), pixels(stc_cat))


def test_the_export_folder_holds_the_weights_config_module_and_model_card(tmp_path, model_folder, make_concept):
    cat = make_concept("cat", 1)
    preview = tmp_path / "preview.png"
    Image.new("RGB", (8, 8), "red").save(preview)
    target = tmp_path / "export"
    target.mkdir()
    weights = cat.weights_path.read_bytes()
    files = write_diffusers_export(cat, weights, target, rank=8, preview=preview)

    names = ["mapper.safetensors", "config.json", "stc_concept.py", "preview.png", "README.md"]
    assert [path.name for path in files] == names
    assert sorted(path.name for path in target.iterdir()) == sorted(names)
    assert (target / "mapper.safetensors").read_bytes() == weights
    assert (target / "preview.png").read_bytes() == preview.read_bytes()

    config = json.loads((target / "config.json").read_text())
    assert config["format"] == EXPORT_FORMAT == "stc-diffusers/1"
    assert config["stc_version"] == __version__
    assert (config["name"], config["token"], config["initializer"]) == ("cat", "<cat>", "cat")
    assert config["base_model"] == str(model_folder)
    assert config["text_width"] == 32 and config["layer_names"] == cat.layer_names
    assert (config["rank"], config["rank_max"]) == (8, 128)
    assert config["mapper"] == cat.mapper
    assert config["weights_sha256"] == hashlib.sha256(weights).hexdigest() == cat.weights_sha256

    source = (target / "stc_concept.py").read_text()
    tree = ast.parse(source)
    docstring = ast.get_docstring(tree)
    assert f"stc {__version__}" in docstring and "load_concept(pipe, folder)" in docstring
    assert '"<cat> on the moon"' in docstring
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "hashlib", "json", "collections", "dataclasses", "functools", "pathlib", "types",
                        "torch", "transformers", "safetensors"}
    defined = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    assert {"NeTIMapper", "SpaceTimeAttnProcessor", "encode_layers", "load_concept", "unload_concepts"} <= defined

    card = (target / "README.md").read_text()
    front = card.split("---\n")[1]
    assert "base_model:" not in front  # a local path is no Hub id; the body says so
    for line in ("- stable-diffusion", "- text-to-image", "- neti", "- stc", "- textual-inversion",
                 "license: creativeml-openrail-m", "library_name: diffusers"):
        assert line in front
    assert "![<cat>, rendered by stc](preview.png)" in card
    assert 'load_concept(pipe, folder)' in card and '"<cat> on the moon"' in card
    assert "Lossless" in card and "initializer word: `cat`" in card and "ranks: 1..128" in card


def test_the_model_card_names_a_hub_base_model(tmp_path, make_concept):
    cat = make_concept("cat", 1)
    cat.base_model = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    target = export(cat, tmp_path / "export")
    card = (target / "README.md").read_text()
    assert "base_model: stable-diffusion-v1-5/stable-diffusion-v1-5\n" in card.split("---\n")[1]
    assert 'from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")' in card
    assert "![" not in card  # no preview given


def test_read_diffusers_export_round_trips(tmp_path, make_concept):
    cat = make_concept("cat", 1)
    target = export(cat, tmp_path / "export", rank=4)
    config, state = read_diffusers_export(target)
    assert config == json.loads((target / "config.json").read_text())
    assert config["rank"] == 4 and config["mapper"] == cat.mapper
    expected = load(cat.weights_path.read_bytes())
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[key], expected[key]) for key in expected)


def _damage(target: Path, how: str) -> None:
    config_path = target / "config.json"
    config = json.loads(config_path.read_text())
    if how == "no-config":
        config_path.unlink()
    elif how == "bad-json":
        config_path.write_text("{not json")
    elif how == "not-an-object":
        config_path.write_text("[1, 2]")
    elif how == "other-format":
        config_path.write_text(json.dumps({**config, "format": "something-else"}))
    elif how == "newer-format":
        config_path.write_text(json.dumps({**config, "format": "stc-diffusers/2"}))
    elif how == "missing-key":
        config_path.write_text(json.dumps({k: v for k, v in config.items() if k != "layer_names"}))
    elif how == "wrong-type":
        config_path.write_text(json.dumps({**config, "text_width": "32"}))
    elif how == "no-weights":
        (target / "mapper.safetensors").unlink()
    elif how == "sha-mismatch":
        data = bytearray((target / "mapper.safetensors").read_bytes())
        data[-1] ^= 1
        (target / "mapper.safetensors").write_bytes(bytes(data))
    elif how == "not-safetensors":
        (target / "mapper.safetensors").write_bytes(b"not safetensors")
        config_path.write_text(json.dumps({**config, "weights_sha256": hashlib.sha256(b"not safetensors").hexdigest()}))
    elif how == "wrong-shapes":
        config_path.write_text(json.dumps({**config, "mapper": {**config["mapper"], "hidden_dim": 64}}))


@pytest.mark.parametrize("how, fragments", [
    ("no-config", ["is not an stc diffusers export", "no config.json"]),
    ("bad-json", ["config.json is not valid JSON"]),
    ("not-an-object", ["is not a JSON object"]),
    ("other-format", ["is not an stc diffusers export", "'something-else'"]),
    ("newer-format", ["'stc-diffusers/2'", "upgrade stc"]),
    ("missing-key", ["lacks layer_names"]),
    ("wrong-type", ["'text_width' should be a int, not str"]),
    ("no-weights", ["mapper.safetensors is missing"]),
    ("sha-mismatch", ["does not match the sha256 in config.json", "damaged"]),
    ("not-safetensors", ["is not a readable safetensors file"]),
    ("wrong-shapes", ["does not fit its mapper config"]),
])
def test_read_diffusers_export_refuses_what_is_not_an_export(tmp_path, make_concept, how, fragments):
    target = export(make_concept("cat", 1), tmp_path / "export")
    _damage(target, how)
    with pytest.raises(BadInput) as caught:
        read_diffusers_export(target)
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_read_diffusers_export_refuses_a_missing_folder(tmp_path):
    with pytest.raises(BadInput, match="is not a folder"):
        read_diffusers_export(tmp_path / "nothing")


def test_write_refuses_a_bad_rank_other_weights_and_a_missing_preview(tmp_path, make_concept):
    cat = make_concept("cat", 1)
    weights = cat.weights_path.read_bytes()
    with pytest.raises(BadInput, match=r"cat has ranks 1\.\.128; rank 200 is outside them"):
        write_diffusers_export(cat, weights, tmp_path, rank=200)
    other = make_concept("dog", 2).weights_path.read_bytes()
    with pytest.raises(BadInput, match="not the file its concept.yaml records"):
        write_diffusers_export(cat, other, tmp_path)
    with pytest.raises(BadInput, match="does not exist"):
        write_diffusers_export(cat, weights, tmp_path, preview=tmp_path / "missing.png")
    assert list(tmp_path.glob("*.safetensors")) == []


def test_stitching_fails_loudly_when_the_module_would_lack_a_name(monkeypatch):
    import stc.exchange.diffusers_folder as export_diffusers

    stitched = tuple(
        (module, tuple(name for name in names if name != "split_outputs"))
        for module, names in export_diffusers.STITCHED
    )
    monkeypatch.setattr(export_diffusers, "STITCHED", stitched)
    config = {"name": "cat", "token": "<cat>", "base_model": "builtin:tiny", "rank": None, "rank_max": 128,
              "pipeline_class": "StableDiffusionPipeline"}
    with pytest.raises(RuntimeError, match="names it does not define: split_outputs"):
        module_source(config)


def test_the_export_stitches_public_functions_that_exist():
    """STITCHED is the list of the functions stc_concept.py copies: each exists in its module and
    is public there (part of the module's interface: a private helper could be renamed without a
    thought for the export)."""
    import importlib

    import stc.exchange.diffusers_folder as export_diffusers

    for module_name, names in export_diffusers.STITCHED:
        module = importlib.import_module(module_name)
        for name in names:
            assert hasattr(module, name), f"{module_name}.{name} is stitched but does not exist"
            assert not name.startswith("_"), f"{module_name}.{name} is private: stitch public functions only"


def test_a_stitched_function_that_imports_from_stc_or_is_renamed_fails_the_export(monkeypatch):
    import inspect

    import stc.method.encoding as encoding

    config = {"name": "cat", "token": "<cat>", "base_model": "builtin:tiny", "rank": None, "rank_max": 128,
              "pipeline_class": "StableDiffusionPipeline"}
    module_source(config)  # as it is: self-contained

    source = "def spacetime_rows(timesteps, num_layers):\n    from stc.errors import BadInput\n    return BadInput\n"
    namespace = {}
    exec(compile(source, encoding.__file__, "exec"), namespace)  # a stitched function that gained an stc import
    real_getsource = inspect.getsource
    monkeypatch.setattr(encoding, "spacetime_rows", namespace["spacetime_rows"])
    monkeypatch.setattr(inspect, "getsource",
                        lambda value: source if value is namespace["spacetime_rows"] else real_getsource(value))
    with pytest.raises(RuntimeError, match="import from stc"):
        module_source(config)
    monkeypatch.delattr(encoding, "spacetime_rows")  # renamed away
    with pytest.raises(AttributeError, match="spacetime_rows"):
        module_source(config)
