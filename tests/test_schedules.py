"""
schedules.py against independent computations: the identities of a variance-preserving process, the
clipping of the cosine schedule, the size and sign of the shift (Eq. 5), the endpoints of the interpolated
schedule (Eq. 6, appendix form) and its resolution-capped bases, get_schedule's values against Eq. 4-6
written out here, values derived by hand, the closed-form derivative against finite differences, saved
schedule dicts loading unchanged, and the paper's central argument run as an experiment (pooling a
shifted high-resolution image reproduces the 64x64 cosine SNR).
"""
import math
from dataclasses import asdict

import pytest
import torch

from schedules import (Schedule, alpha_sigma, dlogsnr_cosine_dt, get_schedule, interpolated_bases, logsnr_cosine,
                       logsnr_interpolated, logsnr_shifted)

RESOLUTIONS = [32, 64, 128, 256, 512, 1024]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_alpha_sigma_variance_preserving(dtype):
    logsnr = torch.linspace(-30, 30, 1001, dtype=dtype)
    alpha, sigma = alpha_sigma(logsnr)
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    assert torch.allclose(alpha**2 + sigma**2, torch.ones_like(logsnr), atol=tol, rtol=0)
    # and the ratio really is the SNR: log(alpha^2 / sigma^2) = logsnr
    assert torch.allclose(2 * (alpha.log() - sigma.log()), logsnr, atol=1e3 * tol, rtol=0)


def test_alpha_sigma_keeps_relative_precision_in_float32():
    # sigma at logsnr = 30 is exp(-15) / sqrt(1 + exp(-30)); sqrt(1 - alpha^2) would give exactly 0 in float32.
    alpha, sigma = alpha_sigma(torch.tensor([30.0, -30.0]))
    exact_small = math.exp(-15) / math.sqrt(1 + math.exp(-30))
    assert sigma[0].item() == pytest.approx(exact_small, rel=1e-5)
    assert alpha[1].item() == pytest.approx(exact_small, rel=1e-5)


@pytest.mark.parametrize("name", ["cosine", "shifted", "interpolated"])
def test_logsnr_strictly_decreasing(name):
    t = torch.linspace(0, 1, 20001, dtype=torch.float64)
    logsnr = get_schedule(name, 512)(t)
    assert torch.all(logsnr[1:] < logsnr[:-1])


def test_cosine_clipped_endpoints():
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert torch.allclose(logsnr_cosine(t), torch.tensor([15.0, -15.0], dtype=torch.float64), atol=1e-9)
    assert torch.allclose(logsnr_cosine(t, -10.0, 12.0), torch.tensor([12.0, -10.0], dtype=torch.float64), atol=1e-9)
    # float32 too: the endpoints are what train.py and sample.py actually evaluate
    assert torch.allclose(logsnr_cosine(t.float()), torch.tensor([15.0, -15.0]), atol=2e-3)


@pytest.mark.parametrize("image_d", RESOLUTIONS)
def test_shift_is_exactly_two_log_ratio(image_d):
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    shift = logsnr_shifted(t, image_d) - logsnr_cosine(t)
    expected = 2 * (math.log(64) - math.log(image_d))
    assert torch.allclose(shift, torch.full_like(t, expected), atol=1e-12, rtol=0)
    # the shifted endpoints move with the shift (no re-clipping, as in the appendix code)
    assert logsnr_shifted(torch.tensor(0.0, dtype=torch.float64), image_d).item() == pytest.approx(15 + expected)


@pytest.mark.parametrize("image_d", [256, 512, 1024])
def test_interpolated_endpoints(image_d):
    t0 = torch.tensor(0.0, dtype=torch.float64)
    t1 = torch.tensor(1.0, dtype=torch.float64)
    assert logsnr_interpolated(t0, image_d).item() == pytest.approx(logsnr_shifted(t0, image_d, 256).item(), abs=1e-12)
    assert logsnr_interpolated(t1, image_d).item() == pytest.approx(logsnr_shifted(t1, image_d, 32).item(), abs=1e-12)


