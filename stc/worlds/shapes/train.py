"""Training the shapes world from scratch: ``python -m stc.worlds.shapes train``.

Two stages, reproducible from one seed:

1. **VAE** (``AutoencoderKL``, 4x downsampling) on 32 px scenes: L1 + MSE reconstruction and a
   KL term of weight 1e-6 (SD's), with the posterior sampled. The log-variance starts at -6, so
   the sampling noise does not drown the reconstruction at the start (a unit variance stalls
   training on a plateau).
2. **UNet and text encoder together**, on the VAE's cached latents (posterior means x the
   scaling factor that gives them unit variance): epsilon prediction on SD 1.x's noise schedule,
   min-SNR-5 loss weighting, 10 % empty captions (for classifier-free guidance), AdamW with a
   warm-up and cosine decay, and an exponential moving average of the weights, which is what
   ships.

The scenes and captions come from ``stc.worlds.shapes``; the held-out combination (a yellow
triangle) is never drawn. Each stage logs its loss; the end evaluates the EMA models by
rendering one image per (colour, shape, background) prompt and reading it back with the
checker. Everything, with the wall time, goes into ``training.json`` beside the weights.
"""

from __future__ import annotations

import json
import math
import platform
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import COLOURS, HELD_OUT, RESOLUTION, SHAPES, caption, read_image, scenes


@dataclass
class WorldConfig:
    seed: int = 0
    scenes: int = 20000
    vae_steps: int = 1500
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl: float = 1e-6
    unet_steps: int = 4000
    unet_batch: int = 64
    unet_lr: float = 5e-4
    text_lr: float = 5e-4
    warmup: int = 200
    weight_decay: float = 1e-2
    empty_caption: float = 0.1
    min_snr: float = 5.0
    ema: float = 0.999
    eval_steps: int = 20
    guidance: float = 5.0
    checkpoint_every: int = 500  # write the EMA weights and a quick evaluation every N UNet steps


def _images(scene_list):
    import numpy as np
    import torch

    array = np.stack([np.asarray(scene.render(), dtype=np.uint8) for scene in scene_list])
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()  # uint8 N,3,H,W


