"""
fid.py against independent references, with deterministic random Inception weights (the real 95 MB
file is not needed, and not available offline):
- frechet_distance: closed forms (identical stats, commuting covariances, rank-1 and rank-k
  covariances via singular values), scipy.linalg.sqrtm on well-conditioned cases, float32 inputs handled
  in float64, the covariance orientation (D x D from an (N, D) feature matrix), and refusals.
- RunningMoments: streaming float64 mean/covariance equal numpy's on the concatenated features, also
  with a large offset where a naive E[ff^T] - mu mu^T would lose the digits.
- InceptionV3: state-dict keys and shapes equal the published file's list; the TF-style pools (padding
  excluded; max pool in Mixed_7c) against numpy window loops; preprocessing against a hand-written
  bilinear resize; (B, 2048) finite features at 32x32 and 299x299; batch-size invariance.
- Pipelines: folder of PNGs and tensors in [-1, 1] give the statistics of one-at-a-time features;
  the uint8 quantisation rule by hand.
- Weights loading (strict, with and without num_batches_tracked; missing, corrupt, foreign, offline
  download), stats files (round trip, pytorch-fid layout, atomic writes, metadata mismatch), the bad
  inputs of bad-inputs.md, and the CLI end to end in a subprocess.
"""
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn
from PIL import Image

import fid

ROOT = Path(__file__).resolve().parents[1]
KEYS_JSON = Path("/work/shared/design/fid_inception_state_dict_keys.json")
# sha256 of json.dumps([[key, shape], ...]) over that list, in file order
KEYS_SHA256 = "a7a15da1ed154b7574faa006bd5c8ac6ff96d0d5f879ca050475348d2a4368d9"


# ---------------------------------------------------------------------------------------- helpers

def random_inception(seed=0) -> fid.InceptionV3:
    """He-initialised convolutions and perturbed BatchNorm statistics, so every value in the state dict
    differs from PyTorch's defaults (a load that silently skipped a tensor would show) and activations
    stay O(1) through the 94 layers."""
    g = torch.Generator().manual_seed(seed)
    model = fid.InceptionV3()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2 / m.weight[0].numel()) ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.9 + 0.2 * torch.rand(c, generator=g))
                m.bias.copy_(0.05 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.05 * torch.randn(c, generator=g))
                m.running_var.copy_(1 + 0.5 * torch.rand(c, generator=g))
                m.num_batches_tracked.fill_(123)
        model.fc.weight.copy_(0.01 * torch.randn(model.fc.weight.shape, generator=g))
        model.fc.bias.copy_(0.01 * torch.randn(1008, generator=g))
    return model.eval()


def random_psd(d, n, rng, scale=1.0):
    """A full-rank (n > d) sample covariance and a mean."""
    f = rng.standard_normal((n, d)) @ (scale * rng.standard_normal((d, d)) / np.sqrt(d))
    return rng.standard_normal(d), np.cov(f, rowvar=False)


def write_png(path: Path, u8_chw: torch.Tensor):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(u8_chw.permute(1, 2, 0).numpy()).save(path)


