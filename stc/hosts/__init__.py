"""Other tools stc's concepts render in at full strength: node packs and plugins stitched from
stc's own method code (one package per host; ``comfyui/``)."""
