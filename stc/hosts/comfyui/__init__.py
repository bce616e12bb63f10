"""stc's ComfyUI nodes: a concept at full strength (every timestep, layer, rank and the textual
bypass) in ComfyUI, from its single-file format (``stc export NAME --format concept-file``).

``stc comfyui install COMFYUI`` writes the node pack ``custom_nodes/stc_neti/`` (``__init__.py``
and ``stc_nodes.py``) and the folder ``models/stc_concepts/`` it loads concepts from. The pack needs
torch, safetensors and ComfyUI, not stc: ``stc_nodes.py`` is stitched at install time from stc's own
mapper and space-time text encoding (``STITCHED``, the same code ``stc gen`` runs) and the glue of
``glue.py`` (ComfyUI's CLIP read as stc reads a text encoder, the attention patch, the nodes), and
checked to be self-contained, as the diffusers export's module is.
"""

from __future__ import annotations

from pathlib import Path

from ... import __version__
from ...errors import BadInput
from ...exchange.concept_file import FILE_FORMAT
from ...exchange.diffusers_folder import stitch_module
from ...method import HOSTED

PACK_FOLDER = "stc_neti"  # under ComfyUI's custom_nodes
MODULE_FILE = "stc_nodes.py"
CONCEPT_FOLDER = "stc_concepts"  # under ComfyUI's models
GLUE_FILE = Path(__file__).with_name("glue.py")  # read as text, never imported
# stc's code the nodes carry, in this order (public names only; tests/test_comfyui_node.py checks
# each exists and that the pack fails to build when one is renamed or imports from stc)
STITCHED = HOSTED  # the method's hosted code (stc/method/__init__.py); check_rank among it
REPLACEMENTS = {
    "BadInput": 'class BadInput(ValueError):\n    """A concept, rank or prompt the node cannot use (stc raises '
                'stc.errors.BadInput here)."""\n',
}
INIT_SOURCE = '''"""stc's ComfyUI nodes (NeTI concepts at full strength), installed by stc {version}."""

from .stc_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
'''


def node_module_source() -> str:
    """The text of ``stc_nodes.py``: stc's method code and the ComfyUI glue, self-contained."""
    docstring = (f'"""stc\'s ComfyUI nodes: neural space-time concepts (NeTI) at full strength. Written by '
                 f'stc {__version__}\n(`stc comfyui install`); needs torch, safetensors and ComfyUI, not stc.\n\n'
                 "The code below the imports is stc's own (stc/method/mapper.py, stc/method/encoding.py,\n"
                 'stc/render/prompts.py), followed by the glue of stc/hosts/comfyui/glue.py.\n"""\n')
    constants = f'STC_VERSION = "{__version__}"\nFILE_FORMAT = "{FILE_FORMAT}"\n'
    return stitch_module(STITCHED, GLUE_FILE, docstring, constants, REPLACEMENTS, MODULE_FILE)


def pack_files() -> dict[str, str]:
    """The node pack's files: name -> text."""
    return {"__init__.py": INIT_SOURCE.format(version=__version__), MODULE_FILE: node_module_source()}


def install(comfyui: Path) -> tuple[Path, Path]:
    """Write the node pack into ``comfyui``'s ``custom_nodes`` (replacing an earlier one) and make its
    ``models/stc_concepts`` folder; returns both."""
    from ...outputs import staged

    comfyui = Path(comfyui).expanduser()
    if not (comfyui / "custom_nodes").is_dir() or not (comfyui / "models").is_dir():
        raise BadInput(f"{comfyui} is not a ComfyUI folder (it has no custom_nodes and models folders)")
    files = pack_files()  # built (and checked) before anything is written
    pack = comfyui / "custom_nodes" / PACK_FOLDER
    if pack.exists() and not (pack / MODULE_FILE).is_file():
        raise BadInput(f"{pack} exists and is not stc's node pack; move it away first")
    with staged(pack, is_dir=True) as folder:
        for name, text in files.items():
            (folder / name).write_text(text, encoding="utf-8")
    concepts = comfyui / "models" / CONCEPT_FOLDER
    concepts.mkdir(exist_ok=True)
    return pack, concepts