def stats_of(features: np.ndarray):
    """Second route: mean and unbiased covariance of the whole (N, D) matrix at once, by numpy."""
    f = features.astype(np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


@pytest.fixture(scope="module")
def model():
    return random_inception()


@pytest.fixture(scope="module")
def images():
    """Four generated images in [-1, 1]: two 32x32 and two 24 wide x 40 high (a mixed-size folder)."""
    g = torch.Generator().manual_seed(1)
    return [torch.rand(2, 3, 32, 32, generator=g) * 2.2 - 1.1, torch.rand(2, 3, 40, 24, generator=g) * 2 - 1]


def one_by_one(model, images) -> np.ndarray:
    """Reference features: each image on its own through `model` (no batching effects)."""
    with torch.inference_mode():
        return np.concatenate([model(fid.quantize_to_uint8(x[i:i + 1])).numpy()
                               for x in images for i in range(len(x))])


@pytest.fixture(scope="module")
def weights_files(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    full, no_counter = d / "random_inception.pth", d / "random_inception_no_nbt.pth"
    state = model.state_dict()
    torch.save(state, full)
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, no_counter)
    return full, no_counter


class PixelFeatures(nn.Module):
    """A cheap stand-in for Inception in pipeline tests, far more sensitive to pixels than random
    Inception features: the preprocessed image average-pooled to 4x4, (B, 48)."""

    def forward(self, images):
        return nn.functional.adaptive_avg_pool2d(fid.preprocess(images), 4).flatten(1)


class FeatureStub(nn.Module):
    """Stands in for Inception where only the plumbing is under test: fixed random features, with NaN
    rows for the images listed in `nan_rows` (by position in the stream)."""

    def __init__(self, nan_rows=()):
        super().__init__()
        self.nan_rows, self.seen = set(nan_rows), 0
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, images):
        fid.preprocess(images)  # same input contract as the real network
        out = torch.randn(images.shape[0], 8, generator=torch.Generator().manual_seed(self.seen))
        for i in range(images.shape[0]):
            if self.seen + i in self.nan_rows:
                out[i] = float("nan")
        self.seen += images.shape[0]
        return out


# ---------------------------------------------------------------------------------------- frechet_distance

def test_identical_statistics_give_zero():
    mu, sigma = random_psd(64, 200, np.random.default_rng(0))
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)


def test_commuting_covariances_closed_form():
    # diagonal covariances commute: FID = |mu1 - mu2|^2 + sum_k (sqrt(a_k) - sqrt(b_k))^2
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.01, 3, 50), rng.uniform(0.01, 3, 50)
    mu1, mu2 = rng.standard_normal(50), rng.standard_normal(50)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    # a full covariance and a multiple of it: FID = tr(S) (1 - sqrt(c))^2
    _, s = random_psd(40, 100, rng)
    assert fid.frechet_distance(mu1[:40], s, mu1[:40], 2.5 * s) == pytest.approx(
        np.trace(s) * (1 - np.sqrt(2.5)) ** 2, rel=1e-10)


def test_rank_deficient_covariances_closed_form():
    # S1 = U U^T, S2 = V V^T: the non-zero eigenvalues of S1 S2 are those of (U^T V)(U^T V)^T, so
    # tr((S1 S2)^(1/2)) = sum of the singular values of U^T V (its nuclear norm).
    rng = np.random.default_rng(2)
    for k in (1, 5):
        u, v = rng.standard_normal((30, k)), rng.standard_normal((30, k))
        s1, s2 = u @ u.T, v @ v.T
        nuclear = np.linalg.svd(u.T @ v, compute_uv=False).sum()
        expected = np.trace(s1) + np.trace(s2) - 2 * nuclear
        assert fid.frechet_distance(np.zeros(30), s1, np.zeros(30), s2) == pytest.approx(expected, rel=1e-12)
    # fewer images than dims (N < 2048 in real use): with centred features X_i, S_i = X_i^T X_i / (n_i - 1)
    # and the trace term is the nuclear norm of X1 X2^T / sqrt((n1 - 1)(n2 - 1)).
    f1, f2 = rng.standard_normal((10, 40)), rng.standard_normal((12, 40)) + 0.5
    x1, x2 = f1 - f1.mean(0), f2 - f2.mean(0)
    nuclear = np.linalg.svd(x1 @ x2.T, compute_uv=False).sum() / np.sqrt(9 * 11)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    expected = np.sum((f1.mean(0) - f2.mean(0)) ** 2) + np.trace(s1) + np.trace(s2) - 2 * nuclear
    assert fid.frechet_distance(f1.mean(0), s1, f2.mean(0), s2) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("seed,d", [(3, 16), (4, 32), (5, 64)])
