"""Rendering as A1111/ComfyUI users render (issue 28): random seeds, concepts in the negative
prompt, re-rendering from a PNG's parameters, prompt weighting, img2img, LoRAs."""

import json

import numpy as np
import pytest
from helpers import invoke
from PIL import Image
from safetensors.torch import load_file

TINY = ("--model", "builtin:tiny", "--steps", 2)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


# --------------------------------------------------------------------------- --seed -1


def test_seed_minus_one_draws_a_seed_prints_and_records_it(tmp_path):
    drawn = invoke("gen", "a cat", *TINY, "--seed", -1, "--json", "--out", tmp_path / "a")
    assert drawn.exit_code == 0, drawn.output
    record = json.loads(drawn.stdout)
    seed = record["seed"]
    assert seed >= 0 and f"Seed: {seed}" in drawn.stderr
    assert f"Seed: {seed}" in Image.open(record["path"]).text["parameters"]
    again = invoke("gen", "a cat", *TINY, "--seed", seed, "--json", "--out", tmp_path / "b")
    assert np.array_equal(pixels(record["path"]), pixels(json.loads(again.stdout)["path"]))
    other = invoke("gen", "a cat", *TINY, "--seed", -1, "--json", "--out", tmp_path / "c")
    assert json.loads(other.stdout)["seed"] != seed  # 1 in 2**32 to draw the same one


# --------------------------------------------------------------------------- negative embeddings


def embedding_renderer(base, vectors, widths=None, name="easyneg"):
    """A renderer with concept ``name``: an imported textual-inversion embedding of ``vectors``."""
    from helpers import make_concept

    from stc.exchange.ti import constant_mapper
    from stc.method.spacetime import cross_attention_layer_names
    from stc.render.generation import Renderer

    mapper = constant_mapper(vectors, widths)
    concept = make_concept(name, cross_attention_layer_names(base.pipeline.unet), mapper=mapper.config.to_dict(),
                           text_width=int(vectors.shape[-1]), base_model=base.spec)
    return Renderer(base, {name: (concept, mapper)})


@pytest.mark.parametrize("spec", ["builtin:tiny", "builtin:tiny-sd2"])
def test_a_negative_embedding_equals_diffusers_with_it_loaded_in_the_negative_prompt(spec):
    import copy

    import torch
    from diffusers import DPMSolverMultistepScheduler
    from helpers import assert_close_in_scale

    from stc.models.base import load_base_model
    from stc.render.generation import RenderSettings

    tiny = load_base_model(spec, device="cpu")
    width = tiny.text_width
    vectors = torch.randn(2, width, generator=torch.Generator().manual_seed(5))  # two vectors: EasyNegative has many
    plain_pipe = copy.deepcopy(tiny.pipeline)
    plain_pipe.scheduler = DPMSolverMultistepScheduler.from_config(plain_pipe.scheduler.config)  # stc's default
    plain_pipe.load_textual_inversion(vectors, token="<easyneg>", tokenizer=plain_pipe.tokenizer,
                                      text_encoder=plain_pipe.text_encoder)
    expected = plain_pipe(
        "a cat on the beach", negative_prompt="<easyneg>, blurry", num_inference_steps=5, guidance_scale=5.0,
        generator=[torch.Generator().manual_seed(4)], output_type="latent",
    ).images
    renderer = embedding_renderer(tiny, vectors)
    settings = RenderSettings(steps=5, cfg=5.0, negative="<easyneg>, blurry")
    ours = renderer.latents("a cat on the beach", [4], settings)
    # diffusers encodes the negative prompt once, stc per (step, layer) rows in one batch: other
    # GEMM shapes, so rounding relative to the latents' scale (~50), as in test_equivalence.py
    assert_close_in_scale(ours, expected, 1e-4)
    without = renderer.latents("a cat on the beach", [4], RenderSettings(steps=5, cfg=5.0, negative="blurry"))
    assert (without - ours).abs().max() > 1e-2  # the embedding changes the image
    # and it is recorded with the image
    image = renderer.render("a cat on the beach", [4], settings)[0]
    assert "easyneg" in image.metadata["concepts"] and image.metadata["negative"] == "<easyneg>, blurry"


