"""The cost of stc's ComfyUI node: ComfyUI sampling with it against without (same random-weight SD 1.5
single file, sampler, steps, seed), as a ratio, next to its FLOP floor (the extra text-encoder
rows: every (sampled timestep, layer) of the prompt, against the UNet's own FLOPs).

    STC_COMFYUI=~/ComfyUI STC_COMFYUI_PYTHON=~/ComfyUI/venv/bin/python python -m benchmarks.comfyui_cost [SIZE REPEATS]

Prints one Markdown table row (BENCHMARKS.md, "ComfyUI node").
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"


def flops(checkpoint: Path, comfyui: str, size: int) -> tuple[float, float]:
    """(FLOPs of one CLIP row of 77 tokens, of one UNet call on a batch of 2 at ``size`` px)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from stc.models.base import load_base_model

    base = load_base_model(str(checkpoint), device="cpu", config=str(Path(comfyui) / "comfy" / "sd1_tokenizer"))
    pipe = base.pipeline
    with torch.no_grad():
        with FlopCounterMode(display=False) as text:
            pipe.text_encoder(torch.zeros(1, 77, dtype=torch.long))
        context = torch.zeros(2, 77, 768)
        with FlopCounterMode(display=False) as unet:
            pipe.unet(torch.zeros(2, 4, size // 8, size // 8), torch.tensor([500, 500]), encoder_hidden_states=context)
    return float(text.get_total_flops()), float(unet.get_total_flops())


def main(size: int = 64, repeats: int = 3) -> str:
    import torch

    sys.path.insert(0, str(TESTS))
    os.environ.setdefault("STC_COMFYUI", "")
    comfyui = os.environ["STC_COMFYUI"]
    if not comfyui:
        raise SystemExit("set STC_COMFYUI=<ComfyUI checkout> (and STC_COMFYUI_PYTHON)")
    import test_comfyui_real as real

    from stc.exchange.concept_file import file_bytes
    from stc.hosts.comfyui import pack_files
    from stc.method.mapper import MapperConfig, NeTIMapper
    from stc.models.backbones import SD1
    from stc.store.concept import Concept

    checkpoint = real.single_file()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        (work / "pack").mkdir()
        for name, text in pack_files().items():
            (work / "pack" / name).write_text(text, encoding="utf-8")
        config = MapperConfig.for_encoders([768], [0.38])
        mapper = NeTIMapper(config, generator=torch.Generator().manual_seed(5))
        concept = Concept(name="cat", base_model=str(checkpoint), initializer="cat", text_width=768,
                          layer_names=list(SD1.layer_names), mapper=config.to_dict())
        (work / "cat.safetensors").write_bytes(file_bytes(concept, mapper.state_dict(), SD1))
        out = work / "timing.pt"
        subprocess.run([real.PYTHON, str(TESTS / "comfyui_probe.py"), comfyui, str(checkpoint), str(work / "pack"),
                        str(work / "cat.safetensors"), str(out), "timing", str(size), str(repeats)], check=True,
                       cwd=comfyui, env={**os.environ, "PYTHONPATH": ""})
        data = torch.load(out, weights_only=False)
    plain, stc = statistics.median(data["times"]["plain"]), statistics.median(data["times"]["stc"])
    text_flops, unet_flops = flops(checkpoint, comfyui, size)
    evaluations = data["steps"]  # euler: one UNet call (both CFG halves in one batch) per step
    # the baseline encodes its prompt once (CLIPTextEncode: one row); the node every (t, layer) it caches
    floor = (evaluations * unet_flops + data["rows"] * text_flops) / (evaluations * unet_flops + text_flops)
    ratio = stc / plain
    return (f"| ComfyUI sampling with the stc node vs without, SD 1.5, {size} px, {data['steps']} euler steps, "
            f"CFG [fp32, CPU] | {stc:.2f} s | {plain:.2f} s | {ratio:.2f}× | {floor:.2f}× ({data['rows']} text rows of "
            f"{text_flops / 1e9:.1f} GFLOP; UNet {unet_flops / 1e9:.0f} GFLOP per call) | {ratio / floor:.2f} | "
            f"{min(data['times']['stc']):.2f}–{max(data['times']['stc']):.2f} s / "
            f"{min(data['times']['plain']):.2f}–{max(data['times']['plain']):.2f} s |")


if __name__ == "__main__":
    arguments = [int(value) for value in sys.argv[1:3]]
    print(main(*arguments))