def test_agrees_with_scipy_sqrtm(seed, d):
    rng = np.random.default_rng(seed)
    mu1, s1 = random_psd(d, 4 * d, rng)
    mu2, s2 = random_psd(d, 4 * d, rng, scale=1.5)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    reference = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-8)


def test_float32_inputs_are_computed_in_float64():
    # identical covariances: FID = |mu1 - mu2|^2 exactly; tiny next to tr(S) ~ 64, so float32
    # arithmetic in the trace term (error ~ 1e-5) would swamp it. float64 leaves ~1e-10, how much
    # depends on the LAPACK build (1.6e-10 seen on one host): 1e-8 separates the two by 1000x both ways.
    rng = np.random.default_rng(6)
    _, s = random_psd(64, 300, rng)
    s32 = s.astype(np.float32)
    mu = np.zeros(64, np.float32)
    mu2 = mu.copy()
    mu2[0] = 1e-3
    assert fid.frechet_distance(mu, s32, mu2, s32) == pytest.approx(1e-6, abs=1e-8)


def test_covariance_orientation_features_by_dims():
    rng = np.random.default_rng(7)
    feats = rng.standard_normal((20, 6)) * np.arange(1, 7)  # N = 20 images, D = 6 dims
    moments = fid.RunningMoments()
    moments.update(torch.from_numpy(feats))
    mu, sigma = moments.mean_cov()
    assert mu.shape == (6,) and sigma.shape == (6, 6)
    centred = feats - feats.mean(0)
    assert np.allclose(sigma, centred.T @ centred / 19, rtol=1e-12, atol=0)
    # an (N, N) "covariance" (np.cov without rowvar=False) is refused, not silently used
    with pytest.raises(fid.FIDError, match=r"\(D, D\)"):
        fid.frechet_distance(mu, np.cov(feats), mu, sigma)


def test_refuses_bad_statistics():
    mu, sigma = random_psd(8, 40, np.random.default_rng(8))
    with pytest.raises(fid.FIDError, match="dims"):
        fid.frechet_distance(mu, sigma, mu[:4], sigma[:4, :4])
    bad = sigma.copy()
    bad[0, 0] = np.nan
    with pytest.raises(fid.FIDError, match="NaN"):
        fid.frechet_distance(mu, bad, mu, sigma)
    with pytest.raises(fid.FIDError, match="NaN"):
        fid.frechet_distance(np.full(8, np.inf), sigma, mu, sigma)
    asym = sigma.copy()
    asym[0, 1] += 1.0
    with pytest.raises(fid.FIDError, match="symmetric"):
        fid.frechet_distance(mu, asym, mu, sigma)


# ---------------------------------------------------------------------------------------- streaming moments

@pytest.mark.parametrize("offset", [0.0, 1e6])
def test_running_moments_match_numpy_on_concatenation(offset):
    rng = np.random.default_rng(9)
    batches = [rng.standard_normal((b, 5)) * [1, 2, 3, 4, 5] + offset for b in (7, 1, 13, 0, 5, 2)]
    if offset == 0:  # float32 features, as Inception gives them
        batches = [b.astype(np.float32) for b in batches]
    moments = fid.RunningMoments()
    for b in batches:
        moments.update(torch.from_numpy(b))
    mu, sigma = moments.mean_cov()
    ref_mu, ref_sigma = stats_of(np.concatenate(batches))
    assert moments.n == 28
    assert np.allclose(mu, ref_mu, rtol=1e-12, atol=1e-12)
    assert np.allclose(sigma, ref_sigma, rtol=1e-9, atol=1e-9)
    assert sigma.dtype == np.float64


def test_running_moments_need_two_samples():
    moments = fid.RunningMoments()
    moments.update(torch.ones(1, 4))
    with pytest.raises(fid.FIDError, match="at least 2"):
        moments.mean_cov()


# ---------------------------------------------------------------------------------------- the network

