"""
fid.py against independent references (Inception itself is tested in test_inception.py; here it has
deterministic random weights, or a cheap stand-in, since the real 95 MB file is not available offline):
- frechet_distance: closed forms (identical stats, commuting covariances, rank-1 and rank-k
  covariances via singular values), scipy.linalg.sqrtm on well-conditioned cases, float32 inputs handled
  in float64, the covariance orientation (D x D from an (N, D) feature matrix), and refusals.
- RunningMoments: streaming float64 mean/covariance equal numpy's on the concatenated features, also
  with a large offset where a naive E[ff^T] - mu mu^T would lose the digits.
- KID: the full-set estimator against a double loop over the definition (Binkowski et al. 2018); random
  subsets average to the full-set U-statistic; about 0 for one distribution, growing with a mean shift;
  independent of row and batch order, deterministic for a seed; too large a subset warns and shrinks.
- Pipelines: folder of PNGs and tensors in [-1, 1] give the statistics (and features) of one-at-a-time
  features; non-finite features are refused naming the images.
- Stats files (round trip, features on request, pytorch-fid layout, atomic writes, metadata mismatch),
  and the CLI end to end in a subprocess: FID and KID against closed forms, exit code 2 for the bad
  inputs, 1 for failures (no network, disk full).
"""
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
import inception
from test_inception import random_inception

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------- helpers

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


