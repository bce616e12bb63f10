"""stc gen, stc grid."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from ..models.schedulers import SCHEDULERS
from ..render.generation import RenderSettings
from ..settings import RANDOM_SEED, draw_seed
from ._base import (
    DeviceOpt,
    JsonOpt,
    ModelConfigOpt,
    ModelOpt,
    PredictionTypeOpt,
    app,
    command_env,
    err,
    handle_errors,
    open_registry,
    out,
    print_record,
    progress_bar,
    quiet_libraries,
)

# Rendering options shared by gen and grid; their defaults live in RenderSettings only --------
_DEFAULTS = RenderSettings()


def _render_option(flag: str, help: str, default=None):
    shown = f"  [default: {default}]" if default not in (None, "") else ""
    return typer.Option(flag, help=help + shown, show_default=False)


BatchSizeOpt = Annotated[
    Optional[int], _render_option("--batch-size", "Images per UNet batch (CFG halves are batched on top).",
                                  _DEFAULTS.batch_size)
]
StepsOpt = Annotated[Optional[int], _render_option("--steps", "Denoising steps.", _DEFAULTS.steps)]
CfgOpt = Annotated[Optional[float], _render_option("--cfg", "Classifier-free guidance scale.", _DEFAULTS.cfg)]
NegativeOpt = Annotated[Optional[str], _render_option(
    "--negative", "Negative prompt; may use concepts and imported embeddings (--negative \"<easynegative>, "
    "blurry\", after stc import easynegative.safetensors), each at its inline rank or in full.")]
WidthOpt = Annotated[Optional[int], _render_option("--width", "Width in px, a multiple of 8.", "the model's")]
HeightOpt = Annotated[Optional[int], _render_option("--height", "Height in px, a multiple of 8.", "the model's")]
SchedulerOpt = Annotated[
    Optional[str], _render_option("--scheduler", f"{', '.join(SCHEDULERS)}.", _DEFAULTS.scheduler)
]
InitImageOpt = Annotated[Optional[Path], typer.Option(
    "--init-image", help="img2img: start from this photo (resized to --width/--height, else the model's size) "
    "instead of noise, as diffusers' img2img pipelines do; --strength says how much of it is redrawn.")]
StrengthOpt = Annotated[Optional[float], _render_option(
    "--strength", "With --init-image: the part of the schedule that runs, 0 (the photo as it is, through the "
    "VAE) to 1 (all steps from noise: the photo is not used); the webui's denoising strength.",
    _DEFAULTS.strength)]
LoraOpt = Annotated[Optional[list[str]], typer.Option(
    "--lora", show_default=False, metavar="FILE[:WEIGHT]",
    help="A LoRA to render with, FILE[:WEIGHT] (weight 1 when none is given; repeatable): a "
    "kohya/webui or diffusers/peft .safetensors for the model's family (SD 1.x, 2.x, SDXL; another family's is "
    "refused before anything loads). In the prompt, <lora:NAME:WEIGHT> loads NAME.safetensors from the LoRA "
    "folder, as in the webui.")]
LoraDirOpt = Annotated[Optional[Path], typer.Option(
    "--lora-dir", help="The folder <lora:NAME> tags are looked up in.  [default: loras: in $STC_HOME/config.yaml]")]
ForceSizeOpt = Annotated[
    bool, typer.Option("--force-size", help="Render a size far outside the model's range (more than 8x its "
                       "resolution on a side, or 16x its pixels), which is otherwise refused with the memory it "
                       "would take.")
]
DtypeOpt = Annotated[
    Optional[str], typer.Option("--dtype", help="fp32, fp16 or bf16.  [default: fp16 on GPU, fp32 on CPU]")
]


def _settings(**given) -> RenderSettings:
    """RenderSettings from the options given (None: the library's default)."""
    return RenderSettings(**{key: value for key, value in given.items() if value is not None})


def _img2img(init_image, strength) -> dict:
    """The img2img settings of --init-image / --strength; the photo is read here, before any model loads."""
    from ..errors import BadInput
    from ..render.generation import load_init_image

    if init_image is None:
        if strength is not None:
            raise BadInput("--strength applies to img2img: give the photo with --init-image")
        return {}
    load_init_image(init_image)
    return {"init_image": str(Path(init_image).resolve()), "strength": strength}  # recorded: --from finds it


def _loras(prompts, options, folder, env) -> list:
    """The LoRAs of --lora and the prompts' <lora:NAME> tags; files and names are checked here."""
    from ..render.loras import parse_lora_option, render_loras
    from ..settings import lora_folder

    folder = folder if folder is not None else lora_folder(env)
    return render_loras(prompts, [parse_lora_option(value) for value in options or []], folder)


def _load_renderer(requests, settings, model, model_config, device, dtype, env, force_size=False, loras=()):
    quiet_libraries()
    from ..models.sizes import check_size
    from ..render.generation import Renderer

    if not force_size:  # a side no model could take: before anything loads
        check_size(settings.width, settings.height, "--width/--height")

    from ..errors import Interrupted

    try:
        with err.status("loading concepts") as status:
            renderer = Renderer.from_registry(
                requests, settings, registry=open_registry(env), model=model,
                model_config=str(model_config) if model_config else None, device=device, dtype=dtype,
                on_status=lambda message: status.update(message), env=env, loras=loras,
            )
    except KeyboardInterrupt:
        raise Interrupted("stopped while loading the model, before the first image: nothing was written and "
                          "nothing changed") from None
    if not force_size:
        renderer.check_size(settings)
    if not renderer.concepts:
        err.print("[dim]No <concept> in the prompt: rendering plain Stable Diffusion.[/]")
    for note in renderer.notes + renderer.size_warnings(settings):
        err.print(f"[dim]Note: {escape(note)}[/]", soft_wrap=True)
    return renderer


@app.command()
@handle_errors
def gen(
    ctx: typer.Context,
    prompt: Annotated[
        Optional[str],
        typer.Argument(help="Prompt; <name> uses a concept (several may appear), <name:8> sets its rank; "
                       "(word:1.3), (word) and [word] weight words as the A1111 webui does. Optional with --from."),
    ] = None,
    rank: Annotated[
        Optional[int],
        typer.Option(
            "--rank",
            "-r",
            help="Truncation rank for every concept, from 1 to its maximum (128 for concepts trained by stc): "
            "small = more editable, the maximum = full fidelity.  [default: full]",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[Optional[int], typer.Option(
        "--seed", "-s", show_default=False, help="Random seed; the same seed gives the same result. -1 draws one "
        "at random (as the A1111 webui does), prints it and records it in the PNG.  [default: 0]")] = None,
    from_image: Annotated[Optional[Path], typer.Option(
        "--from", help="Render again the image a PNG was made with: its parameters (stc's PNGs and the A1111 "
        "webui's) give the prompt, negative prompt, seed, steps, CFG, size, sampler, model and rank; every "
        "option given here overrides them (--from a.png --seed 5).")] = None,
    num_images: Annotated[
        int, typer.Option("-n", "--num-images", help="Images to render (seeds S, S+1, ...).")
    ] = 1,
    batch_size: BatchSizeOpt = None,
    steps: StepsOpt = None,
    cfg: CfgOpt = None,
    negative: NegativeOpt = None,
    width: WidthOpt = None,
    height: HeightOpt = None,
    scheduler: SchedulerOpt = None,
    init_image: InitImageOpt = None,
    strength: StrengthOpt = None,
    lora: LoraOpt = None,
    lora_dir: LoraDirOpt = None,
    model: ModelOpt = None,
    model_config: ModelConfigOpt = None,
    device: DeviceOpt = None,
    prediction_type: PredictionTypeOpt = None,
    dtype: DtypeOpt = None,
    force_size: ForceSizeOpt = False,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for the PNG files.")] = Path("stc-out"),
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON record per image (path and parameters).")
    ] = False,
) -> None:
    """Render images of a prompt; prints the paths of the PNG files (never overwrites)."""
    from ..errors import BadInput, Interrupted
    from ..outputs import check_folder
    from ..render.generation import RenderRequest
    from ..render.pngmeta import save_png

    if num_images < 1:
        raise BadInput(f"-n must be at least 1, got {num_images}")
    if from_image is not None:
        from ..render.pngmeta import recipe_from_png

        recipe = recipe_from_png(from_image)
        for note in recipe.notes:
            err.print(f"[dim]Note: {escape(note)}[/]", soft_wrap=True)
        lora = lora or recipe.loras
        prompt, negative, seed, steps, cfg, width, height, scheduler, model, rank, init_image, strength = (
            given if given is not None else recorded for given, recorded in (
                (prompt, recipe.prompt), (negative, recipe.negative), (seed, recipe.seed), (steps, recipe.steps),
                (cfg, recipe.cfg), (width, recipe.width), (height, recipe.height), (scheduler, recipe.scheduler),
                (model, recipe.model), (rank, recipe.rank), (init_image, recipe.init_image),
                (strength, recipe.strength)))
    if prompt is None:
        raise BadInput('give a PROMPT (stc gen "a <name> on the moon") or --from IMAGE.png')
    seed = 0 if seed is None else seed
    if seed == RANDOM_SEED:
        seed = draw_seed(seed)
        err.print(f"Seed: {seed} (drawn at random; --seed {seed} renders the same image again)", markup=False,
                  highlight=False)
    settings = _settings(
        steps=steps, cfg=cfg, width=width, height=height, scheduler=scheduler, negative=negative,
        rank=rank, batch_size=batch_size, **_img2img(init_image, strength),
    )
    requests = [RenderRequest(prompt, image_seed) for image_seed in range(seed, seed + num_images)]
    check_folder(out_dir)  # before anything loads
    env = command_env(ctx, prediction_type=prediction_type)
    loras = _loras([prompt], lora, lora_dir, env)
    renderer = _load_renderer(requests, settings, model, model_config, device, dtype, env, force_size, loras)
    saved = 0
    try:
        with progress_bar(f"rendering {num_images} image(s)", "denoising steps") as progress:
            for rendered in renderer.iter_render(requests, settings, progress=progress):
                path = save_png(rendered, out_dir)  # each image as soon as it is done
                saved += 1
                if as_json:
                    print_record({"path": str(path), **rendered.metadata})
                else:
                    out.print(str(path), markup=False, highlight=False, soft_wrap=True)
    except KeyboardInterrupt:
        if not saved:
            raise Interrupted(f"rendering stopped before the first image was finished: nothing was written to "
                              f"{out_dir} and nothing changed") from None
        raise Interrupted(f"rendering stopped: {saved} of {num_images} image(s) were finished and saved in "
                          f"{out_dir}") from None


@app.command()
@handle_errors
def grid(
    ctx: typer.Context,
    prompt: Annotated[
        Optional[str],
        typer.Argument(help="Prompt with one or more <concept>s (or use --prompts FILE)."),
    ] = None,
    ranks: Annotated[
        str, typer.Option("--ranks", help="Comma-separated ranks, one column each (ranges like 1-4 work too).")
    ] = "1,2,4,8,16,32,64,128",
    seeds: Annotated[
        Optional[str],
        typer.Option(
            "--seeds",
            help="Comma-separated seeds, one row each.  [default: 0,1,2,3; with --prompts: 0]",
        ),
    ] = None,
    prompts_file: Annotated[
        Optional[Path],
        typer.Option(
            "--prompts",
            help="A text file with one prompt per line (# comments, blank lines skipped): one row per "
            "prompt and seed.",
        ),
    ] = None,
    out_file: Annotated[
        Optional[Path],
        typer.Option("--out", "-o", help="The grid PNG; cells go in a "
                     "folder of the same name beside it.  [default: stc-out/grid-<prompt>.png]"),
    ] = None,
    batch_size: BatchSizeOpt = None,
    steps: StepsOpt = None,
    cfg: CfgOpt = None,
    negative: NegativeOpt = None,
    width: WidthOpt = None,
    height: HeightOpt = None,
    scheduler: SchedulerOpt = None,
    init_image: InitImageOpt = None,
    strength: StrengthOpt = None,
    lora: LoraOpt = None,
    lora_dir: LoraDirOpt = None,
    model: ModelOpt = None,
    model_config: ModelConfigOpt = None,
    device: DeviceOpt = None,
    prediction_type: PredictionTypeOpt = None,
    dtype: DtypeOpt = None,
    force_size: ForceSizeOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Render a truncation grid (ranks x seeds, or ranks x prompts); prints the grid's path."""
    from ..errors import BadInput, Interrupted
    from ..outputs import check_folder
    from ..render.grid import (
        DEFAULT_SEEDS,
        GridOutput,
        default_grid_path,
        free_grid_path,
        grid_requests,
        parse_ranks,
        parse_seeds,
        read_prompts,
        render_grid,
    )

    if (prompt is None) == (prompts_file is None):
        raise BadInput("give a PROMPT or --prompts FILE (one of them, not both)")
    prompts = read_prompts(prompts_file) if prompts_file else [prompt]
    rank_list = parse_ranks(ranks)
    if seeds is not None:
        seed_list = parse_seeds(seeds)
    else:
        seed_list = [0] if prompts_file else list(DEFAULT_SEEDS)
    settings = _settings(
        steps=steps, cfg=cfg, width=width, height=height, scheduler=scheduler, negative=negative,
        batch_size=batch_size, **_img2img(init_image, strength),
    )
    requests = grid_requests(prompts, rank_list, seed_list)  # an empty prompt fails here
    target = free_grid_path(out_file or default_grid_path(prompts, prompts_file))  # a bad --out fails first
    check_folder(target.parent)
    env = command_env(ctx, prediction_type=prediction_type)
    loras = _loras(prompts, lora, lora_dir, env)
    renderer = _load_renderer(requests, settings, model, model_config, device, dtype, env, force_size, loras)
    cells = len(prompts) * len(seed_list) * len(rank_list)
    description = f"rendering a {len(rank_list)}x{len(prompts) * len(seed_list)} grid ({cells} cells)"
    output = GridOutput(target)
    try:
        with progress_bar(description, "denoising steps") as progress:
            result = render_grid(renderer, prompts, rank_list, seed_list, settings, progress=progress,
                                 on_cell=output.write_cell)
        saved = output.finish(result)
    except KeyboardInterrupt:
        if not output.written:
            raise Interrupted("the grid stopped before its first cell was finished: nothing was written and nothing "
                              "changed") from None
        raise Interrupted(f"the grid stopped: {len(output.written)} of {cells} cell image(s) were finished and "
                          f"saved in {output.folder}; the grid image itself was not written") from None
    err.print(f"{len(saved.images)} cell image{'s' if len(saved.images) != 1 else ''} in {saved.folder}",
              style="dim", markup=False, highlight=False)
    if as_json:
        print_record({
            "path": str(saved.path), "folder": str(saved.folder), "prompts": prompts, "ranks": rank_list,
            "seeds": seed_list, "images": [str(path) for path in saved.images],
        })
    else:
        out.print(str(saved.path), markup=False, highlight=False, soft_wrap=True)