def test_state_dict_matches_published_weights_file():
    state = fid.InceptionV3().state_dict()
    listing = [[k, list(v.shape)] for k, v in state.items()]
    # the design folder's key list of pt_inception-2015-12-05-6726825d.pth, compared in full when present
    if KEYS_JSON.is_file():
        assert listing == [[k, s] for k, s in json.loads(KEYS_JSON.read_text()).items()]
    # and always against its digest, so the check survives without the design folder
    assert hashlib.sha256(json.dumps(listing).encode()).hexdigest() == KEYS_SHA256
    assert len(listing) == 566 and sum(v.numel() for v in state.values()) == 23_885_486  # ~23.9 M


def _window_reduce(x: np.ndarray, how: str) -> np.ndarray:
    """3x3 stride-1 pooling of (C, H, W) by explicit loops over the pixels inside the image."""
    c, h, w = x.shape
    out = np.empty_like(x)
    for i in range(h):
        for j in range(w):
            win = x[:, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2].reshape(c, -1)
            out[:, i, j] = win.mean(1) if how == "mean" else win.max(1)
    return out


@pytest.mark.parametrize("block,c_in,how", [("Mixed_5b", 192, "mean"), ("Mixed_6c", 768, "mean"),
                                            ("Mixed_7b", 1280, "mean"), ("Mixed_7c", 2048, "max")])
def test_pool_branches_follow_the_tf_graph(model, block, c_in, how):
    # FID changes: TF's average pool ignores the zero padding; Mixed_7c max-pools.
    x = torch.randn(1, c_in, 5, 6, generator=torch.Generator().manual_seed(10))
    seen = {}
    branch = getattr(model, block).branch_pool
    handle = branch.register_forward_pre_hook(lambda mod, inp: seen.update(x=inp[0]))  # returns None
    with torch.inference_mode():
        getattr(model, block)(x)
    handle.remove()
    assert np.allclose(seen["x"][0].numpy(), _window_reduce(x[0].numpy(), how), atol=1e-5)


