"""
Scenes: the built-in data, pictures defined by a few numbers and drawn at any resolution; and a shape
score that checks whether a model drew the shape it was asked for.

The idea. A scene is a gradient background with 1-3 discs, squares or triangles, stored not as pixels
but as a handful of numbers (two colours and an angle for the background; a centre, size, angle and
colour per shape) drawn from (seed, index). Rasterising those numbers at 32x32 or at 128x128 gives one
picture at two sampling rates: the 128 px render, average-pooled by 4, is the 32 px render up to
anti-aliasing and rounding. That is simple diffusion's argument made testable (Hoogeboom et al. 2023,
Sec. 3.1): more pixels add correlated neighbours, not content. Pooling by k averages k^2 independent
noise values but no new signal, so the pooled image has k^2 times the signal-to-noise ratio: at a given
noise level a 128 px image still shows its big structure once its neighbours are averaged. The schedule
must therefore add more noise at high resolution -- the log-SNR shifted by 2 log(64 / d) (Eq. 5) --
instead of reusing the 64x64 one. The same property gives a cheap, resolution-free check of samples:
one shape classifier, trained at 32 px, judges 64 and 128 px images after pooling them down.

Equations (coordinates p in [0, 1]^2, image width = 1, x right, y down):
    draws        u(seed, i, c) = (h(h(h(seed) xor i) + c) >> 11) * 2^-53,  h = splitmix64, c = column
    background   bg(p) = c0 + s(p) (c1 - c0),  s(p) = 1/2 + <p - 1/2, u> / (|u_x| + |u_y|),
                 u = (cos a, sin a)
    coverage     a(p) = clip(1/2 - sd(p) res, 0, 1)      (sd: signed distance to the shape's edge)
                 disc: sd = |p - c| - r;   regular m-gon: sd = max_k <p - c, n_k> - apothem
    painter      img <- img + a (colour - img), largest shape first
    pooling      avg_pool_k(render(k d)) ~ render(d)      (the ramp approximates a pixel's covered area)
                 SNR(avg_pool_k(x + noise)) = k^2 SNR(x + noise),  i.e. log-SNR + 2 log k
    shape score  score = (1 / B) sum_b [argmax_k f(pool_32(x_b))_k = y_b]   (f: the classifier)

Symbols: d (image width) -> res;  x (image) -> x;  class y -> label (the shape kind);  c0, c1, a ->
bg0, bg1, bg_angle;  c, r -> centre, size.  Legend: B batch, H W spatial, S shape slots, K colour
candidates.

Choices:
- Randomness is a counter-based hash, not a stateful RNG: any index renders alone, in any chunk or
  DataLoader worker, identically, and a parameter always reads the same column of draws.
- One shape kind per scene: the class label. Each shape colour is >= 0.45 (RGB distance) from every
  background colour of its scene, so a shape is never camouflaged.
- Big shapes, mostly alone: an equal-area radius of 16-30% of the width and P(1, 2, 3 shapes) =
  (0.5, 0.3, 0.2). At 32x32 a smaller triangle is a few pixels across, a blob even when drawn exactly.
- The classifier sees 32x32: larger inputs are average-pooled down (for 64 and 128 px an exact 2x2 or
  4x4 mean, which by the pooling equation is nearly the 32 px render), smaller ones upsampled
  bilinearly. It trains on seed-1 scenes (diffusion training uses seed 0) with the 8 flips and
  quarter-turns of the square (each keeps the kind) and a little Gaussian noise (samples are never
  exactly clean), on one thread, so the result does not depend on the core count: 1-2 minutes on one
  core of a shared 2-core machine. It is cached and retrained only when the recipe or the scenes change.
- Measured on 3,000 held-out scenes (seed 2): 99.8-99.9% right at 32, 48, 64, 96 and 128 px, and the
  32 px render and the pooled 128 px render get the same answer 99.9% of the time; at 24 px 99.4%, at
  16 px only 90% (there a small triangle is a few pixels across).
- The score judges silhouettes only, not backgrounds or colours (FID's job, fid.py): it answers "is the
  model's triangle a triangle?", i.e. whether class conditioning works. Chance is 1/3.

Run `python scenes.py --res 64 --out scenes.png` to look at scenes (`--score` also names their shapes
with the classifier); `pytest tests/test_scenes.py` for the tests (`-m "not slow"` skips the
classifier's training).
"""
import argparse
import hashlib
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import error_exit_code, save_grid, u8_to_x, write_atomic

