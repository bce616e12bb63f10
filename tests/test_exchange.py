"""stc export / stc import: every format round-trips and loads in the consumer it targets."""

import pickletools
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_close_in_scale, assert_one_line_error, invoke, make_concept, save_concept
from torch import nn

from stc.method.mapper import MapperConfig, NeTIMapper
from stc.models.backbones import SD_LAYER_NAMES
from stc.store.conceptio import load_mapper, weights_bytes
from stc.store.registry import Registry

DATA = Path(__file__).parent / "data"


def sd_concept(name: str = "wide", seed: int = 5):
    """A concept with SD 1.x's text width (768) and a random mapper, saved in the registry."""
    mapper = NeTIMapper(MapperConfig(text_width=768, norm_scale=0.39), generator=torch.Generator().manual_seed(seed))
    mapper = mapper.eval().requires_grad_(False)
    concept = make_concept(name, layer_names=SD_LAYER_NAMES, text_width=768, mapper=mapper.config.to_dict(),
                           base_model="some-org/sd-model")
    return Registry().save(concept, weights_bytes(mapper, name)), mapper


def outputs_on_a_grid(mapper, ranks=(1, 8, 128)):
    t = torch.arange(0, 1000, 37, dtype=torch.float32).repeat_interleave(16)
    l = torch.arange(16, dtype=torch.float32).repeat(len(t) // 16)
    with torch.no_grad():
        return torch.stack([mapper(t, l, rank=rank) for rank in ranks])


def registry_bytes(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and ".locks" not in p.parts}


# --------------------------------------------------------------------------- neti


class ReferenceNeTIMapper(nn.Module):
    """A test double of the reference's NeTIMapper layout: the input layer registered twice and an
    encoder submodule whose ``w`` is not in the state_dict (as CUDA runs leave it)."""

    def __init__(self, output_dim: int = 768 * 2):
        super().__init__()
        self.encoder = nn.Module()
        self.input_layer = nn.Linear(2048, 160)
        self.net = nn.Sequential(self.input_layer, nn.Linear(160, 128), nn.LayerNorm(128), nn.LeakyReLU(),
                                 nn.Linear(128, 128), nn.LayerNorm(128), nn.LeakyReLU())
        self.output_layer = nn.Sequential(nn.Linear(128, output_dim))


@pytest.fixture
def reference_classes(monkeypatch):
    """The reference's ``models.positional_encoding`` as its loader would import it."""

    class NeTIPositionalEncoding(nn.Module):
        pass

    module = types.ModuleType("models.positional_encoding")
    module.NeTIPositionalEncoding = NeTIPositionalEncoding
    package = types.ModuleType("models")
    package.positional_encoding = module
    monkeypatch.setitem(sys.modules, "models", package)
    monkeypatch.setitem(sys.modules, "models.positional_encoding", module)
    return NeTIPositionalEncoding


def test_neti_export_loads_strictly_in_the_reference_layout(tmp_path, reference_classes):
    concept, mapper = sd_concept()
    before = registry_bytes(Registry().root)
    result = invoke("export", "wide", "--format", "neti", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    mapper_path, embeds_path = tmp_path / "wide-mapper.pt", tmp_path / "wide-learned_embeds.bin"
    assert result.stdout.split() == [str(mapper_path), str(embeds_path)]
    assert "keeps the mapper exactly" in result.stderr
    assert registry_bytes(Registry().root) == before  # exporting never modifies the registry

    with zipfile.ZipFile(mapper_path) as archive:
        pickled = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    globals_used = {arg for op, arg, _ in pickletools.genops(pickled) if op.name in ("GLOBAL", "STACK_GLOBAL")}
    assert "models.positional_encoding NeTIPositionalEncoding" in globals_used
    assert not any("stc" in name for name in globals_used)

    checkpoint = torch.load(mapper_path, map_location="cpu", weights_only=False)  # as the reference loads it
    assert set(checkpoint) == {"state_dict", "cfg", "encoder"}
    assert "encoder.w" not in checkpoint["state_dict"]
    ReferenceNeTIMapper().load_state_dict(checkpoint["state_dict"], strict=True)
    encoder = checkpoint["encoder"]
    assert isinstance(encoder, reference_classes)
    assert torch.equal(encoder.w, mapper.state_dict()["encoding.w"])
    assert (encoder.sigma_t, encoder.sigma_l, encoder.num_w) == (0.03, 2.0, 1024)
    cfg = checkpoint["cfg"]
    assert cfg["model"]["target_norm"] == pytest.approx(0.39)
    assert cfg["model"]["pe_sigmas"] == {"sigma_t": 0.03, "sigma_l": 2.0} and cfg["model"]["output_bypass"] is True
    assert cfg["data"]["placeholder_token"] == "<wide>" and cfg["data"]["super_category_token"] == "cat"
    assert set(cfg) == {"log", "data", "model", "eval", "optim"}
    embeds = torch.load(embeds_path, weights_only=True)
    assert list(embeds) == ["<wide>"] and embeds["<wide>"].shape == (768,)


def test_neti_round_trip_and_the_reference_fixture_import(tmp_path):
    _, mapper = sd_concept()
    assert invoke("export", "wide", "--format", "neti", "--out", tmp_path).exit_code == 0
    result = invoke("import", tmp_path / "wide-mapper.pt", "--name", "back")
    assert result.exit_code == 0, result.output
    back = Registry().load("back")
    assert back.base_model == "some-org/sd-model" and back.initializer == "cat" and back.text_width == 768
    assert torch.allclose(outputs_on_a_grid(load_mapper(back)), outputs_on_a_grid(mapper), atol=1e-6)

    # real output of the reference code: every sample (t, l, rank) reproduced through the registry
    result = invoke("import", DATA / "neti-sample-mapper.pt")
    assert result.exit_code == 0, result.output
    imported = Registry().load("ref")  # the name comes from the placeholder <ref>
    assert imported.base_model == "CompVis/stable-diffusion-v1-4" and imported.initializer == "object"
    assert list(imported.layer_names) == list(SD_LAYER_NAMES)
    expected = np.load(DATA / "neti-sample-outputs.npz")
    imported_mapper = load_mapper(imported)
    t, l = torch.tensor(expected["sample_t"]).float(), torch.tensor(expected["sample_l"]).float()
    for index, rank in enumerate(expected["ranks"].tolist()):
        with torch.no_grad():
            ours = imported_mapper(t, l, rank=int(rank))
        # the reference code's outputs, computed by another torch on another CPU: rounding relative to
        # their scale (~0.04; seen at 6e-7 of it); 2.5e-5 of it is the 1e-6 the reference pins hold
        assert_close_in_scale(ours, expected["samples"][index], 2.5e-5)


def test_neti_refuses_what_the_reference_cannot_hold_and_import_checks_widths(tmp_path):
    save_concept("narrow")  # builtin:tiny's width is 32
    out = tmp_path / "out"
    assert_one_line_error(invoke("export", "narrow", "--format", "neti", "--out", out), "768", "narrow")
    assert not out.exists()  # refused before anything was created
    assert_one_line_error(invoke("import", DATA / "neti-sample-mapper.pt", "--model", "builtin:tiny"),
                          "768", "builtin:tiny has 32")
    assert Registry().names() == ["narrow"]  # nothing imported


def test_a_pickle_with_code_is_refused_on_import_and_never_runs(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"string_to_param": {"*": Payload()}}, tmp_path / "evil.pt")
    assert_one_line_error(invoke("import", tmp_path / "evil.pt"), "refused")
    assert not marker.exists() and not Registry().names()


# --------------------------------------------------------------------------- ti / a1111 and imports


def test_ti_and_a1111_exports_load_in_diffusers_and_round_trip(tmp_path, tiny):
    from stc.method.spacetime import cross_attention_layer_names

    save_concept("pup", seed=3, layer_names=cross_attention_layer_names(tiny.pipeline.unet))
    fast = ("--samples", 16, "--fit-steps", 10)
    result = invoke("export", "pup", "--format", "ti", "--out", tmp_path, "--rank", 8, *fast)
    assert result.exit_code == 0, result.output
    assert "Fidelity" in result.stderr and "plain average" in result.stderr and "initializer" in result.stderr
    assert "64 held-out samples" in result.stderr and "Written: the " in result.stderr  # what was written, why
    from safetensors import safe_open
    from safetensors.torch import load_file

    vectors = load_file(tmp_path / "pup.safetensors")["emb_params"]
    assert vectors.shape == (1, 32)
    with safe_open(str(tmp_path / "pup.safetensors"), framework="pt") as handle:
        assert handle.metadata()["base_model"] == "builtin:tiny"
    result = invoke("export", "pup", "--format", "a1111", "--out", tmp_path, "--vectors", 2, *fast)
    assert result.exit_code == 0, result.output
    embedding = torch.load(tmp_path / "pup.pt", weights_only=True)  # tensors, strings and ints only
    assert set(embedding) == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint",
                              "sd_checkpoint_name"}
    assert embedding["string_to_param"]["*"].shape == (2, 32) and embedding["name"] == "pup"
    assert embedding["sd_checkpoint_name"] == "builtin:tiny"

    pipe = tiny.pipeline
    pipe.load_textual_inversion(str(tmp_path / "pup.safetensors"), token="<pup-ti>")
    pipe.load_textual_inversion(str(tmp_path / "pup.pt"), token="<pup-a1111>")
    table = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(table[pipe.tokenizer.convert_tokens_to_ids("<pup-ti>")], vectors[0])
    assert torch.equal(table[pipe.tokenizer.convert_tokens_to_ids("<pup-a1111>_1")],
                       embedding["string_to_param"]["*"][1])

    # back again, without --model: the files name their model
    result = invoke("import", tmp_path / "pup.safetensors", "--name", "pup-ti")
    assert result.exit_code == 0, result.output
    imported = Registry().load("pup-ti")
    assert imported.base_model == "builtin:tiny" and imported.rank_max is None
    token, bypass = load_mapper(imported).split(outputs_on_a_grid(load_mapper(imported), ranks=(1, 128)))
    assert bypass is None
    assert torch.allclose(token, vectors[0].expand_as(token), atol=1e-6)  # the same vector everywhere
    result = invoke("import", tmp_path / "pup.pt", "--name", "pup-two")  # two vectors: <pup-two> is two tokens
    assert result.exit_code == 0, result.output
    two = Registry().load("pup-two")
    assert two.base_model == "builtin:tiny" and two.mapper["num_vectors"] == 2
    # ... which export back exactly, with nothing to distil and no base model to load
    (tmp_path / "again").mkdir()
    result = invoke("export", "pup-two", "--format", "ti", "--out", tmp_path / "again", "--model", "builtin:nothing")
    assert result.exit_code == 0, result.output
    assert "exactly" in result.stderr and "Fidelity" not in result.stderr
    assert torch.equal(load_file(tmp_path / "again" / "pup-two.safetensors")["emb_params"],
                       embedding["string_to_param"]["*"])


