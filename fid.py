"""
FID and KID: how far generated images are from real ones, in numbers comparable with published ones.

The idea. Run real and generated images through a fixed classifier (inception.py: the 2015 TensorFlow
Inception-v3) and keep its 2048 "pool3" features per image. FID (Heusel et al. 2017) fits a Gaussian to
each set of features and measures how far apart the two Gaussians are. KID (Binkowski et al. 2018)
makes no Gaussian assumption: it is the squared maximum mean discrepancy (MMD) between the two sets under
a cubic polynomial kernel, estimated without bias, so unlike FID its expected value does not depend on N
and small sets can be compared. Both are comparable between papers only if the network, the
preprocessing (inception.py), the number of samples and the numerics match; this file pins the last two.

Equations:
    mu = mean_i f_i,  Sigma = sum_i (f_i - mu)(f_i - mu)^T / (N - 1)           (f_i in R^2048)
    FID = |mu1 - mu2|^2 + tr(Sigma1) + tr(Sigma2) - 2 tr((Sigma1 Sigma2)^(1/2))
          (Frechet / 2-Wasserstein distance between two Gaussians, Dowson & Landau 1982)
    tr((S1 S2)^(1/2)) = sum_k sqrt(lambda_k(A S2 A)),  A = S1^(1/2) symmetric: XY and YX share their
          non-zero eigenvalues, so S1 S2 = A (A S2) has those of A S2 A, which is symmetric PSD.
          One eigh, always real, no complex sqrtm and no "add eps to the diagonal" hack.
    k(x, y) = (x.y / D + 1)^3                                     (KID's kernel, Binkowski et al. Eq. 4)
    MMD^2_u = sum_{i != j} [k(x_i, x_j) + k(y_i, y_j)] / (m (m - 1)) - 2 sum_{i, j} k(x_i, y_j) / m^2
    KID = mean (and std) of MMD^2_u over random subsets of m rows of each set

Symbols: mu_r, mu_g -> mu1, mu2;  Sigma_r, Sigma_g -> sigma1, sigma2;  pool3 features -> features;
         N -> n;  subset size m -> subset_size.  Shape legend: B batch, N images, D = 2048 feature dims.

Choices (the papers leave them to the implementation):
- Mean and covariance in float64, merged batch by batch (memory independent of N). float32 in the
  trace term gives FIDs of -1.3 and -9.8 where the truth is 10.5. KID is computed in float64 too.
- KID: 100 subsets of 1000 images drawn without replacement, the std over subsets as the error (the
  torch-fidelity convention, np.std). Rows are put in a canonical order first, so the subsets, and KID,
  depend only on the two sets of features and the seed, not on the order images or batches came in.
  KID needs the features themselves, not just mu and Sigma: stats files keep them on request.
- Published numbers: 50,000 samples against fixed reference statistics. FID is biased upward at small
  N and Sigma is rank-deficient below 2048 images: compare only at equal N; N is always printed.

Run:  python fid.py DIR_OR_NPZ DIR_OR_NPZ [--kid]  |  python fid.py --save-stats DIR out.npz [--keep-features]
Test: pytest tests/test_fid.py   (random Inception weights; the real file is not needed)
"""
import argparse
import json
import os
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from data import (IMAGE_EXTENSIONS, add_config_flags, config_from_args, error_exit_code, find_images, flag,
                  load_rgb, write_atomic)
from inception import FID_WEIGHTS_NAME, PREPROCESS, FIDError, load_inception, quantize_to_uint8

MIN_FULL_RANK = 2048            # below this many images Sigma is rank-deficient


# ----------------------------------------------------------------------------------------------------
# Statistics: streaming float64 moments, the Frechet distance, .npz files.

