"""One training step of the method: the frozen models, the mapper, its loss and its batches.

Only the mapper learns; UNet, VAE and text encoder stay frozen. The loop around it
(checkpoints, previews, saving) is ``training.py``.
"""

from __future__ import annotations

import contextlib
import functools

from .config import TrainConfig

RECOMPUTED_TEXT_LAYERS = 2 / 3  # of the text encoder's layers, recomputed in the backward pass


@contextlib.contextmanager
def recomputed(modules):
    """While gradients are on, ``modules`` keep no activations for the backward pass: each one's
    forward runs under activation checkpointing (non-reentrant) and is recomputed in the
    backward. Gradients are unchanged."""
    import torch
    from torch.utils.checkpoint import checkpoint

    modules = list(modules)
    if not torch.is_grad_enabled() or not modules:
        yield
        return
    for module in modules:
        module.forward = functools.partial(checkpoint, type(module).forward.__get__(module), use_reentrant=False)
    try:
        yield
    finally:
        for module in modules:
            del module.forward  # back to the class's forward


def recomputed_text_layers(*text_encoders):
    """The first two thirds of each frozen text encoder's layers (SDXL: of both), :func:`recomputed`.
    The 16-row text batch of a NeTI step otherwise holds its activations through the whole UNet
    forward and backward (on SD 1.5 at 512 px: 652 MB against textual inversion's 40 MB, +39 % peak
    memory); with two thirds recomputed that is 258 MB for about 2 % more compute."""
    chosen = []
    for text_encoder in text_encoders:
        layers = list(getattr(getattr(text_encoder, "text_model", text_encoder).encoder, "layers", []))
        chosen += layers[: int(len(layers) * RECOMPUTED_TEXT_LAYERS)]
    return recomputed(chosen)


