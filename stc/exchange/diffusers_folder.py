"""``stc export NAME --format diffusers``: a concept as a folder that plain diffusers renders
losslessly, and back (``read_diffusers_export``, for ``stc import``).

The folder (format ``stc-diffusers/1``):

| file | content |
|---|---|
| ``mapper.safetensors`` | the concept's weights, byte for byte |
| ``config.json`` | what rebuilds and uses the mapper without stc (``export_config``) |
|``stc_concept.py``|a self-contained module (torch, diffusers, transformers): ``load_concept(pipe, folder, rank=None)``|
| ``README.md`` | a Hugging Face model card |
| ``preview.png`` | when a preview is given |
| ``metrics.jsonl`` | the training run's metrics, when the concept has them |

``stc_concept.py`` carries no second copy of the method: it is stitched at export time from
stc's own source (the mapper, the batched (t, l) text encoding, the attention processors and
the per-step assembly of keys and values; ``STITCHED``) followed by the glue of
``stc/exchange/diffusers_glue.py`` (hooks and ``load_concept``, a template stc never imports). The
stitching checks that the result imports nothing from stc and uses no undefined name, so a
change in stc that the export cannot carry fails the export instead of writing a broken module.
"""

from __future__ import annotations

import ast
import builtins
import dis
import hashlib
import importlib
import inspect
import json
import re
import shutil
import sys
import types
from pathlib import Path

from .. import __version__
from ..errors import BadInput, StcError
from ..method import HOSTED
from ..method.mapper_config import check_rank
from ..store.concept import WEIGHTS_FILE, Concept

EXPORT_FORMAT = "stc-diffusers/1"
CONFIG_FILE = "config.json"
MODULE_FILE = "stc_concept.py"
CARD_FILE = "README.md"
PREVIEW_FILE = "preview.png"
METRICS_FILE = "metrics.jsonl"  # as training writes it into the concept folder
# all a folder export writes
EXPORT_FILES = (WEIGHTS_FILE, CONFIG_FILE, MODULE_FILE, CARD_FILE, PREVIEW_FILE, METRICS_FILE)
CARD_TAGS = ("stable-diffusion", "text-to-image", "neti", "stc", "textual-inversion")

# stc's code the module carries, in this order: (module, top-level names). Only public names: a
# function stitched here is part of its module's interface (tests/test_export_diffusers.py checks each
# one exists, is public and uses only what the export carries)
STITCHED = HOSTED + (
    ("stc.method.encoding", ("pipeline_text_encoders", "pipeline_tokenizers")),
    ("stc.method.spacetime", ("unet_blocks", "cross_attention_layers", "cross_attention_layer_names",
                              "SpaceTimeConditioning", "SpaceTimeAttnProcessor", "install_processors")),
    ("stc.method.conditioning", ("Conditioning",)),
    ("stc.render.generation", ("stack_step", "with_uncond")),
    ("stc.method.placeholders", ("placeholder_tokens", "add_placeholder_tokens")),
)
GLUE_FILE = Path(__file__).with_name("diffusers_glue.py")  # read as text, never imported
GLUE_MARKER = "# " + "-" * 76 + " glue"
# stc-only names the copied code uses, and what the module defines in their place
REPLACEMENTS = {
    "ModelError": 'class ModelError(ValueError):\n    """The pipeline does not fit the concept (stc raises '
                  'stc.errors.ModelError here)."""\n',
    "BadInput": 'class BadInput(ValueError):\n    """An argument that cannot be used (stc raises '
                'stc.errors.BadInput here)."""\n',
}
# config.json keys read_diffusers_export requires, and their types
REQUIRED_KEYS = {
    "name": str, "token": str, "initializer": str, "base_model": str, "text_width": int, "layer_names": list,
    "mapper": dict, "weights_sha256": str,
}
_RULE = "# " + "-" * 60


# --------------------------------------------------------------------------- writing


owned_files = EXPORT_FILES  # what --force may replace in an existing export folder


def targets(name: str, out: Path, backbone) -> list[Path]:
    return [out / name]