class RunningMoments:
    """Mean and unbiased covariance of feature rows, accumulated batch by batch in float64 with Chan et
    al.'s pairwise update: memory is O(D^2) whatever N, and no E[ff^T] - mu mu^T cancellation."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, None, None   # m2 = sum_i (f_i - mean)(f_i - mean)^T

    def update(self, features: torch.Tensor) -> None:
        device = "cpu" if features.device.type == "mps" else features.device  # MPS has no float64
        f = features.detach().to(device=device, dtype=torch.float64)        # (B, D)
        b = f.shape[0]
        if b == 0:
            return
        mean_b = f.mean(0)                                                  # (D,)
        centred = f - mean_b
        m2_b = centred.T @ centred                                          # (D, D) features x dims^T
        if self.n == 0:
            self.n, self.mean, self.m2 = b, mean_b, m2_b
            return
        # Chan et al.: M2 = M2_a + M2_b + delta delta^T n_a n_b / n, delta = mean_b - mean_a. Both parts
        # are sums of squares about their own means, so nothing large cancels (test: offset 1e6).
        n = self.n + b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (b / n)
        self.m2 = self.m2 + m2_b + torch.outer(delta, delta) * (self.n * b / n)
        self.n = n

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise FIDError(f"FID needs at least 2 images for a covariance, got {self.n}")
        return self.mean.cpu().numpy(), (self.m2 / (self.n - 1)).cpu().numpy()


@dataclass
class FIDStats:
    """mu (D,), sigma (D, D), the number of images n, metadata (weights, preprocessing, size), and, when
    asked for, the (N, D) features themselves (what KID needs)."""
    mu: np.ndarray
    sigma: np.ndarray
    n: int | None
    meta: dict = field(default_factory=dict)
    features: np.ndarray | None = None


def _check_stats(mu, sigma, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu, sigma = np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise FIDError(f"{name}: mu must be (D,) and sigma (D, D), got {mu.shape} and {sigma.shape} "
                       f"(covariance of an (N, D) feature matrix is np.cov(f, rowvar=False))")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise FIDError(f"{name}: mu or sigma contains NaN/inf")
    if np.abs(sigma - sigma.T).max() > 1e-6 * max(np.abs(sigma).max(), 1e-300):
        raise FIDError(f"{name}: sigma is not symmetric, so it is not a covariance matrix")
    return mu, (sigma + sigma.T) / 2   # exact symmetry for eigh


def _sqrt_eigenvalues(w: np.ndarray) -> np.ndarray:
    """sqrt of PSD eigenvalues. Those below max * len * eps (numpy's matrix_rank tolerance) are rounding
    noise around an exact 0 and set to 0: sqrt would blow 1e-15 up to 3e-8, which in a rank-deficient
    case (N < 2048 images) costs 1e-6 relative accuracy; clipped, the result is exact to 1e-15."""
    return np.sqrt(np.where(w > w.max(initial=0.0) * len(w) * np.finfo(np.float64).eps, w, 0.0))


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S1 S2)^(1/2)) = sum sqrt(eigvalsh(A S2 A)), A = S1^(1/2) by eigh (module docstring), float64.
    Not eigvalsh(S1 @ S2): that product is not symmetric, and eigvalsh would silently use one triangle."""
    w, v = np.linalg.eigh(np.asarray(sigma1, dtype=np.float64))
    a = (v * _sqrt_eigenvalues(w)) @ v.T                                      # S1^(1/2), symmetric
    m = a @ np.asarray(sigma2, dtype=np.float64) @ a
    return float(_sqrt_eigenvalues(np.linalg.eigvalsh((m + m.T) / 2)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """FID between N(mu1, sigma1) and N(mu2, sigma2), all in float64 whatever the input dtype."""
    mu1, sigma1 = _check_stats(mu1, sigma1, "first statistics")
    mu2, sigma2 = _check_stats(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise FIDError(f"statistics have {mu1.shape[0]} and {mu2.shape[0]} dims; both must come from "
                       f"the same feature layer")
    diff = mu1 - mu2   # float64 throughout: the last two terms are large and nearly cancel
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2))


def save_stats(path, stats: FIDStats) -> None:
    """Write mu, sigma (pytorch-fid / ADM keys), a JSON `meta` string and, if the stats carry them, the
    features as float32 (key `features`, N x 8 KB). Atomic (data.write_atomic): an existing file is
    never left half-written."""
    path = Path(path)
    if path.suffix != ".npz":
        raise FIDError(f"{path}: a stats file must end with .npz")
    arrays = {"mu": stats.mu, "sigma": stats.sigma, "meta": np.array(json.dumps({**stats.meta, "n": stats.n}))}
    if stats.features is not None:
        arrays["features"] = np.asarray(stats.features, dtype=np.float32)
    write_atomic(path, lambda f: np.savez(f, **arrays))   # a file object: savez adds no .npz suffix


def _check_features(features: np.ndarray, mu: np.ndarray, n, name: str) -> None:
    if features.ndim != 2 or features.shape[1] != mu.shape[0] or not np.isfinite(features).all():
        raise FIDError(f"{name}: 'features' must be a finite (N, {mu.shape[0]}) array, got {features.shape}")
    if n is not None and features.shape[0] != n:
        raise FIDError(f"{name}: {features.shape[0]} feature rows, but the statistics are of N = {n} images")


def load_stats(path) -> FIDStats:
    """Read a stats .npz: ours (features included if it was saved with them), pytorch-fid's, or an
    ADM-style reference batch (keys mu, sigma)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            found = list(f.files)
            mu, sigma, features = (f[k] if k in found else None for k in ("mu", "sigma", "features"))
            meta = json.loads(str(f["meta"])) if "meta" in found else {}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise FIDError(f"{path}: cannot read stats file ({type(e).__name__}: {e})") from e
    if mu is None or sigma is None:
        raise FIDError(f"{path}: no 'mu'/'sigma' arrays (found {found}); expected FID statistics")
    mu, sigma = _check_stats(mu, sigma, str(path))
    n = meta.pop("n", None)
    if features is not None:
        _check_features(features, mu, n, str(path))
    return FIDStats(mu, sigma, n, meta, features)


def meta_mismatches(meta1: dict, meta2: dict) -> list[str]:
    """Metadata fields that differ between two stats (only fields both sides recorded)."""
    keys = ("dims", "weights", "preprocess", "resolution")
    return [f"{k}: {meta1[k]!r} vs {meta2[k]!r}" for k in keys
            if k in meta1 and k in meta2 and meta1[k] != meta2[k]]


def warn_if_small(n, name: str) -> None:
    if n is not None and n < MIN_FULL_RANK:
        warnings.warn(f"{name}: N = {n} < {MIN_FULL_RANK} images: the covariance is rank-deficient and FID "
                      f"is biased upward; not comparable with published FID-50k numbers")


# ----------------------------------------------------------------------------------------------------
# KID: the unbiased MMD^2 with a cubic kernel, over random subsets.

def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x.y / D + 1)^3 for all row pairs: (m, D), (m', D) -> (m, m')."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD^2 estimator of two equal-size samples (m, D): within-set sums skip i = j."""
    m = x.shape[0]
    k_xx, k_yy = polynomial_kernel(x, x), polynomial_kernel(y, y)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * polynomial_kernel(x, y).mean())


def _canonical_rows(features) -> np.ndarray:
    """(N, D) float64 rows sorted lexicographically by their big-endian bytes (for the non-negative pool3
    features that is numeric order, column 0 first): the same set of rows in any order gives one array."""
    f = (features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features))
    f = np.ascontiguousarray(f, dtype=np.float64)
    if f.ndim != 2 or not np.isfinite(f).all():
        raise FIDError(f"KID needs finite (N, D) feature matrices, got shape {f.shape}")
    keys = np.ascontiguousarray(f.astype(">f8")).view(np.dtype((np.void, 8 * f.shape[1])))[:, 0]  # (N,)
    return f[np.argsort(keys, kind="stable")]


