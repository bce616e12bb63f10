"""SD 2.x: builtin:tiny-sd2 (v-prediction, 48-wide OpenCLIP-style text encoder, 96 px) through
the method and the whole command line, offline."""

from types import SimpleNamespace

import pytest
import torch
from helpers import assert_one_line_error, assert_same_render, invoke

from stc.method.spacetime import cross_attention_layer_names
from stc.models.backbones import SD_LAYER_NAMES
from stc.models.base import TINY_SD2, load_base_model
from stc.models.schedulers import SCHEDULERS, make_scheduler
from stc.render.generation import Renderer, RenderSettings
from stc.train.config import TrainConfig

FAST = ("--steps", 2, "--batch-size", 1, "--grad-accum", 1, "--save-every", 0)


@pytest.fixture
def sd2():
    return load_base_model(TINY_SD2, device="cpu")


def test_tiny_sd2_has_the_sd2_choices(sd2):
    pipe = sd2.pipeline
    text = pipe.text_encoder.config
    assert (sd2.text_width, text.hidden_act, text.num_hidden_layers) == (48, "gelu", 3)
    assert pipe.unet.config.cross_attention_dim == 48 and pipe.unet.config.use_linear_projection
    assert tuple(pipe.unet.config.attention_head_dim) == (1, 2, 4, 4)
    widths = [block.attentions[0].transformer_blocks[0].attn2 for block in pipe.unet.down_blocks[:3]]
    assert {attn.to_q.out_features // attn.heads for attn in widths} == {16}  # one head width, as SD 2's 64
    assert cross_attention_layer_names(pipe.unet) == list(SD_LAYER_NAMES)  # the same 16 layers as SD 1.x
    assert sd2.default_resolution == 96 and sd2.prediction_type == "v_prediction"
    assert pipe.tokenizer.pad_token == "!"  # SD 2's tokenizer pads with "!", SD 1's with the end token
    assert len(pipe.tokenizer.encode("cat", add_special_tokens=False)) == 1


def test_tiny_sd2_is_deterministic_and_not_tiny():
    from stc.models.tiny import build_tiny_pipeline, build_tiny_sd2_pipeline

    first, second = build_tiny_sd2_pipeline(), build_tiny_sd2_pipeline()
    for module in ("unet", "vae", "text_encoder"):
        a, b = getattr(first, module).state_dict(), getattr(second, module).state_dict()
        assert all(torch.equal(a[key], b[key]) for key in a), module
    assert build_tiny_pipeline().text_encoder.config.hidden_size != first.text_encoder.config.hidden_size


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_scheduler_predicts_v(sd2, name):
    scheduler = make_scheduler(name, sd2.pipeline.scheduler.config)
    assert type(scheduler).__name__ == SCHEDULERS[name][0]
    assert scheduler.config.prediction_type == "v_prediction"
    renderer = Renderer(sd2, {})
    assert renderer._scheduler(RenderSettings(steps=3, scheduler=name)).config.prediction_type == "v_prediction"


def test_v_prediction_changes_the_denoising(sd2):
    """The sampler really reads the UNet output as v: as epsilon it gives other latents."""
    settings = RenderSettings(steps=3)
    as_v = Renderer(sd2, {}).latents("a cat", [0], settings)
    as_eps = Renderer(load_base_model(TINY_SD2, device="cpu", prediction_type="epsilon"), {}).latents(
        "a cat", [0], settings)
    assert not torch.allclose(as_v, as_eps)


def test_the_training_target_is_v(sd2, photos):
    """With a fixed UNet output P the loss is mse(P, v), v = sqrt(a)·noise - sqrt(1-a)·x0, not mse(P, noise)."""
    from accelerate import Accelerator

    from stc.train.images import load_photos
    from stc.train.trainer import Trainer

    trainer = Trainer(sd2, load_photos(photos, 96).images, "<vee>", TrainConfig(steps=1, batch_size=2,
                      grad_accum=1, initializer="cat"), Accelerator(cpu=True))
    assert trainer.noise_scheduler.config.prediction_type == "v_prediction"
    seen = {}
    prediction = torch.randn(2, 4, 12, 12, generator=torch.Generator().manual_seed(5))

    def unet(noisy, timesteps, encoder_hidden_states=None, cross_attention_kwargs=None):
        seen["noisy"] = noisy.detach()
        return SimpleNamespace(sample=prediction)

    trainer.unet = unet
    trainer.unet.dtype = torch.float32
    image_index, flip, noise, timesteps, captions = trainer.random_batch()
    timesteps = torch.tensor([100, 800])
    with torch.no_grad():
        loss = float(trainer.denoising_loss(image_index, flip, noise, timesteps, captions, torch.Generator()))
    alpha = trainer.noise_scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    clean = (seen["noisy"] - (1 - alpha).sqrt() * noise) / alpha.sqrt()
    velocity = alpha.sqrt() * noise - (1 - alpha).sqrt() * clean
    assert loss == pytest.approx(float(((prediction - velocity) ** 2).mean()), rel=1e-5)
    assert loss != pytest.approx(float(((prediction - noise) ** 2).mean()), rel=1e-2)


def test_init_words_are_tokenised_by_the_sd2_tokenizer(photos):
    result = invoke("train", photos, "--name", "hippo", "--init", "hippopotamus", "--model", TINY_SD2, *FAST)
    assert_one_line_error(result, "hippopotamus", "single token")


def test_an_sd2_diffusers_export_renders_in_plain_diffusers_as_stc_gen(photos, tmp_path, monkeypatch):
    """The export's glue on a v-prediction, 48-wide, linear-projection model renders as stc gen does
    (to float rounding: the latents agree to ~1e-5, so at most a stray pixel value is off by one)."""
    import importlib.util

    import numpy as np
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    folder = tmp_path / "tiny-sd2"
    load_base_model(TINY_SD2, device="cpu").pipeline.save_pretrained(folder)
    result = invoke("train", photos, "--name", "vdog", "--init", "dog", "--model", folder, *FAST)
    assert result.exit_code == 0, result.output
    result = invoke("gen", "<vdog> on the moon", "--seed", 3, "--steps", 4, "--rank", 8, "--out", tmp_path / "stc")
    assert result.exit_code == 0, result.output
    with Image.open(result.stdout.strip().splitlines()[-1]) as image:
        expected = np.asarray(image.convert("RGB"))
    result = invoke("export", "vdog", "--format", "diffusers", "--out", tmp_path / "exports")
    assert result.exit_code == 0, result.output

    spec = importlib.util.spec_from_file_location("stc_concept_sd2", tmp_path / "exports" / "vdog" / "stc_concept.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(__import__("sys").modules, spec.name, module)  # its dataclasses look themselves up
    spec.loader.exec_module(module)
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    module.load_concept(pipe, tmp_path / "exports" / "vdog", rank=8)

    def render():
        image = pipe("<vdog> on the moon", num_inference_steps=4, guidance_scale=7.5,
                     generator=torch.Generator().manual_seed(3)).images[0]
        return np.asarray(image.convert("RGB")).astype(int)

    assert_same_render(render(), expected)
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type="epsilon")
    assert np.abs(render() - expected).max() > 10  # read as epsilon, the same model renders otherwise