def export(job, result, folder: Path) -> None:
    """Write the export into ``folder`` (staged beside its target by the caller)."""
    from ..store.registry import preview_paths

    concept = job.concept
    previews = [path for path in preview_paths(concept.path) if path.name == PREVIEW_FILE]
    write_diffusers_export(concept, concept.weights_path.read_bytes(), folder, rank=job.rank,
                           preview=previews[0] if previews else None)


def write_diffusers_export(
    concept: Concept, weights: bytes, folder: Path, rank: int | None = None, preview: Path | None = None
) -> list[Path]:
    """Write ``concept`` (``weights``: the bytes of its ``mapper.safetensors``) into the empty
    folder ``folder`` as an stc diffusers export; returns the files written.

    ``rank``: the default truncation rank ``load_concept`` uses (None: full).
    ``preview``: an image copied to ``preview.png`` and shown by the model card.
    """
    folder = Path(folder)
    if rank is not None:
        check_rank(concept.name, rank, concept.rank_max)
    digest = hashlib.sha256(weights).hexdigest()
    if concept.weights_sha256 and digest != concept.weights_sha256:
        raise BadInput(f"the weights given for {concept.name!r} are not the file its concept.yaml records (sha256)")
    if preview is not None and not Path(preview).is_file():
        raise BadInput(f"preview image {preview} does not exist")
    _state_dict(weights, concept.mapper, f"the weights of {concept.name!r}")  # loads, and fits the config
    config = export_config(concept, digest, rank)
    files = [folder / WEIGHTS_FILE, folder / CONFIG_FILE, folder / MODULE_FILE]
    files[0].write_bytes(weights)
    files[1].write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    files[2].write_text(module_source(config), encoding="utf-8")
    if preview is not None:
        files.append(_copy_preview(Path(preview), folder / PREVIEW_FILE))
    metrics = concept.path / METRICS_FILE if concept.path is not None else None
    if metrics is not None and metrics.is_file() and not metrics.is_symlink():
        files.append(Path(shutil.copyfile(metrics, folder / METRICS_FILE)))
    files.append(folder / CARD_FILE)
    files[-1].write_text(model_card(config, has_preview=preview is not None), encoding="utf-8")
    return files


def export_config(concept: Concept, weights_sha256: str, rank: int | None = None) -> dict:
    """``config.json``: everything that rebuilds and uses the mapper without stc (and, from the
    concept's backbone, the pipeline class it goes with and where that holds its text encoders)."""
    import dataclasses

    from ..models.backbones import backbone_for_widths

    backbone = backbone_for_widths(concept.encoder_widths)
    return {
        "format": EXPORT_FORMAT,
        "stc_version": __version__,
        "name": concept.name,
        "token": concept.token,
        "initializer": concept.initializer,
        "base_model": concept.base_model,
        "text_width": concept.text_width,
        "layer_names": list(concept.layer_names),  # cross-attention modules in execution order: layer l
        "rank": rank,  # load_concept's default; null = full
        "rank_max": concept.rank_max,
        "mapper": dict(concept.mapper),  # MapperConfig
        "steps": concept.steps_done,
        "created": concept.created,
        "base_fingerprint": concept.base_fingerprint,
        "training": concept.training.to_dict(),  # the run's settings and record, as concept.yaml has them
        "metrics": concept.metrics.to_dict(),
        "weights_file": WEIGHTS_FILE,
        "weights_sha256": weights_sha256,
        "pipeline_class": backbone.pipeline_class,
        "text_encoders": [dataclasses.asdict(reading) for reading in backbone.readings],  # in context order
    }


def _copy_preview(source: Path, target: Path) -> Path:
    if source.suffix.lower() == ".png":
        shutil.copyfile(source, target)
        return target
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source) as image:
            image.save(target, format="PNG")
    except (OSError, UnidentifiedImageError) as exc:
        raise BadInput(f"preview image {source} cannot be read: {exc}") from exc
    return target


# --------------------------------------------------------------------------- the module


