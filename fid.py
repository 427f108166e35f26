"""
FID: the Frechet Inception Distance, computed so that it is comparable with published numbers.

The idea. Run real and generated images through a fixed classifier (the 2015 TensorFlow Inception-v3),
keep the 2048 numbers before its head ("pool3"), fit a Gaussian to each set of feature vectors and
measure how far apart the two Gaussians are (Heusel et al. 2017). FID is comparable between papers only
if everything matches: the network weights, the preprocessing, the number of samples and the precision
of the trace term. This file pins all four. (The paper's ImageNet numbers are FID-50k.)

Equations:
    mu = mean_i f_i,  Sigma = sum_i (f_i - mu)(f_i - mu)^T / (N - 1)           (f_i in R^2048)
    FID = |mu1 - mu2|^2 + tr(Sigma1) + tr(Sigma2) - 2 tr((Sigma1 Sigma2)^(1/2))
          (Frechet / 2-Wasserstein distance between two Gaussians, Dowson & Landau 1982)
    tr((S1 S2)^(1/2)) = sum_k sqrt(lambda_k(A S2 A)),  A = S1^(1/2) symmetric: XY and YX share their
          non-zero eigenvalues, so S1 S2 = A (A S2) has those of A S2 A, which is symmetric PSD.
          One eigh, always real, no complex sqrtm and no "add eps to the diagonal" hack.

Symbols: mu_r, mu_g -> mu1, mu2;  Sigma_r, Sigma_g -> sigma1, sigma2;  pool3 features -> features;
         N -> n.  Shape legend: B batch, H W spatial, D = 2048 feature dims.

Choices (the FID paper leaves them to the implementation):
- Network: the FID variant of Inception-v3 whose weights pytorch-fid ported from the TF graph
  (pt_inception-2015-12-05-6726825d.pth), written here from its architecture: torchvision layout,
  1008 classes, TF-style average pools and one max pool (see _avg_pool_tf and _MixedE).
- Preprocessing as pytorch-fid: uint8 RGB -> [0, 1] -> bilinear 299x299 (align_corners=False, no
  antialias) -> 2x - 1. The TF original samples input coordinate i * in/out, not (i + 0.5) * in/out - 0.5
  (a shift of ~0.45 input pixels when up-sampling 32 -> 299), and normalises (x - 128) / 128; the two
  pipelines' FIDs differ by about 1e-3 relative. Quote pytorch-fid-style numbers as such.
- Generated images are quantised as their PNG would be: u8 = round(clamp((x + 1) * 127.5, 0, 255))
  (torch.round), then the same path as files, so tensors and their saved PNGs give one FID.
- Mean and covariance in float64, merged batch by batch (memory independent of N). float32 in the
  trace term gives FIDs of -1.3 and -9.8 where the truth is 10.5.
- Published numbers: 50,000 samples against fixed reference statistics. FID is biased upward at small
  N and Sigma is rank-deficient below 2048 images: compare only at equal N; N is always printed.

Run:  python fid.py DIR_OR_NPZ DIR_OR_NPZ  |  python fid.py --save-stats DIR out.npz
Test: pytest tests/test_fid.py   (random Inception weights; the real file is not needed)
"""
import argparse
import hashlib
import json
import os
import sys
import warnings
import zipfile
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data import IMAGE_EXTENSIONS, DataError, find_images, load_rgb, quantize

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_NAME}"
FID_WEIGHTS_HASH = "6726825d"   # prefix of the file's sha256, the torch.hub convention
DIMS = 2048
INPUT_SIZE = 299
PREPROCESS = "uint8 -> [0,1] -> bilinear 299x299 (align_corners=False, no antialias) -> 2x-1 (pytorch-fid)"
MIN_FULL_RANK = DIMS            # below this many images Sigma is rank-deficient


class FIDError(ValueError):
    """A bad input to FID (weights, stats file, images, flags), reported as one readable line."""


