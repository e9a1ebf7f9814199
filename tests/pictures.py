"""Solid-colour images as real PNG files, so that a test can tell which image a loader put where by opening it."""
import io
import os

from PIL import Image

from formats.images import load_image

RED, GREEN, BLUE, WHITE = (220, 40, 40), (40, 180, 60), (50, 80, 220), (255, 255, 255)


def png_bytes(colour, size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def write_png(root, name, colour) -> str:
    path = os.path.join(root, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(png_bytes(colour))
    return name


def colour_of(image):
    return load_image(image).getpixel((0, 0))
