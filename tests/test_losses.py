"""
losses.py against independent computations: the v/eps/x conversions round-trip; the multiscale loss
equals a per-level computation written with reshapes (not avg_pool2d) and reduces to MSE / d at one level;
it down-weights a purely high-frequency error; the loss of a zero network and of an oracle network have
closed forms; the sigmoid weighting equals exp(b) sigmoid(logsnr - b) on the x-MSE; d logsnr / dt by
autograd equals the closed form; gradients are finite at t = 0 and t = 1; label dropout and the
low-discrepancy time draw behave as specified.
"""
import math

import pytest
import torch

from losses import (diffuse, diffusion_loss, dlogsnr_dt, drop_labels, eps_from_v, multiscale_levels,
                    multiscale_mse, sample_t, v_from_x_eps, x_from_v)
from schedules import alpha_sigma, get_schedule


def _batch(seed=0, b=4, c=3, d=16, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, c, d, d, generator=g, dtype=dtype) * 2 - 1
    eps = torch.randn(b, c, d, d, generator=g, dtype=dtype)
    logsnr = torch.linspace(-12, 12, b, dtype=dtype)
    return x, eps, logsnr


def test_conversions_round_trip():
    x, eps, logsnr = _batch()
    z_t = diffuse(x, logsnr, eps)
    v = v_from_x_eps(x, eps, logsnr)
    assert torch.allclose(x_from_v(z_t, v, logsnr), x, atol=1e-12)
    assert torch.allclose(eps_from_v(z_t, v, logsnr), eps, atol=1e-12)
    # z_t written out by hand for one example
    a, s = math.sqrt(1 / (1 + math.exp(-logsnr[1].item()))), math.sqrt(1 / (1 + math.exp(logsnr[1].item())))
    assert torch.allclose(z_t[1], a * x[1] + s * eps[1], atol=1e-12)


def _pool_by_reshape(x, s):
    b, c, d, _ = x.shape
    k = d // s
    return x.reshape(b, c, s, k, s, k).mean(dim=(3, 5))


def test_multiscale_equals_per_level_sum():
    g = torch.Generator().manual_seed(1)
    eps_pred, eps = torch.randn(2, 2, 3, 128, 128, generator=g, dtype=torch.float64)
    expected = sum(_pool_by_reshape(eps_pred - eps, s).square().mean(dim=(1, 2, 3)) / s for s in (32, 64, 128))
    assert multiscale_levels(128) == [32, 64, 128]
    assert torch.allclose(multiscale_mse(eps_pred, eps).double(), expected, rtol=1e-6)


@pytest.mark.parametrize("d", [8, 16, 32])
def test_multiscale_single_level_is_mse_over_d(d):
    g = torch.Generator().manual_seed(d)
    eps_pred, eps = torch.randn(2, 3, 3, d, d, generator=g)
    mse = (eps_pred - eps).square().mean(dim=(1, 2, 3))
    assert torch.allclose(multiscale_mse(eps_pred, eps), mse / d, rtol=1e-6)


def test_multiscale_weights_high_frequencies_less():
    # Two errors of equal energy (per-pixel MSE = 1): a checkerboard averages to 0 at every coarser
    # level, a constant survives all of them.
    d = 128
    i = torch.arange(d)
    checker = ((i[:, None] + i[None, :]) % 2 * 2 - 1).float().expand(1, 3, d, d)
    smooth = torch.ones(1, 3, d, d)
    zero = torch.zeros(1, 3, d, d)
    assert multiscale_mse(checker, zero).item() == pytest.approx(1 / 128, rel=1e-6)
    assert multiscale_mse(smooth, zero).item() == pytest.approx(1 / 32 + 1 / 64 + 1 / 128, rel=1e-6)
    # The plain MSE cannot tell them apart.
    assert checker.square().mean() == smooth.square().mean()


def test_zero_network_loss_has_closed_form():
    # v_pred = 0  =>  eps_pred = sigma z = sigma alpha x + sigma^2 eps, so eps - eps_pred = alpha^2 eps - alpha sigma x.
    x, eps, _ = _batch(2, d=8)
    schedule = get_schedule("shifted", 8)
    t = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=torch.float64)
    loss = diffusion_loss(lambda z, l, c: torch.zeros_like(z), x, schedule, t=t, eps=eps)
    alpha, sigma = alpha_sigma(schedule(t))
    alpha, sigma = alpha[:, None, None, None], sigma[:, None, None, None]
    expected = (alpha**2 * eps - alpha * sigma * x).square().mean(dim=(1, 2, 3))
    assert torch.allclose(loss.double(), expected, rtol=1e-5)


