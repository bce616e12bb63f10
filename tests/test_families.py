"""The shared family suite: what every model family stc knows must do, written once and run on a
random-weight model of each (builtin:tiny = SD 1.x's layout, builtin:tiny-sd2 = SD 2.x's,
builtin:tiny-sdxl = SDXL's). A new family's backbone passes this suite on a model of its layout
(docs/architecture.md, "Adding a model family"). What only one family does (SD 2.x's v-prediction,
SDXL's two encoders and pooled embedding) stays in test_sd2.py and test_sdxl.py."""

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error, invoke

from stc.method.spacetime import SpaceTimeConditioning, cross_attention_layers, install_processors
from stc.models.backbones import BACKBONES, SD1, SDXL, backbone_for_widths, backbone_of, label_of_widths
from stc.models.base import load_base_model
from stc.store.conceptio import load_mapper
from stc.store.registry import Registry

# (builtin, its layout, its text encoders' widths, its transformer blocks per layer, its size in px)
FAMILY_MODELS = {
    "builtin:tiny": ("sd", (32,), [1] * 16, 64),
    "builtin:tiny-sd2": ("sd", (48,), [1] * 16, 96),
    "builtin:tiny-sdxl": ("sdxl", (32, 48), [2, 2, 3, 3, 3, 3, 3, 3, 2, 2, 2], 64),
}
FAST = ("--steps", 2, "--batch-size", 1, "--grad-accum", 1, "--save-every", 0, "--preview-every", 0)


@pytest.fixture(scope="module", params=sorted(FAMILY_MODELS))
def family(request):
    return request.param, load_base_model(request.param, device="cpu")


def test_the_backbone_of_each_model_is_its_layout_at_its_widths(family):
    spec, base = family
    layout, widths, _, size = FAMILY_MODELS[spec]
    backbone = backbone_of(base.pipeline)
    assert (backbone.layout, backbone.widths) == (layout, widths)
    assert base.encoder_widths == list(widths) and base.text_width == sum(widths)
    assert base.default_resolution == size
    encoders = backbone.text_encoders(base.pipeline)
    assert [encoder.module.config.hidden_size for encoder in encoders] == list(widths)
    assert len(backbone.tokenizers(base.pipeline)) == len(widths)
    assert backbone_for_widths(widths) == backbone  # a concept of these widths asks the same backbone
    assert label_of_widths(widths) == backbone.label == base.family_label


def test_the_known_families_are_told_apart_by_their_widths():
    assert [(backbone.label, backbone.widths) for backbone in BACKBONES] == [
        ("SD 1.x", (768,)), ("SD 2.x", (1024,)), ("SDXL", (768, 1280))]
    assert [backbone_for_widths(backbone.widths) for backbone in BACKBONES] == list(BACKBONES)
    assert backbone_for_widths((32,)).label == "SD 1.x/2.x" and backbone_for_widths((32, 48)).label == "SDXL"
    assert backbone_for_widths((1, 2, 3)) is None
    assert SD1.ti_keys == ("emb_params",) and SDXL.ti_keys == ("clip_l", "clip_g")
    assert SD1.a1111_pt and not SDXL.a1111_pt


def test_every_cross_attention_reads_its_layers_keys_and_values(family):
    """In a real UNet call, every cross-attention module projects its own layer's keys (to_k) and
    values (to_v), the layers in the backbone's order: distinct random sequences per layer, so a
    module reading another layer's, or the plain prompt, fails."""
    spec, base = family
    _, widths, blocks, _ = FAMILY_MODELS[spec]
    unet = copy.deepcopy(base.pipeline.unet)
    names = install_processors(unet)
    assert names == list(base.backbone.layer_names)
    layers = cross_attention_layers(unet)
    assert [len(modules) for _, modules in layers] == blocks
    seen, order = {}, []
    for _, modules in layers:
        for name in modules:
            attn = unet.get_submodule(name)
            attn.to_k.register_forward_pre_hook(lambda m, a, n=name: seen.setdefault(n, {}).__setitem__("k", a[0]))
            attn.to_v.register_forward_pre_hook(lambda m, a, n=name: seen[n].__setitem__("v", a[0]))
            attn.register_forward_pre_hook(lambda m, a, n=name: order.append(n))
    generator = torch.Generator().manual_seed(0)
    width = sum(widths)
    keys = torch.randn(len(layers), 2, 77, width, generator=generator)
    values = torch.randn(len(layers), 2, 77, width, generator=generator)
    plain = torch.zeros(2, 77, width)  # what a layer without the conditioning would read
    pooled = torch.randn(2, widths[-1], generator=generator)
    added = base.backbone.added_conditioning(pooled, 64, 64)
    with torch.no_grad():
        unet(torch.randn(2, 4, 8, 8, generator=generator), 500, encoder_hidden_states=plain,
             cross_attention_kwargs={"spacetime": SpaceTimeConditioning(keys, values)}, added_cond_kwargs=added)
    assert order == [name for _, modules in layers for name in modules]  # the layers run in this order
    for layer, (_, modules) in enumerate(layers):
        for name in modules:
            assert torch.equal(seen[name]["k"], keys[layer]) and torch.equal(seen[name]["v"], values[layer]), name