def kernel_inception_distance(features1, features2, subset_size: int = 1000, num_subsets: int = 100,
                              seed: int = 0) -> tuple[float, float]:
    """KID (mean, std) between two (N, D) feature sets (numpy or torch), in float64: MMD^2_u of
    `num_subsets` pairs of subsets, each `subset_size` rows of each set drawn without replacement by
    numpy's Generator(seed). A subset_size above min(N1, N2) warns and uses min(N1, N2). With
    subset_size = N1 = N2 and num_subsets = 1 this is the full-set estimator. Deterministic for a seed,
    and independent of the row order (rows are sorted first, see _canonical_rows)."""
    f1, f2 = _canonical_rows(features1), _canonical_rows(features2)
    if f1.shape[1] != f2.shape[1]:
        raise FIDError(f"KID: features have {f1.shape[1]} and {f2.shape[1]} dims; both must come from one layer")
    m = min(len(f1), len(f2))
    if m < 2 or subset_size < 2 or num_subsets < 1:
        raise FIDError(f"KID needs >= 2 images per set, subset_size >= 2 and num_subsets >= 1; got N = "
                       f"{len(f1)} and {len(f2)}, subset_size {subset_size}, num_subsets {num_subsets}")
    if subset_size > m:
        warnings.warn(f"KID subset size {subset_size} > {m} images (the smaller set): using {m}")
    m = min(m, subset_size)
    rng = np.random.default_rng(seed)
    mmds = [mmd2_unbiased(f1[rng.choice(len(f1), m, replace=False)], f2[rng.choice(len(f2), m, replace=False)])
            for _ in range(num_subsets)]
    return float(np.mean(mmds)), float(np.std(mmds))