def module_source(config: dict) -> str:
    """The text of ``stc_concept.py`` for an export with ``config``: a docstring, the imports,
    stc's code (``STITCHED``) and the glue, checked to be self-contained."""
    constants = f'STC_VERSION = "{__version__}"  # the stc that wrote this module\nEXPORT_FORMAT = "{EXPORT_FORMAT}"\n'
    return stitch_module(STITCHED, GLUE_FILE, _module_docstring(config), constants, REPLACEMENTS, MODULE_FILE)


def stitch_module(stitched, glue_file: Path, docstring: str, constants: str, replacements: dict,
                  module_file: str) -> str:
    """A self-contained module: ``docstring``, the imports, ``constants``, stc's code (``stitched``:
    (module, top-level public names) in order, copied from their source), and the part of
    ``glue_file`` below its glue line; ``replacements`` define stc-only names the copied code uses.
    Checked to import nothing from stc and to use no name it does not define (the diffusers
    export's ``stc_concept.py``; the ComfyUI nodes of ``stc/hosts/comfyui``)."""
    blocks = []
    imports: dict[str, tuple[str, str | None, str | None]] = {}  # bound name -> (module, attribute, alias)
    for module_name, names in stitched:
        module = importlib.import_module(module_name)
        path = Path(inspect.getsourcefile(module))
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
        imports.update(_top_level_imports(tree))
        constant_lines, definitions = [], []
        for name in names:
            value = getattr(module, name)
            if inspect.isclass(value) or inspect.isfunction(value):
                definitions.append(inspect.getsource(value))
            else:
                constant_lines.append(_assignment_source(text, tree, f"{module_name}.{name}"))
        parts = ["".join(constant_lines)] if constant_lines else []
        blocks.append("\n\n".join([f"{_RULE} from stc/{path.name}\n", *parts, *definitions]))
    glue = glue_file.read_text(encoding="utf-8")
    if GLUE_MARKER not in glue:
        raise RuntimeError(f"{glue_file} lacks its {GLUE_MARKER!r} line")
    header, body = glue.split(GLUE_MARKER, 1)
    imports.update(_top_level_imports(ast.parse(header)))
    blocks.append(f"{_RULE} glue, from stc/{glue_file.name}\n\n\n" + body.strip("\n") + "\n")

    code = "\n\n".join(block.rstrip("\n") + "\n" for block in blocks)
    used = {node.id for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Name)}
    defined = [replacements[name] for name in replacements if name in used]
    source = (
        docstring
        + "\nfrom __future__ import annotations\n\n"
        + _import_lines({name: spec for name, spec in imports.items() if name in used})
        + "\n"
        + constants
        + "\n\n"
        + "\n\n".join([*defined, code]).rstrip("\n")
        + "\n"
    )
    _check_self_contained(source, module_file)
    return source


def _top_level_imports(tree: ast.Module) -> dict[str, tuple[str, str | None, str | None]]:
    """Absolute imports of a module's top level: bound name -> (module, attribute, alias)."""
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Import):
            for alias in node.names:
                bound = alias.asname or alias.name.split(".")[0]
                found[bound] = (alias.name if alias.asname else bound, None, alias.asname)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module != "__future__":
            for alias in node.names:
                found[alias.asname or alias.name] = (node.module, alias.name, alias.asname)
    return found


def _assignment_source(text: str, tree: ast.Module, qualified: str) -> str:
    """The lines of the top-level assignment of ``qualified``'s name (a constant), comments included."""
    name = qualified.rsplit(".", 1)[1]
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(isinstance(target, ast.Name) and target.id == name for target in targets):
            return "\n".join(text.splitlines()[node.lineno - 1 : node.end_lineno]) + "\n"
    raise RuntimeError(f"{qualified} is neither a class, a function nor a top-level assignment")


