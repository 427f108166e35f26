"""
Data: image folders in, PNGs out, and the checks that run before training.

The idea. The model only ever sees x in [-1, 1] of shape (3, res, res); this file turns a folder of the
user's images into exactly that, the same way every time, and turns model outputs back into the exact
bytes a PNG holds. In: decode, EXIF rotation, 8-bit RGB, shorter side to res, centre square (the
ADM/DiT recipe), x = u8 / 127.5 - 1. Before a run: one pass that decodes every file and reports, as one
readable line, anything that would make training wrong (no images, unreadable files, empty or missing
class folders, fewer images than a batch), and warns about what it will use but might surprise
(upscaled, heavily cropped or skipped images). Out: u8 = round(clamp((x + 1) 127.5, 0, 255)), the
inverse up to rounding, written atomically. With no folder, training uses the procedural scenes of
scenes.py, which builds on this file.

Equations:
    x = u8 / 127.5 - 1                          uint8 pixel -> model range, 0 -> -1 and 255 -> +1
    u8 = round(clamp((x + 1) * 127.5, 0, 255))  model range -> the pixels a PNG stores (quantize)
    ADM resize: box-halve while min(W, H) >= 2 res; bicubic to min(W, H) = res; centre crop
    hflip: mirror example b iff rand_b < 1/2, rand from a checkpointed torch.Generator

Symbols: d (image width) -> res;  x (clean image) -> x;  class y -> label.  Legend: B batch,
C channels, H W spatial.

Choices (the paper trains on ImageNet only):
- Classes are the sorted first-level sub-folders; an image directly in the root has no class and is an
  error with class labels, as is an empty class folder or a single class.
- Transparency composited on white; palette, grayscale, CMYK (Pillow's formula, no ICC profile) and
  16-bit become 8-bit RGB; 16-bit grayscale keeps its high byte, as Pillow does for 16-bit RGB PNGs.
  Hidden files and folders (".x", macOS "._x.jpg") are skipped; symlinked folders are followed.
- No random flip inside an item: `hflip` flips a batch from a torch.Generator that train.py
  checkpoints, so a resumed run replays bit-identical batches.
- The pre-training check decodes JPEGs at reduced scale (Pillow's draft): all data is still parsed, so
  truncation is caught, at a fraction of the cost. Unreadable files stop the run unless skipped
  (--skip-bad); the skipped list is computed once and handed to every rank.
- The last section holds what every script shares (atomic writes, config flags, exit codes): this is
  the lowest file in the import order.

Run `python data.py --data DIR --res 64 --out check.png` to check a folder and look at its first
images; `pytest tests/test_data.py` for the tests.
"""
import argparse
import hashlib
import json
import math
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import field, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white, deterministically
ELONGATED = 2.0               # long / short side above this: the centre crop drops over half the image
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # "I" is how older Pillow opened 16-bit PNGs


class DataError(ValueError):
    """A problem with the user's data, reported as one readable line."""


class DataWarning(UserWarning):
    """Data that was used, but perhaps not as the user expects (skipped, upscaled, heavily cropped)."""


# ----------------------------------------------------------------------------------------------------
# Files -> RGB images
# ----------------------------------------------------------------------------------------------------

def _extensions() -> str:
    return ", ".join(IMAGE_EXTENSIONS) + " (any case, searched recursively)"


