"""Single-file checkpoints (--model x.safetensors / weights-only .ckpt), offline.

Real LDM-layout files are written from the builtin models (tests/ldm_writer.py, checked
against diffusers' own single-file reader) and must load back to the same images, with no
socket ever opened.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_close_in_scale, assert_one_line_error, assert_same_render, invoke
from ldm_writer import _to_openclip, pipeline_to_ldm, randomise
from PIL import Image
from safetensors.torch import save_file

from stc.errors import ModelError, StcError
from stc.models import backbones as families
from stc.models.backbones import backbone as backbone_module
from stc.models.backbones import single_file as ldm
from stc.models.base import load_base_model, text_width_of
from stc.render.generation import Renderer, RenderSettings

SETTINGS = RenderSettings(steps=3)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """For each builtin: a diffusers folder and an LDM single file of the same weights, every one
    randomised first (tests/ldm_writer.randomise): at their initial values all LayerNorms are
    equal (weight 1, bias 0), and a key map that swapped two would pass unseen."""
    root = tmp_path_factory.mktemp("single")
    out = {}
    for spec in ("builtin:tiny", "builtin:tiny-sd2", "builtin:tiny-sdxl"):
        name = spec.split(":")[1]
        pipeline = randomise(load_base_model(spec, device="cpu").pipeline)
        folder = root / name
        pipeline.save_pretrained(folder)
        path = root / f"{name}.safetensors"
        save_file(pipeline_to_ldm(pipeline), str(path))
        out[spec] = (folder, path)
    return out


def reference(written, spec):
    """The model a written single file must load as: its diffusers folder (randomised weights)."""
    return load_base_model(str(written[spec][0]), device="cpu")


def latents(base, prompt="a cat on the moon"):
    return Renderer(base, {}).latents(prompt, [0], SETTINGS)


# A single file and the builtin it was written from hold identical weights (asserted exactly), but
# the loaded tensors are laid out differently in memory, so the CPU picks other kernels and sums
# in another order: fp32 rounding, ~1e-6 of the latents' scale after 3 steps (measured: 4.2e-5 at
# values up to 48.6). 1e-4 of the scale leaves 100x margin; a real conversion error (one wrong or
# transposed weight) moves the latents by a sizeable fraction of their scale.
LAYOUT_TOLERANCE = 1e-4


def same_weights(a, b) -> list[str]:
    """Keys whose tensors differ between two modules (empty: identical)."""
    left, right = a.state_dict(), b.state_dict()
    keys = [key for key in left if not key.endswith("position_ids")]
    return [key for key in keys if key not in right or not torch.equal(left[key].float(), right[key].float())]


MODULES = {"builtin:tiny": ("unet", "vae", "text_encoder"), "builtin:tiny-sd2": ("unet", "vae", "text_encoder"),
           "builtin:tiny-sdxl": ("unet", "vae", "text_encoder", "text_encoder_2")}


@pytest.mark.parametrize("spec", ["builtin:tiny", "builtin:tiny-sd2", "builtin:tiny-sdxl"])
def test_the_writer_is_what_diffusers_single_file_reader_reads(written, spec):
    """pipeline_to_ldm is the inverse of diffusers' from_single_file: every weight comes back."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    folder, path = written[spec]
    keys = set(ldm.header_shapes(path))
    if spec == "builtin:tiny":
        assert ldm.CLIP_TOKEN_KEY in keys and not any(k.startswith(ldm.OPENCLIP_PREFIX) for k in keys)
    elif spec == "builtin:tiny-sd2":
        assert ldm.OPENCLIP_TOKEN_KEY in keys and not any(k.startswith(ldm.CLIP_PREFIX) for k in keys)
        assert f"{ldm.OPENCLIP_PREFIX}transformer.resblocks.0.attn.in_proj_weight" in keys
    else:  # SDXL's SGM layout: both encoders under conditioner.embedders, the added embedding as label_emb
        assert {ldm.SGM_CLIP_TOKEN_KEY, ldm.SGM_OPENCLIP_TOKEN_KEY, ldm.SGM_PROJECTION_KEY} <= keys
        assert "model.diffusion_model.label_emb.0.2.weight" in keys
        assert not any(k.startswith("cond_stage_model.") for k in keys)
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in keys
    if spec != "builtin:tiny-sdxl":
        assert "model.diffusion_model.output_blocks.11.0.skip_connection.weight" in keys  # diffusers' SD 1 marker
    builtin = reference(written, spec).pipeline
    cls = StableDiffusionXLPipeline if spec == "builtin:tiny-sdxl" else StableDiffusionPipeline
    read = cls.from_single_file(str(path), config=str(folder), local_files_only=True)
    for module in MODULES[spec]:
        assert same_weights(getattr(builtin, module), getattr(read, module)) == [], module