def _import_lines(imports: dict[str, tuple[str, str | None, str | None]]) -> str:
    """Import statements, standard library first, ``import x`` before ``from x import y``."""
    groups: list[list[str]] = [[], []]
    plain: set[tuple[int, str]] = set()
    froms: dict[tuple[int, str], list[str]] = {}
    for module, attribute, alias in imports.values():
        group = 0 if module.split(".")[0] in sys.stdlib_module_names else 1
        if attribute is None:
            plain.add((group, f"import {module}" + (f" as {alias}" if alias else "")))
        else:
            froms.setdefault((group, module), []).append(attribute + (f" as {alias}" if alias else ""))
    for group, line in sorted(plain):
        groups[group].append(line)
    for (group, module), names in sorted(froms.items()):
        groups[group].append(f"from {module} import {', '.join(sorted(names))}")
    return "\n\n".join("\n".join(lines) for lines in groups if lines) + "\n"


def _check_self_contained(source: str, module_file: str = MODULE_FILE) -> None:
    """The module must import nothing from stc and use no name it does not define."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] == "stc"):
            raise RuntimeError(f"{module_file} would import from stc (line {node.lineno}): stitch that code in")
        if isinstance(node, ast.Import) and any(alias.name.split(".")[0] == "stc" for alias in node.names):
            raise RuntimeError(f"{module_file} would import stc (line {node.lineno})")
    code = compile(source, module_file, "exec")
    defined = {ins.argval for ins in dis.get_instructions(code) if ins.opname == "STORE_NAME"}
    defined |= set(dir(builtins)) | {"__file__", "__name__", "__doc__", "__annotations__"}
    undefined = sorted(_global_loads(code) - defined)
    if undefined:
        raise RuntimeError(
            f"{module_file} would use names it does not define: {', '.join(undefined)}; add them to "
            "its STITCHED or REPLACEMENTS (stc/exchange/diffusers_folder.py, stc/hosts/comfyui/__init__.py)"
        )


def _global_loads(code: types.CodeType) -> set[str]:
    """Names ``code`` (and every code object in it) reads from the module's globals."""
    instructions = list(dis.get_instructions(code))
    own = {ins.argval for ins in instructions if ins.opname == "STORE_NAME"}  # class-body locals
    names = set()
    for ins in instructions:
        if ins.opname in ("LOAD_GLOBAL", "LOAD_FROM_DICT_OR_GLOBALS") or (
            ins.opname == "LOAD_NAME" and ins.argval not in own
        ):
            names.add(ins.argval)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_loads(const)
    return names


def _backbone(config: dict):
    """The family of an export's concept (stc.models.backbones), from its mapper's text encoders."""
    from ..method.mapper import MapperConfig
    from ..models.backbones import backbone_for_widths

    return backbone_for_widths(MapperConfig.from_dict(config["mapper"]).widths)


def usage_snippet(config: dict, folder: str = "path/to/this/folder") -> str:
    """The Python lines that render the concept with diffusers and this export."""
    base = config["base_model"]
    note = ""
    if base.startswith("builtin:"):
        note = (f"# {base} is stc's random test model: load the folder written by\n"
                f'# stc.models.base.load_base_model("{base}").pipeline.save_pretrained(DIR)\n')
    default = "full" if config.get("rank") is None else f"{config['rank']}"
    pipeline = config["pipeline_class"]
    return (
        f"import sys\n\nimport torch\nfrom diffusers import DPMSolverMultistepScheduler, {pipeline}\n\n"
        f'folder = "{folder}"  # config.json, mapper.safetensors, stc_concept.py\n'
        "sys.path.insert(0, folder)\nfrom stc_concept import load_concept\n\n"
        f'{note}pipe = {pipeline}.from_pretrained("{base}")\n'
        "pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)  # stc gen's default sampler\n"
        f"load_concept(pipe, folder)  # rank=1..{config['rank_max']} truncates; default: {default}\n"
        f'image = pipe("{config["token"]} on the moon", num_inference_steps=50, guidance_scale=7.5,\n'
        "             generator=torch.Generator().manual_seed(0)).images[0]\n"
        'image.save("moon.png")\n'
    )


