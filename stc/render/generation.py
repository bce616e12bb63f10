"""Rendering images with concepts: the Renderer and its denoising loop.

CFG halves run as one UNet batch, and images that need different conditionings (other ranks,
other prompts) still share a batch: the per-layer key/value sequences are per sample. The
text side is ``conditioning.py``; the prompt grammar ``prompts.py``; PNG files ``pngmeta.py``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from .. import __version__
from ..errors import BadInput, ModelError
from ..method.conditioning import Conditioning, TextConditioner
from ..models.schedulers import check_scheduler, make_scheduler
from ..settings import MAX_SEED, Settings
from ..store.concept import Concept
from .prompts import parse_prompt, resolve_ranks, weighted_segments

# progress(done, total): denoising steps summed over images
ProgressCallback = Callable[[int, int], None]


@dataclass
class RenderSettings:
    steps: int = 50
    cfg: float = 7.5
    width: int | None = None  # None: the model's native resolution
    height: int | None = None
    scheduler: str = "dpm"
    negative: str = ""
    rank: int | None = None  # default rank of concepts without an inline rank (None: full)
    batch_size: int = 4
    init_image: str | None = None  # img2img: the photo to start from (a path), resized to the render's size
    strength: float = 0.75  # img2img: how much of the schedule runs (0: the photo, 1: all, as txt2img)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise BadInput(f"steps (--steps) must be at least 1, got {self.steps}")
        if self.batch_size < 1:
            raise BadInput(f"batch size (--batch-size) must be at least 1, got {self.batch_size}")
        if not math.isfinite(self.cfg):
            raise BadInput(f"cfg (--cfg) must be a finite number, got {self.cfg}")
        if not (math.isfinite(self.strength) and 0 <= self.strength <= 1):
            raise BadInput(f"strength (--strength) must lie between 0 (the photo as it is) and 1 (all steps), "
                           f"got {self.strength}")
        if self.rank is not None and self.rank < 1:
            raise BadInput(f"rank {self.rank} (--rank): ranks start at 1 (1..128 for concepts trained by stc)")
        for flag, value in (("--width", self.width), ("--height", self.height)):
            if value is not None and (value < 8 or value % 8):
                raise BadInput(f"{flag.removeprefix('--')} ({flag}) must be a positive multiple of 8, got {value}")
        check_scheduler(self.scheduler)
        from .loras import LORA_TAG

        if LORA_TAG.search(self.negative):
            raise BadInput("the negative prompt (--negative): <lora:…> tags apply to the whole render; put them in "
                           "the prompt or use --lora")
        try:  # a malformed <…> in --negative fails before anything loads
            parse_prompt(self.negative)
        except BadInput as exc:
            raise BadInput(f"the negative prompt (--negative): {exc}") from None

    @property
    def negative_concepts(self) -> list[str]:
        """The concepts (imported embeddings too: ``<easynegative>``) the negative prompt uses."""
        return list(parse_prompt(self.negative).ranks)


@dataclass
class RenderRequest:
    """One image to render: a prompt, a seed, and the default rank for its concepts."""

    prompt: str
    seed: int
    rank: int | None = None  # None: RenderSettings.rank

    def __post_init__(self) -> None:
        if not self.prompt.strip():  # before any model loads (the default one may be a download)
            raise BadInput('the prompt is empty: say what to render, e.g. stc gen "a <name> on the moon" (without '
                           "a <concept>, plain Stable Diffusion), or try --model builtin:shapes offline")
        if not 0 <= self.seed <= MAX_SEED:
            raise BadInput(f"seeds must lie between 0 and {MAX_SEED} (or be -1 on the command line: a random one), "
                           f"got {self.seed}")


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
    ranks: dict[str, int | None]  # None: a concept without ranks
    metadata: dict = field(default_factory=dict)
    key: tuple = ()  # which distinct image of a render this is


def resolve_negative(settings: RenderSettings, concepts: dict[str, Concept]) -> tuple[str, dict[str, int | None]]:
    """The negative prompt's text and its concepts' ranks: each concept's inline rank
    (``<easynegative:4>``), else its full rank (``--rank`` and a grid's columns are the prompt's)."""
    parsed = parse_prompt(settings.negative)
    unknown = [name for name in parsed.ranks if name not in concepts]
    if unknown:
        raise BadInput(f"concept(s) {', '.join(unknown)} of --negative are not loaded for this render")
    ranks = resolve_ranks(parsed, {name: concepts[name].rank_max for name in parsed.ranks}, None, "--negative")
    return parsed.text, ranks


def resolve_request(request: RenderRequest, settings: RenderSettings, concepts: dict[str, Concept]) -> _Job:
    """The concepts and ranks ``request`` needs; unknown concepts and bad ranks fail here."""
    parsed = parse_prompt(request.prompt)
    unknown = [name for name in parsed.ranks if name not in concepts]
    if unknown:
        raise BadInput(f"concept(s) {', '.join(unknown)} are not loaded for this render")
    rank_max = {name: concepts[name].rank_max for name in parsed.ranks}
    default, flag = (settings.rank, "--rank") if request.rank is None else (request.rank, "rank")
    ranks = resolve_ranks(parsed, rank_max, default, flag)
    return _Job(prompt=request.prompt, seed=request.seed, text=parsed.text, ranks=tuple(ranks.items()))


class Renderer:
    """A base model with concepts attached; renders prompts that reference them."""

    def __init__(self, base, concepts: dict[str, tuple[Concept, object]], loras=()):
        from ..method.encoding import ConceptSlot
        from ..method.placeholders import add_to_tokenizers, placeholder_tokens
        from ..method.spacetime import install_processors
        from .loras import check_lora_family, load_loras

        self.base = base
        pipe, backbone = base.pipeline, base.backbone
        self.backbone = backbone
        self.loras = list(loras)
        check_lora_family(self.loras, backbone, base.spec)
        load_loras(pipe, self.loras)  # peft wraps the layers' projections; stc's processors call them
        self._lora_hashes: dict[str, str] | None = None
        self.layer_names = install_processors(pipe.unet)
        self.concepts = {name: concept for name, (concept, _) in concepts.items()}
        self.notes = compatibility_notes(list(self.concepts.values()), base) if self.concepts else []
        slots, tokens = {}, {}
        for name, (concept, mapper) in concepts.items():
            check_compatible(concept, base, self.layer_names)
            tokens[name] = placeholder_tokens(concept.token, mapper.config.num_vectors)
            token_ids = add_to_tokenizers(backbone.tokenizers(pipe), tokens[name])
            slots[name] = ConceptSlot.of(token_ids, mapper.to(base.device))
        self.text = TextConditioner(
            backbone.text_encoders(pipe), backbone.tokenizers(pipe), base.device, slots, len(self.layer_names), tokens,
            zero_empty_negative=bool(pipe.config.get("force_zeros_for_empty_prompt", False)),
            segmenter=weighted_segments,
        )

    @classmethod
    def from_registry(
        cls, requests: list[RenderRequest], settings: RenderSettings, registry=None, model: str | None = None,
        model_config: str | None = None, device: str | None = None, dtype: str | None = None,
        on_status: Callable[[str], None] | None = None, env: Settings | None = None, loras=(),
    ) -> "Renderer":
        """Load the concepts ``requests`` use and their base model (or ``model``; ``env``: the
        environment's settings, e.g. the default model).

        Every request is resolved (concepts exist, ranks fit) before any weights load.
        """
        from ..models.base import canonical_spec, encoder_widths_of, load_base_model
        from ..store.conceptio import load_mapper
        from ..store.registry import Registry

        env = env or Settings.from_environment()
        registry = registry or Registry(env.home)
        names = dict.fromkeys(name for request in requests for name in parse_prompt(request.prompt).ranks)
        names.update(dict.fromkeys(settings.negative_concepts))
        concepts = {name: registry.load(name) for name in names}
        for request in requests:
            resolve_request(request, settings, concepts)
        resolve_negative(settings, concepts)
        spec = choose_model(list(concepts.values()), model, env)
        widths = encoder_widths_of(spec, model_config)  # from the model's config: no weights, no network
        if widths is not None:
            for concept in concepts.values():
                check_family(concept, canonical_spec(spec), widths)
            from ..models.backbones import backbone_for_widths
            from .loras import check_lora_family

            backbone = backbone_for_widths(widths)
            if backbone is not None:  # a LoRA of another family: before any weights load
                check_lora_family(list(loras), backbone, canonical_spec(spec))
        loaded = {name: (concept, load_mapper(concept)) for name, concept in concepts.items()}
        if on_status is not None:
            on_status(f"loading {spec}")
        return cls(load_base_model(spec, device=device, dtype=dtype, config=model_config, env=env), loaded, loras)

    # ------------------------------------------------------------------ text

    def condition(self, prompt: str, settings: RenderSettings, rank: int | None = None, negative=None) -> Conditioning:
        """The conditioning of ``prompt`` for the whole schedule of ``settings``.

        ``rank`` (default: settings.rank) applies to concepts without an inline rank;
        ``negative``: a precomputed plain encoding of settings.negative, to share it.
        """
        job = resolve_request(RenderRequest(prompt, seed=0, rank=rank), settings, self.concepts)
        timesteps = self.timesteps(settings)
        if negative is None:
            negative = self.negative(settings, timesteps)
        return self.text.condition(job.text, dict(job.ranks), timesteps, negative)

    def negative(self, settings: RenderSettings, timesteps):
        """The encoding of the negative prompt: the plain one (an Encoding), or, when it uses
        concepts, their conditioning for every (step, layer) of ``timesteps`` (a Conditioning),
        as the prompt's own."""
        text, ranks = resolve_negative(settings, self.concepts)
        if not ranks:
            return self.text.negative(settings.negative)
        return self.text.condition(text, ranks, timesteps, negative=None)

    def timesteps(self, settings: RenderSettings):
        """The scheduler's timesteps for ``settings`` (what the mapper receives at each step)."""
        return self._scheduler(settings).timesteps

    def _scheduler(self, settings: RenderSettings):
        scheduler = make_scheduler(settings.scheduler, self.base.pipeline.scheduler.config)
        scheduler.set_timesteps(settings.steps, device=self.base.device)
        return scheduler

    # ------------------------------------------------------------------ images

    def render(
        self, prompt: str, seeds: list[int], settings: RenderSettings, progress: ProgressCallback | None = None
    ) -> list[RenderedImage]:
        """Render one image per seed; the text conditioning is computed once for all of them."""
        return self.render_requests([RenderRequest(prompt, seed) for seed in seeds], settings, progress)

    def latents(self, prompt: str, seeds: list[int], settings: RenderSettings):
        """The final latents (N x 4 x h x w) instead of images."""
        import torch

        requests = [RenderRequest(prompt, seed) for seed in seeds]
        return torch.cat([latents for _, latents in self._denoise_requests(requests, settings)])

    def render_requests(
        self, requests: list[RenderRequest], settings: RenderSettings, progress: ProgressCallback | None = None
    ) -> list[RenderedImage]:
        """Render many (prompt, seed, rank) images, in order, sharing conditionings and batches.

        Each distinct (prompt, resolved ranks) is encoded once, just before its first batch,
        and dropped after its last; identical requests (e.g. a prompt without concepts at
        several ranks) are rendered once.
        """
        images = {rendered.key: rendered for rendered in self.iter_render(requests, settings, progress)}
        return [images[resolve_request(request, settings, self.concepts).image_key] for request in requests]

    def iter_render(
        self, requests: list[RenderRequest], settings: RenderSettings, progress: ProgressCallback | None = None
    ) -> Iterator[RenderedImage]:
        """Like :meth:`render_requests`, but yields each distinct image as soon as its batch is
        decoded (in first-request order) and keeps none: a caller that writes each one loses
        nothing finished when the render stops, and ``-n 10000`` holds one batch at a time."""
        width, height = self.size(settings)
        for jobs, latents in self._denoise_requests(requests, settings, progress):
            for job, image in zip(jobs, self.decode(latents)):
                ranks = dict(job.ranks)
                metadata = self.metadata(job.prompt, job.seed, width, height, settings, ranks)
                yield RenderedImage(image=image, prompt=job.prompt, seed=job.seed, ranks=ranks, metadata=metadata,
                                    key=job.image_key)

    def size(self, settings: RenderSettings) -> tuple[int, int]:
        native = self.base.default_resolution
        return settings.width or native, settings.height or native

    def check_size(self, settings: RenderSettings) -> None:
        """BadInput for a size far outside the model's range (``stc.models.sizes``), with the memory
        it would take; callers skip it when the user forces the size."""
        from ..models.sizes import check_size

        width, height = self.size(settings)
        vae = self.base.pipeline.vae
        check_size(width, height, "--width/--height", native=self.base.default_resolution,
                   element_bytes=vae.dtype.itemsize,
                   channels=int(vae.config.block_out_channels[0]), model=self.base.spec)

    def size_warnings(self, settings: RenderSettings) -> list[str]:
        """A note when the size is far from the model's own (more than 2x, or under half, on a
        side): such images come out broken, and a large one costs many times a native render."""
        native = self.base.default_resolution
        width, height = self.size(settings)
        if all(native / 2 <= side <= 2 * native for side in (width, height)):
            return []
        cost = width * height / native**2
        slower = f"; it costs about {cost:.0f}x the time and memory of a native one" if cost >= 2 else ""
        return [f"{width}x{height} px is far from {self.base.spec}'s {native} px (it was trained at that size), so "
                f"expect broken images{slower}"]

    def _denoise_requests(
        self, requests: list[RenderRequest], settings: RenderSettings, progress: ProgressCallback | None = None
    ) -> Iterable[tuple[list[_Job], object]]:
        """Yield (jobs, latents) per batch of distinct jobs, in first-request order."""
        distinct: dict[tuple, _Job] = {}
        for request in requests:
            self.check_lora_tags(request.prompt)
            job = resolve_request(request, settings, self.concepts)
            distinct.setdefault(job.image_key, job)  # first occurrence order, duplicates dropped
        jobs = list(distinct.values())
        last_use = {job.conditioning_key: index for index, job in enumerate(jobs)}
        scheduler = self._scheduler(settings)  # one per render; each batch restarts its schedule
        # PNDM's warm-up makes 11 UNet calls of --steps 10; img2img runs the last ones only
        calls_per_image = max(len(scheduler.timesteps) - img2img_start(scheduler, settings), 1)
        total, done = len(jobs) * settings.steps, 0  # progress counts the user's steps
        negative = self.negative(settings, scheduler.timesteps)
        conditionings: dict[tuple, Conditioning] = {}
        for start in range(0, len(jobs), settings.batch_size):
            batch = jobs[start : start + settings.batch_size]
            for job in batch:
                if job.conditioning_key not in conditionings:
                    conditionings[job.conditioning_key] = self.text.condition(
                        job.text, dict(job.ranks), scheduler.timesteps, negative
                    )
            on_step = None
            if progress is not None:
                on_step = functools.partial(_report_progress, progress, done, len(batch), total,
                                            settings.steps, calls_per_image)
            per_sample = [conditionings[job.conditioning_key] for job in batch]
            latents = self._denoise(scheduler, settings, [job.seed for job in batch], per_sample, on_step)
            done += settings.steps * len(batch)
            stop = start + len(batch)
            for key in [key for key in conditionings if last_use[key] < stop]:
                del conditionings[key]
            yield batch, latents

    def _denoise(self, scheduler, settings: RenderSettings, seeds, conditionings: list[Conditioning], on_step=None):
        import torch
        from diffusers.utils.torch_utils import randn_tensor

        from ..method.spacetime import SpaceTimeConditioning

        pipe, device = self.base.pipeline, self.base.device
        unet = pipe.unet
        scheduler.set_timesteps(settings.steps, device=device)  # resets the multistep history
        width, height = self.size(settings)
        shape = (len(seeds), unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        first = img2img_start(scheduler, settings)
        if first == 0:  # txt2img (and img2img at strength 1): the schedule from pure noise
            latents = randn_tensor(shape, generator=generators, device=torch.device(device), dtype=unet.dtype)
            latents = latents * scheduler.init_noise_sigma
        else:
            latents = self._photo_latents(scheduler, settings, generators, shape, first).to(unet.dtype)
        unconditional = uncond_conditionings(conditionings)  # the negative prompt's, as conditionings
        both_halves = unconditional + list(conditionings)  # CFG: the negative half first
        use_spacetime = any(c.keys is not None for c in both_halves)
        hidden = pooled = None
        if not use_spacetime:
            hidden = torch.cat([c.positive.keys for c in both_halves])  # 2B, S, D
            pooled = _pooled_batch([c.positive for c in both_halves])  # 2B, P (SDXL) or None
        num_layers = len(self.layer_names)
        with torch.no_grad():
            for step_index, timestep in enumerate(scheduler.timesteps[first:], start=first):
                model_input = scheduler.scale_model_input(torch.cat([latents] * 2), timestep)
                kwargs = None
                if use_spacetime:
                    uncond_keys, uncond_values, uncond_pooled = stack_step(unconditional, step_index, num_layers)
                    keys, values, pooled = stack_step(conditionings, step_index, num_layers)  # L, B, S, D; B, P
                    kwargs = {"spacetime": SpaceTimeConditioning(
                        keys=torch.cat([uncond_keys.to(keys.dtype), keys], dim=1),  # L, 2B, S, D
                        values=torch.cat([uncond_values.to(values.dtype), values], dim=1),
                    )}
                    hidden = kwargs["spacetime"].keys[0]  # read by no layer; sets the batch shape
                    if pooled is not None:  # the negative prompt's first, then each sample's at the step
                        pooled = torch.cat([uncond_pooled.to(pooled.dtype), pooled])
                added_kwargs = None
                if pooled is not None:
                    added_kwargs = self.backbone.added_conditioning(pooled, height, width)
                noise = unet(model_input, timestep, encoder_hidden_states=hidden, cross_attention_kwargs=kwargs,
                             added_cond_kwargs=added_kwargs).sample
                uncond, cond = noise.chunk(2)
                noise = uncond + settings.cfg * (cond - uncond)
                latents = scheduler.step(noise, timestep, latents).prev_sample
                if on_step is not None:
                    on_step(step_index + 1 - first)
        return latents

    def _photo_latents(self, scheduler, settings: RenderSettings, generators, shape, first: int):
        """img2img's first latents, as StableDiffusionImg2ImgPipeline makes them: the photo's VAE
        latents (a sample of its posterior, each image's from its seed's generator), noised to the
        first timestep that runs (``first``: its index in the schedule; none left at strength 0)
        with noise drawn next from the same generator."""
        import torch
        from diffusers.utils.torch_utils import randn_tensor

        pipe, device = self.base.pipeline, torch.device(self.base.device)
        width, height = self.size(settings)
        photo = pipe.image_processor.preprocess(load_init_image(settings.init_image), height=height, width=width)
        vae = pipe.vae
        with torch.no_grad():
            posterior = vae.encode(photo.to(device, vae.dtype)).latent_dist
        init = torch.cat([posterior.sample(generator=generator) for generator in generators])
        init = init * vae.config.scaling_factor  # B, C, h, w
        noise = randn_tensor(shape, generator=generators, device=device, dtype=init.dtype)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(first)
        timesteps = scheduler.timesteps[first:]
        if len(timesteps) == 0:  # strength 0: the photo's latents as they are
            return init
        return scheduler.add_noise(init, noise, timesteps[:1].repeat(shape[0]))

    def decode(self, latents) -> list:
        import torch

        pipe = self.base.pipeline
        with torch.no_grad():
            decoded = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample
        return pipe.image_processor.postprocess(decoded, output_type="pil")

    def metadata(self, prompt, seed, width, height, settings: RenderSettings, ranks) -> dict:
        ranks = {**resolve_negative(settings, self.concepts)[1], **ranks}  # the negative prompt's concepts too
        concepts = {name: {"rank": ranks[name], "sha256": self.concepts[name].weights_sha256} for name in ranks}
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
            **({"init_image": str(settings.init_image), "strength": settings.strength}
               if settings.init_image is not None else {}),
            **({"loras": self.lora_records()} if self.loras else {}),
        }

    def check_lora_tags(self, prompt: str) -> None:
        """A ``<lora:NAME>`` tag of ``prompt`` that names none of this render's LoRAs is an error (it
        would render without it): a library caller passes the LoRAs (``loras=``, ``render_loras``)."""
        from .loras import strip_lora_tags

        loaded = {lora.name: lora.weight for lora in self.loras}
        for name, weight in strip_lora_tags(prompt)[1].items():
            if loaded.get(name) != weight:
                raise BadInput(f"<lora:{name}:{weight:g}> is not loaded in this render (its LoRAs: "
                               f"{', '.join(lora.tag for lora in self.loras) or 'none'}); pass it in loras=")

    def lora_records(self) -> list[dict]:
        """Each LoRA of this render: name, weight, file and the webui's hash of it (computed once)."""
        from .loras import lora_hash

        if self._lora_hashes is None:
            self._lora_hashes = {lora.name: lora_hash(lora.path) for lora in self.loras}
        return [{"name": lora.name, "weight": lora.weight, "path": str(lora.path), "hash": self._lora_hashes[lora.name]}
                for lora in self.loras]


def img2img_start(scheduler, settings: RenderSettings) -> int:
    """The index in ``scheduler``'s timesteps of the first one that runs: 0 without a photo and at
    strength 1 (all of them, from pure noise: txt2img); else diffusers' img2img rule: the last
    int(steps x strength) steps (all of them at strength 0 skipped)."""
    if settings.init_image is None or settings.strength >= 1:
        return 0
    run = min(int(settings.steps * settings.strength), settings.steps)
    return (settings.steps - run) * scheduler.order


def load_init_image(path):
    """The img2img photo at ``path`` as an RGB PIL image (turned as its EXIF says); a file that is no
    image is a one-line error."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except FileNotFoundError:
        raise BadInput(f"the init image (--init-image): {path} does not exist") from None
    except (OSError, UnidentifiedImageError) as exc:
        raise BadInput(f"the init image (--init-image): cannot read {path} as an image: {exc}") from None


def _report_progress(progress: ProgressCallback, done_before: int, batch: int, total: int, steps: int,
                     calls_per_image: int, calls_done: int) -> None:
    """Progress in the user's steps: after ``calls_done`` of a schedule's ``calls_per_image`` UNet
    calls (more than ``steps`` for PNDM), that fraction of ``steps``, rounded down."""
    progress(done_before + calls_done * steps // calls_per_image * batch, total)


def stack_step(conditionings: list[Conditioning], step_index: int, num_layers: int):
    """Per-sample keys and values of one step, L x B x S x D each (a view when all samples share
    one), and their pooled embeddings (B x P; None for models without one)."""
    import torch

    batch = len(conditionings)
    first = conditionings[0]
    if all(c is first for c in conditionings):
        keys, values, pooled = first.at_step(step_index, num_layers)
        pooled = pooled.unsqueeze(0).expand(batch, -1) if pooled is not None else None
        return keys.unsqueeze(1).expand(-1, batch, -1, -1), values.unsqueeze(1).expand(-1, batch, -1, -1), pooled
    steps = [c.at_step(step_index, num_layers) for c in conditionings]
    pooled = torch.stack([p for _, _, p in steps]) if steps[0][2] is not None else None
    return torch.stack([k for k, _, _ in steps], dim=1), torch.stack([v for _, v, _ in steps], dim=1), pooled


def uncond_conditionings(conditionings: list[Conditioning]) -> list[Conditioning]:
    """The negative prompt of each sample as a Conditioning: its own per (step, layer) one when it
    uses concepts, else its plain encoding read by every layer (one object per distinct negative,
    so :func:`stack_step` shares it)."""
    wrapped: dict[int, Conditioning] = {}
    result = []
    for conditioning in conditionings:
        negative = conditioning.negative
        if not isinstance(negative, Conditioning):
            if id(negative) not in wrapped:
                wrapped[id(negative)] = Conditioning(ranks={}, negative=None, positive=negative)
            negative = wrapped[id(negative)]
        result.append(negative)
    return result


def with_uncond(negative, conditional):
    """L x B x S x D conditional sequences -> L x 2B x S x D with the plain negative first (CFG)."""
    import torch

    layers = conditional.shape[0]
    uncond = negative.unsqueeze(0).expand(layers, -1, -1, -1).to(conditional.dtype)
    return torch.cat([uncond, conditional], dim=1)


def _pooled_batch(encodings) -> object | None:
    """The pooled embeddings of these encodings (1 x P each) as one B x P batch; None for a model without them."""
    import torch

    pooled = [encoding.pooled for encoding in encodings]
    return torch.cat(pooled) if pooled[0] is not None else None


def check_family(concept: Concept, spec: str, widths) -> None:
    """A concept for other text encoders than model ``spec``'s (of ``widths``) is a one-line error
    naming both families; :meth:`Renderer.from_registry` asks this before any weights load when
    the model's config tells its widths."""
    from ..models.backbones import label_of_widths

    widths = [int(width) for width in widths]
    if concept.encoder_widths != widths:
        ours, theirs = label_of_widths(concept.encoder_widths), label_of_widths(widths)
        if ours == theirs:  # the same layout at other widths
            ours, theirs = f"{ours} at text width {concept.text_width}", f"{theirs} at text width {sum(widths)}"
        raise ModelError(
            f"concept {concept.name!r} is for {ours} (trained on {concept.base_model}); {spec} is {theirs}. "
            f"Use --model {concept.base_model}"
        )


def check_compatible(concept: Concept, base, layer_names: list[str]) -> None:
    check_family(concept, base.spec, base.encoder_widths)
    if list(concept.layer_names) != list(layer_names):
        raise ModelError(
            f"concept {concept.name!r} was trained on a UNet with other cross-attention layers "
            f"({len(concept.layer_names)} in {concept.base_model}; {base.spec} has {len(layer_names)} others); "
            f"use --model {concept.base_model}"
        )


def compatibility_notes(concepts: list[Concept], base) -> list[str]:
    """One line per concept trained on another (but compatible) base model than ``base``."""
    from ..models.base import same_embeddings

    return [
        f"{concept.name} was trained on {concept.base_model}; {base.spec} has the same layout but other token "
        "embeddings (a fine-tune?), so it renders, possibly less faithfully"
        for concept in concepts
        if concept.base_fingerprint and same_embeddings(concept.base_fingerprint, base.pipeline) is False
    ]


def choose_model(concepts: list[Concept], model: str | None, env: Settings | None = None) -> str:
    """``model`` if given, else the one base model all concepts share, else the default model."""
    from ..models.backbones import label_of_widths

    layouts = {tuple(concept.encoder_widths): concept for concept in concepts}
    if len(layouts) > 1:  # no model fits both: --model cannot help
        first, second = list(layouts.values())[:2]
        raise ModelError(
            f"concepts {first.name!r} ({label_of_widths(first.encoder_widths)}, trained on {first.base_model}) and "
            f"{second.name!r} ({label_of_widths(second.encoder_widths)}, trained on {second.base_model}) cannot "
            "render together: they are for different model families (text encoders); render them in separate "
            "prompts"
        )
    if model:
        return model
    bases = {concept.base_model for concept in concepts}
    if len(bases) > 1:
        raise ModelError(
            f"the concepts in this prompt were trained on different base models ({', '.join(sorted(bases))}); "
            "pass --model to choose one"
        )
    if bases:
        return bases.pop()
    return (env or Settings.from_environment()).default_model()