def test_a_negative_embedding_on_sdxl_is_diffusers_negative_context_in_every_layer():
    """SDXL: the negative half reads, at every step and layer, the context diffusers' encode_prompt
    gives the negative prompt with the embedding loaded once per encoder. (Its pooled embedding
    is taken at the end-of-text token, where transformers pools at the highest token id, the
    placeholder's: docs/method.md, "SDXL"; so whole renders are compared with SD 1.x above.)"""
    import copy

    import torch
    from helpers import assert_close_in_scale

    from stc.models.base import load_base_model
    from stc.render.generation import RenderSettings

    sdxl = load_base_model("builtin:tiny-sdxl", device="cpu")
    clip_l = torch.randn(1, 32, generator=torch.Generator().manual_seed(1))
    clip_g = torch.randn(1, 48, generator=torch.Generator().manual_seed(2))
    plain_pipe = copy.deepcopy(sdxl.pipeline)
    plain_pipe.load_textual_inversion(clip_l, token="<easyneg>", tokenizer=plain_pipe.tokenizer,
                                      text_encoder=plain_pipe.text_encoder)
    plain_pipe.load_textual_inversion(clip_g, token="<easyneg>", tokenizer=plain_pipe.tokenizer_2,
                                      text_encoder=plain_pipe.text_encoder_2)
    with torch.no_grad():
        _, expected, _, _ = plain_pipe.encode_prompt("a cat", device="cpu", num_images_per_prompt=1,
                                                     do_classifier_free_guidance=True,
                                                     negative_prompt="<easyneg> blurry")
    renderer = embedding_renderer(sdxl, torch.cat([clip_l, clip_g], dim=-1), widths=[32, 48])
    settings = RenderSettings(steps=2, negative="<easyneg> blurry")
    negative = renderer.condition("a cat", settings).negative
    for step in range(2):
        for layer in (0, 5, 10):
            # stc's batched encoder vs diffusers' encode_prompt over the same weights: rounding only
            assert_close_in_scale(negative.keys[step, layer], expected[0], 1e-5)
    plain = renderer.latents("a cat", [4], RenderSettings(steps=2, negative="blurry"))
    assert (renderer.latents("a cat", [4], settings) - plain).abs().max() > 1e-2


def test_gen_and_grid_take_an_imported_embedding_in_negative(tmp_path, stc_home):
    import torch
    from safetensors.torch import save_file

    save_file({"emb_params": torch.randn(2, 32, generator=torch.Generator().manual_seed(5))},
              str(tmp_path / "easyneg.safetensors"))
    assert invoke("import", tmp_path / "easyneg.safetensors", "--model", "builtin:tiny").exit_code == 0
    with_it = invoke("gen", "a cat", *TINY, "--negative", "<easyneg>, blurry", "--json", "--out", tmp_path / "a")
    assert with_it.exit_code == 0, with_it.output
    record = json.loads(with_it.stdout)
    assert "easyneg" in record["concepts"]
    assert "Negative prompt: <easyneg>, blurry" in Image.open(record["path"]).text["parameters"]
    plain = json.loads(invoke("gen", "a cat", *TINY, "--negative", "blurry", "--json", "--out", tmp_path / "b").stdout)
    assert not np.array_equal(pixels(record["path"]), pixels(plain["path"]))
    grid = invoke("grid", "a cat", *TINY, "--negative", "<easyneg:3>", "--ranks", 1, "--seeds", 0,
                  "--out", tmp_path / "g.png")
    assert grid.exit_code == 1 and "easyneg has no ranks" in grid.stderr  # an embedding has no ranks
    grid = invoke("grid", "a cat", *TINY, "--negative", "<easyneg>", "--ranks", 1, "--seeds", 0,
                  "--out", tmp_path / "g.png")
    assert grid.exit_code == 0, grid.output


# --------------------------------------------------------------------------- --from IMAGE.png