# ----------------------------------------------------------------------------------------------------
# Scene parameters: a few numbers per scene, from a hash of (seed, index)
# ----------------------------------------------------------------------------------------------------

KINDS = ("disc", "square", "triangle")
N_SHAPES_P = (0.5, 0.3, 0.2)  # P(1, 2, 3 shapes): mostly one, so a small model sees whole silhouettes
MAX_SHAPES = len(N_SHAPES_P)
NUM_CANDIDATES = 8    # colour candidates per shape; the first far enough from the background wins
MIN_CONTRAST = 0.45   # RGB distance (colours in [0, 1]) between a shape and every background colour
SIZE_RANGE = (0.16, 0.30)  # "size" = radius of the disc of equal area, as a fraction of the width
# Shape geometry per kind, all with the area of a disc of radius `size`:
#   apothem / size (distance centre -> edge): square sqrt(pi)/2, triangle sqrt(pi / (3 sqrt 3));
#   extent / size (centre -> farthest point): disc 1, square apothem * sqrt 2, triangle 2 * apothem.
APOTHEM = (1.0, math.sqrt(math.pi) / 2, math.sqrt(math.pi / (3 * math.sqrt(3))))
EXTENT = (1.0, APOTHEM[1] * math.sqrt(2), 2 * APOTHEM[2])
SIDES = (0, 4, 3)
# Column layout of the per-scene uniform draws: each parameter always reads the same columns.
_BG, _NSHAPES, _KIND, _SHAPES = 0, 7, 8, 9
_PER_SHAPE = 4 + 3 * NUM_CANDIDATES  # cx, cy, size, angle, candidate colours
_NUM_DRAWS = _SHAPES + MAX_SHAPES * _PER_SHAPE


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser (Steele et al. 2014): a bijective scrambler of 64-bit integers."""
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _uniform(seed: int, indices: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """U[0, 1) draws, a pure function of (seed, scene index, column): (B,) x (K,) -> (B, K) float64."""
    key = _splitmix64(np.array([seed % 2**64], dtype=np.uint64))
    key = _splitmix64(key ^ np.asarray(indices, dtype=np.uint64))              # (B,)
    with np.errstate(over="ignore"):
        z = _splitmix64(key[:, None] + np.asarray(columns, dtype=np.uint64)[None])  # (B, K)
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def scene_kinds(indices, seed: int = 0) -> np.ndarray:
    """Shape kind (0 disc, 1 square, 2 triangle) of each scene, without drawing anything else."""
    return np.minimum((_uniform(seed, indices, [_KIND])[:, 0] * 3).astype(np.int64), 2)


def scene_params(indices, seed: int = 0) -> dict:
    """The vector description of scenes: plain arrays, resolution-free (coordinates in [0, 1], x to the
    right, y down). Shapes are sorted largest first; slots beyond n_shapes are unused."""
    indices = np.asarray(indices, dtype=np.int64)
    u = _uniform(seed, indices, np.arange(_NUM_DRAWS))                             # (B, NUM_DRAWS)
    kind = scene_kinds(indices, seed)                                              # (B,)
    bg0, bg1 = 0.1 + 0.8 * u[:, _BG:_BG + 3], 0.1 + 0.8 * u[:, _BG + 3:_BG + 6]    # (B, 3) each
    s = u[:, _SHAPES:].reshape(-1, MAX_SHAPES, _PER_SHAPE)                         # (B, S, per shape)
    size = SIZE_RANGE[0] + (SIZE_RANGE[1] - SIZE_RANGE[0]) * s[:, :, 2]            # (B, S)
    order = np.argsort(-size, axis=1, kind="stable")  # painter's order: big shapes first, small on top
    s, size = np.take_along_axis(s, order[:, :, None], 1), np.take_along_axis(size, order, 1)
    margin = 0.85 * size * np.asarray(EXTENT)[kind][:, None]  # keep (almost) all of a shape inside
    centre = margin[..., None] + (1 - 2 * margin[..., None]) * s[:, :, 0:2]        # (B, S, 2)
    # Colour: the first candidate at least MIN_CONTRAST from the background segment [bg0, bg1] (every
    # background pixel lies on it); if none is, the farthest candidate.
    cand = s[:, :, 4:].reshape(-1, MAX_SHAPES, NUM_CANDIDATES, 3)                  # (B, S, K, 3)
    a, d = bg0[:, None, None], (bg1 - bg0)[:, None, None]                          # (B, 1, 1, 3)
    t = ((cand - a) * d).sum(-1, keepdims=True) / np.maximum((d * d).sum(-1, keepdims=True), 1e-12)
    dist = np.linalg.norm(cand - (a + np.clip(t, 0, 1) * d), axis=-1)  # to the nearest point (B, S, K)
    ok = dist >= MIN_CONTRAST
    pick = np.where(ok.any(-1), ok.argmax(-1), dist.argmax(-1))                    # (B, S)
    colour = np.take_along_axis(cand, pick[..., None, None], 2)[:, :, 0]           # (B, S, 3)
    return {"kind": kind, "bg0": bg0, "bg1": bg1, "bg_angle": 2 * math.pi * u[:, _BG + 6],
            "n_shapes": 1 + np.searchsorted(np.cumsum(N_SHAPES_P)[:-1], u[:, _NSHAPES], side="right"),
            "centre": centre, "size": size, "angle": 2 * math.pi * s[:, :, 3], "colour": colour}


# ----------------------------------------------------------------------------------------------------
# Rasterising: background ramp, coverage from signed distance, painter's order
# ----------------------------------------------------------------------------------------------------

def _render_kind(p: dict, kind: int, res: int) -> np.ndarray:
    """Rasterise scenes that all share one shape kind: float32 (B, 3, res, res) in [0, 1]."""
    f32 = np.float32
    xy = ((np.arange(res) + 0.5) / res).astype(f32)                                # pixel centres
    X, Y = xy[None, None, :], xy[None, :, None]                                    # (1, 1, W), (1, H, 1)
    ux, uy = np.cos(p["bg_angle"]), np.sin(p["bg_angle"])
    norm = np.abs(ux) + np.abs(uy)  # so that s = 0 and 1 at the two extreme corners
    sx, sy = (ux / norm).astype(f32)[:, None, None], (uy / norm).astype(f32)[:, None, None]
    s = 0.5 + (X - 0.5) * sx + (Y - 0.5) * sy                                      # (B, H, W)
    bg0, bg1 = p["bg0"].astype(f32)[:, :, None, None], p["bg1"].astype(f32)[:, :, None, None]
    img = bg0 + s[:, None] * (bg1 - bg0)                                           # (B, 3, H, W)
    for j in range(MAX_SHAPES):
        dx = X - p["centre"][:, j, 0].astype(f32)[:, None, None]                   # (B, 1, W)
        dy = Y - p["centre"][:, j, 1].astype(f32)[:, None, None]                   # (B, H, 1)
        size = p["size"][:, j]
        if kind == 0:
            sd = np.sqrt(dx * dx + dy * dy) - size.astype(f32)[:, None, None]      # (B, H, W)
        else:  # a convex polygon is the intersection of its edge half-planes: sd = max over edges
            sd = None
            for k in range(SIDES[kind]):
                phi = p["angle"][:, j] + 2 * math.pi * k / SIDES[kind]
                nx, ny = np.cos(phi).astype(f32)[:, None, None], np.sin(phi).astype(f32)[:, None, None]
                e = dx * nx + dy * ny                                              # (B, H, W)
                sd = e if sd is None else np.maximum(sd, e)
            sd -= (APOTHEM[kind] * size).astype(f32)[:, None, None]
        active = (j < p["n_shapes"]).astype(f32)[:, None, None]
        a = np.clip(0.5 - sd * f32(res), 0, 1) * active                            # coverage (B, H, W)
        img += a[:, None] * (p["colour"][:, j].astype(f32)[:, :, None, None] - img)
    return img


def render_scenes(indices, res: int, seed: int = 0) -> np.ndarray:
    """Scenes with the given indices at res x res: uint8 (B, 3, res, res). Each scene depends only on
    (seed, index) -- not on res, the chunk it is rendered with, or the process."""
    indices = np.asarray(indices, dtype=np.int64)
    p = scene_params(indices, seed)
    out = np.empty((len(indices), 3, res, res), dtype=np.uint8)
    for kind in range(len(KINDS)):  # one kind per call: each scene only pays for its own distance
        sel = np.flatnonzero(p["kind"] == kind)
        if sel.size:
            img = _render_kind({k: v[sel] for k, v in p.items()}, kind, res)
            out[sel] = np.rint(img * 255)
    return out


# ----------------------------------------------------------------------------------------------------
# The dataset: the same items as data.ImageFolder
# ----------------------------------------------------------------------------------------------------

class Scenes(torch.utils.data.Dataset):
    """n procedural scenes at res x res (see the module docstring), the same items as data.ImageFolder.
    The label is the scene's shape kind (all its shapes share it) with class_cond, else 0. cache=None
    renders all scenes once into a uint8 tensor if that takes at most 1 GiB, else each item on demand."""

    def __init__(self, n: int, res: int, class_cond: bool = False, seed: int = 0, cache: bool | None = None):
        if n < 1 or res < 1:
            raise ValueError(f"Scenes needs n >= 1 scenes and res >= 1 pixels, got n={n}, res={res}")
        self.n, self.res, self.class_cond, self.seed = int(n), int(res), class_cond, int(seed)
        self.class_names = list(KINDS) if class_cond else None
        self.kinds = torch.from_numpy(scene_kinds(np.arange(self.n), self.seed))  # (n,) long
        self.images = None
        if cache or (cache is None and self.n * 3 * self.res**2 <= 2**30):
            self.images = torch.empty(self.n, 3, self.res, self.res, dtype=torch.uint8)
            chunk = max(1, 2**18 // self.res**2)  # ~256k pixels per chunk keeps temporaries in cache
            for start in range(0, self.n, chunk):
                idx = np.arange(start, min(start + chunk, self.n))
                u8 = render_scenes(idx, self.res, self.seed)                       # (chunk, 3, res, res)
                self.images[start:start + len(idx)] = torch.from_numpy(u8)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(f"scene {i} out of range 0..{self.n - 1}")
        u8 = self.images[i].numpy() if self.images is not None else render_scenes([i], self.res, self.seed)[0]
        return u8_to_x(u8), int(self.kinds[i]) if self.class_cond else 0  # (3, res, res), int


# ----------------------------------------------------------------------------------------------------
# The shape score: a small CNN names each image's shape kind, trained on demand and cached
# ----------------------------------------------------------------------------------------------------

CLASSIFIER_RES = 32   # every input is pooled (or upsampled) to this width first
CLASSIFIER_SEED = 1   # scene seed of the classifier's training data; diffusion training uses seed 0
# The whole training recipe; any change to it (or to the scenes) makes a cached classifier stale.
RECIPE = {"num_scenes": 20000, "steps": 600, "batch": 64, "lr": 3e-3, "width": 16, "noise": 0.1,
          "torch_seed": 0}
CACHE_NAME = "shape_classifier.pt"


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/simple-diffusion, else ~/.cache/simple-diffusion."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "simple-diffusion"


def to_classifier_res(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, 32, 32): area average when larger (for a scene, the 32 px render),
    bilinear when smaller."""
    if x.shape[-2:] == (CLASSIFIER_RES, CLASSIFIER_RES):
        return x
    if min(x.shape[-2:]) > CLASSIFIER_RES:
        return F.adaptive_avg_pool2d(x, CLASSIFIER_RES)                                   # (B, 3, 32, 32)
    return F.interpolate(x, size=(CLASSIFIER_RES,) * 2, mode="bilinear", align_corners=False)


