"""
sample.py against exact answers, never against its own output:
- ddpm_step equals the posterior q(z_s | z_t, x) written here from VDM's alpha_{t|s}, sigma_{t|s}^2 in
  float64, and (second route) maps the forward marginal q(z_t | x) onto q(z_s | x).
- With exact (analytic) denoisers instead of a network: Gaussian data comes back with the data mean and
  std, matching the sampler's exact output law (a linear-Gaussian recursion computed here) and with an
  error that shrinks as steps grow; a few-point dataset is hit point by point with the right
  frequencies; with class labels and guidance, class k's samples land on class k's points.
- Guidance: w = 0 is bit-identical to no guidance and runs no unconditional pass; the interval switches
  exactly at its edges; guiding v equals guiding eps (computed here in float64).
- Per-image seeds: a batch of 8 equals two batches of 4, bit for bit.
- Checkpoints are written with checkpoint.py's own writer (tests/test_checkpoint.py checks the format).
- The CLI end to end in a subprocess (grid from ./runs with no arguments, --out-dir, two processes under
  torchrun giving each seed once and the same pixels, bad inputs) and in-process (--resume equals a
  fresh run, a full folder refused, --overwrite, class / guidance / resolution errors).
"""
import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample as S
from conftest import write_checkpoint
from schedules import get_schedule

REPO = Path(__file__).resolve().parents[1]
COSINE = get_schedule("cosine", 32)


def sig2(logsnr):
    """(alpha^2, sigma^2) written out in float64, independent of schedules.alpha_sigma."""
    logsnr = logsnr.double()
    return 1 / (1 + torch.exp(-logsnr)), torch.exp(-logsnr) / (1 + torch.exp(-logsnr))


def vdm_posterior(logsnr_t, logsnr_s):
    """q(z_s | z_t, x) = N(A z_t + B x, V), written as in VDM (Kingma et al. 2021)."""
    a2_t, s2_t = sig2(logsnr_t)
    a2_s, s2_s = sig2(logsnr_s)
    alpha_ts = (a2_t / a2_s).sqrt()                      # alpha_{t|s} = alpha_t / alpha_s
    s2_ts = s2_t - alpha_ts ** 2 * s2_s                  # sigma_{t|s}^2
    return alpha_ts * s2_s / s2_t, a2_s.sqrt() * s2_ts / s2_t, s2_ts * s2_s / s2_t


class GaussianDenoiser:
    """Exact E[x | z_t] for x ~ N(m, std^2) per pixel, returned as v. With class_means, label k uses mean
    class_means[k]; None or the null label (num_classes) uses `mean`. Records the batch size of each call."""

    def __init__(self, mean=0.3, std=0.4, class_means=()):
        self.mean, self.std, self.class_means = mean, std, torch.tensor(class_means, dtype=torch.float64)
        self.num_classes, self.calls = len(class_means), []

    def __call__(self, z, logsnr, labels=None):
        self.calls.append(z.shape[0])
        a2, s2 = (u.view(-1, 1, 1, 1) for u in sig2(logsnr))
        m = torch.full((z.shape[0],), self.mean, dtype=torch.float64)
        if labels is not None:
            cond = labels < self.num_classes
            m[cond] = self.class_means[labels[cond]]
        m, zd = m.view(-1, 1, 1, 1), z.double()
        x_hat = m + a2.sqrt() * self.std ** 2 / (a2 * self.std ** 2 + s2) * (zd - a2.sqrt() * m)  # E[x | z_t]
        return ((a2.sqrt() * zd - x_hat) / s2.sqrt()).float()     # v with alpha z - sigma v = x_hat