def test_from_a_png_renders_the_same_pixels_and_options_override(tmp_path, stc_home):
    from helpers import save_concept

    from stc.models.backbones import SD_LAYER_NAMES

    save_concept("mydog", seed=1, layer_names=SD_LAYER_NAMES)
    first = invoke("gen", "<mydog> next to a cat", "--rank", 8, "--negative", "blurry", "--cfg", 6, "--seed", 3,
                   "--scheduler", "euler", *TINY, "--json", "--out", tmp_path / "a")
    assert first.exit_code == 0, first.output
    original = json.loads(first.stdout)
    again = invoke("gen", "--from", original["path"], "--json", "--out", tmp_path / "b")
    assert again.exit_code == 0, again.output
    record = json.loads(again.stdout)
    assert np.array_equal(pixels(record["path"]), pixels(original["path"]))  # bit-exact
    assert {key: record[key] for key in original if key != "path"} == {
        key: original[key] for key in original if key != "path"}
    # an option on the command line wins: the same as rendering with it directly
    other = json.loads(invoke("gen", "--from", original["path"], "--seed", 5, "--json",
                              "--out", tmp_path / "c").stdout)
    direct = json.loads(invoke("gen", "<mydog> next to a cat", "--rank", 8, "--negative", "blurry", "--cfg", 6,
                               "--seed", 5, "--scheduler", "euler", *TINY, "--json", "--out", tmp_path / "d").stdout)
    assert other["seed"] == 5 and np.array_equal(pixels(other["path"]), pixels(direct["path"]))
    assert not np.array_equal(pixels(other["path"]), pixels(original["path"]))


def test_from_a_webui_png_and_from_an_image_without_parameters(tmp_path):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", "a cat on the moon\nNegative prompt: blurry, ugly\nSteps: 2, Sampler: Euler a, "
                  "Schedule type: Karras, CFG scale: 7, Seed: 12, Size: 64x64, Model hash: 6ce0161689, "
                  "Model: v1-5-pruned-emaonly, Version: v1.10.1")
    Image.new("RGB", (64, 64)).save(tmp_path / "webui.png", pnginfo=info)
    result = invoke("gen", "--from", tmp_path / "webui.png", "--model", "builtin:tiny", "--json",
                    "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert (record["prompt"], record["negative"], record["seed"], record["steps"], record["cfg"]) == (
        "a cat on the moon", "blurry, ugly", 12, 2, 7.0)
    assert record["scheduler"] == "dpm" and "'Euler a'" in result.stderr  # a sampler stc lacks: noted
    assert "v1-5-pruned-emaonly" in result.stderr  # the webui's model name: noted, --model given
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    bare = invoke("gen", "--from", tmp_path / "plain.png", "--model", "builtin:tiny")
    assert bare.exit_code == 1 and "holds no generation parameters" in bare.stderr
    assert invoke("gen", "--model", "builtin:tiny").exit_code == 1  # neither a prompt nor --from


# --------------------------------------------------------------------------- prompt weighting


def test_the_weighting_grammar_reads_as_the_webuis():
    from stc.render.prompts import weighted_segments

    # the webui's own examples (modules/prompt_parser.py, parse_prompt_attention's doctest)
    assert weighted_segments("normal text") == [("normal text", 1.0)]
    assert weighted_segments("an (important) word") == [("an ", 1.0), ("important", 1.1), (" word", 1.0)]
    assert weighted_segments("(unbalanced") == [("unbalanced", 1.1)]
    assert weighted_segments(r"\(literal\]") == [("(literal]", 1.0)]
    assert weighted_segments("(unnecessary)(parens)") == [("unnecessaryparens", 1.1)]
    got = weighted_segments("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    expected = [("a ", 1.0), ("house", 1.3 * 1.1 * 1.1), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
                (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)]
    assert [text for text, _ in got] == [text for text, _ in expected]
    assert np.allclose([weight for _, weight in got], [weight for _, weight in expected], rtol=1e-12)
    assert weighted_segments("(<mydog>:1.2) on a [beach]") == [("<mydog>", 1.2), (" on a ", 1.0),
                                                               ("beach", 1 / 1.1)]