# ----------------------------------------------------------------------------------------------------
# Inception-v3, FID variant. Names and shapes follow the weights file key by key (strict loading).

class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm(eps=1e-3, the TF value) -> ReLU: every layer of Inception-v3."""

    def __init__(self, c_in: int, c_out: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x):
    """TF's 3x3 average pool averages over the pixels inside the image only (FID change 1-3)."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _MixedA(nn.Module):
    """Mixed_5b/5c/5d (35x35): 1x1 | 1x1->5x5 | 1x1->3x3->3x3 | pool->1x1."""

    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, 1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([self.branch1x1(x), b5, b3, bp], 1)  # (B, 224 + pool_features, 35, 35)


class _MixedB(nn.Module):
    """Mixed_6a: 35x35 -> 17x17 by stride-2 convs beside a stride-2 max pool."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)  # (B, 768, 17, 17)


class _MixedC(nn.Module):
    """Mixed_6b..6e (17x17): 7x7 convolutions factorised into 1x7 and 7x1."""

    def __init__(self, c_in: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([self.branch1x1(x), b7, bd, bp], 1)  # (B, 768, 17, 17)


class _MixedD(nn.Module):
    """Mixed_7a: 17x17 -> 8x8."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)  # (B, 1280, 8, 8)


class _MixedE(nn.Module):
    """Mixed_7b/7c (8x8): 3x3 convolutions split into parallel 1x3 and 3x1. In the FID graph, 7b's pool
    branch is TF's average pool and 7c's is a 3x3 *max* pool (FID change 4; the 2015 graph has it)."""

    def __init__(self, c_in: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)          # (B, 768, 8, 8)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)    # (B, 768, 8, 8)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool_tf(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)  # (B, 2048, 8, 8)


class InceptionV3(nn.Module):
    """The FID Inception: uint8 images (B, 3, H, W) of any size -> pool3 features (B, 2048) float32.
    `fc` (1008 classes) only exists so the weights file loads strictly; FID never uses it."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = _MixedA(192, pool_features=32)
        self.Mixed_5c = _MixedA(256, pool_features=64)
        self.Mixed_5d = _MixedA(288, pool_features=64)
        self.Mixed_6a = _MixedB(288)
        self.Mixed_6b = _MixedC(768, c7=128)
        self.Mixed_6c = _MixedC(768, c7=160)
        self.Mixed_6d = _MixedC(768, c7=160)
        self.Mixed_6e = _MixedC(768, c7=192)
        self.Mixed_7a = _MixedD(768)
        self.Mixed_7b = _MixedE(1280, max_pool=False)
        self.Mixed_7c = _MixedE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)
        self.weights_id = "random-init"   # sha256 prefix of the loaded file; goes into stats metadata

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = preprocess(images)                                      # (B, 3, 299, 299) in [-1, 1]
        x = self.Conv2d_1a_3x3(x)                                   # (B, 32, 149, 149)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(x))               # (B, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)                            # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))               # (B, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)                            # (B, 192, 35, 35)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, "Mixed_" + name)(x)                   # ... -> (B, 2048, 8, 8)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)               # (B, 2048) pool3


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """pytorch-fid's input convention, from uint8 RGB (B, 3, H, W) to (B, 3, 299, 299) in [-1, 1]."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise FIDError(f"Inception input must be uint8 RGB (B, 3, H, W), got {images.dtype} "
                       f"{tuple(images.shape)}; quantise [-1, 1] images with quantize_to_uint8 first")
    x = images.float() / 255.0
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False,
                          antialias=False)                          # (B, 3, 299, 299)
    return 2.0 * x - 1.0