@pytest.mark.parametrize("spec", ["builtin:tiny", "builtin:tiny-sd2", "builtin:tiny-sdxl"])
def test_a_single_file_with_model_config_renders_as_the_builtin(written, spec, no_network):
    folder, path = written[spec]
    builtin = reference(written, spec)
    single = load_base_model(str(path), device="cpu", config=str(folder))
    assert single.spec == str(path.resolve())
    assert (single.text_width, single.default_resolution, single.prediction_type) == (
        builtin.text_width, builtin.default_resolution, builtin.prediction_type)
    for module in MODULES[spec]:
        assert same_weights(getattr(builtin.pipeline, module), getattr(single.pipeline, module)) == [], module
    assert type(single.pipeline) is type(builtin.pipeline)
    assert_close_in_scale(latents(single), latents(builtin), LAYOUT_TOLERANCE)


def test_single_file_through_the_cli_gives_the_builtin_image(written, tmp_path, photos, no_network):
    folder, path = written["builtin:tiny"]
    images = []
    for model, extra in ((folder, []), (path, ["--model-config", folder])):
        result = invoke("gen", "a cat", "--model", model, *extra, "--steps", 2, "--out", tmp_path / "out", "--json")
        assert result.exit_code == 0, result.output
        record = json.loads(result.stdout.strip().splitlines()[-1])
        with Image.open(record["path"]) as image:
            images.append(np.asarray(image.convert("RGB")))
    assert record["base_model"] == str(path.resolve())
    assert_same_render(images[1], images[0])  # the latents agree to LAYOUT_TOLERANCE of their scale

    result = invoke("train", photos, "--name", "single", "--init", "cat", "--model", path, "--model-config", folder,
                    "--steps", 1, "--batch-size", 1, "--grad-accum", 1, "--save-every", 0)
    assert result.exit_code == 0, result.output
    shown = json.loads(invoke("show", "single", "--json").stdout)
    assert shown["base_model"] == str(path.resolve())
    result = invoke("gen", "<single> on the moon", "--model-config", folder, "--steps", 1, "--out", tmp_path / "c")
    assert result.exit_code == 0, result.output


def test_a_weights_only_ckpt_loads_and_a_ckpt_needing_code_is_refused(written, tmp_path, no_network):
    folder, path = written["builtin:tiny"]
    from safetensors.torch import load_file

    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(path)), "global_step": 7, "epoch": 1}, ckpt)
    assert_close_in_scale(latents(load_base_model(str(ckpt), device="cpu", config=str(folder))),
                          latents(reference(written, "builtin:tiny")), LAYOUT_TOLERANCE)

    ran = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (ran,))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hook": Payload()}, evil)
    with pytest.raises(ModelError, match="pickles more than tensors.*refuses it"):
        load_base_model(str(evil), device="cpu", config=str(folder))
    assert not ran.exists()
    result = invoke("gen", "a cat", "--model", evil, "--model-config", folder, "--steps", 1, "--out", tmp_path)
    assert_one_line_error(result, "evil.ckpt", "would run code")
    assert not ran.exists()

    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="not a readable PyTorch checkpoint.*only .safetensors"):
        load_base_model(str(garbage), device="cpu")
    other = tmp_path / "model.gguf"
    other.write_bytes(b"x")
    with pytest.raises(ModelError, match="must be .safetensors"):
        load_base_model(str(other), device="cpu")


def test_model_config_of_another_width_is_refused(written, no_network):
    _, sd2_file = written["builtin:tiny-sd2"]
    sd1_folder, _ = written["builtin:tiny"]
    with pytest.raises(ModelError, match=r"48-wide text encoder.*--model-config .* is for width 32"):
        load_base_model(str(sd2_file), device="cpu", config=str(sd1_folder))