def find_images(root) -> list[Path]:
    """All images below root (recursive, extensions in any case, hidden entries skipped, symlinked
    folders followed), sorted so that every rank and every run sees the same order."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: no such folder (expected a folder of {_extensions()})")
    if not root.is_dir():
        raise DataError(f"{root}: is a file, not a folder (expected a folder of {_extensions()})")
    paths, seen = [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a symlink loop: do not walk the same folder twice
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        paths += [Path(folder, f) for f in files
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    if not paths:
        raise DataError(f"{root}: no images found; searched for {_extensions()}")
    return sorted(paths, key=lambda p: p.relative_to(root).as_posix())


def _open(path, draft_size=None) -> Image.Image:
    """Decode a file (optionally at reduced JPEG scale) and apply its EXIF orientation."""
    try:
        with Image.open(path) as im:
            if draft_size is not None:
                im.draft(im.mode, draft_size)  # JPEG only: decode at 1/2, 1/4 or 1/8 scale
            im.load()  # raises on truncated data (we never set ImageFile.LOAD_TRUNCATED_IMAGES)
            return ImageOps.exif_transpose(im)
    except Exception as e:  # PIL raises many types for truncated or non-image files
        raise DataError(_unreadable(path, e)) from e


def _unreadable(path, e: Exception) -> str:
    return (f"{path}: cannot read image ({type(e).__name__}: {e}); "
            f"replace or delete it, or skip bad files (--skip-bad)")


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB, with a fixed rule per mode (no data-dependent scaling)."""
    if im.mode in SIXTEEN_BIT_MODES:  # 16-bit grayscale: keep the high byte, as Pillow does for RGB
        a = np.asarray(im).astype(np.int64)
        im = Image.fromarray((np.clip(a, 0, 65535) >> 8).astype(np.uint8))  # 2-D uint8 -> mode L
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        im = im.convert("RGBA")  # palette / L / RGB with a transparent colour key become real alpha
        canvas = Image.new("RGBA", im.size, BACKGROUND + (255,))
        im = Image.alpha_composite(canvas, im)
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr -> RGB with Pillow's fixed formulas


def load_rgb(path) -> Image.Image:
    """Open an image as 8-bit RGB whatever its mode: EXIF rotation applied, alpha composited on
    BACKGROUND, palette / grayscale / CMYK / 16-bit converted. Raises DataError naming a bad file."""
    im = _open(path)
    try:
        return _to_rgb(im)
    except Exception as e:
        raise DataError(f"{path}: cannot convert mode {im.mode} to RGB ({e}); re-save it as RGB") from e


def center_crop_resize(img: Image.Image, res: int) -> Image.Image:
    """The ADM/DiT recipe: halve with a box filter while the shorter side is >= 2 res (cheap, no
    aliasing), bicubic so the shorter side is exactly res, then cut the centre res x res square.
    Images smaller than res are upscaled by the same bicubic step."""
    while min(img.size) >= 2 * res:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = res / min(img.size)
    img = img.resize(tuple(max(res, round(s * scale)) for s in img.size), resample=Image.BICUBIC)
    left, top = (img.width - res) // 2, (img.height - res) // 2
    return img.crop((left, top, left + res, top + res))


def u8_to_x(u8: np.ndarray) -> torch.Tensor:
    """uint8 (3, H, W) -> float32 tensor in [-1, 1]: x = u8 / 127.5 - 1, so 0 -> -1 and 255 -> 1 exactly.
    In numpy on purpose: one item is too small for torch's thread pool, which only adds contention."""
    return torch.from_numpy(u8.astype(np.float32) / np.float32(127.5) - np.float32(1.0))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB image -> float32 (3, H, W) in [-1, 1]."""
    return u8_to_x(np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)))  # (3, H, W)


def hflip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each example of a (B, C, H, W) batch left-right with probability 1/2. The coin flips are
    torch.rand(B, generator=generator) < 0.5, so a checkpointed generator replays them exactly."""
    flip = torch.rand(x.shape[0], generator=generator, device=generator.device) < 0.5  # (B,)
    return torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)


# ----------------------------------------------------------------------------------------------------
# Image folders: class structure, the checking pass, the Dataset
# ----------------------------------------------------------------------------------------------------

def class_index(root, paths, class_cond: bool):
    """(class_names, labels, counts). Classes are the sorted first-level sub-folders of root; ids are
    positions in that list. Without class_cond: (None, all zeros, None)."""
    if not class_cond:
        return None, [0] * len(paths), None
    root = Path(root)
    names = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    loose = [p for p in paths if p.parent == root]
    if loose:
        raise DataError(f"{root}: {len(loose)} images (e.g. {loose[0].name}) sit directly in the folder, so "
                        f"they have no class; with class labels every image must be in a class sub-folder")
    ids = {n: i for i, n in enumerate(names)}
    labels = [ids[p.relative_to(root).parts[0]] for p in paths]
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(names)).tolist()
    listing = ", ".join(f"{n}: {c}" for n, c in list(zip(names, counts))[:20])
    listing += ", ..." if len(names) > 20 else ""
    if len(names) < 2:
        raise DataError(f"{root}: class labels need at least 2 class folders, found {len(names)} "
                        f"({listing}); add folders or train without class labels")
    empty = [n for n, c in zip(names, counts) if c == 0]
    if empty:
        raise DataError(f"{root}: empty class folders {', '.join(empty[:20])} (classes and image counts: "
                        f"{listing}); add images or remove those folders")
    return names, labels, counts