def test_oracle_network_has_zero_loss():
    x, eps, _ = _batch(3, d=8)
    schedule = get_schedule("cosine", 8)
    t = torch.tensor([0.1, 0.4, 0.6, 0.9], dtype=torch.float64)
    oracle = lambda z, logsnr, c: v_from_x_eps(x, eps, logsnr)  # noqa: E731
    for multiscale in (False, True):
        for weighting in ("eps", "sigmoid"):
            loss = diffusion_loss(oracle, x, schedule, t=t, eps=eps, multiscale=multiscale, weighting=weighting)
            assert loss.abs().max().item() < 1e-20


@pytest.mark.parametrize("bias", [-2.0, 0.0, 2.0])
def test_sigmoid_weighting_equals_x_space_form(bias):
    """On the eps-MSE the weight is (-dlogsnr/dt) sigmoid(b - logsnr); written on the x-MSE it must be
    (-dlogsnr/dt) exp(b) sigmoid(logsnr - b), because |eps - eps_pred|^2 = SNR |x - x_pred|^2."""
    x, eps, _ = _batch(4, d=8)
    schedule = get_schedule("shifted", 128)
    t = torch.tensor([0.05, 0.3, 0.6, 0.95], dtype=torch.float64)
    weight = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    model = lambda z, logsnr, c: torch.einsum("oc,bchw->bohw", weight, z)  # noqa: E731  any network will do
    loss = diffusion_loss(model, x, schedule, t=t, eps=eps, weighting="sigmoid", sigmoid_bias=bias)

    logsnr = schedule(t)
    z_t = diffuse(x, logsnr, eps)
    x_pred = x_from_v(z_t, model(z_t, logsnr, None), logsnr)
    h = 1e-6
    jacobian = -(schedule(t + h) - schedule(t - h)) / (2 * h)  # finite differences, not the closed form
    x_mse = (x - x_pred).square().mean(dim=(1, 2, 3))
    expected = jacobian * math.exp(bias) * torch.sigmoid(logsnr - bias) * x_mse
    assert torch.allclose(loss.double(), expected, rtol=1e-5)


@pytest.mark.parametrize("name", ["cosine", "shifted", "interpolated"])
def test_dlogsnr_dt_autograd_matches_closed_form(name):
    schedule = get_schedule(name, 256)
    t = torch.rand(64, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    by_autograd = dlogsnr_dt(lambda u: schedule(u), t)  # a plain function: no .dlogsnr_dt attribute
    assert torch.allclose(by_autograd, schedule.dlogsnr_dt(t), rtol=1e-10)
    assert torch.allclose(dlogsnr_dt(schedule, t), schedule.dlogsnr_dt(t))


@pytest.mark.parametrize("weighting", ["eps", "sigmoid"])
@pytest.mark.parametrize("multiscale", [False, True])
def test_gradients_finite_at_both_ends(weighting, multiscale):
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 3, 3, padding=1)
    model = lambda z, logsnr, c: net(z) * logsnr[:, None, None, None]  # noqa: E731  depends on logsnr too
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    loss = diffusion_loss(model, x, get_schedule("shifted", 64), t=torch.tensor([0.0, 1.0]),
                          multiscale=multiscale, weighting=weighting)
    loss.mean().backward()
    assert torch.isfinite(loss).all()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_drop_labels():
    labels = torch.randint(0, 10, (20000,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(drop_labels(labels, 0.0, 10), labels)
    assert torch.all(drop_labels(labels, 1.0, 10) == 10)
    dropped = drop_labels(labels, 0.1, 10, generator=torch.Generator().manual_seed(1))
    frac = (dropped == 10).float().mean().item()
    assert abs(frac - 0.1) < 4 * math.sqrt(0.1 * 0.9 / 20000)     # within 4 standard deviations
    kept = dropped != 10
    assert torch.equal(dropped[kept], labels[kept])


def test_low_discrepancy_t_is_evenly_spaced():
    t = sample_t(16, "cpu", low_discrepancy=True, generator=torch.Generator().manual_seed(0))
    gaps = torch.diff(torch.sort(t).values)
    assert torch.allclose(gaps, torch.full_like(gaps, 1 / 16), atol=1e-6)
    assert t.min() >= 0 and t.max() < 1


def test_bad_weighting_is_rejected():
    with pytest.raises(ValueError, match="weighting"):
        diffusion_loss(lambda z, l, c: z, torch.zeros(1, 3, 8, 8), get_schedule("cosine", 8), weighting="snr")
