"""Rendering images with concepts: prompt parsing, the denoising loop, PNG files.

Speed (DESIGN.md §2, "Fast paths"): the text conditioning of a prompt at one set of ranks is
computed once for the whole schedule — every (step, layer) in ceil(K·L / 256) batched
text-encoder calls — and shared by every image that uses it; the negative prompt is encoded
once per render call. CFG halves run as one UNet batch, and images that need different
conditionings (other ranks, other prompts) still share a batch: the per-layer key/value
sequences are per sample.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .errors import BadInput, ModelError
from .registry import Concept, Registry

CONCEPT_REF = re.compile(r"<([a-z0-9][a-z0-9_-]{0,63})(?::(\d+))?>")
_ANY_CASE_REF = re.compile(r"<([A-Za-z0-9][A-Za-z0-9_-]{0,63})(?::(\d+))?>")
SCHEDULERS = {  # --scheduler: (diffusers class, A1111 sampler name)
    "dpm": ("DPMSolverMultistepScheduler", "DPM++ 2M"),
    "ddim": ("DDIMScheduler", "DDIM"),
    "euler": ("EulerDiscreteScheduler", "Euler"),
    "pndm": ("PNDMScheduler", "PLMS"),
}
FULL_RANK = 128
SCHEDULE_CHUNK = 256  # (step, layer) rows per text-encoder call

# progress(done, total): denoising steps summed over images
ProgressCallback = Callable[[int, int], None]


# --------------------------------------------------------------------------- prompts


@dataclass
class ParsedPrompt:
    """A prompt with ``<name>`` / ``<name:rank>`` references resolved to ``<name>`` tokens."""

    text: str
    ranks: dict[str, int | None]  # concept name -> inline rank (None: use the default)


def parse_prompt(prompt: str) -> ParsedPrompt:
    """Find the concepts of ``prompt``; ``<name:8>`` sets that concept's rank inline."""
    for match in _ANY_CASE_REF.finditer(prompt):
        if match.group(1) != match.group(1).lower():
            raise BadInput(
                f"concept names are lower-case: write <{match.group(1).lower()}>, not <{match.group(1)}>"
            )
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


def resolve_ranks(parsed: ParsedPrompt, default_rank: int) -> dict[str, int]:
    """Each concept's rank: its inline rank, else ``default_rank``."""
    return {name: (rank or default_rank) for name, rank in parsed.ranks.items()}


def make_scheduler(name: str, config):
    import diffusers

    if name not in SCHEDULERS:
        raise BadInput(f"--scheduler must be one of {', '.join(SCHEDULERS)}, not {name!r}")
    overrides = {"skip_prk_steps": True} if name == "pndm" else {}  # as SD's own PNDM config; PRK needs >= 4 steps
    return getattr(diffusers, SCHEDULERS[name][0]).from_config(config, **overrides)


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
        check_rank(self.rank, "--rank")
        for flag, value in (("--width", self.width), ("--height", self.height)):
            if value is not None and (value < 8 or value % 8):
                raise BadInput(f"{flag} must be a positive multiple of 8, got {value}")
        if self.scheduler not in SCHEDULERS:
            raise BadInput(f"--scheduler must be one of {', '.join(SCHEDULERS)}, not {self.scheduler!r}")
        if CONCEPT_REF.search(self.negative):
            raise BadInput("--negative cannot use concepts (<name>); write the negative prompt in plain words")


def check_rank(rank: int, flag: str) -> None:
    if not 1 <= rank <= FULL_RANK:
        raise BadInput(f"{flag} must be between 1 and {FULL_RANK}, got {rank}")


@dataclass
class RenderRequest:
    """One image to render: a prompt, a seed, and the default rank for its concepts."""

    prompt: str
    seed: int
    rank: int | None = None  # None: RenderSettings.rank


@dataclass(frozen=True)
class _Job:
    """A request resolved: which conditioning it needs and which image it is."""

    prompt: str  # as given (inline ranks included): what the metadata records
    seed: int
    text: str  # the prompt with inline ranks stripped: what the text encoder reads
    ranks: tuple[tuple[str, int], ...]  # resolved rank per concept

    @property
    def conditioning_key(self) -> tuple:
        return (self.text, self.ranks)

    @property
    def image_key(self) -> tuple:
        return (self.prompt, self.ranks, self.seed)


