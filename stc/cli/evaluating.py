"""stc eval."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from ._base import DeviceOpt, JsonOpt, ModelOpt, app, command_env, err, handle_errors, open_registry, out, print_json
from .render import BatchSizeOpt, CfgOpt, DtypeOpt, SchedulerOpt, StepsOpt


@app.command("eval")
@handle_errors
def eval_command(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The concept to measure.")],
    kind: Annotated[str, typer.Option("--kind", help="object or style: the default prompt list (the shapes world "
                                      "has its own).")] = "object",
    prompts_file: Annotated[Optional[Path], typer.Option(
        "--prompts", help="A text file of prompts, one per line, naming the concept as {} or <name>.")] = None,
    ranks: Annotated[Optional[str], typer.Option(
        "--ranks", help="Comma-separated ranks.  [default: 1,2,4,...,128, up to the concept's maximum]",
        show_default=False)] = None,
    seeds: Annotated[str, typer.Option("--seeds", help="Comma-separated seeds (ranges like 0-3 work too).")] = "0-3",
    clip_model: Annotated[Optional[str], typer.Option(
        "--clip-model", help="CLIP model for image and text similarity: a hub id, a folder or a cached id.  "
        "[default: openai/clip-vit-base-patch32; none on the shapes world]", show_default=False)] = None,
    dino: Annotated[bool, typer.Option("--dino", help="Also DINO image similarity (DreamBooth's measure).")] = False,
    dino_model: Annotated[str, typer.Option("--dino-model", help="DINO model for --dino.")] = "facebook/dino-vits16",
    photos: Annotated[Optional[Path], typer.Option(
        "--photos", help="The concept's photos.  [default: the folder it was trained from]",
        show_default=False)] = None,
    out_dir: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Folder for the images, scores and plots.  [default: stc-out/eval-<name>]",
        show_default=False)] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Finish (or re-score) the eval in --out: renders only the images it lacks.")] = False,
    record: Annotated[bool, typer.Option(
        "--record/--no-record", help="Record the result with the concept (stc show lists it).")] = True,
    steps: StepsOpt = None,
    cfg: CfgOpt = None,
    batch_size: BatchSizeOpt = None,
    scheduler: SchedulerOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Measure a concept at several ranks (CLIP image/text similarity, the shapes checker) and suggest a rank."""
    from ..errors import BadInput, Interrupted
    from ..evaluation.protocol import EvalFolder

    env = command_env(ctx)
    registry = open_registry(env)
    concept = registry.load(name)
    folder = EvalFolder(out_dir or Path("stc-out") / f"eval-{name}")
    if resume:
        if not folder.exists():
            raise BadInput(f"--resume: {folder.folder} holds no eval; run stc eval {name} --out {folder.folder}")
        plan, _, _ = folder.read()
        if plan.concept != name:
            raise BadInput(f"--resume: {folder.folder} is an eval of {plan.concept!r}, not {name!r}")
        if plan.weights_sha256 and concept.weights_sha256 and plan.weights_sha256 != concept.weights_sha256:
            raise BadInput(f"{name} was retrained since the eval in {folder.folder} started; start a new one with "
                           "another --out")
        err.print(f"[dim]Resuming the eval in {escape(str(folder.folder))} with its own prompts, ranks, seeds and "
                  f"render settings ({len(plan.cells())} images); only what is missing is rendered or scored.[/]")
    else:
        if folder.exists():
            raise BadInput(f"{folder.folder} holds an eval already: finish or re-score it with --resume, or choose "
                           "another --out")
        plan = _new_plan(concept, kind, prompts_file, ranks, seeds, model,
                         dict(steps=steps, cfg=cfg, batch_size=batch_size, scheduler=scheduler))
    scorers, notes = _scorers(concept, plan, clip_model, dino, dino_model, photos, env, device)
    for note in notes:
        err.print(f"[dim]Note: {escape(note)}[/]", soft_wrap=True)
    results, done = _run(plan, folder, scorers, model, device, dtype, env)
    if done is not None:
        raise Interrupted(done)
    _finish(registry, plan, results, folder, record, as_json)


def _new_plan(concept, kind, prompts_file, ranks, seeds, model, given):
    from ..errors import BadInput
    from ..evaluation.protocol import DEFAULT_RANKS, EvalPlan, default_prompts, is_shapes_world, prompt_templates
    from ..render.generation import RenderSettings
    from ..render.grid import parse_ranks, parse_seeds, read_prompts

    rank_max = concept.rank_max
    if rank_max is None:
        raise BadInput(f"{concept.name} was trained without nested dropout: it has no ranks to compare")
    if ranks:
        rank_list = parse_ranks(ranks)
        too_high = [rank for rank in rank_list if rank > rank_max]
        if too_high:
            raise BadInput(f"--ranks {', '.join(map(str, too_high))}: {concept.name}'s ranks go up to {rank_max}")
    else:
        rank_list = sorted({rank for rank in DEFAULT_RANKS if rank <= rank_max} | {rank_max})
    spec = model or concept.base_model
    if prompts_file is not None:
        prompts, source = read_prompts(prompts_file), str(prompts_file)
    else:
        prompts, source = default_prompts(kind, spec), ("shapes" if is_shapes_world(spec) else kind)
    settings = RenderSettings(**{key: value for key, value in given.items() if value is not None})  # gen's defaults
    return EvalPlan(concept=concept.name, model=spec, initializer=concept.initializer,
                    prompts=prompt_templates(prompts, concept.token), prompt_source=source, ranks=rank_list,
                    seeds=parse_seeds(seeds), settings=vars(settings).copy(), weights_sha256=concept.weights_sha256)