def _module_docstring(config: dict) -> str:
    usage = "\n".join(f"    {line}" if line else "" for line in usage_snippet(config).splitlines())
    return f'''"""{config["token"]}: a neural space-time concept (NeTI) for diffusers, exported by stc {__version__}.

Written by `stc export {config["name"]} --format diffusers` (format {EXPORT_FORMAT}). This module needs
torch, diffusers and transformers, not stc. It renders the concept in a plain diffusers
StableDiffusionPipeline exactly as `stc gen` does: at every denoising step t, cross-attention
layer l reads keys = the prompt encoded with the token embedding the mapper gives for (t, l),
and values = the same with the concept's textual bypass.

Usage:

{usage}

Several concepts in one prompt: call load_concept once per export folder on the same pipe.
unload_concepts(pipe) removes the hooks and attention processors again. Prompts without a
loaded token render as the untouched pipeline does; prompt_embeds given directly and
clip_skip bypass the concept.

The code below is stc's own, copied at export time from {_stitched_files()} (stc {__version__}),
followed by the glue of stc/{GLUE_FILE.name} (text-encoder and UNet hooks, load_concept).
"""
'''


def _stitched_files() -> str:
    files = list(dict.fromkeys("stc/" + module.removeprefix("stc.").replace(".", "/") + ".py"
                               for module, _ in STITCHED))
    return ", ".join(files[:-1]) + " and " + files[-1]


# --------------------------------------------------------------------------- the model card