def quantize_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (B, 3, H, W) -> uint8, exactly what a PNG of them holds:
    round(clamp((x + 1) * 127.5, 0, 255)) (torch.round; the only exact tie in range is x = 0 -> 128 under
    either tie rule). Out-of-range values are clipped, as saving would clip them; NaN/inf cannot be
    saved, so they are an error."""
    if x.dtype == torch.uint8 or x.dim() != 4:
        return x   # already quantised, or a wrong shape that preprocess() reports
    bad = ~torch.isfinite(x).flatten(1).all(1)                              # (B,)
    if bad.any():
        raise FIDError(f"generated images contain NaN/inf (batch indices {bad.nonzero().flatten().tolist()[:10]})")
    return quantize(x)


# ----------------------------------------------------------------------------------------------------
# Weights: an explicit file, or torch.hub's cache, or a download with torch.hub's hash check.

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _why(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def _weights_help(path) -> str:
    return (f"expected {FID_WEIGHTS_NAME} (sha256 {FID_WEIGHTS_HASH}...) at {path}; "
            f"download it from {FID_WEIGHTS_URL} and pass --weights PATH")


def cached_weights_path() -> Path:
    """Where torch.hub keeps the standard file: $TORCH_HOME/hub/checkpoints/ (default ~/.cache/torch)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_NAME


def find_weights(weights=None) -> Path | None:
    """The weights file if it is already on disk; never downloads. train.py can use it to switch
    in-training FID on only when the weights are available."""
    path = Path(weights) if weights else cached_weights_path()
    return path if path.is_file() else None


