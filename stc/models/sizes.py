"""Image sizes far outside a model's range are refused, unless forced, before the memory runs out.

A render or a training step at W x H px holds, at the least, one full-resolution feature map of
the VAE (128 channels for every family stc knows); at 100000 px that alone is terabytes, and the
process grows for minutes before the system stops it. Sides above ``MAX_SIDE`` are refused
before any model loads; once it has loaded, sizes far from its own resolution are refused too.
"""

from __future__ import annotations

from ..errors import BadInput

MAX_SIDE = 8192  # px: 8x the largest native size of any family (SDXL's 1024); checked before a model loads
SIDE_FACTOR = 8  # a side above 8x the model's own resolution,
AREA_FACTOR = 16  # ... or more than 16x its pixels, is far outside its range
SMALLEST_NATIVE = 512  # px: SD 1.x's, the smallest of the families: an unknown side is at least this
VAE_CHANNELS = 128  # the VAE's full-resolution feature maps (SD 1.x, 2.x, XL)
FORCE_FLAG = "--force-size"


def feature_map_gib(width: int, height: int, images: int = 1, element_bytes: int = 2,
                    channels: int = VAE_CHANNELS) -> float:
    """GiB of one full-resolution VAE feature map for ``images`` images: a lower bound of the memory."""
    return channels * width * height * images * element_bytes / 2**30


def check_size(width: int | None, height: int | None, flag: str, native: int | None = None, images: int = 1,
               element_bytes: int = 2, channels: int = VAE_CHANNELS, model: str = "") -> None:
    """BadInput for a size far outside the range of a model of ``native`` px (None: not loaded
    yet, only ``MAX_SIDE`` is known); None sides are the model's own."""
    width, height = width or native or SMALLEST_NATIVE, height or native or SMALLEST_NATIVE
    if native is None:
        far, where = max(width, height) > MAX_SIDE, f"any model stc knows (at most {MAX_SIDE} px a side)"
    else:
        far = max(width, height) > SIDE_FACTOR * native or width * height > AREA_FACTOR * native**2
        where = f"{model or 'the model'}'s range (it was trained at {native} px)"
    if not far:
        return
    gib = feature_map_gib(width, height, images, element_bytes, channels)
    raise BadInput(
        f"{flag} {width}x{height} px is far outside {where}: one feature map of its VAE alone would take about "
        f"{_amount(gib)} of memory, the whole run several times that. Choose a size near the model's, or pass "
        f"{FORCE_FLAG} to try anyway"
    )


def _amount(gib: float) -> str:
    if gib >= 1024:
        return f"{gib / 1024:,.0f} TiB"
    return f"{gib:,.1f} GiB" if gib >= 1 else f"{gib * 1024:,.0f} MiB"