def test_text_width_of_a_single_file_comes_from_its_header(written):
    assert text_width_of(str(written["builtin:tiny"][1])) == 32
    assert text_width_of(str(written["builtin:tiny-sd2"][1])) == 48
    assert text_width_of("builtin:tiny-sd2") == 48


# --------------------------------------------------------------------------- shipped configs


@pytest.fixture
def tiny_family(written, tmp_path, monkeypatch):
    """stc's shipped-config path at tiny scale: a 'tiny' family whose configs (no tokenizer) stand
    where stc/models/configs/sd1 stands, known by a 32-wide CLIP text encoder."""
    folder, path = written["builtin:tiny"]
    configs = tmp_path / "configs"
    shutil.copytree(folder, configs / "tiny", ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "tokenizer"))
    family = families.StableDiffusion("tiny", "tiny SD 1.x", (32,), "tiny-org/tiny-sd",
                                      (("tiny-org/tiny-sd", "tokenizer"),), checkpoint_layout="clip")
    monkeypatch.setattr(backbone_module, "CONFIGS", configs)
    monkeypatch.setattr(ldm, "BACKBONES", ldm.BACKBONES + (family,))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    return folder, path


def test_without_model_config_the_tokenizer_is_asked_for_in_one_line(tiny_family, no_network):
    _, path = tiny_family
    with pytest.raises(ModelError, match="ships its configs but cannot ship the CLIP tokenizer") as info:
        load_base_model(str(path), device="cpu")
    message = str(info.value)
    assert "--model-config DIR" in message and "hf download tiny-org/tiny-sd" in message and "\n" not in message
    result = invoke("gen", "a cat", "--model", path, "--steps", 1)
    assert_one_line_error(result, "--model-config DIR", "tokenizer")


def test_shipped_configs_with_a_tokenizer_folder_render_as_the_builtin(tiny_family, tmp_path, no_network):
    folder, path = tiny_family
    tokenizer_only = tmp_path / "tok"
    shutil.copytree(folder / "tokenizer", tokenizer_only)
    single = load_base_model(str(path), device="cpu", config=str(tokenizer_only))
    assert_close_in_scale(latents(single), latents(load_base_model(str(folder), device="cpu")), LAYOUT_TOLERANCE)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="neither model_index.json nor a tokenizer"):
        load_base_model(str(path), device="cpu", config=str(empty))


def test_shipped_configs_take_the_tokenizer_from_the_local_hub_cache(tiny_family, tmp_path, monkeypatch, no_network):
    folder, path = tiny_family
    hub = tmp_path / "hub"
    repo = hub / "models--tiny-org--tiny-sd"
    shutil.copytree(folder / "tokenizer", repo / "snapshots" / ("0" * 40) / "tokenizer")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    single = load_base_model(str(path), device="cpu")
    assert single.pipeline.tokenizer("a photo of a cat").input_ids == load_base_model(
        "builtin:tiny", device="cpu").pipeline.tokenizer("a photo of a cat").input_ids
    assert_close_in_scale(latents(single), latents(load_base_model(str(folder), device="cpu")), LAYOUT_TOLERANCE)


def test_prediction_type_comes_from_the_option_then_the_file_then_the_config(written, tmp_path, monkeypatch,
                                                                             no_network):
    folder, path = written["builtin:tiny"]
    assert load_base_model(str(path), device="cpu", config=str(folder)).prediction_type == "epsilon"
    base = load_base_model(str(path), device="cpu", config=str(folder), prediction_type="v_prediction")
    assert base.prediction_type == "v_prediction"
    marked = tmp_path / "marked.safetensors"
    from safetensors.torch import load_file

    save_file({**load_file(str(path)), "v_pred": torch.zeros(())}, str(marked))
    assert load_base_model(str(marked), device="cpu", config=str(folder)).prediction_type == "v_prediction"
    assert load_base_model(str(marked), device="cpu", config=str(folder),
                           prediction_type="epsilon").prediction_type == "epsilon"
    with pytest.raises(StcError, match="--prediction-type must be one of epsilon, v_prediction"):
        load_base_model(str(path), device="cpu", config=str(folder), prediction_type="sample")

    monkeypatch.setenv("STC_PREDICTION_TYPE", "epsilon")  # restored (unset) after the test
    result = invoke("gen", "a cat", "--model", "builtin:tiny-sd2", "--prediction-type", "epsilon", "--steps", 1,
                    "--out", tmp_path / "eps", "--json")
    assert result.exit_code == 0, result.output
    result = invoke("gen", "a cat", "--model", "builtin:tiny", "--prediction-type", "x0", "--steps", 1)
    assert_one_line_error(result, "epsilon, v_prediction")  # a bad value: exit 1, as every value


