"""Boundaries the code keeps: what may import what (checked in the source, not at run time)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "stc"
# the registry and everything it reads: no torch, no safetensors.torch, no mapper, even inside functions
TORCH_FREE = ["store/registry.py", "store/concept.py", "store/storage.py", "store/listing.py", "names.py",
              "train/config.py", "render/prompts.py", "errors.py", "outputs.py"]
HEAVY = {"torch", "safetensors.torch", "diffusers", "transformers", "stc.method.mapper", "stc.store.conceptio",
         "stc.method.spacetime", "stc.method.encoding"}


# what every `stc` run imports before it knows the command: no command module, nothing heavy
CLI_STARTUP = ["cli/__init__.py", "cli/_base.py", "cli/_lazy.py"]
CLI_COMMAND_MODULES = {"stc.cli.exchange", "stc.cli.inspecting", "stc.cli.render", "stc.cli.store", "stc.cli.train",
                       "stc.cli.evaluating", "stc.cli.comfyui"}
SLOW_TO_IMPORT = {"yaml", "pydantic"}  # ~15 ms and ~80 ms: only where they are used, not at the top of a module


def imported_modules(path: Path, top_level: bool = False) -> set[str]:
    """Absolute names of every module imported anywhere in ``path`` (functions included), or
    with ``top_level`` only by the module's own body (what importing it costs)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body if top_level else ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("module", TORCH_FREE)
def test_the_registry_side_never_imports_torch_or_the_mapper(module):
    imports = imported_modules(PACKAGE / module)
    heavy = sorted(name for name in imports if any(name == h or name.startswith(h + ".") for h in HEAVY))
    assert heavy == [], f"stc/{module} imports {heavy}"


def test_the_cli_asks_the_library_and_never_loads_models_itself():
    for path in sorted((PACKAGE / "cli").glob("*.py")):
        imports = imported_modules(path)
        loaders = ("stc.models.base", "stc.models.backbones.single_file", "stc.models.tiny", "stc.worlds")
        assert not any(name.startswith(loaders) for name in imports), path.name


def matching(imports: set[str], roots: set[str]) -> list[str]:
    return sorted(name for name in imports if any(name == root or name.startswith(root + ".") for root in roots))


@pytest.mark.parametrize("module", CLI_STARTUP)
def test_the_cli_start_up_path_imports_no_command_module(module):
    """stc.cli, its app and its lazy command group load a command's module only when that
    command runs (stc/cli/_lazy.py), and never anything heavy or slow to import."""
    imports = imported_modules(PACKAGE / module)
    assert matching(imports, CLI_COMMAND_MODULES) == [], f"stc/{module} imports a command module"
    assert matching(imports, HEAVY | SLOW_TO_IMPORT) == [], f"stc/{module}"


@pytest.mark.parametrize("module", ["store/registry.py", "store/listing.py", "store/storage.py", "store/concept.py",
                                    "names.py", "errors.py"])
def test_listing_the_registry_imports_no_yaml_up_front(module):
    """stc ls reads its cache, not concept.yaml: yaml is imported where YAML is read or written."""
    assert matching(imported_modules(PACKAGE / module, top_level=True), SLOW_TO_IMPORT) == [], f"stc/{module}"


# The layers of stc, bottom up: each package may import the ones listed (and itself), never one
# above it. Foundation is stc/*.py (errors, names, settings, outputs, safe_yaml); the shapes world
# is a builtin model (stc/worlds beside stc/models); ``python -m stc`` is the command line.
LAYERS = {
    "foundation": set(),
    "method": {"foundation"},
    "store": {"foundation", "method"},
    "models": {"foundation", "method"},
    "render": {"foundation", "method", "store", "models"},
    "train": {"foundation", "method", "store", "models", "render"},
    "evaluation": {"foundation", "method", "store", "models", "render"},
    "exchange": {"foundation", "method", "store", "models", "render", "train"},
    "hosts": {"foundation", "method", "store", "models", "render", "train", "exchange"},
    "cli": {"foundation", "method", "store", "models", "render", "train", "evaluation", "exchange", "hosts"},
}


def layer_of(module: str) -> str | None:
    """The layer of an absolute module name inside stc (None: not stc's)."""
    parts = module.split(".")
    if parts[0] != "stc":
        return None
    if len(parts) == 1 or parts[1] in ("__main__",):
        return "foundation" if len(parts) == 1 else "cli"
    name = {"worlds": "models"}.get(parts[1], parts[1])
    return name if name in LAYERS else "foundation"


def test_every_import_runs_down_the_layers():
    seen = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        own = layer_of(module)
        for imported in imported_modules(path):
            target = layer_of(imported)
            if target is None or target == own:
                continue
            seen.add((own, target))
            assert target in LAYERS[own], f"{path.relative_to(PACKAGE.parent)} ({own}) imports {imported} ({target})"
    assert ("cli", "exchange") in seen and ("render", "method") in seen  # the table is really applied


def test_code_cites_only_files_of_the_project():
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "DESIGN.md" not in text, path
        for cited in ("docs/method.md", "docs/concept-format.md"):
            if cited in text:
                assert (PACKAGE.parent / cited).is_file(), f"{path.name} cites {cited}, which does not exist"


def module_graph(package: str) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports (functions included)."""
    root = PACKAGE / package
    names = {".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): path
             for path in root.rglob("*.py")}
    return {module: {imported for imported in imported_modules(path) if imported in names and imported != module}
            for module, path in names.items()}


def cycle_in(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a list of modules, or None."""
    state: dict[str, str] = {}

    def visit(module, trail):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return trail[trail.index(target):] + [target]
            if target not in state:
                found = visit(target, trail + [target])
                if found:
                    return found
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module, [module])
            if found:
                return found
    return None


@pytest.mark.parametrize("package", sorted(path.name for path in PACKAGE.iterdir()
                                            if path.is_dir() and (path / "__init__.py").is_file()))
def test_no_package_has_an_import_cycle(package):
    """Inside a package, imports form no cycle, even through imports inside functions (exchange's
    format modules import the shared helpers of common.py, never the dispatcher)."""
    assert cycle_in(module_graph(package)) is None, " -> ".join(cycle_in(module_graph(package)))


def test_the_cycle_check_finds_a_cycle():
    assert cycle_in({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle_in({"a": {"b"}, "b": set()}) is None


# What tells one model family from another: asked only of the family's backbone (stc/models/backbones);
# the builders of models of a family (the random-weight test models, the shapes world) name its parts.
FAMILY_QUESTIONS = ("text_encoder_2", '== "sgm"', "len(widths) > 1", "encoders > 1", "len(self.encoders) == 1",
                    "len(concept.encoder_widths) > 1", "tokenizer_2")
FAMILY_BUILDERS = ("models/backbones/", "models/tiny.py", "worlds/")


def test_only_the_backbones_ask_which_family_a_model_is():
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith(FAMILY_BUILDERS):
            continue
        text = path.read_text(encoding="utf-8")
        for question in FAMILY_QUESTIONS:
            assert question not in text, f"stc/{relative} asks {question!r}: ask the family's backbone instead"


@pytest.mark.parametrize("module", ["models/backbones/__init__.py", "models/backbones/backbone.py",
                                    "models/backbones/sd.py", "models/backbones/sdxl.py", "exchange/registry.py",
                                    "exchange/common.py"])
def test_the_family_and_format_tables_import_nothing_heavy(module):
    """What the CLI asks before any work (a family's label, the formats and what they keep) costs no torch."""
    own = matching(imported_modules(PACKAGE / module, top_level=True), HEAVY | {"stc.models.base"})
    assert own == [], f"stc/{module} imports {own} when imported"
