"""
The FID Inception: the 2015 TensorFlow Inception-v3 graph whose "pool3" features FID and KID compare.

The idea. FID does not compare pixels; it compares what a fixed ImageNet classifier sees. Each image goes
through Inception-v3 up to the global average pool after its last block, Mixed_7c: one number per channel
of the final 8x8 map, 2048 per image, the layer the TF graph names "pool_3". The classifier head after it
is never used. Numbers are comparable between papers only with *this* network -- the graph Heusel et al.
released in 2015, not torchvision's retrained Inception-v3 -- fed the same way.

Equations:
    x = 2 bilinear_299(u8 / 255) - 1                          preprocessing, (B, 3, 299, 299) in [-1, 1]
    BasicConv2d(x) = relu((conv(x) - m) / sqrt(v + 0.001) g + b)       all 94 layers (TF's eps)
    f = mean_{h, w} Mixed_7c(... Mixed_5b(stem(x)))           pool3 features, (B, 2048)
    avgpool_tf(x)_p = sum_{q in 3x3 window of p, inside the image} x_q / #{such q}

Symbols: pool3 f -> features;  g, b, m, v -> bn.weight, bn.bias, bn.running_mean, bn.running_var;
         u8 -> images.  Shape legend: B batch, C channels, H W spatial, D = 2048 features.

The layout and names are torchvision's, so the published weights load key by key (strictly). Four
changes make it the FID graph (plus 1008 classes in the unused `fc`):
  1-3. Mixed_5b-5d, Mixed_6b-6e, Mixed_7b: the pool branch's 3x3 average pool divides by the number of
       pixels inside the image (count_include_pad=False), as TF's "SAME" pooling does;
  4.   Mixed_7c: that branch is a 3x3 *max* pool (so in the 2015 graph; kept for comparability).
Preprocessing is pytorch-fid's: uint8 RGB -> [0, 1] -> bilinear 299x299 (align_corners=False, no
antialias) -> 2x - 1. The TF original samples input coordinate i in/out, not (i + 0.5) in/out - 0.5,
and normalises (x - 128) / 128; FIDs of the two pipelines differ by about 1e-3 relative. Images in
[-1, 1] are first quantised exactly as their PNG would be (data.quantize): tensors and files agree.

Weights: pytorch-fid's port of the TF graph, pt_inception-2015-12-05-6726825d.pth (95 MB, 23.9 M
parameters). load_inception takes an explicit path; else torch.hub's cache ($TORCH_HOME/hub/checkpoints);
else it downloads the file there once, checking torch.hub's sha256 prefix. Offline, copy the file to the
machine and pass its path. A file with another hash (a re-saved or converted copy) loads with a warning
that the numbers are not comparable with published ones.

Run:  python inception.py [--weights PATH]   block output shapes, parameters, which weights load
Test: pytest tests/test_inception.py          (FID_WEIGHTS=PATH adds the known-answer test)
"""
import argparse
import hashlib
import sys
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import error_exit_code, quantize

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_NAME}"
FID_WEIGHTS_HASH = "6726825d"   # prefix of the file's sha256, the torch.hub convention
DIMS = 2048
INPUT_SIZE = 299
PREPROCESS = "uint8 -> [0,1] -> bilinear 299x299 (align_corners=False, no antialias) -> 2x-1 (pytorch-fid)"


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
    once from FID_WEIGHTS_URL with the hash check if missing. Bad files: FIDError; a failed download:
    RuntimeError; both name the file, URL and hash."""
    path = Path(weights) if weights else cached_weights_path()
    if weights and not path.is_file():
        raise FIDError(f"--weights {path}: no such file; {_weights_help(path)}")
    if not path.is_file():
        if not download:
            raise FIDError(f"Inception weights not found; {_weights_help(path)}")
        try:  # torch.hub writes a temp file, checks the sha256 prefix, then renames: no partial files
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(FID_WEIGHTS_URL, str(path), hash_prefix=FID_WEIGHTS_HASH)
        except Exception as e:  # the network failed, not the user's input: exit code 1, not 2
            raise RuntimeError(f"cannot download the Inception weights ({_why(e)}); {_weights_help(path)}") from e
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
# Demo

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Block output shapes and parameters of the FID Inception.")
    p.add_argument("--weights", default="", help="load this weights file (default: random, not loaded)")
    p.add_argument("--res", type=int, default=64, help="input image width and height")
    args = p.parse_args(argv)
    try:
        model = load_inception(args.weights, download=False) if args.weights else InceptionV3().eval()
    except (ValueError, RuntimeError) as e:
        return error_exit_code(e)
    for name, block in model.named_children():   # each block's output shape, as the forward meets it
        block.register_forward_hook(lambda m, i, out, name=name: print(f"{name:14s} {tuple(out.shape)}"))
    with torch.inference_mode():
        f = model(torch.zeros(1, 3, args.res, args.res, dtype=torch.uint8))
    print(f"pool3 features {tuple(f.shape)}; {sum(t.numel() for t in model.state_dict().values()):,} numbers "
          f"in the state dict; weights {model.weights_id}; standard file cached: {find_weights() or 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
