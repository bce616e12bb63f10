"""Runs inside a stock ComfyUI environment (its venv, no stc): loads a single-file checkpoint
with ComfyUI's own checkpoint loader, applies stc's nodes (the stc_nodes.py an install writes),
samples a few steps at 64 px with ComfyUI's sampler, and records the key and value inputs of
every cross-attention. tests/test_comfyui_real.py runs it and compares with stc's encodings.

usage: python comfyui_probe.py COMFYUI CHECKPOINT PACK CONCEPT_FILE OUT.pt [timing SIZE REPEATS]
(timing: benchmarks/comfyui_cost.py)
"""

import sys
import time

COMFYUI, CHECKPOINT, PACK, CONCEPT, OUT = sys.argv[1:6]
TIMING = len(sys.argv) > 6 and sys.argv[6] == "timing"
SIZE, REPEATS = (int(sys.argv[7]), int(sys.argv[8])) if TIMING else (64, 1)
sys.argv = ["main.py", "--cpu", "--force-fp32"]
sys.path[:0] = [COMFYUI, PACK]
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402
import stc_nodes  # noqa: E402
import torch  # noqa: E402

assert "stc" not in sys.modules and "diffusers" not in sys.modules
torch.manual_seed(0)
PROMPT, OTHER = "a photo of <cat> on the moon", "a photo of a dog on the moon"
STEPS, SEED, CFG = 3, 7, 5.0

model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(CHECKPOINT, output_vae=False, output_clip=True,
                                                          embedding_directory=None)
latent = torch.zeros(1, 4, SIZE // 8, SIZE // 8)  # 64 px unless timing
noise = comfy.sample.prepare_noise(latent, SEED)


def encode(text):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def sample(patched, positive, negative):
    started = time.perf_counter()
    out = comfy.sample.sample(patched, noise, STEPS, CFG, "euler", "normal", positive, negative, latent, seed=SEED,
                              disable_pbar=True)
    return out, time.perf_counter() - started


negative = encode("")
plain_positive = encode(PROMPT)
concept = stc_nodes.LoadedConcept(CONCEPT, rank=0)
patched, positive = stc_nodes.apply_concepts(model, clip, [concept], PROMPT)
patch = patched.model_options["transformer_options"]["patches"]["attn2_patch"][-1]
records = []


def recorder(n, context, value, extra_options):
    """Chained after stc's patch: what to_k and to_v get."""
    records.append({"layer": extra_options["transformer_index"], "sigma": float(extra_options["sigmas"][0]),
                    "cond_or_uncond": list(extra_options["cond_or_uncond"]), "keys": context.detach().clone(),
                    "values": value.detach().clone()})
    return n, context, value


sampling = model.get_model_object("model_sampling")
if TIMING:  # the node's cost: sampling with it against without, same model, steps and sampler
    times = {"plain": [], "stc": []}  # the prompt's encoding included: CLIPTextEncode, or the stc node
    for _ in range(REPEATS):
        started = time.perf_counter()
        plain_cond = encode(PROMPT)
        times["plain"].append(time.perf_counter() - started + sample(model, plain_cond, negative)[1])
        started = time.perf_counter()
        fresh, cond = stc_nodes.apply_concepts(model, clip, [concept], PROMPT)  # a fresh cache each run
        times["stc"].append(time.perf_counter() - started + sample(fresh, cond, negative)[1])
    torch.save({"times": times, "steps": STEPS, "size": SIZE, "rows": len(fresh.model_options["transformer_options"][
        "patches"]["attn2_patch"][-1].cache) * 16}, OUT)
    sys.exit(0)

recording = patched.clone()
recording.set_model_attn2_patch(recorder)
with_concept, _ = sample(recording, positive, negative)
again, _ = sample(patched, positive, negative)
stock, _ = sample(model, plain_positive, negative)
identity = model.clone()
identity.set_model_attn2_patch(lambda n, context, value, extra_options: (n, context, value))
with_identity, _ = sample(identity, plain_positive, negative)
other_prompt = encode(OTHER)  # the patched model sampling another prompt: the patch finds no row of its own
stock_other, _ = sample(model, other_prompt, negative)
patched_other, _ = sample(patched, other_prompt, negative)
tokenizers = stc_nodes.comfy_text_models(clip)[1]
torch.save({
    "records": records, "prompt": PROMPT, "input_ids": patch.input_ids[0].cpu(), "placeholder": sorted(patch.slots)[0],
    "timesteps": {s: float(sampling.timestep(torch.tensor(s))) for s in {r["sigma"] for r in records}},
    "with_concept": with_concept, "again": again, "stock": stock, "with_identity": with_identity,
    "stock_other": stock_other, "patched_other": patched_other, "plain_positive": plain_positive[0][0],
    "concept_positive": positive[0][0], "pad_token": tokenizers[0].pad_token, "comfy_dtype": str(
        model.model.diffusion_model.dtype if hasattr(model.model.diffusion_model, "dtype") else "?"),
}, OUT)
print("recorded", len(records), "cross-attention calls")