def webui_emphasis(states, weights):
    """The webui's rule, written out (modules/sd_hijack_clip.py, process_tokens): z is the text
    encoder's output (S x D), each token's row times its multiplier, then the whole z times
    original_mean / new_mean (z.mean() before and after)."""
    original_mean = states.mean()
    weighted = states * weights[:, None]
    return weighted * (original_mean / weighted.mean())


def test_weight_one_is_a_no_op_and_other_weights_follow_the_webuis_rule(tiny):
    import torch
    from helpers import assert_close_in_scale, make_concept, make_mapper

    from stc.method.encoding import text_transformer
    from stc.method.spacetime import cross_attention_layer_names
    from stc.render.generation import Renderer, RenderSettings

    with torch.no_grad():  # a final LayerNorm with a bias, as real CLIPs have: states with a mean to restore
        final_norm = text_transformer(tiny.pipeline.text_encoder).final_layer_norm
        final_norm.bias.normal_(0.3, 0.2, generator=torch.Generator().manual_seed(0))
    concept = make_concept("mydog", cross_attention_layer_names(tiny.pipeline.unet))
    renderer = Renderer(tiny, {"mydog": (concept, make_mapper(1))})
    settings = RenderSettings(steps=2)
    # weight 1.0 is a no-op, plain and with a concept, bit for bit
    assert torch.equal(renderer.text.plain("a (cat:1.0) on a beach").keys, renderer.text.plain("a cat on a beach").keys)
    one = renderer.condition("(<mydog>:1.0) on a (beach:1.0)", settings)
    plain = renderer.condition("<mydog> on a beach", settings)
    assert torch.equal(one.keys, plain.keys) and torch.equal(one.values, plain.values)

    # other weights: per (step, layer) row, the webui's rule applied to the unweighted encoding
    weighted = renderer.condition("(<mydog>:1.3) on a [beach]", settings)
    ids = renderer.text.tokenize("<mydog> on a beach")[0][0].tolist()
    multipliers = torch.ones(len(ids))
    multipliers[ids.index(renderer.text.slots["mydog"].token_id)] = 1.3
    multipliers[ids.index(tiny.pipeline.tokenizer.convert_tokens_to_ids("beach</w>"))] = 1 / 1.1
    assert renderer.text.tokenize("(<mydog>:1.3) on a [beach]")[0][0].tolist() == ids  # the same tokens
    for step in range(2):
        for layer in (0, 7, 15):
            for ours, unweighted in ((weighted.keys, plain.keys), (weighted.values, plain.values)):
                # one multiplication and one mean in another order: rounding relative to the scale
                assert_close_in_scale(ours[step, layer], webui_emphasis(unweighted[step, layer], multipliers), 1e-6)
    assert (weighted.keys - plain.keys).abs().max() > 1e-3
    text = renderer.text.plain("a (cat:1.5) on a beach").keys[0]
    multipliers = torch.ones(len(ids))
    cat_ids = renderer.text.tokenize("a cat on a beach")[0][0].tolist()
    multipliers[cat_ids.index(tiny.pipeline.tokenizer.convert_tokens_to_ids("cat</w>"))] = 1.5
    assert_close_in_scale(text, webui_emphasis(renderer.text.plain("a cat on a beach").keys[0], multipliers), 1e-6)


def test_weighting_renders_on_sdxl_per_encoder_and_on_a_model_without_a_state_mean(tiny):
    import torch

    from stc.models.base import load_base_model
    from stc.render.generation import Renderer, RenderSettings

    # builtin:tiny's final LayerNorm has no bias: its states' mean is ~0, which the rule cannot restore
    weighted = Renderer(tiny, {}).latents("a (cat:1.4) on a [beach]", [0], RenderSettings(steps=2))
    assert bool(torch.isfinite(weighted).all())
    sdxl = Renderer(load_base_model("builtin:tiny-sdxl", device="cpu"), {})
    keys = sdxl.text.plain("a (cat:1.4) on a beach").keys
    plain = sdxl.text.plain("a cat on a beach").keys
    for part, plain_part in zip(keys.split([32, 48], dim=-1), plain.split([32, 48], dim=-1)):
        # each encoder's part keeps its own mean (the webui weights each CLIP's output on its own)
        assert torch.allclose(part.mean(), plain_part.mean(), rtol=1e-4)
        assert (part - plain_part).abs().max() > 1e-3