def _scorers(concept, plan, clip_model, dino, dino_model, photos, env, device):
    """The scorers of this run, loaded before the base model (a missing CLIP fails first), and notes."""
    from ..evaluation.metrics import DEFAULT_CLIP, load_scorer
    from ..evaluation.protocol import Scorers, is_shapes_world, read_photos
    from ._base import quiet_libraries

    quiet_libraries()
    notes = []
    folder = photos or (Path(concept.training.photos_dir) if concept.training.photos_dir else None)
    if folder is None:
        from ..errors import BadInput

        raise BadInput(f"{concept.name} records no photos folder; pass --photos FOLDER (its training photos)")
    scorers = Scorers(photos=read_photos(folder), checker=is_shapes_world(plan.model))
    device = device if device not in (None, "auto") else "cpu"
    if clip_model or not scorers.checker:
        with err.status(f"loading {clip_model or DEFAULT_CLIP}"):
            scorers.clip = load_scorer("clip", clip_model or DEFAULT_CLIP, env.offline, device)
    else:
        notes.append(f"{plan.model}: measured with the shapes world's pixel checker alone, no CLIP model "
                     "(--clip-model adds CLIP image and text similarity)")
    if dino:
        with err.status(f"loading {dino_model}"):
            scorers.dino = load_scorer("dino", dino_model, env.offline, device)
    return scorers, notes


def _run(plan, folder, scorers, model, device, dtype, env):
    """(results, None), or (None, what the interrupted run kept)."""
    from ..evaluation.protocol import run_eval
    from ..render.generation import RenderRequest, RenderSettings
    from ._base import progress_bar
    from .render import _load_renderer

    settings = RenderSettings(**{key: value for key, value in plan.settings.items()
                                 if key in RenderSettings.__dataclass_fields__})
    requests = [RenderRequest(plan.prompt(index), seed, rank) for rank, index, seed in plan.cells()[:1]]
    renderer = _load_renderer(requests, settings, plan.model, None, device, dtype, env)
    total = len(plan.cells())
    finished = [0]
    try:
        with progress_bar(f"eval of {plan.concept}: {total} images ({len(plan.ranks)} ranks x {len(plan.prompts)} "
                          f"prompts x {len(plan.seeds)} seeds)", "denoising steps") as progress:
            results = run_eval(renderer, plan, settings, folder, scorers, progress,
                               on_image=lambda done, _: finished.__setitem__(0, done))
    except KeyboardInterrupt:
        return None, (f"the eval stopped: {finished[0]} of {total} images are finished and scored in "
                      f"{folder.folder}; run the same command with --resume --out {folder.folder} to finish it "
                      "(nothing is rendered twice)")
    return results, None


def _finish(registry, plan, results, folder, record, as_json) -> None:
    from ..evaluation.plot import write_plots

    plots = write_plots(plan, results, folder.folder)
    summary = {"folder": str(folder.folder), "plots": [str(path) for path in plots], "plan": vars(plan).copy(),
               **results}
    if record:
        from ..evaluation.protocol import eval_summary

        registry.record_eval(plan.concept, eval_summary(plan, results, folder.folder))
    if as_json:
        print_json(summary)
        return
    _print_table(plan, results)
    for path in plots:
        out.print(str(path), markup=False, highlight=False, soft_wrap=True)


def _print_table(plan, results) -> None:
    from rich.table import Table

    measures = results["measures"]
    table = Table(title=f"stc eval {plan.concept} on {plan.model}: {len(plan.prompts)} prompts "
                        f"({plan.prompt_source}) x {len(plan.seeds)} seeds per rank; mean ± spread over seeds")
    table.add_column("rank", justify="right")
    for info in measures.values():
        table.add_column(f"{info['label']}\n({info['unit']})", justify="right")
    for rank in plan.ranks:
        row = results["ranks"][str(rank)]
        cells = [f"{row[m]['mean']:.3f} ± {row[m]['std']:.3f}" if m in row else "-" for m in measures]
        marker = " ←" if rank == results["suggested_rank"] else ""
        table.add_row(f"{rank}{marker}", *cells)
    out.print(table)
    if results["suggested_rank"] is not None:
        out.print(f"suggested rank for these prompts: {results['suggested_rank']} ({results['rule']})",
                  markup=False, highlight=False, soft_wrap=True)
