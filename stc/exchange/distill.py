"""Distilling a neural space-time concept into plain textual-inversion vectors.

A concept gives its placeholder a token embedding and a textual bypass per (timestep t,
cross-attention layer l). Plain textual inversion (diffusers ``load_textual_inversion``,
A1111, ComfyUI) gives it n fixed input embeddings, used identically at every step and layer,
with no bypass. :func:`distil` fits those n vectors so that plain textual inversion reproduces
what the concept does to the denoiser, and measures what is lost.

Method (``distil``):

1. Draw denoiser inputs: noisy latents x_t = add_noise(x_0, ε, t) with x_0, ε ~ N(0, I) at the
   model's latent size, t ~ U{0, …, T-1}, and a caption from the concept's training templates.
2. Run the UNet once per sample with the concept's conditioning (keys without, values with the
   bypass, per layer at that t) and record, for every cross-attention layer, a random subset of
   its query tokens (after ``to_q``) and its outputs there (forward hooks, no grad).
3. Weigh the layers by their effect on the denoiser: on a few samples, let layer l alone read
   the plain textual-inversion start instead of the concept and measure gain_l = how much the
   UNet's output moves per unit of change in that layer's attention output (L + 1 UNet calls).
4. Fit the n vectors with Adam (full batch, cosine-decayed step size) so that the prompt with
   the placeholder replaced by the n vectors (``<name> <name>_1 …``, as diffusers writes
   multi-vector embeddings), encoded by the stock text encoder, reproduces the recorded
   attention outputs. The objective, Σ_l gain_l · mean squared error of layer l, predicts the
   relative squared denoiser error. One step costs one text-encoder pass over the distinct
   captions and L attention ops on the recorded queries; the UNet is never differentiated. The
   fit starts at the "average" baseline and returns the best iterate.
5. Fidelity, on a held-out set drawn like step 1 (another seed; :func:`heldout_count` samples,
   at least 64): the relative denoiser error ``||ε_X - ε_concept|| / ||ε_concept||`` (full UNet
   forward, conditional branch, no CFG), averaged over samples, with its standard error, for
   X = the fitted vectors, the average baseline and the initializer word.
6. Selection: the fitted vectors and the average are scored on the same held-out samples, so
   their per-sample difference is paired (its spread is far smaller than either error's). The
   one with the lower mean error is returned: an export is never worse than its own baseline
   on the set it reports.

Baselines: "average" is the mean of the mapper's token outputs over every integer t and every
layer; with n > 1 vectors it is that mean followed by n - 1 copies of the initializer word's
embedding (the fit starts there too). "initializer" is the caption with the initializer word.

The base model, its tokenizer and the mapper are left as they were: the tokenizer is copied
before placeholder tokens are added, the mapper is copied, and the UNet's attention processors
are put back afterwards. Every random draw comes from generators seeded with ``seed``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import BadInput, ModelError
from ..method.encoding import (
    ConceptSlot,
    encode_context,
    encode_layers,
    pooled_over_layers,
)
from ..method.mapper import MapperConfig
from ..method.placeholders import add_placeholder_tokens, placeholder_tokens, single_token_id, write_placeholder
from ..method.spacetime import SpaceTimeConditioning, cross_attention_layers, install_processors
from ..method.templates import OBJECT_TEMPLATES
from ..train.config import TrainConfig
from .common import FAST

QUERIES_PER_LAYER = 256  # query tokens recorded per layer and sample (SD 1.5's layer 0 has 4096)
REFERENCE_MODULES = 16  # SD 1.x/2.x's cross-attentions: a UNet with more (SDXL: 70) records fewer per module

LEARNING_RATE = 0.1  # Adam step size, relative to the initial vectors' RMS coordinate
UNET_BATCH = 16  # samples per UNet call (recording and evaluation)
GAIN_SAMPLES = 8  # samples on which the layers' gains are measured (L + 1 UNet calls)


@dataclass
class Fidelity:
    """Relative denoiser error vs the concept, ||ε_X - ε_concept|| / ||ε_concept|| averaged over
    the held-out samples, for X = each candidate; lower is better. ``*_se``: standard errors of
    those means; ``difference``: the mean per-sample (distilled - average), with its standard
    error (paired: both are measured on the same samples)."""

    distilled: float
    average: float
    initializer: float
    samples: int = 0  # held-out samples measured
    distilled_se: float = math.nan
    average_se: float = math.nan
    initializer_se: float = math.nan
    difference: float = math.nan
    difference_se: float = math.nan

    @property
    def written(self) -> str:
        """The candidate an export writes: "distilled" unless the plain average scored lower."""
        return "average" if self.average < self.distilled else "distilled"

    @property
    def written_error(self) -> float:
        return min(self.distilled, self.average)

    def decision(self) -> str:
        """Which vectors were written and why, in a sentence."""
        sign = "+" if self.difference >= 0 else "-"
        gap = (f"distilled - average {sign}{abs(self.difference):.4f} ± {self.difference_se:.4f}, paired over "
               f"{self.samples} held-out samples")
        noise = "; within its noise" if abs(self.difference) < 2 * self.difference_se else ""
        if self.written == "distilled":
            return f"the distilled vectors, whose error is lower than the plain average's ({gap}{noise})"
        return f"the plain average, as the distilled vectors' error is not lower ({gap}{noise})"


@dataclass
class Samples:
    """Denoiser inputs: noisy latents, their timesteps and captions (with the concept's token)."""

    latents: torch.Tensor  # N x C x h x w, x_t (fp32, CPU)
    timesteps: torch.Tensor  # N, int64
    captions: list[str]  # N, e.g. "a photo of a <name>"


@dataclass
class Distilled:
    """The result of :func:`distil`."""

    vectors: torch.Tensor  # n x D, fp32 CPU: the embeddings of <name>, <name>_1, … (fidelity.written's)
    fidelity: Fidelity
    rank: int | None  # the concept's rank that was imitated (its maximum when none was asked for)
    objective: float = math.nan  # fit objective at the result: predicted relative squared denoiser error
    objective_start: float = math.nan  # the same at the start (the average baseline)
    heldout: Samples | None = field(default=None, repr=False)  # where the fidelity was measured
    fitted: torch.Tensor | None = field(default=None, repr=False)  # the fit's vectors, written or not
    average: torch.Tensor | None = field(default=None, repr=False)  # the baseline, written or not


# --------------------------------------------------------------------------- setup


@dataclass
class _Context:
    """Everything the steps share: the base model, a tokenizer copy, the concept's slot."""

    base: object  # stc.models.base.BaseModel
    mapper: torch.nn.Module  # a private copy, eval mode, on the base's device
    rank: int | None
    tokenizers: list  # copies of the pipeline's tokenizers (SDXL: two) that know the placeholder tokens
    token: str  # the concept's placeholder, <name>
    vector_tokens: list[str]  # <name>, <name>_1, …
    initializer: str
    templates: list[str]
    num_layers: int
    widths: list[int]  # the text encoders' widths: a vector is their input embeddings side by side

    @property
    def unet(self):
        return self.base.pipeline.unet

    @property
    def encoders(self):
        return self.base.backbone.text_encoders(self.base.pipeline)

    @property
    def device(self):
        return torch.device(self.base.device)

    def ids(self, texts: list[str]) -> list[torch.Tensor]:
        """Token ids in each tokenizer, padded to the model's length: N x S each, on the base's device."""
        return [tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(self.device) for tok in self.tokenizers]

    def token_ids(self, tokens: list[str]) -> list[list[int]]:
        """The ids of ``tokens`` in each tokenizer."""
        return [[tok.convert_tokens_to_ids(token) for token in tokens] for tok in self.tokenizers]

    def concept_slots(self) -> dict[int, ConceptSlot]:
        slot = ConceptSlot.of(self.token_ids([self.token]), self.mapper, self.rank)
        return {slot.token_id: slot}


def _resolve_rank(concept, mapper, rank: int | None) -> int | None:
    """The rank to imitate: ``rank`` (checked), else the full concept (None if it has no ranks)."""
    from ..method.mapper_config import check_rank

    limit = mapper.config.rank_max
    return limit if rank is None else check_rank(concept.name, rank, limit, f"--rank {rank}")


def _prepare(base, concept, mapper, vectors: int, rank: int | None) -> _Context:
    """Check the inputs and build the shared context (copies of tokenizer and mapper)."""
    from ..method.spacetime import cross_attention_layer_names
    from ..render.generation import check_compatible

    layer_names = cross_attention_layer_names(base.pipeline.unet)
    check_compatible(concept, base, layer_names)
    copies = [copy.deepcopy(tokenizer) for tokenizer in base.backbone.tokenizers(base.pipeline)]
    vector_tokens = placeholder_tokens(concept.token, vectors)
    for tokenizer in copies:
        single_token_id(tokenizer, concept.initializer)  # a BadInput with suggestions otherwise
        add_placeholder_tokens(tokenizer, vector_tokens)
    config = TrainConfig.of(concept.training)
    templates = list(config.templates) if config is not None else list(OBJECT_TEMPLATES)
    private = copy.deepcopy(mapper).to(base.device).eval().requires_grad_(False)
    return _Context(
        base=base, mapper=private, rank=_resolve_rank(concept, mapper, rank), tokenizers=copies,
        token=concept.token, vector_tokens=vector_tokens, initializer=concept.initializer,
        templates=templates, num_layers=len(layer_names), widths=list(base.encoder_widths),
    )


def _check_arguments(vectors: int, samples: int, steps: int, queries: int) -> None:
    for label, value, least in (("vectors", vectors, 1), ("samples", samples, 1), ("steps", steps, 0),
                                ("queries", queries, 1)):
        if value < least:
            raise BadInput(f"{label} must be at least {least}, got {value}")


# --------------------------------------------------------------------------- text encoding


class _Constant:
    """A mapper stand-in that gives one fixed token embedding at every (t, l), no bypass."""

    def __init__(self, vector: torch.Tensor):
        self.vector = vector  # D

    def __call__(self, timesteps, layers, rank=None, dropout_groups=None, generator=None):
        return self.vector.unsqueeze(0).expand(timesteps.shape[0], -1)  # N, D


def _vector_slots(token_ids: list[list[int]], vectors: torch.Tensor, widths: list[int]) -> dict[int, ConceptSlot]:
    """Plain textual inversion as stc's text encoder sees it: the i-th token (``token_ids[k][i]`` in
    tokenizer k) -> vectors[i], each text encoder taking its part of it (SDXL: [768 | 1280])."""
    config = MapperConfig.for_encoders(widths, [1.0] * len(widths), bypass=False)
    slots = {}
    for index, vector in enumerate(vectors):
        slot = ConceptSlot.of([[ids[index]] for ids in token_ids], _Constant(vector), config=config)
        slots[slot.token_id] = slot
    return slots


def _encode_plain(encoders, input_ids: list[torch.Tensor], slots=None):
    """The stock encoding (one sequence for every layer) of N prompts: an Encoding, N x S x D
    (with the N x P pooled embeddings on SDXL)."""
    zeros = torch.zeros(input_ids[0].shape[0], device=input_ids[0].device)
    return encode_context(encoders, input_ids, zeros, zeros, slots)


def _concept_conditioning(ctx: _Context, input_ids: list[torch.Tensor], timesteps: torch.Tensor):
    """The concept's per-layer keys (no bypass) and values (bypass), L x N x S x D each, and its
    pooled embeddings (N x P; None for SD 1.x/2.x)."""
    encoding = encode_layers(ctx.encoders, input_ids, timesteps.to(ctx.device), ctx.num_layers,
                             ctx.concept_slots())  # N, L, S, D
    conditioning = SpaceTimeConditioning(keys=encoding.keys.transpose(0, 1), values=encoding.values.transpose(0, 1))
    return conditioning, pooled_over_layers(encoding.pooled)


def mean_token(mapper, rank: int | None = None) -> torch.Tensor:
    """The mapper's token embedding averaged over t in {0, 10, …, 990} and every layer: D (fp32,
    CPU). The "plain average" a textual-inversion export is compared with, and the embedding a
    neti export's learned_embeds.bin holds."""
    from ..method.encoding import spacetime_rows

    device = next(mapper.parameters()).device
    rows_t, rows_l = spacetime_rows(torch.arange(0, 1000, 10, device=device), mapper.config.num_layers)
    with torch.no_grad():
        token, _ = mapper.split(mapper(rows_t, rows_l, rank=rank))
    return token.double().mean(dim=0).float().cpu()


def _initial_vectors(ctx: _Context, count: int) -> torch.Tensor:
    """The average baseline: [mean token, initializer embedding × (count - 1)]: count x D."""
    rows = [encoder.module.get_input_embeddings().weight[single_token_id(tokenizer, ctx.initializer)]
            for encoder, tokenizer in zip(ctx.encoders, ctx.tokenizers)]
    initializer = torch.cat(rows).detach().float().cpu()  # each encoder's embedding of the word, side by side
    return torch.stack([mean_token(ctx.mapper, ctx.rank)] + [initializer] * (count - 1))


# --------------------------------------------------------------------------- denoiser inputs


def _draw_samples(ctx: _Context, count: int, generator: torch.Generator) -> Samples:
    """``count`` noised random latents at uniform timesteps, each with a random template."""
    from diffusers import DDPMScheduler

    pipe = ctx.base.pipeline
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    size = pipe.unet.config.sample_size
    shape = (count, pipe.unet.config.in_channels, size, size)
    clean = torch.randn(shape, generator=generator)
    noise = torch.randn(shape, generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (count,), generator=generator)
    picks = torch.randint(0, len(ctx.templates), (count,), generator=generator)
    captions = [ctx.templates[int(i)].format(ctx.token) for i in picks]
    return Samples(latents=scheduler.add_noise(clean, noise, timesteps), timesteps=timesteps, captions=captions)


def _predict(ctx: _Context, latents, timesteps, hidden, spacetime=None, pooled=None) -> torch.Tensor:
    """The UNet's prediction (ε or v) for one batch: N x C x h x w, fp32 (SDXL: ``pooled`` N x P
    and the size ids of an uncropped image of the latents' size)."""
    kwargs = {"spacetime": spacetime} if spacetime is not None else None
    unet = ctx.unet
    added = None
    if pooled is not None:  # the model reads a pooled embedding: the backbone's added conditioning
        factor = ctx.base.pipeline.vae_scale_factor
        height, width = (side * factor for side in latents.shape[-2:])
        added = ctx.base.backbone.added_conditioning(pooled.to(ctx.device, hidden.dtype), height, width)
    return unet(
        latents.to(ctx.device, unet.dtype), timesteps.to(ctx.device), encoder_hidden_states=hidden,
        cross_attention_kwargs=kwargs, added_cond_kwargs=added,
    ).sample.float()


def _predict_concept(ctx: _Context, latents, timesteps, captions: list[str]) -> torch.Tensor:
    conditioning, pooled = _concept_conditioning(ctx, ctx.ids(captions), timesteps)
    return _predict(ctx, latents, timesteps, conditioning.keys[0], conditioning, pooled)


def _batches(samples: Samples):
    for start in range(0, samples.timesteps.shape[0], UNET_BATCH):
        rows = slice(start, start + UNET_BATCH)
        yield samples.latents[rows], samples.timesteps[rows], samples.captions[rows]


# --------------------------------------------------------------------------- recording the concept


class _Hooks:
    """Forward hooks on the cross-attention modules: ``record(index, module, hidden, output)``
    runs after each module with its query input (B x N x C) and output (B x N x C_out)."""

    def __init__(self, modules: list, record: Callable):
        def hook(index):
            def run(module, args, kwargs, output):
                record(index, module, args[0] if args else kwargs["hidden_states"], output)

            return run

        self.handles = [module.register_forward_hook(hook(i), with_kwargs=True) for i, module in enumerate(modules)]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        return False


def _attention_modules(ctx: _Context) -> list:
    """Every cross-attention module of the UNet, in layer order (SD 1.x/2.x: one per layer)."""
    return [ctx.unet.get_submodule(name) for _, names in cross_attention_layers(ctx.unet) for name in names]


def _module_layers(ctx: _Context) -> list[int]:
    """The layer index of each of :func:`_attention_modules`."""
    return [index for index, (_, names) in enumerate(cross_attention_layers(ctx.unet)) for _ in names]


def queries_per_module(queries: int, modules: int) -> int:
    """Query tokens recorded per cross-attention module: ``queries`` for SD 1.x/2.x's 16; a UNet with
    more modules records as many per sample in all (SDXL's 70: 58 each), at least 16."""
    return queries if modules <= REFERENCE_MODULES else max(16, queries * REFERENCE_MODULES // modules)


def _record(ctx: _Context, samples: Samples, queries: int, generator, tracker=None) -> tuple[list, list]:
    """Per cross-attention module: random query tokens of every sample (``to_q`` applied; how many:
    :func:`queries_per_module`) and the concept's attention outputs there: two lists of
    N x Q_m x C_m (model dtype)."""
    modules = _attention_modules(ctx)
    queries = queries_per_module(queries, len(modules))
    inputs: list[list[torch.Tensor]] = [[] for _ in modules]
    outputs: list[list[torch.Tensor]] = [[] for _ in modules]

    def record(index, module, hidden, output):
        batch, tokens, _ = hidden.shape
        pick = torch.rand(batch, tokens, generator=generator).argsort(dim=1)[:, :queries].to(hidden.device)  # B, Q
        take = lambda x: x.gather(1, pick.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # noqa: E731
        inputs[index].append(module.to_q(take(hidden)))
        outputs[index].append(take(output))

    with torch.no_grad(), _Hooks(modules, record):
        for latents, timesteps, captions in _batches(samples):
            _predict_concept(ctx, latents, timesteps, captions)
            if tracker is not None:
                tracker.tick()
    return [torch.cat(chunks) for chunks in inputs], [torch.cat(chunks) for chunks in outputs]


def _layer_gains(ctx: _Context, samples: Samples, words: str, slots: dict) -> list[float]:
    """Per layer l, how much the denoiser moves per unit of attention-output change there.

    On the first GAIN_SAMPLES of ``samples``: layer l alone reads plain textual inversion (``words``
    and ``slots``, the fit's start) instead of the concept; gain_l = mean ||Δε||² /
    mean ||Δ output_l||², divided by mean ||ε||². Σ_l gain_l · mean ||Δ output_l||² then
    predicts the relative squared denoiser error, which is what the fit minimises.
    """
    latents, timesteps = samples.latents[:GAIN_SAMPLES], samples.timesteps[:GAIN_SAMPLES]
    captions = samples.captions[:GAIN_SAMPLES]
    latest: dict[int, torch.Tensor] = {}  # module -> its output in the last UNet pass
    module_layers = _module_layers(ctx)
    gains = []
    with torch.no_grad(), _Hooks(_attention_modules(ctx), lambda i, m, h, out: latest.__setitem__(i, out)):
        concept, pooled = _concept_conditioning(ctx, ctx.ids(captions), timesteps)  # L, B, S, D
        plain_ids = ctx.ids([write_placeholder(caption, ctx.token, words) for caption in captions])
        plain = _encode_plain(ctx.encoders, plain_ids, slots).keys
        reference = _predict(ctx, latents, timesteps, concept.keys[0], concept, pooled)
        first = dict(latest)
        for index in range(ctx.num_layers):
            keys, values = concept.keys.clone(), concept.values.clone()
            keys[index] = values[index] = plain
            swapped = _predict(ctx, latents, timesteps, keys[0], SpaceTimeConditioning(keys=keys, values=values),
                               pooled)
            mine = [m for m, layer in enumerate(module_layers) if layer == index]  # the layer's modules
            moved = sum((latest[m] - first[m]).float().pow(2).mean() for m in mine)  # 0 where start = concept
            floor = 1e-12 * sum(first[m].float().pow(2).mean() for m in mine) + 1e-30
            gains.append(float((swapped - reference).pow(2).mean() / moved.clamp_min(floor)))
    energy = float(reference.pow(2).mean())
    return [gain / energy for gain in gains]


# --------------------------------------------------------------------------- the student


def _attend(attn, query: torch.Tensor, states: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """``attn``'s cross-attention, as SpaceTimeAttnProcessor computes it, of projected queries
    (B x Q x C, ``to_q`` applied) over text sequences: B x Q x C_out.

    ``states``: B x S x D, or U x S x D distinct sequences with ``rows`` (B) picking each
    query's; keys and values are then projected once per distinct sequence.
    """
    if attn.norm_cross:
        states = attn.norm_encoder_hidden_states(states)
    key, value = attn.to_k(states), attn.to_v(states)  # U, S, C
    if rows is not None:
        key, value = key[rows], value[rows]  # B, S, C
    batch, head_dim = query.shape[0], key.shape[-1] // attn.heads
    split = lambda x: x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # noqa: E731  B, H, *, hd
    query, key, value = split(query), split(key), split(value)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    hidden = F.scaled_dot_product_attention(query, key, value)
    hidden = hidden.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
    return attn.to_out[1](attn.to_out[0](hidden)) / attn.rescale_output_factor


def _check_attention(modules: list) -> None:
    for attn in modules:
        if attn.residual_connection or attn.group_norm is not None or attn.spatial_norm is not None:
            raise ModelError("distillation supports the cross-attention layers of Stable Diffusion UNets "
                             "(SD 1.x, 2.x, SDXL) only")


def _fp32(module):
    """``module`` itself if it is fp32, else an fp32 copy (the fit runs in fp32)."""
    if all(p.dtype == torch.float32 for p in module.parameters()):
        return module
    return copy.deepcopy(module).float()


class _Student:
    """Plain textual inversion's attention outputs at the recorded queries, and their error.

    The objective is Σ_m gain_l(m) · mean (out_m - target_m)² over the cross-attention modules m
    (means over samples, queries and channels; the gain of m's layer from :func:`_layer_gains`): a
    prediction of the relative squared denoiser error. (SDXL's pooled embedding, which the vectors
    also change, is not part of it: it is measured in the fidelity.)
    """

    def __init__(self, ctx: _Context, captions: list[str], queries: list, targets: list, gains: list[float]):
        unique = list(dict.fromkeys(captions))
        words = " ".join(ctx.vector_tokens)
        self.input_ids = ctx.ids([write_placeholder(caption, ctx.token, words)  # per tokenizer U, S
                                  for caption in unique])
        self.rows = torch.tensor([unique.index(c) for c in captions], device=ctx.device)  # N
        self.token_ids, self.widths = ctx.token_ids(ctx.vector_tokens), ctx.widths
        self.encoders = [dataclasses.replace(encoder, module=_fp32(encoder.module)) for encoder in ctx.encoders]
        self.modules = [_fp32(module) for module in _attention_modules(ctx)]
        _check_attention(self.modules)
        self.queries, self.targets = queries, targets  # per module N x Q x C (model dtype)
        self.gains = [gains[layer] for layer in _module_layers(ctx)]

    @property
    def device(self):
        return self.input_ids[0].device

    def encode(self, vectors: torch.Tensor) -> torch.Tensor:
        """The distinct captions with the vectors in place: U x S x D."""
        return _encode_plain(self.encoders, self.input_ids, _vector_slots(self.token_ids, vectors, self.widths)).keys

    def layer_error(self, index: int, states: torch.Tensor) -> torch.Tensor:
        out = _attend(self.modules[index], self.queries[index].float(), states, self.rows)  # N, Q, C
        return (out - self.targets[index].float()).pow(2).mean() * self.gains[index]

    def objective(self, vectors: torch.Tensor) -> float:
        with torch.no_grad():
            states = self.encode(vectors.to(self.device))
            return sum(float(self.layer_error(i, states)) for i in range(len(self.modules)))

    def objective_and_grad(self, vectors: torch.Tensor) -> tuple[float, torch.Tensor]:
        """The objective and its gradient; layer by layer, so one layer's activations live at a time."""
        states = self.encode(vectors)  # U, S, D
        leaf = states.detach().requires_grad_()
        grad_states, total = torch.zeros_like(leaf), 0.0
        for index in range(len(self.modules)):
            error = self.layer_error(index, leaf)
            (grad,) = torch.autograd.grad(error, leaf)
            grad_states += grad
            total += float(error.detach())
        (grad,) = torch.autograd.grad(states, vectors, grad_outputs=grad_states)
        return total, grad


def _fit(student: _Student, start: torch.Tensor, steps: int, tracker=None) -> tuple[torch.Tensor, float, float]:
    """Adam on the vectors (full batch, cosine step size); returns (best vectors, objective, start objective)."""
    device = student.device
    vectors = start.clone().to(device).requires_grad_()
    scale = float(start.pow(2).mean().sqrt())  # RMS coordinate
    optimizer = torch.optim.Adam([vectors], lr=LEARNING_RATE * scale)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(steps, 1))))
    best, best_value, first = start.clone(), math.inf, None
    for _step in range(steps):
        value, grad = student.objective_and_grad(vectors)
        first = value if first is None else first
        if value < best_value:
            best, best_value = vectors.detach().cpu().clone(), value
        vectors.grad = grad
        optimizer.step()
        schedule.step()
        if tracker is not None:
            tracker.tick()
    final = student.objective(vectors.detach())
    if final < best_value:
        best, best_value = vectors.detach().cpu().clone(), final
    return best, best_value, first if first is not None else final


# --------------------------------------------------------------------------- fidelity


def _fidelity(ctx: _Context, heldout: Samples, candidates: dict[str, tuple[str, dict | None]],
              tracker=None) -> dict[str, torch.Tensor]:
    """Per held-out sample, the relative denoiser error vs the concept of each candidate (caption
    words, slots): N each (fp64)."""
    errors: dict[str, list[torch.Tensor]] = {name: [] for name in candidates}
    with torch.no_grad():
        for latents, timesteps, captions in _batches(heldout):
            reference = _predict_concept(ctx, latents, timesteps, captions).flatten(1)  # B, C·h·w
            for name, (words, slots) in candidates.items():
                ids = ctx.ids([write_placeholder(caption, ctx.token, words) for caption in captions])
                plain = _encode_plain(ctx.encoders, ids, slots)
                prediction = _predict(ctx, latents, timesteps, plain.keys, pooled=plain.pooled).flatten(1)
                errors[name].append((prediction - reference).norm(dim=1) / reference.norm(dim=1))
            if tracker is not None:
                tracker.tick()
    return {name: torch.cat(values).double().cpu() for name, values in errors.items()}


def _mean_and_se(values: torch.Tensor) -> tuple[float, float]:
    """The mean of ``values`` and its standard error (NaN for a single value)."""
    count = values.shape[0]
    se = float(values.std(unbiased=True) / math.sqrt(count)) if count > 1 else math.nan
    return float(values.mean()), se


def summarise(errors: dict[str, torch.Tensor]) -> Fidelity:
    """The Fidelity of per-sample errors of the three candidates (same samples, same order)."""
    (distilled, distilled_se), (average, average_se), (initializer, initializer_se) = (
        _mean_and_se(errors[name]) for name in ("distilled", "average", "initializer"))
    difference, difference_se = _mean_and_se(errors["distilled"] - errors["average"])
    return Fidelity(
        distilled=distilled, average=average, initializer=initializer, samples=int(errors["average"].shape[0]),
        distilled_se=distilled_se, average_se=average_se, initializer_se=initializer_se,
        difference=difference, difference_se=difference_se,
    )


def _candidates(ctx: _Context, distilled: torch.Tensor, average: torch.Tensor) -> dict:
    ids = ctx.token_ids(ctx.vector_tokens)
    words = " ".join(ctx.vector_tokens)
    dtype = ctx.base.pipeline.text_encoder.dtype
    return {
        "distilled": (words, _vector_slots(ids, distilled.to(ctx.device, dtype), ctx.widths)),
        "average": (words, _vector_slots(ids, average.to(ctx.device, dtype), ctx.widths)),
        "initializer": (ctx.initializer, None),
    }


MIN_HELDOUT, MAX_HELDOUT = 64, 256


def heldout_count(samples: int) -> int:
    """Size of the held-out set for ``samples`` fit samples: as many, between 64 and 256. (With 8,
    the same average scored 0.006 or 0.009 by the draw alone: too noisy to choose with.)"""
    return min(MAX_HELDOUT, max(MIN_HELDOUT, samples))


class _Progress:
    """``progress(done, total)`` over the whole distillation: one unit per UNet batch recorded, one
    for the layer gains, one per fit step, one per held-out batch measured."""

    def __init__(self, callback, samples: int, steps: int):
        batches = lambda count: -(-count // UNET_BATCH)  # noqa: E731
        self.callback, self.done = callback, 0
        self.total = batches(samples) + 1 + steps + batches(heldout_count(samples))

    def tick(self) -> None:
        self.done += 1
        if self.callback is not None:
            self.callback(min(self.done, self.total), self.total)


# --------------------------------------------------------------------------- entry point


def distil(
    base, concept, mapper, vectors: int = 1, rank: int | None = None, samples: int = FAST[0], steps: int = FAST[1],
    seed: int = 0, progress: Callable[[int, int], None] | None = None, *, queries: int = QUERIES_PER_LAYER,
) -> Distilled:
    """Fit ``vectors`` plain textual-inversion embeddings that imitate ``concept`` at ``rank``.

    ``samples`` denoiser inputs are recorded (``queries`` query tokens per layer each) and the
    vectors are fitted in ``steps`` Adam steps; ``progress(done, total)`` follows all of it. The
    fidelity is measured on :func:`heldout_count` (``samples``) other inputs, and the fitted
    vectors are returned only if they score lower there than the plain average they start from;
    otherwise the average is (``fidelity.written`` says which). Same arguments and seed give the
    same vectors on the same device.
    """
    _check_arguments(vectors, samples, steps, queries)
    ctx = _prepare(base, concept, mapper, vectors, rank)
    unet = ctx.unet
    saved = dict(unet.attn_processors)
    install_processors(unet)
    tracker = _Progress(progress, samples, steps)
    try:
        average = _initial_vectors(ctx, vectors)
        result, objective, objective_start = _distil_fit(ctx, average, samples, steps, seed, queries, tracker)
        heldout = _draw_samples(ctx, heldout_count(samples), torch.Generator().manual_seed(2 * seed + 1))
        fidelity = summarise(_fidelity(ctx, heldout, _candidates(ctx, result, average), tracker))
    finally:
        unet.set_attn_processor(saved)
    return Distilled(
        vectors=result if fidelity.written == "distilled" else average.clone(), fidelity=fidelity, rank=ctx.rank,
        objective=objective, objective_start=objective_start, heldout=heldout, fitted=result, average=average,
    )


def _distil_fit(ctx: _Context, start: torch.Tensor, samples: int, steps: int, seed: int, queries: int,
                tracker: _Progress):
    """Draw and record the fit set, weigh the layers, fit: (vectors, objective, start objective)."""
    generator = torch.Generator().manual_seed(2 * seed)
    fit_set = _draw_samples(ctx, samples, generator)
    recorded_queries, targets = _record(ctx, fit_set, queries, generator, tracker)
    words, slots = _candidates(ctx, start, start)["average"]
    gains = _layer_gains(ctx, fit_set, words, slots)
    tracker.tick()
    student = _Student(ctx, fit_set.captions, recorded_queries, targets, gains)
    return _fit(student, start, steps, tracker)