def _inspect(path, res: int, decode: bool):
    """(mode, (W, H), error) of one file as stored, after decoding it through the same conversion as
    training uses (at reduced JPEG scale, which changes the size, hence the header read first)."""
    try:
        with Image.open(path) as im:
            mode, size = im.mode, im.size
        if decode:
            _to_rgb(_open(path, draft_size=(res, res)))
        return mode, size, None
    except DataError as e:
        return None, None, str(e)
    except Exception as e:
        return None, None, _unreadable(path, e)


def check_batch(num_images: int, global_batch: int, source: str = "the dataset"):
    """Refuse to train when one global batch (world size x per-rank batch x accumulation) is larger
    than the data: every "epoch" would be a partial batch or repeat images within a step."""
    if num_images < global_batch:
        raise DataError(f"{source} has {num_images} images, fewer than one global batch of {global_batch}; "
                        f"lower --batch-size, or add images (--num-scenes for the built-in data)")


def check_dataset(root, res: int, class_cond: bool = False, skip_bad: bool = False, min_images: int = 1,
                  decode: bool = True, workers: int | None = None, progress: bool = False,
                  share: tuple[int, int] = (0, 1), gather=None, cache=None) -> dict:
    """The pre-training pass. Finds the images, checks class folders, decodes every file (decode=False:
    headers only, which misses truncated files), and returns a summary of plain Python values:
        root, num_files, num_images (usable), bad_files (paths relative to root, skipped),
        class_names, class_counts, num_small, num_elongated, modes {mode: count}, warnings [str]
    Raises DataError for anything that would make training wrong; issues a DataWarning per warning.
    Several processes split the decoding: share=(rank, world) decodes every world-th file and
    gather(list) -> [list of each rank] collects the results, so every rank reaches the same verdict.
    cache: a JSON file holding the summary, reused while the file list, sizes and times are unchanged."""
    root = Path(root)
    paths = find_images(root)
    class_index(root, paths, class_cond)  # structure errors before the slow part
    key = _listing_key(root, paths, res, class_cond, skip_bad, decode)
    if cache is not None and Path(cache).is_file() and json.loads(Path(cache).read_text()).get("key") == key:
        summary = json.loads(Path(cache).read_text())["summary"]
        for m in summary["warnings"]:
            warnings.warn(m, DataWarning, stacklevel=2)
        return summary
    rank, world = share
    mine = paths[rank::world]
    bar = tqdm(total=len(mine), desc=f"checking {root}", unit="img", disable=not progress)
    results = []
    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:  # Pillow releases the GIL
        for start in range(0, len(mine), 1024):
            block = mine[start:start + 1024]
            results += pool.map(lambda p: _inspect(p, res, decode), block)
            bar.update(len(block))
    bar.close()
    if world > 1:   # interleave the ranks' shares back into the order of `paths`
        parts, results = gather(results), [None] * len(paths)
        for r, part in enumerate(parts):
            results[r::world] = part
    bad = [(p, err) for p, (_, _, err) in zip(paths, results) if err is not None]
    if bad and not skip_bad:
        more = f" (and {len(bad) - 1} more unreadable files)" if len(bad) > 1 else ""
        raise DataError(bad[0][1] + more)
    good = [(p, mode, size) for p, (mode, size, err) in zip(paths, results) if err is None]
    modes: dict[str, int] = {}
    for _, mode, _ in good:
        modes[mode] = modes.get(mode, 0) + 1
    num_small = sum(min(size) < res for _, _, size in good)
    num_elongated = sum(max(size) > ELONGATED * min(size) for _, _, size in good)
    msgs = []
    if bad:
        msgs.append(f"{root}: skipped {len(bad)} unreadable images, e.g. {bad[0][1].split('; ')[0]}")
    if num_small:
        msgs.append(f"{root}: {num_small} of {len(good)} images are smaller than {res} px on the short "
                    f"side and will be upscaled (blurry); consider a lower --res")
    if num_elongated:
        msgs.append(f"{root}: {num_elongated} of {len(good)} images are more than {ELONGATED:g}x longer than "
                    f"wide (or the reverse); the centre crop keeps less than half of each")
    for m in msgs:
        warnings.warn(m, DataWarning, stacklevel=2)
    names, _, counts = class_index(root, [p for p, _, _ in good], class_cond)  # skipping may empty a class
    check_batch(len(good), min_images, f"{root}")
    summary = {"root": str(root), "num_files": len(paths), "num_images": len(good),
            "bad_files": [p.relative_to(root).as_posix() for p, _ in bad],
            "class_names": names, "class_counts": counts, "num_small": num_small,
            "num_elongated": num_elongated, "modes": modes, "warnings": msgs}
    if cache is not None and rank == 0:
        write_atomic(cache, lambda f: f.write(json.dumps({"key": key, "summary": summary}).encode()))
    return summary


