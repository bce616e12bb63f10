"""Rendering with concepts: the prompt grammar, the renderer and its denoising loop, grids, PNG
metadata, and looking inside a concept (``inspection``)."""
