"""Figures 1-3: one training step of stc's NeTI trainer against a textual-inversion step.

Both sides share the frozen models (text encoder, UNet, VAE latents) of one loaded base
model; each gets the UNet's attention processors it would run with (stc's space-time
processors for NeTI, diffusers' stock SDPA processors for textual inversion).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .measure import FlopCount, Samples, alternate, instrumented, text_modules, timed

PLACEHOLDER = "<benchtrain>"
INITIALIZER = "cat"
EXAMPLE_PHOTOS = Path(__file__).resolve().parent.parent / "examples" / "cat"


class TextualInversionStep:
    """Plain textual inversion as a user runs it, on the same frozen models: one trainable vector
    per text encoder for the placeholder (SDXL: two, as diffusers' SDXL example trains), put in by a
    hook on the encoder's input-embedding table, then the **stock** text-encoder forward
    (transformers' own; SDXL: ``output_hidden_states``, penultimate states, the second encoder's
    pooled output); the same latents, noise, timesteps, size ids and loss; AdamW on the vectors."""

    def __init__(self, trainer):
        import torch

        self.trainer = trainer
        config = trainer.config
        self.vectors, self.hooks = [], []
        for encoder, tokenizer in zip(trainer.encoders, trainer.tokenizers):
            embedding = encoder.module.get_input_embeddings()
            initializer_id = tokenizer.encode(config.initializer_word, add_special_tokens=False)[0]
            self.vectors.append(torch.nn.Parameter(embedding.weight[initializer_id].detach().float().clone()))
        self.optimizer = torch.optim.AdamW(
            self.vectors, lr=config.effective_lr(1), betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.adam_weight_decay, eps=config.adam_epsilon,
        )

    def _put_in(self, index, token_id):
        def hook(module, args, output):
            (ids,) = args
            rows, cols = (ids == token_id).nonzero(as_tuple=True)
            vector = self.vectors[index].to(output.dtype).unsqueeze(0).expand(rows.shape[0], -1)
            return output.index_put((rows, cols), vector)

        return hook

    def encode(self, input_ids):
        """(the UNet's context, the pooled embedding or None) from the stock forward of each encoder."""
        import torch

        trainer, states, pooled = self.trainer, [], None
        several = len(trainer.encoders) > 1
        for index, (encoder, ids) in enumerate(zip(trainer.encoders, input_ids)):
            table = encoder.module.get_input_embeddings()
            token_id = trainer.token_ids[index][0]
            # placeholder ids lie beyond the stock table: look them up as the last row, then replace them
            clamp = table.register_forward_pre_hook(lambda m, args: (args[0].clamp(max=m.num_embeddings - 1),))
            handle = table.register_forward_hook(self._put_in(index, token_id))
            try:
                if several:
                    output = encoder.module(ids, output_hidden_states=True)
                    states.append(output.hidden_states[-2])
                    pooled = output[0] if encoder.pooled else pooled
                else:
                    states.append(encoder.module(ids)[0])
            finally:
                clamp.remove()
                handle.remove()
        return (torch.cat(states, dim=-1) if several else states[0]), pooled

    def loss(self):
        """The trainer's own batch, noise, timesteps and target (``Trainer.random_batch``,
        ``Trainer.denoising_inputs``); only the conditioning differs."""
        import torch.nn.functional as F

        trainer = self.trainer
        image_index, flip, noise, timesteps, captions = trainer.random_batch()
        noisy, target, input_ids = trainer.denoising_inputs(image_index, flip, noise, timesteps, captions,
                                                            trainer.generator)
        device = trainer.accelerator.device
        hidden, pooled = self.encode([ids.to(device) for ids in input_ids])
        prediction = trainer.unet(noisy.to(trainer.unet.dtype), timesteps.to(device), encoder_hidden_states=hidden,
                                  added_cond_kwargs=trainer.added_conditioning(pooled, noisy)).sample
        return F.mse_loss(prediction.float(), target.float())

    def step(self) -> float:
        loss = self.loss()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def reference_design_conditioning(trainer):
    """``Trainer.conditioning`` as the reference implementation does it: one call of the text
    encoder(s) per UNet layer (16 per step for SD 1.x) instead of stc's one batched call."""
    import torch

    from stc.method.encoding import ConceptSlot, encode_context, pooled_over_layers
    from stc.method.spacetime import SpaceTimeConditioning

    def conditioning(input_ids, timesteps, generator):
        device = trainer.accelerator.device
        slot = ConceptSlot.of(trainer.token_ids, trainer.mapper, config=trainer.unwrapped_mapper.config)
        input_ids, timesteps = [ids.to(device) for ids in input_ids], timesteps.to(device).float()
        keys, values, pooled = [], [], []
        for layer in range(len(trainer.layer_names)):
            layers = torch.full_like(timesteps, float(layer))
            encoding = encode_context(trainer.encoders, input_ids, timesteps, layers, {trainer.token_id: slot},
                                      generator)
            keys.append(encoding.keys)
            values.append(encoding.values)
            pooled.append(encoding.pooled)
        mean = pooled_over_layers(torch.stack(pooled, dim=1)) if pooled[0] is not None else None
        return SpaceTimeConditioning(keys=torch.stack(keys), values=torch.stack(values)), mean  # L, B, S, D

    return conditioning


def bmm_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
    """Attention as the reference implementation computes it (diffusers' classic ``AttnProcessor``:
    ``baddbmm`` scores, softmax, ``bmm``), with SDPA's signature and shapes (B x H x Q x d)."""
    import torch

    batch, heads, queries, dim = query.shape
    scale = dim**-0.5 if scale is None else scale
    q, k, v = (x.reshape(batch * heads, -1, dim) for x in (query, key, value))
    scores = torch.baddbmm(torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=q.dtype, device=q.device), q,
                           k.transpose(1, 2), beta=0, alpha=scale)
    if attn_mask is not None:
        scores = scores + attn_mask.reshape(batch * heads, queries, -1)
    return torch.bmm(scores.softmax(dim=-1), v).view(batch, heads, queries, dim)


class ReferenceAttnProcessor:
    """stc's space-time processor with the reference implementation's bmm attention in place of
    SDPA (for every attention module, as the reference's processor does)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, *args, **kwargs):
        import types

        from stc.method import spacetime

        functional = spacetime.F
        spacetime.F = types.SimpleNamespace(scaled_dot_product_attention=bmm_attention)
        try:
            return self.processor(*args, **kwargs)
        finally:
            spacetime.F = functional


def reference_processors(unet) -> dict:
    """The reference design's attention processors for ``unet`` (stc's space-time ones installed)."""
    return {name: ReferenceAttnProcessor(processor) for name, processor in unet.attn_processors.items()}


@dataclass
class ReferenceResults:
    """stc's step at its defaults for the device against the reference design as it runs by
    default (fp32, bmm attention, one text-encoder call per layer), alternated in one run."""

    stc_time: Samples
    reference_time: Samples
    stc_memory: dict
    reference_memory: dict
    stc_calls: int
    reference_calls: int
    stc_dtype: str


def _step_on(spec: str, device: str, dtype: str, resolution: int, reference: bool):
    """(the base model, a trainer on it, its step function) for one side of the comparison."""
    from stc.models.base import load_base_model
    from stc.train.config import TrainConfig
    from stc.train.images import load_photos
    from stc.train.trainer import Trainer

    # the frozen models in fp32 for the reference (as it runs) and under mixed precision for stc
    base = load_base_model(spec, device=device, dtype="fp32" if reference or dtype == "fp32" else dtype)
    accelerator, precision = _accelerator(device, "fp32" if reference else dtype)
    config = TrainConfig(steps=1, batch_size=1, grad_accum=1, resolution=resolution, seed=0,
                         initializer=INITIALIZER, mixed_precision=precision, save_every=0)
    photos = load_photos(EXAMPLE_PHOTOS, resolution).images[:1]
    trainer = Trainer(base, photos, PLACEHOLDER, config, accelerator)
    unet = base.pipeline.unet
    processors = reference_processors(unet) if reference else dict(unet.attn_processors)
    if reference:
        trainer.conditioning = reference_design_conditioning(trainer)

    def step():
        unet.set_attn_processor(dict(processors))
        return trainer.train_step()

    return base, trainer, step


def run_reference(spec: str, device: str, stc_dtype: str, resolution: int, repeats: int, log) -> ReferenceResults:
    """Both sides on their own copy of the model, warmed up one after the other (peak memory and
    text-encoder calls of each alone), then timed alternately."""
    import gc

    import torch

    sides = {}
    for name, reference in (("reference", True), ("stc", False)):
        base, trainer, step = _step_on(spec, device, stc_dtype, resolution, reference)
        log(f"{name} design, training step at {resolution}px, batch 1: warm-up (memory, calls)")
        with instrumented(device, base.pipeline.text_encoder, None, flops=False, memory=True) as record:
            step()
        sides[name] = (base, trainer, step, record)
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    stc_time, reference_time = alternate(sides["stc"][2], sides["reference"][2], repeats, device, log, "vs reference")
    return ReferenceResults(
        stc_time=stc_time, reference_time=reference_time, stc_memory=sides["stc"][3]["memory"],
        reference_memory=sides["reference"][3]["memory"], stc_calls=sides["stc"][3]["calls"]["calls"],
        reference_calls=sides["reference"][3]["calls"]["calls"], stc_dtype=stc_dtype,
    )


@dataclass
class TrainingResults:
    stc_time: Samples
    ti_time: Samples
    stc_flops: FlopCount
    ti_flops: FlopCount
    stc_memory: dict
    ti_memory: dict
    stc_calls: int
    ti_calls: int
    reference_calls: int
    reference_time: float | None
    reference_flops: FlopCount | None
    resolution: int
    steps: dict = field(default_factory=dict, repr=False)  # the step functions, for --profile


def _accelerator(device: str, dtype: str):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    precision = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}[dtype]
    try:  # a second dtype in one process: accelerate keeps its state in a singleton
        AcceleratorState._reset_state(reset_partial_state=True)
    except Exception:  # older accelerate: nothing to reset
        pass
    return Accelerator(mixed_precision=precision, gradient_accumulation_steps=1, cpu=(device == "cpu")), precision


def run_training(base, device: str, dtype: str, resolution: int, repeats: int, log, reference: bool = True,
                 stock_processors=None) -> TrainingResults:
    """Warm up both sides once (counting FLOPs, peak memory and text-encoder calls), then time
    ``repeats`` steps of each, alternating."""
    from stc.train.config import TrainConfig
    from stc.train.images import load_photos
    from stc.train.trainer import Trainer

    accelerator, precision = _accelerator(device, dtype)
    config = TrainConfig(steps=1, batch_size=1, grad_accum=1, resolution=resolution, seed=0,
                         initializer=INITIALIZER, mixed_precision=precision, save_every=0)
    photos = load_photos(EXAMPLE_PHOTOS, resolution).images[:1]  # latents are precomputed: one photo is enough
    unet = base.pipeline.unet
    stock = stock_processors or dict(unet.attn_processors)
    trainer = Trainer(base, photos, PLACEHOLDER, config, accelerator)
    spacetime = dict(unet.attn_processors)
    ti = TextualInversionStep(trainer)

    def stc_step():
        unet.set_attn_processor(dict(spacetime))
        return trainer.train_step()

    def ti_step():
        unet.set_attn_processor(dict(stock))
        return ti.step()

    modules = {"unet": unet, "mapper": trainer.unwrapped_mapper,
               **text_modules(base.pipeline)}
    log(f"training step at {resolution}px, batch 1 ({dtype}): warm-up (FLOPs, memory, calls)")
    with instrumented(device, base.pipeline.text_encoder, modules, memory=True) as stc_record:
        stc_step()
    with instrumented(device, base.pipeline.text_encoder, modules, memory=True) as ti_record:
        ti_step()
    reference_calls, reference_time, reference_flops = len(trainer.layer_names), None, None
    if reference:
        original = trainer.conditioning
        trainer.conditioning = reference_design_conditioning(trainer)
        try:
            with instrumented(device, base.pipeline.text_encoder, modules, memory=False) as ref_record:
                stc_step()
            reference_calls, reference_flops = ref_record["calls"]["calls"], ref_record["flops"]
            if repeats > 0:
                reference_time = timed(stc_step, device)
                log(f"  reference design ({reference_calls} calls) #1: {reference_time:.3f} s")
        finally:
            trainer.conditioning = original
    stc_time, ti_time = alternate(stc_step, ti_step, repeats, device, log, "train")
    unet.set_attn_processor(dict(stock))
    return TrainingResults(
        stc_time=stc_time, ti_time=ti_time, stc_flops=stc_record["flops"], ti_flops=ti_record["flops"],
        stc_memory=stc_record["memory"], ti_memory=ti_record["memory"], stc_calls=stc_record["calls"]["calls"],
        ti_calls=ti_record["calls"]["calls"], reference_calls=reference_calls, reference_time=reference_time,
        reference_flops=reference_flops, resolution=resolution,
        steps={"stc": stc_step, "ti": ti_step, "trainer": trainer, "ti_object": ti},
    )