# --------------------------------------------------------------------------- real SD layouts


def _meta_pipeline_keys(family: str) -> dict:
    """LDM key -> shape of a real-size pipeline built (on the meta device) from stc's shipped configs."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = families.CONFIGS / family
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder", local_files_only=True))
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in
              (("unet", unet), ("vae", vae), ("text", text))}
    state = {**ldm._unet_to_ldm(unet), **ldm._vae_to_ldm(vae)}
    text_state = {key.removeprefix("text_model."): value for key, value in text.state_dict().items()}
    text_state.pop("embeddings.position_ids", None)
    if family == "sd1":
        state.update({f"{ldm.CLIP_PREFIX}text_model.{key}": value for key, value in text_state.items()})
    else:
        state.update(_to_openclip(text_state))
    return {key: tuple(value.shape) for key, value in state.items()}, counts


def test_shipped_configs_are_sd15_and_sd21_and_their_layouts_are_detected():
    sd1, counts = _meta_pipeline_keys("sd1")
    assert counts == {"unet": 859_520_964, "vae": 83_653_863, "text": 123_060_480}  # SD 1.5's
    info = ldm.inspect_checkpoint(sd1)
    assert (info.family.name, info.text_width, info.cross_attention_width) == ("sd1", 768, 768)
    sd2, counts = _meta_pipeline_keys("sd2")
    assert counts == {"unet": 865_910_724, "vae": 83_653_863, "text": 340_387_840}  # SD 2.1's (23 text layers)
    assert sd2[ldm.OPENCLIP_TOKEN_KEY] == (49408, 1024)
    assert sd2["model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 1024)
    info = ldm.inspect_checkpoint(sd2)
    assert (info.family.name, info.text_width) == ("sd2", 1024)
    scheduler = json.loads((families.CONFIGS / "sd2" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    assert json.loads((families.CONFIGS / "sd2" / "unet" / "config.json").read_text())["sample_size"] == 96  # 768 px


def test_the_shipped_sdxl_configs_are_sdxl_base_and_its_layout_is_detected():
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = families.CONFIGS / "sdxl"
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae"))
        first = CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder"))
        second = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder_2"))
    counts = [sum(p.numel() for p in module.parameters()) for module in (unet, vae, first, second)]
    assert counts == [2_567_463_684, 83_653_863, 123_060_480, 694_659_840]  # SDXL base 1.0's
    assert vae.config.scaling_factor == 0.13025 and unet.config.sample_size * 8 == 1024
    state = {**ldm._unet_to_ldm(unet), **ldm._vae_to_ldm(vae)}
    state.update({f"{ldm.SGM_CLIP_PREFIX}text_model.{key}": value
                  for key, value in first.state_dict().items() if "position_ids" not in key})
    text = {key.removeprefix("text_model."): value for key, value in second.state_dict().items()
            if "position_ids" not in key}
    state.update(_to_openclip(text, ldm.SGM_OPENCLIP_PREFIX, text.pop("text_projection.weight").t()))
    shapes = {key: tuple(value.shape) for key, value in state.items()}
    assert shapes["model.diffusion_model.label_emb.0.0.weight"] == (1280, 2816)  # 6 size ids x 256 + 1280 pooled
    assert shapes["model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight"] == (640, 2048)
    info = ldm.inspect_checkpoint(shapes)
    assert (info.family, info.encoder_widths, info.cross_attention_width) == (families.SDXL, (768, 1280), 2048)
    assert families.SDXL.resolution == 1024 and families.SDXL.widths == (768, 1280)


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update({"conditioner.embedders.0.model.token_embedding.weight": (49408, 1280)}), "SDXL refiner"),
    (lambda s: s.update({"conditioner.embedders.1.model.token_embedding.weight": (49408, 1280)}),
     "no CLIP text encoder"),
    (lambda s: s.update({ldm.CONV_IN_KEY: (320, 9, 3, 3)}), "inpainting"),
    (lambda s: [s.pop(k) for k in list(s) if k.startswith("cond_stage_model.")], "no text encoder"),
    (lambda s: [s.pop(k) for k in list(s) if k.startswith("first_stage_model.")], "no VAE"),
    (lambda s: s.update({ldm.CROSS_ATTENTION_KEY: (320, 1024)}), "attends to 1024-wide text"),
])
def test_unsupported_single_files_are_named(change, message):
    shapes, _ = _meta_pipeline_keys("sd1")
    change(shapes)
    with pytest.raises(ModelError, match=message):
        ldm.inspect_checkpoint(shapes, "x.safetensors")


def _drop(key):
    return lambda state: state.pop(key)


def _reshape(key):
    return lambda state: state.update({key: torch.zeros(state[key].shape[0] + 1, *state[key].shape[1:])})


@pytest.mark.parametrize("change, message", [
    (_drop("model.diffusion_model.out.2.weight"), "lacks 1 UNet weights .*out.2.weight"),
    (_drop("first_stage_model.decoder.conv_out.bias"), "lacks 1 VAE weights"),
    (_drop("cond_stage_model.transformer.text_model.final_layer_norm.weight"), "lacks 1 text-encoder weights"),
    (_reshape("model.diffusion_model.input_blocks.0.0.weight"), r"UNet weight .*input_blocks.0.0.weight is \(17, 4"),
])
def test_a_file_missing_or_misshaping_weights_is_named_not_half_loaded(written, tmp_path, change, message):
    from safetensors.torch import load_file

    folder, path = written["builtin:tiny"]
    state = load_file(str(path))
    change(state)
    broken = tmp_path / "broken.safetensors"
    save_file(state, str(broken))
    with pytest.raises(ModelError, match=message):
        load_base_model(str(broken), device="cpu", config=str(folder))


def test_an_sdxl_file_with_shipped_configs_takes_a_tokenizer_folder_and_derives_the_second(written, tmp_path,
                                                                                          monkeypatch, no_network):
    """SDXL at tiny scale through the shipped-config path: configs without tokenizers stand where
    stc/models/configs/sdxl stands; a plain CLIP tokenizer folder gives both tokenizers (SDXL's second
    is the first with "!" padding)."""
    folder, path = written["builtin:tiny-sdxl"]
    configs = tmp_path / "configs"
    shutil.copytree(folder, configs / "tinyxl",
                    ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "tokenizer", "tokenizer_2"))
    family = families.StableDiffusionXL("tinyxl", "tiny SDXL", (32, 48), "tiny-org/tiny-sdxl",
                                        (("tiny-org/tiny-sdxl", "tokenizer"),), checkpoint_layout="sgm")
    monkeypatch.setattr(backbone_module, "CONFIGS", configs)
    monkeypatch.setattr(ldm, "BACKBONES", ldm.BACKBONES + (family,))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(ModelError, match="tiny SDXL checkpoint: stc ships its configs but cannot ship"):
        load_base_model(str(path), device="cpu")
    tokenizer_only = tmp_path / "tok"
    shutil.copytree(folder / "tokenizer", tokenizer_only)
    single = load_base_model(str(path), device="cpu", config=str(tokenizer_only))
    builtin = reference(written, "builtin:tiny-sdxl")
    assert single.pipeline.tokenizer_2.pad_token == "!" == builtin.pipeline.tokenizer_2.pad_token
    ids = [tok("a photo of a cat", padding="max_length", max_length=77).input_ids
           for tok in (single.pipeline.tokenizer_2, builtin.pipeline.tokenizer_2)]
    assert ids[0] == ids[1]
    assert_close_in_scale(latents(single), latents(builtin), LAYOUT_TOLERANCE)


@pytest.mark.parametrize("spec", ["builtin:tiny", "builtin:tiny-sd2", "builtin:tiny-sdxl"])
def test_the_written_weights_tell_every_parameter_apart(written, spec):
    """What lets the tests above see a key map that swaps two weights: in the written models no
    parameter is constant (a fresh norm's 1s, a fresh bias's 0s) and no two of one shape are equal."""
    pipeline = reference(written, spec).pipeline
    for module in MODULES[spec]:
        seen = {}
        for key, value in getattr(pipeline, module).named_parameters():
            assert value.numel() == 1 or value.std() > 0, (module, key)
            for other in seen.get(tuple(value.shape), []):
                assert not torch.equal(value, other[1]), (module, key, other[0])
            seen.setdefault(tuple(value.shape), []).append((key, value))
