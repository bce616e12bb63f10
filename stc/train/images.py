"""Reading the user's photos: never modified, every usable format normalised to RGB squares."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BadInput

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
MAX_PIXELS = 64_000_000  # larger images are refused as possible decompression bombs
SMALL_FRACTION = 0.5  # photos whose short side is below this fraction of the resolution get a warning


@dataclass
class PhotoSet:
    """Loaded photos (RGB, square, ``resolution`` px) and what was skipped and why."""

    images: list  # PIL.Image.Image
    paths: list[Path]
    skipped: dict[Path, str] = field(default_factory=dict)


def _to_rgb(image):
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits by the actual range of the mode
        import numpy as np

        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray((array / top * 255).clip(0, 255).astype("uint8"), mode="L")
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def _square(image, resolution: int):
    from PIL import Image

    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)


def load_photo(path: Path, resolution: int):
    """One photo as an RGB ``resolution`` square (EXIF orientation applied, center-cropped)."""
    from PIL import Image, ImageOps

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = MAX_PIXELS
        try:
            with Image.open(path) as image:
                image.load()
                image = ImageOps.exif_transpose(image)
                square = _square(_to_rgb(image), resolution)
                square.info["source_size"] = image.size
                return square
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise BadInput(
                f"{path.name} is too large ({exc}); images over {MAX_PIXELS // 1_000_000} megapixels are "
                "refused as possible decompression bombs. Downscale it first"
            ) from exc
        finally:
            Image.MAX_IMAGE_PIXELS = previous


MAX_LISTED = 5  # warnings of one kind named one by one; beyond that, a count


def photo_files(folder: Path) -> tuple[list[Path], dict[Path, str]]:
    """The image files of ``folder`` (sorted by name) and what else is there, with why it is skipped.
    Hidden files and subfolders are passed over; links, FIFOs, sockets and devices are never opened."""
    folder = Path(folder).expanduser()
    try:
        if not folder.is_dir():
            raise BadInput(f"{folder} is not a folder; pass the folder that holds your photos")
        entries = sorted(folder.iterdir())
    except OSError as exc:  # a symbolic-link loop, no permission
        raise BadInput(f"cannot read the photos folder {folder}: {exc.strerror or exc}") from exc
    files, skipped = [], {}
    for path in entries:
        if path.name.startswith("."):
            continue
        try:
            if path.is_dir():
                continue
            regular = path.is_file()
        except OSError as exc:
            skipped[path] = f"cannot be read ({exc.strerror or exc})"
            continue
        if not regular:
            skipped[path] = "not a regular file (a FIFO, socket, device or broken link); it is not opened"
        elif path.suffix.lower() not in IMAGE_SUFFIXES:
            skipped[path] = "not an image file (jpg, png, webp or bmp)"
        else:
            files.append(path)
    return files, skipped


def check_photo_folder(folder: Path) -> None:
    """Before any model loads: the folder holds at least one file that opens as an image
    (its header only: cheap)."""
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder).expanduser()
    files, skipped = photo_files(folder)
    for path in files:
        try:
            with Image.open(path) as image:
                image.size  # noqa: B018  the header parses
            return
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            continue
    found = f" ({len(files) + len(skipped)} file(s) there, none an image that opens)" if files or skipped else ""
    raise BadInput(f"no usable images in {folder}: put a few jpg, png, webp or bmp photos of your subject there{found}")


def _warn_all(warn, messages: list[str], kind: str) -> None:
    """Each message, or the first MAX_LISTED and a count of the rest."""
    for message in messages[:MAX_LISTED]:
        warn(message)
    if len(messages) > MAX_LISTED:
        warn(f"... and {len(messages) - MAX_LISTED} more {kind}")


def load_photos(folder: Path, resolution: int, on_warning=None) -> PhotoSet:
    """All usable photos in ``folder`` (sorted by name). Read-only: the folder is never touched."""
    from PIL import UnidentifiedImageError

    folder = Path(folder).expanduser()
    warn = on_warning or (lambda message: None)
    files, skipped = photo_files(folder)
    images, paths = [], []
    for path in files:
        try:
            images.append(load_photo(path, resolution))
            paths.append(path)
        except BadInput as exc:
            skipped[path] = str(exc)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            skipped[path] = f"cannot be read as an image ({exc.__class__.__name__}: {exc})"
    _warn_all(warn, [f"skipping {path.name}: {reason}" for path, reason in sorted(skipped.items())],
              "file(s) skipped")
    small = [(path, image.info["source_size"]) for path, image in zip(paths, images)
             if min(image.info.get("source_size", (resolution, resolution))) < resolution * SMALL_FRACTION]
    _warn_all(warn, [f"{path.name} is only {width}x{height} px, far below the training resolution {resolution} px: "
                     "it is upscaled and will teach the concept blur; use larger photos"
                     for path, (width, height) in small], f"photo(s) far below {resolution} px")
    if not images:
        raise BadInput(
            f"no usable images in {folder}: put a few jpg, png, webp or bmp photos of your subject there"
            + (f" ({len(skipped)} file(s) skipped)" if skipped else "")
        )
    if len(images) < 3:
        warn(f"only {len(images)} usable image(s) in {folder}; 3-6 photos of the subject work best")
    return PhotoSet(images=images, paths=paths, skipped=skipped)
