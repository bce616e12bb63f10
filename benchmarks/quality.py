"""What the paper claims, measured in the shapes world: ``python -m benchmarks.quality``.

A concept is trained on ``builtin:shapes`` from ``examples/wedge`` (the world's held-out yellow
triangle) in four variants at equal steps, then rendered for N seeds per prompt, and every image
is read back with the world's pixel checker (``stc.worlds.shapes.read_image``):

- **fidelity**: of the images for "a photo of a <wedge>", the share that shows a yellow triangle
  (colour and shape read from the pixels);
- **editability**: of the images for "a <wedge> on a green background", the share whose
  background is green; *edit+concept* also asks that the yellow triangle is there;
- **recolour**: of the images for "a photo of a blue <wedge>", the share that shows a *blue*
  triangle: the edit that fights the concept's own colour.

Per truncation rank 1 ... 128 for NeTI (the paper's rank trade-off), at full rank for the
ablation: NeTI; NeTI without the textual bypass; NeTI without nested dropout; and textual
inversion as a constant mapper without bypass (only the output layer's bias learns: one vector
for every timestep and layer, as the NeTI paper's TI baseline), all with the same trainer,
steps, batches and seeds. The floors are the initializer word ("triangle") and the world's own
words for the held-out combination ("yellow triangle"), which it never saw together.

Results go to stdout, a JSON file and, with ``--write-md``, ``QUALITY.md`` with an SVG plot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ROOT / "examples" / "wedge"
MARKDOWN = ROOT / "QUALITY.md"
PLOT = ROOT / "docs" / "quality-ranks.svg"
RESULTS = ROOT / "benchmarks" / "results"
MODEL = "builtin:shapes"
NAME = "wedge"
INITIALIZER = "triangle"
RANKS = (1, 2, 4, 8, 16, 32, 64, 128)
VARIANTS = {
    "neti": dict(bypass=True, nested_dropout=True),
    "neti-no-bypass": dict(bypass=False, nested_dropout=True),
    "neti-no-nested-dropout": dict(bypass=True, nested_dropout=False),
    "textual-inversion": dict(bypass=False, nested_dropout=False),
}
FIDELITY_PROMPT = "a photo of a {}"
EDIT_PROMPT = "a {} on a green background"
RECOLOUR_PROMPT = "a photo of a blue {}"


@dataclass
class Scores:
    fidelity: float
    editability: float
    edit_and_concept: float
    n: int
    recolour: float = 0.0
    readings: dict = field(default_factory=dict, repr=False)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def make_constant(mapper) -> None:
    """Textual inversion as a mapper: the output layer's weight fixed at zero, only its bias
    learns, so the output is one vector for every (t, l) (normalised to the initializer's norm
    like every NeTI output)."""
    import torch

    with torch.no_grad():
        mapper.output_layer[0].weight.zero_()
    for name, parameter in mapper.named_parameters():
        parameter.requires_grad_(name == "output_layer.0.bias")


def train_variant(variant: str, steps: int, seed: int, device: str = "cpu"):
    """Train one variant with stc's Trainer on the example photos; returns (concept, mapper, record)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from stc.models.base import load_base_model
    from stc.store.concept import Concept
    from stc.train.config import TrainConfig
    from stc.train.images import load_photos
    from stc.train.trainer import Trainer

    try:
        AcceleratorState._reset_state(reset_partial_state=True)
    except Exception:  # older accelerate
        pass
    config = TrainConfig(steps=steps, seed=seed, initializer=INITIALIZER, **VARIANTS[variant])
    accelerator = Accelerator(gradient_accumulation_steps=config.grad_accum, cpu=(device == "cpu"))
    base = load_base_model(MODEL, device=device)
    photos = load_photos(PHOTOS, base.default_resolution)
    trainer = Trainer(base, photos.images, f"<{NAME}>", config, accelerator)
    if variant == "textual-inversion":
        make_constant(trainer.unwrapped_mapper)
    before = trainer.evaluate()
    start = time.time()
    losses = [trainer.train_step() for _ in range(steps)]
    seconds = time.time() - start
    after = trainer.evaluate()
    mapper = trainer.unwrapped_mapper.eval()
    concept = Concept(name=NAME, base_model=MODEL, initializer=INITIALIZER, text_width=base.text_width,
                      layer_names=trainer.layer_names, mapper=mapper.config.to_dict())
    record = {"steps": steps, "seconds": round(seconds, 1), "eval_loss_before": before, "eval_loss_after": after,
              "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:]))}
    return concept, mapper, record


def score(images, want_background: str | None, want_colour: str | None = None) -> Scores:
    from stc.worlds.shapes import HELD_OUT, read_image

    colour, shape = HELD_OUT
    readings = [read_image(image) for image in images]
    concept = [r.colour == colour and r.shape == shape for r in readings]
    edited = [r.background == want_background for r in readings] if want_background else [False] * len(readings)
    both = [a and b for a, b in zip(concept, edited)]
    recoloured = [want_colour is not None and r.colour == want_colour and r.shape == shape for r in readings]
    n = len(readings)
    counts: dict[str, int] = {}
    for r in readings:
        key = f"{r.colour} {r.shape} on {r.background}"
        counts[key] = counts.get(key, 0) + 1
    return Scores(sum(concept) / n, sum(edited) / n, sum(both) / n, n, sum(recoloured) / n,
                  dict(sorted(counts.items(), key=lambda kv: -kv[1])))


def measure(renderer, word: str, seeds: list[int], settings) -> Scores:
    """Fidelity from the plain prompt, editability from the background edit, and the recolouring
    (a triangle in the asked colour: the edit that fights the concept's own colour), for ``word``
    (a concept reference or plain words)."""
    plain = [r.image for r in renderer.render(FIDELITY_PROMPT.format(word), seeds, settings)]
    edits = [r.image for r in renderer.render(EDIT_PROMPT.format(word), seeds, settings)]
    blues = [r.image for r in renderer.render(RECOLOUR_PROMPT.format(word), seeds, settings)]
    fidelity = score(plain, None)
    edit = score(edits, "green")
    recolour = score(blues, None, "blue")
    return Scores(fidelity.fidelity, edit.editability, edit.edit_and_concept, len(seeds), recolour.recolour,
                  {"plain": fidelity.readings, "edit": edit.readings, "recolour": recolour.readings})


def render_plain(pipe, prompt: str, seeds: list[int], settings) -> list:
    """Images of ``prompt`` from a plain diffusers pipeline (no stc in the loop): the renders an
    exported textual-inversion file gives in another tool."""
    import torch

    from stc.models.schedulers import make_scheduler

    pipe.scheduler = make_scheduler(settings.scheduler, pipe.scheduler.config)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    images = []
    for start in range(0, len(seeds), settings.batch_size):
        batch = seeds[start : start + settings.batch_size]
        images += pipe([prompt] * len(batch), num_inference_steps=settings.steps, guidance_scale=settings.cfg,
                       height=size, width=size,
                       generator=[torch.Generator().manual_seed(seed) for seed in batch]).images
    return images


def measure_plain(pipe, word: str, seeds: list[int], settings) -> Scores:
    """:func:`measure` for a plain diffusers pipeline."""
    plain = score(render_plain(pipe, FIDELITY_PROMPT.format(word), seeds, settings), None)
    edit = score(render_plain(pipe, EDIT_PROMPT.format(word), seeds, settings), "green")
    recolour = score(render_plain(pipe, RECOLOUR_PROMPT.format(word), seeds, settings), None, "blue")
    return Scores(plain.fidelity, edit.editability, edit.edit_and_concept, len(seeds), recolour.recolour,
                  {"plain": plain.readings, "edit": edit.readings, "recolour": recolour.readings})


def measure_exports(concept, mapper, seeds: list[int], settings, fits: dict, folder: Path) -> dict:
    """The ti exports of ``concept`` (distilled with each of ``fits``, the plain average) written
    as stc export writes them, each loaded into a plain diffusers pipeline with
    ``load_textual_inversion`` and rendered there; the initializer word as the floor."""
    import torch

    from stc.exchange.distill import distil, mean_token
    from stc.exchange.ti import write_ti
    from stc.models.backbones import backbone_of
    from stc.models.base import load_base_model

    candidates, results = {}, {}
    for label, (samples, steps) in fits.items():
        base = load_base_model(MODEL)
        start = time.time()
        distilled = distil(base, concept, mapper, samples=samples, steps=steps)
        candidates[label] = distilled.vectors
        results[label] = {"seconds": round(time.time() - start, 1), "samples": samples, "fit_steps": steps,
                          "denoiser_error": distilled.fidelity.written_error,  # of what the export writes
                          "denoiser_error_average": distilled.fidelity.average, "written": distilled.fidelity.written}
        log(f"  distilled ({label}: {samples} samples, {steps} steps) in {results[label]['seconds']} s, "
            f"denoiser error {distilled.fidelity.distilled:.4f} (average {distilled.fidelity.average:.4f}); "
            f"writes {distilled.fidelity.written}")
    candidates["plain average"] = mean_token(mapper).unsqueeze(0)
    results["plain average"] = {}
    for label, vectors in candidates.items():
        path = folder / f"{label.replace(' ', '-')}.safetensors"
        pipe = load_base_model(MODEL).pipeline
        write_ti(vectors, path, MODEL, backbone_of(pipe))
        pipe.load_textual_inversion(str(path), token="<exported>")
        with torch.no_grad():
            results[label].update(vars(measure_plain(pipe, "<exported>", seeds, settings)))
        log(f"  export {label}: {_brief(results[label])}")
    with torch.no_grad():
        results["initializer word"] = vars(measure_plain(load_base_model(MODEL).pipeline, INITIALIZER, seeds, settings))
    log(f"  export floor (initializer word): {_brief(results['initializer word'])}")
    return results


def run(args) -> dict:
    import torch

    from stc.models.base import load_base_model
    from stc.render.generation import Renderer, RenderSettings
    if args.threads:
        os.environ["STC_THREADS"] = str(args.threads)  # load_base_model applies it (stc.models.threads)
    began = time.time()
    seeds = list(range(args.seeds))
    settings = RenderSettings(steps=args.render_steps, cfg=args.cfg, batch_size=args.batch_size)
    results: dict = {"variants": {}, "floors": {}}
    for word, label in ((INITIALIZER, "initializer word: triangle"),
                        ("yellow triangle", "the world's words: yellow triangle")):
        renderer = Renderer(load_base_model(MODEL), {})
        results["floors"][label] = vars(measure(renderer, word, seeds, settings))
        log(f"floor {label}: {_brief(results['floors'][label])}")
    for variant in args.variants:
        log(f"training {variant} ({args.steps} steps)")
        torch.manual_seed(args.seed)
        concept, mapper, record = train_variant(variant, args.steps, args.seed)
        log(f"  {record}")
        renderer = Renderer(load_base_model(MODEL), {NAME: (concept, mapper)})
        ranks = args.ranks if VARIANTS[variant]["nested_dropout"] else [max(RANKS)]
        per_rank = {}
        for rank in ranks:
            word = f"<{NAME}:{rank}>" if VARIANTS[variant]["nested_dropout"] else f"<{NAME}>"  # else: no ranks
            scores = measure(renderer, word, seeds, settings)
            per_rank[str(rank)] = vars(scores)
            log(f"  rank {rank}: {_brief(per_rank[str(rank)])}")
        results["variants"][variant] = {"training": record, "ranks": per_rank}
        if variant == "neti" and args.exports:
            from stc.exchange.common import FAST, THOROUGH

            log("exports: ti, loaded into plain diffusers")
            with tempfile.TemporaryDirectory(prefix="stc-quality-exports-") as folder:
                fits = {"distilled (fast, default)": FAST, "distilled (--thorough)": THOROUGH}
                if args.quick:
                    fits = {"distilled (fast, default)": (16, 3)}
                results["exports"] = measure_exports(concept, mapper, seeds, settings, fits, Path(folder))
    results["settings"] = {
        "model": MODEL, "steps": args.steps, "seeds": args.seeds, "seed": args.seed, "render_steps": args.render_steps,
        "cfg": args.cfg, "ranks": list(args.ranks), "variants": list(args.variants),
        "fidelity_prompt": FIDELITY_PROMPT.format(f"<{NAME}>"), "edit_prompt": EDIT_PROMPT.format(f"<{NAME}>"),
        "recolour_prompt": RECOLOUR_PROMPT.format(f"<{NAME}>"),
    }
    results["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                          "python": platform.python_version()}
    results["date"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    results["command"] = "python -m benchmarks.quality " + " ".join(args.argv)
    results["seconds"] = round(time.time() - began, 1)
    return results


def _brief(scores: dict) -> str:
    return (f"fidelity {scores['fidelity']:.2f}  editability {scores['editability']:.2f}  "
            f"edit+concept {scores['edit_and_concept']:.2f}  recolour {scores.get('recolour', 0):.2f}")


def table(results: dict) -> str:
    """Markdown: the rank trade-off, the ablation and the floors."""
    lines = ["**Rank trade-off (NeTI)**", "",
             "| rank | fidelity | editability | edit+concept | recolour |", "|---|---|---|---|---|"]
    neti = results["variants"].get("neti", {}).get("ranks", {})
    for rank, scores in neti.items():
        lines.append(f"| {rank} | " + " | ".join(_cells(scores)) + " |")
    lines += ["", "**Ablation at full rank (equal steps)**", "",
              "| variant | fidelity | editability | edit+concept | recolour "
              "| denoising loss on the photos (fixed noise) before → after |",
              "|---|---|---|---|---|---|"]
    for variant, data in results["variants"].items():
        full = data["ranks"][max(data["ranks"], key=int)]
        t = data["training"]
        lines.append(f"| {variant} | " + " | ".join(_cells(full))
                     + f" | {t['eval_loss_before']:.4f} → {t['eval_loss_after']:.4f} |")
    for label, scores in results["floors"].items():
        lines.append(f"| floor — {label} | " + " | ".join(_cells(scores)) + " | – |")
    exports = results.get("exports")
    if exports:
        lines += ["", "**`stc export --format ti` of the NeTI concept, loaded into a plain diffusers pipeline "
                  "(`load_textual_inversion`) and rendered there**", "",
                  "| export | fidelity | editability | edit+concept | recolour | relative denoiser error vs the "
                  "concept (stc's figure) | export time |", "|---|---|---|---|---|---|---|"]
        average_error = next((e["denoiser_error_average"] for e in exports.values() if "denoiser_error_average" in e),
                             None)
        for label, scores in exports.items():
            error = scores.get("denoiser_error", average_error if label == "plain average" else None)
            seconds = f"{scores['seconds']:.0f} s" if "seconds" in scores else "–"
            lines.append(f"| {label} | " + " | ".join(_cells(scores))
                         + f" | {'–' if error is None else f'{error:.4f}'} | {seconds} |")
    return "\n".join(lines)


def _cells(scores: dict) -> list[str]:
    n = scores["n"]
    return [f"{scores.get(key, 0.0):.2f} ({round(scores.get(key, 0.0) * n)}/{n})"
            for key in ("fidelity", "editability", "edit_and_concept", "recolour")]


def svg_plot(results: dict) -> str:
    """Fidelity and editability of NeTI against the rank (log scale), as a small SVG."""
    neti = results["variants"].get("neti", {}).get("ranks", {})
    ranks = sorted(int(r) for r in neti)
    width, height, left, bottom, top, right = 480, 300, 50, 40, 20, 130
    plot_w, plot_h = width - left - right, height - top - bottom
    span = max(1e-9, math.log2(max(ranks)) - math.log2(min(ranks))) if ranks else 1

    def x(rank):
        return left + (math.log2(rank) - math.log2(min(ranks))) / span * plot_w

    def y(value):
        return top + (1 - value) * plot_h

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="11"><rect width="100%" height="100%" fill="white"/>']
    for value in (0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<line x1="{left}" y1="{y(value):.1f}" x2="{left + plot_w}" y2="{y(value):.1f}" stroke="#ddd"/>'
                     f'<text x="{left - 6}" y="{y(value) + 4:.1f}" text-anchor="end">{value:g}</text>')
    for rank in ranks:
        parts.append(f'<text x="{x(rank):.1f}" y="{top + plot_h + 16}" text-anchor="middle">{rank}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle">truncation rank</text>')
    series = (("fidelity", "#d62728"), ("editability", "#1f77b4"), ("edit_and_concept", "#2ca02c"),
              ("recolour", "#9467bd"))
    for index, (key, colour) in enumerate(series):
        points = " ".join(f"{x(r):.1f},{y(neti[str(r)].get(key, 0.0)):.1f}" for r in ranks)
        parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for r in ranks:
            parts.append(f'<circle cx="{x(r):.1f}" cy="{y(neti[str(r)].get(key, 0.0)):.1f}" r="3" fill="{colour}"/>')
        ly = top + 14 + index * 18
        parts.append(f'<line x1="{left + plot_w + 10}" y1="{ly - 4}" x2="{left + plot_w + 28}" y2="{ly - 4}" '
                     f'stroke="{colour}" stroke-width="2"/><text x="{left + plot_w + 32}" y="{ly}">'
                     f'{key.replace("_", "+").replace("edit+and+concept", "edit+concept")}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def write_markdown(results: dict, path: Path = MARKDOWN, plot: Path = PLOT) -> None:
    plot.parent.mkdir(parents=True, exist_ok=True)
    plot.write_text(svg_plot(results), encoding="utf-8")
    begin, end = "<!-- BEGIN GENERATED: python -m benchmarks.quality --write-md -->", "<!-- END GENERATED -->"
    s = results["settings"]
    m = results["machine"]
    generated = "\n".join([
        begin, "",
        f"Latest run: **{results['date']}**, {m['cpu']}, {m['cores']} cores, torch {m['torch']} "
        f"({m['torch_threads']} threads), Python {m['python']}; {results['seconds']:.0f} s in all.",
        "", "```bash", results["command"], "```", "",
        f"Concept trained {s['steps']} steps per variant (seed {s['seed']}); {s['seeds']} seeds per prompt; "
        f"{s['render_steps']} DPM-Solver++ steps, CFG {s['cfg']}. Fidelity prompt `{s['fidelity_prompt']}`, "
        f"edit prompt `{s['edit_prompt']}`, recolour prompt `{s['recolour_prompt']}`.", "",
        table(results), "",
        f"![fidelity and editability against the truncation rank]({os.path.relpath(plot, path.parent)})", "",
        end,
    ])
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + generated + rest.split(end, 1)[1]
    else:
        text = text + ("\n" if text else "") + generated + "\n"
    path.write_text(text, encoding="utf-8")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps per variant (default 200, the README's)")
    parser.add_argument("--seeds", type=int, default=32, help="images per prompt (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    parser.add_argument("--ranks", default=",".join(map(str, RANKS)), help="NeTI truncation ranks to measure")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"some of {', '.join(VARIANTS)}")
    parser.add_argument("--render-steps", type=int, default=20, help="denoising steps per image (default 20)")
    parser.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance (default 5)")
    parser.add_argument("--batch-size", type=int, default=16, help="images rendered at once (default 16)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: stc's choice)")
    parser.add_argument("--no-exports", dest="exports", action="store_false",
                        help="skip the ti exports rendered by plain diffusers (fast and thorough distillation)")
    parser.add_argument("--quick", action="store_true", help="10 steps, 2 seeds, ranks 1 and 128: checks that it runs")
    parser.add_argument("--json", type=Path, default=None,
                        help="results file (default benchmarks/results/quality.json)")
    parser.add_argument("--write-md", action="store_true", help="rewrite the generated part of QUALITY.md and the plot")
    args = parser.parse_args(argv)
    args.argv = list(argv)
    if args.quick:
        args.steps, args.seeds, args.ranks, args.render_steps = 10, 2, "1,128", 4
    args.ranks = [int(r) for r in str(args.ranks).split(",") if r.strip()]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"--variants: unknown {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")
    if any(r < 1 or r > max(RANKS) for r in args.ranks):
        parser.error(f"--ranks must lie in 1..{max(RANKS)}")
    if args.steps < 1 or args.seeds < 1:
        parser.error("--steps and --seeds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="stc-quality-") as home:
        os.environ.setdefault("STC_HOME", home)  # nothing is saved, but never touch the user's registry
        results = run(args)
    print(table(results))
    out = args.json or RESULTS / ("quality-quick.json" if args.quick else "quality.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    log(f"wrote {out}")
    if args.write_md:
        write_markdown(results)
        log(f"wrote {MARKDOWN.name} and {PLOT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