# --------------------------------------------------------------------------- img2img


def a_photo(path, size=64):
    """A smooth synthetic photo: a warm disc on a cool gradient."""
    from PIL import ImageDraw

    ramp = np.linspace(40, 200, size, dtype=np.float32)
    array = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (size, 1)), np.full((size, size), 160.0)], -1)
    image = Image.fromarray(array.astype("uint8"))
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(220, 90, 40))
    image.save(path)
    return path


def test_img2img_at_strength_one_is_txt2img_and_at_zero_the_photo_through_the_vae(tiny, tmp_path):
    import torch

    from stc.render.generation import Renderer, RenderSettings

    photo = a_photo(tmp_path / "photo.png")
    renderer = Renderer(tiny, {})
    txt2img = renderer.latents("a cat", [3, 4], RenderSettings(steps=3))
    full = renderer.latents("a cat", [3, 4], RenderSettings(steps=3, init_image=str(photo), strength=1.0))
    assert torch.equal(full, txt2img)  # the same code path: bit for bit
    kept = renderer.latents("a cat", [3], RenderSettings(steps=3, init_image=str(photo), strength=0.0))
    pipe = tiny.pipeline
    with torch.no_grad():  # the VAE round trip by hand: the posterior sampled with the seed's generator
        posterior = pipe.vae.encode(pipe.image_processor.preprocess(Image.open(photo).convert("RGB"))).latent_dist
        expected = posterior.sample(generator=torch.Generator().manual_seed(3)) * pipe.vae.config.scaling_factor
    assert torch.equal(kept, expected)
    half = renderer.latents("a cat", [3], RenderSettings(steps=3, init_image=str(photo), strength=0.5))
    assert (half - kept).abs().max() > 1e-2 and (half - txt2img[:1]).abs().max() > 1e-2


def test_img2img_on_builtin_shapes_at_strength_zero_returns_the_photo(tmp_path):
    from stc.models.base import load_base_model
    from stc.render.generation import Renderer, RenderSettings

    renderer = Renderer(load_base_model("builtin:shapes", device="cpu"), {})
    photo = tmp_path / "photo.png"  # a picture of the world (its VAE knows only shapes on plain grounds)
    renderer.render("a red circle", [5], RenderSettings(steps=8))[0].image.save(photo)
    [image] = renderer.render("a red circle", [0], RenderSettings(steps=4, init_image=str(photo), strength=0.0))
    error = np.abs(np.asarray(image.image, dtype=np.float32) - np.asarray(Image.open(photo), dtype=np.float32))
    assert error.mean() < 8  # the world's small VAE round trip: within its reconstruction error
    [redrawn] = renderer.render("a red circle", [0], RenderSettings(steps=4, init_image=str(photo), strength=1.0))
    assert np.abs(np.asarray(redrawn.image, dtype=np.float32) - np.asarray(Image.open(photo))).mean() > error.mean()


def test_img2img_equals_diffusers_img2img_pipeline(tiny, tmp_path):
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline
    from helpers import assert_close_in_scale

    from stc.render.generation import Renderer, RenderSettings

    photo = a_photo(tmp_path / "photo.png")
    reference = StableDiffusionImg2ImgPipeline(**tiny.pipeline.components)
    expected = reference("a cat", image=Image.open(photo).convert("RGB"), strength=0.6, num_inference_steps=5,
                         guidance_scale=7.5, generator=[torch.Generator().manual_seed(2)], output_type="latent").images
    ours = Renderer(tiny, {}).latents("a cat", [2], RenderSettings(steps=5, init_image=str(photo), strength=0.6))
    # stc's loop and attention processors vs diffusers' own: rounding relative to the latents' scale
    assert_close_in_scale(ours, expected, 1e-4)


