"""Figure 4: rendering through ``stc gen``'s path against plain diffusers on the same pipeline.

stc: :class:`stc.render.generation.Renderer` with a random concept of the model's text width
(as in ``tests/helpers.py``), ``render_requests``. Baseline: the pipeline's own ``__call__``
(``StableDiffusionPipeline``; ``StableDiffusionXLPipeline`` for SDXL) on the same components with
diffusers' stock attention processors. Same scheduler (DPM-Solver multistep), steps, size and CFG
7.5; both decode to PIL images.
"""

from __future__ import annotations

from dataclasses import dataclass

from .measure import FlopCount, ModuleTimer, Samples, alternate, instrumented, text_modules

CONCEPT = "bench"
STC_PROMPT = f"<{CONCEPT}> on the moon"
BASELINE_PROMPT = "a cat on the moon"  # the same length in tokens; 77 positions are encoded either way
CFG = 7.5


def random_concept(base, seed: int = 0):
    """A concept with a seeded random mapper for ``base``'s text width (nothing is trained)."""
    import torch

    from stc.method.mapper import MapperConfig, NeTIMapper
    from stc.method.spacetime import cross_attention_layer_names
    from stc.store.concept import Concept

    pipe = base.pipeline
    norms = [float(encoder.module.get_input_embeddings().weight[tokenizer.encode("cat", add_special_tokens=False)[0]]
                   .float().norm())
             for encoder, tokenizer in zip(base.backbone.text_encoders(pipe), base.backbone.tokenizers(pipe))]
    layers = len(cross_attention_layer_names(pipe.unet))
    config = MapperConfig.for_encoders(base.encoder_widths, norms, num_layers=layers)
    mapper = NeTIMapper(config, generator=torch.Generator().manual_seed(seed)).eval().requires_grad_(False)
    concept = Concept(
        name=CONCEPT, base_model=base.spec, initializer="cat", text_width=base.text_width,
        layer_names=cross_attention_layer_names(pipe.unet), mapper=config.to_dict(), weights_sha256="0" * 64,
    )
    return concept, mapper


@dataclass
class RenderResults:
    batch: int
    stc_time: Samples  # seconds per image
    base_time: Samples
    stc_denoise: Samples  # seconds per image without the VAE decode (timed by hooks in the same runs)
    base_denoise: Samples
    stc_flops: FlopCount
    base_flops: FlopCount
    stc_calls: int
    base_calls: int


class RenderBench:
    def __init__(self, base, stock_processors, steps: int, resolution: int, decode: bool = True):
        from stc.render.generation import Renderer

        self.base, self.steps, self.resolution, self.decode = base, steps, resolution, decode
        self.stock = stock_processors
        self.renderer = Renderer(base, {CONCEPT: random_concept(base)})
        self.spacetime = dict(base.pipeline.unet.attn_processors)

    def stc(self, batch: int):
        from stc.render.generation import RenderRequest, RenderSettings

        settings = RenderSettings(steps=self.steps, cfg=CFG, width=self.resolution, height=self.resolution,
                                  scheduler="dpm", batch_size=batch)
        requests = [RenderRequest(STC_PROMPT, seed) for seed in range(batch)]

        def run():
            self.base.pipeline.unet.set_attn_processor(dict(self.spacetime))
            if not self.decode:  # the same conditioning, batching and denoising path, without the decode
                latents = self.renderer.latents(STC_PROMPT, list(range(batch)), settings)
                assert latents.shape[0] == batch
                return latents
            images = self.renderer.render_requests(requests, settings)
            assert len(images) == batch
            return images

        return run

    def baseline(self, batch: int):
        import torch

        pipe = self.base.pipeline

        def run():
            pipe.unet.set_attn_processor(dict(self.stock))
            generators = [torch.Generator("cpu").manual_seed(seed) for seed in range(batch)]
            images = pipe(
                BASELINE_PROMPT, num_inference_steps=self.steps, guidance_scale=CFG, height=self.resolution,
                width=self.resolution, num_images_per_prompt=batch, generator=generators,
                output_type="pil" if self.decode else "latent",
            ).images
            assert len(images) == batch
            return images

        return run

    def measure(self, batch: int, repeats: int, device: str, log) -> RenderResults:
        pipe = self.base.pipeline
        modules = {"unet": pipe.unet, **text_modules(pipe), "vae decoder": pipe.vae.decoder,
                   "mapper": self.renderer.text.slots[CONCEPT].mapper}
        stc, baseline = self.stc(batch), self.baseline(batch)
        log(f"render batch {batch}, {self.steps} steps at {self.resolution}px: warm-up (FLOPs, calls)")
        with instrumented(device, pipe.text_encoder, modules) as stc_record:
            stc()
        with instrumented(device, pipe.text_encoder, modules) as base_record:
            baseline()
        timer = ModuleTimer({"decode": pipe.vae.decoder}, device)
        decode = {"stc": [], "baseline": []}

        def with_decode_time(fn, key):
            def run():
                with timer.session() as totals:
                    fn()
                decode[key].append(totals["decode"])

            return run

        stc_time, base_time = alternate(with_decode_time(stc, "stc"), with_decode_time(baseline, "baseline"),
                                        repeats, device, log, f"render bs{batch}")
        pipe.unet.set_attn_processor(dict(self.stock))

        def per_image(samples, minus=None):
            if minus is None:
                return Samples([v / batch for v in samples.values], [c / batch for c in samples.cpu])
            return Samples([(value - m) / batch for value, m in zip(samples.values, minus)])

        return RenderResults(
            batch=batch, stc_time=per_image(stc_time), base_time=per_image(base_time),
            stc_denoise=per_image(stc_time, decode["stc"]), base_denoise=per_image(base_time, decode["baseline"]),
            stc_flops=stc_record["flops"], base_flops=base_record["flops"],
            stc_calls=stc_record["calls"]["calls"], base_calls=base_record["calls"]["calls"],
        )
