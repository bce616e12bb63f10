"""Rendering images with concepts: prompt parsing, the denoising loop, PNG files."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .errors import BadInput, ModelError
from .registry import Concept, Registry

CONCEPT_REF = re.compile(r"<([a-z0-9][a-z0-9_-]{0,63})(?::(\d+))?>")
SCHEDULERS = {
    "dpm": ("DPMSolverMultistepScheduler", "DPM++ 2M"),
    "ddim": ("DDIMScheduler", "DDIM"),
    "euler": ("EulerDiscreteScheduler", "Euler"),
    "pndm": ("PNDMScheduler", "PNDM"),
}
FULL_RANK = 128


@dataclass
class ParsedPrompt:
    """A prompt with ``<name>`` / ``<name:rank>`` references resolved to ``<name>`` tokens."""

    text: str
    ranks: dict[str, int | None]  # concept name -> inline rank (None: use the default)


def parse_prompt(prompt: str) -> ParsedPrompt:
    ranks: dict[str, int | None] = {}

    def replace(match: re.Match) -> str:
        name, rank = match.group(1), match.group(2)
        value = int(rank) if rank is not None else None
        if value is not None and not 1 <= value <= FULL_RANK:
            raise BadInput(f"rank in <{name}:{rank}> must be between 1 and {FULL_RANK}")
        if name in ranks and value is not None and ranks[name] not in (None, value):
            raise BadInput(f"<{name}> is given two different ranks ({ranks[name]} and {value}) in one prompt")
        if value is not None or name not in ranks:
            ranks[name] = value
        return f"<{name}>"

    return ParsedPrompt(text=CONCEPT_REF.sub(replace, prompt), ranks=ranks)


def make_scheduler(name: str, config):
    import diffusers

    if name not in SCHEDULERS:
        raise BadInput(f"--scheduler must be one of {', '.join(SCHEDULERS)}, not {name!r}")
    return getattr(diffusers, SCHEDULERS[name][0]).from_config(config)


@dataclass
class RenderSettings:
    steps: int = 50
    cfg: float = 7.5
    width: int | None = None  # None: the model's native resolution
    height: int | None = None
    scheduler: str = "dpm"
    negative: str = ""
    rank: int = FULL_RANK  # default rank for concepts without an inline rank
    batch_size: int = 4

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise BadInput(f"--steps must be at least 1, got {self.steps}")
        if self.batch_size < 1:
            raise BadInput(f"--batch-size must be at least 1, got {self.batch_size}")
        if not 1 <= self.rank <= FULL_RANK:
            raise BadInput(f"--rank must be between 1 and {FULL_RANK}, got {self.rank}")
        for flag, value in (("--width", self.width), ("--height", self.height)):
            if value is not None and (value < 8 or value % 8):
                raise BadInput(f"{flag} must be a positive multiple of 8, got {value}")
        if self.scheduler not in SCHEDULERS:
            raise BadInput(f"--scheduler must be one of {', '.join(SCHEDULERS)}, not {self.scheduler!r}")


@dataclass
class RenderedImage:
    image: object  # PIL.Image.Image
    prompt: str
    seed: int
    ranks: dict[str, int]
    metadata: dict = field(default_factory=dict)


class Renderer:
    """A base model with concepts attached; renders prompts that reference them."""

    def __init__(self, base, concepts: dict[str, tuple[Concept, object]]):
        from .spacetime import ConceptSlot, install_processors

        self.base = base
        pipe = base.pipeline
        self.layer_names = install_processors(pipe.unet)
        self.concepts = concepts
        self.slots: dict[str, ConceptSlot] = {}
        for name, (concept, mapper) in concepts.items():
            check_compatible(concept, base, self.layer_names)
            pipe.tokenizer.add_tokens([concept.token])
            token_id = pipe.tokenizer.convert_tokens_to_ids(concept.token)
            self.slots[name] = ConceptSlot(token_id=token_id, mapper=mapper.to(base.device))
        self.text_encoder_calls = 0

    # ------------------------------------------------------------------ text

    def _tokenize(self, text: str):
        tokenizer = self.base.pipeline.tokenizer
        ids = tokenizer(
            [text], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids
        return ids.to(self.base.device)

    def plain_encoding(self, text: str):
        """The stock text encoding of ``text`` (1 x S x D)."""
        import torch

        self.text_encoder_calls += 1
        with torch.no_grad():
            return self.base.pipeline.text_encoder(self._tokenize(text))[0]

    def schedule_encoding(self, parsed: ParsedPrompt, timesteps, default_rank: int):
        """Keys and values for every (step, layer): two K x L x S x D tensors, or None without concepts."""
        import torch

        from .spacetime import ConceptSlot, encode_schedule

        if not parsed.ranks:
            return None
        slots = {}
        for name, inline_rank in parsed.ranks.items():
            slot = self.slots[name]
            rank = inline_rank or default_rank
            slots[slot.token_id] = ConceptSlot(slot.token_id, slot.mapper, None if rank == FULL_RANK else rank)
        chunk = 256
        self.text_encoder_calls += -(-len(timesteps) * len(self.layer_names) // chunk)
        with torch.no_grad():
            return encode_schedule(
                self.base.pipeline.text_encoder, self._tokenize(parsed.text), timesteps,
                len(self.layer_names), slots, chunk_size=chunk,
            )

    def resolve_ranks(self, parsed: ParsedPrompt, default_rank: int) -> dict[str, int]:
        return {name: (rank or default_rank) for name, rank in parsed.ranks.items()}

    # ------------------------------------------------------------------ images

    def render(self, prompt: str, seeds: list[int], settings: RenderSettings) -> list[RenderedImage]:
        """Render one image per seed; the text conditioning is computed once for all of them."""
        return self._render(prompt, seeds, settings, decode=True)

    def latents(self, prompt: str, seeds: list[int], settings: RenderSettings):
        """The final latents (N x 4 x h x w) instead of images."""
        import torch

        return torch.cat(self._render(prompt, seeds, settings, decode=False))

    def _render(self, prompt: str, seeds: list[int], settings: RenderSettings, decode: bool):
        parsed = parse_prompt(prompt)
        unknown = [name for name in parsed.ranks if name not in self.slots]
        if unknown:
            raise BadInput(f"concept(s) {', '.join(unknown)} are not loaded for this render")
        pipe = self.base.pipeline
        width = settings.width or self.base.default_resolution
        height = settings.height or self.base.default_resolution
        scheduler = make_scheduler(settings.scheduler, pipe.scheduler.config)
        scheduler.set_timesteps(settings.steps, device=self.base.device)
        timesteps = scheduler.timesteps
        negative = self.plain_encoding(settings.negative)
        schedule = self.schedule_encoding(parsed, timesteps, settings.rank)
        # with concepts, every cross-attention layer reads the schedule instead
        positive = negative if schedule is not None else self.plain_encoding(parsed.text)
        ranks = self.resolve_ranks(parsed, settings.rank)
        results = []
        for start in range(0, len(seeds), settings.batch_size):
            batch_seeds = seeds[start : start + settings.batch_size]
            scheduler = make_scheduler(settings.scheduler, pipe.scheduler.config)
            scheduler.set_timesteps(settings.steps, device=self.base.device)
            latents = self._denoise(scheduler, batch_seeds, width, height, settings.cfg, negative, positive, schedule)
            if not decode:
                results.append(latents)
                continue
            for seed, image in zip(batch_seeds, self.decode(latents)):
                metadata = self.metadata(prompt, seed, width, height, settings, ranks)
                results.append(RenderedImage(image=image, prompt=prompt, seed=seed, ranks=ranks, metadata=metadata))
        return results

    def _denoise(self, scheduler, seeds, width, height, cfg, negative, positive, schedule):
        import torch
        from diffusers.utils.torch_utils import randn_tensor

        from .spacetime import SpaceTimeConditioning

        pipe, device = self.base.pipeline, self.base.device
        unet = pipe.unet
        batch = len(seeds)
        shape = (batch, unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        latents = randn_tensor(shape, generator=generators, device=torch.device(device), dtype=unet.dtype)
        latents = latents * scheduler.init_noise_sigma
        hidden = torch.cat([negative.expand(batch, -1, -1), positive.expand(batch, -1, -1)])  # 2B, S, D
        with torch.no_grad():
            for step_index, timestep in enumerate(scheduler.timesteps):
                model_input = scheduler.scale_model_input(torch.cat([latents] * 2), timestep)
                kwargs = None
                if schedule is not None:
                    keys, values = schedule[0][step_index], schedule[1][step_index]  # L, S, D
                    kwargs = {"spacetime": SpaceTimeConditioning(
                        keys=_with_uncond(negative, keys, batch), values=_with_uncond(negative, values, batch)
                    )}
                noise = unet(model_input, timestep, encoder_hidden_states=hidden, cross_attention_kwargs=kwargs).sample
                uncond, cond = noise.chunk(2)
                noise = uncond + cfg * (cond - uncond)
                latents = scheduler.step(noise, timestep, latents).prev_sample
        return latents

    def decode(self, latents) -> list:
        import torch

        pipe = self.base.pipeline
        with torch.no_grad():
            decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
        return pipe.image_processor.postprocess(decoded, output_type="pil")

    def metadata(self, prompt, seed, width, height, settings: RenderSettings, ranks) -> dict:
        concepts = {
            name: {"rank": ranks[name], "sha256": self.concepts[name][0].weights_sha256}
            for name in ranks
        }
        return {
            "prompt": prompt,
            "negative": settings.negative,
            "seed": seed,
            "steps": settings.steps,
            "cfg": settings.cfg,
            "scheduler": settings.scheduler,
            "width": width,
            "height": height,
            "base_model": self.base.spec,
            "concepts": concepts,
            "stc_version": __version__,
        }


def _with_uncond(negative, conditional, batch: int):
    """L x S x D conditional sequences -> L x 2B x S x D with the plain negative first (CFG)."""
    import torch

    layers = conditional.shape[0]
    uncond = negative.expand(layers, batch, *negative.shape[1:])
    cond = conditional.unsqueeze(1).expand(layers, batch, *conditional.shape[1:])
    return torch.cat([uncond, cond], dim=1)


def check_compatible(concept: Concept, base, layer_names: list[str]) -> None:
    if concept.text_width != base.text_width:
        raise ModelError(
            f"concept {concept.name!r} was trained for a text encoder of width {concept.text_width} "
            f"({concept.base_model}); {base.spec} has width {base.text_width}. Use --model {concept.base_model}"
        )
    if list(concept.layer_names) != list(layer_names):
        raise ModelError(
            f"concept {concept.name!r} was trained on a UNet with other cross-attention layers "
            f"({concept.base_model}); use --model {concept.base_model}"
        )


def a1111_parameters(metadata: dict) -> str:
    """The ``parameters`` text chunk in the layout A1111-style tools read."""
    sampler = SCHEDULERS[metadata["scheduler"]][1]
    fields = [
        f"Steps: {metadata['steps']}", f"Sampler: {sampler}", f"CFG scale: {metadata['cfg']}",
        f"Seed: {metadata['seed']}", f"Size: {metadata['width']}x{metadata['height']}",
        f"Model: {metadata['base_model']}",
    ]
    for name, info in metadata["concepts"].items():
        fields.append(f"stc concept {name}: rank {info['rank']}, sha256 {info['sha256'][:12]}")
    fields.append(f"stc version: {metadata['stc_version']}")
    lines = [metadata["prompt"]]
    if metadata["negative"]:
        lines.append(f"Negative prompt: {metadata['negative']}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def slug(text: str, limit: int = 40) -> str:
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return (words[:limit].rstrip("-")) or "image"


def free_path(folder: Path, stem: str, suffix: str = ".png") -> Path:
    """``folder/stem.png``, or ``stem-1.png``, ``stem-2.png``... if taken: never overwrite."""
    candidate = folder / f"{stem}{suffix}"
    counter = 1
    while candidate.exists():
        candidate = folder / f"{stem}-{counter}{suffix}"
        counter += 1
    return candidate


def save_png(rendered: RenderedImage, folder: Path, stem: str | None = None) -> Path:
    from PIL.PngImagePlugin import PngInfo

    folder.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    info.add_text("parameters", a1111_parameters(rendered.metadata))
    info.add_text("stc", json.dumps(rendered.metadata, sort_keys=True))
    rank_part = "-".join(f"r{rank}" for rank in rendered.ranks.values())
    stem = stem or "-".join(part for part in (slug(parse_prompt(rendered.prompt).text), f"s{rendered.seed}", rank_part) if part)
    path = free_path(folder, stem)
    rendered.image.save(path, pnginfo=info)
    return path


def load_concepts_for(prompts: list[str], registry: Registry) -> dict[str, tuple[Concept, object]]:
    """Load every concept referenced in ``prompts`` (registry errors propagate)."""
    names: dict[str, None] = {}
    for prompt in prompts:
        for name in parse_prompt(prompt).ranks:
            names[name] = None
    loaded = {}
    for name in names:
        concept = registry.load(name)
        loaded[name] = (concept, registry.load_mapper(concept))
    return loaded


def choose_model(concepts: dict[str, tuple[Concept, object]], model: str | None) -> str:
    """``model`` if given, else the one base model all concepts share."""
    if model:
        return model
    bases = {concept.base_model for concept, _ in concepts.values()}
    if len(bases) > 1:
        raise ModelError(
            f"the concepts in this prompt were trained on different base models ({', '.join(sorted(bases))}); "
            "pass --model to choose one"
        )
    if bases:
        return bases.pop()
    from .models import DEFAULT_MODEL

    return DEFAULT_MODEL