def test_gen_and_grid_with_an_init_image(tmp_path):
    photo = a_photo(tmp_path / "photo.png")
    result = invoke("gen", "a cat", *TINY, "--init-image", photo, "--strength", 0.5, "--json", "--out", tmp_path / "a")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["strength"] == 0.5 and record["init_image"] == str(photo)
    assert "Denoising strength: 0.5" in Image.open(record["path"]).text["parameters"]
    again = json.loads(invoke("gen", "--from", record["path"], "--json", "--out", tmp_path / "b").stdout)
    assert np.array_equal(pixels(again["path"]), pixels(record["path"]))  # --from takes the photo again
    grid = invoke("grid", "a cat", *TINY, "--init-image", photo, "--ranks", 1, "--seeds", "0,1",
                  "--out", tmp_path / "g.png")
    assert grid.exit_code == 0, grid.output
    for args, fragment in ((("--init-image", tmp_path / "none.png"), "does not exist"),
                           (("--init-image", photo, "--strength", 1.5), "--strength"),
                           (("--strength", 0.5), "--init-image")):
        bad = invoke("gen", "a cat", *TINY, *args)
        assert bad.exit_code == 1 and fragment in bad.stderr, bad.output


def test_img2img_on_sdxl_equals_diffusers_sdxl_img2img_pipeline(tmp_path):
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLImg2ImgPipeline
    from helpers import assert_close_in_scale

    from stc.models.base import load_base_model
    from stc.render.generation import Renderer, RenderSettings

    sdxl = load_base_model("builtin:tiny-sdxl", device="cpu")
    size = sdxl.default_resolution
    photo = a_photo(tmp_path / "photo.png", size=size)
    components = dict(sdxl.pipeline.components)
    components["scheduler"] = DPMSolverMultistepScheduler.from_config(components["scheduler"].config)  # stc's
    reference = StableDiffusionXLImg2ImgPipeline(**components, requires_aesthetics_score=False)
    expected = reference("a cat", image=Image.open(photo).convert("RGB"), strength=0.6, num_inference_steps=5,
                         guidance_scale=7.5, generator=[torch.Generator().manual_seed(2)], output_type="latent").images
    ours = Renderer(sdxl, {}).latents("a cat", [2], RenderSettings(steps=5, init_image=str(photo), strength=0.6))
    # stc's loop and attention processors vs diffusers' own: rounding relative to the latents' scale
    assert_close_in_scale(ours, expected, 1e-4)


# --------------------------------------------------------------------------- LoRAs