@dataclass
class RenderedImage:
    image: object  # PIL.Image.Image
    prompt: str
    seed: int
    ranks: dict[str, int]
    metadata: dict = field(default_factory=dict)


@dataclass
class Conditioning:
    """The text conditioning of one prompt at one set of ranks, for one schedule.

    negative, positive: 1 x S x D stock encodings (the positive one is what every layer reads
    when the prompt names no concept). keys, values: K x L x S x D per (step, layer) sequences
    without and with the textual bypass, or None without concepts.
    """

    ranks: dict[str, int]
    negative: object
    positive: object
    keys: object | None = None
    values: object | None = None

    def at_step(self, step_index: int, num_layers: int):
        """Keys and values (L x S x D each) of one denoising step."""
        if self.keys is None:
            plain = self.positive.expand(num_layers, -1, -1)
            return plain, plain
        return self.keys[step_index], self.values[step_index]


# --------------------------------------------------------------------------- rendering


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

    # ------------------------------------------------------------------ text

    def _tokenize(self, text: str):
        tokenizer = self.base.pipeline.tokenizer
        ids = tokenizer(
            [text], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids
        return ids.to(self.base.device)  # 1, S

    def plain_encoding(self, text: str):
        """The stock text encoding of ``text`` (1 x S x D): one text-encoder call."""
        import torch

        with torch.no_grad():
            return self.base.pipeline.text_encoder(self._tokenize(text))[0]

    def timesteps(self, settings: RenderSettings):
        scheduler = make_scheduler(settings.scheduler, self.base.pipeline.scheduler.config)
        scheduler.set_timesteps(settings.steps, device=self.base.device)
        return scheduler.timesteps

    def condition(self, prompt: str, settings: RenderSettings, rank: int | None = None, negative=None) -> Conditioning:
        """The conditioning of ``prompt`` for the whole schedule of ``settings``.

        ``rank`` (default: settings.rank) applies to concepts without an inline rank;
        ``negative``: a precomputed plain encoding of settings.negative, to share it.
        """
        job = self._job(RenderRequest(prompt, seed=0, rank=rank), settings)
        if negative is None:
            negative = self.plain_encoding(settings.negative)
        return self._condition_job(job, settings, negative)

    def schedule_encoding(self, parsed: ParsedPrompt, timesteps, ranks: dict[str, int]):
        """Keys and values for every (step, layer): two K x L x S x D tensors.

        Repeated timesteps (PNDM's warm-up) are encoded once.
        """
        import torch

        from .spacetime import ConceptSlot, encode_schedule

        input_ids = self._tokenize(parsed.text)
        slots = {}
        for name in parsed.ranks:
            slot = self.slots[name]
            if not bool((input_ids == slot.token_id).any()):
                limit = self.base.pipeline.tokenizer.model_max_length
                raise BadInput(f"<{name}> falls beyond the text encoder's {limit} tokens; shorten the prompt")
            rank = ranks[name]
            slots[slot.token_id] = ConceptSlot(slot.token_id, slot.mapper, None if rank == FULL_RANK else rank)
        unique, inverse = torch.unique(timesteps, return_inverse=True)
        repeated = unique.shape[0] < timesteps.shape[0]
        with torch.no_grad():
            keys, values = encode_schedule(
                self.base.pipeline.text_encoder, input_ids, unique if repeated else timesteps,
                len(self.layer_names), slots, chunk_size=SCHEDULE_CHUNK,
            )
        return (keys[inverse], values[inverse]) if repeated else (keys, values)

    def _check_loaded(self, parsed: ParsedPrompt) -> None:
        unknown = [name for name in parsed.ranks if name not in self.slots]
        if unknown:
            raise BadInput(f"concept(s) {', '.join(unknown)} are not loaded for this render")

    # ------------------------------------------------------------------ images

    def render(
        self, prompt: str, seeds: list[int], settings: RenderSettings, progress: ProgressCallback | None = None
    ) -> list[RenderedImage]:
        """Render one image per seed; the text conditioning is computed once for all of them."""
        requests = [RenderRequest(prompt, seed, settings.rank) for seed in seeds]
        return self.render_requests(requests, settings, progress)

    def latents(self, prompt: str, seeds: list[int], settings: RenderSettings):
        """The final latents (N x 4 x h x w) instead of images."""
        import torch

        requests = [RenderRequest(prompt, seed, settings.rank) for seed in seeds]
        return torch.cat([latents for _, latents in self._denoise_requests(requests, settings)])

    def render_requests(
        self, requests: list[RenderRequest], settings: RenderSettings, progress: ProgressCallback | None = None
    ) -> list[RenderedImage]:
        """Render many (prompt, seed, rank) images, in order, sharing conditionings and batches.

        Each distinct (prompt, resolved ranks) is encoded once, just before its first batch,
        and dropped after its last; identical requests (e.g. a prompt without concepts at
        several ranks) are rendered once.
        """
        width, height = self.size(settings)
        images: dict[tuple, RenderedImage] = {}
        for jobs, latents in self._denoise_requests(requests, settings, progress):
            for job, image in zip(jobs, self.decode(latents)):
                ranks = dict(job.ranks)
                metadata = self.metadata(job.prompt, job.seed, width, height, settings, ranks)
                images[job.image_key] = RenderedImage(
                    image=image, prompt=job.prompt, seed=job.seed, ranks=ranks, metadata=metadata
                )
        return [images[self._job(request, settings).image_key] for request in requests]

    def size(self, settings: RenderSettings) -> tuple[int, int]:
        native = self.base.default_resolution
        return settings.width or native, settings.height or native

    def _job(self, request: RenderRequest, settings: RenderSettings) -> _Job:
        rank = settings.rank if request.rank is None else request.rank
        check_rank(rank, "rank")
        parsed = parse_prompt(request.prompt)
        self._check_loaded(parsed)
        ranks = tuple(resolve_ranks(parsed, rank).items())
        return _Job(prompt=request.prompt, seed=request.seed, text=parsed.text, ranks=ranks)

    def _denoise_requests(
        self, requests: list[RenderRequest], settings: RenderSettings, progress: ProgressCallback | None = None
    ) -> Iterable[tuple[list[_Job], object]]:
        """Yield (jobs, latents) per batch of distinct jobs, in first-request order."""
        distinct: dict[tuple, _Job] = {}
        for request in requests:
            job = self._job(request, settings)
            distinct.setdefault(job.image_key, job)  # first occurrence order, duplicates dropped
        jobs = list(distinct.values())
        last_use = {job.conditioning_key: index for index, job in enumerate(jobs)}
        width, height = self.size(settings)
        steps_per_image = len(self.timesteps(settings))
        total, done = len(jobs) * steps_per_image, 0
        negative = self.plain_encoding(settings.negative)
        conditionings: dict[tuple, Conditioning] = {}
        for start in range(0, len(jobs), settings.batch_size):
            batch = jobs[start : start + settings.batch_size]
            for job in batch:
                if job.conditioning_key not in conditionings:
                    conditionings[job.conditioning_key] = self._condition_job(job, settings, negative)
            per_sample = [conditionings[job.conditioning_key] for job in batch]

            on_step = None
            if progress is not None:
                on_step = functools.partial(_report_progress, progress, done, len(batch), total)
            latents = self._denoise(settings, [job.seed for job in batch], width, height, per_sample, on_step)
            done += steps_per_image * len(batch)
            stop = start + len(batch)
            for key in [key for key in conditionings if last_use[key] < stop]:
                del conditionings[key]
            yield batch, latents

    def _condition_job(self, job: _Job, settings: RenderSettings, negative) -> Conditioning:
        parsed = parse_prompt(job.text)
        ranks = dict(job.ranks)
        if not ranks:
            return Conditioning(ranks={}, negative=negative, positive=self.plain_encoding(parsed.text))
        keys, values = self.schedule_encoding(parsed, self.timesteps(settings), ranks)
        return Conditioning(ranks=ranks, negative=negative, positive=None, keys=keys, values=values)

    def _denoise(self, settings: RenderSettings, seeds, width, height, conditionings: list[Conditioning], on_step=None):
        import torch
        from diffusers.utils.torch_utils import randn_tensor

        from .spacetime import SpaceTimeConditioning

        pipe, device = self.base.pipeline, self.base.device
        unet = pipe.unet
        scheduler = make_scheduler(settings.scheduler, pipe.scheduler.config)
        scheduler.set_timesteps(settings.steps, device=device)
        batch = len(seeds)
        shape = (batch, unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        latents = randn_tensor(shape, generator=generators, device=torch.device(device), dtype=unet.dtype)
        latents = latents * scheduler.init_noise_sigma
        negative = torch.cat([c.negative for c in conditionings])  # B, S, D
        use_spacetime = any(c.keys is not None for c in conditionings)
        hidden = None
        if not use_spacetime:
            hidden = torch.cat([negative, torch.cat([c.positive for c in conditionings])])  # 2B, S, D
        num_layers = len(self.layer_names)
        with torch.no_grad():
            for step_index, timestep in enumerate(scheduler.timesteps):
                model_input = scheduler.scale_model_input(torch.cat([latents] * 2), timestep)
                kwargs = None
                if use_spacetime:
                    keys, values = _stack_step(conditionings, step_index, num_layers)  # L, B, S, D
                    kwargs = {"spacetime": SpaceTimeConditioning(
                        keys=_with_uncond(negative, keys), values=_with_uncond(negative, values)
                    )}
                    hidden = kwargs["spacetime"].keys[0]  # read by no layer; sets the batch shape
                noise = unet(model_input, timestep, encoder_hidden_states=hidden, cross_attention_kwargs=kwargs).sample
                uncond, cond = noise.chunk(2)
                noise = uncond + settings.cfg * (cond - uncond)
                latents = scheduler.step(noise, timestep, latents).prev_sample
                if on_step is not None:
                    on_step(step_index + 1)
        return latents

    def decode(self, latents) -> list:
        import torch

        pipe = self.base.pipeline
        with torch.no_grad():
            decoded = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample
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
            "dtype": str(self.base.dtype).removeprefix("torch."),
            "concepts": concepts,
            "stc_version": __version__,
        }


def _report_progress(progress: ProgressCallback, done_before: int, batch: int, total: int, steps_done: int) -> None:
    progress(done_before + steps_done * batch, total)


def _stack_step(conditionings: list[Conditioning], step_index: int, num_layers: int):
    """Per-sample keys and values of one step: L x B x S x D each (a view when all samples share one)."""
    import torch

    batch = len(conditionings)
    first = conditionings[0]
    if all(c is first for c in conditionings):
        keys, values = first.at_step(step_index, num_layers)
        return keys.unsqueeze(1).expand(-1, batch, -1, -1), values.unsqueeze(1).expand(-1, batch, -1, -1)
    pairs = [c.at_step(step_index, num_layers) for c in conditionings]
    return torch.stack([k for k, _ in pairs], dim=1), torch.stack([v for _, v in pairs], dim=1)


def _with_uncond(negative, conditional):
    """L x B x S x D conditional sequences -> L x 2B x S x D with the plain negative first (CFG)."""
    import torch

    layers = conditional.shape[0]
    uncond = negative.unsqueeze(0).expand(layers, -1, -1, -1).to(conditional.dtype)
    return torch.cat([uncond, conditional], dim=1)


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


# --------------------------------------------------------------------------- PNG metadata

_A1111_FIELD = re.compile(r'\s*(\w[\w \-/.]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_CONCEPT_FIELD = re.compile(r"stc concept ([a-z0-9][a-z0-9_-]*)")
_CONCEPT_VALUE = re.compile(r"rank (\d+)(?: sha256 ([0-9a-f]*))?")


def _quote(value: object) -> str:
    """A1111's quoting: values with commas, colons or newlines become JSON strings."""
    text = str(value)
    if any(char in text for char in ',:\n"'):
        return json.dumps(text)
    return text


def a1111_parameters(metadata: dict) -> str:
    """The ``parameters`` text chunk in the layout A1111-style tools read.

    ``prompt``, ``Negative prompt: ...``, then one line of ``Key: value`` fields.
    """
    sampler = SCHEDULERS[metadata["scheduler"]][1]
    fields = [
        ("Steps", metadata["steps"]), ("Sampler", sampler), ("CFG scale", metadata["cfg"]),
        ("Seed", metadata["seed"]), ("Size", f"{metadata['width']}x{metadata['height']}"),
        ("Model", metadata["base_model"]),
    ]
    for name, info in metadata["concepts"].items():
        value = f"rank {info['rank']}" + (f" sha256 {info['sha256']}" if info.get("sha256") else "")
        fields.append((f"stc concept {name}", value))
    fields.append(("stc scheduler", metadata["scheduler"]))
    fields.append(("stc version", metadata["stc_version"]))
    lines = [metadata["prompt"]]
    if metadata["negative"]:
        lines.append(f"Negative prompt: {metadata['negative']}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in fields))
    return "\n".join(lines)


def parse_parameters(text: str) -> dict:
    """Read a ``parameters`` chunk back into stc's metadata keys (what A1111 layouts hold).

    Returns prompt, negative, steps, cfg, seed, width, height, scheduler, base_model,
    concepts ({name: {rank, sha256}}), stc_version, plus ``extra`` for unknown fields.
    """
    *prompt_lines, field_line = text.split("\n")
    prompt, negative, in_negative = [], [], False
    for line in prompt_lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    fields = {}
    for key, value in _A1111_FIELD.findall(field_line):
        fields[key.strip()] = json.loads(value) if value.startswith('"') else value.strip()
    samplers = {sampler: name for name, (_, sampler) in SCHEDULERS.items()}
    width, _, height = fields.pop("Size", "x").partition("x")
    result = {
        "prompt": "\n".join(prompt),
        "negative": "\n".join(negative),
        "steps": int(fields.pop("Steps")),
        "cfg": float(fields.pop("CFG scale")),
        "seed": int(fields.pop("Seed")),
        "width": int(width),
        "height": int(height),
        "base_model": fields.pop("Model", ""),
        "concepts": {},
        "stc_version": fields.pop("stc version", ""),
    }
    sampler = fields.pop("Sampler", "")
    result["scheduler"] = fields.pop("stc scheduler", samplers.get(sampler, sampler))
    for key in list(fields):
        name, value = _CONCEPT_FIELD.fullmatch(key), _CONCEPT_VALUE.fullmatch(fields[key])
        if name and value:
            result["concepts"][name.group(1)] = {"rank": int(value.group(1)), "sha256": value.group(2) or ""}
            del fields[key]
    result["extra"] = fields
    return result


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


def png_info(metadata: dict, extra: dict[str, str] | None = None):
    """PNG text chunks: ``parameters`` (A1111 layout) and ``stc`` (the full record as JSON)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", a1111_parameters(metadata))
    info.add_text("stc", json.dumps(metadata, sort_keys=True))
    for key, value in (extra or {}).items():
        info.add_text(key, value)
    return info


def default_stem(rendered: RenderedImage) -> str:
    rank_part = "-".join(f"r{rank}" for rank in rendered.ranks.values())
    parts = (slug(parse_prompt(rendered.prompt).text), f"s{rendered.seed}", rank_part)
    return "-".join(part for part in parts if part)


def save_png(rendered: RenderedImage, folder: Path, stem: str | None = None) -> Path:
    """Save with its metadata as ``folder/stem.png``, at a free name (never overwrites)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = free_path(folder, stem or default_stem(rendered))
    rendered.image.save(path, pnginfo=png_info(rendered.metadata))
    return path


# --------------------------------------------------------------------------- loading


def load_concepts_for(prompts: list[str], registry: Registry) -> dict[str, tuple[Concept, object]]:
    """Load every concept referenced in ``prompts`` (registry errors, e.g. close names, propagate)."""
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
