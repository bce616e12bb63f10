"""Training a concept: only the mapper learns; UNet, VAE and text encoder stay frozen."""

from __future__ import annotations

import difflib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .errors import BadInput, ConceptExists, StcError
from .registry import (
    PREVIEW_FILE,
    PREVIEWS_DIR,
    Concept,
    Registry,
    preview_paths,
    validate_name,
)

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
    save_every: int = 250  # checkpoint every N steps (0: only at the end and on Ctrl-C)
    preview_every: int = 0  # render previews every N steps (0: only the final preview)
    preview_steps: int = 25  # denoising steps of preview renders

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
        for flag in ("save_every", "preview_every"):
            if getattr(self, flag) < 0:
                raise BadInput(f"--{flag.replace('_', '-')} must be 0 (off) or positive")
        if not 0.0 <= self.nested_dropout_prob <= 1.0:
            raise BadInput("--nested-dropout-prob must lie between 0 and 1")
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

    @classmethod
    def from_file(cls, path: Path, overrides: dict) -> "TrainConfig":
        """Settings from a YAML file, then ``overrides`` (explicit flags) on top."""
        import yaml

        try:
            data = yaml.safe_load(Path(path).expanduser().read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
            raise BadInput(f"cannot read the config file {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise BadInput(f"{path} must hold a mapping of option: value")
        data = {str(key).replace("-", "_"): value for key, value in data.items()}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BadInput(
                f"unknown setting(s) in {path}: {', '.join(unknown)}. Known: {', '.join(sorted(known))}"
            )
        try:
            return cls(**{**data, **overrides})
        except TypeError as exc:
            raise BadInput(f"bad settings in {path}: {exc}") from exc


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


@dataclass
class TrainCallbacks:
    """How the library reports progress; every callback is optional."""

    on_step: Callable[[int, int, float], None] | None = None  # step, total, loss
    on_warning: Callable[[str], None] | None = None
    on_status: Callable[[str], None] | None = None

    def status(self, message: str) -> None:
        if self.on_status:
            self.on_status(message)


@dataclass
class TrainResult:
    concept: Concept  # as stored in the registry
    mapper: object  # the trained NeTIMapper (unwrapped, on the training device)


def train_concept(
    photos_dir: Path | None,
    name: str,
    model: str | None,
    config: TrainConfig,
    registry: Registry | None = None,
    device: str | None = None,
    model_config: str | None = None,
    callbacks: TrainCallbacks | None = None,
) -> TrainResult:
    """Train a new concept on the photos in ``photos_dir`` and save it in the registry."""
    registry = registry or Registry()
    validate_name(name)
    if registry.path_of(name).exists():
        raise ConceptExists(
            f"a concept named {name!r} exists already; choose another --name, resume it (stc train --resume "
            f"{name}), or remove it first (stc rm {name})"
        )
    if photos_dir is None:
        raise BadInput("pass the folder with your photos (stc train PHOTOS --name NAME)")
    from .models import DEFAULT_MODEL

    run = _Run(registry, name, Path(photos_dir).expanduser().resolve(), model or DEFAULT_MODEL, config, callbacks)
    return run.execute(device, model_config, previous=None)


def resume_training(
    name: str,
    steps: int | None = None,
    registry: Registry | None = None,
    photos_dir: Path | None = None,
    device: str | None = None,
    model_config: str | None = None,
    callbacks: TrainCallbacks | None = None,
    **run_options,
) -> TrainResult:
    """Continue an interrupted (or finished) concept to ``steps`` (default: the planned total)."""
    from . import checkpoints

    registry = registry or Registry()
    concept = registry.load(name)
    state = checkpoints.load(concept.path)
    config = TrainConfig.from_dict({**concept.training, **run_options, "steps": steps or concept.training["steps"]})
    if state.step >= config.steps:
        raise BadInput(
            f"{name!r} has already trained {state.step}/{config.steps} steps; pass --steps N (more than "
            f"{state.step}) to train further"
        )
    folder = photos_dir or concept.training.get("photos_dir")
    if folder is None:
        raise BadInput(f"{name!r} does not record its photos folder; pass it: stc train PHOTOS --resume {name}")
    run = _Run(registry, name, Path(folder).expanduser().resolve(), concept.base_model, config, callbacks)
    return run.execute(device, model_config, previous=(concept, state))


class _Run:
    """One training session of a concept: new, or resumed from a checkpoint."""

    def __init__(self, registry, name, photos_dir, model, config, callbacks):
        self.registry, self.name, self.photos_dir, self.model = registry, name, photos_dir, model
        self.config = config
        self.callbacks = callbacks or TrainCallbacks()
        self.metrics_lines: list[str] = []
        self.files: dict[str, bytes] = {}  # previews etc. carried into every save
        self.losses: list[float] = []
        self.metrics: dict = {}
        self.previous_seconds = 0.0
        self.created = ""

    def execute(self, device, model_config, previous) -> TrainResult:
        from accelerate import Accelerator

        from .images import check_photo_folder, load_photos
        from .models import load_base_model

        check_photo_folder(self.photos_dir)
        config = self.config
        self.accelerator = Accelerator(
            mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.grad_accum,
            cpu=(device == "cpu"),
        )
        if config.mixed_precision == "fp16" and self.accelerator.device.type == "cpu":
            raise BadInput("--mixed-precision fp16 needs a GPU; on the CPU use bf16 or no")
        weight_dtype = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}[config.mixed_precision]
        self.callbacks.status(f"loading {self.model}")
        self.base = load_base_model(
            self.model, device=str(self.accelerator.device.type), dtype=weight_dtype, config=model_config
        )
        self.resolution = config.resolution or self.base.default_resolution
        self.photos = load_photos(self.photos_dir, self.resolution, on_warning=self.callbacks.on_warning)
        self.callbacks.status(f"{len(self.photos.images)} photo(s) at {self.resolution}px")
        self.trainer = Trainer(self.base, self.photos.images, f"<{self.name}>", config, self.accelerator)
        start = self._restore(previous) if previous else 0
        if not previous:
            self.metrics["eval_loss_before"] = self.trainer.evaluate()
        self.started = time.monotonic()
        self._loop(start)
        self.metrics["eval_loss_after"] = self.trainer.evaluate()
        self.files[PREVIEW_FILE] = self._preview_grid()
        concept = self._save(config.steps, final=True)
        return TrainResult(concept=concept, mapper=self.trainer.unwrapped_mapper)

    def _restore(self, previous) -> int:
        import torch

        concept, state = previous
        mapper = self.trainer.unwrapped_mapper
        mapper.load_state_dict(self.registry.load_state_dict(concept))
        self.trainer.optimizer.load_state_dict(state.optimizer)
        if self.accelerator.process_index == 0:
            self.trainer.generator.set_state(state.generator)
        torch.set_rng_state(state.global_rng)
        self.metrics = dict(concept.metrics)
        self.created = concept.created
        self.previous_seconds = float(concept.metrics.get("seconds") or 0.0)
        for path in preview_paths(concept.path):
            self.files[str(path.relative_to(concept.path))] = path.read_bytes()
        metrics_file = concept.path / "metrics.jsonl"
        if metrics_file.exists():
            lines = metrics_file.read_text(encoding="utf-8").splitlines()
            self.metrics_lines = [line for line in lines if line and json.loads(line)["step"] <= state.step]
            self.losses = [json.loads(line)["loss"] for line in self.metrics_lines]
        self.callbacks.status(f"resuming {self.name} at step {state.step}/{self.config.steps}")
        return state.step

    def _loop(self, start: int) -> None:
        config, accelerator = self.config, self.accelerator
        with InterruptGuard() as guard:
            for step in range(start + 1, config.steps + 1):
                loss = self.trainer.train_step()
                self.losses.append(loss)
                self.metrics_lines.append(json.dumps({
                    "step": step, "loss": round(loss, 6), "lr": self.trainer.optimizer.param_groups[0]["lr"],
                    "time": round(self.previous_seconds + time.monotonic() - self.started, 3),
                }))
                if self.callbacks.on_step:
                    self.callbacks.on_step(step, config.steps, loss)
                if guard.requested(accelerator):
                    self._save(step, final=False)
                    raise TrainingInterrupted(
                        f"training of {self.name!r} stopped at step {step}/{config.steps}; the checkpoint is saved. "
                        f"Resume with: stc train --resume {self.name}"
                    )
                if config.preview_every and step % config.preview_every == 0 and step < config.steps:
                    self.files[f"{PREVIEWS_DIR}/step-{step:06d}.png"] = self._preview_grid()
                if config.save_every and step % config.save_every == 0 and step < config.steps:
                    self._save(step, final=False)

    def _preview_grid(self) -> bytes:
        """A PNG of fixed-seed renders of a few prompts with the current mapper."""
        from .generation import Renderer, RenderSettings

        trainer = self.trainer
        mapper = trainer.unwrapped_mapper
        was_training = mapper.training
        concept = self._concept(step=0)
        renderer = Renderer(self.base, {self.name: (concept, mapper.eval())})
        settings = RenderSettings(steps=self.config.preview_steps, width=self.resolution, height=self.resolution)
        prompts = PREVIEW_PROMPTS[self.config.kind]
        columns = [renderer.render(p.format(f"<{self.name}>"), PREVIEW_SEEDS, settings) for p in prompts]
        mapper.train(was_training)
        rows = [[column[index].image for column in columns] for index in range(len(PREVIEW_SEEDS))]
        return _tile_png(rows)

    def _concept(self, step: int) -> Concept:
        trainer, config = self.trainer, self.config
        training = config.to_dict()
        training.update(
            resolution=self.resolution, initializer=config.initializer_word,
            effective_lr=config.effective_lr(self.accelerator.num_processes),
            num_processes=self.accelerator.num_processes, photos=[p.name for p in self.photos.paths],
            photos_dir=str(self.photos_dir), steps_done=step,
        )
        tail = self.losses[-20:]
        metrics = dict(self.metrics)
        metrics.update(
            final_loss=sum(tail) / len(tail) if tail else None,
            seconds=self.previous_seconds + time.monotonic() - self.started,
        )
        return Concept(
            name=self.name, base_model=self.base.spec, initializer=config.initializer_word,
            text_width=self.base.text_width, layer_names=trainer.layer_names,
            mapper=trainer.unwrapped_mapper.config.to_dict(), training=training,
            metrics={k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in metrics.items()},
            created=self.created,
        )

    def _save(self, step: int, final: bool) -> Concept:
        """Write the concept (and, unless final, its training state) atomically; main process only."""
        import torch

        from . import checkpoints

        concept = self._concept(step)
        if self.accelerator.is_main_process:
            files = dict(self.files)
            files["metrics.jsonl"] = ("\n".join(self.metrics_lines) + "\n").encode()
            if not final:
                state = checkpoints.TrainingState(
                    step=step, optimizer=self.trainer.optimizer.state_dict(),
                    generator=self.trainer.generator.get_state(), global_rng=torch.get_rng_state(),
                )
                files.update(checkpoints.serialize(state))
            mapper = self.trainer.unwrapped_mapper
            concept = self.registry.save(concept, mapper.state_dict(), overwrite=True, extra_files=files)
        self.accelerator.wait_for_everyone()
        concept.path = self.registry.path_of(self.name)
        return concept


PREVIEW_PROMPTS = {
    "object": ["a photo of a {}", "a {} on the beach", "an oil painting of a {}"],
    "style": ["a painting in the style of {}", "a house in the style of {}", "a cat in the style of {}"],
}
PREVIEW_SEEDS = [0, 1]


def _tile_png(rows: list[list]) -> bytes:
    """PNG bytes of equally sized images laid out in rows."""
    import io

    from PIL import Image

    width, height = rows[0][0].size
    sheet = Image.new("RGB", (width * len(rows[0]), height * len(rows)), "white")
    for row_index, row in enumerate(rows):
        for column_index, image in enumerate(row):
            sheet.paste(image, (column_index * width, row_index * height))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


class TrainingInterrupted(StcError):
    """Ctrl-C or SIGTERM during training: the checkpoint is saved, the run can resume."""

    exit_code = 130


class InterruptGuard:
    """Turns SIGINT/SIGTERM into a request to stop after the current step (a second Ctrl-C aborts)."""

    def __init__(self):
        self.flag = False
        self.previous = {}

    def _handle(self, signum, _frame):
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        import signal

        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        return False

    def requested(self, accelerator) -> bool:
        """True when any process was asked to stop (all processes agree, so none hangs)."""
        if accelerator.num_processes == 1:
            return self.flag
        import torch

        flags = accelerator.gather(torch.tensor([float(self.flag)], device=accelerator.device))
        return bool(flags.max() > 0)