def mmd2_by_loops(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD^2 with KID's kernel k(a, b) = (a.b / d + 1)^3, term by term from its definition
    (Binkowski et al. 2018, Eq. 4; Gretton et al. 2012, Eq. 3), for any two sample sizes."""
    d, m, n = x.shape[1], len(x), len(y)

    def k(a, b):
        return (float(np.dot(a, b)) / d + 1.0) ** 3
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    return xx + yy - 2.0 * sum(k(a, b) for a in x for b in y) / (m * n)


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
        return np.concatenate([model(inception.quantize_to_uint8(x[i:i + 1])).numpy()
                               for x in images for i in range(len(x))])


@pytest.fixture(scope="module")
def weights_file(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "random_inception.pth"
    torch.save(model.state_dict(), path)
    return path


class PixelFeatures(nn.Module):
    """A cheap stand-in for Inception in pipeline tests, far more sensitive to pixels than random
    Inception features: the preprocessed image average-pooled to 4x4, (B, 48)."""

    def forward(self, images):
        return nn.functional.adaptive_avg_pool2d(inception.preprocess(images), 4).flatten(1)


class FeatureStub(nn.Module):
    """Stands in for Inception where only the plumbing is under test: fixed random features, with NaN
    rows for the images listed in `nan_rows` (by position in the stream)."""

    def __init__(self, nan_rows=()):
        super().__init__()
        self.nan_rows, self.seen = set(nan_rows), 0
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, images):
        inception.preprocess(images)  # same input contract as the real network
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


# ---------------------------------------------------------------------------------------- pipelines

def test_folder_and_tensor_routes_equal_one_by_one_statistics(images, tmp_path):
    # the PNGs a sampler would write: mixed sizes, nested folders, an upper-case extension
    for k, x in enumerate(images):
        for i in range(2):
            write_png(tmp_path / f"sub{k}" / f"img{i}.PNG", inception.quantize_to_uint8(x[i:i + 1])[0])
    model = PixelFeatures()
    reference = one_by_one(model, images)   # sorted file names = stream order here
    ref_mu, ref_sigma = stats_of(reference)
    from_folder = fid.compute_stats_from_folder(tmp_path, model, batch_size=3, progress=False, keep_features=True)
    from_tensors = fid.compute_stats_from_tensors(iter(images), model, keep_features=True)
    for s in (from_folder, from_tensors):
        assert s.n == 4
        assert np.allclose(s.mu, ref_mu, rtol=1e-6, atol=1e-7)
        assert np.allclose(s.sigma, ref_sigma, rtol=1e-5, atol=1e-8)
        assert s.meta["resolution"] == "mixed (2 sizes)" and s.meta["weights"] == "unknown"
        assert s.features.dtype == np.float32 and np.allclose(s.features, reference, rtol=1e-6, atol=1e-7)
    # features are opt-in: N x 8 KB with the real network
    assert fid.compute_stats_from_tensors(iter(images), model).features is None


def test_non_finite_features_are_refused_naming_the_images():
    batches = [torch.zeros(3, 3, 8, 8), torch.zeros(2, 3, 8, 8)]
    with pytest.raises(fid.FIDError, match=r"2 image\(s\): generated image 0, generated image 2 "):
        fid.compute_stats_from_tensors(batches, FeatureStub(nan_rows=[0, 2]))
    with pytest.raises(fid.FIDError, match=r"1 image\(s\): generated image 4 "):   # numbered across batches
        fid.compute_stats_from_tensors(batches, FeatureStub(nan_rows=[4]))


# ---------------------------------------------------------------------------------------- KID

def test_kid_full_set_estimator_equals_double_loop():
    rng = np.random.default_rng(40)
    x, y = rng.standard_normal((7, 5)), rng.standard_normal((7, 5)) * 1.3 + 0.4
    mean, std = fid.kernel_inception_distance(x, y, subset_size=7, num_subsets=1)
    assert mean == pytest.approx(mmd2_by_loops(x, y), rel=1e-12) and std == 0.0
    # float32 tensors are accepted and computed in float64 (float32 arithmetic would be ~1e-7 off)
    x32, y32 = torch.from_numpy(x).float(), torch.from_numpy(y).float()
    mean32, _ = fid.kernel_inception_distance(x32, y32, subset_size=7, num_subsets=1)
    assert mean32 == pytest.approx(mmd2_by_loops(x32.double().numpy(), y32.double().numpy()), rel=1e-12)


def test_kid_random_subsets_average_to_the_full_set_estimator():
    # MMD^2_u is a U-statistic: over subsets drawn without replacement, its mean is the full-set value
    # (with replacement, repeated rows would enter the i != j sums and bias it upward).
    rng = np.random.default_rng(41)
    x, y = rng.standard_normal((12, 4)), rng.standard_normal((10, 4)) * 1.2 + 0.3
    mean, std = fid.kernel_inception_distance(x, y, subset_size=4, num_subsets=4000)
    assert abs(mean - mmd2_by_loops(x, y)) < 4 * std / np.sqrt(4000)


def test_kid_near_zero_for_one_distribution_and_grows_with_a_shift():
    rng = np.random.default_rng(42)
    x, y = rng.standard_normal((400, 16)), rng.standard_normal((400, 16))
    same_mean, same_std = fid.kernel_inception_distance(x, y, subset_size=100, num_subsets=50)
    assert abs(same_mean) < 3 * same_std
    shifted = [fid.kernel_inception_distance(x, y + s, subset_size=100, num_subsets=50) for s in (0.25, 0.5, 1.0)]
    assert shifted[0][0] > 3 * same_std
    assert shifted[0][0] < shifted[1][0] < shifted[2][0]


def test_kid_depends_on_the_feature_sets_and_seed_only(images):
    # the pipeline's features, batch by batch, in two batch orders, against one array of the same images
    model = PixelFeatures()
    batches = [images[0], images[1], images[0].flip(-1)]   # 6 images, 2 sizes
    forward = fid.compute_stats_from_tensors(batches, model, keep_features=True).features
    backward = fid.compute_stats_from_tensors(batches[::-1], model, keep_features=True).features
    at_once = one_by_one(model, batches)
    other = np.random.default_rng(43).standard_normal((9, 48)) * 0.1
    kid = fid.kernel_inception_distance(at_once, other, subset_size=4, num_subsets=20, seed=3)
    assert fid.kernel_inception_distance(forward, other, 4, 20, seed=3) == pytest.approx(kid, rel=1e-9)
    assert fid.kernel_inception_distance(backward, other, 4, 20, seed=3) == fid.kernel_inception_distance(
        forward, other, 4, 20, seed=3)                                   # subsets do not depend on row order
    shuffled = other[np.random.default_rng(44).permutation(9)]
    assert fid.kernel_inception_distance(at_once, shuffled, 4, 20, seed=3) == kid
    assert fid.kernel_inception_distance(at_once, other, 4, 20, seed=4) != kid   # the seed picks the subsets


def test_kid_subset_larger_than_a_set_warns_and_uses_the_largest_valid_size():
    rng = np.random.default_rng(45)
    x, y = rng.standard_normal((5, 3)), rng.standard_normal((5, 3)) + 0.2
    with pytest.warns(UserWarning, match="subset size 1000 > 5 images .*using 5"):
        mean, std = fid.kernel_inception_distance(x, y, num_subsets=3)
    assert mean == pytest.approx(mmd2_by_loops(x, y), rel=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    with pytest.warns(UserWarning, match="subset size 7 > 5 images"):
        fid.kernel_inception_distance(x, np.vstack([y, y + 1]), subset_size=7, num_subsets=2)


def test_kid_refuses_bad_features():
    x = np.zeros((4, 3))
    with pytest.raises(fid.FIDError, match=">= 2 images"):
        fid.kernel_inception_distance(x[:1], x, subset_size=2)
    with pytest.raises(fid.FIDError, match="3 and 2 dims"):
        fid.kernel_inception_distance(x, x[:, :2])
    with pytest.raises(fid.FIDError, match="finite"):
        fid.kernel_inception_distance(x, np.full((4, 3), np.nan))


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


def test_stats_file_keeps_features_on_request(tmp_path):
    rng = np.random.default_rng(15)
    features = rng.random((5, 6)).astype(np.float32)
    mu, sigma = stats_of(features)
    fid.save_stats(tmp_path / "with.npz", fid.FIDStats(mu, sigma, 5, {}, features))
    fid.save_stats(tmp_path / "without.npz", fid.FIDStats(mu, sigma, 5, {}))
    back = fid.load_stats(tmp_path / "with.npz")
    assert back.features.dtype == np.float32 and np.array_equal(back.features, features)
    assert fid.load_stats(tmp_path / "without.npz").features is None
    with np.load(tmp_path / "without.npz") as f:
        assert "features" not in f.files
    np.savez(tmp_path / "short.npz", mu=mu, sigma=sigma, features=features[:4],
             meta=np.array('{"n": 5}'))   # rows disagree with N
    with pytest.raises(fid.FIDError, match="4 feature rows, but the statistics are of N = 5"):
        fid.load_stats(tmp_path / "short.npz")
    np.savez(tmp_path / "narrow.npz", mu=mu, sigma=sigma, features=features[:, :3])
    with pytest.raises(fid.FIDError, match=r"'features' must be a finite \(N, 6\) array"):
        fid.load_stats(tmp_path / "narrow.npz")


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


def _run_cli(args: list[str]) -> subprocess.CompletedProcess:
    """The real command line in a fresh interpreter. One BLAS/OpenMP thread: on a busy shared machine
    two spinning threads made the d = 2048 eigh 10x slower; values are unaffected."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run([sys.executable, "fid.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*not the standard FID weights")
def test_cli_end_to_end(model, weights_file, tmp_path):
    a, b = _folder(tmp_path / "a", 3, seed=20), _folder(tmp_path / "b", 2, seed=21, size=24)
    common = ["--weights", str(weights_file), "--device", "cpu", "--batch-size", "2"]
    # --save-stats in-process (one interpreter start less), with a data-loading worker process
    with pytest.warns(UserWarning, match=r"a: N = 3 < 2048"):
        assert fid.main(["--save-stats", str(a), str(tmp_path / "a.npz"), "--num-workers", "1", *common]) == 0
    feats_a, feats_b = _folder_features(model, a).astype(np.float64), _folder_features(model, b).astype(np.float64)
    ref_a = stats_of(feats_a)
    stats_a = fid.load_stats(tmp_path / "a.npz")
    assert stats_a.n == 3 and np.allclose(stats_a.mu, ref_a[0], rtol=1e-5, atol=1e-7)
    assert np.allclose(stats_a.sigma, ref_a[1], rtol=1e-4, atol=1e-10)
    assert stats_a.features is None   # not asked for
    result = _run_cli([str(tmp_path / "a.npz"), str(b), "--num-workers", "0", *common])   # stats file vs folder
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


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*not the standard FID weights")
def test_cli_kid_end_to_end(model, weights_file, tmp_path):
    a, b = _folder(tmp_path / "a", 3, seed=30), _folder(tmp_path / "b", 3, seed=31, size=24)
    common = ["--weights", str(weights_file), "--device", "cpu", "--num-workers", "0"]
    feats_a, feats_b = _folder_features(model, a).astype(np.float64), _folder_features(model, b).astype(np.float64)
    expected = mmd2_by_loops(feats_a, feats_b)   # both sets of 3: every subset of 3 is the full set
    # Random-weight features are ~0.06, so k ~ 1.03 and KID is small; float32 features move it by ~1e-8.
    tol = 1e-7
    assert expected > 100 * tol   # the two folders really differ, so the checks below have teeth
    # --save-stats --keep-features in-process: the file carries the features of the folder
    with pytest.warns(UserWarning, match="N = 3 < 2048"):
        assert fid.main(["--save-stats", "--keep-features", str(a), str(tmp_path / "a.npz"), *common]) == 0
    assert np.allclose(fid.load_stats(tmp_path / "a.npz").features, feats_a, rtol=1e-5, atol=1e-7)
    # the real command line: stats file with features vs folder; the default subset size 1000 > 3 warns
    # and uses 3, so both subsets are the full sets
    result = _run_cli([str(tmp_path / "a.npz"), str(b), "--kid", "--kid-subsets", "2", *common])
    assert result.returncode == 0, result.stderr
    assert "warning: KID subset size 1000 > 3 images (the smaller set): using 3" in result.stderr
    kid, std = map(float, re.search(r"KID: (\S+) \+- (\S+)", result.stdout).groups())
    assert kid == pytest.approx(expected, rel=1e-5, abs=tol) and std == pytest.approx(0.0, abs=tol)
    assert re.search(r"FID: \S+", result.stdout) and f"N = 3: {b}" in result.stdout


@pytest.mark.filterwarnings("ignore:.*not the standard FID weights")
def test_cli_bad_inputs_fail_early_with_one_line(weights_file, tmp_path, capsys):
    good = _folder(tmp_path / "good", 2, seed=22, size=8)
    (tmp_path / "empty").mkdir()
    _folder(tmp_path / "single", 1, seed=23, size=8)
    broken = _folder(tmp_path / "broken", 2, seed=24, size=8)
    (broken / "0.png").write_bytes(b"\x89PNG truncated")
    w = ["--weights", str(weights_file), "--device", "cpu"]
    mu, sigma = random_psd(4, 10, np.random.default_rng(25))
    np.savez(tmp_path / "no_features.npz", mu=mu, sigma=sigma)
    cases = [([str(good), str(tmp_path / "empty"), *w], "no images found"),
             ([str(good), str(tmp_path / "single"), *w], "at least 2 images, found 1"),
             ([str(good), str(tmp_path / "missing"), *w], "not a folder of images"),
             ([str(good), str(good), "--weights", str(tmp_path / "none.pth")], inception.FID_WEIGHTS_URL),
             ([str(good), str(good), *w, "--device", "gpu0"], "--device gpu0"),
             (["--save-stats", str(good), str(tmp_path / "x.txt"), *w], "output .npz"),
             ([str(broken), str(good), *w, "--num-workers", "1"], "0.png: cannot read image"),
             ([str(tmp_path / "no_features.npz"), str(good), "--kid", *w], "no features stored, and KID needs"),
             ([str(tmp_path / "bad.npz"), str(good), *w], "bad.npz: cannot read stats file"),
             ([str(good), str(good), "--keep-features", *w], "--keep-features only applies to --save-stats"),
             ([str(good), str(good), "--kid", "--kid-subset-size", "1", *w], "--kid-subset-size must be >= 2")]
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    for argv, needle in cases:
        assert fid.main(argv) == 2   # a bad input: the usage exit code
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and needle in err[-1], (argv, err)
        assert not any("Traceback" in line for line in err)
    with pytest.raises(SystemExit) as e:   # argparse: one path only
        fid.main([str(good)])
    assert e.value.code == 2


def test_cli_failures_exit_1(tmp_path, monkeypatch, capsys):
    good = _folder(tmp_path / "good", 2, seed=26, size=8)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))   # no cached weights

    def offline(url, dst, hash_prefix=None, progress=True):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    assert fid.main([str(good), str(good), "--device", "cpu", "--num-workers", "0"]) == 1
    assert "error: cannot download the Inception weights" in capsys.readouterr().err

    def disk_full(file, **arrays):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(np, "savez", disk_full)
    monkeypatch.setattr(fid, "load_inception", lambda *args, **kwargs: PixelFeatures())   # cheap features
    argv = ["--save-stats", str(good), str(tmp_path / "out.npz"), "--device", "cpu", "--num-workers", "0"]
    with pytest.warns(UserWarning, match="N = 2 < 2048"):
        assert fid.main(argv) == 1
    assert "No space left on device" in capsys.readouterr().err and not (tmp_path / "out.npz").exists()