class PointsDenoiser:
    """Data = a few points x_k with weights w_k (optionally each with a class). p(k | z_t) is a softmax of
    log w_k - |z_t - alpha x_k|^2 / (2 sigma^2) and E[x | z_t] = sum_k p(k | z_t) x_k, returned as v."""

    def __init__(self, points, weights, point_class=None, num_classes=0):
        self.points, self.log_w = points.double(), torch.tensor(weights, dtype=torch.float64).log()
        self.point_class, self.num_classes = point_class, num_classes

    def __call__(self, z, logsnr, labels=None):
        a2, s2 = (u.view(-1, 1) for u in sig2(logsnr))
        zf = z.double().flatten(1)                                                  # (B, D)
        d2 = (zf[:, None, :] - a2.sqrt()[:, :, None] * self.points[None]).square().sum(-1)  # (B, K)
        logits = self.log_w[None] - d2 / (2 * s2)
        if labels is not None:                     # p(x | class k): only class k's points, null = all
            other = (self.point_class[None] != labels[:, None]) & (labels[:, None] < self.num_classes)
            logits = logits.masked_fill(other, -math.inf)
        x_hat = (torch.softmax(logits, -1)[:, :, None] * self.points[None]).sum(1)  # (B, D)
        return ((a2.sqrt() * zf - x_hat) / s2.sqrt()).view_as(z).float()


def nearest(x, points):
    """(index of the nearest point, its distance) per sample."""
    d = torch.cdist(x.double().flatten(1), points.double())
    return d.min(1).indices, d.min(1).values


# ------------------------------------------------------------------------------------------- the step

def test_ddpm_step_is_the_vdm_posterior():
    g = torch.Generator().manual_seed(0)
    logsnr_t = torch.rand(64, generator=g, dtype=torch.float64) * 22 - 12
    logsnr_s = logsnr_t + torch.rand(64, generator=g, dtype=torch.float64) * 5 + 0.01   # s < t: cleaner
    z_t, x, noise = (torch.randn(64, 3, 2, 2, generator=g, dtype=torch.float64) for _ in range(3))
    A, B, V = (u.view(-1, 1, 1, 1) for u in vdm_posterior(logsnr_t, logsnr_s))
    mean = S.ddpm_step(z_t, x, logsnr_t, logsnr_s, torch.zeros_like(z_t))
    torch.testing.assert_close(mean, A * z_t + B * x, rtol=1e-10, atol=1e-12)
    draw = S.ddpm_step(z_t, x, logsnr_t, logsnr_s, noise)
    torch.testing.assert_close(draw - mean, V.sqrt() * noise, rtol=1e-9, atol=1e-12)


def test_ddpm_step_maps_the_forward_marginal_onto_the_next_one():
    """Second route: if z_t ~ N(alpha_t x, sigma_t^2) and the step uses the true x, then z_s must be
    N(alpha_s x, sigma_s^2). The step is affine, so read its coefficients off unit inputs."""
    logsnr_t = torch.tensor([-14.0, -3.0, 0.0, 4.0, 9.0], dtype=torch.float64)
    logsnr_s = logsnr_t + torch.tensor([0.001, 0.5, 2.0, 6.0, 5.0], dtype=torch.float64)
    one, zero = torch.ones(5, 1, 1, 1, dtype=torch.float64), torch.zeros(5, 1, 1, 1, dtype=torch.float64)
    coef_z = S.ddpm_step(one, zero, logsnr_t, logsnr_s, zero).flatten()
    coef_x = S.ddpm_step(zero, one, logsnr_t, logsnr_s, zero).flatten()
    std = S.ddpm_step(zero, zero, logsnr_t, logsnr_s, one).flatten()
    (a2_t, s2_t), (a2_s, s2_s) = sig2(logsnr_t), sig2(logsnr_s)
    torch.testing.assert_close(coef_z * a2_t.sqrt() + coef_x, a2_s.sqrt(), rtol=1e-12, atol=0)  # mean
    torch.testing.assert_close(coef_z ** 2 * s2_t + std ** 2, s2_s, rtol=1e-10, atol=0)         # variance


# ------------------------------------------------------------------------------ exact denoisers

