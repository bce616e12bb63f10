"""Boundaries the code keeps: what may import what (checked in the source, not at run time)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "stc"
# the registry and everything it reads: no torch, no safetensors.torch, no mapper, even inside functions
TORCH_FREE = ["registry.py", "concept.py", "storage.py", "names.py", "trainconfig.py", "prompts.py", "errors.py"]
HEAVY = {"torch", "safetensors.torch", "diffusers", "transformers", "stc.mapper", "stc.conceptio", "stc.spacetime"}


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module imported anywhere in ``path`` (functions included)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
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
        assert not any(name.startswith("stc.models") for name in imports), path.name


def test_code_cites_only_files_of_the_project():
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "DESIGN.md" not in text, path
        for cited in ("docs/method.md", "docs/concept-format.md"):
            if cited in text:
                assert (PACKAGE.parent / cited).is_file(), f"{path.name} cites {cited}, which does not exist"
