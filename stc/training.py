"""Training a concept: only the mapper learns; UNet, VAE and text encoder stay frozen."""

from __future__ import annotations

import difflib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .errors import BadInput, ConceptExists
from .registry import Concept, Registry, validate_name

OBJECT_TEMPLATES = [
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}",
    "a cropped photo of a {}", "a photo of the {}", "a good photo of the {}", "a photo of one {}",
    "a close-up photo of the {}", "a rendition of the {}", "a photo of the clean {}",
    "a rendition of a {}", "a photo of a nice {}", "a good photo of a {}", "a photo of the nice {}",
    "a photo of the small {}", "a photo of the weird {}", "a photo of the large {}",
    "a photo of a cool {}", "a photo of a small {}",
]
STYLE_TEMPLATES = [
    "a painting in the style of {}", "a rendering in the style of {}",
    "a cropped painting in the style of {}", "the painting in the style of {}",
    "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}",
    "a cool painting in the style of {}", "a close-up painting in the style of {}",
    "a bright painting in the style of {}", "a cropped painting in the style of {}",
    "a good painting in the style of {}", "a close-up painting in the style of {}",
    "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}",
    "a large painting in the style of {}",
]
DEFAULT_INITIALIZER = {"object": "object", "style": "painting"}
COMMON_INITIALIZERS = [
    "object", "animal", "pet", "dog", "cat", "bird", "person", "man", "woman", "face", "toy", "doll",
    "car", "house", "building", "flower", "plant", "tree", "cup", "mug", "bag", "shoe", "hat",
    "sculpture", "statue", "painting", "drawing", "style", "art", "pattern", "texture", "food",
]
MIXED_PRECISION = ("no", "fp16", "bf16")


