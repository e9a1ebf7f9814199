"""Tests for formats/images.py: `load_image` turns every image mode into RGB the way a viewer shows it (palettes,
transparency over white, 16-bit), applies EXIF rotation, and refuses decompression bombs.

Run: .venv/bin/python -m pytest -q tests/test_images.py
"""
import io

import numpy as np
import pytest
from PIL import Image

from formats.images import load_image
from pictures import BLUE, RED, WHITE, png_bytes


# ---------------------------------------------------------------- load_image


def roundtrip(image, fmt="PNG", **save_kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save_kw)
    return buf.getvalue()


def over_white(rgb, alpha):
    return tuple(round(c * alpha / 255 + 255 * (1 - alpha / 255)) for c in rgb)


def test_load_image_modes():
    palette = Image.new("P", (2, 1))
    palette.putpalette(list(RED) + list(BLUE) + [0] * 762)
    palette.putdata([0, 1])
    out = load_image(roundtrip(palette))
    assert out.mode == "RGB" and [out.getpixel((x, 0)) for x in range(2)] == [RED, BLUE]

    palette.info["transparency"] = 1  # index 1 fully transparent -> white
    out = load_image(roundtrip(palette, transparency=1))
    assert [out.getpixel((x, 0)) for x in range(2)] == [RED, WHITE]

    rgba = Image.new("RGBA", (1, 1), RED + (100,))
    got = load_image(roundtrip(rgba)).getpixel((0, 0))
    assert all(abs(g - e) <= 1 for g, e in zip(got, over_white(RED, 100)))

    la = Image.new("LA", (1, 1), (60, 200))
    got = load_image(roundtrip(la)).getpixel((0, 0))
    assert all(abs(g - e) <= 1 for g, e in zip(got, over_white((60, 60, 60), 200)))

    gray = load_image(roundtrip(Image.new("L", (1, 1), 77)))
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (77, 77, 77)

    values = np.array([[0, 255, 4000, 65535]], dtype=np.uint16)
    deep = Image.fromarray(values)
    assert deep.mode == "I;16"
    for source in (deep, roundtrip(deep)):
        out = np.asarray(load_image(source))
        assert out.shape == (1, 4, 3) and (out[..., 0] == out[..., 2]).all()
        assert np.abs(out[0, :, 0].astype(int) - values[0] // 256).max() <= 1


def test_load_image_exif_rotation(tmp_path):
    pixels = np.zeros((2, 4, 3), dtype=np.uint8)  # 2 rows, 4 columns
    pixels[0, 0] = RED
    pixels[1, 3] = BLUE
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # Orientation 6: shown rotated 90 degrees clockwise
    path = tmp_path / "rotated.png"
    image.save(path, exif=exif)
    out = np.asarray(load_image(str(path)))
    assert out.shape == (4, 2, 3)
    assert (out == np.rot90(pixels, k=-1)).all()  # numpy's clockwise rotation, independent of PIL
    assert tuple(out[0, 1]) == RED  # the stored top-left is now top-right


def test_decompression_bomb_guard(monkeypatch):
    monkeypatch.setattr("formats.images.MAX_IMAGE_PIXELS", 63)
    with pytest.raises(ValueError, match="8x8 pixels is over MAX_IMAGE_PIXELS=63"):
        load_image(png_bytes(RED))
    monkeypatch.setattr("formats.images.MAX_IMAGE_PIXELS", 64)
    assert load_image(png_bytes(RED)).size == (8, 8)
