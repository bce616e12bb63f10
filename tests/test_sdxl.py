"""SDXL: the layer grouping, both text encoders, the pooled embedding and size ids, rendering and
training on builtin:tiny-sdxl (random weights in the SDXL layout). docs/method.md, "SDXL", is the
spec the expected values come from."""

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_in_scale, invoke

from stc.method.encoding import ConceptSlot, encode_context, encode_layers
from stc.method.mapper import MapperConfig, NeTIMapper
from stc.method.spacetime import cross_attention_layers
from stc.models.backbones import SDXL, SDXL_LAYER_NAMES
from stc.render.generation import Renderer, RenderSettings
from stc.store.conceptio import load_mapper, weights_bytes
from stc.store.registry import Registry

# SDXL's UNet (stabilityai/stable-diffusion-xl-base-1.0): transformer_layers_per_block (1, 2, 10), no
# attention in down_blocks.0 and up_blocks.2; down blocks hold 2 attention modules, up blocks 3, the mid
# block 1; up block k uses the reversed list. So, in execution order, modules of 2, 2, 10, 10 (down),
# 10 (mid), 10, 10, 10, 2, 2, 2 (up) transformer blocks: 70 cross-attentions in 11 modules.
SDXL_BLOCKS = [2, 2, 10, 10, 10, 10, 10, 10, 2, 2, 2]
WIDTHS = [32, 48]  # builtin:tiny-sdxl's two text encoders


@pytest.fixture(scope="module")
def sdxl():
    from stc.models.base import load_base_model

    return load_base_model("builtin:tiny-sdxl", device="cpu")