def exact_sampler_law(m, s, steps):
    """Mean and std of what the ancestral sampler outputs for x ~ N(m, s^2) with the exact denoiser.
    Everything is linear-Gaussian, so propagate (mean, var) of z through the VDM posterior step with
    x_hat = m + k (z - alpha m), k = alpha s^2 / (alpha^2 s^2 + sigma^2); the last step returns x_hat."""
    t = torch.tensor([(steps - i) / steps for i in range(steps + 1)], dtype=torch.float64)
    logsnr = COSINE(t)
    mean, var = 0.0, 1.0                                                  # z_1 ~ N(0, 1)
    for i in range(steps):
        a2, s2 = sig2(logsnr[i])
        k = a2.sqrt() * s * s / (a2 * s * s + s2)
        if i == steps - 1:
            return (m + k * (mean - a2.sqrt() * m)).item(), (k * var.sqrt()).item()
        A, B, V = vdm_posterior(logsnr[i], logsnr[i + 1])
        mean, var = (A + B * k) * mean + B * (1 - k * a2.sqrt()) * m, (A + B * k) ** 2 * var + V


def test_gaussian_data_mean_and_std_come_back():
    """x ~ N(0.3, 0.4^2) per pixel; 16,384 independent pixels per run (small tensors stay single-threaded,
    so this is fast even on a busy machine). The sampler plugs E[x | z_t] in for x, so each step drops
    the posterior variance B^2 Var[x | z_t]: the std comes out low, by an amount that shrinks with the
    steps (exact law on the cosine schedule: 42% at 4 steps, 18% at 16, 1.8% at 256, 0.5% at 1024).
    We check (a) the empirical mean/std equal the sampler's exact law within 5 Monte Carlo standard
    errors, (b) the error against the data shrinks 4 -> 16 -> 256 steps, (c) at 256 steps the std is
    within 2.5% of the data's (what that discretisation allows) plus Monte Carlo error, and the mean
    within Monte Carlo error."""
    m, s, n = 0.3, 0.4, 16 * 32 * 32
    mc_mean, mc_std = 5 * s / math.sqrt(n), 5 * s / math.sqrt(2 * n)
    errors = []
    for steps in (4, 16, 256):
        x = S.sample(GaussianDenoiser(m, s), (16, 1, 32, 32), COSINE, steps, clip_x=False,
                     seeds=range(16), progress=False).double()
        law_mean, law_std = exact_sampler_law(m, s, steps)
        assert abs(x.mean().item() - law_mean) < mc_mean and abs(x.std().item() - law_std) < mc_std, steps
        errors.append(abs(x.std().item() - s))
    assert errors[0] > errors[1] > errors[2] and errors[0] > 0.1
    assert errors[2] < 0.025 * s + mc_std and abs(x.mean().item() - m) < mc_mean