def test_train_gen_grid_inspect_export_import_on_every_family(family, photos, tmp_path, no_network):
    """The whole command line on each family, offline: a trained concept renders, grids, inspects,
    exports as every format the family holds (each one the registry refuses otherwise), and comes
    back from its diffusers export bit for bit."""
    from safetensors.torch import load_file

    from stc.exchange.registry import export_formats

    spec, base = family
    _, widths, _, size = FAMILY_MODELS[spec]
    result = invoke("train", photos, "--name", "pet", "--init", "cat", "--model", spec, *FAST)
    assert result.exit_code == 0, result.output
    stored = Registry().load("pet")
    assert stored.layer_names == list(base.backbone.layer_names) and stored.encoder_widths == list(widths)
    shown = json.loads(invoke("show", "pet", "--json").stdout)
    assert shown["base_model"] == spec and f"({base.backbone.label})" in shown["fits"]

    result = invoke("gen", "<pet> on the moon", "--steps", 2, "--rank", 8, "--out", tmp_path / "gen", "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert (record["base_model"], record["width"], record["height"]) == (spec, size, size)
    for args in (("grid", "<pet> on the moon", "--steps", 2, "--ranks", "1,128", "--seeds", "0",
                  "--out", tmp_path / "grid.png"),
                 ("inspect", "pet", "--steps", 4, "--plot", tmp_path / "inspect.png")):
        result = invoke(*args)
        assert result.exit_code == 0, (args, result.output)

    for name, fmt in export_formats().items():
        extra = ("--samples", 8, "--fit-steps", 2) if fmt.distils else ()
        result = invoke("export", "pet", "--format", name, "--out", tmp_path / name, *extra)
        if not fmt.holds(base.backbone):
            assert_one_line_error(result, base.backbone.label, "only")
            continue
        assert result.exit_code == 0, (name, result.output)
        if name == "ti":  # the family's layout: a tensor per text encoder, each its width
            tensors = load_file(str(tmp_path / name / "pet.safetensors"))
            assert sorted(tensors) == sorted(base.backbone.ti_keys)
            assert [tensors[key].shape[-1] for key in base.backbone.ti_keys] == list(widths)
    refused = [name for name, fmt in export_formats().items() if not fmt.holds(base.backbone)]
    assert refused == ["neti"]  # the reference's format holds SD 1.x's 768-wide concepts only

    result = invoke("import", tmp_path / "diffusers" / "pet", "--name", "back")
    assert result.exit_code == 0, result.output
    back, trained = load_mapper(Registry().load("back")).state_dict(), load_mapper(stored).state_dict()
    assert back.keys() == trained.keys() and all(torch.equal(back[key], trained[key]) for key in back)
    result = invoke("import", tmp_path / "concept-file" / "pet.safetensors", "--name", "back-file")
    assert result.exit_code == 0, result.output
    back_file = load_mapper(Registry().load("back-file")).state_dict()
    assert all(torch.equal(back_file[key], trained[key]) for key in trained)  # the single file: bit for bit too
    config = json.loads((tmp_path / "diffusers" / "pet" / "config.json").read_text())
    assert config["pipeline_class"] == base.backbone.pipeline_class == type(base.pipeline).__name__
    assert [reading["component"] for reading in config["text_encoders"]] == [
        reading.component for reading in base.backbone.readings]


@pytest.mark.parametrize("concept_model,render_model", [
    ("builtin:tiny", "builtin:tiny-sdxl"), ("builtin:tiny-sdxl", "builtin:tiny"), ("builtin:tiny", "builtin:tiny-sd2"),
])
def test_a_concept_of_another_family_is_a_one_line_error_naming_both(photos, tmp_path, concept_model, render_model,
                                                                     monkeypatch):
    """Said before any weights load: the model's widths come from its config."""
    import stc.models.base

    result = invoke("train", photos, "--name", "pet", "--init", "cat", "--model", concept_model, *FAST)
    assert result.exit_code == 0, result.output

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the families were compared")

    monkeypatch.setattr(stc.models.base, "load_base_model", no_loading)
    result = invoke("gen", "<pet> on the moon", "--model", render_model, "--steps", 1, "--out", tmp_path)
    ours = label_of_widths(FAMILY_MODELS[concept_model][1])
    theirs = label_of_widths(FAMILY_MODELS[render_model][1])
    assert_one_line_error(result, ours, theirs, concept_model)
    if ours == theirs:  # the same layout at other widths: the widths tell them apart
        for model in (concept_model, render_model):
            assert f"text width {sum(FAMILY_MODELS[model][1])}" in result.stderr
    assert not any(Path(tmp_path).glob("*.png"))
    result = invoke("export", "pet", "--format", "ti", "--model", render_model, "--out", tmp_path / "ti")
    assert_one_line_error(result, ours, theirs)  # the distillation's model too