class Trainer:
    """State of one training run on a loaded base model."""

    def __init__(self, base, photos, token: str, config: TrainConfig, accelerator):
        import torch
        from diffusers import DDPMScheduler

        from ..method.mapper import MapperConfig, NeTIMapper
        from ..method.placeholders import add_to_tokenizers, single_token_id
        from ..method.spacetime import install_processors

        self.base, self.config, self.accelerator = base, config, accelerator
        pipe = base.pipeline
        self.tokenizer, self.text_encoder, self.unet, self.vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
        self.backbone = base.backbone
        self.tokenizers, self.encoders = self.backbone.tokenizers(pipe), self.backbone.text_encoders(pipe)
        self.vae_scale_factor = pipe.vae_scale_factor
        initializer_ids = [single_token_id(tokenizer, config.initializer_word) for tokenizer in self.tokenizers]
        self.token_ids = add_to_tokenizers(self.tokenizers, [token])
        self.token_id = self.token_ids[0][0]
        self.token = token
        self.layer_names = install_processors(self.unet)
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        # each encoder's initializer norm: the mapper's output for it is normalised to that
        norms = [float(encoder.module.get_input_embeddings().weight[index].float().norm())
                 for encoder, index in zip(self.encoders, initializer_ids)]
        mapper_config = MapperConfig.for_encoders(
            [int(encoder.module.config.hidden_size) for encoder in self.encoders], norms,
            num_layers=len(self.layer_names),
            bypass=config.bypass,
            nested_dropout=config.nested_dropout,
            nested_dropout_prob=config.nested_dropout_prob,
        )
        self.generator = torch.Generator().manual_seed(config.seed)
        mapper = NeTIMapper(mapper_config, generator=self.generator).to(accelerator.device)
        optimizer = torch.optim.AdamW(
            mapper.parameters(),
            lr=config.effective_lr(accelerator.num_processes),
            betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.adam_weight_decay,
            eps=config.adam_epsilon,
        )
        if accelerator.process_index:  # other processes draw other batches
            self.generator.manual_seed(config.seed + 7919 * accelerator.process_index)
        self.mapper, self.optimizer = accelerator.prepare(mapper, optimizer)
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.latent_mean, self.latent_std = self._encode_photos(photos)

    @property
    def unwrapped_mapper(self):
        return self.accelerator.unwrap_model(self.mapper)

    def _encode_photos(self, images):
        """VAE latent distributions of every photo and its mirror image: 2 x N x 4 x h x w."""
        import numpy as np
        import torch

        pixels = torch.stack(
            [torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1) for image in images]
        )  # N, 3, H, W
        pixels = torch.stack([pixels, pixels.flip(-1)]).to(self.accelerator.device, self.vae.dtype)
        means, stds = [], []
        with torch.no_grad():
            for variant in pixels:
                dist = self.vae.encode(variant).latent_dist
                means.append(dist.mean.float())
                stds.append(dist.std.float())
        return torch.stack(means), torch.stack(stds)

    def conditioning(self, input_ids, timesteps, generator):
        """Per-layer keys (no bypass) and values (bypass) of a batch, in one call of each text
        encoder (``input_ids``: one B x S tensor per tokenizer), and its pooled embeddings (B x P,
        the mean over layers; None for models without them)."""
        from ..method.encoding import ConceptSlot, encode_layers, pooled_over_layers
        from ..method.spacetime import SpaceTimeConditioning

        device = self.accelerator.device
        slot = ConceptSlot.of(self.token_ids, self.mapper, config=self.unwrapped_mapper.config)
        with recomputed_text_layers(*(encoder.module for encoder in self.encoders)):
            encoding = encode_layers(
                self.encoders, [ids.to(device) for ids in input_ids], timesteps.to(device), len(self.layer_names),
                {self.token_id: slot}, generator=generator,
            )  # B, L, S, D each
        spacetime = SpaceTimeConditioning(keys=encoding.keys.transpose(0, 1), values=encoding.values.transpose(0, 1))
        return spacetime, pooled_over_layers(encoding.pooled)

    def added_conditioning(self, pooled, latents) -> dict | None:
        """What the UNet reads besides the text of a batch (the backbone's added conditioning:
        SDXL's pooled embeddings and size ids of uncropped photos at the training size); None
        for models that read nothing else."""
        height, width = (side * self.vae_scale_factor for side in latents.shape[-2:])
        return self.backbone.added_conditioning(pooled, height, width)

    def denoising_inputs(self, image_index, flip, noise, timesteps, captions, generator):
        """What the UNet reads and must predict for (image, noise, t, caption) samples: the noisy
        latents x_t, the target (ε, or v for v-prediction models), the caption's token ids."""
        import torch

        device = self.accelerator.device
        mean = self.latent_mean[flip.long(), image_index]
        std = self.latent_std[flip.long(), image_index]
        sample = torch.randn(mean.shape, generator=generator).to(device)
        latents = (mean + std * sample) * self.vae.config.scaling_factor  # a draw from the VAE posterior
        noise, timesteps = noise.to(device), timesteps.to(device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        input_ids = [tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                               truncation=True, return_tensors="pt").input_ids for tokenizer in self.tokenizers]
        return noisy, target, input_ids  # the captions' token ids in each tokenizer

    def denoising_loss(self, image_index, flip, noise, timesteps, captions, generator):
        """MSE of the UNet's prediction for the given (image, noise, t, caption) samples."""
        import torch.nn.functional as F

        noisy, target, input_ids = self.denoising_inputs(image_index, flip, noise, timesteps, captions, generator)
        timesteps = timesteps.to(self.accelerator.device)
        conditioning, pooled = self.conditioning(input_ids, timesteps, generator)
        added = self.added_conditioning(pooled, noisy)
        extra = {} if added is None else {"added_cond_kwargs": added}  # SD 1.x/2.x UNets take none
        prediction = self.unet(
            noisy.to(self.unet.dtype), timesteps, encoder_hidden_states=conditioning.keys[0],
            cross_attention_kwargs={"spacetime": conditioning}, **extra,
        ).sample
        return F.mse_loss(prediction.float(), target.float())

    def random_batch(self):
        import torch

        gen, size = self.generator, self.config.batch_size
        count = self.latent_mean.shape[1]
        image_index = torch.randint(0, count, (size,), generator=gen)
        flip = torch.rand(size, generator=gen) < 0.5
        noise = torch.randn((size, *self.latent_mean.shape[2:]), generator=gen)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (size,), generator=gen)
        templates = self.config.templates
        captions = [templates[int(i)].format(self.token)
                    for i in torch.randint(0, len(templates), (size,), generator=gen)]
        return image_index, flip, noise, timesteps, captions

    def train_step(self) -> float:
        """One optimizer step (``grad_accum`` micro-batches); returns the mean loss."""
        self.mapper.train()
        total = 0.0
        for _ in range(self.config.grad_accum):
            with self.accelerator.accumulate(self.mapper):
                loss = self.denoising_loss(*self.random_batch(), generator=self.generator)
                self.accelerator.backward(loss)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            total += float(loss.detach())
        return total / self.config.grad_accum

    def evaluate(self, seed: int = 1234) -> float:
        """Denoising loss on a fixed (image, noise, t) set, no nested dropout, no flips."""
        import torch

        count = self.config.eval_samples
        gen = torch.Generator().manual_seed(seed)
        image_index = torch.arange(count) % self.latent_mean.shape[1]
        flip = torch.zeros(count, dtype=torch.bool)
        noise = torch.randn((count, *self.latent_mean.shape[2:]), generator=gen)
        num_train = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.linspace(num_train * 0.05, num_train * 0.95, count).long()
        captions = [self.config.templates[0].format(self.token)] * count
        self.mapper.eval()
        with torch.no_grad():
            return float(self.denoising_loss(image_index, flip, noise, timesteps, captions, gen))
