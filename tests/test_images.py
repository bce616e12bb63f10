"""The user's photos: every format and quirk, and the folder is never modified."""

import hashlib

import numpy as np
import pytest
from PIL import Image

from stc.errors import BadInput
from stc.train.images import MAX_PIXELS, load_photo, load_photos


def folder_digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_exif_orientation_is_applied(tmp_path):
    # a landscape image whose EXIF says "rotate 90": its content is portrait
    image = Image.new("RGB", (60, 30), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 30, 30))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    image.save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    loaded = np.asarray(load_photo(tmp_path / "rotated.jpg", 32))
    # after transposing, blue is the top half; center crop keeps the middle rows
    plain = np.asarray(Image.open(tmp_path / "rotated.jpg").convert("RGB"))
    assert plain.shape[:2] == (30, 60)  # stored landscape
    top, bottom = loaded[2, 16], loaded[-3, 16]
    assert top[2] > 200 and top[0] < 60  # blue on top
    assert bottom[0] > 200 and bottom[2] < 60  # red below


@pytest.mark.parametrize(
    "mode, make",
    [
        ("CMYK", lambda: Image.new("CMYK", (40, 40), (0, 255, 255, 0))),  # red in CMYK
        ("I;16", lambda: Image.fromarray(np.full((40, 40), 40000, dtype=np.uint16))),
        ("L", lambda: Image.new("L", (40, 40), 128)),
        ("P", lambda: Image.new("RGB", (40, 40), (0, 200, 0)).convert("P")),
    ],
)
def test_modes_are_converted_to_rgb(tmp_path, mode, make):
    image = make()
    assert image.mode == mode
    path = tmp_path / ("photo.jpg" if mode == "CMYK" else "photo.png")
    image.save(path)
    loaded = load_photo(path, 16)
    assert loaded.mode == "RGB" and loaded.size == (16, 16)
    pixel = loaded.getpixel((8, 8))
    if mode == "CMYK":
        assert pixel[0] > 200 and pixel[1] < 60
    if mode == "I;16":
        assert 150 < pixel[0] < 160 and pixel[0] == pixel[1] == pixel[2]  # 40000/65535 * 255


def test_rgba_is_composited_on_white(tmp_path):
    image = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    image.paste((255, 0, 0, 255), (5, 5, 15, 15))
    image.save(tmp_path / "cutout.png")
    loaded = load_photo(tmp_path / "cutout.png", 20)
    assert loaded.getpixel((0, 0)) == (255, 255, 255)
    assert loaded.getpixel((10, 10)) == (255, 0, 0)


def test_center_crop_keeps_the_middle(tmp_path):
    image = Image.new("RGB", (90, 30), (255, 0, 0))
    image.paste((0, 255, 0), (30, 0, 60, 30))
    image.save(tmp_path / "wide.png")
    loaded = load_photo(tmp_path / "wide.png", 30)
    assert loaded.getpixel((0, 15)) == (0, 255, 0) and loaded.getpixel((29, 15)) == (0, 255, 0)


def test_bad_files_are_skipped_with_named_warnings_and_the_folder_is_untouched(photos):
    (photos / "notes.txt").write_text("not a photo")
    data = (photos / "photo0.png").read_bytes()
    good_jpeg = photos / "whole.jpg"
    Image.open(photos / "photo0.png").convert("RGB").save(good_jpeg, quality=90)
    (photos / "truncated.jpg").write_bytes(good_jpeg.read_bytes()[: len(good_jpeg.read_bytes()) // 2])
    (photos / "fake.png").write_bytes(b"\x89PNG not really")
    (photos / "tiny.webp").write_bytes(b"")
    before = folder_digest(photos)
    warnings = []
    result = load_photos(photos, 32, on_warning=warnings.append)
    assert folder_digest(photos) == before
    assert sorted(p.name for p in result.paths) == ["photo0.png", "photo1.png", "photo2.png", "photo3.png", "whole.jpg"]
    joined = "\n".join(warnings)
    for name in ("notes.txt", "truncated.jpg", "fake.png", "tiny.webp"):
        assert name in joined
    assert data == (photos / "photo0.png").read_bytes()


def test_decompression_bombs_are_refused(tmp_path, monkeypatch):
    import stc.train.images

    monkeypatch.setattr(stc.train.images, "MAX_PIXELS", 1000)
    Image.new("RGB", (100, 100)).save(tmp_path / "bomb.png")
    with pytest.raises(BadInput, match="decompression bomb"):
        load_photo(tmp_path / "bomb.png", 16)
    assert MAX_PIXELS > 10_000_000


def test_few_or_no_usable_images(tmp_path):
    Image.new("RGB", (20, 20)).save(tmp_path / "one.png")
    warnings = []
    assert len(load_photos(tmp_path, 16, on_warning=warnings.append).images) == 1
    assert any("only 1 usable image" in w for w in warnings)
    (tmp_path / "one.png").unlink()
    (tmp_path / "broken.jpg").write_bytes(b"garbage")
    with pytest.raises(BadInput, match="no usable images.*1 file"):
        load_photos(tmp_path, 16)