def sdxl_mapper(seed: int = 0, bypass: bool = True) -> NeTIMapper:
    config = MapperConfig(text_width=sum(WIDTHS), norm_scale=0.5, num_layers=11, bypass=bypass,
                          encoder_widths=WIDTHS, norm_scales=[0.5, 0.8])
    mapper = NeTIMapper(config, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():  # a random output layer: each (t, l) a clearly different embedding
        mapper.output_layer[0].weight.normal_(generator=torch.Generator().manual_seed(seed + 1))
    return mapper.eval().requires_grad_(False)


def save_sdxl_concept(name: str, seed: int = 0, base_model: str = "builtin:tiny-sdxl"):
    from helpers import make_concept

    mapper = sdxl_mapper(seed)
    concept = make_concept(name, layer_names=list(SDXL_LAYER_NAMES), base_model=base_model, text_width=sum(WIDTHS),
                           mapper=mapper.config.to_dict())
    return Registry().save(concept, weights_bytes(mapper, name)), mapper


# --------------------------------------------------------------------------- space: the layers


def test_the_real_sdxl_unet_has_11_layers_of_70_cross_attentions_in_execution_order():
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(SDXL.config_dir / "unet")
    with torch.device("meta"):  # the real architecture, no weights
        unet = UNet2DConditionModel.from_config(config)
    layers = cross_attention_layers(unet)
    assert [name for name, _ in layers] == list(SDXL_LAYER_NAMES)
    assert [len(modules) for _, modules in layers] == SDXL_BLOCKS and sum(SDXL_BLOCKS) == 70
    assert SDXL_LAYER_NAMES[4] == "mid_block.attentions.0.transformer_blocks.*.attn2"
    for name, modules in layers:  # every block of the module, in order
        assert modules == [name.replace("*", str(index)) for index in range(len(modules))]
    attn2 = [name.removesuffix(".processor") for name in unet.attn_processors if "attn2" in name]
    assert sorted(attn2) == sorted(module for _, modules in layers for module in modules)


# --------------------------------------------------------------------------- text: both encoders


def _stock_states(encoder, ids, token_id, row):
    """What the stock text encoder gives with the placeholder's input embedding set to ``row``:
    (hidden_states[-2], the final-LayerNorm'd last state): transformers' own forward."""
    encoder = copy.deepcopy(encoder)
    table = encoder.get_input_embeddings()
    grown = torch.cat([table.weight.detach(), torch.zeros(token_id + 1 - table.weight.shape[0], table.weight.shape[1])])
    grown[token_id] = row
    encoder.set_input_embeddings(torch.nn.Embedding.from_pretrained(grown))
    with torch.no_grad():
        output = encoder(ids, output_hidden_states=True)
    return output.hidden_states[-2], output.last_hidden_state


def test_each_encoder_reads_its_part_keys_without_and_values_with_the_bypass(sdxl):
    """Encoder k's token input at the placeholder is its part of the mapper output (768 | 1280 in
    SDXL); the context is both penultimate states side by side (no LayerNorm); values add
    0.2 x bypass_k rescaled to the state's norm at the placeholder; the pooled embedding is the
    second encoder's projected, final-LayerNorm'd state at the end-of-text token."""
    pipe = copy.deepcopy(sdxl.pipeline)
    toks = SDXL.tokenizers(pipe)
    token_ids = [tok.convert_tokens_to_ids(tok.add_tokens(["<thing>"]) and "<thing>") for tok in toks]
    mapper = sdxl_mapper(3)
    slot = ConceptSlot.of([[token_ids[0]], [token_ids[1]]], mapper)
    texts = ["a <thing> on the moon", "two <thing> and a <thing>"]  # two placeholders in one prompt too
    ids = [tok(texts, padding="max_length", max_length=77, return_tensors="pt").input_ids for tok in toks]
    t, l = torch.tensor([700.0, 40.0]), torch.tensor([2.0, 9.0])
    with torch.no_grad():
        encoding = encode_context(SDXL.text_encoders(pipe), ids, t, l, {token_ids[0]: slot})
        outputs = mapper(t, l)
    # the output layout: one group per encoder, [token_l (32), bypass_l (32), token_g (48), bypass_g (48)] ...
    parts = [(outputs[:, :32], outputs[:, 32:64]), (outputs[:, 64:112], outputs[:, 112:160])]  # (token, bypass)
    # ... each group at its own encoder's initializer norm, as SD 1.x's one [token, bypass] vector is at its
    assert torch.allclose(torch.cat(parts[0], -1).norm(dim=-1), torch.tensor(0.5))
    assert torch.allclose(torch.cat(parts[1], -1).norm(dim=-1), torch.tensor(0.8))
    encoders = [pipe.text_encoder, pipe.text_encoder_2]
    for row in range(2):
        states, pooled = [], None
        for k, encoder in enumerate(encoders):
            penultimate, last = _stock_states(encoder, ids[k][row : row + 1], token_ids[k], parts[k][0][row])
            states.append(penultimate[0])
            if k == 1:
                end = int((ids[1][row] == toks[1].eos_token_id).nonzero()[0])
                pooled = pipe.text_encoder_2.text_projection(last[0, end])
        expected_keys = torch.cat(states, dim=-1)
        # two code paths (stc's batched encoder, transformers' forward) over the same weights: rounding only
        assert_close_in_scale(encoding.keys[row], expected_keys, 1e-5)
        assert_close_in_scale(encoding.pooled[row], pooled, 1e-5)
        where = (ids[0][row] == token_ids[0]).nonzero().flatten()
        expected_values = expected_keys.clone()
        for k, (start, stop) in enumerate([(0, 32), (32, 80)]):
            state = expected_keys[where, start:stop]
            rescaled = F.normalize(parts[k][1][row], dim=-1) * state.norm(dim=-1, keepdim=True)
            expected_values[where, start:stop] = state + 0.2 * rescaled  # the spec's 0.2
        assert_close_in_scale(encoding.values[row], expected_values, 1e-5)
        others = torch.ones(77, dtype=torch.bool)
        others[where] = False
        assert torch.equal(encoding.values[row][others], encoding.keys[row][others])


def test_the_pooled_embedding_of_a_step_is_the_mean_over_its_layers(sdxl):
    from stc.method.encoding import pooled_over_layers

    pipe = copy.deepcopy(sdxl.pipeline)
    token_ids = [[tok.convert_tokens_to_ids(tok.add_tokens(["<thing>"]) and "<thing>")]
                 for tok in SDXL.tokenizers(pipe)]
    slot = ConceptSlot.of(token_ids, sdxl_mapper(1))
    ids = [tok(["a <thing>"], padding="max_length", max_length=77, return_tensors="pt").input_ids
           for tok in SDXL.tokenizers(pipe)]
    with torch.no_grad():
        encoding = encode_layers(SDXL.text_encoders(pipe), ids, torch.tensor([900, 100]), 11, {token_ids[0][0]: slot})
        single = encode_context(SDXL.text_encoders(pipe), ids, torch.tensor([100.0]), torch.tensor([7.0]),
                                {token_ids[0][0]: slot})
    assert encoding.pooled.shape == (2, 11, 48)
    assert_close_in_scale(encoding.pooled[1, 7], single.pooled[0], 1e-5)  # batched vs one row
    assert not torch.allclose(encoding.pooled[1, 0], encoding.pooled[1, 7])  # layers differ ...
    assert torch.equal(pooled_over_layers(encoding.pooled), encoding.pooled.mean(dim=1))  # ... the UNet reads the mean


# --------------------------------------------------------------------------- rendering


class _UNetSpy:
    """Records what every UNet call of a render receives."""

    def __init__(self, unet):
        self.calls = []
        unet.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.calls.append({"spacetime": (kwargs.get("cross_attention_kwargs") or {}).get("spacetime"),
                           "hidden": kwargs.get("encoder_hidden_states"), "added": kwargs.get("added_cond_kwargs")})


@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_a_render_passes_size_ids_and_a_zero_negative_and_the_concept_in_every_layer(sdxl, size):
    height, width = size
    concept, mapper = save_sdxl_concept("thing", 2)
    renderer = Renderer(copy.deepcopy(sdxl), {"thing": (concept, mapper)})
    spy = _UNetSpy(renderer.base.pipeline.unet)
    settings = RenderSettings(steps=3, width=width, height=height)
    renderer.render("a photo of <thing>", [0], settings)
    conditioning = renderer.condition("a photo of <thing>", settings)
    assert len(spy.calls) == 3
    for step, call in enumerate(spy.calls):
        added = call["added"]
        # original size (H, W), crop top-left (0, 0), target size (H, W): for both CFG halves
        assert added["time_ids"].tolist() == [[height, width, 0, 0, height, width]] * 2
        assert torch.equal(added["text_embeds"][0], torch.zeros(48))  # the empty negative: zeros (force_zeros)
        assert torch.equal(added["text_embeds"][1], conditioning.pooled[step])
        keys, values = call["spacetime"].keys, call["spacetime"].values
        assert keys.shape == (11, 2, 77, 80)
        assert torch.equal(keys[:, 0], torch.zeros(11, 77, 80)) and torch.equal(values[:, 0], keys[:, 0])
        assert torch.equal(keys[:, 1], conditioning.keys[step]) and torch.equal(values[:, 1], conditioning.values[step])
        assert not torch.equal(keys[0, 1], keys[10, 1])  # every layer its own


def test_a_negative_prompt_is_the_pipelines_own_encoding_in_every_layer(sdxl):
    concept, mapper = save_sdxl_concept("thing", 2)
    renderer = Renderer(copy.deepcopy(sdxl), {"thing": (concept, mapper)})
    spy = _UNetSpy(renderer.base.pipeline.unet)
    renderer.render("a photo of <thing>", [0], RenderSettings(steps=2, negative="blurry"))
    pipe = renderer.base.pipeline
    with torch.no_grad():  # diffusers' own encoding of a negative prompt
        _, negative, _, negative_pooled = pipe.encode_prompt("x", device="cpu", num_images_per_prompt=1,
                                                             do_classifier_free_guidance=True, negative_prompt="blurry")
    for call in spy.calls:
        for layer in range(11):
            assert torch.equal(call["spacetime"].keys[layer, 0], negative[0])
            assert torch.equal(call["spacetime"].values[layer, 0], negative[0])
        assert torch.equal(call["added"]["text_embeds"][0], negative_pooled[0])


def test_a_prompt_without_concepts_renders_as_the_plain_sdxl_pipeline(sdxl):
    import numpy as np
    from diffusers import DPMSolverMultistepScheduler

    base = copy.deepcopy(sdxl)
    image = Renderer(base, {}).render("a red cat", [5], RenderSettings(steps=3))[0].image
    pipe = base.pipeline
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    plain = pipe("a red cat", num_inference_steps=3, guidance_scale=7.5,
                 generator=torch.Generator().manual_seed(5)).images[0]
    from helpers import assert_same_render

    assert_same_render(np.asarray(image), np.asarray(plain))  # the same weights, another loop: rounding only


# --------------------------------------------------------------------------- exports


def test_ti_exports_are_the_sdxl_layout_that_diffusers_loads_once_per_encoder(sdxl, tmp_path):
    """The SDXL embedding file every tool reads: safetensors with clip_l [n, D_l] and clip_g [n, D_g]
    and no other tensor (the webui .detach()es every value; ComfyUI and InvokeAI take clip_g by its
    width); diffusers loads clip_l into text_encoder/tokenizer and clip_g into text_encoder_2/tokenizer_2
    (its load_textual_inversion docstring), one call each."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    save_sdxl_concept("pup", 4)
    fast = ("--samples", 8, "--fit-steps", 3)
    result = invoke("export", "pup", "--format", "ti", "--out", tmp_path, "--vectors", 2, *fast)
    assert result.exit_code == 0, result.output
    path = tmp_path / "pup.safetensors"
    data = load_file(path)
    assert set(data) == {"clip_l", "clip_g"} and data["clip_l"].shape == (2, 32) and data["clip_g"].shape == (2, 48)
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["base_model"] == "builtin:tiny-sdxl"
    result = invoke("export", "pup", "--format", "a1111", "--out", tmp_path / "webui", "--vectors", 2, *fast)
    assert result.exit_code == 0, result.output
    assert set(load_file(tmp_path / "webui" / "pup.safetensors")) == {"clip_l", "clip_g"}  # the same layout

    pipe = copy.deepcopy(sdxl.pipeline)
    pipe.load_textual_inversion(data["clip_l"], token="<pup>", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(data["clip_g"], token="<pup>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    for encoder, tokenizer, vectors in ((pipe.text_encoder, pipe.tokenizer, data["clip_l"]),
                                        (pipe.text_encoder_2, pipe.tokenizer_2, data["clip_g"])):
        table = encoder.get_input_embeddings().weight
        for index, token in enumerate(["<pup>", "<pup>_1"]):
            assert torch.equal(table[tokenizer.convert_tokens_to_ids(token)], vectors[index])
    pipe.set_progress_bar_config(disable=True)
    pipe("<pup> on the moon", num_inference_steps=1, output_type="latent")  # it renders

    result = invoke("import", path, "--name", "pup-ti")  # back, exactly, without --model
    assert result.exit_code == 0, result.output
    imported = Registry().load("pup-ti")
    assert imported.base_model == "builtin:tiny-sdxl" and imported.layer_names == list(SDXL_LAYER_NAMES)
    assert imported.mapper["encoder_widths"] == WIDTHS and imported.mapper["num_vectors"] == 2
    result = invoke("export", "pup-ti", "--format", "ti", "--out", tmp_path / "again", "--model", "builtin:nothing")
    assert result.exit_code == 0, result.output
    again = load_file(tmp_path / "again" / "pup-ti.safetensors")
    assert all(torch.equal(again[key], data[key]) for key in data)


def test_an_imported_sdxl_embedding_gives_each_encoder_its_own_vectors(sdxl, tmp_path):
    """What plain diffusers does with the same file (one load_textual_inversion per encoder): the
    same input embeddings at every step and layer, so the same context."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    data = {"clip_l": torch.randn(2, 32, generator=generator) * 0.1,
            "clip_g": torch.randn(2, 48, generator=generator) * 0.1}
    save_file(data, tmp_path / "duo.safetensors")
    assert invoke("import", tmp_path / "duo.safetensors").exit_code == 0
    concept = Registry().load("duo")
    renderer = Renderer(copy.deepcopy(sdxl), {"duo": (concept, load_mapper(concept))})
    conditioning = renderer.condition("a <duo> on the moon", RenderSettings(steps=2))
    pipe = copy.deepcopy(sdxl.pipeline)
    pipe.load_textual_inversion(data["clip_l"], token="<duo>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(data["clip_g"], token="<duo>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    with torch.no_grad():
        context, _, _, _ = pipe.encode_prompt("a <duo> on the moon", device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    for step in range(2):
        for layer in (0, 5, 10):
            # stc's batched encoder vs diffusers' encode_prompt over the same weights: rounding only
            assert_close_in_scale(conditioning.keys[step, layer], context[0], 1e-5)
    assert torch.equal(conditioning.keys, conditioning.values)  # no bypass


RENDER_SDXL_WITHOUT_STC = r"""
import json, sys
sys.modules["stc"] = None  # `import stc` raises ImportError from here on
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline

model, concept, out, threads = sys.argv[1:5]
torch.set_num_threads(int(threads))
sys.path.insert(0, concept)
from stc_concept import load_concept

pipe = StableDiffusionXLPipeline.from_pretrained(model)
pipe.set_progress_bar_config(disable=True)
pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)  # stc gen's default sampler
token = load_concept(pipe, concept, rank=8)
for prompt, name in (("<cat> on the moon", "cat"), ("a cat on the moon", "plain")):
    generator = torch.Generator().manual_seed(3)
    image = pipe(prompt, num_inference_steps=4, guidance_scale=7.5, generator=generator).images[0]
    image.save(f"{out}/{name}.png")
print(json.dumps({"token": token, "pipeline": type(pipe).__name__}))
"""


def test_the_diffusers_export_renders_in_a_plain_sdxl_pipeline_as_stc_gen(sdxl, tmp_path):
    import subprocess
    import sys

    import numpy as np
    from helpers import assert_same_render
    from PIL import Image

    folder = tmp_path / "tiny-sdxl"
    sdxl.pipeline.save_pretrained(folder)
    save_sdxl_concept("cat", 6, base_model=str(folder))
    images = {}
    for prompt, name in (("<cat> on the moon", "cat"), ("a cat on the moon", "plain")):
        result = invoke("gen", prompt, "--model", folder, "--seed", 3, "--steps", 4, "--rank", 8,
                        "--out", tmp_path / "stc" / name)
        assert result.exit_code == 0, result.output
        images[name] = Path(result.stdout.strip().splitlines()[-1])
    assert invoke("export", "cat", "--format", "diffusers", "--out", tmp_path / "export").exit_code == 0
    out = tmp_path / "diffusers"
    out.mkdir()
    run = subprocess.run([sys.executable, "-c", RENDER_SDXL_WITHOUT_STC, folder, tmp_path / "export" / "cat", out,
                          str(torch.get_num_threads())], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report == {"token": "<cat>", "pipeline": "StableDiffusionXLPipeline"}

    def pixels(path):
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB")).astype(np.int16)

    # plain diffusers (its own loop, its pipeline not frozen) vs stc gen: rounding only
    assert_same_render(pixels(out / "cat.png"), pixels(images["cat"]))
    assert_same_render(pixels(out / "plain.png"), pixels(images["plain"]))
    assert not np.array_equal(pixels(out / "cat.png"), pixels(out / "plain.png"))  # the concept shows


def test_sdxl_loads_from_a_folder_and_from_a_hub_id_in_the_local_cache_offline(sdxl, tmp_path, monkeypatch,
                                                                               no_network):
    import shutil

    from stc.models.base import load_base_model, text_width_of

    folder = tmp_path / "tiny-sdxl"
    sdxl.pipeline.save_pretrained(folder)
    snapshot = tmp_path / "hub" / "models--tiny-org--tiny-sdxl" / "snapshots" / ("0" * 40)
    shutil.copytree(folder, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # asked to stay offline: the cache only, no socket opened
    for spec in (str(folder), "tiny-org/tiny-sdxl"):
        base = load_base_model(spec, device="cpu")
        assert type(base.pipeline).__name__ == "StableDiffusionXLPipeline"
        assert (base.encoder_widths, base.text_width, base.family_label) == ([32, 48], 80, "SDXL")
        assert text_width_of(spec) == 80  # from the configs alone
        state, builtin = base.pipeline.text_encoder_2.state_dict(), sdxl.pipeline.text_encoder_2.state_dict()
        assert all(torch.equal(state[key], builtin[key]) for key in builtin)


def test_training_recomputes_both_text_encoders_and_passes_size_ids(sdxl, photos, monkeypatch):
    """Both encoders' first two thirds of layers run under activation checkpointing (3 layers each in
    builtin:tiny-sdxl: 2 each), and the UNet gets the training size's ids and a pooled embedding."""
    from accelerate import Accelerator

    from stc.train import trainer as trainer_module
    from stc.train.config import TrainConfig
    from stc.train.images import load_photos

    seen, calls = [], []
    original = trainer_module.recomputed

    def spy(modules):
        seen.append(list(modules))
        return original(seen[-1])

    monkeypatch.setattr(trainer_module, "recomputed", spy)
    base = copy.deepcopy(sdxl)
    trainer = trainer_module.Trainer(base, load_photos(photos, 64).images, "<blob>",
                                     TrainConfig(steps=1, batch_size=2, grad_accum=1, seed=0), Accelerator(cpu=True))
    base.pipeline.unet.register_forward_pre_hook(lambda m, a, k: calls.append(k["added_cond_kwargs"]), with_kwargs=True)
    trainer.train_step()
    first, second = (getattr(e, "text_model", e).encoder.layers for e in (base.pipeline.text_encoder,
                                                                         base.pipeline.text_encoder_2))
    assert seen == [[first[0], first[1], second[0], second[1]]]
    assert calls[0]["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * 2
    assert calls[0]["text_embeds"].shape == (2, 48) and calls[0]["text_embeds"].requires_grad