def test_a_multi_vector_concept_puts_each_vector_in_its_own_token(tiny):
    """<name> of an imported n-vector embedding is written out as n tokens (diffusers' <name>,
    <name>_1, ...), the i-th reading the i-th vector, at every step and layer: what diffusers'
    own load_textual_inversion of the same vectors gives."""
    import copy

    from stc.exchange.ti import constant_mapper
    from stc.method.spacetime import cross_attention_layer_names
    from stc.render.generation import Renderer, RenderSettings

    vectors = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    concept = make_concept("tri", cross_attention_layer_names(tiny.pipeline.unet),
                           mapper=constant_mapper(vectors).config.to_dict())
    plain_pipe = copy.deepcopy(tiny.pipeline)
    renderer = Renderer(tiny, {"tri": (concept, constant_mapper(vectors))})
    prompt = "a photo of <tri> on the moon"
    ids = renderer.text.tokenize(prompt)[0][0].tolist()
    tokenizer = tiny.pipeline.tokenizer
    expected = [tokenizer.convert_tokens_to_ids(token) for token in ("<tri>", "<tri>_1", "<tri>_2")]
    start = ids.index(expected[0])
    assert ids[start:start + 3] == expected
    conditioning = renderer.condition(prompt, RenderSettings(steps=2))
    keys = conditioning.keys  # K x L x S x D: no bypass, so values are keys
    assert torch.equal(conditioning.values, keys)

    plain_pipe.load_textual_inversion(vectors, token="<tri>", tokenizer=plain_pipe.tokenizer,
                                      text_encoder=plain_pipe.text_encoder)
    words = plain_pipe.maybe_convert_prompt(prompt, plain_pipe.tokenizer)
    assert words == "a photo of <tri> <tri>_1 <tri>_2 on the moon"
    plain_ids = plain_pipe.tokenizer(words, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        expected_states = plain_pipe.text_encoder(plain_ids)[0]  # 1 x S x D
    # stc's batched (t, l) encoder against transformers' own forward: the same math in other
    # kernels and batch shapes; fp32 rounding stays far below 1e-5 of the states' scale
    for step, layer in ((0, 0), (1, 7), (1, 15)):
        assert_close_in_scale(keys[step, layer], expected_states[0], 1e-5)
    vectors[1] += 1  # another second vector: another conditioning
    other = Renderer(tiny, {"tri": (concept, constant_mapper(vectors))}).condition(prompt, RenderSettings(steps=2))
    assert not torch.allclose(other.keys, keys)


def test_export_refuses_unknown_formats_existing_targets_and_unwritable_folders(tmp_path, monkeypatch):
    save_concept("pup")
    assert_one_line_error(invoke("export", "pup", "--format", "lora"), "diffusers, ti, a1111, neti")
    assert_one_line_error(invoke("export", "pup", "--format", "ti", "--rank", 500),
                          "pup has ranks 1..128; --rank 500 is outside them")
    (tmp_path / "pup.safetensors").write_bytes(b"mine")
    assert_one_line_error(invoke("export", "pup", "--format", "ti", "--out", tmp_path), "--force")
    assert (tmp_path / "pup.safetensors").read_bytes() == b"mine"

    import tempfile

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    result = invoke("export", "pup", "--format", "ti", "--out", tmp_path / "sub", "--force")
    assert_one_line_error(result, "Permission denied")
    assert not (tmp_path / "sub" / "pup.safetensors").exists()


def test_import_names_and_clashes(tmp_path):
    vector = torch.randn(32)
    from safetensors.torch import save_file

    save_file({"<My Cat>": vector}, tmp_path / "My Cat.safetensors")  # diffusers' single-token layout
    result = invoke("import", tmp_path / "My Cat.safetensors", "--model", "builtin:tiny")
    assert result.exit_code == 0, result.output
    assert Registry().names() == ["my-cat"]  # a valid spelling of the file's name
    assert_one_line_error(invoke("import", tmp_path / "My Cat.safetensors", "--name", "my-cat",
                                 "--model", "builtin:tiny"), "exists already")
    (tmp_path / "notes.txt").write_text("hello")
    assert_one_line_error(invoke("import", tmp_path / "notes.txt"), "imports")


def test_diffusers_export_round_trips_through_import(tmp_path):
    concept = save_concept("pup", seed=4, layer_names=SD_LAYER_NAMES)
    before = outputs_on_a_grid(load_mapper(concept))
    result = invoke("export", "pup", "--format", "diffusers", "--out", tmp_path, "--rank", 8)
    assert result.exit_code == 0, result.output
    folder = tmp_path / "pup"
    assert {"stc_concept.py", "mapper.safetensors", "config.json", "README.md"} <= {p.name for p in folder.iterdir()}
    assert "keeps everything" in result.stderr
    assert_one_line_error(invoke("export", "pup", "--format", "diffusers", "--out", tmp_path), "--force")
    assert invoke("export", "pup", "--format", "diffusers", "--out", tmp_path, "--force").exit_code == 0
    result = invoke("import", folder, "--name", "pup-again")
    assert result.exit_code == 0, result.output
    again = Registry().load("pup-again")
    assert again.base_model == concept.base_model and list(again.layer_names) == list(SD_LAYER_NAMES)
    assert torch.equal(outputs_on_a_grid(load_mapper(again)), before)


def test_a_diffusers_export_brings_back_the_training_metrics_and_preview(tmp_path):
    """The README promises an export re-imported keeps its training record, metrics and preview."""
    from PIL import Image

    concept = save_concept("pup", seed=4, layer_names=SD_LAYER_NAMES)
    metrics = ('{"step": 1, "loss": 0.5, "lr": 0.008, "time": 1.0}\n'
               '{"step": 2, "loss": 0.25, "lr": 0.008, "time": 2.0}\n')
    (concept.path / "metrics.jsonl").write_text(metrics)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(concept.path / "preview.png")
    assert invoke("export", "pup", "--format", "diffusers", "--out", tmp_path).exit_code == 0
    assert (tmp_path / "pup" / "metrics.jsonl").read_text() == metrics
    result = invoke("import", tmp_path / "pup", "--name", "pup-again")
    assert result.exit_code == 0, result.output
    again = Registry().load("pup-again")
    assert (again.path / "metrics.jsonl").read_text() == metrics
    assert (again.path / "preview.png").read_bytes() == (concept.path / "preview.png").read_bytes()
    assert again.training.steps_done == concept.training.steps_done


def test_import_of_a_registry_top_folder_takes_its_one_concept_and_refuses_a_choice(tmp_path):
    other = Registry(tmp_path / "other")
    save_concept("solo", seed=2, registry=other)
    result = invoke("import", tmp_path / "other", "--name", "solo-back")
    assert result.exit_code == 0, result.output
    back, solo = load_mapper(Registry().load("solo-back")), load_mapper(other.load("solo"))
    assert torch.equal(outputs_on_a_grid(back), outputs_on_a_grid(solo))
    save_concept("duo", seed=3, registry=other)
    assert_one_line_error(invoke("import", tmp_path / "other"), "registry of 2 concepts", "concepts/duo")