def _block(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 conv, BatchNorm (trains fast; fixed statistics once in eval mode), SiLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.SiLU())


class ShapeClassifier(nn.Module):
    """Images (B, 3, H, W) in [-1, 1], any H W -> logits (B, 3) over KINDS. Four 3x3 conv stages with
    max pooling between them: a corner or an edge anywhere is what tells the kinds apart, and a max
    keeps it however small. 63k parameters."""

    def __init__(self, width: int = RECIPE["width"]):
        super().__init__()
        w = width
        self.features = nn.Sequential(_block(3, w), _block(w, w), nn.MaxPool2d(2), _block(w, 2 * w),
                                      nn.MaxPool2d(2), _block(2 * w, 4 * w), nn.MaxPool2d(2),
                                      _block(4 * w, 4 * w))
        self.head = nn.Linear(4 * w, len(KINDS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(to_classifier_res(x))                                        # (B, 4w, 4, 4)
        return self.head(h.mean((2, 3)))                                               # (B, 3)


def augment(x: torch.Tensor, generator: torch.Generator, noise: float) -> torch.Tensor:
    """One of the 8 symmetries of the square for the whole batch (each keeps every shape's kind), then
    Gaussian noise with a per-image standard deviation drawn from U(0, noise)."""
    k = int(torch.randint(0, 8, (), generator=generator))
    x = x.flip(-1) if k & 1 else x
    x = x.flip(-2) if k & 2 else x
    x = x.transpose(-1, -2) if k & 4 else x
    sigma = noise * torch.rand(x.shape[0], 1, 1, 1, generator=generator)               # (B, 1, 1, 1)
    return x + sigma * torch.randn(x.shape, generator=generator)


def train_shape_classifier(recipe: dict = RECIPE, log=print) -> ShapeClassifier:
    """Train on num_scenes scenes of CLASSIFIER_SEED at 32 px with AdamW and a one-cycle LR, on one
    thread. Seeded throughout (initialisation inside fork_rng, batches and augmentation from one
    generator), so the result depends only on the recipe, torch and the CPU; the caller's RNG and
    thread count are left as they were."""
    t0, threads = time.perf_counter(), torch.get_num_threads()
    idx = np.arange(recipe["num_scenes"])
    x = u8_to_x(render_scenes(idx, CLASSIFIER_RES, CLASSIFIER_SEED))                   # (N, 3, 32, 32)
    y = torch.from_numpy(scene_kinds(idx, CLASSIFIER_SEED))                            # (N,)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe["torch_seed"])
        model = ShapeClassifier(recipe["width"])
    torch.set_num_threads(1)  # small convolutions gain little from 2 threads and lose 4x on a busy machine
    try:
        loss = _fit(model, x, y, recipe)
    finally:
        torch.set_num_threads(threads)
    log(f"shape classifier: trained on {len(y)} scenes, {recipe['steps']} steps, "
        f"{time.perf_counter() - t0:.0f} s (final batch loss {loss:.3f})")
    return model.eval().requires_grad_(False)


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, recipe: dict) -> float:
    """The training loop; returns the last batch's loss."""
    gen = torch.Generator().manual_seed(recipe["torch_seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, recipe["lr"], total_steps=recipe["steps"], pct_start=0.1)
    model.train()
    for _ in range(recipe["steps"]):
        i = torch.randint(0, len(y), (recipe["batch"],), generator=gen)                # (batch,)
        loss = F.cross_entropy(model(augment(x[i], gen, recipe["noise"])), y[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return loss.item()


def recipe_key(recipe: dict = RECIPE) -> str:
    """A fingerprint of what the classifier learns from: the recipe and a few of its training scenes'
    pixels, so that a change to the scene generator also retrains."""
    h = hashlib.sha256(repr(sorted(recipe.items())).encode())
    h.update(render_scenes(np.arange(16), CLASSIFIER_RES, CLASSIFIER_SEED).tobytes())
    return h.hexdigest()[:16]


def _load_cached(path: Path, key: str, log) -> dict | None:
    """The state dict saved at path if it was made with this key, else None."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return saved["state_dict"] if saved["key"] == key else None
    except FileNotFoundError:
        return None
    except Exception as e:  # a truncated or foreign file is rebuilt, never trusted
        log(f"shape classifier: ignoring unreadable {path} ({type(e).__name__})")
        return None


def shape_classifier(cache_dir=None, device="cpu", log=print) -> ShapeClassifier:
    """The trained classifier, in eval mode and frozen: loaded from cache_dir/shape_classifier.pt if
    that file was made by the current recipe, else trained (one to two minutes) and saved there
    atomically. cache_dir: None for default_cache_dir(), or e.g. a run folder."""
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / CACHE_NAME
    key = recipe_key()
    state = _load_cached(path, key, log)
    if state is not None:
        model = ShapeClassifier()
        model.load_state_dict(state)
        model.eval().requires_grad_(False)
    else:
        log(f"shape classifier: training one for {path} (cached for later calls)")
        model = train_shape_classifier(log=log)
        write_atomic(path, lambda f: torch.save({"key": key, "state_dict": model.state_dict()}, f))
    return model.to(device)


@torch.no_grad()
def classify_shapes(images: torch.Tensor, classifier: nn.Module, batch_size: int = 256) -> torch.Tensor:
    """Predicted kind (B,) of images (B, 3, H, W), in [-1, 1] or uint8 (then x = u8 / 127.5 - 1)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"shape score: images must be (B, 3, H, W), got {tuple(images.shape)}")
    device = next(classifier.parameters()).device
    out = []
    for chunk in images.split(batch_size):
        x = chunk.to(device)
        x = x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x.float()           # (b, 3, H, W)
        out.append(classifier(x).argmax(1).cpu())                                      # (b,)
    return torch.cat(out)


def score_predictions(predicted: torch.Tensor, asked: torch.Tensor) -> dict:
    """score: fraction named as asked; per_kind: that fraction among the images asked for each kind
    (None if none was); confusion[asked][predicted]: counts; n: number of images."""
    confusion = torch.zeros(len(KINDS), len(KINDS), dtype=torch.long)
    confusion.index_put_((asked, predicted), torch.ones_like(asked), accumulate=True)   # (3, 3)
    per_kind = {name: (confusion[k, k] / confusion[k].sum()).item() if confusion[k].sum() else None
                for k, name in enumerate(KINDS)}
    return {"score": confusion.trace().item() / max(1, len(asked)), "per_kind": per_kind,
            "confusion": confusion.tolist(), "n": len(asked)}


def shape_score(images: torch.Tensor, asked_labels, classifier: nn.Module) -> dict:
    """How often images (B, 3, H, W) (in [-1, 1] or uint8, any resolution) show the shape kind asked
    for: asked_labels (B,) ints in 0..2 (KINDS). Returns score_predictions' dict; chance is 1/3."""
    asked = torch.as_tensor(asked_labels, dtype=torch.long).cpu().reshape(-1)          # (B,)
    if len(asked) != len(images):
        raise ValueError(f"shape score: {len(images)} images but {len(asked)} labels")
    if len(asked) and not 0 <= int(asked.min()) <= int(asked.max()) < len(KINDS):
        raise ValueError(f"shape score: labels must be 0..{len(KINDS) - 1} ({', '.join(KINDS)})")
    return score_predictions(classify_shapes(images, classifier), asked)


# ----------------------------------------------------------------------------------------------------
# Demo: a grid to look at
# ----------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Render a grid of procedural scenes (and name their shapes).")
    p.add_argument("--res", type=int, default=64, help="image width in pixels")
    p.add_argument("--n", type=int, default=64, help="scenes to render (the grid shows the first 64)")
    p.add_argument("--seed", type=int, default=0, help="scene seed")
    p.add_argument("--out", default="scenes.png", help="PNG grid to write")
    p.add_argument("--score", action="store_true", help="also run the shape classifier on all n scenes")
    p.add_argument("--cache-dir", default=None, help="where the classifier is cached (default: "
                   "$XDG_CACHE_HOME or ~/.cache, /simple-diffusion)")
    args = p.parse_args(argv)
    try:
        t0 = time.perf_counter()
        ds = Scenes(args.n, args.res, class_cond=True, seed=args.seed)
        print(f"rendered {args.n} scenes at {args.res}x{args.res} in {time.perf_counter() - t0:.2f} s")
        save_grid(ds.images[:64], args.out)
        print(f"wrote {args.out}; shape kinds row by row:")
        for r in range(0, min(64, args.n), 8):
            print("  " + " ".join(f"{KINDS[k]:>8}" for k in ds.kinds[r:r + 8].tolist()))
        if args.score:
            result = shape_score(ds.images, ds.kinds, shape_classifier(args.cache_dir))
            kinds = ", ".join(f"{k} {v:.4f}" for k, v in result["per_kind"].items() if v is not None)
            print(f"shape score of these real scenes: {result['score']:.4f} ({kinds}); chance 1/3")
    except Exception as e:
        return error_exit_code(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