# ----------------------------------------------------------------------------------------------------
# Features: image folders and tensors from code share one uint8 path.

class _ImageFiles(torch.utils.data.Dataset):
    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        image = np.array(load_rgb(self.paths[i]), dtype=np.uint8)             # (H, W, 3), data.py rules
        return torch.from_numpy(image).permute(2, 0, 1), i                    # (3, H, W)


def _keep_list(batch):
    return batch   # images may differ in size; _forward groups them (module level: picklable)


def _forward(model: nn.Module, images, device) -> torch.Tensor:
    """Features (B, D) for a uint8 batch tensor or a list of (3, H, W) uint8 tensors of mixed sizes:
    each size group is resized on its own, so results equal one image at a time."""
    if isinstance(images, torch.Tensor):
        return model(images.to(device)).float()
    out = [None] * len(images)
    groups: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(tuple(im.shape), []).append(i)
    for idx in groups.values():
        feats = model(torch.stack([images[i] for i in idx]).to(device)).float()  # (b, D)
        for j, i in enumerate(idx):
            out[i] = feats[j]
    return torch.stack(out)                                                  # (B, D)


def _accumulate(batches, model, device, total=None, progress=True, keep_features=False):
    """Run batches of (uint8 images, names) through the model, refusing non-finite features.
    Returns the moments, the image sizes seen and, with keep_features, the (N, D) float32 features."""
    moments, sizes, kept = RunningMoments(), set(), []
    device = torch.device(device)
    with torch.inference_mode():
        for images, names in tqdm(batches, total=total, disable=not progress, desc="FID features", unit="batch"):
            sizes.update(f"{im.shape[-1]}x{im.shape[-2]}" for im in images)
            feats = _forward(model, images, device)                                # (B, D)
            bad = ~torch.isfinite(feats).all(dim=1)
            if bad.any():
                listed = [str(names[i]) for i in bad.nonzero().flatten().tolist()]
                raise FIDError(f"non-finite Inception features for {len(listed)} image(s): {', '.join(listed[:5])}"
                               f"{' ...' if len(listed) > 5 else ''} (corrupt weights or images?)")
            moments.update(feats)
            if keep_features:
                kept.append(feats.cpu().numpy())
    return moments, sizes, (np.concatenate(kept) if keep_features else None)


def _stats(moments: RunningMoments, sizes: set, model, source: str, features) -> FIDStats:
    mu, sigma = moments.mean_cov()
    meta = {"dims": int(mu.shape[0]), "weights": getattr(model, "weights_id", "unknown"), "preprocess": PREPROCESS,
            "resolution": sizes.pop() if len(sizes) == 1 else f"mixed ({len(sizes)} sizes)", "source": source}
    return FIDStats(mu, sigma, moments.n, meta, features)