def random_lora(pipeline, path, layout="diffusers", seed=0, text_encoders=False):
    """A random LoRA (rank 4, on every attention projection of the UNet) for ``pipeline``'s model,
    in diffusers/peft's layout (built with peft, saved with diffusers' save_lora_weights) or in
    kohya/webui's (the same tensors under kohya's names, with alpha = rank: scale 1, as peft's)."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import load_file, save_file

    pipe = copy.deepcopy(pipeline)
    torch.manual_seed(seed)  # peft draws the random A and B from the global generator
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = {"unet_lora_layers": get_peft_model_state_dict(pipe.unet)}
    if text_encoders:  # and on every text encoder's attention projections
        for attribute in ("text_encoder", "text_encoder_2"):
            if getattr(pipe, attribute, None) is not None:
                # peft's own injection (transformers' add_adapter asks for a newer peft than PyPI has)
                inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                                   target_modules=["q_proj", "k_proj", "v_proj"]),
                                        getattr(pipe, attribute))
                layers[f"{attribute}_lora_layers"] = get_peft_model_state_dict(getattr(pipe, attribute))
    folder = path.parent / f"{path.stem}-diffusers"
    type(pipe).save_lora_weights(folder, **layers)
    tensors = load_file(folder / "pytorch_lora_weights.safetensors")
    if layout == "diffusers":
        save_file(tensors, str(path))
        return path
    kohya = {}
    for key, tensor in tensors.items():  # unet.<module>.lora_A.weight -> lora_unet_<module_>.lora_down.weight
        module, _, kind = key.removeprefix("unet.").rpartition(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.lora_down.weight" if kind == "A.weight" else f"{name}.lora_up.weight"] = tensor
        kohya[f"{name}.alpha"] = torch.tensor(4.0)
    save_file(kohya, str(path))
    return path


def test_a_lora_equals_diffusers_load_lora_weights_in_both_layouts(tmp_path):
    import copy

    import torch
    from helpers import assert_close_in_scale

    from stc.models.base import load_base_model
    from stc.render.generation import Renderer, RenderSettings
    from stc.render.loras import Lora

    fresh = load_base_model("builtin:tiny", device="cpu")
    peft_file = random_lora(fresh.pipeline, tmp_path / "style.safetensors")
    kohya_file = random_lora(fresh.pipeline, tmp_path / "kohya.safetensors", layout="kohya")
    plain_pipe = copy.deepcopy(fresh.pipeline)
    plain_pipe.load_lora_weights(load_file(str(peft_file)), adapter_name="style")
    plain_pipe.set_adapters(["style"], adapter_weights=[0.8])
    expected = plain_pipe("a cat on the beach", num_inference_steps=4, guidance_scale=7.5,
                          generator=[torch.Generator().manual_seed(3)], output_type="latent").images
    without = Renderer(load_base_model("builtin:tiny", device="cpu"), {}).latents(
        "a cat on the beach", [3], RenderSettings(steps=4))
    for path in (peft_file, kohya_file):
        renderer = Renderer(load_base_model("builtin:tiny", device="cpu"), {}, [Lora("style", path, 0.8)])
        ours = renderer.latents("a cat on the beach", [3], RenderSettings(steps=4))
        # stc's loop and attention processors vs diffusers' own over the same LoRA-wrapped layers:
        # rounding relative to the latents' scale, as in test_equivalence.py
        assert_close_in_scale(ours, expected, 1e-4)
        assert (ours - without).abs().max() > 1e-2  # the LoRA changes the image


def test_a_lora_of_another_family_is_refused_before_any_weights_load(tmp_path, monkeypatch):
    from helpers import assert_one_line_error

    import stc.models.base
    from stc.models.base import load_base_model

    xl_lora = random_lora(load_base_model("builtin:tiny-sdxl", device="cpu").pipeline, tmp_path / "xl.safetensors")
    kohya_xl = random_lora(load_base_model("builtin:tiny-sdxl", device="cpu").pipeline, tmp_path / "xlk.safetensors",
                           layout="kohya")

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(stc.models.base, "load_base_model", no_loading)
    for path in (xl_lora, kohya_xl):
        result = invoke("gen", "a cat", *TINY, "--lora", f"{path}:0.5", "--out", tmp_path / "out")
        assert_one_line_error(result, path.name, "cross-attention reads a text context 80 wide", "builtin:tiny")


def test_inline_lora_tags_the_lora_folder_the_png_record_and_from(tmp_path, stc_home):
    from stc.models.base import load_base_model

    random_lora(load_base_model("builtin:tiny", device="cpu").pipeline, tmp_path / "loras" / "style.safetensors")
    stc_home.mkdir(parents=True, exist_ok=True)
    (stc_home / "config.yaml").write_text(f"loras: {tmp_path / 'loras'}\n")
    tagged = invoke("gen", "a cat <lora:style:0.8>", *TINY, "--json", "--out", tmp_path / "a")
    assert tagged.exit_code == 0, tagged.output
    record = json.loads(tagged.stdout)
    given = json.loads(invoke("gen", "a cat", *TINY, "--lora", f"{tmp_path / 'loras' / 'style.safetensors'}:0.8",
                              "--json", "--out", tmp_path / "b").stdout)
    assert np.array_equal(pixels(record["path"]), pixels(given["path"]))  # the tag is the option
    [lora] = record["loras"]
    assert (lora["name"], lora["weight"]) == ("style", 0.8)
    parameters = Image.open(given["path"]).text["parameters"]
    assert parameters.startswith("a cat <lora:style:0.8>\n")  # as the webui writes it
    assert f'Lora hashes: "style: {lora["hash"][:12]}"' in parameters
    plain = json.loads(invoke("gen", "a cat", *TINY, "--json", "--out", tmp_path / "c").stdout)
    assert not np.array_equal(pixels(plain["path"]), pixels(record["path"]))
    for source in (record, given):  # --from: the tag resolves again, the --lora file is recorded
        again = json.loads(invoke("gen", "--from", source["path"], "--json", "--out", tmp_path / "d").stdout)
        assert np.array_equal(pixels(again["path"]), pixels(source["path"]))
    grid = invoke("grid", "a cat <lora:style:0.5>", *TINY, "--ranks", 1, "--seeds", 0, "--out", tmp_path / "g.png")
    assert grid.exit_code == 0, grid.output
    (tmp_path / "prompts.txt").write_text("a cat <lora:style>\na dog\n")
    mixed = invoke("grid", "--prompts", tmp_path / "prompts.txt", *TINY, "--ranks", 1)
    assert mixed.exit_code == 1 and "different <lora:" in mixed.stderr
    from stc.errors import BadInput
    from stc.render.generation import Renderer, RenderSettings

    with pytest.raises(BadInput, match="not loaded in this render"):
        Renderer(load_base_model("builtin:tiny", device="cpu"), {}).render("a cat <lora:style>", [0],
                                                                          RenderSettings(steps=1))
    (stc_home / "config.yaml").write_text("model: builtin:tiny\n")
    missing = invoke("gen", "a cat <lora:style:0.8>", *TINY)
    assert missing.exit_code == 1 and "no LoRA folder is set" in missing.stderr
    other = invoke("gen", "a cat <lora:nope>", *TINY, "--lora-dir", tmp_path / "loras")
    assert other.exit_code == 1 and "no nope.safetensors" in other.stderr and "style" in other.stderr


def test_sdxl_and_text_encoder_loras_equal_diffusers(tmp_path):
    import copy

    import torch
    from diffusers import DPMSolverMultistepScheduler
    from helpers import assert_close_in_scale

    from stc.models.base import load_base_model
    from stc.render.generation import Renderer, RenderSettings
    from stc.render.loras import Lora

    for spec in ("builtin:tiny-sdxl", "builtin:tiny", "builtin:tiny-sd2"):
        fresh = load_base_model(spec, device="cpu")
        path = random_lora(fresh.pipeline, tmp_path / f"{spec[8:]}.safetensors", text_encoders=True)
        plain_pipe = copy.deepcopy(fresh.pipeline)
        plain_pipe.scheduler = DPMSolverMultistepScheduler.from_config(plain_pipe.scheduler.config)  # stc's
        plain_pipe.load_lora_weights(load_file(str(path)), adapter_name="x")
        plain_pipe.set_adapters(["x"], adapter_weights=[0.7])
        expected = plain_pipe("a cat on the beach", num_inference_steps=3, guidance_scale=7.5,
                              generator=[torch.Generator().manual_seed(1)], output_type="latent").images
        renderer = Renderer(load_base_model(spec, device="cpu"), {}, [Lora("x", path, 0.7)])
        ours = renderer.latents("a cat on the beach", [1], RenderSettings(steps=3))
        # stc's own text encoding and loop over the same LoRA-wrapped layers: rounding relative to scale
        assert_close_in_scale(ours, expected, 1e-4)


def test_lora_hashes_are_the_webuis(tmp_path):
    import hashlib

    import torch
    from safetensors.torch import save_file

    from stc.render.loras import lora_hash

    save_file({"w": torch.ones(3)}, str(tmp_path / "a.safetensors"))
    data = (tmp_path / "a.safetensors").read_bytes()
    start = 8 + int.from_bytes(data[:8], "little")
    assert lora_hash(tmp_path / "a.safetensors") == hashlib.sha256(data[start:]).hexdigest()  # "addnet" hash
    save_file({"w": torch.ones(3)}, str(tmp_path / "b.safetensors"), metadata={"sshs_model_hash": "ab" * 32})
    assert lora_hash(tmp_path / "b.safetensors") == "ab" * 32  # kohya's recorded hash wins, as in the webui