def _to_unit(batch):
    return batch.float() / 127.5 - 1.0


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train_vae(vae, images, config: WorldConfig, log) -> dict:
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(config.seed + 1)
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.latent_channels:].fill_(-6.0)  # small initial posterior variance
    vae.train().requires_grad_(True)
    optimizer = torch.optim.Adam(vae.parameters(), lr=config.vae_lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine(s, config.vae_steps, 100))
    held_count = min(256, len(images) // 4)
    held = images[-held_count:]
    train = images[:-held_count]
    losses = []
    start = time.time()
    for step in range(config.vae_steps):
        index = torch.randint(len(train), (config.vae_batch,), generator=generator)
        x = _to_unit(train[index])
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(z).sample
        kl = posterior.kl().mean()
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + config.vae_kl * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == config.vae_steps:
            log(f"vae {step + 1}/{config.vae_steps}  loss {sum(losses[-100:]) / len(losses[-100:]):.4f}  "
                f"{time.time() - start:.0f} s")
    vae.eval().requires_grad_(False)
    return {"final_loss": sum(losses[-100:]) / len(losses[-100:]), "seconds": time.time() - start,
            **evaluate_vae(vae, held)}


def evaluate_vae(vae, images) -> dict:
    """PSNR of reconstructions (posterior means) and how often the checker reads them right."""
    import torch
    from PIL import Image

    with torch.no_grad():
        x = _to_unit(images)
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    mse = float(((recon - x) ** 2).mean())
    psnr = 10 * math.log10(4.0 / max(mse, 1e-12))
    pixels = ((recon + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    truth = [read_image(Image.fromarray(img.permute(1, 2, 0).numpy())) for img in images]
    readings = [read_image(Image.fromarray(p)) for p in pixels]
    same = sum(r == (t.background, t.colour, t.shape) for r, t in
               zip(((r.background, r.colour, r.shape) for r in readings), truth))
    return {"psnr_db": round(psnr, 2), "checker_agrees": f"{same}/{len(images)}"}


def encode_latents(vae, images, chunk: int = 256):
    import torch

    out = []
    with torch.no_grad():
        for start in range(0, len(images), chunk):
            out.append(vae.encode(_to_unit(images[start:start + chunk])).latent_dist.mean)
    return torch.cat(out)


class _Captions:
    """Captions drawn per use, tokenized through a cache (the vocabulary of captions is small)."""

    def __init__(self, tokenizers: list, seed: int, empty: float):
        self.tokenizers = tokenizers  # one per text encoder
        self.rng = random.Random(seed)
        self.empty = empty
        self.cache: dict[str, list[list[int]]] = {}

    def ids(self, text: str) -> list[list[int]]:
        if text not in self.cache:
            self.cache[text] = [tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length,
                                          truncation=True).input_ids for tokenizer in self.tokenizers]
        return self.cache[text]

    def batch(self, scene_list):
        """(the captions, their token ids: one N x S tensor per tokenizer)."""
        import torch

        texts = ["" if self.rng.random() < self.empty else caption(scene, self.rng) for scene in scene_list]
        rows = [self.ids(text) for text in texts]
        return texts, [torch.tensor([row[k] for row in rows]) for k in range(len(self.tokenizers))]


def sd_conditioning(text_encoders, texts, ids):
    """SD 1.x's text conditioning: the text encoder's last state."""
    return text_encoders[0](ids[0])[0], None


def sdxl_conditioning(text_encoders, texts, ids):
    """SDXL's: both encoders' penultimate states side by side, the second one's pooled embedding and
    the size ids of the world's uncropped images; empty captions are zeros (what
    StableDiffusionXLPipeline gives an empty negative prompt with force_zeros_for_empty_prompt)."""
    import torch

    first, second = text_encoders
    out_1 = first(ids[0], output_hidden_states=True)
    out_2 = second(ids[1], output_hidden_states=True)
    states = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
    pooled = out_2[0]
    keep = torch.tensor([bool(text) for text in texts], dtype=states.dtype).view(-1, 1)
    states, pooled = states * keep.unsqueeze(-1), pooled * keep
    sizes = torch.tensor([[RESOLUTION, RESOLUTION, 0, 0, RESOLUTION, RESOLUTION]], dtype=states.dtype)
    return states, {"text_embeds": pooled, "time_ids": sizes.expand(len(texts), -1)}


def train_unet(text_encoders, unet, tokenizers, latents, scene_list, config: WorldConfig, log, checkpoint=None,
               conditioning=sd_conditioning):
    """The UNet and text encoders together (``conditioning`` turns captions into what the UNet
    reads); returns the EMA text encoders, the EMA UNet and the record."""
    import copy

    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    generator = torch.Generator().manual_seed(config.seed + 2)
    noise_schedule = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="scaled_linear")
    alphas = noise_schedule.alphas_cumprod
    snr = alphas / (1 - alphas)
    weights = torch.clamp(snr, max=config.min_snr) / snr  # min-SNR-gamma for epsilon prediction
    captions = _Captions(tokenizers, config.seed + 3, config.empty_caption)
    text_parameters = [p for text_encoder in text_encoders for p in text_encoder.parameters()]
    for module in (*text_encoders, unet):
        module.train().requires_grad_(True)
    optimizer = torch.optim.AdamW([
        {"params": list(unet.parameters()), "lr": config.unet_lr},
        {"params": text_parameters, "lr": config.text_lr},
    ], weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine(s, config.unet_steps, config.warmup))
    ema_unet, ema_texts = copy.deepcopy(unet).eval(), [copy.deepcopy(te).eval() for te in text_encoders]
    for module in (ema_unet, *ema_texts):
        module.requires_grad_(False)
    pairs = [(ema_unet, unet), *zip(ema_texts, text_encoders)]
    losses = []
    start = time.time()
    for step in range(config.unet_steps):
        index = torch.randint(len(latents), (config.unet_batch,), generator=generator)
        x0 = latents[index]
        texts, ids = captions.batch([scene_list[i] for i in index.tolist()])
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(1000, (len(x0),), generator=generator)
        noisy = noise_schedule.add_noise(x0, noise, t)
        states, added = conditioning(text_encoders, texts, ids)
        prediction = unet(noisy, t, states, added_cond_kwargs=added).sample
        per_item = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_item * weights[t]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + text_parameters, 1.0)
        optimizer.step()
        scheduler.step()
        decay = min(config.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, live in pairs:
                for e, p in zip(ema.parameters(), live.parameters()):
                    e.lerp_(p, 1 - decay)
        losses.append(per_item.mean().item())
        if (step + 1) % 100 == 0 or step + 1 == config.unet_steps:
            log(f"unet {step + 1}/{config.unet_steps}  loss {sum(losses[-100:]) / len(losses[-100:]):.4f}  "
                f"{time.time() - start:.0f} s")
        if checkpoint and config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
            checkpoint(ema_texts, ema_unet, step + 1)
    return ema_texts, ema_unet, {"final_loss": sum(losses[-200:]) / len(losses[-200:]),
                                "seconds": time.time() - start}


def evaluate_world(pipeline, config: WorldConfig, seeds=(0,)) -> dict:
    """Render 'a {colour} {shape} on a {background} background' for every combination (the
    held-out one excluded) and read each image back with the checker."""
    import torch

    counts = {"background": 0, "colour": 0, "shape": 0, "all": 0}
    total = 0
    prompts = [(c, s, b) for c in COLOURS for s in SHAPES for b in COLOURS if c != b and (c, s) != HELD_OUT]
    for seed in seeds:
        for start in range(0, len(prompts), 16):
            chunk = prompts[start:start + 16]
            texts = [f"a {c} {s} on a {b} background" for c, s, b in chunk]
            generator = torch.Generator().manual_seed(seed * 1000 + start)
            images = pipeline(texts, num_inference_steps=config.eval_steps, guidance_scale=config.guidance,
                              generator=generator).images
            for (c, s, b), image in zip(chunk, images):
                r = read_image(image)
                hits = {"background": r.background == b, "colour": r.colour == c, "shape": r.shape == s}
                for key, hit in hits.items():
                    counts[key] += hit
                counts["all"] += all(hits.values())
                total += 1
    return {key: f"{value}/{total}" for key, value in counts.items()}


def train_world(out: Path, config: WorldConfig, threads: int | None = None, log=print,
                reuse_vae: bool = False) -> dict:
    import copy

    import torch

    from .model import assemble, build_components, save_weights, shapes_tokenizer

    if threads:
        torch.set_num_threads(threads)
    began = time.time()
    torch.manual_seed(config.seed)
    tokenizer = shapes_tokenizer()
    text_encoder, unet, vae = build_components(tokenizer)
    log(f"rendering {config.scenes} scenes")
    scene_list = scenes(config.seed, config.scenes)
    images = _images(scene_list)
    out.mkdir(parents=True, exist_ok=True)
    vae_file = out / "vae-stage.safetensors"
    if reuse_vae and vae_file.is_file():
        from safetensors.torch import load_file

        vae.load_state_dict(load_file(str(vae_file)))
        vae.eval().requires_grad_(False)
        vae_record = json.loads((out / "vae-stage.json").read_text(encoding="utf-8"))
        log(f"reused the VAE in {vae_file}: {vae_record}")
    else:
        vae_record = train_vae(vae, images, config, log)
        log(f"vae: {vae_record}")
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(vae_file))
        (out / "vae-stage.json").write_text(json.dumps(vae_record) + "\n", encoding="utf-8")
    latents = encode_latents(vae, images)
    scaling = 1.0 / float(latents.std())
    vae.register_to_config(scaling_factor=scaling)
    latents = latents * scaling

    def checkpoint(ema_texts, ema_unet, step):
        (ema_text,) = ema_texts
        pipeline = assemble(tokenizer, copy.deepcopy(ema_text), copy.deepcopy(ema_unet), vae)
        pipeline.set_progress_bar_config(disable=True)
        quick = evaluate_world(pipeline, config)
        save_weights(out / f"shapes-{step}.safetensors", ema_text, ema_unet, vae, {"seed": config.seed, "step": step})
        log(f"checkpoint at step {step}: checker on renders {quick}")

    (ema_text,), ema_unet, unet_record = train_unet([text_encoder], unet, [tokenizer], latents, scene_list, config,
                                                    log, checkpoint)
    pipeline = assemble(tokenizer, ema_text, ema_unet, vae)
    pipeline.set_progress_bar_config(disable=True)
    log("evaluating")
    evaluation = evaluate_world(pipeline, config)
    log(f"checker on renders: {evaluation}")
    record = {
        "config": asdict(config),
        "vae": vae_record,
        "unet": unet_record,
        "scaling_factor": scaling,
        "evaluation": evaluation,
        "wall_seconds": round(time.time() - began, 1),
        "machine": {"cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version()},
    }
    out.mkdir(parents=True, exist_ok=True)
    save_weights(out / "shapes.safetensors", ema_text, ema_unet, vae, {"seed": config.seed})
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    log(f"wrote {out / 'shapes.safetensors'} and {out / 'training.json'} in {record['wall_seconds']:.0f} s")
    return record


def train_sdxl_world(out: Path, config: WorldConfig, threads: int | None = None, log=print) -> dict:
    """The world in the SDXL layout (``builtin:shapes-sdxl``): its two text encoders and UNet
    trained as the SD 1.x layout's are, on the latents of the world's own VAE (shipped in
    shapes.safetensors, not retrained), with SDXL's conditioning (:func:`sdxl_conditioning`)."""
    import copy

    import torch

    from .model import (
        assemble_sdxl,
        build_sdxl_components,
        build_shapes_pipeline,
        save_sdxl_weights,
        shapes_tokenizer,
        shapes_tokenizer_2,
    )

    if threads:
        torch.set_num_threads(threads)
    began = time.time()
    torch.manual_seed(config.seed)
    vae = build_shapes_pipeline().vae
    tokenizer = shapes_tokenizer()
    text_encoder, text_encoder_2, unet = build_sdxl_components(tokenizer)
    tokenizers = [tokenizer, shapes_tokenizer_2()]
    log(f"rendering {config.scenes} scenes")
    scene_list = scenes(config.seed, config.scenes)
    latents = encode_latents(vae, _images(scene_list)) * vae.config.scaling_factor
    out.mkdir(parents=True, exist_ok=True)

    def checkpoint(ema_texts, ema_unet, step):
        pipeline = assemble_sdxl(tokenizer, *copy.deepcopy(ema_texts), copy.deepcopy(ema_unet), vae)
        pipeline.set_progress_bar_config(disable=True)
        quick = evaluate_world(pipeline, config)
        save_sdxl_weights(out / f"shapes-sdxl-{step}.safetensors", *ema_texts, ema_unet, {"seed": config.seed,
                                                                                           "step": step})
        log(f"checkpoint at step {step}: checker on renders {quick}")

    ema_texts, ema_unet, unet_record = train_unet([text_encoder, text_encoder_2], unet, tokenizers, latents,
                                                  scene_list, config, log, checkpoint, sdxl_conditioning)
    pipeline = assemble_sdxl(tokenizer, *ema_texts, ema_unet, vae)
    pipeline.set_progress_bar_config(disable=True)
    log("evaluating")
    evaluation = evaluate_world(pipeline, config)
    log(f"checker on renders: {evaluation}")
    record = {
        "layout": "sdxl",
        "config": asdict(config),
        "unet": unet_record,
        "evaluation": evaluation,
        "wall_seconds": round(time.time() - began, 1),
        "machine": {"cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version()},
    }
    save_sdxl_weights(out / "shapes-sdxl.safetensors", *ema_texts, ema_unet, {"seed": config.seed})
    (out / "training-sdxl.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    log(f"wrote {out / 'shapes-sdxl.safetensors'} and {out / 'training-sdxl.json'} in {record['wall_seconds']:.0f} s")
    return record