def _bilinear_half_pixel(img: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of (H, W) with half-pixel centres (src = (i + 0.5) in/out - 0.5, clamped at 0)."""
    def taps(n_in):
        src = np.clip((np.arange(size) + 0.5) * n_in / size - 0.5, 0, None)
        i0 = np.floor(src).astype(int)
        return i0, np.minimum(i0 + 1, n_in - 1), src - i0
    r0, r1, wr = taps(img.shape[0])
    c0, c1, wc = taps(img.shape[1])
    rows = img[r0] * (1 - wr)[:, None] + img[r1] * wr[:, None]
    return rows[:, c0] * (1 - wc) + rows[:, c1] * wc


def test_preprocess_is_pytorch_fid_convention():
    u8 = torch.randint(0, 256, (1, 3, 7, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(11))
    x = fid.preprocess(u8)
    assert x.shape == (1, 3, 299, 299)
    expected = _bilinear_half_pixel(u8[0, 1].double().numpy() / 255, 299) * 2 - 1
    assert np.allclose(x[0, 1].numpy(), expected, atol=2e-6)
    big = torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8)
    assert torch.allclose(fid.preprocess(big), big.double().div(127.5).sub(1).float(), atol=1e-6)
    with pytest.raises(fid.FIDError, match="uint8"):
        fid.preprocess(torch.zeros(1, 3, 8, 8))


def test_quantisation_rule_by_hand():
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0, -1 + 0.4 / 127.5, -1 + 1.6 / 127.5, 1 / 255, 0.999])
    # (x + 1) * 127.5, clamped to [0, 255], rounded: 0.4 -> 0, 1.6 -> 2, 127.5 -> 128, 128 -> 128, 254.87 -> 255
    expected = [0, 0, 128, 255, 255, 0, 2, 128, 255]
    assert fid.quantize_to_uint8(x.view(1, 1, 1, -1)).flatten().tolist() == expected
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1  # every uint8 level survives the round trip
    assert fid.quantize_to_uint8(levels.float().view(1, 1, 1, -1)).flatten().tolist() == list(range(256))
    with pytest.raises(fid.FIDError, match=r"NaN/inf \(batch indices \[1\]\)"):
        fid.quantize_to_uint8(torch.tensor([0.0, float("nan")]).view(2, 1, 1, 1))


def test_features_shape_finite_and_batch_invariant(model, images):
    x32 = images[0]  # two 32x32 images in [-1, 1]
    x299 = torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8, generator=torch.Generator().manual_seed(12))
    with torch.inference_mode():
        f32, f299 = model(fid.quantize_to_uint8(x32)), model(x299)
    assert f32.shape == (2, 2048) and f299.shape == (1, 2048)
    for f in (f32, f299):
        assert f.dtype == torch.float32 and torch.isfinite(f).all()
    assert (f32[0] - f32[1]).abs().max() > 0  # features depend on the image
    # the batch of 2 equals the images one at a time
    assert np.allclose(f32.numpy(), one_by_one(model, [x32]), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------- pipelines

def test_folder_and_tensor_routes_equal_one_by_one_statistics(images, tmp_path):
    # the PNGs a sampler would write: mixed sizes, nested folders, an upper-case extension
    for k, x in enumerate(images):
        for i in range(2):
            write_png(tmp_path / f"sub{k}" / f"img{i}.PNG", fid.quantize_to_uint8(x[i:i + 1])[0])
    model = PixelFeatures()
    ref_mu, ref_sigma = stats_of(one_by_one(model, images))
    from_folder = fid.compute_stats_from_folder(tmp_path, model, batch_size=3, progress=False)
    from_tensors = fid.compute_stats_from_tensors(iter(images), model)
    for s in (from_folder, from_tensors):
        assert s.n == 4
        assert np.allclose(s.mu, ref_mu, rtol=1e-6, atol=1e-7)
        assert np.allclose(s.sigma, ref_sigma, rtol=1e-5, atol=1e-8)
        assert s.meta["resolution"] == "mixed (2 sizes)" and s.meta["weights"] == "unknown"


# ---------------------------------------------------------------------------------------- weights

def test_strict_load_with_and_without_batchnorm_counters(model, weights_files):
    for path in weights_files:
        with pytest.warns(UserWarning, match="not the standard FID weights"):
            loaded = fid.load_inception(path)
        assert loaded.weights_id == hashlib.sha256(path.read_bytes()).hexdigest()[:8]
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
        for key, value in model.state_dict().items():
            if key.endswith("num_batches_tracked") and path.name.endswith("no_nbt.pth"):
                continue
            assert torch.equal(loaded.state_dict()[key], value), key


def _assert_weights_message(message: str):
    for part in (fid.FID_WEIGHTS_NAME, fid.FID_WEIGHTS_URL, fid.FID_WEIGHTS_HASH, "--weights"):
        assert part in message


def test_missing_corrupt_and_foreign_weights(tmp_path):
    with pytest.raises(fid.FIDError, match="no such file") as e:
        fid.load_inception(tmp_path / "nope.pth")
    _assert_weights_message(str(e.value))
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x00not a torch file" * 100)
    with pytest.warns(UserWarning), pytest.raises(fid.FIDError, match="corrupt.pth: cannot read weights") as e:
        fid.load_inception(corrupt)
    _assert_weights_message(str(e.value))
    foreign = tmp_path / "foreign.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, foreign)
    with pytest.warns(UserWarning), pytest.raises(fid.FIDError, match="not the FID Inception state dict"):
        fid.load_inception(foreign)


def test_default_weights_offline_and_corrupt_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / fid.FID_WEIGHTS_NAME
    assert fid.cached_weights_path() == cached and fid.find_weights() is None

    def offline(url, dst, hash_prefix=None, progress=True):
        assert url == fid.FID_WEIGHTS_URL and hash_prefix == fid.FID_WEIGHTS_HASH
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(fid.FIDError, match="cannot download") as e:
        fid.load_inception()
    _assert_weights_message(str(e.value))
    assert str(cached) in str(e.value) and not cached.exists()
    cached.write_bytes(b"truncated download")  # a half-written cache file
    with pytest.raises(fid.FIDError, match="corrupt .*delete it to re-download") as e:
        fid.load_inception()
    _assert_weights_message(str(e.value))
    assert fid.find_weights() == cached


# ---------------------------------------------------------------------------------------- stats files

def test_stats_file_round_trip_layout_and_atomicity(tmp_path, monkeypatch):
    mu, sigma = random_psd(6, 30, np.random.default_rng(13))
    stats = fid.FIDStats(mu, sigma, 30, {"dims": 6, "resolution": "64x64"})
    out = tmp_path / "ref.npz"
    fid.save_stats(out, stats)
    with np.load(out) as f:  # how pytorch-fid and ADM's evaluator read it
        assert np.array_equal(f["mu"][:], mu) and np.array_equal(f["sigma"][:], sigma)
    back = fid.load_stats(out)
    assert back.n == 30 and back.meta == {"dims": 6, "resolution": "64x64"}
    # a failure while writing leaves the old file intact and no temp file behind
    before = out.read_bytes()

    def disk_full(file, **arrays):
        file.write(b"partial")
        raise OSError("No space left on device")
    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(OSError, match="No space"):
        fid.save_stats(out, fid.FIDStats(mu + 1, sigma, 30))
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["ref.npz"]


def test_foreign_and_bad_stats_files(tmp_path):
    mu, sigma = random_psd(6, 30, np.random.default_rng(14))
    np.savez(tmp_path / "pytorch_fid.npz", mu=mu, sigma=sigma)  # no metadata
    s = fid.load_stats(tmp_path / "pytorch_fid.npz")
    assert s.n is None and s.meta == {} and np.array_equal(s.mu, mu)
    np.savez(tmp_path / "images.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(fid.FIDError, match=r"no 'mu'/'sigma' arrays \(found \['arr_0'\]\)"):
        fid.load_stats(tmp_path / "images.npz")
    (tmp_path / "garbage.npz").write_bytes(b"garbage")
    with pytest.raises(fid.FIDError, match="garbage.npz: cannot read stats file"):
        fid.load_stats(tmp_path / "garbage.npz")
    with pytest.raises(fid.FIDError, match="must end with .npz"):
        fid.save_stats(tmp_path / "out.txt", s)
    mism = fid.meta_mismatches({"resolution": "64x64", "weights": "6726825d"},
                               {"resolution": "256x256", "weights": "6726825d", "source": "x"})
    assert mism == ["resolution: '64x64' vs '256x256'"]


# ---------------------------------------------------------------------------------------- CLI

def _folder(path: Path, n: int, seed: int, size=32) -> Path:
    """n smooth images (a random colour plus random gradients): unlike i.i.d. noise images, which all
    look alike after pooling, these give random-weight features that differ between images."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    for i in range(n):
        colour, (a, b) = torch.rand(3, 1, 1, generator=g) * 255, torch.randn(2, 3, 1, 1, generator=g) * 60
        write_png(path / f"{i}.png", (colour + a * xx + b * yy).clamp(0, 255).round().to(torch.uint8))
    return path


def _folder_features(model, folder: Path) -> np.ndarray:
    with torch.inference_mode():
        return np.concatenate([model(torch.from_numpy(np.array(Image.open(p).convert("RGB")))
                                     .permute(2, 0, 1)[None]).numpy() for p in sorted(folder.glob("*.png"))])


@pytest.mark.filterwarnings("ignore:.*not the standard FID weights")
def test_cli_end_to_end(model, weights_files, tmp_path):
    a, b = _folder(tmp_path / "a", 3, seed=20), _folder(tmp_path / "b", 2, seed=21, size=24)
    common = ["--weights", str(weights_files[0]), "--device", "cpu", "--batch-size", "2"]
    # --save-stats in-process (one interpreter start less), with a data-loading worker process
    with pytest.warns(UserWarning, match=r"a: N = 3 < 2048"):
        assert fid.main(["--save-stats", str(a), str(tmp_path / "a.npz"), "--num-workers", "1", *common]) == 0
    feats_a, feats_b = _folder_features(model, a).astype(np.float64), _folder_features(model, b).astype(np.float64)
    ref_a = stats_of(feats_a)
    stats_a = fid.load_stats(tmp_path / "a.npz")
    assert stats_a.n == 3 and np.allclose(stats_a.mu, ref_a[0], rtol=1e-5, atol=1e-7)
    assert np.allclose(stats_a.sigma, ref_a[1], rtol=1e-4, atol=1e-10)
    # then the real command line in a fresh interpreter: stats file vs folder. One BLAS/OpenMP thread:
    # on a busy shared machine two spinning threads made the d = 2048 eigh 10x slower; values unaffected.
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "fid.py", str(tmp_path / "a.npz"), str(b), "--num-workers", "0",
                             *common], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    # closed form for N < D (see test_rank_deficient_covariances_closed_form), cheaper than a d = 2048 eigh
    x_a, x_b = feats_a - feats_a.mean(0), feats_b - feats_b.mean(0)
    nuclear = np.linalg.svd(x_a @ x_b.T, compute_uv=False).sum() / np.sqrt((3 - 1) * (2 - 1))
    expected = (np.sum((feats_a.mean(0) - feats_b.mean(0)) ** 2) + np.sum(x_a ** 2) / 2 + np.sum(x_b ** 2) / 1
                - 2 * nuclear)
    assert expected > 1e-3  # the two folders really differ, so the check below has teeth
    assert float(re.search(r"FID: (\S+)", result.stdout).group(1)) == pytest.approx(expected, rel=2e-5, abs=2e-6)
    assert f"N = 3: {tmp_path / 'a.npz'}" in result.stdout and f"N = 2: {b}" in result.stdout
    assert "warning:" in result.stderr and "N = 2 < 2048" in result.stderr  # small-N warning with N
    assert "resolution: '32x32' vs '24x24'" in result.stderr              # metadata mismatch