def load_inception(weights=None, device="cpu", download: bool = True) -> InceptionV3:
    """The FID Inception, eval mode, frozen. `weights`: a path; None: torch.hub's cache, downloaded
    once from FID_WEIGHTS_URL with the hash check if missing. Failures: FIDError with file, URL, hash."""
    path = Path(weights) if weights else cached_weights_path()
    if weights and not path.is_file():
        raise FIDError(f"--weights {path}: no such file; {_weights_help(path)}")
    if not path.is_file():
        if not download:
            raise FIDError(f"Inception weights not found; {_weights_help(path)}")
        try:  # torch.hub writes a temp file, checks the sha256 prefix, then renames: no partial files
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(FID_WEIGHTS_URL, str(path), hash_prefix=FID_WEIGHTS_HASH)
        except Exception as e:
            raise FIDError(f"cannot download the Inception weights ({_why(e)}); {_weights_help(path)}") from e
    digest = _sha256(path)
    if not digest.startswith(FID_WEIGHTS_HASH):
        if not weights:  # the cache must hold the real file; a truncated copy is the usual cause
            raise FIDError(f"{path}: corrupt (sha256 {digest[:8]}...); delete it to re-download, or "
                           f"{_weights_help(path)}")
        # An explicit file may be a re-saved copy (or random test weights): usable, but say so.
        warnings.warn(f"{path}: sha256 {digest[:8]}..., not {FID_WEIGHTS_HASH}...: not the standard FID "
                      f"weights, so values are not comparable with published FIDs")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise TypeError(f"holds a {type(state).__name__}, not a state dict")
    except Exception as e:
        raise FIDError(f"{path}: cannot read weights ({_why(e)}); {_weights_help(path)}") from e
    model = InceptionV3()
    own = model.state_dict()
    for key in own:  # the published file may lack BatchNorm's step counter (unused in eval): take ours
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = own[key]
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    wrong = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise FIDError(f"{path}: not the FID Inception state dict (missing {missing[:3]}, unexpected "
                       f"{unexpected[:3]}, wrong shape {wrong[:3]}); {_weights_help(path)}")
    model.load_state_dict(state, strict=True)
    model.weights_id = digest[:8]
    return model.eval().requires_grad_(False).to(device)


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
    """mu (D,), sigma (D, D), the number of images n, and metadata (weights, preprocessing, size)."""
    mu: np.ndarray
    sigma: np.ndarray
    n: int | None
    meta: dict = field(default_factory=dict)


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
    """Write mu, sigma (pytorch-fid / ADM keys) and a JSON `meta` string; temp file + os.replace, so an
    existing file is never left half-written."""
    path = Path(path)
    if path.suffix != ".npz":
        raise FIDError(f"{path}: a stats file must end with .npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:   # a file object: np.savez would append .npz to a temp name
            np.savez(f, mu=stats.mu, sigma=stats.sigma, meta=np.array(json.dumps({**stats.meta, "n": stats.n})))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_stats(path) -> FIDStats:
    """Read a stats .npz: ours, pytorch-fid's, or an ADM-style reference batch (keys mu, sigma)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            found = list(f.files)
            mu, sigma = (f[k] if k in found else None for k in ("mu", "sigma"))
            meta = json.loads(str(f["meta"])) if "meta" in found else {}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise FIDError(f"{path}: cannot read stats file ({_why(e)})") from e
    if mu is None or sigma is None:
        raise FIDError(f"{path}: no 'mu'/'sigma' arrays (found {found}); expected FID statistics")
    mu, sigma = _check_stats(mu, sigma, str(path))
    return FIDStats(mu, sigma, meta.pop("n", None), meta)


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


def _accumulate(batches, model, device, total=None, progress=True) -> tuple[RunningMoments, set]:
    """Run batches of (uint8 images, names) through the model, refusing non-finite features."""
    moments, sizes = RunningMoments(), set()
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
    return moments, sizes


def _stats(moments: RunningMoments, sizes: set, model, source: str) -> FIDStats:
    mu, sigma = moments.mean_cov()
    meta = {"dims": int(mu.shape[0]), "weights": getattr(model, "weights_id", "unknown"), "preprocess": PREPROCESS,
            "resolution": sizes.pop() if len(sizes) == 1 else f"mixed ({len(sizes)} sizes)", "source": source}
    return FIDStats(mu, sigma, moments.n, meta)


def compute_stats_from_folder(root, model, batch_size=50, device="cpu", num_workers=0,
                              progress=True) -> FIDStats:
    """Statistics of every image below `root` (recursive; data.py's loader rules)."""
    paths = find_images(root)
    if len(paths) < 2:
        raise FIDError(f"{root}: FID needs at least 2 images, found {len(paths)}")
    # Decoding runs in worker processes; images stay uint8 until the model's device (4x less to move),
    # and batches stay lists because a folder may mix sizes (each is resized to 299 on its own).
    loader = torch.utils.data.DataLoader(_ImageFiles(paths), batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=_keep_list)
    batches = (([im for im, _ in b], [paths[i] for _, i in b]) for b in loader)
    moments, sizes = _accumulate(batches, model, device, len(loader), progress)
    return _stats(moments, sizes, model, str(root))


def compute_stats_from_tensors(images, model, device=None, batch_size=50, progress=False) -> FIDStats:
    """Statistics of generated images: an iterable of (B, 3, H, W) tensors in [-1, 1] (or uint8), or one
    big tensor split into batches. Each batch is quantised as its PNG would be, then goes the folder
    path. For train.py / sample.py; the model comes from load_inception."""
    if device is None:   # the model's device
        device = next(model.parameters(), torch.empty(0)).device
    if isinstance(images, torch.Tensor):
        images = images.split(batch_size)

    def batches():
        seen = 0
        for x in images:
            yield quantize_to_uint8(x), [f"generated image {seen + i}" for i in range(x.shape[0])]
            seen += x.shape[0]
    moments, sizes = _accumulate(batches(), model, device, progress=progress)
    return _stats(moments, sizes, model, "tensors")


# ----------------------------------------------------------------------------------------------------
# CLI

@dataclass
class FIDConfig:
    batch_size: int = field(default=50, metadata={"help": "images per Inception forward"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:1, ... (auto: cuda if available)"})
    num_workers: int = field(default=4, metadata={"help": "data-loading processes for image folders"})
    weights: str = field(default="", metadata={"help": f"Inception weights file (default: torch.hub cache, "
                                                       f"downloading {FID_WEIGHTS_NAME} once)"})
    save_stats: bool = field(default=False, metadata={"help": "write the statistics of PATH1 (a folder) "
                                                              "to PATH2 (.npz) instead of computing FID"})


def parse_args(argv=None) -> tuple[list[str], FIDConfig]:
    p = argparse.ArgumentParser(description="Frechet Inception Distance between two folders of images or "
                                            ".npz statistics files (pytorch-fid compatible).")
    p.add_argument("paths", nargs=2, metavar="PATH", help="folder of images or .npz stats")
    for f in fields(FIDConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            p.add_argument(flag, action="store_true", help=f.metadata["help"])
        else:
            p.add_argument(flag, type=type(f.default), default=f.default, help=f.metadata["help"])
    args = vars(p.parse_args(argv))
    return args.pop("paths"), FIDConfig(**args)


def _one_line(e: Exception) -> str:
    """The message of an error; DataLoader workers wrap it in a traceback whose last line it is."""
    lines = str(e).strip().splitlines() or [type(e).__name__]
    last = lines[-1]
    return last.split("Error: ", 1)[1] if len(lines) > 1 and "Error: " in last else lines[0]


def run(paths: list[str], cfg: FIDConfig) -> float | None:
    """The CLI's work: validate everything cheap first, then load the network only if a folder needs it."""
    if cfg.batch_size < 1 or cfg.num_workers < 0:
        raise FIDError(f"--batch-size must be >= 1 and --num-workers >= 0, "
                       f"got {cfg.batch_size} and {cfg.num_workers}")
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise FIDError(f"--device {cfg.device}: {_why(e)}") from e
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise FIDError(f"--device {cfg.device}: {torch.cuda.device_count()} CUDA device(s) here; use --device cpu")
    if cfg.save_stats and not (Path(paths[0]).is_dir() and paths[1].endswith(".npz")):
        raise FIDError(f"--save-stats needs a folder of images and an output .npz, got {paths[0]} {paths[1]}")
    sources = paths[:1] if cfg.save_stats else paths
    stats = {}
    for p in sources:   # fail before any compute: missing paths, empty folders, unreadable stats files
        if Path(p).is_file() and p.endswith(".npz"):
            stats[p] = load_stats(p)
        elif not Path(p).is_dir():
            raise FIDError(f"{p}: not a folder of images ({', '.join(IMAGE_EXTENSIONS)}) or a .npz stats file")
        elif len(find_images(p)) < 2:
            raise FIDError(f"{p}: FID needs at least 2 images, found 1")
    model = load_inception(cfg.weights or None, device) if len(stats) < len(sources) else None
    for p in sources:
        if p not in stats:
            stats[p] = compute_stats_from_folder(p, model, cfg.batch_size, device, cfg.num_workers)
        warn_if_small(stats[p].n, p)
    if cfg.save_stats:
        save_stats(paths[1], stats[paths[0]])
        print(f"saved statistics of N = {stats[paths[0]].n} images from {paths[0]} to {paths[1]}")
        return None
    (s1, s2) = stats[paths[0]], stats[paths[1]]
    for problem in meta_mismatches(s1.meta, s2.meta):
        warnings.warn(f"the two statistics were computed differently ({problem}): FID may be meaningless")
    fid = frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma)
    print(f"FID: {round(fid, 6) + 0.0:.6g}")   # 6 digits; rounding noise of identical sets prints 0
    for s, p in ((s1, paths[0]), (s2, paths[1])):
        print(f"N = {s.n if s.n is not None else 'unknown (stats file without metadata)'}: {p}")
    return fid


def main(argv=None) -> int:
    paths, cfg = parse_args(argv)
    torch.backends.cudnn.allow_tf32 = False   # TF32 convolutions (Ampere+) would shift features ~1e-3
    formatwarning, warnings.formatwarning = warnings.formatwarning, lambda msg, *a, **k: f"warning: {msg}\n"
    try:
        run(paths, cfg)
    except (FIDError, DataError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = formatwarning
    return 0


if __name__ == "__main__":
    sys.exit(main())
