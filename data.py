"""
Data: image folders and the built-in procedural dataset.  (Module docstring to be completed by the
data issue; this first version holds the two loader functions that fid.py shares.)
"""
from pathlib import Path

from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white, deterministically


class DataError(ValueError):
    """A problem with the user's data, reported as one readable line."""


def find_images(root) -> list[Path]:
    """All images below root (recursive, extensions in any case), sorted for a deterministic order."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (expected a folder of images)")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not paths:
        raise DataError(f"{root}: no images found (searched recursively for {', '.join(IMAGE_EXTENSIONS)}, any case)")
    return paths


def load_rgb(path) -> Image.Image:
    """Open an image as 8-bit RGB whatever its mode: EXIF rotation applied, alpha composited on
    BACKGROUND, palette / grayscale / CMYK / 16-bit converted. Raises DataError naming a bad file."""
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
    except Exception as e:  # PIL raises many types for truncated or non-image files
        raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):          # 16/32-bit grayscale: scale to 8 bits
        im = im.point(lambda v: v / 256).convert("L") if im.mode != "I" else im.convert("L")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        canvas = Image.new("RGBA", im.size, BACKGROUND + (255,))
        im = Image.alpha_composite(canvas, im)
    return im.convert("RGB")