def _listing_key(root: Path, paths, *settings) -> str:
    """A digest of what the check depends on: each file's path, size and modification time, and the
    settings; a changed, added or removed file gives another key."""
    h = hashlib.sha256(repr(settings).encode())
    for p in paths:
        st = p.stat()
        h.update(f"{p.relative_to(root).as_posix()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


class ImageFolder(torch.utils.data.Dataset):
    """Every image below root as (x, label): x float32 (3, res, res) in [-1, 1], label an int (the class
    id of the first-level sub-folder with class_cond, else 0). Deterministic: no flip here (see hflip).
    bad_files: relative paths to leave out (check_dataset's summary["bad_files"]), so that every rank
    holds the same list. skip_bad: a file that still fails to load is replaced, with a warning, by the
    next loadable one (deterministically); otherwise a DataError names it."""

    def __init__(self, root, res: int, class_cond: bool = False, skip_bad: bool = False, bad_files=None):
        self.root, self.res, self.class_cond, self.skip_bad = Path(root), int(res), class_cond, skip_bad
        if self.res < 1:
            raise ValueError(f"res must be a positive number of pixels, got {res}")
        exclude = set(bad_files or ())
        self.paths = [p for p in find_images(self.root) if p.relative_to(self.root).as_posix() not in exclude]
        if not self.paths:
            raise DataError(f"{self.root}: every image was listed as bad; nothing left to train on")
        self.class_names, self.labels, self.class_counts = class_index(self.root, self.paths, class_cond)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        for j in range(len(self.paths)):
            k = (i + j) % len(self.paths)
            try:
                img = center_crop_resize(load_rgb(self.paths[k]), self.res)
                return to_tensor(img), self.labels[k]  # (3, res, res), int
            except DataError as e:
                if not self.skip_bad:
                    raise
                warnings.warn(f"{e}; using the next image instead", DataWarning, stacklevel=2)
        raise DataError(f"{self.root}: no image could be read")


# ----------------------------------------------------------------------------------------------------
# Pixels out: the exact uint8 of a PNG, atomic PNG files and grids
# ----------------------------------------------------------------------------------------------------

def quantize(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> uint8 (B, C, H, W) exactly as a PNG of them holds it:
    round(clamp((x + 1) * 127.5, 0, 255)). sample.py writes these pixels and fid.py measures them."""
    return ((images.detach().float() + 1.0) * 127.5).clamp(0.0, 255.0).round().to(torch.uint8)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] (or already uint8) -> (B, H, W, C) uint8 on the CPU, ready for PIL."""
    pixels = images if images.dtype == torch.uint8 else quantize(images)
    return pixels.permute(0, 2, 3, 1).cpu()


def save_png(array, path) -> None:
    """Write a (H, W, C) uint8 array as a PNG, atomically (write_atomic)."""
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)   # L or RGB
    write_atomic(path, lambda f: image.save(f, format="PNG"))


def save_grid(images: torch.Tensor, path, nrow: int | None = None, padding: int = 2) -> None:
    """(B, C, H, W) images in [-1, 1] (or uint8) -> one PNG grid, nrow images per row (default
    ceil(sqrt(B))), `padding` black pixels between them; written atomically."""
    pixels = to_uint8(images)                                    # (B, H, W, C)
    b, h, w, c = pixels.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    grid = torch.zeros(rows * (h + padding) + padding, nrow * (w + padding) + padding, c, dtype=torch.uint8)
    for i in range(b):
        y, x = padding + (i // nrow) * (h + padding), padding + (i % nrow) * (w + padding)
        grid[y:y + h, x:x + w] = pixels[i]
    save_png(grid.numpy(), path)


def draw_loss_curve(records: list[dict], path: Path, size=(560, 320)) -> None:
    """Loss against step on a log axis: the logged values (light) and a centred moving average of
    about 1/20 of the run (dark, no lag), with round-number ticks; drawn with Pillow."""
    from PIL import Image, ImageDraw
    pts = [(r["step"], math.log10(r["loss"])) for r in records if r.get("loss", 0) > 0 and math.isfinite(r["loss"])]
    if len(pts) < 2:
        return
    w, h, (l, r, t, b) = *size, (60, 15, 25, 35)
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    x0, x1 = pts[0][0], pts[-1][0]
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    y0, y1 = (y0 - 0.05, y1 + 0.05) if y1 - y0 < 0.1 else (y0, y1)
    sx = lambda s: l + (s - x0) / max(x1 - x0, 1) * (w - l - r)              # noqa: E731
    sy = lambda y: t + (y1 - y) / (y1 - y0) * (h - t - b)                   # noqa: E731
    d.rectangle([l, t, w - r, h - b], outline="black")
    for k in range(math.ceil(y0 * 4), math.floor(y1 * 4) + 1):              # y ticks at 10^(k/4)
        d.line([l - 4, sy(k / 4), l, sy(k / 4)], fill="black")
        d.text((4, sy(k / 4) - 6), f"{10 ** (k / 4):.3g}", fill="black")
    gap = 10 ** math.floor(math.log10(max(x1 - x0, 1) / 4))                 # x ticks at 1, 2 or 5 x 10^k
    gap *= next(m for m in (1, 2, 5, 10) if (x1 - x0) / (gap * m) <= 6)
    for k in range(math.ceil(x0 / gap), math.floor(x1 / gap) + 1):
        d.line([sx(k * gap), h - b, sx(k * gap), h - b + 4], fill="black")
        d.text((sx(k * gap) - 12, h - b + 7), f"{k * gap:g}", fill="black")
    half = len(pts) // 40
    windows = [[y for _, y in pts[max(i - half, 0):i + half + 1]] for i in range(len(pts))]
    smooth = [(s, sum(win) / len(win)) for (s, _), win in zip(pts, windows)]
    d.line([(sx(s), sy(y)) for s, y in pts], fill=(170, 190, 230), width=1)
    d.line([(sx(s), sy(y)) for s, y in smooth], fill=(20, 60, 160), width=2)
    d.text((l, 5), "training loss (log scale) vs step", fill="black")
    write_atomic(path, lambda f: img.save(f, format="PNG"))


# ----------------------------------------------------------------------------------------------------
# The order of the images in training: a permutation per (seed, epoch), each global batch cut into the
# ranks' and micro-steps' slices. Pure functions of the seed, so a resumed run replays the same order.
# ----------------------------------------------------------------------------------------------------

def derive_seed(*parts) -> int:
    """A 63-bit seed from a tuple such as (seed, "noise", rank): independent streams per purpose/rank."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "data", epoch)))


def shard(global_batch: torch.Tensor, rank: int, world: int, accum: int) -> list[torch.Tensor]:
    """This rank's micro-batches of one global batch: slot m * world + rank of size G / (world * accum).
    The ranks' slices are disjoint and together cover the global batch exactly once."""
    size = global_batch.numel() // (world * accum)
    return [global_batch[(m * world + rank) * size:(m * world + rank + 1) * size] for m in range(accum)]


class ShardSampler:
    """Yields this rank's micro-batches of dataset indices forever, from a saved position (epoch, batch);
    a DataLoader batch_sampler. The last incomplete batch of an epoch is dropped."""

    def __init__(self, n, global_batch, accum, rank, world, seed, epoch=0, batch=0):
        self.n, self.g, self.accum, self.rank, self.world = n, global_batch, accum, rank, world
        self.seed, self.epoch, self.batch = seed, epoch, batch

    def __iter__(self):
        epoch, batch = self.epoch, self.batch
        while True:
            perm = epoch_permutation(self.seed, epoch, self.n)
            for b in range(batch, self.n // self.g):
                yield from (idx.tolist() for idx in shard(perm[b * self.g:(b + 1) * self.g], self.rank,
                                                          self.world, self.accum))
            epoch, batch = epoch + 1, 0


# ----------------------------------------------------------------------------------------------------
# What every script shares: atomic files, config dataclasses as command lines, one set of exit codes.
# They live here because data.py is the lowest file that train, sample, fid and bench all import.
# ----------------------------------------------------------------------------------------------------

EXIT_FAILURE, EXIT_USAGE = 1, 2   # 2: a bad flag, file, dataset or checkpoint; 1: the run itself failed


def write_atomic(path, write) -> Path:
    """Create `path` through `write(f)` (f: a binary file object): the bytes go to a temp file beside it,
    are fsynced, then os.replace'd into place. A reader sees the complete old file or the complete new
    one; a killed writer leaves only `<name>.tmp<pid>`, which no reader's pattern matches. A failure
    removes the temp file and re-raises, so an existing file is never left half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def flag(default, help: str, **argparse_kw):
    """A config dataclass field that is also a command-line flag: its --help text and argparse extras
    (choices, metavar; `name` for another flag name, `aliases` for more)."""
    return field(default=default, metadata=dict(help=help, **argparse_kw))


def add_config_flags(parser: argparse.ArgumentParser, config_cls, typed_only: bool = False) -> None:
    """One --field-name per field of a config dataclass, the same way in every script: booleans as
    --x / --no-x, tuples as nargs=len, the type from the annotation (or the default). typed_only: flags
    the user did not type are left out of the namespace (train.py layers them over a preset row)."""
    for f in fields(config_cls):
        meta = dict(f.metadata)
        names = (meta.pop("name", "--" + f.name.replace("_", "-")), *meta.pop("aliases", ()))
        meta["help"] = f"{meta['help']} (default: {f.default!r})".replace("%", "%%")
        kw = dict(dest=f.name, default=argparse.SUPPRESS if typed_only else f.default, **meta)
        if f.type in (bool, bool | None):
            parser.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(f.default, tuple):
            parser.add_argument(*names, type=type(f.default[0]), nargs=len(f.default), **kw)
        else:   # the annotation's type; for "float | None" the non-None member
            kind = next((t for t in getattr(f.type, "__args__", (f.type,)) if t is not type(None)), str)
            parser.add_argument(*names, type=kind, **kw)


def config_from_args(config_cls, args: dict):
    """The dataclass from parsed flags (lists back to tuples, so configs compare equal)."""
    return config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})


def error_exit_code(e: BaseException, print_error: bool = True) -> int:
    """Report a failure as one `error: ...` line on stderr and return the exit code: EXIT_USAGE for a
    bad input (every ValueError: flags, files, data, checkpoints), EXIT_FAILURE for anything else.
    An error re-raised by a DataLoader worker carries a traceback; its last line is the message."""
    lines = str(e).strip().splitlines() or [type(e).__name__]
    message = lines[-1].split("Error: ", 1)[-1] if len(lines) > 1 else lines[0]
    if print_error:   # tqdm.write: on a line of its own, below any progress bar
        tqdm.write(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE if isinstance(e, ValueError) else EXIT_FAILURE


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Check an image folder as training would; show its first images.")
    p.add_argument("--data", required=True, help="image folder to check (recursive; classes = sub-folders)")
    p.add_argument("--res", type=int, default=64, help="image width in pixels")
    p.add_argument("--class-cond", action="store_true", help="use first-level sub-folders as classes")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images with a warning")
    p.add_argument("--out", default="check.png", help="PNG grid of the first 64 images to write")
    args = p.parse_args(argv)
    try:
        summary = check_dataset(args.data, args.res, args.class_cond, args.skip_bad, progress=True)
        print({k: v for k, v in summary.items() if k not in ("bad_files", "warnings")})
        ds = ImageFolder(args.data, args.res, args.class_cond, args.skip_bad, summary["bad_files"])
        items = [ds[i] for i in range(min(64, len(ds)))]
        save_grid(torch.stack([x for x, _ in items]), args.out)
    except Exception as e:
        return error_exit_code(e)
    names = ds.class_names or ["-"]
    print(f"wrote {args.out}; labels row by row:")
    for r in range(0, len(items), 8):
        print("  " + " ".join(f"{names[y]:>8}" for _, y in items[r:r + 8]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