@pytest.mark.filterwarnings("ignore:.*not the standard FID weights")
def test_cli_bad_inputs_fail_early_with_one_line(weights_files, tmp_path, capsys):
    good = _folder(tmp_path / "good", 2, seed=22, size=8)
    (tmp_path / "empty").mkdir()
    _folder(tmp_path / "single", 1, seed=23, size=8)
    broken = _folder(tmp_path / "broken", 2, seed=24, size=8)
    (broken / "0.png").write_bytes(b"\x89PNG truncated")
    w = ["--weights", str(weights_files[0]), "--device", "cpu"]
    cases = [([str(good), str(tmp_path / "empty"), *w], "no images found"),
             ([str(good), str(tmp_path / "single"), *w], "at least 2 images, found 1"),
             ([str(good), str(tmp_path / "missing"), *w], "not a folder of images"),
             ([str(good), str(good), "--weights", str(tmp_path / "none.pth")], fid.FID_WEIGHTS_URL),
             ([str(good), str(good), *w, "--device", "gpu0"], "--device gpu0"),
             (["--save-stats", str(good), str(tmp_path / "x.txt"), *w], "output .npz"),
             ([str(broken), str(good), *w, "--num-workers", "1"], "0.png: cannot read image")]
    for argv, needle in cases:
        assert fid.main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and needle in err[-1], (argv, err)
        assert not any("Traceback" in line for line in err)
