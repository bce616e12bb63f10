"""The models the benchmark runs on.

``sd15``: the Stable Diffusion 1.5 architecture with random weights, built from its public
configuration with a fixed seed (no download), saved once as a diffusers folder and loaded
through stc's own loader (:func:`stc.models.base.load_base_model`). ``sdxl``: the same for SDXL
base 1.0, built from the configs stc ships (``stc/models/configs/sdxl``: 2.6 B UNet, CLIP ViT-L and
OpenCLIP ViT-bigG; 7 GB in fp16 on disk, about 14 GB of memory while it is built). Any other spec
is passed to stc as it is (``builtin:tiny``, ``builtin:tiny-sdxl``, a local folder, a hub id).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

SD15 = "sd15"
SD15_SEED = 1505
SD15_RESOLUTION = 512
SDXL = "sdxl"
SDXL_SEED = 1024
BUILT = (SD15, SDXL)  # the architectures the benchmark builds itself


def default_cache() -> Path:
    root = os.environ.get("STC_BENCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "stc-bench")
    return Path(root)


def sd15_folder(cache: Path | None = None) -> Path:
    return (cache or default_cache()) / "sd15-random"


def model_folder(name: str, cache: Path | None = None) -> Path:
    return (cache or default_cache()) / f"{name}-random"


def build_sdxl_pipeline():
    """A ``StableDiffusionXLPipeline`` with SDXL base 1.0's architecture (stc's shipped configs) and
    seeded random weights (fp32, CPU)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from stc.models.backbones import SDXL as FAMILY
    from stc.models.tiny import build_tiny_tokenizer, sdxl_pipeline

    folder = FAMILY.config_dir
    tokenizer, tokenizer_2 = build_tiny_tokenizer(), build_tiny_tokenizer(pad_token="!")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SDXL_SEED)
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder"))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder_2"))
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae"))
    scheduler = EulerDiscreteScheduler.from_config(EulerDiscreteScheduler.load_config(folder, subfolder="scheduler"))
    return sdxl_pipeline(tokenizer, tokenizer_2, text_encoder, text_encoder_2, unet, vae, scheduler)


def build_sd15_pipeline():
    """A ``StableDiffusionPipeline`` with SD 1.5's architecture and seeded random weights (fp32, CPU)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from stc.models.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()  # tokenization cost is negligible; its ids stay below 49408
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SD15_SEED)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
            layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=SD15_RESOLUTION,
            scaling_factor=0.18215,
        )
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1,
    )
    for module in (text_encoder, unet, vae):
        module.eval().requires_grad_(False)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def ensure_sd15(cache: Path | None = None, log=print) -> Path:
    """The saved random-weight SD 1.5 folder, built and saved (fp16 safetensors) on first use."""
    return ensure_built(SD15, cache, log)


def ensure_built(name: str, cache: Path | None = None, log=print) -> Path:
    """The saved random-weight folder of ``name`` (sd15, sdxl), built and saved (fp16 safetensors)
    on first use."""
    folder = model_folder(name, cache)
    if (folder / "model_index.json").is_file() and (folder / ".complete").is_file():
        return folder
    import shutil

    import torch

    started = time.monotonic()
    seed = {SD15: SD15_SEED, SDXL: SDXL_SEED}[name]
    log(f"building the {name} architecture with random weights (seed {seed}) into {folder} ...")
    pipeline = {SD15: build_sd15_pipeline, SDXL: build_sdxl_pipeline}[name]()
    for module in pipeline.components.values():
        if isinstance(module, torch.nn.Module):
            module.to(torch.float16)
    staging = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    pipeline.save_pretrained(staging, safe_serialization=True)
    (staging / ".complete").write_text(f"{name} random weights, seed {seed}\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)
    log(f"saved in {time.monotonic() - started:.0f} s")
    return folder


def model_spec(name: str, cache: Path | None = None, log=print) -> str:
    """What to hand to ``stc.models.base.load_base_model`` for ``--model NAME``."""
    if name in BUILT:
        return str(ensure_built(name, cache, log=log))
    return name