def compute_stats_from_folder(root, model, batch_size=50, device="cpu", num_workers=0,
                              progress=True, keep_features=False) -> FIDStats:
    """Statistics of every image below `root` (recursive; data.py's loader rules), in sorted path order.
    keep_features: also fill FIDStats.features (N x 8 KB of memory), for KID."""
    paths = find_images(root)
    if len(paths) < 2:
        raise FIDError(f"{root}: FID needs at least 2 images, found {len(paths)}")
    # Decoding runs in worker processes; images stay uint8 until the model's device (4x less to move),
    # and batches stay lists because a folder may mix sizes (each is resized to 299 on its own).
    loader = torch.utils.data.DataLoader(_ImageFiles(paths), batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=_keep_list)
    batches = (([im for im, _ in b], [paths[i] for _, i in b]) for b in loader)
    moments, sizes, features = _accumulate(batches, model, device, len(loader), progress, keep_features)
    return _stats(moments, sizes, model, str(root), features)


def compute_stats_from_tensors(images, model, device=None, batch_size=50, progress=False,
                               keep_features=False) -> FIDStats:
    """Statistics of generated images: an iterable of (B, 3, H, W) tensors in [-1, 1] (or uint8), or one
    big tensor split into batches. Each batch is quantised as its PNG would be, then goes the folder
    path. For train.py / sample.py; the model comes from inception.load_inception."""
    if device is None:   # the model's device
        device = next(model.parameters(), torch.empty(0)).device
    if isinstance(images, torch.Tensor):
        images = images.split(batch_size)

    def batches():
        seen = 0
        for x in images:
            yield quantize_to_uint8(x), [f"generated image {seen + i}" for i in range(x.shape[0])]
            seen += x.shape[0]
    moments, sizes, features = _accumulate(batches(), model, device, None, progress, keep_features)
    return _stats(moments, sizes, model, "tensors", features)


# ----------------------------------------------------------------------------------------------------
# CLI

@dataclass
class FIDConfig:
    batch_size: int = flag(50, "images per Inception forward")
    device: str = flag("auto", "cpu, cuda, cuda:1, ... (auto: cuda if available)")
    num_workers: int = flag(min(4, os.cpu_count() or 1), "data-loading processes for image folders "
                                                           "(4, or the number of CPU cores if fewer)")
    weights: str = flag("", f"Inception weights file; empty: torch.hub's cache, downloading "
                            f"{FID_WEIGHTS_NAME} there once (offline: the path of a copy)")
    save_stats: bool = flag(False, "write the statistics of PATH1 (a folder) to PATH2 (.npz) instead of "
                                   "computing FID")
    keep_features: bool = flag(False, "with --save-stats: also store the features, so that KID can be "
                                      "computed from the file (float32, 8 KB per image)")
    kid: bool = flag(False, "also print KID (needs features: a folder, or a stats file saved with "
                            "--keep-features)")
    kid_subset_size: int = flag(1000, "images per KID subset (capped at the smaller set, with a warning)")
    kid_subsets: int = flag(100, "number of KID subsets")


def parse_args(argv=None) -> tuple[list[str], FIDConfig]:
    p = argparse.ArgumentParser(description="Frechet Inception Distance (and KID) between two folders of "
                                            "images or .npz statistics files (pytorch-fid compatible).")
    p.add_argument("paths", nargs=2, metavar="PATH", help="folder of images or .npz stats")
    add_config_flags(p, FIDConfig)
    args = vars(p.parse_args(argv))
    return args.pop("paths"), config_from_args(FIDConfig, args)


def _device(cfg: FIDConfig) -> torch.device:
    name = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise FIDError(f"--device {cfg.device}: {e}") from e
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise FIDError(f"--device {cfg.device}: {torch.cuda.device_count()} CUDA device(s) here; use --device cpu")
    return device