@dataclass
class TrainConfig:
    """Training hyper-parameters; defaults are the reference implementation's."""

    steps: int = 1000
    batch_size: int = 2
    grad_accum: int = 4
    lr: float = 1e-3
    scale_lr: bool = True
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    resolution: int | None = None  # None: the base model's native resolution
    seed: int = 0
    kind: str = "object"
    initializer: str | None = None  # None: "object", or "painting" for --kind style
    bypass: bool = True
    nested_dropout: bool = True
    nested_dropout_prob: float = 0.5
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    eval_samples: int = 8

    def __post_init__(self) -> None:
        positive = {"steps": self.steps, "batch_size": self.batch_size, "grad_accum": self.grad_accum}
        for flag, value in positive.items():
            if value < 1:
                raise BadInput(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
        if self.lr <= 0:
            raise BadInput(f"--lr must be positive, got {self.lr}")
        if self.kind not in DEFAULT_INITIALIZER:
            raise BadInput(f"--kind must be 'object' or 'style', not {self.kind!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise BadInput(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise BadInput(f"--resolution must be a positive multiple of 8, got {self.resolution}")

    @property
    def initializer_word(self) -> str:
        return self.initializer or DEFAULT_INITIALIZER[self.kind]

    @property
    def templates(self) -> list[str]:
        return STYLE_TEMPLATES if self.kind == "style" else OBJECT_TEMPLATES

    def effective_lr(self, num_processes: int = 1) -> float:
        if not self.scale_lr:
            return self.lr
        return self.lr * self.batch_size * self.grad_accum * num_processes

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def single_token_id(tokenizer, word: str) -> int:
    """The id of ``word`` if it is one token; otherwise a BadInput with alternatives."""
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) == 1:
        return ids[0]
    singles = [w for w in COMMON_INITIALIZERS if len(tokenizer.encode(w, add_special_tokens=False)) == 1]
    close = difflib.get_close_matches(word.lower(), singles, n=3, cutoff=0.3) or singles[:5]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    raise BadInput(
        f"the initializer word {word!r} is {len(ids)} tokens ({' '.join(pieces)}) for this model's "
        f"tokenizer; it must be a single token. Try --init {close[0]} (or: {', '.join(close[1:]) or 'object'})"
    )


def add_placeholder_token(tokenizer, token: str) -> int:
    if token in tokenizer.get_vocab():
        raise BadInput(f"the tokenizer already knows {token!r}; choose another concept name")
    tokenizer.add_tokens([token])
    return tokenizer.convert_tokens_to_ids(token)


class Trainer:
    """State of one training run on a loaded base model."""

    def __init__(self, base, photos, token: str, config: TrainConfig, accelerator):
        import torch
        from diffusers import DDPMScheduler

        from .mapper import MapperConfig, NeTIMapper
        from .spacetime import install_processors

        self.base, self.config, self.accelerator = base, config, accelerator
        pipe = base.pipeline
        self.tokenizer, self.text_encoder, self.unet, self.vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
        initializer_id = single_token_id(self.tokenizer, config.initializer_word)
        self.token_id = add_placeholder_token(self.tokenizer, token)
        self.token = token
        self.layer_names = install_processors(self.unet)
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        embedding = self.text_encoder.get_input_embeddings().weight
        mapper_config = MapperConfig(
            text_width=embedding.shape[1],
            norm_scale=float(embedding[initializer_id].float().norm()),
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

    def _conditioning(self, input_ids, timesteps, generator):
        import torch

        from .spacetime import ConceptSlot, SpaceTimeConditioning, encode_spacetime

        batch, num_layers = input_ids.shape[0], len(self.layer_names)
        device = self.accelerator.device
        rows_ids = input_ids.repeat_interleave(num_layers, dim=0).to(device)  # B·L, S (sample-major)
        rows_t = timesteps.repeat_interleave(num_layers).to(device)
        rows_l = torch.arange(num_layers, device=device).repeat(batch)
        slot = ConceptSlot(token_id=self.token_id, mapper=self.mapper)
        plain, bypassed = encode_spacetime(
            self.text_encoder, rows_ids, rows_t, rows_l, {self.token_id: slot}, generator=generator
        )
        shape = (batch, num_layers, *plain.shape[1:])
        keys = plain.view(shape).transpose(0, 1)  # L, B, S, D
        values = bypassed.view(shape).transpose(0, 1)
        return SpaceTimeConditioning(keys=keys, values=values)

    def denoising_loss(self, image_index, flip, noise, timesteps, captions, generator):
        """MSE of the UNet's prediction for the given (image, noise, t, caption) samples."""
        import torch
        import torch.nn.functional as F

        device = self.accelerator.device
        mean = self.latent_mean[flip.long(), image_index]
        std = self.latent_std[flip.long(), image_index]
        sample = torch.randn(mean.shape, generator=generator).to(device)
        latents = (mean + std * sample) * self.vae.config.scaling_factor
        noise = noise.to(device)
        timesteps = timesteps.to(device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        input_ids = self.tokenizer(
            captions, padding="max_length", max_length=self.tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids
        conditioning = self._conditioning(input_ids, timesteps, generator)
        prediction = self.unet(
            noisy.to(self.unet.dtype), timesteps, encoder_hidden_states=conditioning.keys[0],
            cross_attention_kwargs={"spacetime": conditioning},
        ).sample
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
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
        captions = [templates[int(i)].format(self.token) for i in torch.randint(0, len(templates), (size,), generator=gen)]
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


StepCallback = Callable[[int, int, float], None]


@dataclass
class TrainResult:
    concept: Concept  # as stored in the registry
    mapper: object  # the trained NeTIMapper (unwrapped, on the training device)


def train_concept(
    photos_dir: Path,
    name: str,
    model: str,
    config: TrainConfig,
    registry: Registry | None = None,
    device: str | None = None,
    model_config: str | None = None,
    on_step: StepCallback | None = None,
    on_warning: Callable[[str], None] | None = None,
    on_status: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train a concept on the photos in ``photos_dir`` and save it in the registry."""
    from accelerate import Accelerator

    from .images import check_photo_folder, load_photos
    from .models import load_base_model

    registry = registry or Registry()
    validate_name(name)
    if registry.path_of(name).exists():
        raise ConceptExists(
            f"a concept named {name!r} exists already; choose another --name, or remove it first (stc rm {name})"
        )
    check_photo_folder(Path(photos_dir))
    status = on_status or (lambda message: None)
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.grad_accum,
        cpu=(device == "cpu"),
    )
    weight_dtype = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}[config.mixed_precision]
    status(f"loading {model}")
    base = load_base_model(model, device=str(accelerator.device.type), dtype=weight_dtype, config=model_config)
    resolution = config.resolution or base.default_resolution
    photos = load_photos(Path(photos_dir), resolution, on_warning=on_warning)
    status(f"{len(photos.images)} photo(s) at {resolution}px")
    trainer = Trainer(base, photos.images, f"<{name}>", config, accelerator)

    started = time.monotonic()
    eval_before = trainer.evaluate()
    losses = []
    for step in range(1, config.steps + 1):
        losses.append(trainer.train_step())
        if on_step:
            on_step(step, config.steps, losses[-1])
    eval_after = trainer.evaluate()
    seconds = time.monotonic() - started

    mapper = trainer.unwrapped_mapper
    training = config.to_dict()
    training.update(
        resolution=resolution,
        initializer=config.initializer_word,
        effective_lr=config.effective_lr(accelerator.num_processes),
        num_processes=accelerator.num_processes,
        photos=[p.name for p in photos.paths],
        steps_done=config.steps,
    )
    tail = losses[-min(len(losses), 20):]
    metrics = {
        "final_loss": round(sum(tail) / len(tail), 6),
        "eval_loss_before": round(eval_before, 6),
        "eval_loss_after": round(eval_after, 6),
        "seconds": round(seconds, 2),
    }
    concept = Concept(
        name=name,
        base_model=base.spec,
        initializer=config.initializer_word,
        text_width=base.text_width,
        layer_names=trainer.layer_names,
        mapper=mapper.config.to_dict(),
        training=training,
        metrics={k: (v if math.isfinite(v) else None) for k, v in metrics.items()},
    )
    if accelerator.is_main_process:
        registry.save(concept, mapper.state_dict())
    accelerator.wait_for_everyone()
    return TrainResult(concept=concept, mapper=mapper)