def test_values_by_hand():
    # Without clipping (limits +-inf), t_min = atan(0) = 0 and t_max = atan(inf) = pi/2, so
    # logsnr(t) = -2 log tan(pi t / 2):
    #   t = 1/3: tan(pi/6) = 1/sqrt(3)    -> logsnr = log 3
    #   t = 1/4: tan(pi/8) = sqrt(2) - 1  -> logsnr = 2 log(1 + sqrt 2)
    t = torch.tensor([1 / 3, 1 / 4], dtype=torch.float64)
    unclipped = logsnr_cosine(t, -math.inf, math.inf)
    assert unclipped[0].item() == pytest.approx(math.log(3), abs=1e-12)
    assert unclipped[1].item() == pytest.approx(2 * math.log(1 + math.sqrt(2)), abs=1e-12)
    # With the symmetric clip +-15: atan(e^-7.5) + atan(e^7.5) = pi/2, so t = 1/2 maps to pi/4
    # exactly and logsnr = -2 log tan(pi/4) = 0, i.e. alpha = sigma = 1/sqrt(2).
    half = torch.tensor(0.5, dtype=torch.float64)
    assert logsnr_cosine(half).item() == pytest.approx(0.0, abs=1e-12)
    alpha, sigma = alpha_sigma(logsnr_cosine(half))
    assert alpha.item() == pytest.approx(2**-0.5) and sigma.item() == pytest.approx(2**-0.5)
    # Shifted at 512: 0 + 2 log(64/512) = -6 log 2.
    assert logsnr_shifted(half, 512).item() == pytest.approx(-6 * math.log(2), abs=1e-12)
    # Interpolated at 512, t = 1/2: (1/2) 2 log(32/512) + (1/2) 2 log(256/512) = -log 16 - log 2 = -log 32.
    assert logsnr_interpolated(half, 512).item() == pytest.approx(-math.log(32), abs=1e-12)


@pytest.mark.parametrize("name, image_d", [("cosine", 512), ("shifted", 512), ("interpolated", 512),
                                           ("interpolated", 128)])
def test_closed_form_derivative_matches_finite_differences(name, image_d):
    schedule = get_schedule(name, image_d)
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    h = 1e-6
    numeric = (schedule(t + h) - schedule(t - h)) / (2 * h)
    assert torch.allclose(schedule.dlogsnr_dt(t), numeric, rtol=1e-6, atol=1e-6)
    assert torch.allclose(dlogsnr_cosine_dt(t), (logsnr_cosine(t + h) - logsnr_cosine(t - h)) / (2 * h), rtol=1e-6)


def test_get_schedule_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown schedule"):
        get_schedule("linear", 64)
    with pytest.raises(ValueError, match="positive"):
        get_schedule("shifted", 0)


def _eq4_to_6(t: float, name: str, d: int, noise_d=64, low=32, high=256) -> float:
    """Eq. 4-6 in plain math, clipped to [-15, 15] before the shift as the appendix code does."""
    t_min, t_max = math.atan(math.exp(-7.5)), math.atan(math.exp(7.5))
    cosine = -2 * math.log(math.tan(t_min + t * (t_max - t_min)))
    if name == "cosine":
        return cosine
    if name == "shifted":
        return cosine + 2 * math.log(noise_d / d)
    return t * (cosine + 2 * math.log(low / d)) + (1 - t) * (cosine + 2 * math.log(high / d))


@pytest.mark.parametrize("image_d", [16, 64, 128, 512])
@pytest.mark.parametrize("name", ["cosine", "shifted", "interpolated"])
def test_get_schedule_values_follow_the_equations(name, image_d):
    ts = [0.0, 0.05, 0.3, 0.5, 0.77, 1.0]
    got = get_schedule(name, image_d)(torch.tensor(ts, dtype=torch.float64))
    # interpolated: the paper's bases 32 and 256, each capped at the image width
    low, high = min(32, image_d), min(256, image_d)
    expected = [_eq4_to_6(t, name, image_d, low=low, high=high) for t in ts]
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=1e-10, rtol=0)
    # the reference width of the shifted schedule is honoured too
    if name == "shifted":
        got32 = get_schedule(name, image_d, noise_d=32)(torch.tensor(ts, dtype=torch.float64))
        assert got32.tolist() == pytest.approx([_eq4_to_6(t, name, image_d, noise_d=32) for t in ts], abs=1e-10)