def _check_flags(paths: list[str], cfg: FIDConfig) -> None:
    if cfg.batch_size < 1 or cfg.num_workers < 0:
        raise FIDError(f"--batch-size must be >= 1 and --num-workers >= 0, "
                       f"got {cfg.batch_size} and {cfg.num_workers}")
    if cfg.save_stats and not (Path(paths[0]).is_dir() and paths[1].endswith(".npz")):
        raise FIDError(f"--save-stats needs a folder of images and an output .npz, got {paths[0]} {paths[1]}")
    if cfg.keep_features and not cfg.save_stats:
        raise FIDError("--keep-features only applies to --save-stats (a folder's features are read anyway)")
    if cfg.kid and cfg.save_stats:
        raise FIDError("--kid compares two sets; with --save-stats use --keep-features, then --kid on the file")
    if cfg.kid and (cfg.kid_subset_size < 2 or cfg.kid_subsets < 1):
        raise FIDError(f"--kid-subset-size must be >= 2 and --kid-subsets >= 1, "
                       f"got {cfg.kid_subset_size} and {cfg.kid_subsets}")


def _load_or_check(path: str, need_features: bool) -> FIDStats | None:
    """A stats file's contents, or None for a usable image folder; anything else fails here, before any
    compute: missing paths, empty folders, unreadable stats files, a stats file without KID's features."""
    if Path(path).is_file() and path.endswith(".npz"):
        stats = load_stats(path)
        if need_features and stats.features is None:
            raise FIDError(f"{path}: no features stored, and KID needs them; re-create the file with "
                           f"--save-stats --keep-features, or pass the image folder")
        return stats
    if not Path(path).is_dir():
        raise FIDError(f"{path}: not a folder of images ({', '.join(IMAGE_EXTENSIONS)}) or a .npz stats file")
    if len(find_images(path)) < 2:
        raise FIDError(f"{path}: FID needs at least 2 images, found 1")
    return None


def _report(paths: list[str], s1: FIDStats, s2: FIDStats, cfg: FIDConfig) -> dict:
    for problem in meta_mismatches(s1.meta, s2.meta):
        warnings.warn(f"the two statistics were computed differently ({problem}): FID may be meaningless")
    results = {"fid": frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma)}
    print(f"FID: {round(results['fid'], 6) + 0.0:.6g}")   # 6 digits; rounding noise of identical sets prints 0
    if cfg.kid:
        results["kid"] = kernel_inception_distance(s1.features, s2.features, cfg.kid_subset_size, cfg.kid_subsets)
        print(f"KID: {results['kid'][0]:.6g} +- {results['kid'][1]:.6g}")
    for s, p in ((s1, paths[0]), (s2, paths[1])):
        print(f"N = {s.n if s.n is not None else 'unknown (stats file without metadata)'}: {p}")
    return results


def run(paths: list[str], cfg: FIDConfig) -> dict | None:
    """The CLI's work: validate everything cheap first, then load the network only if a folder needs it.
    Returns {"fid": ..., "kid": (mean, std)} (KID with --kid), or None after --save-stats."""
    _check_flags(paths, cfg)
    device = _device(cfg)
    sources = paths[:1] if cfg.save_stats else paths
    stats = {p: _load_or_check(p, cfg.kid) for p in sources}
    folders = [p for p in sources if stats[p] is None]
    model = load_inception(cfg.weights or None, device) if folders else None
    for p in folders:
        stats[p] = compute_stats_from_folder(p, model, cfg.batch_size, device, cfg.num_workers,
                                             keep_features=cfg.kid or cfg.keep_features)
    for p in sources:
        warn_if_small(stats[p].n, p)
    if cfg.save_stats:
        save_stats(paths[1], stats[paths[0]])
        kept = " and their features" if cfg.keep_features else ""
        print(f"saved statistics{kept} of N = {stats[paths[0]].n} images from {paths[0]} to {paths[1]}")
        return None
    return _report(paths, stats[paths[0]], stats[paths[1]], cfg)


def main(argv=None) -> int:
    paths, cfg = parse_args(argv)
    torch.backends.cudnn.allow_tf32 = False   # TF32 convolutions (Ampere+) would shift features ~1e-3
    formatwarning, warnings.formatwarning = warnings.formatwarning, lambda msg, *a, **k: f"warning: {msg}\n"
    try:
        run(paths, cfg)
    except (ValueError, OSError, RuntimeError) as e:   # bad input -> 2; disk, download, device -> 1
        return error_exit_code(e)
    finally:
        warnings.formatwarning = formatwarning
    return 0


if __name__ == "__main__":
    sys.exit(main())
