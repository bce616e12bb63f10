"""Figures 1-3: one training step of stc's NeTI trainer against a textual-inversion step.

Both sides share the frozen models (text encoder, UNet, VAE latents) of one loaded base
model; each gets the UNet's attention processors it would run with (stc's space-time
processors for NeTI, diffusers' stock SDPA processors for textual inversion).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .measure import FlopCount, Samples, alternate, instrumented, text_transformer_stack, timed

PLACEHOLDER = "<benchtrain>"
INITIALIZER = "cat"
EXAMPLE_PHOTOS = Path(__file__).resolve().parent.parent / "examples" / "cat"


class TextualInversionStep:
    """Textual inversion on the same frozen models: one trainable vector for the placeholder,
    the stock text encoder, the same latents, noise, timesteps and loss; AdamW on the vector."""

    def __init__(self, trainer):
        import torch

        self.trainer = trainer
        config = trainer.config
        embedding = trainer.text_encoder.get_input_embeddings().weight
        initializer_id = trainer.tokenizer.encode(config.initializer_word, add_special_tokens=False)[0]
        self.vector = torch.nn.Parameter(embedding[initializer_id].detach().float().clone())
        self.optimizer = torch.optim.AdamW(
            [self.vector], lr=config.effective_lr(1), betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.adam_weight_decay, eps=config.adam_epsilon,
        )

    def encode(self, input_ids):
        """The stock CLIP text encoder with the placeholder's input embedding replaced."""
        from transformers.masking_utils import create_causal_mask

        transformer = getattr(self.trainer.text_encoder, "text_model", self.trainer.text_encoder)
        table = transformer.embeddings.token_embedding
        embeds = table(input_ids.clamp(max=table.num_embeddings - 1))
        rows, cols = (input_ids == self.trainer.token_id).nonzero(as_tuple=True)
        vector = self.vector.to(embeds.dtype).unsqueeze(0).expand(rows.shape[0], -1)
        embeds = embeds.index_put((rows, cols), vector)
        hidden = transformer.embeddings(inputs_embeds=embeds)
        mask = create_causal_mask(config=transformer.config, inputs_embeds=hidden, attention_mask=None, cache=None)
        state = transformer.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True).last_hidden_state
        return transformer.final_layer_norm(state)

    def loss(self):
        """The trainer's own batch, noise, timesteps and target (``Trainer.random_batch``,
        ``Trainer.denoising_inputs``); only the conditioning differs."""
        import torch.nn.functional as F

        trainer = self.trainer
        image_index, flip, noise, timesteps, captions = trainer.random_batch()
        noisy, target, input_ids = trainer.denoising_inputs(image_index, flip, noise, timesteps, captions,
                                                            trainer.generator)
        device = trainer.accelerator.device
        hidden = self.encode(input_ids.to(device))
        prediction = trainer.unet(noisy.to(trainer.unet.dtype), timesteps.to(device),
                                  encoder_hidden_states=hidden).sample
        return F.mse_loss(prediction.float(), target.float())

    def step(self) -> float:
        loss = self.loss()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def reference_design_conditioning(trainer):
    """``Trainer.conditioning`` as the reference implementation does it: one text-encoder call
    per UNet layer (16 per step) instead of stc's one batched call."""
    import torch

    from stc.method.spacetime import ConceptSlot, SpaceTimeConditioning, encode_spacetime

    def conditioning(input_ids, timesteps, generator):
        device = trainer.accelerator.device
        slot = ConceptSlot(token_id=trainer.token_id, mapper=trainer.mapper, config=trainer.unwrapped_mapper.config)
        input_ids, timesteps = input_ids.to(device), timesteps.to(device).float()
        keys, values = [], []
        for layer in range(len(trainer.layer_names)):
            layers = torch.full_like(timesteps, float(layer))
            plain, bypassed = encode_spacetime(
                trainer.text_encoder, input_ids, timesteps, layers, {trainer.token_id: slot}, generator
            )
            keys.append(plain)
            values.append(bypassed)
        return SpaceTimeConditioning(keys=torch.stack(keys), values=torch.stack(values))  # L, B, S, D

    return conditioning


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

    modules = {"unet": unet, "text encoder": text_transformer_stack(base.pipeline.text_encoder),
               "mapper": trainer.unwrapped_mapper}
    log(f"training step at {resolution}px, batch 1 ({dtype}): warm-up (FLOPs, memory, calls)")
    with instrumented(device, base.pipeline.text_encoder, modules, memory=True) as stc_record:
        stc_step()
    with instrumented(device, base.pipeline.text_encoder, modules, memory=True) as ti_record:
        ti_step()
    reference_calls, reference_time, reference_flops = 16, None, None
    if reference:
        original = trainer.conditioning
        trainer.conditioning = reference_design_conditioning(trainer)
        try:
            with instrumented(device, base.pipeline.text_encoder, modules, memory=False) as ref_record:
                stc_step()
            reference_calls, reference_flops = ref_record["calls"]["calls"], ref_record["flops"]
            if repeats > 0:
                reference_time = timed(stc_step, device)
                log(f"  reference design (16 calls) #1: {reference_time:.3f} s")
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