def test_interpolated_bases_are_the_papers_at_high_resolution_and_never_add_snr():
    assert interpolated_bases(512) == (32, 256) and interpolated_bases(1024) == (32, 256)
    t = torch.linspace(0, 1, 201, dtype=torch.float64)
    for d in [8, 16, 32, 48, 64, 100, 128, 256, 512, 2048]:
        interp = get_schedule("interpolated", d)(t)
        # a base above d would shift towards less noise: the capped schedule never rises above the cosine one
        assert torch.all(interp <= logsnr_cosine(t) + 1e-12), d
    # at 32 px and below there is nothing to pool: the interpolated schedule is the cosine schedule
    assert torch.allclose(get_schedule("interpolated", 16)(t), logsnr_cosine(t), atol=1e-12)
    # explicit bases still win over the defaults
    assert get_schedule("interpolated", 128, noise_d_high=256).noise_d_high == 256


@pytest.mark.parametrize("name", ["cosine", "shifted", "interpolated"])
def test_saved_schedule_dict_builds_the_same_schedule(name):
    t = torch.rand(32, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    schedule = get_schedule(name, 128)
    loaded = Schedule(**asdict(schedule))
    assert loaded == schedule and torch.equal(loaded(t), schedule(t))
    # a dict written with the uncapped 32/256 bases keeps them: old checkpoints sample as they were trained
    old = {"name": name, "image_d": 128, "noise_d": 64, "noise_d_low": 32, "noise_d_high": 256,
           "logsnr_min": -15.0, "logsnr_max": 15.0}
    expected = [_eq4_to_6(ti, name, 128) for ti in t.tolist()]
    assert Schedule(**old)(t).tolist() == pytest.approx(expected, abs=1e-10)


@pytest.mark.parametrize("s", [2, 4, 8])
def test_pooling_a_shifted_image_sees_the_64px_cosine_schedule(s):
    """Sec. 3.1's argument as an experiment. Two 64x64 images upsampled (nearest) to 64*s are diffused with
    the schedule shifted for 64*s; average-pooling s x s windows keeps the (piecewise-constant) signal
    alpha * x64 and divides the noise variance by s^2. The SNR measured on the pooled noisy images,
    alpha^2 / var(z64 - alpha x64), must equal the 64x64 cosine SNR; the unshifted cosine schedule at
    64*s gives s^2 times too much."""
    g = torch.Generator().manual_seed(s)
    x64 = torch.rand(2, 3, 64, 64, generator=g, dtype=torch.float64) * 2 - 1
    x_big = x64.repeat_interleave(s, dim=2).repeat_interleave(s, dim=3)  # (2, 3, 64s, 64s)
    t = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)

    def pooled_snr(logsnr_big):
        snr = []
        for lam in logsnr_big:
            alpha, sigma = alpha_sigma(lam)
            z = alpha * x_big + sigma * torch.randn(x_big.shape, generator=g, dtype=torch.float64)
            z64 = torch.nn.functional.avg_pool2d(z, s)                      # (2, 3, 64, 64)
            snr.append((alpha**2 / (z64 - alpha * x64).var()).item())
        return torch.tensor(snr, dtype=torch.float64)

    target = torch.exp(logsnr_cosine(t))
    shifted = pooled_snr(logsnr_shifted(t, 64 * s))
    unshifted = pooled_snr(logsnr_cosine(t))
    # 24,576 pooled values: the variance estimate has a relative std of sqrt(2 / 24576) = 0.9%,
    # so 5% is more than 5 standard deviations.
    assert torch.allclose(shifted, target, rtol=0.05)
    assert torch.all(unshifted / target > 0.8 * s**2)