def test_few_points_are_hit_with_their_weights():
    """Four points in [-1, 1]^6 (some pixels saturated at +-1, as in real images) with weights
    0.4/0.3/0.2/0.1; 1000 samples. Each must end on a point (the last x_pred is a posterior average that
    has collapsed onto one point), and the frequencies must match the weights within 4 binomial
    standard deviations."""
    g = torch.Generator().manual_seed(1)
    points = torch.rand(4, 6, generator=g, dtype=torch.float64) * 2 - 1
    points[:, :2] = torch.tensor([[1.0, -1.0], [-1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    weights = [0.4, 0.3, 0.2, 0.1]
    x = S.sample(PointsDenoiser(points, weights), (1000, 1, 2, 3), COSINE, 64, seeds=range(1000), progress=False)
    which, dist = nearest(x, points)
    assert dist.max() < 1e-3
    freq = torch.bincount(which, minlength=4).double() / 1000
    for f, w in zip(freq.tolist(), weights):
        assert abs(f - w) < 4 * math.sqrt(w * (1 - w) / 1000), (freq, weights)


def test_guided_class_samples_land_on_their_class():
    """Classes 0 and 1 own two points each; with labels and guidance w = 3 (full interval and a middle
    interval) every sample of class k lies on one of class k's points, and both of them are used."""
    g = torch.Generator().manual_seed(2)
    points = torch.rand(4, 6, generator=g, dtype=torch.float64) * 1.6 - 0.8
    point_class = torch.tensor([0, 0, 1, 1])
    model = PointsDenoiser(points, [0.25] * 4, point_class, num_classes=2)
    labels = torch.arange(200) % 2
    for interval in ((0.0, 1.0), (0.2, 0.8)):
        x = S.sample(model, (200, 1, 2, 3), COSINE, 48, labels, guidance=3.0, guidance_interval=interval,
                     seeds=range(200), progress=False)
        which, dist = nearest(x, points)
        assert dist.max() < 1e-3
        assert torch.equal(point_class[which], labels)
        assert set(which.tolist()) == {0, 1, 2, 3}


def test_guidance_zero_is_no_guidance_and_interval_edges_are_exact():
    model = GaussianDenoiser(0.0, 0.5, class_means=(-0.5, 0.5))
    labels, shape = torch.tensor([0, 1, 1]), (3, 2, 4, 4)
    plain = S.sample(model, shape, COSINE, 10, labels, seeds=[7, 8, 9], progress=False)
    model.calls.clear()
    zero = S.sample(model, shape, COSINE, 10, labels, guidance=0.0, guidance_interval=(0.3, 0.7),
                    seeds=[7, 8, 9], progress=False)
    assert torch.equal(plain, zero) and model.calls == [3] * 10      # no unconditional pass at all
    # Grid t_i = 1 - i/10; the doubled (conditional + unconditional) batch must run exactly at
    # t in [0.3, 0.7] (edges included: i = 3..7), and at t in [0.35, 0.65] only for i = 4, 5, 6.
    for interval, guided in (((0.3, 0.7), range(3, 8)), ((0.35, 0.65), range(4, 7)), ((0.0, 1.0), range(10))):
        model.calls.clear()
        S.sample(model, shape, COSINE, 10, labels, guidance=2.0, guidance_interval=interval,
                 seeds=[7, 8, 9], progress=False)
        assert model.calls == [6 if i in guided else 3 for i in range(10)], interval


def test_guiding_v_equals_guiding_eps():
    """Second route: a wrapper that applies eps = (1 + w) eps_cond - w eps_uncond in float64 and hands
    back the v of that eps must sample the same images as sample(..., guidance=w)."""
    base, w = GaussianDenoiser(0.1, 0.3, class_means=(-0.4, 0.6)), 1.5

    class EpsGuided:
        num_classes = 2

        def __call__(self, z, logsnr, labels):
            a2, s2 = (u.view(-1, 1, 1, 1) for u in sig2(logsnr))
            zd = z.double()
            eps_c = s2.sqrt() * zd + a2.sqrt() * base(z, logsnr, labels).double()      # eps = sigma z + alpha v
            eps_u = s2.sqrt() * zd + a2.sqrt() * base(z, logsnr, torch.full_like(labels, 2)).double()
            eps = (1 + w) * eps_c - w * eps_u
            return ((eps - s2.sqrt() * zd) / a2.sqrt()).float()

    labels, shape = torch.tensor([0, 1, 0, 1]), (4, 3, 4, 4)
    ref = S.sample(EpsGuided(), shape, COSINE, 20, labels, seeds=range(4), clip_x=False, progress=False)
    got = S.sample(base, shape, COSINE, 20, labels, guidance=w, seeds=range(4), clip_x=False, progress=False)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert (got - S.sample(base, shape, COSINE, 20, labels, seeds=range(4), clip_x=False,
                           progress=False)).abs().max() > 0.1  # guidance did change the images


def test_seeds_make_images_independent_of_batch_size():
    model = GaussianDenoiser(0.0, 0.5, class_means=(-0.5, 0.5))
    seeds, labels = [11, 3, 5, 8, 13, 21, 2, 1], torch.tensor([0, 1] * 4)
    kw = dict(guidance=1.0, guidance_interval=(0.2, 0.9), progress=False)
    eight = S.sample(model, (8, 3, 4, 4), COSINE, 12, labels, seeds=seeds, **kw)
    fours = [S.sample(model, (4, 3, 4, 4), COSINE, 12, labels[i:i + 4], seeds=seeds[i:i + 4], **kw) for i in (0, 4)]
    assert torch.equal(eight, torch.cat(fours))
    assert not torch.equal(eight[0], eight[1])


def test_clip_x_clips_x_pred_and_only_when_asked():
    """A denoiser that always says x = 3: the sampler returns 1 with clipping, 3 without."""
    class SaysThree:
        def __call__(self, z, logsnr, labels=None):
            a2, s2 = (u.view(-1, 1, 1, 1) for u in sig2(logsnr))
            return ((a2.sqrt() * z.double() - 3.0) / s2.sqrt()).float()
    clipped = S.sample(SaysThree(), (2, 1, 2, 2), COSINE, 4, seeds=[0, 1], progress=False)
    free = S.sample(SaysThree(), (2, 1, 2, 2), COSINE, 4, seeds=[0, 1], clip_x=False, progress=False)
    assert torch.equal(clipped, torch.ones_like(clipped))
    torch.testing.assert_close(free, torch.full_like(free, 3.0), rtol=1e-5, atol=1e-5)


def test_sample_rejects_bad_arguments():
    uncond, cond = GaussianDenoiser(), GaussianDenoiser(class_means=(0.0, 0.1))
    with pytest.raises(ValueError, match="steps"):
        S.sample(uncond, (1, 1, 2, 2), COSINE, 0, progress=False)
    with pytest.raises(ValueError, match="unconditional"):
        S.sample(uncond, (1, 1, 2, 2), COSINE, 2, torch.tensor([0]), progress=False)
    with pytest.raises(ValueError, match="guidance"):
        S.sample(cond, (1, 1, 2, 2), COSINE, 2, None, guidance=1.0, progress=False)
    with pytest.raises(ValueError, match="seeds"):
        S.sample(uncond, (2, 1, 2, 2), COSINE, 2, seeds=[1], progress=False)


# ---------------------------------------------------------------------------------- checkpoints, PNGs

# ----------------------------------------------------------------------------------------------- CLI

def run_cli(args, cwd):
    return subprocess.run([sys.executable, str(REPO / "sample.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.slow
def test_cli_end_to_end(tmp_path):
    write_checkpoint(tmp_path / "runs" / "unet-8", 3)
    done = run_cli(["--num-images", "5", "--steps", "2", "--batch-size", "2"], tmp_path)     # no --ckpt: ./runs
    assert done.returncode == 0, done.stderr
    grid = tmp_path / "runs" / "unet-8" / "sample_00000003.png"
    assert "wrote grid of 5 images to runs/unet-8/sample_00000003.png" in done.stdout and "EMA" in done.stdout
    assert Image.open(grid).size == (3 * 10 + 2, 2 * 10 + 2)                          # 5 images, 3 per row
    done = run_cli(["--ckpt", "runs/unet-8", "--num-images", "3", "--steps", "2", "--seed", "4", "--out-dir", "pngs"],
                   tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "pngs").iterdir()) == ["000004.png", "000005.png", "000006.png"]
    # Two processes (gloo on CPU): seeds split across ranks, each written once, same pixels as one process.
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "sample.py"), "--ckpt", "runs/unet-8", "--num-images", "3", "--steps", "2",
                           "--seed", "4", "--batch-size", "1", "--out-dir", "ddp"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0 and "2 processes" in done.stdout, done.stderr
    for name in ("000004.png", "000005.png", "000006.png"):
        one, two = (np.array(Image.open(tmp_path / d / name)).astype(int) for d in ("pngs", "ddp"))
        assert np.abs(one - two).max() <= 1, name    # <= 1 level: thread counts may move a float rounding
    assert len(list((tmp_path / "ddp").iterdir())) == 3
    for args, message in ((["--steps", "0"], "--steps 0"), (["--ckpt", "missing/ckpt_1.pt"], "missing/ckpt_1.pt")):
        bad = run_cli(args, tmp_path)
        assert bad.returncode == 2 and bad.stderr.startswith("error: ") and message in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1


def test_cli_out_dir_resume_and_bad_inputs(tmp_path, capsys):
    write_checkpoint(tmp_path / "cond", 7, num_classes=2, class_names=["cat", "dog"])
    ckpt = str(tmp_path / "cond")
    common = ["--ckpt", ckpt, "--steps", "3", "--batch-size", "3", "--guidance", "2",
              "--guidance-interval", "0.1", "0.9"]
    assert S.main(common + ["--num-images", "5", "--out-dir", str(tmp_path / "full")]) == 0
    assert S.main(common + ["--num-images", "2", "--out-dir", str(tmp_path / "part")]) == 0
    first = (tmp_path / "part" / "000000.png").stat().st_mtime_ns
    capsys.readouterr()
    assert S.main(common + ["--num-images", "5", "--out-dir", str(tmp_path / "part")]) == 2      # refuses a full folder
    assert "--resume" in capsys.readouterr().err
    (tmp_path / "part" / "000003.png.tmp999").write_bytes(b"half a PNG")               # a killed run's leftover
    assert S.main(common + ["--num-images", "5", "--out-dir", str(tmp_path / "part"), "--resume", "--batch-size", "2",
                            "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "part" / "000000.png").stat().st_mtime_ns == first              # kept, not rewritten
    for seed in range(5):   # resumed with another batch size = a fresh run, byte for byte
        name = f"{seed:06d}.png"
        assert (tmp_path / "part" / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name
    assert Image.open(tmp_path / "grid.png").size == (3 * 10 + 2, 2 * 10 + 2)
    assert sorted(p.name for p in (tmp_path / "part").iterdir()) == [f"{i:06d}.png" for i in range(5)]
    assert S.main(common + ["--num-images", "1", "--out-dir", str(tmp_path / "part"), "--overwrite"]) == 0
    assert (tmp_path / "part" / "000000.png").stat().st_mtime_ns != first
    capsys.readouterr()
    for args, message in ((["--class", "bird"], "0=cat, 1=dog"), (["--class", "2"], "0=cat, 1=dog"),
                          (["--res", "16"], "trained at 8x8"), (["--guidance-interval", "0.6", "0.4"], "T_LO")):
        assert S.main(common + ["--num-images", "1", "--out", str(tmp_path / "x.png")] + args) == 2
        assert message in capsys.readouterr().err
    assert S.main(common + ["--num-images", "2", "--class", "dog", "--out", str(tmp_path / "dog.png")]) == 0
    write_checkpoint(tmp_path / "uncond", 1)
    for args in (["--class", "0"], ["--guidance", "1"]):
        argv = ["--ckpt", str(tmp_path / "uncond"), "--steps", "1", "--out", str(tmp_path / "u.png")] + args
        assert S.main(argv) == 2
        assert "unconditional" in capsys.readouterr().err


def test_cli_samples_with_the_checkpoints_schedule(tmp_path, monkeypatch, capsys):
    """The CLI must hand the sampler the schedule stored in the checkpoint: here a cosine one at 8 px, whose
    logsnr is written out below (Eq. 4, clipped to +-15); the default shifted schedule would differ by
    2 log(64/8). --schedule replaces it; an unknown name is one error line naming the choices."""
    import checkpoint
    write_checkpoint(tmp_path / "run", 1)
    path = tmp_path / "run" / "ckpt_00000001.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["schedule"] = dataclasses.asdict(get_schedule("cosine", 8))
    checkpoint.save_checkpoint(tmp_path / "run", ckpt)
    seen = []
    monkeypatch.setattr(S, "sample", lambda model, shape, logsnr_fn, *a, **k: seen.append(logsnr_fn) or
                        torch.zeros(shape))
    assert S.main(["--ckpt", str(tmp_path / "run"), "--num-images", "2", "--steps", "2",
                   "--out", str(tmp_path / "g.png")]) == 0
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    lo, hi = math.atan(math.exp(-7.5)), math.atan(math.exp(7.5))
    expected = -2 * torch.log(torch.tan(lo + t * (hi - lo)))
    torch.testing.assert_close(seen[0](t), expected)
    # --schedule overrides it: the same t grid through the shifted schedule, Eq. 5 = Eq. 4 + 2 log(64/8).
    assert S.main(["--ckpt", str(tmp_path / "run"), "--num-images", "2", "--steps", "2", "--schedule", "shifted",
                   "--out", str(tmp_path / "g.png")]) == 0
    torch.testing.assert_close(seen[1](t), expected + 2 * math.log(64 / 8))
    capsys.readouterr()
    assert S.main(["--ckpt", str(tmp_path / "run"), "--steps", "2", "--schedule", "linear"]) == 2
    assert "cosine, shifted, interpolated" in capsys.readouterr().err and len(seen) == 2