def model_card(config: dict, has_preview: bool = False) -> str:
    """``README.md``: a Hugging Face model card for the export."""
    base = config["base_model"]
    hub_id = re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", base) is not None
    license_id = _backbone(config).license
    front = (["---", f"base_model: {base}"] if hub_id else ["---"]) + [
        "tags:", *(f"- {tag}" for tag in CARD_TAGS), f"license: {license_id}", "library_name: diffusers",
        "inference: false", "---",
    ]
    token, rank_max = config["token"], config["rank_max"]
    steps = config.get("steps")
    default_rank = "full" if config.get("rank") is None else str(config["rank"])
    lines = [
        *front, "",
        f"# {token}: a neural space-time concept for Stable Diffusion", "",
        f"`{token}` is a personalized concept in the NeTI representation (\"A Neural Space-Time "
        "Representation for Text-to-Image Personalization\", Alaluf et al. 2023), trained with stc: a small "
        "network (the *mapper*) gives the token its own embedding, plus a textual bypass, at every denoising "
        "timestep and every cross-attention layer of the UNet. The base model itself is unchanged.", "",
        f"- initializer word: `{config['initializer']}`",
        f"- training steps: {steps if steps is not None else 'unknown'}",
        f"- ranks: 1..{rank_max} (rank max {rank_max}; default here: {default_rank})",
        f"- base model: `{base}`" + ("" if hub_id else " (not a Hub id: set `base_model:` above before publishing)"),
        f"- exported by stc {config['stc_version']} (format `{EXPORT_FORMAT}`); weights sha256 "
        f"`{config['weights_sha256']}`",
        "",
    ]
    if has_preview:
        lines += [f"![{token}, rendered by stc]({PREVIEW_FILE})", ""]
    lines += [
        "## Use it with diffusers", "",
        f"The concept needs the bundled `{MODULE_FILE}` (torch, diffusers and transformers only; stc need not "
        "be installed):", "",
        "```python", usage_snippet(config).rstrip("\n"), "```", "",
        f"`rank=` truncates the concept: small ranks are coarser and easier to edit with the prompt, {rank_max} "
        "is full fidelity. Same prompt, seed, steps, guidance and sampler give the image `stc gen` renders "
        "on the same device and dtype (`stc gen` uses fp16 on a GPU: load the pipeline with "
        "`torch_dtype=torch.float16` and move it with `pipe.to(\"cuda\")` to match).", "",
        "## What this export keeps and loses", "",
        "Lossless: the mapper's weights are the concept's own, and the per-timestep, per-layer token embeddings "
        "and the textual bypass (keys without it, values with it) are all rendered as stc renders them. It "
        f"needs the bundled `{MODULE_FILE}`: a single textual-inversion embedding cannot represent a space-time "
        "concept. Several concepts work in one prompt (one `load_concept` per folder); stc's inline ranks "
        f"(`{token[:-1]}:8>`) are not prompt syntax here, use `rank=`.", "",
        "## Files", "",
        "| file | content |", "|---|---|",
        f"| `{WEIGHTS_FILE}` | the mapper's weights (safetensors, fp32) |",
        f"| `{CONFIG_FILE}` | mapper config, token, initializer, base model, layer order, default rank |",
        f"| `{MODULE_FILE}` | `load_concept(pipe, folder, rank=None)`: hooks a diffusers pipeline |",
    ]
    if has_preview:
        lines.append(f"| `{PREVIEW_FILE}` | renders by stc |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- reading


def read_diffusers_export(folder: Path) -> tuple[dict, dict]:
    """The ``config.json`` contents and the mapper's tensors of an stc diffusers export, its
    format, keys, weights hash and tensor shapes checked (``BadInput`` otherwise)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BadInput(f"{folder} is not a folder")
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise BadInput(f"{folder} is not an stc diffusers export: it has no {CONFIG_FILE}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BadInput(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise BadInput(f"{config_path} is not a JSON object")
    found = config.get("format")
    if found != EXPORT_FORMAT:
        if isinstance(found, str) and found.startswith("stc-diffusers/"):
            raise BadInput(f"{config_path} has format {found!r}, which this stc cannot read ({EXPORT_FORMAT}); "
                           "upgrade stc (pip install -U stc)")
        raise BadInput(f"{folder} is not an stc diffusers export ({CONFIG_FILE} has format {found!r}, "
                       f"not {EXPORT_FORMAT!r})")
    missing = [key for key in REQUIRED_KEYS if key not in config]
    if missing:
        raise BadInput(f"{config_path} lacks {', '.join(missing)}")
    for key, kind in REQUIRED_KEYS.items():
        if not isinstance(config[key], kind) or isinstance(config[key], bool):
            raise BadInput(f"{config_path}: '{key}' should be a {kind.__name__}, not {type(config[key]).__name__}")
    weights_path = folder / str(config.get("weights_file") or WEIGHTS_FILE)
    if not weights_path.is_file():
        raise BadInput(f"{folder} is not a complete stc diffusers export: {weights_path.name} is missing")
    weights = weights_path.read_bytes()
    digest = hashlib.sha256(weights).hexdigest()
    if digest != config["weights_sha256"]:
        raise BadInput(f"{weights_path} does not match the sha256 in {CONFIG_FILE} ({digest} != "
                       f"{config['weights_sha256']}); the export is damaged")
    return config, _state_dict(weights, config["mapper"], str(weights_path))


def _state_dict(weights: bytes, mapper_config: dict, source: str) -> dict:
    """The tensors of ``weights``, checked to load into a mapper of ``mapper_config``."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    from ..store.conceptio import mapper_from_state

    try:
        state = load(weights)
    except (SafetensorError, ValueError, OSError) as exc:
        raise BadInput(f"{source} is not a readable safetensors file: {exc}") from exc
    try:
        mapper_from_state(mapper_config, state, source=source)
    except StcError as exc:
        raise BadInput(str(exc)) from exc
    return state


def read(request):
    """``stc import`` of an stc diffusers export (a :class:`~stc.exchange.common.ImportRequest`):
    the concept as it was exported, with its preview and training metrics."""
    from ..store.conceptio import mapper_from_state
    from .common import Imported, concept_from_record

    folder = request.path
    config, state_dict = read_diffusers_export(folder)
    mapper = mapper_from_state(config["mapper"], state_dict, source=str(folder))
    concept = concept_from_record(config, mapper, request, "stc-diffusers", f"{folder}: its config.json")
    kept = (folder / PREVIEW_FILE, folder / METRICS_FILE)
    files = {path.name: path for path in kept if path.is_file() and not path.is_symlink()}
    return Imported(concept, mapper, "stc-diffusers", files=files)
